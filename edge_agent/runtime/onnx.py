"""The only module that touches onnxruntime.

It picks the execution provider (CUDA when onnxruntime-gpu offers it, else CPU; the agent
gives those it has decided on, CUDA only where it has a GPU: ``capacity``), loads a
model from bytes that were verified beforehand (or, a model with external data, from its
graph's path in the folder its verified package was unpacked into), describes its tensors in v2 terms, and
checks every infer request against that description *before* onnxruntime sees it, so a
bad request is a clear 400 and never a native error.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_agent import errors
from edgeplane_proto import oip_tensors

#: Preference order; the first one available wins, CPU is always the fallback.
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")

_ORT_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(bfloat16)": "BF16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def available_providers() -> tuple[str, ...]:
    return tuple(ort.get_available_providers())


def choose_providers(available: Sequence[str], prefer: Sequence[str] = PREFERRED_PROVIDERS) -> list[str]:
    chosen = [p for p in prefer if p in available]
    return chosen or ["CPUExecutionProvider"]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # v2 datatype name
    shape: tuple[int, ...]  # -1 = any size
    optional: bool = False  # an input the graph runs without (``optional(tensor(...))``)

    def check(self, array: np.ndarray, datatype: str) -> None:
        if datatype != self.datatype:
            raise errors.InvalidInput(
                f"input {self.name!r} must be {self.datatype}, got {datatype}"
            )
        if array.ndim != len(self.shape):
            raise errors.InvalidInput(
                f"input {self.name!r} must have shape {list(self.shape)} (-1 = any), "
                f"got {list(array.shape)}"
            )
        for want, got in zip(self.shape, array.shape, strict=True):
            if want >= 0 and want != got:
                raise errors.InvalidInput(
                    f"input {self.name!r} must have shape {list(self.shape)} (-1 = any), "
                    f"got {list(array.shape)}"
                )


def _spec(node: Any) -> TensorSpec:
    """An input of type ``optional(tensor(float))`` is an FP32 tensor a request may leave out:
    onnxruntime takes the array as it is, or runs the graph without it."""
    kind = node.type
    optional = kind.startswith("optional(tensor(") and kind.endswith(")")
    if optional:
        kind = kind.removeprefix("optional(").removesuffix(")")
    datatype = _ORT_TO_V2.get(kind, kind)
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    return TensorSpec(node.name, datatype, shape, optional)


#: Where onnxruntime looks for the external data files of a model given as bytes (by
#: default the process's working directory), and a path under which no file can be.
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"
NO_FOLDER = os.devnull

#: Intra-op threads spin while a run hands them work (waking a sleeping thread for each
#: parallel section made runs 5-25 % slower here) and stop spinning when the run ends: idle,
#: they would burn the cores that the HTTP event loop, co-located callers and the energy
#: budget need between runs. Generative models' sessions get the same (runtime.genai).
SPIN_DURING_RUNS = {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"}


def spin_entries(spin_between_runs: bool = False, spin_after_run_us: int = 0) -> dict[str, str]:
    """Session config entries for a thread policy: :data:`SPIN_DURING_RUNS` by default;
    ``spin_after_run_us`` lets idle threads spin that long after a run before they sleep (a
    run that follows within it finds them awake, and skips a wake-up); ``spin_between_runs``
    keeps onnxruntime's own default (no entries: idle threads spin for milliseconds)."""
    if spin_between_runs:
        return {}
    if spin_after_run_us > 0:
        return {"session.intra_op.allow_spinning": "1", "session.intra_op.spin_duration_us": str(spin_after_run_us)}
    return dict(SPIN_DURING_RUNS)


def session_options(intra_op_threads: int = 0, *, spin_between_runs: bool = False,
                    spin_after_run_us: int = 0) -> ort.SessionOptions:
    """The agent's onnxruntime session options (benchmarks take their baseline with them too).

    The thread policy comes from :func:`spin_entries`. Measured with the wide model
    (docs/agent.md): back to back, onnxruntime's default gave batch 8 0.60x raw against
    0.42x and batch 64 0.88x against 0.75x, but kept 22 % of a core busy at 5 requests a
    second against 1.5 %, and 97 % against 6 % at 19 a second; a 250 us spin gave most of
    that gain on runs under a millisecond for up to 30 % more CPU per request
    (``bench.agent_spin``)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    for key, value in spin_entries(spin_between_runs, spin_after_run_us).items():
        options.add_session_config_entry(key, value)
    return options


class OnnxModel:
    """A loaded onnxruntime session plus its v2 tensor description. ``run`` is thread safe
    (onnxruntime sessions allow concurrent ``run`` calls)."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session
        self.inputs = tuple(_spec(n) for n in session.get_inputs())
        self.outputs = tuple(_spec(n) for n in session.get_outputs())
        self._inputs_by_name = {s.name: s for s in self.inputs}
        self._output_names = [s.name for s in self.outputs]
        self._bf16_outputs = any(s.datatype == "BF16" for s in self.outputs)
        self.provider = session.get_providers()[0]

    @classmethod
    def load(
        cls,
        data: bytes | pathlib.Path,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 0,
        spin_between_runs: bool = False,
        spin_after_run_us: int = 0,
    ) -> OnnxModel:
        """``data``: a model's verified bytes, or the path of the graph of an unpacked package,
        whose external data onnxruntime reads beside it, and nowhere else
        (:func:`_refuse_external_data_outside`)."""
        options = session_options(intra_op_threads, spin_between_runs=spin_between_runs,
                                  spin_after_run_us=spin_after_run_us)
        if isinstance(data, pathlib.Path):
            _refuse_external_data_outside(data)
            model: str | bytes = str(data)  # onnxruntime reads its external data in the graph's folder
        else:
            # The artifact is the verified bytes alone: given bytes, onnxruntime looks for a model's
            # external data in the process's working directory, and would read a file it found
            # there by that name as the model's weights. Looked for under a file instead, none is.
            options.add_session_config_entry(EXTERNAL_DATA_FOLDER, NO_FOLDER)
            model = data
        chosen = list(providers) if providers else choose_providers(available_providers())
        try:
            session = ort.InferenceSession(model, sess_options=options, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            refusal = _external_data_refusal(data) if isinstance(data, bytes) else None
            raise errors.ModelLoadError(refusal or f"onnxruntime could not load the model: {_short(exc)}") from exc
        _refuse_unless_tensors(session)
        _refuse_strings_in_and_bf16_out(session)
        if chosen == ["CPUExecutionProvider"]:
            _forget_model_bytes(session)
        return cls(session)

    def feeds(self, named: Sequence[tuple[str, np.ndarray, str]]) -> dict[str, Any]:
        """Check ``(name, array, v2 datatype)`` triples against the model's inputs: arrays to
        run on, a BF16 one as the OrtValue onnxruntime takes it."""
        feeds: dict[str, Any] = {}
        for name, array, datatype in named:
            spec = self._inputs_by_name.get(name)
            if spec is None:
                known = ", ".join(self._inputs_by_name)
                raise errors.InvalidInput(f"unknown input {name!r} (the model takes: {known})")
            spec.check(array, datatype)
            if datatype == "BYTES":
                array = _utf8_strings(array, name)
            feeds[name] = _bf16_value(array) if datatype == "BF16" else array
        missing = [s.name for s in self.inputs if s.name not in feeds and not s.optional]
        if missing:
            raise errors.InvalidInput(f"missing input(s): {', '.join(missing)}")
        return feeds

    def output_names(self, requested: Sequence[str]) -> list[str]:
        if not requested:
            return self._output_names
        unknown = [n for n in requested if n not in self._output_names]
        if unknown:
            raise errors.InvalidInput(
                f"unknown output(s) {', '.join(unknown)} (the model has: "
                f"{', '.join(self._output_names)})"
            )
        return list(requested)

    def run(self, feeds: dict[str, Any], outputs: list[str]) -> list[np.ndarray]:
        """``feeds`` as :meth:`feeds` makes them, ``outputs`` as :meth:`output_names` does."""
        try:
            if self._bf16_outputs:
                return [_array(value) for value in self._session.run_with_ort_values(outputs, _ort_values(feeds))]
            return self._session.run(outputs, feeds)
        except Exception as exc:  # shape errors deeper in the graph, e.g. broadcasting
            raise errors.InvalidInput(f"model rejected the input: {_short(exc)}") from exc


# -- BF16 tensors ------------------------------------------------------------------------
# onnxruntime's Python API knows no numpy dtype for bfloat16 (ml_dtypes' is not numpy's):
# it takes and gives such a tensor only as an OrtValue, whose bytes are the same.

_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16, without importing onnx


def _bf16_value(array: np.ndarray) -> ort.OrtValue:
    """A BF16 array as the OrtValue onnxruntime takes (a view of its bytes, no copy)."""
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(array).view(np.uint16), _BFLOAT16)


def _ort_values(feeds: dict[str, Any]) -> dict[str, ort.OrtValue]:
    return {name: value if isinstance(value, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
            for name, value in feeds.items()}


def _array(value: ort.OrtValue) -> np.ndarray:
    """An output as an array; a BF16 one copied out of onnxruntime's memory (its own output,
    on the CPU: a session's run gives its outputs there)."""
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy()
    size = value.tensor_size_in_bytes()
    raw = (ctypes.c_char * size).from_address(value.data_ptr()) if size else b""
    return np.frombuffer(bytes(raw), dtype=oip_tensors.bfloat16()).reshape(value.shape())


def _external_data_refusal(data: bytes) -> str | None:
    """Why a model that keeps its weights in ONNX external data files (as exporters write
    one past 2 GB) did not load, or None when it keeps none there. The artifact is one file,
    the one verified: onnxruntime, given its bytes, looks for those files in the process's
    working directory and says so, which tells a user nothing. Asked only once a load has
    failed, so only an agent that has such a failure to explain imports the onnx package."""
    if b"location" not in data:  # the key every external data entry has
        return None
    import onnx

    try:
        graph = onnx.load_model_from_string(data).graph
    except Exception:  # noqa: BLE001 - not a model onnx reads either: onnxruntime's own words stand
        return None
    files = sorted(external_data_locations(graph))
    if not files:
        return None
    return (f"the model keeps its weights in ONNX external data ({', '.join(files)}), which an onnx artifact does not "
            "carry: it is one self-contained ONNX file, verified by its sha256; pack the model's folder into an onnx "
            "package (python -m orchestrator.artifacts.onnx_package pack MODEL_DIR OUT.tar) and give that as the "
            "artifact, or save the model with its weights inside (onnx.save_model(model, path, "
            "save_as_external_data=False)), which ONNX allows up to 2 GB")


def external_data_locations(graph: Any) -> dict[str, str]:
    """Each external data file a graph (an ``onnx.GraphProto``) names, with a tensor that
    names it: ``{location: tensor}``."""
    import onnx

    return {entry.value: tensor.name for tensor in _tensors(graph) if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data if entry.key == "location"}


def location_refusal(folder: pathlib.Path, location: str, tensor: str, where: str = "its package folder") -> str | None:
    """Why the external data file ``location``, which ``tensor`` of a graph in ``folder``
    (``where``, in a message) names, is not one onnxruntime may read there (None: it is): one
    outside the folder, by ``..``, an absolute path or a link, would be read although no
    sha256 covers it."""
    rel = pathlib.PurePosixPath(location)
    if not location or rel.is_absolute() or ".." in rel.parts or "\\" in location:
        return (f"the model's tensor {tensor!r} keeps its data in {location!r}, which is outside {where}: an external "
                "data location is a file name relative to the graph, in the same folder or below")
    target = folder / rel
    if not target.resolve().is_relative_to(folder.resolve()):
        return f"the model's tensor {tensor!r} keeps its data in {location!r}, which leads outside {where}"
    if not target.is_file():
        return f"the model's tensor {tensor!r} keeps its data in {location!r}, which {where} does not hold"
    return None


def _refuse_external_data_outside(path: pathlib.Path) -> None:
    """Refuse a graph naming an external data file that onnxruntime would read from outside
    its folder, or that is not there, before onnxruntime opens any. Read without its external
    data: only the graph's own bytes are parsed (the onnx package is imported only by agents
    that load packages)."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or whatever a file that is not ONNX raises
        raise errors.ModelLoadError(f"the package's graph {path.name} is not an ONNX model: {_short(exc)}") from None
    for location, tensor in sorted(external_data_locations(graph).items()):
        refusal = location_refusal(path.parent, location, tensor)
        if refusal is not None:
            raise errors.ModelLoadError(refusal)


def _tensors(graph: Any) -> Iterator[Any]:
    """Every tensor a graph holds: its initializers, and those of its nodes' attributes and subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _tensors(subgraph)


def _refuse_unless_tensors(session: ort.InferenceSession) -> None:
    """A model is served only if every input and output is a tensor (an input may be an
    optional one): the Open Inference Protocol has no datatype for onnxruntime's sequences
    and maps, and one given back would reach the caller as BYTES holding Python's text of it
    (``"{0: 0.2, 1: 0.8}"``)."""
    for kind, nodes in (("input", session.get_inputs()), ("output", session.get_outputs())):
        for node in nodes:
            if not node.type.startswith("tensor(") and not (kind == "input" and node.type.startswith("optional(tensor(")):
                hint = (" (skl2onnx gives a classifier's probabilities so unless it converts it with "
                        "options={id(model): {'zipmap': False}})") if node.type.startswith("seq(map(") else ""
                raise errors.ModelLoadError(
                    f"the model's {kind} {node.name!r} is {node.type}, not a tensor: the Open Inference Protocol "
                    f"carries tensors only; export the model with tensor {kind}s{hint}")


def _refuse_strings_in_and_bf16_out(session: ort.InferenceSession) -> None:
    """A BF16 output comes out of onnxruntime's Python API only from a run on OrtValues,
    which it cannot make of strings: a model that takes strings and answers BF16 could load
    and answer nothing but errors."""
    strings = [n.name for n in session.get_inputs() if n.type in ("tensor(string)", "optional(tensor(string))")]
    bf16 = [n.name for n in session.get_outputs() if n.type == "tensor(bfloat16)"]
    if strings and bf16:
        raise errors.ModelLoadError(
            f"the model takes strings ({', '.join(map(repr, strings))}) and answers BF16 ({', '.join(map(repr, bf16))}), "
            "which onnxruntime's Python API cannot run together: export the BF16 outputs as FP32 (a Cast)")


def _forget_model_bytes(session: ort.InferenceSession) -> None:
    """onnxruntime's Python session keeps the bytes it was made from for as long as it lives
    (its own comment: "This is bad as we're holding the memory indefinitely"), to make the
    session again on its fallback providers if one fails during a run. A session on the CPU
    alone would fall back to the CPU: nothing to make again, and the model file need not stay
    resident a second time beside the loaded weights (16 MB of an idle agent serving a 16 MB
    model). ``tests/agent/test_idle_imports.py`` checks that the bytes are let go."""
    session.disable_fallback()
    if getattr(session, "_model_bytes", None) is not None:  # private: a later onnxruntime may name it otherwise
        session._model_bytes = None


def _utf8_strings(array: np.ndarray, name: str) -> np.ndarray:
    """BYTES elements as the ``str`` that onnxruntime's string tensors take: UTF-8 text,
    whatever its characters (``astype(str)`` would decode ASCII only)."""
    try:
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in array.reshape(-1)],
                        dtype=object).reshape(array.shape)
    except UnicodeDecodeError as exc:
        raise errors.InvalidInput(f"input {name!r}: string tensors take UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 300 else text[:297] + "..."
