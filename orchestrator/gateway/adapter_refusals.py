"""Ray Serve LLM's 500 for a LoRA adapter that is in the bucket but that it cannot load, told
apart from a replica's own fault.

Ray answers both alike, 500 ``Internal Server Error``, but its message goes on with the
exception its ``LLMServer`` raised (``get_response_for_error``: ``original exception:``, the
``RayTaskError``'s traceback), and two of them are the adapter's, which every replica meets
alike (they read the same bucket with the same ``llm.lora``):

- ``VLLMEngine.resolve_lora``'s ``ValueError: Failed to load lora model: <vLLM's reason>``:
  vLLM refused the adapter, for a rank above ``max_lora_rank`` (``LoRA rank 64 is greater
  than max_lora_rank 16.``: ``llm.lora.maxRank``) or weights made for another base model;
- an exception raised in ``LoraModelLoader._download_lora``: the adapter's files did not
  download. Ray's ``download_timeout_s`` bounds only the wait for the node's lock on the
  adapter's folder, which another request's download holds while it runs (the download itself
  has no time limit): a ``filelock`` ``Timeout`` says that download is still under way, and any
  other exception that the bucket did not answer, each of ``max_download_tries`` times. Neither
  says the adapter cannot load: a retry may find it downloaded.

:func:`cause` says which, in the gateway's words and with the status the caller gets (422
``adapter_not_loadable``, or 503 ``adapter_unavailable`` with a Retry-After of
:data:`RETRY_AFTER_S` for a download), from the first replica asked (:func:`told`); no other
replica is asked, and the replica is not counted as failing. The gateway cannot
know either sooner: it does not read the buckets, and the model card Ray makes from an
adapter's ``adapter_config.json`` (:mod:`orchestrator.gateway.adapter_lookup`) carries
neither its rank nor its base model. vLLM's reason is passed on with any bucket address or
path in it replaced, as the 404 for a missing adapter names no bucket.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from orchestrator.gateway import adapter_names

#: The stable code of the OpenAI error object a caller gets: no replica loads the adapter.
CODE = "adapter_not_loadable"
#: The code where the adapter's files did not download (yet): a retry may find them.
CODE_UNAVAILABLE = "adapter_unavailable"
#: The Retry-After of a 503 for an adapter whose files did not download (yet), seconds.
RETRY_AFTER_S = 10
#: The most of a replica's 500 read for a refusal (Ray's traceback is a few KiB): a longer one is the replica's own.
LONGEST_ANSWER = 256 * 1024
#: Where Ray's 500 message puts the exception it answers for (``get_response_for_error``).
_RAISED = "original exception: "
#: The last line of the traceback of ``VLLMEngine.resolve_lora``'s refusal (not its source line, indented).
_REFUSED = re.compile(r"^ValueError: Failed to load lora model: (.+)$", re.MULTILINE)
#: vLLM's refusal of an adapter of too high a rank (its worker manager, later its PEFT helper).
_RANK = re.compile(r"LoRA rank (\d+) is greater than max_lora_rank (\d+)")
#: A frame of Ray's LoRA loader downloading the adapter's folder.
_DOWNLOAD = re.compile(r'^\s*File "[^"\n]*", line \d+, in _download_lora$', re.MULTILINE)
#: ``filelock``'s refusal of the lock another download holds, last (its module varies by release).
_LOCK_WAIT = re.compile(r"^(?:[\w.]+\.)?Timeout: The file lock '[^'\n]*' could not be acquired", re.MULTILINE)
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s,'\"\])]+")
_PATH = re.compile(r"(?<![\w/.~-])/[^\s,'\"\])]+")
_LONGEST = 400


@dataclass(frozen=True)
class Refusal:
    """Why a replica could not load the adapter asked for, and what the caller gets."""

    status: int  # 422: no replica loads it; 503: its files did not download (yet), retry
    code: str
    why: str


def cause(answer: bytes) -> Refusal | None:
    """Why the adapter a replica's 500 ``answer`` is for cannot be loaded; None when the 500
    is not Ray Serve LLM's refusal of the adapter (the replica's own fault)."""
    try:
        message = json.loads(answer)["error"]["message"]
    except (ValueError, RecursionError, KeyError, TypeError):
        return None
    if not isinstance(message, str) or _RAISED not in message:
        return None
    raised = message.split(_RAISED, 1)[1]
    if refusals := _REFUSED.findall(raised):
        reason = refusals[-1].strip()
        if (rank := _RANK.search(reason)) is not None:
            return Refusal(422, CODE, f"its rank {rank[1]} is above the model's llm.lora.maxRank {rank[2]}")
        said = _PATH.sub("<its local copy>", _URI.sub("<its bucket>", reason))
        if len(said) > _LONGEST:
            said = said[:_LONGEST] + "..."
        return Refusal(422, CODE, f"the engine refused it: {said} (an adapter trained on another base model is refused so)")
    if _DOWNLOAD.search(raised):
        if _LOCK_WAIT.search(raised):
            return Refusal(503, CODE_UNAVAILABLE, "its files are still downloading on the replica's node, for another request, "
                                                  "past llm.lora.downloadTimeoutSeconds x downloadAttempts")
        return Refusal(503, CODE_UNAVAILABLE, "its files could not be downloaded from the model's llm.lora.adaptersFrom "
                                              "in llm.lora.downloadAttempts tries")
    return None


def told(named: adapter_names.Named, refusal: Refusal) -> str:
    """What a caller of ``named``'s adapter is told when :func:`cause` gives ``refusal``."""
    if refusal.status == 503:
        return (f"adapter {named.adapter!r} of model {named.name!r} cannot be loaded now: {refusal.why}; "
                f"retry after {RETRY_AFTER_S} s")
    return (f"adapter {named.adapter!r} of model {named.name!r} cannot be loaded: {refusal.why}; no replica of the model loads it, "
            f"so ask for another adapter, or {named.name!r} for the base model")
