"""The CLI's one connection to the control plane, with errors a script can trust.

Every failure becomes :class:`CliError` carrying a one-line reason and an exit code:
1 for a refusal by the server (4xx/5xx), 2 for a server URL or token that cannot be
used at all, 3 when the server cannot be reached. A refusal that only means "not now"
(429, and 502/503/504: a reverse proxy while the control plane restarts, the control
plane while its store does not answer) is a :class:`RetryLater`, which a command that
keeps going (``events -w``, ``drain --wait``) waits out like a server that cannot be
reached; TLS that fails for good (a certificate not trusted, a server that speaks no TLS)
is a :class:`TlsFailure`, which no waiting mends.
"""

from __future__ import annotations

import os
import pathlib
import ssl
import sys
import time
from typing import Any

import httpx

from edgeplane_proto import retry_after as retry_header
from orchestrator import proxyenv, unicode_text, urlpath
from orchestrator.api import reasons

DEFAULT_SERVER = "http://127.0.0.1:8080"
#: Items per page when the CLI reads a whole list (a Site's manifest is ~0.5 KB: ~250 KB a page).
LIST_PAGE = 500


class CliError(Exception):
    """``reason``: the word that says why, for scripts (``-o json``: :mod:`orchestrator.cli.failures`),
    the control API's where it refused (docs/api.md, Error reasons), else None and the exit
    code decides; ``said``: what else the refusal named (``parameter``, ``field``, ``issues``)."""

    def __init__(self, message: str, code: int = 1, details: list[str] | None = None, *, reason: str | None = None,
                 said: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.details = details or []
        self.reason = reason
        self.said = said or {}


class RetryLater(CliError):
    """A refusal that says to ask again later; ``retry_after_s``: what its ``Retry-After``
    asks for (seconds), None when it says nothing."""

    def __init__(self, message: str, status: int, retry_after_s: float | None, details: list[str] | None = None, *,
                 reason: str | None = None, said: dict[str, Any] | None = None):
        super().__init__(message, 1, details, reason=reason, said=said)
        self.status = status
        self.retry_after_s = retry_after_s


class TlsFailure(CliError):
    """The server is there but TLS with it fails, and will the same way when asked again: its
    certificate is not trusted here, or it speaks no TLS. Exit code 3, as the server is not
    reached, but a command that keeps going stops at once (``events.wait_to_ask_again``)."""

    def __init__(self, message: str):
        super().__init__(message, 3)


class NoRoute(CliError):
    """The control plane has no such route, or does not take the method there: most often one
    of an earlier release than this CLI, asked for what a later release brought."""


#: too many requests; a gateway that got no answer; the server unable to answer for now
RETRY_LATER_STATUSES = frozenset({429, 502, 503, 504})


def token_from_env(explicit: str | None) -> str | None:
    if explicit:
        return _checked_token(explicit, "--token")
    if os.environ.get("EDGEPLANE_TOKEN"):
        return _checked_token(os.environ["EDGEPLANE_TOKEN"], "EDGEPLANE_TOKEN")
    path = os.environ.get("EDGEPLANE_TOKEN_FILE")
    if path:
        try:  # UTF-8, or what a byte-order mark says (PowerShell 5's ``>``, Notepad)
            token = unicode_text.decoded(pathlib.Path(path).read_bytes()).strip()
        except OSError as exc:  # a token the caller meant to send: not silently none
            raise CliError(f"EDGEPLANE_TOKEN_FILE {path}: {exc.strerror or exc}", 2) from None
        except unicode_text.NotText as exc:
            raise CliError(f"EDGEPLANE_TOKEN_FILE {path}: {exc}", 2) from None
        return _checked_token(token, f"EDGEPLANE_TOKEN_FILE {path}")
    return None


def _checked_token(token: str, source: str) -> str:
    """The token travels in an HTTP header, which holds visible ASCII only; the tokens the
    control plane issues are letters, digits, ``-`` and ``_``."""
    if not all("!" <= c <= "~" for c in token):
        raise CliError(f"{source}: the token has characters a token cannot have (spaces, control or non-ASCII characters)", 2)
    return token


class ApiClient:
    def __init__(self, server: str | None, token: str | None, timeout: float = 30.0):
        source = "--server" if server else "EDGEPLANE_SERVER"
        self.server = (server or os.environ.get("EDGEPLANE_SERVER") or DEFAULT_SERVER).rstrip("/")
        headers = {"user-agent": "edgeplane-cli"}
        tok = token_from_env(token)
        if tok:
            headers["authorization"] = f"Bearer {tok}"
        problem = urlpath.base_url_problem(self.server)
        if problem is not None:
            raise CliError(f"{source} {urlpath.redacted(self.server)!r} is not a URL such as {DEFAULT_SERVER} ({problem})", 2)
        try:
            self._http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout, transport=proxyenv.transport(), trust_env=False)
        except proxyenv.UNUSABLE as exc:  # a proxy from the environment httpx cannot use, found as it is mounted
            raise CliError(proxyenv.explain(exc), 2) from None

    def request(self, method: str, path: str, *, busy_wait_s: float = 0.0, **kwargs: Any) -> dict[str, Any]:
        """The JSON object the control plane answered; anything else is a :class:`CliError`.
        ``busy_wait_s``: for so long, a 429 (the control plane doing the same work for
        someone else) is waited out as its ``Retry-After`` says, saying so on stderr."""
        deadline = time.monotonic() + busy_wait_s
        while True:
            resp = self._send(method, path, **kwargs)
            wait = _retry_after(resp) if resp.status_code == 429 else None
            if wait is None or time.monotonic() + wait > deadline:
                return self._answer(method, path, resp)
            print(f"{_error_of(resp)}: waiting {wait:g} s", file=sys.stderr, flush=True)
            time.sleep(wait)

    def request_list(self, path: str, page_size: int = LIST_PAGE) -> dict[str, Any]:
        """The whole list at ``path`` (``GET /v1/sites``, ``/v1/placements``), asked a page of
        ``page_size`` at a time (``limit`` and ``continue``), as one answer without the
        pages' ``metadata``: what an unpaged ask answers, never one megabytes-large body."""
        doc = self.request("GET", path, params={"limit": page_size})
        items, seen = list(doc.get("items", [])), set()
        while token := (doc.get("metadata") or {}).get("continue"):
            if token in seen:  # a server that gives the same page again would be asked forever
                raise CliError(f"the control plane gave the same continue token twice listing {path}")
            seen.add(token)
            doc = self.request("GET", path, params={"limit": page_size, "continue": token})
            items += doc.get("items", [])
        return {**{k: v for k, v in doc.items() if k != "metadata"}, "items": items}

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.ReadTimeout as exc:
            waited = kwargs.get("timeout", self._http.timeout)
            seconds = waited.read if isinstance(waited, httpx.Timeout) else waited
            raise CliError(f"the control plane at {self.server} did not answer {method} {path} within {seconds:g} s", 3) from exc
        except httpx.TransportError as exc:
            if lasting_tls_problem(exc):
                raise TlsFailure(unreached(self.server, exc)) from exc
            raise CliError(unreached(self.server, exc), 3) from exc

    def _answer(self, method: str, path: str, resp: httpx.Response) -> dict[str, Any]:
        if resp.status_code >= 400:
            if resp.status_code == 404 and self._nothing_at_base():
                raise CliError(f"nothing at {resp.request.url.copy_with(query=None)} nor at {self.server}/healthz (HTTP 404): "
                               f"is {self.server} the control plane's base URL (--server / EDGEPLANE_SERVER)? A path in it must "
                               "be the prefix a reverse proxy serves the control plane under", reason=reasons.Reason.NO_ROUTE)
            body = _error_body(resp)
            message = str(body.get("error", resp.reason_phrase))
            details = [_issue_line(i) for i in body.get("issues") or []]
            # an earlier release's answer, or a reverse proxy's page, names no reason: its status's own
            why = {"reason": str(body.get("reason") or reasons.reason_of(resp.status_code)),
                   "said": {k: v for k, v in body.items() if k not in ("error", "reason")}}
            # the reason since it is given; before, methods.http_error's words, which every release kept
            if resp.status_code == 405 or (resp.status_code == 404 and (body.get("reason") == "NoRoute"
                                                                         or message.startswith("no route for "))):
                raise NoRoute(message, 1, details, **why)
            if resp.status_code in RETRY_LATER_STATUSES:
                raise RetryLater(message, resp.status_code, _retry_after(resp), details, **why)
            raise CliError(message, 1, details, **why)
        doc = json_of(resp) if resp.headers.get("content-type", "").startswith("application/json") else None
        if not isinstance(doc, dict):  # a redirect (not followed), a proxy's page: no answer to read
            raise CliError(f"the control plane answered {method} {path} with HTTP {resp.status_code} and no JSON object")
        return doc

    def _nothing_at_base(self) -> bool:
        """Whether a 404 means the base URL leads elsewhere (most often a path in it that no
        reverse proxy serves), not an object that does not exist: then the control plane's
        health route, which always answers, is not found either. Asked after a 404 only."""
        try:
            return self._http.get("/healthz").status_code == 404
        except httpx.TransportError:
            return False

    def raw(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The response whatever its status (for commands that read headers too)."""
        return self._send(method, path, **kwargs)

    def close(self) -> None:
        self._http.close()


#: What OpenSSL says of an answer to its hello that is no TLS record (a plain-HTTP server's
#: "HTTP/1.1 400"): 3.0 and 3.1 read its first bytes as a wrong version, 3.2 on as a record
#: too long or failed. Any other TLS error is a server that speaks TLS and refused the handshake.
NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE", "UNKNOWN_PROTOCOL"})


def unreached(server: str, exc: BaseException) -> str:
    """Why no answer came from ``server`` (``exc``: what the HTTP client raised). TLS that
    failed is said as such: the server is there, and asking whether it runs sends the user
    the wrong way; a certificate signed by a CA of the user's own is trusted with
    ``SSL_CERT_FILE``, which the CLI reads as the Python client does; a server that answers
    in plain HTTP is asked with http://; one that speaks TLS and refuses the handshake (a
    proxy asking for a client certificate) is said to, and not that it speaks none."""
    problem = tls_problem(exc)
    if isinstance(problem, ssl.SSLCertVerificationError):
        return (f"the control plane at {server} presented a certificate this machine does not trust "
                f"({problem.verify_message or problem.reason}): give the CA that signed it with SSL_CERT_FILE=CA.pem "
                "(or SSL_CERT_DIR), or check --server / EDGEPLANE_SERVER")
    if problem is not None and problem.reason in NOT_TLS:
        return (f"{server} does not speak TLS ({_tls_words(problem)}): "
                f"a control plane without a reverse proxy in front serves http://, not https:// (--server / EDGEPLANE_SERVER)")
    if problem is not None:  # it speaks TLS, and refused this connection
        return (f"the control plane at {server} refused the TLS handshake ({_tls_words(problem)}): a reverse proxy in front "
                "of it may ask for a client certificate, which the CLI does not send, or share no TLS version or cipher with "
                "this machine; check its TLS settings, or --server / EDGEPLANE_SERVER")
    return f"cannot reach the control plane at {server}: {exc.__class__.__name__} ({exc}); is 'edgeplane serve' running? (--server / EDGEPLANE_SERVER)"


def tls_problem(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind ``exc`` (httpx and the client wrap it), or None."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:  # bounded: a chain that loops is read once
        if isinstance(cause, ssl.SSLError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


#: TLS cut short (a connection closed during the handshake: a reverse proxy restarting, say), which may not happen again
_CUT_SHORT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


def lasting_tls_problem(exc: BaseException) -> bool:
    """Whether ``exc`` is TLS that will fail again when asked again: a certificate not
    trusted, or a server that answers in something else than TLS (``wrong version number``);
    not a handshake cut short, which a server restarting causes."""
    problem = tls_problem(exc)
    return problem is not None and not isinstance(problem, _CUT_SHORT)


def _tls_words(error: ssl.SSLError) -> str:
    """What OpenSSL said, without its source file: ``wrong version number``."""
    return str(error.reason).replace("_", " ").lower() if error.reason else str(error)


def _issue_line(i: dict[str, Any]) -> str:
    where = str(i.get("file", ""))
    if i.get("line") is not None:
        where += f":{i['line']}"
    if i.get("document") is not None:
        where += f" (document {i['document']})"
    field = f" {i['field']}:" if i.get("field") else ""
    return f"{where}:{field} {i.get('message', '')}"


def json_of(resp: httpx.Response) -> Any:
    """The body as JSON, or None when it is not JSON Python can read: a proxy's page, an
    integer of 5,000 digits, arrays nested past the parser's recursion limit. Whatever a
    server sends, what it says is the command's to report, never a bug of ours."""
    try:
        return resp.json()
    except (ValueError, RecursionError):
        return None


def _error_body(resp: httpx.Response) -> dict[str, Any]:
    """An error answer as the API gives it: ``{"error": ..., "reason": ..., "issues": [...]}``."""
    body = json_of(resp)
    return body if isinstance(body, dict) else {"error": resp.text[:200] or resp.reason_phrase}


def _error_of(resp: httpx.Response) -> str:
    return str(_error_body(resp).get("error", resp.reason_phrase))


def _retry_after(resp: httpx.Response) -> float | None:
    """The seconds a ``Retry-After`` asks for (at least one, so a wait always waits), or None."""
    seconds = retry_header.seconds(resp.headers.get("retry-after"))
    return None if seconds is None else max(1.0, seconds)
