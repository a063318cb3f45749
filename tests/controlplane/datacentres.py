"""Data-centre sites for the control-plane tests: their manifests, a cluster that outlives
any control plane, a Ray dashboard's Serve REST API on loopback, and the ``kube_factory``
that builds KubeRay actuators on a stateful Kubernetes API emulator (kmock) over real HTTP.
The emulator itself is conftest.py's ``kube``."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import kmock
import kubernetes

from edgeplane_proto import hostport
from orchestrator import server
from orchestrator.adapters import kuberay, rayservice, serve_config
from orchestrator.manifests import schema
from orchestrator.testing import harness, loopback
from orchestrator.adapters.ownership import Ownership

SHAPE = rayservice.RayClusterShape(image="registry.example/edgeplane-ray:2.60.0", ray_version="2.60.0")
RES = kmock.resource("ray.io", "v1", "rayservices")


def site(name: str, on: str = "") -> str:
    """A data-centre Site on KubeRay in namespace ``ns-<name>``, or ``on`` another target
    (a ``kubernetes:`` or ``ray:`` line)."""
    return f"""
apiVersion: edgeplane.io/v1alpha1
kind: Site
metadata: {{name: {name}, labels: {{site: {name}}}}}
spec:
  tier: datacenter
  location: {{country: FR, region: eu-west, lat: 48.85, lon: 2.35}}
  capacity: {{cpu: 64, memoryGiB: 256}}
  {on or f"kubernetes: {{context: test, namespace: ns-{name}}}"}
"""


def deployment(name: str, on: str | None = None) -> str:
    """One replica of model m in a data centre: site ``on``, or any."""
    selector = f", siteSelector: {{site: {on}}}" if on is not None else ""
    return f"""
apiVersion: edgeplane.io/v1alpha1
kind: ModelDeployment
metadata: {{name: {name}}}
spec:
  model: m
  replicas: {{min: 1, max: 1}}
  placement: {{tiers: [datacenter]{selector}}}
"""


MODEL = """
apiVersion: edgeplane.io/v1alpha1
kind: Model
metadata: {name: m}
spec:
  variants:
    - {name: v, runtime: ray-serve, importPath: "pkg.mod:app", resources: {cpu: 1, memoryMiB: 256}}
"""


def bundle(*docs: str) -> str:
    return "---".join(docs)


class Cluster:
    """A data centre's cluster that outlives any control plane: what runs there is what was
    last applied, and it can be taken away and brought back."""

    drift = ""

    def __init__(self) -> None:
        self.running: dict[str, serve_config.ServeAppSpec] = {}
        self.down = False

    async def apply(self, apps: Sequence[serve_config.ServeAppSpec]) -> Mapping[str, str]:
        await self.observe()
        self.running = {a.name: a for a in apps}
        return {}

    async def observe(self) -> Mapping[str, serve_config.ServeAppStatus]:
        if self.down:
            raise serve_config.DataCentreError("cannot reach the cluster: connection refused")
        return {n: serve_config.ServeAppStatus(n, serve_config.ServeAppState.RUNNING, "", a.num_replicas, a.num_replicas,
                                               f"http://127.0.0.1:9{a.route_prefix}") for n, a in self.running.items()}

    async def close(self) -> None:  # closing a client stops nothing on the cluster
        pass


class ServeDashboard:
    """A Ray dashboard's Serve REST API on loopback, whose applications run as soon as they
    are PUT; ``stop()`` takes the cluster away for good. ``stall()`` makes it take requests
    and answer none (of the methods given, or all) until ``release()``, as a dashboard that
    answers at the client's timeout; ``requests``: the method of each request it took, in
    order, and ``held`` those it holds now (of the Serve API: its Jobs API, ``jobs``, is
    neither counted nor held). ``validates``: a PUT is checked as Ray's dashboard
    checks it (Ray Serve's own ``ServeDeploySchema``), one it refuses answered 400 with the
    text Ray answers, and nothing of it applied. ``host``: the loopback address it listens on
    (``::1`` for a dashboard reached over IPv6). ``jobs_failing``: the HTTP status its Jobs
    API answers every call with while set (a job manager that fails, its Serve API fine)."""

    def __init__(self, validates: bool = False, host: str = "127.0.0.1") -> None:
        self.applications: dict[str, dict[str, Any]] = {}
        self.jobs: list[dict[str, Any]] = []  # Ray's Jobs API: each as submitted, SUCCEEDED
        self.job_reads = 0  # how many times they were listed
        self.jobs_failing: int | None = None
        self.validates = validates
        self.requests: list[str] = []
        self.held: list[str] = []
        self._stalled: frozenset[str] = frozenset()
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        dashboard = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/api/jobs":
                    dashboard.job_reads += 1
                    if dashboard.jobs_failing is not None:
                        return self.answer("job manager failed", dashboard.jobs_failing)
                    return self.answer(list(dashboard.jobs))
                dashboard.took(self.command)
                if self.path.rstrip("/") != "/api/serve/applications":
                    return self.send_error(404)
                self.answer({"applications": {name: dashboard.running(app) for name, app in dict(dashboard.applications).items()},
                             "http_options": {"port": 8000}})

            def do_PUT(self) -> None:
                config = json.loads(self.rfile.read(int(self.headers["content-length"])))
                dashboard.took(self.command)
                if (refused := dashboard.refusal(config)) is not None:
                    return self.answer(refused, 400)
                dashboard.applications = {a["name"]: a for a in config["applications"]}
                self.answer({})

            def do_POST(self) -> None:  # a job submitted: it ran at once
                job = json.loads(self.rfile.read(int(self.headers["content-length"])))
                if self.path.rstrip("/") != "/api/jobs":
                    return self.send_error(404)
                if dashboard.jobs_failing is not None:
                    return self.answer("job manager failed", dashboard.jobs_failing)
                dashboard.jobs.append({**job, "type": "SUBMISSION", "status": "SUCCEEDED", "start_time": len(dashboard.jobs) + 1})
                self.answer({"job_id": None, "submission_id": job["submission_id"]})

            def answer(self, body: Any, status: int = 200) -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "text/plain" if isinstance(body, str) else "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(ConnectionError):  # a held request its client gave up on
                    self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        server_class = type("Server", (http.server.ThreadingHTTPServer,),
                            {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        self._serving = contextlib.ExitStack()
        httpd = self._serving.enter_context(loopback.in_thread(server_class((host, 0), Handler)))
        self.url = f"http://{hostport.address(host, httpd.server_port)}"

    def took(self, method: str) -> None:
        """A request came: held while ``method`` is stalled (at most a minute: a test that
        forgot to release it ends anyway)."""
        with self._lock:
            self.requests.append(method)
            held = method in self._stalled and not self._open.is_set()
            if held:
                self.held.append(method)
        if held:
            self._open.wait(60)
            with self._lock:
                self.held.remove(method)

    def refusal(self, config: Any) -> str | None:
        """What Ray's dashboard answers a Serve config it refuses (``repr`` of the validation
        error, as its ``put_all_applications`` does), None for one it takes."""
        if not self.validates:
            return None
        import pydantic
        from ray.serve.schema import ServeDeploySchema  # Ray's own check; imported only where asked for, it takes seconds

        try:
            ServeDeploySchema.model_validate(config)
        except pydantic.ValidationError as exc:
            return repr(exc)
        return None

    def stall(self, *methods: str) -> None:
        self._stalled = frozenset(methods or ("GET", "PUT"))
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    @staticmethod
    def running(app: Mapping[str, Any]) -> dict[str, Any]:
        replicas = int((app.get("deployments") or [{}])[0].get("num_replicas", 1))
        return {"status": "RUNNING", "source": "declarative", "route_prefix": app.get("route_prefix"), "deployed_app_config": app,
                "deployment_topology": {"ingress_deployment": "Ingress"},
                "deployments": {"Ingress": {"target_num_replicas": replicas, "replicas": [{"state": "RUNNING"}] * replicas}}}

    def stop(self) -> None:
        self.release()
        self._serving.close()


def kuberay_on(kube: kmock.KubernetesEmulator, shape: rayservice.RayClusterShape = SHAPE, **broken: Any) -> Callable[[str, schema.SiteSpec], Any]:
    """A ``kube_factory``: a KubeRay actuator on the emulator per site, or the one given by name."""
    def build(name: str, spec: schema.SiteSpec, ownership: Ownership | None) -> Any:
        if name in broken:
            return broken[name]
        assert spec.kubernetes is not None
        config = kubernetes.client.Configuration()
        config.host, config.retries = str(kube.url).rstrip("/"), 0
        return kuberay.KubeRayActuator(kubernetes.client.ApiClient(config), spec.kubernetes.namespace, name, shape=shape,
                                       ownership=ownership)
    return build


def has_rayservice(kube: kmock.KubernetesEmulator, name: str, namespace: str = "") -> bool:
    key = (RES, namespace or f"ns-{name}", rayservice.rayservice_name(name))
    return key in kube.objects and not kube.objects[key].deleted


def site_status(cp: server.ControlPlane, name: str) -> Mapping[str, Any]:
    stored = cp.store.get("Site", name)
    return stored.status if stored is not None else {}


def site_events(cp: server.ControlPlane, name: str) -> list[tuple[str, str]]:
    return [(e.action, e.reason) for e in cp.store.events(kind="Site", name=name, limit=1000)]


async def start(fleet: harness.Fleet, factory: Callable[[str, schema.SiteSpec], Any]) -> server.ControlPlane:
    return await fleet.start_control_plane(kube_factory=factory, resync_s=0.2)
