"""The one place that talks to a Ray cluster's Serve REST API.

A data-centre site declared with ``spec.ray.address`` runs edgeplane's replicas as Ray
Serve applications. Serve is declarative already (``PUT /api/serve/applications/``
replaces the whole set of declaratively deployed applications), so this adapter only has to
turn the placement into that config, keep applications edgeplane does not own alive across
the replace, and read statuses back. Everything Ray-specific - URLs, token headers, HTTP
errors, the shape of Serve's status JSON - stays in this module; the reconciler sees
:class:`~orchestrator.adapters.serve_config.DataCentreActuator`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import pathlib
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Self
from urllib.parse import urlsplit

import httpx

from edgeplane_proto import hostport, oip
from orchestrator import proxyenv
from orchestrator.adapters import ray_owner, serve_config
from orchestrator.adapters.ownership import Ownership
from orchestrator.adapters.serve_config import (
    DataCentreActuator,
    RayAuthError,
    RayServeError,
    RayUnreachable,
    ServeAppFailed,
    ServeAppSpec,
    ServeAppState,
    ServeAppStatus,
    ServeConfigRejected,
)

log = logging.getLogger(__name__)

APPLICATIONS_PATH = "/api/serve/applications/"
NODES_PATH = "/api/v0/nodes"
#: Returns the bearer token for the dashboard, or None when the cluster has auth off.
TokenProvider = Callable[[], "str | None"]


def no_token() -> str | None:
    return None


def static_token(token: str) -> TokenProvider:
    """A provider for a token read from the site's configuration."""

    def provide() -> str | None:
        return token

    return provide


def token_from_file(path: str | pathlib.Path) -> TokenProvider:
    """A provider that reads a secret file on every call, so a rotated token is picked up.
    An empty file (a secret not filled in yet) is an error naming it, not "no token": the
    cluster's 401 would say none was set."""
    token_path = pathlib.Path(path)

    def provide() -> str | None:
        try:
            token = token_path.read_text().strip()
        except OSError as exc:
            raise RayServeError(f"cannot read the Ray token file {token_path}: {exc}") from exc
        if not token:
            raise RayServeError(f"the Ray token file {token_path} is empty")
        return token

    return provide


class ClusterWrites:
    """The Serve config writes to one Ray cluster, one at a time.

    A PUT replaces the whole config, so an apply reads it, keeps the applications it does
    not own and writes them back. Two sites sharing a cluster (the embedded one, say),
    applied at once, each wrote back the other's applications as it had read them: the
    later PUT undid the earlier one's changes, and the next observation of that site found
    them "configured otherwise". Serve's REST API has no conditional write, so the actuators
    of one cluster share one of these and each reads and writes in its turn."""

    def __init__(self) -> None:
        self._turn = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def turn(self, dashboard_url: str) -> AsyncIterator[None]:
        if self._turn.locked():
            log.debug("an apply to %s waits for another site's to end", dashboard_url)
        async with self._turn:
            yield


class RayServeActuator:
    """Declarative Serve applications on one Ray cluster, through its dashboard's REST API.

    ``serve_url`` is the base URL of the cluster's Serve HTTP proxy as callers reach it;
    without it the proxy is assumed on the dashboard's host at the port Serve reports.
    ``http_options`` is sent when this actuator is the one that starts Serve (host, port of
    the proxy); a running Serve keeps its own. Applications this actuator owns are those
    named with ``owned_prefix``, or those ``owns(name)`` accepts: several sites sharing
    one Ray cluster each pass a predicate that recognises only their own applications, so
    one site's ``apply()`` never removes another's, and pass the cluster's one ``writes``,
    so that neither writes back what the other changed meanwhile. ``ownership``: the
    cluster is marked as this control plane's for the site (:mod:`.ray_owner`), and one
    marked as another's is neither read nor changed
    (:class:`~orchestrator.adapters.ownership.OwnedElsewhere`); the mark is read before
    every apply, and by an observation at most every ``owner_recheck_s`` on ``clock`` once
    it read as not another's. ``transport`` is the seam for tests.
    """

    def __init__(
        self,
        dashboard_url: str,
        *,
        token_provider: TokenProvider = no_token,
        serve_url: str | None = None,
        http_options: Mapping[str, Any] | None = None,
        owned_prefix: str = serve_config.OWNED_PREFIX,
        owns: Callable[[str], bool] | None = None,
        timeout_s: float = 15.0,
        transport: httpx.AsyncBaseTransport | None = None,
        writes: ClusterWrites | None = None,
        ownership: Ownership | None = None,
        owner_recheck_s: float = ray_owner.RECHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dashboard_url = dashboard_url.rstrip("/")
        self._token_provider = token_provider
        self._serve_url = serve_url.rstrip("/") if serve_url else None
        self._http_options = dict(http_options or {})
        self._owned_prefix = owned_prefix
        self._owns = owns or (lambda name: serve_config.is_owned(name, owned_prefix))
        self._writes = writes or ClusterWrites()
        self._owner = None if ownership is None else ray_owner.OwnerMark(ownership, self._request, self._dashboard_url,
                                                                         recheck_s=owner_recheck_s, clock=clock)
        self._client = proxyenv.async_client(transport, base_url=self._dashboard_url, timeout=timeout_s)
        # Ingress deployment of each ray-serve application, learnt from the cluster, so
        # that an application without an explicit ``deployment`` can still be sized.
        self._ingress: dict[str, str] = {}
        self._sent: dict[str, dict[str, Any]] | None = None  # our applications as the last PUT gave them
        self._refused: dict[str, str] = {}  # by name: ours the last apply asked for and Ray refused, why
        self.drift = ""

    def __repr__(self) -> str:  # never shows the token
        return f"RayServeActuator({self._dashboard_url!r})"

    @property
    def dashboard_url(self) -> str:
        return self._dashboard_url

    async def apply(self, apps: Sequence[ServeAppSpec]) -> Mapping[str, str]:
        names = [a.name for a in apps]
        if len(set(names)) != len(names):
            raise ValueError(f"application names must be unique, got {names}")
        for app in apps:
            if not self._owns(app.name):
                raise ValueError(
                    f"application {app.name!r} is not one this actuator owns "
                    f"(prefix {self._owned_prefix!r})"
                )
        async with self._writes.turn(self._dashboard_url):  # what is read here is written back
            if self._owner is not None:
                await self._owner.before_apply()
            details = await self._get_details()
            self._learn_ingress(details)
            config = self._merge(details, apps)
            log.info(
                "applying %d edgeplane Serve application(s) to %s (%d others kept)",
                len(apps),
                self._dashboard_url,
                len(config["applications"]) - len(apps),
            )
            config, refused = await self._put(config, details)
            self._sent = {a["name"]: a for a in config["applications"] if self._owns(a["name"])}
        self._refused = refused
        # one no node holds waits, as observe() says; one Ray refused is reported by observe() too
        return {name: f"refused by Ray Serve: {why}" + ("; it runs as it was" if name in self._sent else "")
                for name, why in refused.items()}

    async def _put(self, config: dict[str, Any], details: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """PUT ``config``: the config the cluster took, and ours Ray refused, by name: why.

        Serve's PUT is one config for every application on the cluster: a 400 for one left
        all the others unapplied. Where Ray's answer names applications of ours (its schema's
        error locations, ``applications.<index>``), the config is sent again with each of them
        as it runs on the cluster, or without it if it runs nowhere (one refused as it runs
        too is left out), so that one bad application fails alone. A refusal that names
        none, or names another owner's, refuses the apply as a whole, as before."""
        refused: dict[str, str] = {}
        for _ in range(2 * len(config["applications"]) + 1):  # each retry drops or reverts one of ours at least
            try:
                await self._request("PUT", APPLICATIONS_PATH, json=config)
                return config, refused
            except ServeConfigRejected as exc:
                named = refused_applications(exc.detail, [a.get("name", "") for a in config["applications"]])
                if not named or not all(self._owns(name) for name in named):
                    raise
                log.warning("Ray Serve on %s refused %s; applying the others", self._dashboard_url, ", ".join(sorted(named)))
                config = self._without(config, details, named, kept=set(refused))
                refused.update({name: why for name, why in named.items() if name not in refused})
        raise ServeConfigRejected("refused again after leaving out each application it named")

    def _without(self, config: dict[str, Any], details: Mapping[str, Any], refused: Mapping[str, str], kept: set[str]) -> dict[str, Any]:
        """``config`` with each ``refused`` application as it runs on the cluster, or left out
        where it runs nowhere or was already sent as it runs (``kept``)."""
        running = {name: app.get("deployed_app_config") for name, app in (details.get("applications") or {}).items()
                   if app.get("source") == "declarative" and app.get("deployed_app_config")}
        applications = []
        for entry in config["applications"]:
            name = entry.get("name", "")
            if name not in refused:
                applications.append(entry)
            elif name in running and name not in kept:
                applications.append(running[name])
        return {**config, "applications": applications}

    async def observe(self) -> Mapping[str, ServeAppStatus]:
        details = await self._get_details()
        if self._owner is not None:
            await self._owner.before_read()  # another's: not this site's to read
        self._learn_ingress(details)
        serve_url = self._proxy_url(details)
        statuses: dict[str, ServeAppStatus] = {}
        owned = {
            name: app
            for name, app in (details.get("applications") or {}).items()
            if self._owns(name)
        }
        self.drift = self._drift(owned)
        nodes: list[Mapping[str, float]] | None = None
        for name, app in owned.items():
            status = status_from_details(name, app, serve_url)
            if (why := self._refused.get(name)) is not None:  # runs as it was: its change was refused
                message = f"refused by Ray Serve: {why}; it runs as it was"
                statuses[name] = dataclasses.replace(status, message=message, detail=message)
                continue
            if status.replicas_running < status.replicas_target:
                if nodes is None:
                    nodes = await self._node_capacities()
                reason = unschedulable_reason(app, nodes)
                if reason:
                    status = dataclasses.replace(status, message=reason, detail=reason)
            statuses[name] = status
        for name, why in self._refused.items():
            if name not in statuses:  # runs nowhere: failed, saying what Ray said, for its deployment's status
                message = f"refused by Ray Serve: {why}"
                statuses[name] = ServeAppStatus(name, ServeAppState.DEPLOY_FAILED, message, 0, 0, None, detail=message)
        return statuses

    async def close(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- internals ---------------------------------------------------------------------

    def _merge(self, details: Mapping[str, Any], apps: Sequence[ServeAppSpec]) -> dict[str, Any]:
        """The full PUT body: ours as specified, everyone else's and the cluster-wide settings
        as Serve reports them."""
        applications: list[dict[str, Any]] = []
        for name, app in (details.get("applications") or {}).items():
            if self._owns(name):
                continue
            deployed = app.get("deployed_app_config")
            # Imperatively deployed apps (serve.run) have no config; a PUT leaves them alone.
            if app.get("source") == "declarative" and deployed:
                applications.append(deployed)
        applications += [
            serve_config.render_application(a, self._ingress.get(a.name)) for a in apps
        ]
        config: dict[str, Any] = {"applications": applications}
        http_options = details.get("http_options") or self._http_options
        if http_options:
            config["http_options"] = http_options
        if details.get("proxy_location"):
            config["proxy_location"] = details["proxy_location"]
        # Cluster-wide: it scales every application, so a PUT without it would reset another
        # team's scale-down (a gradual migration at 50 %) to 100 %.
        if details.get("target_capacity") is not None:
            config["target_capacity"] = details["target_capacity"]
        return config

    def _drift(self, owned: Mapping[str, Any]) -> str:
        """How the cluster's edgeplane applications differ from this actuator's last PUT."""
        if self._sent is None:
            return ""
        problems = []
        if extra := sorted(n for n in set(owned) - set(self._sent) if owned[n].get("status") != "DELETING"):
            problems.append("not applied by this control plane: " + ", ".join(extra))
        if missing := sorted(set(self._sent) - set(owned)):
            problems.append("missing: " + ", ".join(missing))
        if changed := sorted(n for n in set(owned) & set(self._sent)
                             if not _says_all_of(owned[n].get("deployed_app_config"), self._sent[n])):
            problems.append("configured otherwise: " + ", ".join(changed))
        return "; ".join(problems)

    def _learn_ingress(self, details: Mapping[str, Any]) -> None:
        for name, app in (details.get("applications") or {}).items():
            topology = app.get("deployment_topology") or {}
            ingress = topology.get("ingress_deployment")
            if ingress:
                self._ingress[name] = ingress

    def _proxy_url(self, details: Mapping[str, Any]) -> str | None:
        if self._serve_url:
            return self._serve_url
        http_options = details.get("http_options") or self._http_options
        port = http_options.get("port") if http_options else None
        if not port:
            return None
        host = urlsplit(self._dashboard_url).hostname or "127.0.0.1"
        return f"http://{hostport.address(host, port)}"

    async def _node_capacities(self) -> list[Mapping[str, float]]:
        """Total resources of each live node; empty if the state API cannot tell."""
        try:
            response = await self._request("GET", NODES_PATH, params={"detail": "true"})
            rows = response.json()["data"]["result"]["result"]
        except (RayServeError, ValueError, KeyError, TypeError) as exc:
            log.debug("node resources unavailable on %s: %s", self._dashboard_url, exc)
            return []
        return [r.get("resources_total") or {} for r in rows if r.get("state") == "ALIVE"]

    async def _get_details(self) -> dict[str, Any]:
        response = await self._request("GET", APPLICATIONS_PATH)
        try:
            body = response.json()
        except ValueError as exc:
            raise RayServeError(f"{self._dashboard_url} answered non-JSON Serve details") from exc
        if not isinstance(body, dict):
            raise RayServeError(f"{self._dashboard_url} answered unexpected Serve details")
        return body

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        headers = {}
        token = self._token_provider()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            response = await self._client.request(
                method, path, json=json, params=params, headers=headers
            )
        except httpx.TimeoutException as exc:
            raise RayUnreachable(self._dashboard_url, "timed out") from exc
        except httpx.TransportError as exc:
            # "ConnectError (All connection attempts failed)": the class alone does not say what failed
            raise RayUnreachable(self._dashboard_url, f"{type(exc).__name__} ({exc})" if str(exc) else type(exc).__name__) from exc
        if response.status_code in (401, 403):
            raise RayAuthError(self._dashboard_url, response.status_code)
        if response.status_code == 400 and method == "PUT":
            raise ServeConfigRejected(response.text[:2000])
        if response.status_code in (502, 503, 504):
            raise RayUnreachable(
                self._dashboard_url, f"HTTP {response.status_code}: {response.text[:300]}"
            )
        if response.status_code == 404:
            raise RayServeError(
                f"{self._dashboard_url} has no {path} (HTTP 404): is this a Ray dashboard?",
                404,
            )
        if response.is_error:
            raise RayServeError(
                f"{method} {path} on {self._dashboard_url} answered "
                f"HTTP {response.status_code}: {response.text[:300]}",
                response.status_code,
            )
        return response


# An error's location in Ray's answer to a config its schema refuses (``repr`` of pydantic's
# ValidationError): ``applications.1.import_path`` (pydantic 2) or ``applications -> 1 -> import_path`` (1).
_LOCATION = re.compile(r"^applications(?:\.| -> )(\d+)(?:(?:\.| -> )(\S.*))?$")


def refused_applications(answer: str, names: Sequence[str]) -> dict[str, str]:
    """The applications (of ``names``, in the order PUT) that Ray's 400 ``answer`` names,
    each with what it says of it (``field: message``); empty where it names none (a
    refusal of the config as a whole, or one not worded as its schema's)."""
    said: dict[str, list[str]] = {}
    lines = answer.splitlines()
    for i, line in enumerate(lines):
        if (at := _LOCATION.match(line.rstrip())) is None or int(at[1]) >= len(names):
            continue
        message = lines[i + 1].strip() if i + 1 < len(lines) and lines[i + 1][:1].isspace() else ""
        message = re.sub(r"\s*[\[(]type=[^\])]*[\])]$", "", message)  # pydantic's error type, for the reader of its code
        field_name = (at[2] or "").split(".constrained-")[0]
        said.setdefault(names[int(at[1])], []).append(": ".join(filter(None, [field_name, message])))
    return {name: "; ".join(dict.fromkeys(parts)) for name, parts in said.items()}


def _says_all_of(seen: Any, sent: Any) -> bool:
    """Whether a config as Serve reports it (``seen``, with its own defaults filled in) says
    everything ``sent`` said: the same values under every key sent, lists item by item."""
    if isinstance(sent, Mapping):
        return isinstance(seen, Mapping) and all(_says_all_of(seen.get(k), v) for k, v in sent.items())
    if isinstance(sent, (list, tuple)):  # JSON has lists only
        return isinstance(seen, (list, tuple)) and len(seen) == len(sent) and all(map(_says_all_of, seen, sent))
    return bool(seen == sent)


def status_from_details(name: str, app: Mapping[str, Any], serve_url: str | None) -> ServeAppStatus:
    """Turn one entry of Serve's ``applications`` details into a :class:`ServeAppStatus`."""
    state = serve_config.parse_state(app.get("status", "NOT_STARTED"))
    deployments: Mapping[str, Any] = app.get("deployments") or {}
    ingress = (app.get("deployment_topology") or {}).get("ingress_deployment")
    if not ingress and len(deployments) == 1:
        ingress = next(iter(deployments))
    sized = deployments.get(ingress) if ingress else None
    chosen = [sized] if sized is not None else list(deployments.values())
    # A Ray Serve LLM application's replicas are its engine servers, not its OpenAI ingress.
    engines = [d for n, d in deployments.items() if n.split(":", 1)[0] == serve_config.LLM_SERVER_DEPLOYMENT]
    if engines:
        chosen = engines
    running = sum(1 for d in chosen for r in d.get("replicas") or [] if r.get("state") == "RUNNING")
    target = sum(int(d.get("target_num_replicas") or 0) for d in chosen)
    detail = str(app.get("message") or "")
    told = serve_config.deployment_messages(deployments)
    if not detail or detail.startswith("Failed to update the deployments"):  # Serve's own words name no cause: its deployments' do
        detail = "; ".join(filter(None, [detail, told]))
    prefix = app.get("route_prefix")
    endpoint = serve_config.route_url(serve_url, prefix) if serve_url and prefix else None
    return ServeAppStatus(
        name=name,
        status=state,
        message=serve_config.summarize_message(detail),
        replicas_running=running,
        replicas_target=target,
        endpoint_url=endpoint,
        detail=detail,
        version=_running_version(app, state, deployments),
        deployments_up=all(any(r.get("state") == "RUNNING" for r in d.get("replicas") or []) for d in deployments.values()),
        ingress=ingress if isinstance(ingress, str) else "",
    )


def _running_version(app: Mapping[str, Any], state: ServeAppState, deployments: Mapping[str, Any]) -> str:
    """The v2 version of an ONNX application whose replicas all run the config deployed:
    the model file it was given (``deployed_app_config``); "" while a new config rolls
    out (replicas may hold either file), or for other applications."""
    deployed = app.get("deployed_app_config") or {}
    settled = state is ServeAppState.RUNNING or (state is ServeAppState.DEPLOYING and serve_config.only_scaling(deployments))
    if not settled or deployed.get("import_path") != serve_config.ONNX_IMPORT_PATH:
        return ""
    sha256 = (deployed.get("args") or {}).get("sha256")
    return oip.model_version(sha256) if isinstance(sha256, str) else ""


def unschedulable_reason(app: Mapping[str, Any], nodes: Sequence[Mapping[str, float]]) -> str:
    """Why replicas of ``app`` cannot start, when no live node is big enough for one.

    Ray Serve only says so after its slow-startup warning delay; comparing each
    deployment's per-replica resources with the nodes' totals says it at once. Empty when
    some node could take a replica (or the nodes are unknown).
    """
    if not nodes:
        return ""
    engines = _llm_engine_resources(app)
    for name, deployment in (app.get("deployments") or {}).items():
        required = {
            k: float(v) for k, v in (deployment.get("required_resources") or {}).items() if v
        }
        required.update(engines.get(name, {}))
        if not required:
            continue
        if any(all(node.get(k, 0.0) >= v for k, v in required.items()) for node in nodes):
            continue
        short = sorted(k for k in required if max(n.get(k, 0.0) for n in nodes) < required[k])
        largest = {k: max(n.get(k, 0.0) for n in nodes) for k in short}
        return (
            f"deployment {name!r} cannot place a replica: each needs "
            f"{_fmt_resources({k: required[k] for k in short})} but the largest node has "
            f"{_fmt_resources(largest)}; it stays pending until such a node joins"
        )
    return ""


def _llm_engine_resources(app: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """What one engine replica of a Ray Serve LLM application needs on one node, by its
    deployment name (``LLMServer:<model id>``).

    Serve's details leave placement groups out (its ``required_resources`` is the replica
    actor alone), so this reads the ``STRICT_PACK`` bundles and accelerator type from the
    config edgeplane deployed.
    """
    deployed = app.get("deployed_app_config") or {}
    if deployed.get("import_path") != serve_config.LLM_IMPORT_PATH:
        return {}
    out: dict[str, dict[str, float]] = {}
    for config in (deployed.get("args") or {}).get("llm_configs") or []:
        model_id = (config.get("model_loading_config") or {}).get("model_id") or ""
        required: dict[str, float] = {}
        for bundle in (config.get("placement_group_config") or {}).get("bundles") or []:
            for k, v in bundle.items():
                if k != "CPU" and v:  # CPU is checked on the replica actor, as for other apps
                    required[k] = required.get(k, 0.0) + float(v)
        if config.get("accelerator_type"):
            required[f"accelerator_type:{config['accelerator_type']}"] = 1.0
        out[serve_config.llm_deployment(model_id)] = required
    return out


def _fmt_resources(resources: Mapping[str, float]) -> str:
    parts = []
    for key, value in resources.items():
        if key == "memory":
            parts.append(f"{value / 2**20:.0f} MiB memory")
        else:
            parts.append(f"{value:g} {key}")
    return ", ".join(parts)


async def wait_until_running(
    actuator: DataCentreActuator,
    names: Sequence[str],
    *,
    timeout_s: float = 120.0,
    poll_interval_s: float = 0.25,
    replicas: Mapping[str, int] | None = None,
) -> Mapping[str, ServeAppStatus]:
    """Poll ``observe()`` until every app in ``names`` is RUNNING (with ``replicas`` running).

    Serve has no change feed, so this polls, bounded by ``timeout_s``. Raises
    :class:`ServeAppFailed` as soon as one app reports DEPLOY_FAILED, and ``TimeoutError``
    naming the apps still pending.
    """
    deadline = time.monotonic() + timeout_s
    max_polls = int(timeout_s / poll_interval_s) + 1
    statuses: Mapping[str, ServeAppStatus] = {}
    for _ in range(max_polls):
        statuses = await actuator.observe()
        pending = []
        for name in names:
            status = statuses.get(name)
            if status is not None and status.status is ServeAppState.DEPLOY_FAILED:
                raise ServeAppFailed(name, status.message)
            wanted = (replicas or {}).get(name)
            if (
                status is None
                or status.status is not ServeAppState.RUNNING
                or (wanted is not None and status.replicas_running != wanted)
            ):
                pending.append(name)
        if not pending:
            return statuses
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(poll_interval_s)
    summary = {n: (s.status.value, s.message) for n, s in statuses.items() if n in names}
    raise TimeoutError(f"Serve applications not RUNNING after {timeout_s:.0f}s: {summary}")


async def wait_until_gone(
    actuator: DataCentreActuator,
    names: Sequence[str],
    *,
    timeout_s: float = 60.0,
    poll_interval_s: float = 0.25,
) -> None:
    """Poll ``observe()`` until none of ``names`` is reported any more."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / poll_interval_s) + 1):
        statuses = await actuator.observe()
        if not any(n in statuses for n in names):
            return
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(poll_interval_s)
    raise TimeoutError(f"Serve applications {list(names)} still present after {timeout_s:.0f}s")
