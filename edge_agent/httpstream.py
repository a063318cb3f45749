"""Streamed answers: the response type, its chunk framing, and a stream's socket lent to
the thread that makes its items.

The HTTP server (``edge_agent.httpserver``) sends a :class:`StreamingResponse` and lends its
socket while it waits for the stream's next item; what may then happen on another thread is
kept here, apart from connection handling. ``httpserver`` re-exports these names, and
handlers take them from there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamingResponse:
    """A response whose body is produced while it is sent (server-sent events).

    It goes out with ``transfer-encoding: chunked``, one chunk per item of ``chunks``, each
    written as soon as it is produced (no buffering) and only once the transport has room
    (a client that does not read holds the producer back instead of growing our buffers).
    When the client goes away the iterator is closed at once (``aclose``: its ``finally``
    blocks run), which is how a generation learns that nobody is listening any more.
    """

    status: int
    chunks: AsyncIterator[bytes]
    content_type: str = "text/event-stream"
    headers: tuple[tuple[str, str], ...] = field(default=())
    # Called once the head is out with the stream's Passthrough, for a producer whose
    # items are made on another thread.
    passthrough: Callable[[Passthrough], None] | None = None


class Passthrough:
    """A stream's socket, lent to the thread that produces its items while the server waits
    for the next item and has nothing of the stream buffered.

    Handing each item to the event loop costs a wake-up of the loop per item, and with a
    producer that holds the GIL through its work (onnxruntime-genai's step did, through its
    Python binding) that wake-up is a hand-over of the interpreter between two threads:
    measured, that was most of what a streamed generation lost against a bare generation
    loop. With a Passthrough the
    producing thread writes an item as one chunk with one non-blocking ``send``, and the
    loop is not involved at all.

    :meth:`send` is called with :attr:`lock` held, so that a producer can decide atomically
    between sending an item here and queueing it for the loop. It returns False when the
    item was not taken: the socket is not lent (the server is writing, the transport holds
    unsent bytes, the connection is closing), or the client's buffer is full. The item then
    goes through the stream as usual, where back-pressure, the write timeout and disconnects
    are handled; the socket stays with the loop until it lends it again. Bytes of an item
    that did not all go out are written by the loop before anything else of the stream.

    The thread writes through its own duplicate of the socket's descriptor, so a
    connection the loop closes meanwhile can never make it write to another client that
    was given the same descriptor number; the duplicate is closed as soon as the stream
    ends or the connection closes.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport) -> None:
        self.lock = threading.Lock()
        self._loop = loop
        self._transport = transport
        raw = transport.get_extra_info("socket")
        self._sock: socket.socket | None = None
        try:
            self._sock = socket.socket(fileno=os.dup(raw.fileno())) if raw is not None else None
        except OSError as exc:  # out of descriptors: the stream is written by the loop alone
            log.warning("a stream's items go through the event loop: %s", exc)
        self._lent = False
        self._owed = b""
        self.items = 0  # items the producing thread wrote itself
        self.bytes = 0  # ... and their bytes (without the chunks' framing)

    def send(self, data: bytes) -> bool:
        """Write ``data`` as one chunk now; False if it was not taken (see the class). Any
        thread, with :attr:`lock` held."""
        sock = self._sock
        if not self._lent or sock is None or self._transport.get_write_buffer_size():
            return False
        frame = encode_chunk(data)
        try:
            sent = sock.send(frame, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError:  # the client's buffer is full, or the client is gone: the loop handles both
            sent = 0
        if sent == 0:
            self._lent = False
            return False
        self.items += 1
        self.bytes += len(data)
        if sent < len(frame):
            self._lent = False
            self._owed = frame[sent:]
            self._loop.call_soon_threadsafe(self._pay)
        return True

    @property
    def closed(self) -> bool:
        return self._sock is None

    # -- the event loop's side ---------------------------------------------------------------

    def lend(self) -> None:
        with self.lock:
            self._lent = self._sock is not None and not self._owed

    def take_back(self) -> None:
        """The server is about to write: the thread may not any more, and what it left is written first."""
        with self.lock:
            self._lent = False
        self._pay()

    def _pay(self) -> None:
        with self.lock:
            owed, self._owed = self._owed, b""
        if owed and not self._transport.is_closing():
            self._transport.write(owed)

    def close(self) -> None:
        with self.lock:
            self._lent = False
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()



def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
