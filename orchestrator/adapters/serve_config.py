"""What a data-centre site runs, as Ray Serve sees it: specs, statuses, errors, rendering.

Two adapters drive Ray Serve for a data-centre site: :mod:`.ray_serve` over the Serve REST
API of a running Ray cluster and :mod:`.kuberay` through a KubeRay ``RayService``. Both
turn the same :class:`ServeAppSpec` values into the same Serve application config and read
the same application statuses back, so that part lives here once, free of I/O: the
reconciler can unit-test against it and the two adapters cannot drift apart.

Error tree (every adapter error derives from :class:`DataCentreError`; ``retryable`` tells
the reconciler whether backing off and trying again can help)::

    DataCentreError
    +-- RayUnreachable          dashboard / API server down or not answering (retryable)
    +-- RayAuthError            the token was missing or rejected (not retryable)
    +-- ServeConfigRejected     Ray refused the config itself, e.g. HTTP 400 (not retryable)
    +-- ServeAppFailed          one application failed to deploy (retryable: it may be fixed)
    +-- RayServeError           any other unexpected answer (retryable)
    +-- OwnedElsewhere          another control plane marked the site's applications its own (not retryable)
    +-- KubernetesError         from the KubeRay adapter, see :mod:`.kuberay`
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from orchestrator import import_paths

#: Applications whose name starts with this are edgeplane's; others on a shared cluster are
#: left exactly as they are.
OWNED_PREFIX = "ep-"
#: Import path of the built-in ONNX application (see ``orchestrator/serving/onnx_app.py``).
ONNX_IMPORT_PATH = "orchestrator.serving.onnx_app:build"
#: Name of the one deployment inside the built-in ONNX application.
ONNX_DEPLOYMENT = "OnnxModel"
#: Import path of the built-in generative application (``orchestrator/serving/genai_app.py``).
GENAI_IMPORT_PATH = "orchestrator.serving.genai_app:build"
GENAI_DEPLOYMENT = "GenAIModel"
#: Ray Serve LLM's OpenAI application builder (vLLM engine), for ``vllm`` applications.
LLM_IMPORT_PATH = "ray.serve.llm:build_openai_app"
#: Ray Serve LLM names the engine deployment of an LLM application ``LLMServer:<model id>``
#: (:func:`llm_deployment`).
LLM_SERVER_DEPLOYMENT = "LLMServer"
RUNTIMES = ("onnx", "onnx-genai", "ray-serve", "vllm")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class DataCentreError(Exception):
    """Base of every error the data-centre adapters raise."""

    retryable: bool = True


class RayUnreachable(DataCentreError):
    """The Ray dashboard (or the Serve controller behind it) did not answer."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"Ray dashboard at {url} is unreachable: {reason}")
        self.url = url
        self.reason = reason


class RayAuthError(DataCentreError):
    """The dashboard answered 401/403. The message never contains the token itself."""

    retryable = False

    def __init__(self, url: str, status_code: int) -> None:
        if status_code == 401:
            why = (
                "no token was sent but the cluster has token authentication on; set the "
                "Site's spec.ray.tokenFile to a file holding the cluster's token"
            )
        else:
            why = "the token was rejected; check that the site's Ray token matches the cluster's"
        super().__init__(f"Ray dashboard at {url} refused the request (HTTP {status_code}): {why}")
        self.url = url
        self.status_code = status_code


class ServeConfigRejected(DataCentreError):
    """Ray refused the Serve config as a whole (invalid fields, HTTP 400)."""

    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(f"Ray Serve rejected the config: {message}")
        self.detail = message


class ServeAppFailed(DataCentreError):
    """One application reached DEPLOY_FAILED (bad import path, bad artifact, crash...)."""

    def __init__(self, app: str, message: str) -> None:
        super().__init__(f"Serve application {app!r} failed: {message}")
        self.app = app
        self.message = message


class RayServeError(DataCentreError):
    """Any other unexpected answer from the Serve REST API."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class ServeAppState(enum.StrEnum):
    """Ray Serve's application statuses, as its REST API and KubeRay report them."""

    NOT_STARTED = "NOT_STARTED"
    DEPLOYING = "DEPLOYING"
    RUNNING = "RUNNING"
    UNHEALTHY = "UNHEALTHY"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    DELETING = "DELETING"


@dataclass(frozen=True)
class LoraAdapters:
    """The LoRA adapters a ``vllm`` application serves: Ray Serve LLM's ``lora_config``
    (where they are, how many a replica keeps) and the vLLM arguments that go with it."""

    path: str
    max_per_replica: int = 16
    max_rank: int = 16
    download_timeout_s: float | None = None  # None: Ray's own (and left out of the config)
    download_attempts: int | None = None


@dataclass(frozen=True)
class LlmApp:
    """What a ``vllm`` application serves: one Ray Serve LLM ``LLMConfig``.

    ``engine_kwargs`` go to vLLM as they are (context length, dtype...); a replica's engine
    runs ``tensor_parallel_size`` x ``pipeline_parallel_size`` workers, one GPU each.
    Replicas are the application's ``num_replicas`` unless ``autoscaling`` gives Serve
    (min, max) bounds to scale within itself; either is rendered outside the ``LLMConfig``
    (:func:`llm_scaling`), so that changing it restarts no engine.
    """

    model_id: str
    source: str
    engine_kwargs: Mapping[str, Any] = field(default_factory=dict)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    accelerator_type: str | None = None
    autoscaling: tuple[int, int] | None = None
    lora: LoraAdapters | None = None

    @property
    def gpus(self) -> int:
        """GPUs of one replica: one per engine worker, as Ray Serve LLM counts them."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class ServeAppSpec:
    """One Serve application: one edgeplane deployment on one data-centre site.

    ``deployment`` names the Serve deployment inside a ``ray-serve`` application that
    edgeplane sizes (``num_replicas`` and resources); left empty, the application's ingress
    deployment is used once the cluster has reported it. ONNX applications have exactly
    one deployment, :data:`ONNX_DEPLOYMENT`.
    """

    name: str
    route_prefix: str
    model_name: str
    runtime: str
    num_replicas: int
    cpu: float = 1.0
    memory_mib: int = 0
    gpus: float = 0.0
    artifact_uri: str | None = None
    sha256: str | None = None
    artifact_hosts: tuple[str, ...] = ()  # where a download may be redirected (--artifact-host; empty: anywhere)
    import_path: str | None = None
    args: Mapping[str, Any] = field(default_factory=dict)
    deployment: str | None = None
    llm: LlmApp | None = None

    def __post_init__(self) -> None:
        problems = spec_problems(self)
        if problems:
            raise InvalidServeApp(self.name, problems)


class InvalidServeApp(ValueError):
    """A :class:`ServeAppSpec` that cannot be rendered; ``problems``: each thing wrong with it."""

    def __init__(self, name: str, problems: Sequence[str]) -> None:
        super().__init__(f"invalid Serve application {name!r}: " + "; ".join(problems))
        self.problems = tuple(problems)


@dataclass(frozen=True)
class ServeAppStatus:
    """Observed state of one application; ``endpoint_url`` is its route on the Serve proxy."""

    name: str
    status: ServeAppState
    message: str
    replicas_running: int
    replicas_target: int
    endpoint_url: str | None
    detail: str = ""  # the full message (tracebacks) when ``message`` is its summary
    #: The v2 version every replica answers ``/versions/{v}`` for (an ONNX application's
    #: model file, ``oip.model_version``), known only while Serve says they all run the
    #: config deployed (RUNNING, or DEPLOYING only to change their count); "" otherwise.
    version: str = ""
    #: The deployment its replicas are sized through, as the cluster reports it: the
    #: ingress (or only) deployment; "" while unknown. A ``ray-serve`` application that
    #: names none is sized through it (see ``ServeAppSpec.deployment``).
    ingress: str = ""

    #: Whether every deployment of the application has a replica running (an ingress up
    #: while the model deployment behind it still starts answers nothing).
    deployments_up: bool = True

    @property
    def answers(self) -> bool:
        """Whether requests sent to it are answered now: RUNNING, or DEPLOYING with a
        replica of each deployment running (a replica count or config changing: the
        replicas it has keep serving until their replacements do)."""
        return self.status is ServeAppState.RUNNING or (
            self.status is ServeAppState.DEPLOYING and self.replicas_running >= 1 and self.deployments_up)


class DataCentreActuator(Protocol):
    """What the reconciler needs from a data-centre site."""

    #: After :meth:`observe`: how edgeplane's applications on the site differ from what
    #: this actuator last applied ("" when they do not, or it has applied nothing yet).
    #: Someone else wrote them: a deposed leader's apply that landed after the new
    #: leader's, or a hand edit; the reconciler applies its own again.
    drift: str

    async def apply(self, apps: Sequence[ServeAppSpec]) -> Mapping[str, str]:
        """Make edgeplane's applications on the site exactly ``apps``; those it did not apply
        as asked (a KubeRay cluster that cannot hold them), by name: why, which
        :meth:`observe` reports too. The others are applied."""
        ...

    async def observe(self) -> Mapping[str, ServeAppStatus]:
        """Status of every edgeplane application on the site, by application name."""
        ...

    async def close(self) -> None: ...


def spec_problems(spec: ServeAppSpec) -> list[str]:
    """Everything wrong with ``spec``; empty when it can be rendered."""
    problems: list[str] = []
    if not _APP_NAME.fullmatch(spec.name):
        problems.append("name must be 1-63 letters, digits, '-', '_' or '.'")
    if not spec.route_prefix.startswith("/") or (
        spec.route_prefix != "/" and spec.route_prefix.endswith("/")
    ):
        problems.append("route_prefix must start with '/' and not end with '/'")
    if spec.runtime not in RUNTIMES:
        problems.append(f"runtime must be one of {', '.join(RUNTIMES)}, got {spec.runtime!r}")
    if spec.num_replicas < 0:
        problems.append("num_replicas must be >= 0")
    if spec.cpu < 0 or spec.gpus < 0 or spec.memory_mib < 0:
        problems.append("cpu, gpus and memory_mib must be >= 0")
    if spec.runtime in ("onnx", "onnx-genai"):
        if not spec.artifact_uri:
            problems.append(f"an {spec.runtime} application needs artifact_uri")
        if not spec.sha256 or not re.fullmatch(r"[0-9a-f]{64}", spec.sha256):
            problems.append(f"an {spec.runtime} application needs sha256 (64 lowercase hex digits)")
    if spec.runtime == "ray-serve":
        if not spec.import_path:
            problems.append(f"a ray-serve application needs import_path, {import_paths.FORMS}")
        elif (why := import_paths.problem(spec.import_path)) is not None:
            problems.append(f"import_path {spec.import_path!r} is not one Ray Serve takes: {why}")
    if (spec.runtime == "vllm") != (spec.llm is not None):
        problems.append("a vllm application needs llm, and only a vllm application takes it")
    elif spec.llm is not None:
        if spec.llm.tensor_parallel_size < 1:
            problems.append("llm.tensor_parallel_size must be >= 1")
        if spec.llm.pipeline_parallel_size < 1:
            problems.append("llm.pipeline_parallel_size must be >= 1")
        if spec.llm.autoscaling is not None and not 0 <= spec.llm.autoscaling[0] <= spec.llm.autoscaling[1]:
            problems.append("llm.autoscaling must be (min, max) with 0 <= min <= max")
        if spec.llm.lora is not None and (spec.llm.lora.max_per_replica < 1 or spec.llm.lora.max_rank < 1):
            problems.append("llm.lora.max_per_replica and llm.lora.max_rank must be >= 1")
    return problems


def is_owned(name: str, prefix: str = OWNED_PREFIX) -> bool:
    return name.startswith(prefix)


def actor_options(spec: ServeAppSpec) -> dict[str, Any]:
    """``ray_actor_options`` for one replica of ``spec``."""
    options: dict[str, Any] = {"num_cpus": spec.cpu}
    if spec.gpus:
        options["num_gpus"] = spec.gpus
    if spec.memory_mib:
        options["memory"] = spec.memory_mib * 1024 * 1024
    return options


def render_application(spec: ServeAppSpec, sized_deployment: str | None = None) -> dict[str, Any]:
    """One entry of the Serve config's ``applications`` list.

    ``sized_deployment`` is the deployment a ``ray-serve`` application is scaled through
    when ``spec.deployment`` is empty (the ingress the cluster reported); without either,
    the application runs with its own defaults until the next pass knows the name.
    """
    app: dict[str, Any] = {"name": spec.name, "route_prefix": spec.route_prefix}
    if spec.llm is not None:
        app["import_path"] = LLM_IMPORT_PATH
        app["args"] = {"llm_configs": [llm_config(spec)]}
        app["deployments"] = [llm_scaling(spec)]
        return app
    if spec.runtime == "onnx":
        app["import_path"] = ONNX_IMPORT_PATH
        app["args"] = {
            "artifact_uri": spec.artifact_uri,
            "sha256": spec.sha256,
            "model_name": spec.model_name,
            **dict(spec.args),  # the variant's declared inputs and outputs, when it declares them
        }
        deployment: str | None = ONNX_DEPLOYMENT
    elif spec.runtime == "onnx-genai":
        app["import_path"] = GENAI_IMPORT_PATH
        app["args"] = {"artifact_uri": spec.artifact_uri, "sha256": spec.sha256, "model_name": spec.model_name, **dict(spec.args)}
        deployment = GENAI_DEPLOYMENT
    else:
        app["import_path"] = spec.import_path
        app["args"] = dict(spec.args)
        deployment = spec.deployment or sized_deployment
    if spec.artifact_hosts:  # only then: an application of a fleet without the setting keeps its config
        app["args"]["artifact_hosts"] = list(spec.artifact_hosts)
    if deployment is not None:
        app["deployments"] = [
            {
                "name": deployment,
                "num_replicas": spec.num_replicas,
                "ray_actor_options": actor_options(spec),
            }
        ]
    return app


def application_from_config(entry: Mapping[str, Any], asked: ServeAppSpec) -> ServeAppSpec | None:
    """The application a Serve config entry read back from a cluster runs, such that
    :func:`render_application` renders ``entry`` again exactly; what the entry does not say
    (a ``ray-serve`` application's model name, an LLM replica's memory and GPUs, which size
    its pod, not its config) is ``asked``'s. A control plane that did not write the entry
    (it restarted, or took over as leader) reads how the application runs from it. None for
    an entry edgeplane does not render so (a hand edit): it cannot say."""
    try:
        spec = _read_application(entry, asked)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None
    return spec if render_application(spec) == dict(entry) else None


_MIB = 1024 * 1024


def _read_application(entry: Mapping[str, Any], asked: ServeAppSpec) -> ServeAppSpec:
    """:func:`application_from_config` before its check that the result renders ``entry``;
    raises on an entry it cannot read."""
    import_path, args = entry["import_path"], dict(entry["args"])
    common: dict[str, Any] = {"name": entry["name"], "route_prefix": entry["route_prefix"], "model_name": asked.model_name}
    if import_path == LLM_IMPORT_PATH:
        (config,) = args["llm_configs"]
        engine = dict(config["engine_kwargs"])
        tp = engine.pop("tensor_parallel_size")
        pp = engine.pop("pipeline_parallel_size", 1)
        lora = None
        if (adapters := config.get("lora_config")) is not None:
            del engine["enable_lora"]
            lora = LoraAdapters(path=adapters["dynamic_lora_loading_path"], max_per_replica=adapters["max_num_adapters_per_replica"],
                                max_rank=engine.pop("max_lora_rank"), download_timeout_s=adapters.get("download_timeout_s"),
                                download_attempts=adapters.get("max_download_tries"))
            engine.pop("max_loras")
        (engines,) = entry["deployments"]
        scaling = engines.get("autoscaling_config")
        bounds = (scaling["min_replicas"], scaling["max_replicas"]) if scaling is not None else None
        replicas = scaling["initial_replicas"] if scaling is not None else engines["num_replicas"]
        loading = config["model_loading_config"]
        llm = LlmApp(model_id=loading["model_id"], source=loading["model_source"], engine_kwargs=engine, tensor_parallel_size=tp,
                     pipeline_parallel_size=pp, accelerator_type=config.get("accelerator_type"), autoscaling=bounds, lora=lora)
        return ServeAppSpec(**common, runtime="vllm", num_replicas=replicas,
                            cpu=config["placement_group_config"]["bundles"][0]["CPU"] * llm.gpus,
                            memory_mib=asked.memory_mib, gpus=asked.gpus, llm=llm)
    (deployment,) = entry["deployments"]
    options = deployment["ray_actor_options"]
    if options.get("memory", 0) % _MIB:
        raise ValueError("memory is not whole MiB")
    common.update(num_replicas=deployment["num_replicas"], cpu=options["num_cpus"], gpus=options.get("num_gpus", 0.0),
                  memory_mib=options.get("memory", 0) // _MIB)
    if import_path in (ONNX_IMPORT_PATH, GENAI_IMPORT_PATH):
        artifact = {"artifact_uri": args.pop("artifact_uri"), "sha256": args.pop("sha256"), "model_name": args.pop("model_name"),
                    "artifact_hosts": tuple(args.pop("artifact_hosts", ()))}
        runtime = "onnx" if import_path == ONNX_IMPORT_PATH else "onnx-genai"
        return ServeAppSpec(**{**common, **artifact}, runtime=runtime, args=args)
    return ServeAppSpec(**common, runtime="ray-serve", import_path=import_path, args=args, deployment=deployment["name"])


def llm_deployment(model_id: str) -> str:
    """The engine deployment Ray Serve LLM's builder makes for ``model_id``
    (``build_llm_deployment``): ``LLMServer:`` and the id, ``/`` as ``--`` and ``.`` as ``_``."""
    return f"{LLM_SERVER_DEPLOYMENT}:{model_id.replace('/', '--').replace('.', '_')}"


def llm_scaling(spec: ServeAppSpec) -> dict[str, Any]:
    """The engines' count of a ``vllm`` application, as an override of the deployment Ray
    Serve LLM makes for them, outside the application's ``args``.

    Ray Serve rebuilds an application whose ``import_path``, ``runtime_env`` or ``args``
    change (its code version), every replica restarted: an engine reloading its weights,
    minutes for a large model. A count or autoscaling bounds changed in the override are a
    lightweight update, which the engines running keep running through. A fixed count
    turns the builder's default autoscaling off (``autoscaling_config: null``), which
    would otherwise keep one replica whatever the count.
    """
    llm = spec.llm
    assert llm is not None
    override: dict[str, Any] = {"name": llm_deployment(llm.model_id)}
    if llm.autoscaling is not None:
        low, high = llm.autoscaling
        initial = min(max(spec.num_replicas, low), high)
        override["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": initial}
    else:
        override.update(num_replicas=spec.num_replicas, autoscaling_config=None)
    return override


def llm_config(spec: ServeAppSpec) -> dict[str, Any]:
    """The ``LLMConfig`` (as Serve's config file spells it) of a ``vllm`` application,
    without its replicas (:func:`llm_scaling`).

    Each engine worker gets one GPU in one bundle of a ``STRICT_PACK`` placement group, so
    the ``tensor_parallel_size`` x ``pipeline_parallel_size`` GPUs of a replica are on one
    node (the planner placed them on one GPU group): Ray starts one worker per bundle and
    needs as many as the engine has workers. The replica's CPU is spread over its bundles.
    LoRA adapters are Ray's ``lora_config`` (with its download settings when given) and
    vLLM's ``enable_lora``, ``max_lora_rank`` and ``max_loras``, which Ray asks to equal
    ``max_num_adapters_per_replica``.
    """
    llm = spec.llm
    assert llm is not None
    gpus = llm.gpus
    bundle: dict[str, float] = {"CPU": max(spec.cpu / gpus, 0.001), "GPU": 1}
    parallel = {"tensor_parallel_size": llm.tensor_parallel_size}
    if llm.pipeline_parallel_size > 1:
        parallel["pipeline_parallel_size"] = llm.pipeline_parallel_size
    if llm.lora is not None:
        parallel.update(enable_lora=True, max_lora_rank=llm.lora.max_rank, max_loras=llm.lora.max_per_replica)
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": llm.model_id, "model_source": llm.source},
        "engine_kwargs": {**llm.engine_kwargs, **parallel},
        "placement_group_config": {"bundles": [dict(bundle) for _ in range(gpus)], "strategy": "STRICT_PACK"},
    }
    if llm.accelerator_type:
        config["accelerator_type"] = llm.accelerator_type
    if llm.lora is not None:
        config["lora_config"] = {"dynamic_lora_loading_path": llm.lora.path, "max_num_adapters_per_replica": llm.lora.max_per_replica}
        if llm.lora.download_timeout_s is not None:  # left out unless given: an application rendered before reads the same
            config["lora_config"]["download_timeout_s"] = llm.lora.download_timeout_s
        if llm.lora.download_attempts is not None:
            config["lora_config"]["max_download_tries"] = llm.lora.download_attempts
    return config


def configured_replicas(app: Mapping[str, Any]) -> int:
    """Replicas a rendered application asks for: its sized deployments' (for a Ray Serve
    LLM application its engines', fixed or the autoscaling start). It is read back from a
    cluster, where a hand may have edited it: a count Serve scales itself (``num_replicas:
    auto``) counts where it starts, and what is no count counts none. An LLM application an
    earlier release rendered has its count inside its ``LLMConfig``s."""
    if app.get("import_path") == LLM_IMPORT_PATH and "deployments" not in app:
        args = app.get("args")
        configs = args.get("llm_configs") if isinstance(args, Mapping) else None
        return sum(_deployment_replicas(c.get("deployment_config"))
                   for c in configs if isinstance(c, Mapping)) if isinstance(configs, list) else 0
    deployments = app.get("deployments")
    return sum(_deployment_replicas(d) for d in deployments) if isinstance(deployments, list) else 0


def _deployment_replicas(deployment: object) -> int:
    """A deployment's ``num_replicas``, or where its autoscaling starts (Serve's default for
    ``auto``: one replica)."""
    if not isinstance(deployment, Mapping):
        return 0
    count = deployment.get("num_replicas")
    if isinstance(count, int) and not isinstance(count, bool):
        return count
    scaling = deployment.get("autoscaling_config")
    scaling = scaling if isinstance(scaling, Mapping) else {}
    for start in (scaling.get("initial_replicas"), scaling.get("min_replicas")):
        if isinstance(start, int) and not isinstance(start, bool) and (start or count == "auto"):
            return start
    return 1 if count == "auto" else 0


#: Deployment states whose replicas answer and run the config deployed: steady, or only
#: changing in number. Serve reports an application DEPLOYING while a deployment's count
#: changes through its config (as edgeplane scales it), RUNNING when Serve's own
#: autoscaler changes it; either way the replicas it has keep answering.
SCALING_DEPLOYMENT_STATES = frozenset({"HEALTHY", "UPSCALING", "DOWNSCALING"})


def only_scaling(deployments: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether an application's deployments (some reported) all run its deployed config, at
    most changing their replica count (no new code or model file rolling out, none failing)."""
    return bool(deployments) and all(d.get("status") in SCALING_DEPLOYMENT_STATES for d in deployments.values())


def parse_state(value: object) -> ServeAppState:
    """An application state as Serve (or KubeRay) reports it; unknown values are unhealthy."""
    try:
        return ServeAppState(value)
    except ValueError:
        return ServeAppState.UNHEALTHY


def deployment_messages(deployments: Mapping[str, Mapping[str, Any]]) -> str:
    """The messages Serve puts on deployments ("not enough resources", health failures)."""
    return "; ".join(f"{name}: {d['message']}" for name, d in deployments.items() if d.get("message"))


def route_url(serve_url: str, prefix: str) -> str:
    """Where an application mounted at ``prefix`` answers on a Serve proxy."""
    return f"{serve_url}{'' if prefix == '/' else prefix}"


def summarize_message(message: str) -> str:
    """The line of a Serve failure message a person needs: the exception, not the traceback."""
    text = _ANSI.sub("", message).strip()
    if "Traceback" not in text:
        return text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if not line.startswith(("File ", "^", "~")) and ":" in line:
            return line
    return lines[-1] if lines else text


@dataclass(frozen=True)
class ClusterDemand:
    """What a set of applications asks of a cluster, summed over replicas."""

    cpu: float
    memory_mib: int
    gpus: float
    largest_replica_cpu: float
    largest_replica_memory_mib: int
    largest_replica_gpus: float


def total_demand(apps: Sequence[ServeAppSpec]) -> ClusterDemand:
    return ClusterDemand(
        cpu=math.fsum(a.cpu * a.num_replicas for a in apps),
        memory_mib=sum(a.memory_mib * a.num_replicas for a in apps),
        gpus=math.fsum(a.gpus * a.num_replicas for a in apps),
        largest_replica_cpu=max((a.cpu for a in apps), default=0.0),
        largest_replica_memory_mib=max((a.memory_mib for a in apps), default=0),
        largest_replica_gpus=max((a.gpus for a in apps), default=0.0),
    )
