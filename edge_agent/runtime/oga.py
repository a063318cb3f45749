"""onnxruntime-genai through its C API, with the GIL released while it computes.

onnxruntime-genai's Python binding keeps the GIL for the whole of every call: loading a
model (0.4 s for SmolLM2-135M here, tens of seconds for a model of billions of parameters),
a prompt's prefill and each ``generate_next_token`` (16 ms a step for SmolLM2 on this
machine). Nothing else in the process runs meanwhile: an agent serving a chat model and a
task model answers the task model's requests only between two steps of a generation, and
an agent loading a large model sends no heartbeat until the load ends, so the control plane
declares it lost. The library's C API (``ort_genai_c.h``, exported by the
``libonnxruntime-genai.so`` the wheel ships) is the same code; called through ctypes, the
calls that compute release the GIL like any blocking call, and the short ones (reading a
token, decoding one token's text) keep it, so they cost no GIL hand-over.

The wrappers own their handles and free them when they are closed or collected;
``runtime.genai`` closes a generation's generator (its KV cache) and tokenizer stream as the
generation ends, and generator parameters go as soon as their generator is made. Errors (an
``OgaResult``) become :class:`OgaError` with the library's message.
"""

from __future__ import annotations

import ctypes
import functools
import json
import pathlib
import time
import weakref
from collections.abc import Iterable
from typing import Any

import numpy as np

from edge_agent import runtime

_P = ctypes.c_void_p
_OUT = ctypes.POINTER(ctypes.c_void_p)
_I32 = ctypes.POINTER(ctypes.c_int32)
_RESULT = _P  # OgaResult*: NULL when the call succeeded

#: Calls that compute (load, tokenize a prompt, prefill, a step): the GIL is released.
_RELEASING: dict[str, tuple[Any, list[Any]]] = {
    "OgaCreateConfig": (_RESULT, [ctypes.c_char_p, _OUT]),
    "OgaCreateModelFromConfig": (_RESULT, [_P, _OUT]),
    "OgaCreateTokenizer": (_RESULT, [_P, _OUT]),
    "OgaTokenizerEncode": (_RESULT, [_P, ctypes.c_char_p, _P]),
    "OgaTokenizerApplyChatTemplate": (_RESULT, [_P, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_bool, _OUT]),
    "OgaCreateGenerator": (_RESULT, [_P, _P, _OUT]),
    "OgaGenerator_AppendTokens": (_RESULT, [_P, _I32, ctypes.c_size_t]),
    "OgaGenerator_GetLogits": (_RESULT, [_P, _OUT]),
    "OgaDestroyGenerator": (None, [_P]),  # frees the KV cache
    "OgaDestroyModel": (None, [_P]),
}

#: Calls that only read or free a little: the GIL is kept (no hand-over per token).
_HOLDING: dict[str, tuple[Any, list[Any]]] = {
    "OgaResultGetError": (ctypes.c_char_p, [_P]),
    "OgaDestroyResult": (None, [_P]),
    "OgaDestroyString": (None, [_P]),
    "OgaConfigOverlay": (_RESULT, [_P, ctypes.c_char_p]),
    "OgaConfigClearProviders": (_RESULT, [_P]),
    "OgaConfigAppendProvider": (_RESULT, [_P, ctypes.c_char_p]),
    "OgaDestroyConfig": (None, [_P]),
    "OgaDestroyTokenizer": (None, [_P]),
    "OgaTokenizerGetEosTokenIds": (_RESULT, [_P, ctypes.POINTER(_I32), ctypes.POINTER(ctypes.c_size_t)]),
    "OgaTokenizerDecode": (_RESULT, [_P, _I32, ctypes.c_size_t, _OUT]),
    "OgaCreateTokenizerStream": (_RESULT, [_P, _OUT]),
    "OgaDestroyTokenizerStream": (None, [_P]),
    "OgaCreateSequences": (_RESULT, [_OUT]),
    "OgaSequencesGetSequenceCount": (ctypes.c_size_t, [_P, ctypes.c_size_t]),
    "OgaSequencesGetSequenceData": (_I32, [_P, ctypes.c_size_t]),
    "OgaDestroySequences": (None, [_P]),
    "OgaCreateGeneratorParams": (_RESULT, [_P, _OUT]),
    "OgaGeneratorParamsSetSearchNumber": (_RESULT, [_P, ctypes.c_char_p, ctypes.c_double]),
    "OgaGeneratorParamsSetSearchBool": (_RESULT, [_P, ctypes.c_char_p, ctypes.c_bool]),
    "OgaDestroyGeneratorParams": (None, [_P]),
    "OgaTensorGetType": (_RESULT, [_P, ctypes.POINTER(ctypes.c_int)]),
    "OgaTensorGetShapeRank": (_RESULT, [_P, ctypes.POINTER(ctypes.c_size_t)]),
    "OgaTensorGetShape": (_RESULT, [_P, ctypes.POINTER(ctypes.c_int64), ctypes.c_size_t]),
    "OgaTensorGetData": (_RESULT, [_P, _OUT]),
    "OgaDestroyTensor": (None, [_P]),
}

#: The calls made for every token, without ``argtypes``: ctypes then passes the arguments as
#: they are instead of converting each (0.2 against 0.5 us for ``GetNextTokens`` here), so
#: callers give them only ctypes objects made beforehand (handles, ``byref``s) and Python
#: ints for ``int32_t``. ``(restype, GIL released)``.
_PER_TOKEN: dict[str, tuple[Any, bool]] = {
    "OgaGenerator_GenerateNextToken": (_RESULT, True),  # (OgaGenerator*)
    "OgaGenerator_IsDone": (ctypes.c_bool, False),  # (OgaGenerator*)
    "OgaGenerator_GetNextTokens": (_RESULT, False),  # (OgaGenerator*, const int32_t** out, size_t* out_count)
    "OgaTokenizerStreamDecode": (_RESULT, False),  # (OgaTokenizerStream*, int32_t token, const char** out)
}

#: A model whose steps take less than this keeps the GIL through them: handing it to another
#: thread and taking it back costs more than such a step (``bench.genai_agent``'s ``tiny``
#: model, 20 us a step, streamed at half the rate when each step released it).
HOLD_GIL_BELOW_S = 100e-6

#: ``OgaElementType`` values of the logits this module reads.
_FLOAT32, _FLOAT16 = 1, 10


class OgaError(RuntimeError):
    """A call into onnxruntime-genai failed; the message is the library's."""


class _Api:
    def __init__(self, path: str) -> None:
        releasing, holding = ctypes.CDLL(path), ctypes.PyDLL(path)  # one library, loaded once
        for lib, table in ((releasing, _RELEASING), (holding, _HOLDING)):
            for name, (restype, argtypes) in table.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
                setattr(self, name, fn)
        self.hot: dict[str, Any] = {}  # per-token calls, by name (``_PER_TOKEN``)
        for name, (restype, releases) in _PER_TOKEN.items():
            fn = (releasing if releases else holding)[name]  # [] makes a function of its own
            fn.restype = restype
            self.hot[name] = fn
        # The same step keeping the GIL, for models of very short steps (HOLD_GIL_BELOW_S).
        self.step_holding = holding["OgaGenerator_GenerateNextToken"]
        self.step_holding.restype = _RESULT

    def check(self, result: int | None) -> None:
        if result:
            message = self.OgaResultGetError(result)
            self.OgaDestroyResult(result)
            raise OgaError((message or b"onnxruntime-genai failed").decode("utf-8", "replace"))

    def take_string(self, pointer: int | None) -> str:
        """A string the library allocated for the caller, copied and freed."""
        if not pointer:
            return ""
        try:
            return ctypes.string_at(pointer).decode("utf-8", "replace")
        finally:
            self.OgaDestroyString(pointer)


@functools.cache
def api() -> Any:
    """The C API of the installed onnxruntime-genai. Importing its Python package first finds
    and loads onnxruntime for it; the C library is the one that package already loaded."""
    import onnxruntime_genai

    folder = pathlib.Path(onnxruntime_genai.__file__).parent
    found = [path for pattern in runtime.GENAI_LIBRARIES for path in sorted(folder.glob(pattern))]
    if not found:
        raise OSError(f"the installed onnxruntime-genai has no libonnxruntime-genai.so in {folder}")
    return _Api(str(found[0]))


def cuda_built() -> bool:
    """Whether the installed onnxruntime-genai was built with CUDA (``onnxruntime-genai-cuda``)."""
    import onnxruntime_genai

    return bool(onnxruntime_genai.is_cuda_available())


class _Handle:
    """An owned pointer, freed by ``destroy`` once: on :meth:`close` or when collected."""

    def __init__(self, pointer: ctypes.c_void_p, destroy: Any) -> None:
        self.ptr = pointer
        self._finalizer = weakref.finalize(self, destroy, pointer)

    def close(self) -> None:
        self._finalizer()


def _create(creator: Any, *args: Any) -> ctypes.c_void_p:
    out = ctypes.c_void_p()
    api().check(creator(*args, ctypes.byref(out)))
    return out


class Model(_Handle):
    """A model and its tokenizer, loaded from a folder with ``genai_config.json``."""

    def __init__(self, directory: pathlib.Path, overlay: dict[str, Any] | None = None,
                 providers: Iterable[str] = ()) -> None:
        a = api()
        config = _create(a.OgaCreateConfig, str(directory).encode())
        try:
            if overlay:
                a.check(a.OgaConfigOverlay(config, json.dumps(overlay).encode()))
            a.check(a.OgaConfigClearProviders(config))
            for provider in providers:
                a.check(a.OgaConfigAppendProvider(config, provider.encode()))
            super().__init__(_create(a.OgaCreateModelFromConfig, config), a.OgaDestroyModel)
        finally:
            a.OgaDestroyConfig(config)
        self.tokenizer = Tokenizer(self)
        self.step_s: float | None = None  # a moving average of a step's duration, from the first step on


class Tokenizer(_Handle):
    def __init__(self, model: Model) -> None:
        a = api()
        super().__init__(_create(a.OgaCreateTokenizer, model.ptr), a.OgaDestroyTokenizer)

    @functools.cached_property
    def eos_token_ids(self) -> frozenset[int]:
        ids, count = _I32(), ctypes.c_size_t()
        api().check(api().OgaTokenizerGetEosTokenIds(self.ptr, ctypes.byref(ids), ctypes.byref(count)))
        return frozenset(ids[i] for i in range(count.value))

    def encode(self, text: str) -> np.ndarray:
        a = api()
        sequences = _create(a.OgaCreateSequences)
        try:
            a.check(a.OgaTokenizerEncode(self.ptr, text.encode(), sequences))
            count = a.OgaSequencesGetSequenceCount(sequences, 0)
            data = a.OgaSequencesGetSequenceData(sequences, 0)
            return np.ctypeslib.as_array(data, shape=(count,)).copy() if count else np.zeros(0, np.int32)
        finally:
            a.OgaDestroySequences(sequences)

    def decode(self, tokens: np.ndarray) -> str:
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        out = ctypes.c_void_p()
        api().check(api().OgaTokenizerDecode(self.ptr, tokens.ctypes.data_as(_I32), tokens.size, ctypes.byref(out)))
        return api().take_string(out.value)

    def apply_chat_template(self, messages_json: str, add_generation_prompt: bool = True) -> str:
        out = ctypes.c_void_p()
        api().check(api().OgaTokenizerApplyChatTemplate(self.ptr, None, messages_json.encode(), None, add_generation_prompt,
                                                        ctypes.byref(out)))
        return api().take_string(out.value)


class TokenizerStream(_Handle):
    """Turns tokens into text one at a time, holding back bytes of an unfinished character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        a = api()
        super().__init__(_create(a.OgaCreateTokenizerStream, tokenizer.ptr), a.OgaDestroyTokenizerStream)
        self._decode = a.hot["OgaTokenizerStreamDecode"]
        self._out = ctypes.c_char_p()  # owned by the stream, valid until its next call
        self._out_ref = ctypes.byref(self._out)

    def decode(self, token: int) -> str:
        result = self._decode(self.ptr, int(token), self._out_ref)
        if result:
            api().check(result)
        return (self._out.value or b"").decode("utf-8", "replace")


class Generator(_Handle):
    """One sequence being generated, with its own KV cache. ``search`` are onnxruntime-genai's
    search options (``max_length``, ``do_sample``, ``temperature``, ...)."""

    def __init__(self, model: Model, search: dict[str, float | int | bool]) -> None:
        self._model = model
        a = api()
        params = _create(a.OgaCreateGeneratorParams, model.ptr)
        try:
            for name, value in search.items():
                if isinstance(value, bool):
                    a.check(a.OgaGeneratorParamsSetSearchBool(params, name.encode(), value))
                else:
                    a.check(a.OgaGeneratorParamsSetSearchNumber(params, name.encode(), float(value)))
            super().__init__(_create(a.OgaCreateGenerator, model.ptr, params), a.OgaDestroyGenerator)
        finally:
            a.OgaDestroyGeneratorParams(params)
        self._step, self._step_holding = a.hot["OgaGenerator_GenerateNextToken"], a.step_holding
        self._is_done, self._get_next = a.hot["OgaGenerator_IsDone"], a.hot["OgaGenerator_GetNextTokens"]
        self._tokens, self._count = _I32(), ctypes.c_size_t()
        self._next_refs = (ctypes.byref(self._tokens), ctypes.byref(self._count))

    def append_tokens(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        api().check(api().OgaGenerator_AppendTokens(self.ptr, tokens.ctypes.data_as(_I32), tokens.size))

    def is_done(self) -> bool:
        return self._is_done(self.ptr)

    def generate_next_token(self) -> None:
        model = self._model
        average = model.step_s
        step = self._step_holding if average is not None and average < HOLD_GIL_BELOW_S else self._step
        started = time.perf_counter()
        result = step(self.ptr)
        took = time.perf_counter() - started
        if result:
            api().check(result)
        model.step_s = took if average is None else average + (took - average) / 8

    def next_token(self) -> int:
        result = self._get_next(self.ptr, *self._next_refs)
        if result:
            api().check(result)
        if not self._count.value:
            raise OgaError("the generator has no next token")
        return self._tokens[0]

    def logits(self) -> np.ndarray:
        """The scores the next step draws its token from, as float32 (a copy)."""
        a = api()
        tensor = _create(a.OgaGenerator_GetLogits, self.ptr)
        try:
            kind, rank = ctypes.c_int(), ctypes.c_size_t()
            a.check(a.OgaTensorGetType(tensor, ctypes.byref(kind)))
            a.check(a.OgaTensorGetShapeRank(tensor, ctypes.byref(rank)))
            shape = (ctypes.c_int64 * rank.value)()
            a.check(a.OgaTensorGetShape(tensor, shape, rank.value))
            data = ctypes.c_void_p()
            a.check(a.OgaTensorGetData(tensor, ctypes.byref(data)))
            dtype = {_FLOAT32: np.float32, _FLOAT16: np.float16}.get(kind.value)
            if dtype is None:
                raise OgaError(f"logits of element type {kind.value} are not supported")
            size = int(np.prod(list(shape), dtype=np.int64))
            if not size:
                return np.zeros(tuple(shape), np.float32)
            view = (ctypes.c_char * (size * np.dtype(dtype).itemsize)).from_address(data.value)
            return np.frombuffer(view, dtype=dtype).astype(np.float32).reshape(tuple(shape))  # the one copy
        finally:
            a.OgaDestroyTensor(tensor)
