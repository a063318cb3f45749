"""What a caller gives the Python client (:mod:`orchestrator.client`), checked before
anything is sent: a ``ValueError`` (``TypeError`` for a wrong type) names what cannot work;
and the caller's position and residency as the gateway and the endpoint list take them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgeplane_proto import correlation, oip, oip_tensors
from orchestrator import header_text, urlpath

#: The longest ``timeout`` a client takes, in seconds (a year): past some 10^10 s the
#: operating system's clock cannot hold the deadline.
MAX_TIMEOUT_S = 365 * 86400.0


def caller_headers(location: tuple[float, float] | None, region: str | None, residency: str | None) -> dict[str, str]:
    headers = {}
    if location is not None:
        headers["x-edgeplane-location"] = f"{location[0]},{location[1]}"
    if region:
        headers["x-edgeplane-region"] = header_text.encoded(region)  # a region in any script (orchestrator.header_text)
    if residency:
        headers["x-edgeplane-residency"] = residency
    return headers


def endpoint_params(location: tuple[float, float] | None, region: str | None, residency: str | None) -> dict[str, str]:
    params = {}
    if location is not None:
        params.update(lat=str(location[0]), lon=str(location[1]))
    if region:
        params["region"] = region
    if residency:
        params["residency"] = residency
    return params


def servers(server: str | Sequence[str]) -> list[str]:
    urls = [server] if isinstance(server, str) else list(server) if isinstance(server, Sequence) else []
    if not urls or not all(isinstance(u, str) and u for u in urls):
        raise ValueError("give the gateway's URL, or a list of gateway URLs")
    for url in urls:
        problem = urlpath.base_url_problem(url)
        if problem is not None:
            raise ValueError(f"server {urlpath.redacted(url)!r} is not a URL such as http://127.0.0.1:8080 ({problem})")
    return [u.rstrip("/") for u in urls]


def header_value(value: str | None, name: str, *, text: bool = False) -> str | None:
    """``region`` or ``residency`` as it travels in a header and a query: printable ASCII, or
    with ``text`` (a region) any one line of text, which :func:`caller_headers` encodes."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, not {type(value).__name__}")
    if text:
        if not header_text.one_line(value):
            raise ValueError(f"{name} {value!r}: {header_text.NOT_ONE_LINE}")
    elif not header_text.printable_ascii(value):
        raise ValueError(f"{name} {value!r}: {header_text.NOT_ASCII}")
    return value.strip() or None


def position(location: Any) -> tuple[float, float] | None:
    if location is None:
        return None
    if isinstance(location, (str, bytes)) or not isinstance(location, (Sequence, np.ndarray)) or len(location) != 2:
        raise TypeError(f"location must be a (lat, lon) pair of numbers, not {location!r}")
    lat, lon = location
    if not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in (lat, lon)):
        raise TypeError(f"location must be a (lat, lon) pair of numbers, not {location!r}")
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):  # NaN fails both
        raise ValueError(f"location {location!r} is outside -90..90, -180..180")
    return float(lat), float(lon)


def seconds(timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds, not {timeout!r}")
    if not 0 < timeout <= MAX_TIMEOUT_S:  # NaN fails too
        raise ValueError(f"timeout {timeout!r}: give more than 0 and at most {MAX_TIMEOUT_S:g} seconds")
    return float(timeout)


def count(value: Any, name: str, unit: str) -> int:
    """``value``, the argument ``name``, as a whole number of ``unit`` (bytes, connections), 1 or more."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a whole number of {unit}, not {value!r}")
    if value < 1:
        raise ValueError(f"{name} {value!r}: give a whole number of {unit}, 1 or more")
    return int(value)


def request_id(value: Any) -> str:
    """The ``X-Request-Id`` a call goes by: the caller's, or a new one (None). One that a
    replica or gateway would not keep (``edgeplane_proto.correlation``) is refused here,
    rather than replaced on the way, where the caller would not find its own id."""
    if value is None:
        return correlation.new_request_id()
    if not isinstance(value, str):
        raise TypeError(f"request_id must be a string, not {type(value).__name__}")
    if correlation.request_id(value) is None:
        raise ValueError(f"request_id {value[:140]!r}: give 1 to {correlation.MAX_LENGTH} characters of letters, digits "
                         "and -_.:+/= (a UUID, say)")
    return value


def model_name(model: Any) -> str:
    if not isinstance(model, str):
        raise TypeError(f"model must be a string, not {type(model).__name__}")
    if not model:
        raise ValueError("model must name a model; it is empty")
    return model


def check_messages(messages: Any) -> None:
    if (isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages
            or not all(isinstance(m, Mapping) for m in messages)):
        raise TypeError('messages must be a non-empty list of {"role": ..., "content": ...} mappings')


def tensors(inputs: Any) -> Mapping[str, np.ndarray] | Sequence[oip.Tensor]:
    """The request's tensors, each with a dtype the v2 protocol names; a ``ValueError``
    naming the input otherwise (the protocol has no complex numbers or dates, and an object
    array is sent as strings only when it holds strings or bytes)."""
    if isinstance(inputs, Mapping):
        tensors = {}
        for name, value in inputs.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"input names must be non-empty strings, not {name!r}")
            try:
                tensors[name] = np.asarray(value)
            except ValueError as exc:  # ragged nested lists
                raise ValueError(f"input {name!r}: not an array: {exc}") from None
        pairs = list(tensors.items())
    elif isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)) and all(isinstance(t, oip.Tensor) for t in inputs):
        tensors = inputs
        pairs = [(t.name, np.asarray(t.array)) for t in inputs]
    else:
        raise TypeError("inputs must be a mapping of input name to array, or a list of oip.Tensor")
    if not pairs:
        raise ValueError("give at least one input")
    for name, array in pairs:
        try:
            datatype = oip_tensors.datatype_of(array)
        except oip.ProtocolError as exc:
            raise ValueError(f"input {name!r}: {exc} (v2 datatypes: BOOL, INT8-64, UINT8-64, FP16-64, BF16 as ml_dtypes.bfloat16, BYTES)") from None
        if datatype == "BYTES" and array.dtype.kind == "O" and not all(isinstance(v, (str, bytes)) for v in array.reshape(-1)):
            odd = next(v for v in array.reshape(-1) if not isinstance(v, (str, bytes)))
            raise ValueError(f"input {name!r}: an object array is sent as BYTES and must hold str or bytes, not {type(odd).__name__}")
    return tensors
