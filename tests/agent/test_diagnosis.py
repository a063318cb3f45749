"""What the agent makes of a failed connection: gRPC's words (as captured from real
failures) to a symptom, a symptom and what answers to a hint, and the probe itself."""

from __future__ import annotations

import http.server
import socket

import grpc
import pytest

from edge_agent import diagnosis
from edge_agent.diagnosis import Dial, Listener, Symptom
from orchestrator.testing import loopback

_LAST = "failed to connect to all addresses; last error: "


@pytest.mark.parametrize(("detail", "symptom"), [
    (_LAST + "UNAVAILABLE: ipv4:127.0.0.1:19301: Socket closed", Symptom.CLOSED),
    (_LAST + "UNKNOWN: ipv4:127.0.0.1:19312: Failed to connect to remote host: Connection refused", Symptom.REFUSED),
    ("[Errno 111] Connection refused", Symptom.REFUSED),
    (_LAST + "UNKNOWN: ipv4:127.0.0.1:19302: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL "
     "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: self signed certificate in certificate chain: OK", Symptom.UNTRUSTED),
    (_LAST + "UNKNOWN: ipv4:127.0.0.1:19302: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1a000064:ECDSA "
     "routines:OPENSSL_internal:BAD_SIGNATURE: certificate signature failure: OK", Symptom.UNTRUSTED),
    (_LAST + "UNKNOWN: ipv4:127.0.0.1:19302: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL "
     "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate has expired: OK", Symptom.CLOCK),
    (_LAST + "UNKNOWN: ipv4:127.0.0.1:19311: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL "
     "routines:OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification context: OK", Symptom.NOT_TLS),
    ("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)", Symptom.NOT_TLS),
    (_LAST + "INTERNAL: ipv4:127.0.0.1:19300: Failed parsing HTTP/2 (Expected SETTINGS frame as the first frame, got frame "
     "type 80) (Trying to connect an http1.x server (HTTP status 400))", Symptom.HTTP1),
    (_LAST + "UNKNOWN: ipv4:127.0.0.1:19302: Custom verification check failed with error: UNAUTHENTICATED: Hostname "
     "Verification Check failed.", Symptom.NAME),
    (_LAST + "UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: something new", Symptom.HANDSHAKE),
    ("Deadline Exceeded", Symptom.OTHER),
    ("", Symptom.OTHER),
])
def test_what_grpc_said_is_a_symptom(detail: str, symptom: Symptom) -> None:
    assert diagnosis.symptom(detail) is symptom


CP, JOIN = "cp:8081", "cp:8082"
INSECURE = Dial(CP, CP, tls=False)
FIRST_JOIN = Dial(JOIN, CP, tls=True, join=True)
MUTUAL = Dial(CP, CP, tls=True, ca_file="/etc/ca.crt", client_cert="/var/lib/a/agent.crt")


@pytest.mark.parametrize(("symptom", "dial", "listener", "hint"), [
    (Symptom.CLOSED, INSECURE, Listener.TLS, "cp:8081 speaks TLS, so the control plane takes agents over mutual TLS: drop --insecure"),
    (Symptom.CLOSED, INSECURE, Listener.NOTHING, ""),  # the control plane went down
    (Symptom.CLOSED, INSECURE, Listener.PLAINTEXT, ""),
    (Symptom.CLOSED, MUTUAL, Listener.TLS, "it most likely refuses this agent's client certificate (/var/lib/a/agent.crt)"),
    (Symptom.CLOSED, MUTUAL, Listener.NOTHING, ""),
    (Symptom.REFUSED, FIRST_JOIN, Listener.PLAINTEXT,
     "nothing answers on the join port cp:8082 (--control-plane's port + 1) and cp:8081 speaks plaintext gRPC: a control "
     "plane started with --insecure-agents takes agents with --insecure"),
    (Symptom.REFUSED, Dial(JOIN, CP, tls=True, join=True, join_address=True), Listener.TLS,
     "nothing answers on --join-address cp:8082 but cp:8081 speaks TLS: check --join-address against"),
    (Symptom.REFUSED, FIRST_JOIN, Listener.TLS, "but cp:8081 speaks TLS: give --join-address HOST:PORT"),
    (Symptom.REFUSED, FIRST_JOIN, Listener.NOTHING, "nothing answers on cp:8081 either: is the control plane running there?"),
    (Symptom.REFUSED, FIRST_JOIN, Listener.UNKNOWN, ""),
    (Symptom.REFUSED, INSECURE, None, ""),  # the control plane is down: what gRPC said is enough
    (Symptom.REFUSED, MUTUAL, None, ""),
    (Symptom.NOT_TLS, FIRST_JOIN, Listener.PLAINTEXT, "cp:8082 speaks plaintext gRPC: a control plane started with --insecure-agents"),
    (Symptom.NOT_TLS, FIRST_JOIN, Listener.OTHER, "cp:8082 does not speak TLS: is it the control plane's join port"),
    (Symptom.HTTP1, INSECURE, None, "cp:8081 answers HTTP/1, not gRPC: give the control plane's agent port"),
    (Symptom.UNTRUSTED, FIRST_JOIN, None, "neither --ca-file nor --ca-sha256 was given: give --ca-file <control-plane data dir>/ca/ca.crt"),
    (Symptom.UNTRUSTED, MUTUAL, None, "the control plane's certificate is not signed by --ca-file /etc/ca.crt: give --ca-file the ca.crt"),
    (Symptom.UNTRUSTED, Dial(CP, CP, tls=True, saved_ca="/var/lib/a/ca.crt"), None,
     "not signed by the CA this agent kept from its first join (/var/lib/a/ca.crt): if the control plane's CA was made again"),
    (Symptom.NAME, Dial("[::1]:8082", CP, tls=True, join=True), None,
     "the control plane's certificate does not name ::1: dial a name it covers, or start the control plane with --agent-tls-name ::1"),
    (Symptom.CLOCK, MUTUAL, None, "check this machine's clock"),
    (Symptom.HANDSHAKE, MUTUAL, None, "the TLS handshake failed: check that --ca-file is the ca.crt of this control plane"),
    (Symptom.OTHER, MUTUAL, None, ""),
])
def test_a_hint_only_where_the_evidence_fits(symptom: Symptom, dial: Dial, listener: Listener | None, hint: str) -> None:
    said = diagnosis.hint(symptom, dial, listener)
    assert (hint in said) if hint else said == ""
    assert "\n" not in said


@pytest.mark.parametrize(("symptom", "dial", "address"), [
    (Symptom.CLOSED, INSECURE, CP),
    (Symptom.CLOSED, MUTUAL, CP),
    (Symptom.CLOSED, FIRST_JOIN, None),
    (Symptom.NOT_TLS, FIRST_JOIN, JOIN),
    (Symptom.REFUSED, FIRST_JOIN, CP),  # the join port is refused: does the agent port answer?
    (Symptom.REFUSED, INSECURE, None),
    (Symptom.UNTRUSTED, FIRST_JOIN, None),
])
def test_a_probe_only_where_it_tells_causes_apart(symptom: Symptom, dial: Dial, address: str | None) -> None:
    assert diagnosis.to_probe(symptom, dial) == address


async def test_the_probe_tells_plaintext_grpc_from_http_from_nothing() -> None:
    server = grpc.aio.server()
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        with loopback.http_server(http.server.BaseHTTPRequestHandler) as web, socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
            assert await diagnosis.probe(f"127.0.0.1:{grpc_port}", 5) is Listener.PLAINTEXT
            assert await diagnosis.probe(web.removeprefix("http://"), 5) is Listener.OTHER
            assert await diagnosis.probe(f"127.0.0.1:{closed.getsockname()[1]}", 5) is Listener.NOTHING
    finally:
        await server.stop(None)
