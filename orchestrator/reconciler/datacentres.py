"""One actuator per data-centre site, built from its Site spec and kept while it is unchanged.

``ray.address: local`` sites share one Ray head that the control plane starts on first
need and stops on shutdown (or an existing cluster the operator points ``--local-ray``
at, which is how tests share one cluster). ``ray.address: http://...`` sites get a REST
actuator; ``kubernetes`` sites a KubeRay actuator on the named kubeconfig context.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.adapters import kuberay, local_ray, ray_serve, rayservice, serve_config
from orchestrator.manifests import schema
from orchestrator.reconciler import applications, kube_clients
from orchestrator.store import values
from orchestrator.adapters.ownership import OwnedElsewhere, Ownership

log = logging.getLogger(__name__)


@dataclass
class LocalRay:
    """The embedded data centre: started lazily, owned, stopped at shutdown."""

    endpoints: local_ray.LocalRayEndpoints | None = None  # given: use that cluster, do not own it
    num_cpus: int | None = None
    num_gpus: int | None = None  # logical GPUs to declare (the demo's stand-in for real ones)
    record_file: pathlib.Path | None = None  # in the owner's state dir: finds the cluster again after a crash
    ray_executable: pathlib.Path | None = None  # the `ray` command; default: beside this Python, else on PATH
    _cluster: local_ray.LocalRayCluster | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def reclaim(self) -> list[int]:
        """Stop the cluster a previous owner of ``record_file`` left running (it was killed
        before it could stop it); the pids that were still alive."""
        if self.record_file is None or self.endpoints is not None:
            return []
        async with self._lock:
            return await asyncio.to_thread(local_ray.reclaim, self.record_file)

    async def ensure(self) -> local_ray.LocalRayEndpoints:
        """The cluster's endpoints, starting it on first need. A head that exited under us
        (killed, out of memory) is cleared away and reported, raising
        :class:`~orchestrator.adapters.local_ray.LocalRayError`; the next call starts a new
        one, so a head that keeps failing is started again only as often as its sites'
        backoff tries them."""
        async with self._lock:
            if self._cluster is not None and (gone := self._cluster.exited()) is not None:
                log.warning("the local Ray cluster exited (%s); it is started again at the next try", gone)
                await self._cluster.stop_async()  # ends what of it survives, removes its folder and record
                self._cluster, self.endpoints = None, None
                raise local_ray.LocalRayError(f"the embedded Ray cluster exited ({gone}), its Serve applications with it; "
                                              "it is started again at the next try")
            if self.endpoints is None:
                log.info("starting the local Ray cluster (the embedded data centre)")
                self._cluster = local_ray.LocalRayCluster(num_cpus=self.num_cpus, num_gpus=self.num_gpus, record_file=self.record_file,
                                                             ray_executable=self.ray_executable)
                self.endpoints = await self._cluster.start_async()
                log.info("local Ray cluster up: dashboard %s, serve %s", self.endpoints.dashboard_url, self.endpoints.serve_url)
            return self.endpoints

    def running(self) -> local_ray.LocalRayEndpoints | None:
        """The endpoints of the cluster while it runs: None before it is started, or once
        the head it started has exited (what ran there stopped with it)."""
        if self._cluster is not None and self._cluster.exited() is not None:
            return None
        return self.endpoints

    async def stop(self) -> None:
        if self._cluster is not None:
            await self._cluster.stop_async()
            self._cluster = None
            self.endpoints = None


#: Builds a KubeRay site's actuator (the seam for tests): its name, its spec and whose its RayService is.
ActuatorFactory = Callable[[str, schema.SiteSpec, Ownership | None], Any]


def _is_local(spec: schema.SiteSpec) -> bool:
    return spec.ray is not None and spec.ray.address == "local"


def ownership_of(owner: str | None, site: str, spec: schema.SiteSpec) -> Ownership | None:
    """Whose ``site``'s applications on its cluster are: this control plane's (``owner``, its
    store's id), or another's its Site takes over (``spec.takeOverFrom``). None: unmarked and
    unchecked, as before owners (a control plane given no id, the embedded cluster it starts)."""
    if owner is None or (spec.ray is not None and spec.ray.address == "local"):
        return None
    return Ownership(owner, site, spec.takeOverFrom)


def target_of(spec: schema.SiteSpec) -> str | None:
    """Where a site's applications run (see :func:`store.values.datacentre_target`)."""
    return values.datacentre_target(spec.model_dump(mode="json"))


class DataCentres:
    def __init__(self, local: LocalRay, kube_factory: ActuatorFactory | None = None, kubeconfig: str | None = None,
                 credentials_wait_s: float = kube_clients.WAIT_S, kube_call_wait_s: float = kuberay.CALL_WAIT_S,
                 owner: str | None = None):
        self.local = local
        # this control plane's id, marked on what its sites run on a cluster it does not start,
        # so that another control plane given the same site there takes none of it (Ownership)
        self._owner = owner
        self._kube_factory = kube_factory
        # KubeRay sites' clients, from the contexts of ``kubeconfig`` (None: $KUBECONFIG, else ~/.kube/config),
        # each waited on ``credentials_wait_s`` at most at a try
        self._kube_clients = kube_clients.ClientLoads(kubeconfig, credentials_wait_s)
        self._kube_call_wait_s = kube_call_wait_s  # how long a KubeRay site's call is waited on (its token's refresh inside it)
        # by site: its spec, its actuator, and for the embedded cluster the endpoints of the
        # one it drives (a new head has new ports: an actuator on the old one reaches nothing)
        self._actuators: dict[str, tuple[schema.SiteSpec, serve_config.DataCentreActuator, local_ray.LocalRayEndpoints | None]] = {}
        # by Ray dashboard: the sites' actuators on one cluster write its Serve config in turn
        self._writes: dict[str, ray_serve.ClusterWrites] = {}

    async def actuator(self, site: str, spec: schema.SiteSpec) -> serve_config.DataCentreActuator:
        """The actuator of ``site``, built anew when its spec changed or its embedded Ray
        cluster was started again."""
        local = await self.local.ensure() if _is_local(spec) else None
        known = self._actuators.get(site)
        if known is not None and known[0] == spec and known[2] == local:
            return known[1]
        if known is not None:  # let go before closing: a removal from its target in the same pass builds its own
            del self._actuators[site]
            await known[1].close()
        actuator = await self._build(site, spec, local)
        self._actuators[site] = (spec, actuator, local)
        return actuator

    async def _build(self, site: str, spec: schema.SiteSpec, local: local_ray.LocalRayEndpoints | None = None) -> serve_config.DataCentreActuator:
        ownership = ownership_of(self._owner, site, spec)
        if spec.ray is not None:
            owns = applications.owns_app(site)  # sites may share one cluster: touch only this site's apps
            if spec.ray.address == "local":
                endpoints = local or await self.local.ensure()
                return endpoints.actuator(owns=owns, writes=self._cluster_writes(endpoints.dashboard_url))
            token = ray_serve.token_from_file(spec.ray.tokenFile) if spec.ray.tokenFile else ray_serve.no_token
            return ray_serve.RayServeActuator(spec.ray.address, token_provider=token, serve_url=spec.ray.serveUrl, owns=owns,
                                              writes=self._cluster_writes(spec.ray.address), ownership=ownership)
        if self._kube_factory is not None:
            return self._kube_factory(site, spec, ownership)
        assert spec.kubernetes is not None  # SiteSpec guarantees ray or kubernetes for a data centre
        # loading a kubeconfig may run its exec credential plugin (aws eks get-token, say), which takes
        # seconds or waits on a login: in a thread of its own, waited on a bounded time, it holds up
        # this site's call alone, and only that long; loaded the same way again when the cluster refuses
        # the credentials it gave (401: the command failed, or a token's refresh did)
        context = spec.kubernetes.context

        async def load() -> Any:
            return await self._kube_clients.client(site, context)

        shape = rayservice.RayClusterShape(llm_image=spec.kubernetes.llmImage) if spec.kubernetes.llmImage else None
        return kuberay.KubeRayActuator(await load(), spec.kubernetes.namespace, site, shape=shape, reload=load,
                                       call_wait_s=self._kube_call_wait_s, ownership=ownership)

    def _cluster_writes(self, dashboard_url: str) -> ray_serve.ClusterWrites:
        """The one :class:`~orchestrator.adapters.ray_serve.ClusterWrites` of the cluster at ``dashboard_url``."""
        return self._writes.setdefault(dashboard_url.rstrip("/"), ray_serve.ClusterWrites())

    def target(self, site: str) -> str | None:
        """Where the actuator held for ``site`` drives its applications; None if none is held."""
        known = self._actuators.get(site)
        return target_of(known[0]) if known is not None else None

    def sites(self) -> set[str]:
        """The sites an actuator is held for."""
        return set(self._actuators)

    async def retire(self, site: str, spec: schema.SiteSpec) -> int:
        """Remove the applications ``site`` left on ``spec``'s target (``apply([])``: on
        KubeRay its RayService and the cluster with it, on a shared Ray cluster this site's
        applications only); how many ran. The site was deleted there, or moved away (another
        cluster, or the edge tier). The actuator held for the site does it when it is on that
        target, and is let go (kept for the next try if this raises); any other target gets
        an actuator of its own for the removal, beside the one the site drives now. ``spec``
        is the store's record: it reaches the target after a restart or a change of leader.
        What another control plane marked its own there is not removed: none of it is this one's."""
        known = self._actuators.get(site)
        held = known if known is not None and target_of(known[0]) == target_of(spec) else None
        if _is_local(spec):
            live = self.local.running()
            if held is not None and held[2] != live:  # it drove a head that exited since: let go, reaching nothing
                del self._actuators[site]
                await held[1].close()
                held = None
            if live is None:
                return 0  # the embedded cluster is not up: what ran there stopped with it, no need to start one
        if held is not None:
            del self._actuators[site]
            actuator = held[1]
        else:
            actuator = await self._build(site, spec)
        try:
            running = len(await actuator.observe())
            await actuator.apply([])
        except OwnedElsewhere as exc:  # another control plane's now: nothing there is this one's to remove
            log.warning("data centre %s: nothing removed from %s: %s", site, target_of(spec), exc)
            await actuator.close()
            return 0
        except BaseException:
            if held is not None and site not in self._actuators:
                self._actuators[site] = held
            else:
                await actuator.close()
            raise
        await actuator.close()
        return running

    async def forget(self, keep: set[str]) -> None:
        """Close the actuators of the sites not in ``keep``, leaving what runs on them."""
        for site in [s for s in self._actuators if s not in keep]:
            _, actuator, _ = self._actuators.pop(site)
            await actuator.close()

    async def close(self) -> None:
        await self.forget(set())
        await self._kube_clients.close()
        await self.local.stop()
