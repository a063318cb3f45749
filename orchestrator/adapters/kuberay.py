"""The one place that talks to Kubernetes: a KubeRay ``RayService`` per data-centre site.

A site declared with ``spec.kubernetes`` (kubeconfig context + namespace) does not expose a
Ray dashboard to edgeplane; the KubeRay operator runs the cluster and applies Serve configs.
So the placement for the site becomes one ``RayService`` object (``ray.io/v1``) that
edgeplane owns, rendered by :mod:`orchestrator.adapters.rayservice` and its status read by
:mod:`orchestrator.adapters.rayservice_status`; this module creates, patches, deletes and
observes it. The kubernetes client is synchronous; calls run in a worker thread so the
control plane's event loop never blocks on the API server. Each is waited on a bounded time
(:data:`CALL_WAIT_S`): the request has its timeout, but the client refreshes an expiring
token first, inside the call, by running the kubeconfig's credential command with none, and
a run that hangs held its site's call for good. The thread cannot be stopped: past the bound
the call fails, and the site's next call waits on it again rather than begin another.

The threads are the actuator's own daemons, one call at a time per site, not asyncio's
default pool: a call that never ends held one of its threads for good, and a few sites whose
API server or credential command hung took them all, and with them the planning, agents'
checks and the server's stop that run there (``edgeplane serve`` stopped only once a call
ended). A daemon holds up neither the event loop's shutdown nor the process's exit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import kubernetes
import urllib3
import yaml
from kubernetes.client.rest import ApiException

from orchestrator.adapters import daemon_calls, rayservice, rayservice_status, serve_config
from orchestrator.adapters.ownership import Ownership
from orchestrator.adapters.serve_config import (
    DataCentreError,
    ServeAppSpec,
    ServeAppState,
    ServeAppStatus,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class KubernetesError(DataCentreError):
    """The Kubernetes API answered with an error (see ``status_code``)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class KubernetesUnreachable(KubernetesError):
    """The API server did not answer."""


class KubernetesAuthError(KubernetesError):
    retryable = False


class CredentialsRefused(KubernetesAuthError):
    """The API server answered 401 Unauthorized to a client its actuator can load anew, or
    403 Forbidden to a request it took as anonymous (:data:`ANONYMOUS`): its credentials (a
    token its credential command gave, or none as the command failed) were refused or not
    sent, and the next try loads its kubeconfig context again, running the command again."""

    retryable = True


class KubernetesRejected(KubernetesError):
    """The API server refused the object itself (HTTP 422: it does not match the CRD)."""

    retryable = False


class CredentialsUnanswered(KubernetesError):
    """Loading a kubeconfig context ran its credential command (``command``, by file name;
    None if it could not be told), which has not answered in ``waited_s``; ``again``: an
    earlier try gave up on the same run, still running, and this one waited on it anew."""

    def __init__(self, command: str | None, context: str | None, waited_s: float, again: bool = False) -> None:
        said = (f"the kubeconfig's credential command ({command}) has not answered in {waited_s:g} s" if command
                else f"loading kubeconfig context {context!r} has not ended in {waited_s:g} s")
        if again:
            said += ", and is still running: waited on again, not run again"
        super().__init__(said)
        self.command, self.context, self.waited_s, self.again = command, context, waited_s, again


#: The user a Kubernetes API server that allows anonymous requests takes one with no
#: credentials for: it names it in the 403 it answers when RBAC forbids it, where a cluster
#: that does not allow them answers 401. A request goes without credentials when the
#: credential command gave none (it failed), so such a 403 reloads the context as a 401
#: does; a 403 naming any other user is the RBAC refusal it says, and reloads nothing.
ANONYMOUS = "system:anonymous"

#: How long a call to the API server is waited on: its request's timeout (30 s), and 60 s
#: for the credential command that refreshing an expiring token runs inside it.
CALL_WAIT_S = 90.0

#: ``spec.kubernetes.context`` naming the cluster the control plane runs in, reached with
#: its pod's service account (``manifests/deploy/rbac.yaml`` grants it RayServices).
IN_CLUSTER = "in-cluster"


def api_client_for(context: str | None = None, config_file: str | None = None, *,
                   environ: Mapping[str, str] | None = None, service_account_dir: str | None = None) -> Any:
    """A kubernetes ``ApiClient`` for a kubeconfig context (the site's ``spec.kubernetes``),
    or for :data:`IN_CLUSTER` the pod's service account (``environ`` and
    ``service_account_dir`` stand in for the pod's in tests)."""
    if context == IN_CLUSTER:
        return _in_cluster_client(environ, service_account_dir)
    try:
        return kubernetes.config.new_client_from_config(config_file=config_file, context=context)
    except (kubernetes.config.ConfigException, OSError) as exc:
        raise KubernetesError(f"cannot load kubeconfig context {context!r}: {exc}") from exc


def credential_command(context: str | None = None, config_file: str | None = None) -> str | None:
    """The command loading ``context`` runs for its credentials, by file name (``aws`` for
    ``aws eks get-token``): its user's exec plugin, or a legacy auth provider's ``cmd-path``.
    None if it runs none, or the kubeconfig cannot be read (loading it says why). Reads the
    kubeconfig only: it runs nothing."""
    if context == IN_CLUSTER:
        return None
    try:
        merged = kubernetes.config.kube_config.KubeConfigMerger(config_file or kubernetes.config.KUBE_CONFIG_DEFAULT_LOCATION).config
        config = merged.value if merged is not None else {}
        name = context or config.get("current-context")
        entry = _named(config.get("contexts"), name).get("context") or {}
        user = _named(config.get("users"), entry.get("user")).get("user") or {}
        command = (user.get("exec") or {}).get("command") or str(((user.get("auth-provider") or {}).get("config") or {}).get("cmd-path") or "")
    except (kubernetes.config.ConfigException, OSError, yaml.YAMLError, AttributeError, TypeError):
        return None
    return os.path.basename(command.split()[0]) if isinstance(command, str) and command.split() else None


def _named(entries: Any, name: Any) -> Mapping[str, Any]:
    """The entry named ``name`` of a kubeconfig list (merged ones are ConfigNodes); {} if none."""
    for entry in entries or ():
        value = getattr(entry, "value", entry)
        if isinstance(value, Mapping) and value.get("name") == name:
            return value
    return {}


def _in_cluster_client(environ: Mapping[str, str] | None, service_account_dir: str | None) -> Any:
    from kubernetes.config import incluster_config

    folder = service_account_dir or incluster_config.SERVICE_TOKEN_FILENAME.rsplit("/", 1)[0]
    configuration = kubernetes.client.Configuration()
    try:
        incluster_config.InClusterConfigLoader(
            token_filename=f"{folder}/token", cert_filename=f"{folder}/ca.crt",
            environ=dict(environ) if environ is not None else os.environ,  # the token is re-read as it rotates
        ).load_and_set(configuration)
    except (kubernetes.config.ConfigException, OSError) as exc:
        raise KubernetesError(f"context {IN_CLUSTER!r}: not running in a Kubernetes pod with a service account ({exc})") from exc
    return kubernetes.client.ApiClient(configuration)


class KubeRayActuator:
    """Declarative Serve applications on one site through its KubeRay ``RayService``.

    ``api_client`` is a ``kubernetes.client.ApiClient`` (the seam: point it at any API
    server). With no applications the RayService, and the Ray cluster with it, is deleted.
    ``reload`` loads the site's client anew (its kubeconfig context, running its credential
    command again): after the API server answers 401 Unauthorized (or 403 Forbidden to a
    request it took as anonymous), the next apply or observe
    (the site's next try, on its backoff) takes a client from it first. A credential command that failed leaves the kubernetes client with
    no credentials, and a token whose refresh failed stays expired, both for good: without a
    new load the site was refused until its spec changed or the control plane restarted.
    ``ownership``: the RayService is annotated with this control plane's id, and one
    annotated with another's is neither read as this site's nor changed
    (:class:`~orchestrator.adapters.ownership.OwnedElsewhere`).
    """

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        site: str,
        *,
        shape: rayservice.RayClusterShape | None = None,
        serve_url: str | None = None,
        request_timeout_s: float = 30.0,
        reload: Callable[[], Awaitable[Any]] | None = None,
        call_wait_s: float = CALL_WAIT_S,
        ownership: Ownership | None = None,
    ) -> None:
        self._api = kubernetes.client.CustomObjectsApi(api_client)
        self._core = kubernetes.client.CoreV1Api(api_client)  # the RayService's Events
        self._events_refused = False  # listing them was forbidden (a role without it): said once in the log
        self._api_client = api_client
        self._reload = reload
        self._refused = False  # the last call was answered 401 (or 403 as anonymous): the next loads the client anew first
        self._namespace = namespace
        self._site = site
        self._shape = shape or rayservice.RayClusterShape()
        self._name = rayservice.rayservice_name(site)
        # A RayService an earlier version made under another name, to delete once.
        self._earlier: str | None = rayservice.earlier_rayservice_name(site) if rayservice.earlier_rayservice_name(site) != self._name else None
        self._serve_url = serve_url or (
            f"http://{self._name}-serve-svc.{namespace}.svc.cluster.local:{rayservice.SERVE_PORT}"
        )
        self._timeout = request_timeout_s
        self._call_wait_s = call_wait_s
        self._ownership = ownership  # None: the RayService is neither marked nor checked (as before owners)
        self._running: asyncio.Future[Any] | None = None  # a call past its bound, still running in its thread
        self._learnt: dict[str, str] = {}
        self._left_out: dict[str, ServeAppStatus] = {}  # by name: applications no pod of the shape holds, as last applied
        self._held: dict[str, tuple[int, str]] = {}  # by name: applications kept short of their ask: the count asked, why
        # by name: each application as last applied, and its Serve config entry as written
        self._applied: dict[str, tuple[ServeAppSpec, str]] = {}
        self._applied_hash: str | None = None  # the spec hash last applied; "": the RayService deleted
        self._active: rayservice_status.ActiveApplications | None = None  # what stands in during a cluster upgrade
        self.drift = ""

    def __repr__(self) -> str:
        return f"KubeRayActuator({self._namespace}/{self._name})"

    @property
    def name(self) -> str:
        return self._name

    async def apply(self, apps: Sequence[ServeAppSpec]) -> dict[str, str]:
        for app in apps:
            if not serve_config.is_owned(app.name):
                raise ValueError(
                    f"application {app.name!r} lacks the {serve_config.OWNED_PREFIX!r} prefix"
                )
        await self._reloaded()
        current = await self._get()
        mark = self._marks(current)  # another's: nothing of it, nor of its earlier name, is touched
        if self._earlier is not None:
            await self._delete_earlier(self._earlier)
            self._earlier = None
        if current is not None:
            self._learn(current)
        # One application no pod of this shape holds, or past its pod limit, fails alone
        # (one the RayService runs stays as it runs): the others are applied.
        asked = {a.name: a for a in apps}
        running = {c["name"]: self._as_it_runs(c, asked[c["name"]])
                   for c in rayservice.configured_applications(current or {})[0] if c["name"] in asked}
        chosen, limited = rayservice.within_limit(apps, self._shape, running)
        applied = {a.name for a in chosen}
        self._left_out = {name: self._left_out_status(name, why) for name, why in limited.items() if name not in applied}
        self._held = {name: (asked[name].num_replicas, why) for name, why in limited.items() if name in applied}
        await self._write(current, chosen, mark)
        self._applied = {a.name: (a, _configured(entry))
                         for a, entry in zip(chosen, rayservice.render_serve_config(chosen, self._learnt)["applications"])}
        return limited

    def _marks(self, current: Mapping[str, Any] | None) -> bool:
        """Whether the RayService is to be annotated this control plane's (an unmarked one,
        or one an operator takes over); :class:`OwnedElsewhere` if it is another's."""
        if self._ownership is None:
            return False
        where = f"RayService {self._namespace}/{self._name}"
        return self._ownership.marks(rayservice.owner_of(current) if current is not None else None, where)

    async def _write(self, current: dict[str, Any] | None, apps: Sequence[ServeAppSpec], mark: bool = False) -> None:
        """The RayService made to run ``apps``: created, patched, left as it is, or deleted
        for none; ``mark``: annotated as this control plane's, which alone restarts nothing."""
        if not apps:
            if current is not None:
                log.info(
                    "deleting RayService %s/%s (no applications left)", self._namespace, self._name
                )
                await self._call(
                    self._api.delete_namespaced_custom_object,
                    rayservice.GROUP, rayservice.VERSION, self._namespace, rayservice.PLURAL, self._name,
                    not_found_ok=True,
                )  # fmt: skip
            self._applied_hash = ""
            return
        running = ((current or {}).get("spec") or {}).get("rayClusterConfig") or {}
        desired = rayservice.render_rayservice(self._site, self._namespace, apps, self._shape, self._learnt,
                                    running.get("workerGroupSpecs") or () if isinstance(running, Mapping) else ())
        digest = desired["metadata"]["annotations"][rayservice.SPEC_HASH_ANNOTATION]
        if self._ownership is not None:
            desired["metadata"]["annotations"][rayservice.OWNER_ANNOTATION] = self._ownership.owner
        if current is None:
            log.info("creating RayService %s/%s", self._namespace, self._name)
            await self._call(
                self._api.create_namespaced_custom_object,
                rayservice.GROUP, rayservice.VERSION, self._namespace, rayservice.PLURAL, desired,
            )  # fmt: skip
            self._applied_hash = digest
            return
        # The hash alone misses a hand edit of the Serve config that left the annotation alone.
        if rayservice.spec_hash(current) == digest and (current.get("spec") or {}).get("serveConfigV2") == desired["spec"]["serveConfigV2"]:
            if mark:  # an earlier release's, or one taken over: its metadata only
                log.info("marking RayService %s/%s as this control plane's", self._namespace, self._name)
                await self._call(
                    self._api.patch_namespaced_custom_object, rayservice.GROUP, rayservice.VERSION, self._namespace, rayservice.PLURAL,
                    self._name, {"metadata": {"annotations": {rayservice.OWNER_ANNOTATION: desired["metadata"]["annotations"][rayservice.OWNER_ANNOTATION]}}})
            self._applied_hash = digest
            return
        log.info("patching RayService %s/%s", self._namespace, self._name)
        # A JSON merge patch: lists (worker groups, containers) are replaced whole, and the
        # dicts we render always carry the same keys, so nothing stale survives a change.
        patch = {
            "metadata": {
                "labels": desired["metadata"]["labels"],
                "annotations": desired["metadata"]["annotations"],
            },
            "spec": desired["spec"],
        }
        await self._call(
            self._api.patch_namespaced_custom_object,
            rayservice.GROUP, rayservice.VERSION, self._namespace, rayservice.PLURAL, self._name, patch,
        )  # fmt: skip
        self._applied_hash = digest

    async def observe(self) -> Mapping[str, ServeAppStatus]:
        await self._reloaded()
        current = await self._get()
        self._marks(current)  # another's: not this site's to read
        drift = self._drift(current)
        if current is None:
            self.drift, self._active = drift, None
            return dict(self._left_out)
        if self._applied_hash and (unreadable := rayservice.configured_applications(current)[1]):
            drift = "; ".join(filter(None, [drift, f"RayService {self._namespace}/{self._name}: {unreadable}"]))
        self.drift = drift
        self._learn(current)
        statuses = rayservice_status.statuses_from_rayservice(current, self._serve_url, kept=self._active)
        self._active = rayservice_status.keep_active(current, statuses, self._active)
        if any(s.status is ServeAppState.NOT_STARTED for s in statuses.values()) and (refusal := await self._serve_config_refusal()):
            statuses = rayservice_status.with_serve_config_refusal(statuses, refusal)
        for name, (wanted, why) in self._held.items():  # its deployment says why it does not grow
            if (held := statuses.get(name)) is not None:
                statuses[name] = dataclasses.replace(held, replicas_target=wanted, message="; ".join(filter(None, [held.message, why])),
                                                     detail="; ".join(filter(None, [held.detail, why])))
        return {**self._left_out, **statuses}

    async def close(self) -> None:
        await _in_thread(self._api_client.close)

    # -- internals ---------------------------------------------------------------------

    def _as_it_runs(self, configured: Mapping[str, Any], asked: ServeAppSpec) -> ServeAppSpec:
        """The application the RayService's Serve config entry ``configured`` runs: as this
        actuator last applied it while the entry is still that; else (written by a control
        plane before this one restarted or took over) as the entry says; else (an entry
        edited by hand, which does not say) ``asked`` at the count it configures."""
        if (last := self._applied.get(asked.name)) is not None and last[1] == _configured(configured):
            return last[0]
        if (read := serve_config.application_from_config(configured, asked)) is not None:
            return read
        return dataclasses.replace(asked, num_replicas=serve_config.configured_replicas(configured))

    def _left_out_status(self, name: str, why: str) -> ServeAppStatus:
        """An application left out of the RayService as no worker pod holds its replicas:
        failed, saying why, for its deployment's status."""
        message = f"{why}: left out of RayService {self._namespace}/{self._name}"
        return ServeAppStatus(name, serve_config.ServeAppState.DEPLOY_FAILED, message, 0, 0, None, detail=message)

    def _drift(self, current: Mapping[str, Any] | None) -> str:
        """How the RayService differs from what this actuator last applied, by its spec hash
        (every edgeplane writer sets it; a hand edit that leaves it alone is not seen)."""
        applied, where = self._applied_hash, f"RayService {self._namespace}/{self._name}"
        if current is not None and (current.get("metadata") or {}).get("deletionTimestamp"):
            current = None  # on its way out
        if applied is None:
            return ""
        if applied == "":
            return f"{where} exists, but this control plane deleted it" if current is not None else ""
        if current is None:
            return f"{where} is gone"
        seen = rayservice.spec_hash(current)
        return "" if seen == applied else f"{where} was changed by another writer (spec hash {seen or 'none'}, applied {applied})"

    async def _delete_earlier(self, name: str) -> None:
        """Delete this site's RayService named the earlier way (KubeRay from v1.4 never ran
        it; an older one did, and would run it beside the new one). Only if its site label
        says it is this site's: sites whose names began alike once shared that name."""
        earlier = await self._call(
            self._api.get_namespaced_custom_object, rayservice.GROUP, rayservice.VERSION, self._namespace, rayservice.PLURAL, name, not_found_ok=True)
        if earlier is None or ((earlier.get("metadata") or {}).get("labels") or {}).get(rayservice.SITE_LABEL) != self._site:
            return
        log.info("deleting RayService %s/%s, named as earlier versions named it; this site's is now %s",
                 self._namespace, name, self._name)
        await self._call(
            self._api.delete_namespaced_custom_object, rayservice.GROUP, rayservice.VERSION, self._namespace, rayservice.PLURAL, name, not_found_ok=True)

    def _learn(self, obj: Mapping[str, Any]) -> None:
        """Remember the single deployment of ray-serve applications, to size them."""
        status = obj.get("status") or {}
        reported = (status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
        for name, app in reported.items():
            deployments = list((app.get("serveDeploymentStatuses") or {}).keys())
            if len(deployments) == 1:
                self._learnt[name] = deployments[0]

    async def _serve_config_refusal(self) -> str:
        """Why KubeRay could not give its Ray cluster the RayService's Serve config, from the
        Events it writes on it (its status has no field for it); "" if it could, or the Events
        cannot be listed, which fails nothing: the RayService itself was read. A role without
        ``list`` on them (a 403 the credentials did not cause) is said once in the log; any
        other failure (a 500, a call past its bound) at each pass it comes, as a passing one."""
        try:
            listed = await self._call(functools.partial(_events_of, self._core, self._namespace, self._name))
        except KubernetesError as exc:
            if exc.status_code != 403 or isinstance(exc, CredentialsRefused):
                log.info("%s (listing its Events); why KubeRay could not apply a Serve config is not shown at this pass", exc)
            elif not self._events_refused:
                self._events_refused = True
                log.warning("%s (listing its Events); why KubeRay could not apply a Serve config is not shown: "
                            "the control plane needs list on events there (manifests/deploy/rbac.yaml)", exc)
            return ""
        return rayservice_status.serve_config_refusal((listed or {}).get("items") or (), self._name)

    async def _get(self) -> dict[str, Any] | None:
        return await self._call(
            self._api.get_namespaced_custom_object,
            rayservice.GROUP, rayservice.VERSION, self._namespace, rayservice.PLURAL, self._name,
            not_found_ok=True,
        )  # fmt: skip

    async def _call(
        self, method: Callable[..., _T], *args: Any, not_found_ok: bool = False
    ) -> _T | None:
        where = f"RayService {self._namespace}/{self._name}"
        if self._running is not None:  # an earlier try's call, past its bound: waited on again, never called beside
            await asyncio.wait((self._running,), timeout=self._call_wait_s)
            if not self._running.done():
                raise KubernetesUnreachable(f"{where}: a call to the Kubernetes API has not ended in {self._call_wait_s:g} s, "
                                            "and is still running: waited on again, no other call made beside it")
            self._running = None  # its answer was an earlier try's: dropped
        call = _in_thread(method, *args, _request_timeout=self._timeout)
        self._running = call  # held until it ends, even if this try is cancelled
        await asyncio.wait((call,), timeout=self._call_wait_s)
        if not call.done():
            raise KubernetesUnreachable(
                f"{where}: a call to the Kubernetes API has not ended in {self._call_wait_s:g} s (refreshing its token runs "
                "the kubeconfig's credential command, which may be what waits); left to end, no other call made beside it")
        self._running = None
        try:
            return call.result()
        except ApiException as exc:
            if exc.status == 404 and not_found_ok:
                return None
            reason = _api_reason(exc)
            if exc.status == 401 and self._reload is not None:
                self._refused = True  # tried again on the site's backoff, not here
                raise CredentialsRefused(
                    f"{where}: the Kubernetes API answered 401 Unauthorized: its credentials were refused; "
                    f"reloading the kubeconfig context (its credential command run again) at the next try: {reason}",
                    401,
                ) from exc
            anonymous = exc.status == 403 and ANONYMOUS in reason
            if anonymous and self._reload is not None:
                self._refused = True
                raise CredentialsRefused(
                    f"{where}: the Kubernetes API answered 403 Forbidden to a request it took as anonymous "
                    f"({ANONYMOUS}): no credentials were sent (the kubeconfig's credential command gave none); "
                    f"reloading the kubeconfig context (its credential command run again) at the next try: {reason}",
                    403,
                ) from exc
            if exc.status == 403:
                who = ("it took the request as anonymous: no credentials were sent" if anonymous else
                       "the user its credentials name lacks an RBAC permission")
                raise KubernetesAuthError(
                    f"{where}: the Kubernetes API answered 403 Forbidden: {who} (manifests/deploy/rbac.yaml "
                    f"lists what edgeplane needs in the namespace): {reason}",
                    403,
                ) from exc
            if exc.status == 401:
                raise KubernetesAuthError(
                    f"{where}: the Kubernetes API refused the credentials (HTTP 401): {reason}", 401) from exc
            if exc.status in (400, 422):
                raise KubernetesRejected(f"{where} was rejected: {reason}", exc.status) from exc
            if exc.status == 404:
                raise KubernetesError(
                    f"{where}: not found (is the KubeRay RayService CRD installed and the "
                    f"namespace present?): {reason}",
                    404,
                ) from exc
            raise KubernetesError(f"{where}: HTTP {exc.status}: {reason}", exc.status) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubernetesUnreachable(
                f"{where}: the Kubernetes API is unreachable: {exc}"
            ) from exc

    async def _reloaded(self) -> None:
        """After a 401, the client loaded anew, its old one closed, before any call (each
        binds its method to the client it calls through). A load that fails (its command has
        not answered in time, say) raises, and the next try loads again."""
        if not self._refused or self._reload is None:
            return
        client = await self._reload()
        old, self._api_client, self._api = self._api_client, client, kubernetes.client.CustomObjectsApi(client)
        self._core = kubernetes.client.CoreV1Api(client)
        self._refused = False
        await _in_thread(old.close)


def _events_of(core: Any, namespace: str, name: str, _request_timeout: float) -> dict[str, Any]:
    """The Events on the RayService ``name``, as the API server lists them ({} if unreadable)."""
    answer = core.list_namespaced_event(namespace, field_selector=f"involvedObject.kind=RayService,involvedObject.name={name}",
                                        _preload_content=False, _request_timeout=_request_timeout)
    try:
        listed = json.loads(answer.data)
    except ValueError:
        return {}
    return listed if isinstance(listed, dict) else {}


def _in_thread(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> asyncio.Future[_T]:
    """``fn(*args, **kwargs)`` in a daemon thread of its own (:func:`daemon_calls.start`)."""
    return daemon_calls.start(functools.partial(fn, *args, **kwargs), f"kubernetes {getattr(fn, '__name__', 'call')}")


def _configured(entry: Mapping[str, Any]) -> str:
    """A Serve config entry as ``serveConfigV2`` holds it, to compare one rendered with one read back."""
    return yaml.safe_dump(dict(entry), sort_keys=True)


def _api_reason(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "")
        return str(body.get("message") or exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)
