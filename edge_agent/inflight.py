"""The memory requests in flight may hold, all together, and the refusal of one more.

Each request body is bounded (``--max-request-bytes``), but not how many are held at once:
the runs running and queued (66 on a 2-core box), the requests read ahead on each
connection, and bodies still arriving on others; and a JSON body takes many times its size
while it is decoded (a 60 MB body of INT64 values peaked at 1.17 GB and left a 240 MB
array). On a small edge box a burst of large requests was enough for the kernel's OOM killer
to end the agent and every model it serves. So every request is charged, against one
budget, the memory it will hold, as soon as that is known, and one that would pass the
budget is refused at once (503 with Retry-After, gRPC ``RESOURCE_EXHAUSTED``), never held
waiting for room; one larger than the whole budget gets a 413 that says so. What is charged:

- over HTTP, the body: from ``Content-Length`` before a byte of it is read (a client that
  sent ``Expect: 100-continue`` sends none of a refused body), or as a chunked body
  arrives; a compressed body's inflated bytes too, as it inflates: each piece (64 KiB, then
  twice the one before, up to 1 MiB) before it is made, at twice its most for zlib's buffers
  and the piece, and the pieces' join once more while it is made, so that a burst of small
  bodies that inflate to large ones is refused as they grow, not once they are whole;
- the decoding of a v2 JSON part (:func:`json_decode_bytes`): an upper bound from its
  length alone, since what a document holds is only known once it is parsed, when the
  memory is already taken;
- the decoding of an OpenAI body on ``/v1`` (:func:`openai_decode_bytes`), likewise, and
  formatting and tokenizing its prompt (:func:`prompt_bytes`), before it is tokenized, the
  tokens then kept;
- over gRPC, the message twice (gRPC's bytes and the parsed message) and, for values sent
  as typed ``contents`` instead of raw bytes, what each becomes on its way to an array.

A request's charge is given back once its answer is written or it fails (the client gone,
bad input, the model's error), and a run still under way on a worker keeps its request's
charge until it ends, as does a ``/v1`` body's decoding or a prompt's tokenizing there. The bookkeeping is the event loop's alone, so it takes no lock: a
charge is an addition and a comparison on the path of every request.

Measured (``/proc/self/status`` VmHWM over the decode, this release's codec): a JSON part
peaks at 1.3 x its length for random FP32 values, 6 x for short ones (``0.5``), 21 x for
one-digit integers (a Python int and a list slot per two characters) and up to 51 x for
single values nested in lists of their own (``[[[1]]]``, a list per two characters):
:data:`JSON_DECODE_FACTOR` takes the worst. A gRPC message's typed values peaked at 27
bytes each for INT64 and 62 for BYTES, raw contents at 2 x the message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MB = 1 << 20

#: Of the memory the agent has free (as ``capacity`` measures it: cgroup-aware), the share
#: requests in flight may hold by default; the rest is for the runs themselves (activations,
#: answers) and the models' loads, which are weighed against what is free when they start.
DEFAULT_SHARE = 0.5
#: The default is never less than this, so that a box whose free memory reads low still
#: answers ordinary requests.
MIN_DEFAULT_BYTES = 16 * MB
#: What decoding a JSON part may take, at most, per byte of it (see above).
JSON_DECODE_FACTOR = 52
#: A JSON part this short decodes within about 100 KB, and at most one per worker is decoded
#: at a time: not charged (the head of binary tensors is such a part, 150 bytes or so).
JSON_FREE_MAX_BYTES = 2048
#: An OpenAI chat or completion body (``/v1``) decodes to many times its length too: up to
#: 48 x measured for single values nested in lists (the same bound as a v2 part, then), 9 x
#: for a prompt with a character past U+FFFF, 2 x for plain text. Past the values such a
#: body may hold (``openai_api.MAX_BODY_VALUES``, 2^18, each under 128 bytes decoded) only
#: its strings grow with it: a long prompt is charged this per byte, and those values once.
OPENAI_STRING_FACTOR = 10
OPENAI_VALUES_BYTES = (1 << 18) * 128
#: What formatting and tokenizing a ``/v1`` prompt takes, per byte of its text in UTF-8 (a
#: chat's messages with what their template writes around them), beyond its body's charge:
#: onnxruntime-genai's tokenizer holds about 30 bytes a token while it works, in memory
#: Python's allocator never sees, and a byte-level vocabulary makes a token of each byte of
#: text it has no merge for (characters past U+FFFF, rare scripts). Measured (``VmHWM`` over
#: formatting and tokenizing, the tiny byte-level BPE of ``orchestrator.testing.genai_model``):
#: 13 x for plain text, 37 x for ASCII with no merge, 33 x for a completion of characters
#: past U+FFFF, 42 x for a chat of them (the template's JSON escapes them 12 bytes each; a
#: 4 MiB body of them took 161 MB where it was charged 74) and the most, 46-47 x, for a chat
#: of ASCII control characters (escaped 6 bytes each). Given back once the prompt is tokens,
#: but for the tokens.
PROMPT_BYTE_FACTOR = 48
#: What a gRPC value sent in typed ``contents`` may take on its way to an array.
GRPC_VALUE_BYTES = 64
#: Seconds a refused client is told to wait: requests in flight usually end within it.
RETRY_AFTER_S = 1


def default_limit(available: int | None) -> int | None:
    """The budget when ``--max-inflight-bytes`` is not given: :data:`DEFAULT_SHARE` of the
    memory the agent has free (None: not measured, no bound)."""
    if available is None:
        return None
    return max(MIN_DEFAULT_BYTES, int(available * DEFAULT_SHARE))


def limit(configured: int, available: int | None, loading: int = 0) -> int | None:
    """The budget: ``--max-inflight-bytes`` (``configured``) when given, else the default
    share of what is free (``available``, what requests hold counted in) beside the loads
    under way (``loading`` bytes: see ``edge_agent.footprint``)."""
    if configured:
        return configured
    return default_limit(None if available is None else max(0, available - loading))


def json_decode_bytes(length: int) -> int:
    """What decoding a v2 JSON part of ``length`` bytes may take beyond the part itself."""
    return 0 if length <= JSON_FREE_MAX_BYTES else JSON_DECODE_FACTOR * length


def openai_decode_bytes(length: int) -> int:
    """What decoding a /v1 body of ``length`` bytes may take beyond the body itself."""
    if length <= JSON_FREE_MAX_BYTES:
        return 0
    return min(JSON_DECODE_FACTOR * length, OPENAI_STRING_FACTOR * length + OPENAI_VALUES_BYTES)


def prompt_bytes(utf8_bytes: int) -> int:
    """What formatting and tokenizing a /v1 prompt of ``utf8_bytes`` may take; as a JSON part,
    nothing for a short one."""
    return 0 if utf8_bytes <= JSON_FREE_MAX_BYTES else PROMPT_BYTE_FACTOR * utf8_bytes


@dataclass(frozen=True)
class Refused:
    """Why a charge was refused: 503 (the budget is held by other requests: retry) or 413
    (more than the whole budget), with the message a client reads."""

    status: int
    message: str
    code: str  # OpenAI's machine-readable code, for a refusal under /v1

    @property
    def retry_after(self) -> int | None:
        return RETRY_AFTER_S if self.status == 503 else None


class Budget:
    """Bytes held by requests in flight, against ``limit`` (None: no bound, as for the
    gateway's use of the same HTTP server). One event loop's."""

    def __init__(self, limit: int | None = None) -> None:
        self._cap: float = math.inf
        self.limit: int | None = None
        self.held = 0
        self.refused_busy = 0  # 503s: the requests in flight held the budget
        self.refused_too_large = 0  # 413s: more than the whole budget
        self.resize(limit)

    def resize(self, limit: int | None) -> None:
        """A new limit; requests holding more than it keep what they hold, and newcomers are
        refused until what is held fits under it."""
        self.limit = limit
        self._cap = math.inf if limit is None else limit

    def take(self, n: int, what: str) -> Hold | Refused:
        """A hold of ``n`` bytes for a new request, or why not (counted). ``what``: how the
        bytes were counted, for the 413's message."""
        if self.held + n <= self._cap:  # (charge's, inlined: this is every request's)
            self.held += n
            return Hold(self, n)
        return self._refuse(n, n, what)

    def charge(self, n: int, total: int, what: str) -> Refused | None:
        """Hold ``n`` bytes more for a request that will then hold ``total``; or why not
        (counted, and nothing held)."""
        if self.held + n <= self._cap:
            self.held += n
            return None
        return self._refuse(n, total, what)

    def _refuse(self, n: int, total: int, what: str) -> Refused:
        if total > self._cap:
            self.refused_too_large += 1
            return Refused(413, f"this request needs about {total / MB:.1f} MB of memory ({what}), more than this agent "
                                f"lets all requests in flight hold together ({self._cap / MB:.1f} MB, --max-inflight-bytes)",
                           "request_too_large")
        self.refused_busy += 1
        return Refused(503, f"requests in flight hold {self.held / MB:.1f} MB of the {self._cap / MB:.1f} MB this agent "
                            f"lets them hold (--max-inflight-bytes), and this one needs {n / MB:.1f} MB more; retry later",
                       "server_busy")


class Hold:
    """What one request holds of its budget. Given back once its last holder lets go: the
    server, once the answer is written or the request failed, and a run under way on a
    worker (:meth:`pin`), once it ends."""

    __slots__ = ("_budget", "bytes", "_holders")

    def __init__(self, budget: Budget, n: int) -> None:
        self._budget = budget
        self.bytes = n
        self._holders = 1

    def grow(self, n: int, what: str) -> Refused | None:
        """Charge ``n`` bytes more (a chunked body's next bytes, a JSON part's decoding); on a
        refusal the hold keeps what it had, to be released as usual. ``what``: how the
        request's bytes were counted, all of them, for the 413's message. Once given back, the
        hold charges nothing more: its request is ending."""
        if not self._holders:
            return None
        refused = self._budget.charge(n, self.bytes + n, what)
        if refused is None:
            self.bytes += n
        return refused

    def shrink(self, n: int) -> None:
        """Give ``n`` of the bytes held back before the request ends (a piece of an inflated
        body came out smaller than charged)."""
        if self._holders:
            n = min(n, self.bytes)
            self.bytes -= n
            self._budget.held -= n

    def pin(self) -> None:
        self._holders += 1

    def release(self) -> None:
        if not self._holders:
            return  # released already: counted once
        self._holders -= 1
        if not self._holders:
            self._budget.held -= self.bytes
            self.bytes = 0


class Inflating:
    """A compressed body's inflation charged to its request's hold, piece by piece
    (``edgeplane_proto.encoding.Meter``)."""

    __slots__ = ("_hold",)

    def __init__(self, hold: Hold) -> None:
        self._hold = hold

    def charge(self, n: int) -> Refused | None:
        return self._hold.grow(n, "its body, inflated")

    def give_back(self, n: int) -> None:
        self._hold.shrink(n)
