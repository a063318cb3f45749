"""What loading a model costs in memory, and the refusal of a load that does not fit.

The control plane places a model by the memory its manifest declares (``memoryMiB``, 512 MiB
unless said), not by what loading it costs on this machine; and a site's models, or a new
version loaded beside the one serving, may together need more than the machine, or the
container's cgroup limit, holds. A load that runs out of memory does not fail as a load: the
kernel's OOM killer ends the whole agent, every model it served with it, and the agent that
restarts loads the same saved set again. So the registry weighs each load against the memory
this agent has free (as the capacity probe measures it: the cgroup's limit less its working
set), and refuses that model alone, with the arithmetic, when it does not fit. Loads take
turns, so each is weighed after the one before has taken its share.

Requests in flight take memory too, up to their budget (``edge_agent.inflight``), and may
take it while a model loads: a load weighed against all that is free could be admitted with
memory the budget promises them, and the two together pass what the box holds. So a load
must fit beside what requests may hold while it runs: an explicit ``--max-inflight-bytes``
whole; the default budget, a share of what is free, is lowered for the load's time to that
share of what the load leaves, so that the default lets models load as large as before
(less 16 MiB) and requests are refused a little sooner while one does. Either way at least
what requests hold now.

What a load needs, measured with onnxruntime 1.32 and onnxruntime-genai 0.18 on the CPU (``/proc/self/status``, VmHWM):

- an ONNX file, loaded from the bytes the agent verified, peaked at 3.0 x its size (those
  bytes, the parsed protobuf, the session's tensors; a 400 MB file: 1,202 MB) and kept 1.0 x
  resident once loaded; an onnx package (a graph with its external data), loaded from its
  unpacked folder, peaked at 2.1 x the tar's size (100 MB: 210 MB, the check of its external
  data's locations included), and is weighed as a file of its folder's size all the same (3 x),
  erring high (the tar is gone once unpacked: the folder's files are what is counted);
- an onnxruntime-genai package, loaded from its unpacked folder, peaked at 1.2 x the folder's
  size (262 MB of weights: 316 MB). Its KV cache comes on top as sequences run, at most
  ``max_concurrent_sequences`` of them, each up to the context length: the whole of it is
  counted now, as placement counts it (docs/manifests.md), so that a model admitted here can
  run all its sequences (on the CPU: with CUDA the cache is in GPU memory).

Deciding is pure (:func:`refusal`); reading an unpacked package's config is the one I/O here.
"""

from __future__ import annotations

import json
import logging
import pathlib
from dataclasses import dataclass

from edgeplane_proto import kv_cache

log = logging.getLogger(__name__)

MB = 1 << 20
ONNX_LOAD_FACTOR = 3.0
GENAI_LOAD_FACTOR = 1.25
CONFIG_NAME = "genai_config.json"


@dataclass(frozen=True)
class Need:
    """Bytes a load needs, and how they were counted (for the refusal's message)."""

    bytes: int
    why: str


def onnx_need(file_bytes: int, *, package: bool = False) -> Need:
    """A ``package`` (a graph with its external data) is weighed as a file of its folder's
    size (``file_bytes``): the folder holds the graph and every external data file, so its
    weights are counted."""
    what = "package (its graph and external data)" if package else "file"
    return Need(int(ONNX_LOAD_FACTOR * file_bytes), f"3 x its {file_bytes / MB:.1f} MB {what}")


def genai_need(package_bytes: int, kv_bytes_per_token: int, context_length: int, sequences: int) -> Need:
    """The package's folder (``package_bytes``: its files) loaded, plus a full KV cache for
    each sequence it may run at once (none counted when its config does not say its shape)."""
    weights = int(GENAI_LOAD_FACTOR * package_bytes)
    kv = kv_bytes_per_token * context_length * sequences
    why = f"1.25 x its {package_bytes / MB:.1f} MB package"
    if kv:
        why += f", and {kv / MB:.1f} MB of KV cache for {sequences} sequence(s) of {context_length} tokens"
    return Need(weights + kv, why)


def refusal(need: Need, available: int | None, kept: int = 0) -> str | None:
    """Why a load of ``need`` is refused with ``available`` bytes free, ``kept`` of them for
    requests in flight while it loads (None: it fits, or what is free is not known)."""
    if available is None or need.bytes + kept <= available:
        return None
    return (f"{arithmetic(need, available, kept)}: not loaded, so that running out of memory does not end the agent and "
            f"every model it serves (free memory{', lower --max-inflight-bytes' if kept else ''}, or assign this model "
            f"to a larger site)")


def arithmetic(need: Need, available: int, kept: int = 0) -> str:
    """What a load needs beside what is available (a refusal's, or a replacement's, reason)."""
    of_them = f", {kept / MB:.1f} MB of them for requests in flight (--max-inflight-bytes)" if kept else ""
    return (f"needs about {need.bytes / MB:.1f} MB of memory to load ({need.why}), and {available / MB:.1f} MB are "
            f"available to this agent{of_them}")


def package_kv(folder: pathlib.Path) -> tuple[int, int]:
    """KV bytes per token and context length of a generative package, from the
    genai_config.json at the top of the ``folder`` it was unpacked into; (0, 0) when it
    cannot be read (the load that follows fails with its own reason)."""
    try:
        config = json.loads((folder / CONFIG_NAME).read_bytes())
        section = config.get("model", {})
        context = int(section.get("context_length") or config.get("search", {}).get("max_length") or 0)
        return kv_cache.bytes_per_token(config), context
    except (OSError, TypeError, ValueError, AttributeError) as exc:
        log.debug("cannot size the KV cache of %s: %s", folder, exc)
        return 0, 0
