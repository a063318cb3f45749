"""What a KubeRay ``RayService``'s ``status`` says of each Serve application edgeplane put in
it: pure functions of the object read, no Kubernetes client (that is
:mod:`orchestrator.adapters.kuberay`; what goes into the object is
:mod:`orchestrator.adapters.rayservice`).

KubeRay's status is not one list of applications: a site's first cluster reports them as
pending until every one runs, a cluster being rebuilt beside the active one reports only
the new cluster's, a status may describe an older spec than the one just patched
(``observedGeneration``), and the Serve service may have no endpoint while the last
application statuses still say RUNNING. Each of those is read here into what the
reconciler counts: replicas answering, or why not. Why Ray Serve refused the Serve config
is in none of it: KubeRay writes that in an Event on the RayService only, read here too.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.adapters import serve_config
from orchestrator.adapters.rayservice import configured_applications
from orchestrator.adapters.serve_config import ServeAppState, ServeAppStatus


@dataclass(frozen=True)
class ActiveApplications:
    """The applications of a RayService's active Ray cluster as last read.

    While KubeRay (v1.3 on) builds a new cluster beside the active one (for a changed pod,
    head or Ray image), it reports the new cluster's applications only, and none of the
    active cluster's, which serves on until the new one takes over: those it last reported
    stand in for them meanwhile. The caller keeps them from one reading to the next
    (:func:`keep_active`)."""

    cluster: str
    statuses: Mapping[str, ServeAppStatus]


def statuses_from_rayservice(
    obj: Mapping[str, Any], serve_url: str, owned_prefix: str = serve_config.OWNED_PREFIX,
    *, kept: ActiveApplications | None = None,
) -> dict[str, ServeAppStatus]:
    """Translate a RayService's ``status`` into per-application statuses.

    KubeRay reports no replica counts. A RUNNING application whose deployments all serve
    (healthy, or scaling) counts its configured replicas as running. One DEPLOYING only to
    change its replica count (Serve says DEPLOYING while a count changes through the
    config, as edgeplane scales it) counts one: the replicas it had keep answering, how
    many of them is not reported. Anything else counts none. A status of an older spec
    (KubeRay behind: ``observedGeneration`` below ``metadata.generation``) describes the
    applications as that spec configured them, whose counts are gone: one that answers
    counts one. Callers reach every application through the RayService's Serve service:
    with no ready endpoint behind it, none answers, whatever the applications last reported.

    Until KubeRay has a Ray cluster serving (a site's first is promoted only once every
    application runs on it), it reports the applications under ``pendingServiceStatus``:
    their failures are read from there, and none of them counts as running. While it builds
    a new cluster beside the active one, the applications ``kept`` of the active cluster
    that answered stand in for its own (the count within the target now), and a failure on
    the new cluster, which the switch waits on, is told in their message.
    """
    targets: dict[str, int] = {}
    prefixes: dict[str, str] = {}
    for app in configured_applications(obj)[0]:
        targets[app["name"]] = serve_config.configured_replicas(app)
        prefixes[app["name"]] = app.get("route_prefix") or "/"
    status = obj.get("status") or {}
    active, pending = status.get("activeServiceStatus") or {}, status.get("pendingServiceStatus") or {}
    reported, upcoming = active.get("applicationStatuses") or {}, pending.get("applicationStatuses") or {}
    waiting = "; ".join(dict.fromkeys(
        c.get("message", "") for c in status.get("conditions") or [] if c.get("status") != "True"))
    unreachable, behind = _no_serve_endpoint(obj), _behind(obj)
    standing = {} if reported or kept is None or kept.cluster != _upgraded(status) else {
        name: s for name, s in kept.statuses.items() if s.answers}
    result: dict[str, ServeAppStatus] = {}
    for name in {*targets, *reported, *standing}:
        if not serve_config.is_owned(name, owned_prefix):
            continue
        target, url = targets.get(name, 0), serve_config.route_url(serve_url, prefixes.get(name, "/"))
        if reported.get(name):
            read = _reading(name, reported[name], target, url)
            if behind and read.replicas_running > 1:
                note = "; ".join(filter(None, [behind, read.detail]))
                read = dataclasses.replace(read, replicas_running=1, message=serve_config.summarize_message(note), detail=note)
        elif name in standing:
            read = _stand_in(standing[name], target, url, upcoming.get(name), pending.get("rayClusterName") or "")
        elif upcoming.get(name):
            read = _on_new_cluster(_reading(name, upcoming[name], target, url), pending.get("rayClusterName") or "",
                                   {n: s for n, app in upcoming.items() if n != name and (s := _failed(app))})
        else:
            detail = waiting or "the RayService has not reported this application yet"
            read = ServeAppStatus(name=name, status=ServeAppState.NOT_STARTED, message=serve_config.summarize_message(detail),
                                  replicas_running=0, replicas_target=target, endpoint_url=url, detail=detail)
        if unreachable and (read.answers or read.replicas_running):
            read = dataclasses.replace(read, status=ServeAppState.UNHEALTHY, replicas_running=0,
                                       message=unreachable, detail=unreachable)
        result[name] = read
    return result


#: The reasons of the Events KubeRay writes on a RayService each time it gives its Ray
#: cluster the Serve config (``serveConfigV2``): it failed (Serve refused it, or could not
#: be reached; the message says which), or it was taken.
SERVE_CONFIG_FAILED, SERVE_CONFIG_APPLIED = "FailedToUpdateServeApplications", "UpdatedServeApplications"


def serve_config_refusal(events: Iterable[Mapping[str, Any]], rayservice: str) -> str:
    """Why KubeRay's last try to give the RayService ``rayservice``'s Serve config to its
    Ray cluster failed, from the namespace's ``events``; "" if its last try took it, or none
    is told. KubeRay tries again at each of its passes until one takes it, each failure
    counted into the same Event, so the last try is the Event of the two reasons seen last."""
    tries = [e for e in events if isinstance(e, Mapping) and e.get("reason") in (SERVE_CONFIG_FAILED, SERVE_CONFIG_APPLIED)
             and (e.get("involvedObject") or {}).get("kind") == "RayService" and (e.get("involvedObject") or {}).get("name") == rayservice]
    last = max(tries, key=_seen, default=None)
    return str(last.get("message") or SERVE_CONFIG_FAILED) if last is not None and last.get("reason") == SERVE_CONFIG_FAILED else ""


def _seen(event: Mapping[str, Any]) -> datetime.datetime:
    """When an Event was last seen: a core/v1 Event's ``lastTimestamp``, an events.k8s.io one's
    series or ``eventTime``; the earliest time if it says none readable."""
    for at in ((event.get("series") or {}).get("lastObservedTime"), event.get("lastTimestamp"), event.get("eventTime"),
               event.get("firstTimestamp"), (event.get("metadata") or {}).get("creationTimestamp")):
        try:
            seen = datetime.datetime.fromisoformat(str(at)) if at else None
        except ValueError:
            continue
        if seen is not None:
            return seen if seen.tzinfo is not None else seen.replace(tzinfo=datetime.timezone.utc)
    return datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)


def with_serve_config_refusal(statuses: Mapping[str, ServeAppStatus], refusal: str) -> dict[str, ServeAppStatus]:
    """``statuses`` with the applications the RayService has not reported yet saying why
    KubeRay could not give Serve its config (``refusal``, from :func:`serve_config_refusal`):
    Serve takes the whole config or none of it, so none of them starts until it does."""
    why = f"KubeRay could not apply the Serve config: {refusal}"
    return {name: dataclasses.replace(s, message=serve_config.summarize_message(why), detail=why)
            if s.status is ServeAppState.NOT_STARTED and not s.replicas_running else s for name, s in statuses.items()}


def _reading(name: str, app: Mapping[str, Any], target: int, url: str) -> ServeAppStatus:
    """One application as a Ray cluster's Serve reports it, through KubeRay."""
    state = serve_config.parse_state(app.get("status") or "NOT_STARTED")
    deployments = app.get("serveDeploymentStatuses") or {}
    detail = app.get("message") or serve_config.deployment_messages(deployments)
    return ServeAppStatus(
        name=name,
        status=state,
        message=serve_config.summarize_message(detail),
        replicas_running=_answering(state, deployments, target),
        replicas_target=target,
        endpoint_url=url,
        detail=detail,
        ingress=next(iter(deployments)) if len(deployments) == 1 else "",  # KubeRay reports no topology
    )


def keep_active(
    obj: Mapping[str, Any], statuses: Mapping[str, ServeAppStatus], kept: ActiveApplications | None
) -> ActiveApplications | None:
    """What of a reading (``statuses``, read with ``kept``) to keep for the next: the active
    cluster's applications when it reported them, and those kept before while it is the
    same cluster and reports none (a new one being built) or its status is of an older spec
    (its counts cut to one, while the cluster runs what it ran)."""
    active = (obj.get("status") or {}).get("activeServiceStatus") or {}
    cluster, reported = active.get("rayClusterName") or "", active.get("applicationStatuses") or {}
    same = kept if kept is not None and kept.cluster == cluster else None
    if cluster and reported and not (same is not None and _behind(obj)):
        return ActiveApplications(cluster, {name: statuses[name] for name in reported if name in statuses})
    return same


def _upgraded(status: Mapping[str, Any]) -> str:
    """The active cluster while KubeRay builds a new one beside it, else ""."""
    active, pending = status.get("activeServiceStatus") or {}, status.get("pendingServiceStatus") or {}
    return (active.get("rayClusterName") or "") if pending.get("rayClusterName") else ""


def _stand_in(kept: ServeAppStatus, target: int, url: str, upcoming: Mapping[str, Any] | None,
              cluster: str) -> ServeAppStatus:
    """An application of the active cluster while KubeRay builds a new one, as last read:
    the active cluster runs the config it had, so its count stands, within the target now."""
    read = dataclasses.replace(kept, replicas_running=min(kept.replicas_running, target), replicas_target=target,
                               endpoint_url=url)
    new = _reading(kept.name, upcoming, target, url) if upcoming else None
    if new is None or new.status not in (ServeAppState.DEPLOY_FAILED, ServeAppState.UNHEALTHY):
        return read
    where = f"on the new Ray cluster {cluster}, which KubeRay switches to once every application runs there"
    return dataclasses.replace(read, message=f"{new.status.value} {where}: {new.message}",
                               detail=f"{new.status.value} {where}: {new.detail}")


def _on_new_cluster(read: ServeAppStatus, cluster: str, failed: Mapping[str, str]) -> ServeAppStatus:
    """An application on a Ray cluster KubeRay sends no traffic to yet (a site's first, or
    one it builds beside the active cluster), which it does once every application there
    runs: its failures are its own to show, but none of its replicas answers, and the
    applications that ``failed`` there (by name: their state), which KubeRay waits on, are named."""
    if read.status not in (ServeAppState.RUNNING, ServeAppState.DEPLOYING):
        return dataclasses.replace(read, replicas_running=0)
    why = read.detail or f"starting on Ray cluster {cluster}; KubeRay sends it traffic once every application runs there"
    if failed:
        names = ", ".join(f"{n} ({s})" for n, s in sorted(failed.items()))
        why += f", and {names} failed there: it answers once {'that one runs or is' if len(failed) == 1 else 'those run or are'} removed"
    return dataclasses.replace(read, status=ServeAppState.DEPLOYING, replicas_running=0,
                               message=serve_config.summarize_message(why), detail=why)


def _failed(app: Mapping[str, Any]) -> str:
    """The state of an application KubeRay reported that failed (DEPLOY_FAILED, UNHEALTHY), else ""."""
    state = serve_config.parse_state(app.get("status") or "NOT_STARTED") if isinstance(app, Mapping) else None
    return state.value if state in (ServeAppState.DEPLOY_FAILED, ServeAppState.UNHEALTHY) else ""


def _answering(state: ServeAppState, deployments: Mapping[str, Any], target: int) -> int:
    if state is ServeAppState.RUNNING and (not deployments or serve_config.only_scaling(deployments)):
        return target
    return min(target, 1) if state is ServeAppState.DEPLOYING and serve_config.only_scaling(deployments) else 0


def _condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if isinstance(c, Mapping) and c.get("type") == kind), None)


def _behind(obj: Mapping[str, Any]) -> str:
    """Why the status describes an older spec than the object's, or "" when it does not (or
    either generation is missing): KubeRay writes ``observedGeneration`` as it reconciles."""
    generation = (obj.get("metadata") or {}).get("generation")
    observed = (obj.get("status") or {}).get("observedGeneration")
    if not isinstance(generation, int) or not isinstance(observed, int) or observed >= generation:
        return ""
    return (f"KubeRay has not reconciled generation {generation} of the RayService yet (its status is of "
            f"generation {observed}): one replica is counted until it has")


def _no_serve_endpoint(obj: Mapping[str, Any]) -> str:
    """Why no caller reaches the RayService's Serve service, or "" when some can (or it is
    not known). KubeRay counts the service's ready endpoints (Serve proxies that pass their
    health check) into ``numServeEndpoints``, which it leaves out when 0, and from v1.3 sets
    the ``Ready`` condition True exactly when there is one: a status with neither says
    nothing (an older KubeRay)."""
    status = obj.get("status") or {}
    count, ready = status.get("numServeEndpoints"), _condition(status, "Ready")
    if count is None and (ready is None or ready.get("status") == "True"):
        return ""
    if count is not None and count != 0:
        return ""
    service = f"{(obj.get('metadata') or {}).get('name', '')}-serve-svc"
    why = f" ({ready['message']})" if ready is not None and ready.get("message") else ""
    return f"the Serve service {service} has no ready endpoint: no Serve proxy passes its health check{why}"
