"""What ``edgeplane`` tells a user when a command fails, against ``edgeplane serve`` as a
subprocess: the exit code that says whose fault it was (1 refused, 2 usage, 3 nothing
listening), one line on stderr and no traceback, and a name that never reaches another
object."""

from __future__ import annotations

import argparse
import http.server
import json
import pathlib
import ssl
import subprocess
from collections.abc import Iterator

import pytest

from orchestrator.cli import events
from orchestrator.cli import http as cli_http
from orchestrator.cli import maintenance as maintenance_cli
from orchestrator.security import ca
from orchestrator.testing import loopback

from . import support
from .support import cli, doc, ok


def test_exit_codes(serve: support.ServeProcess, tmp_path: pathlib.Path) -> None:
    # 1: refused by the control plane, with a one-line reason
    proc = cli("get", "widgets", server_url=serve.url)
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        "error: unknown kind 'widgets'; use one of: sites, models, modeldeployments, placements, events, cascades"]
    # 2: wrong usage
    assert cli("get", server_url=serve.url).returncode == 2
    assert cli("frobnicate", server_url=serve.url).returncode == 2
    assert cli("get", "sites", "-o", "xml", server_url=serve.url).returncode == 2
    proc = cli("delete", server_url=serve.url)
    assert proc.returncode == 2 and proc.stderr.startswith("error: give -f FILE or KIND NAME")
    proc = cli("apply", "-f", str(tmp_path / "missing.yaml"), server_url=serve.url)
    assert proc.returncode == 2 and "no such file or directory" in proc.stderr
    (tmp_path / "empty").mkdir()
    assert cli("apply", "-f", str(tmp_path / "empty"), server_url=serve.url).returncode == 2
    proc = cli("token", "create", "--ttl", "soon", server_url=serve.url)
    assert proc.returncode == 2 and "--ttl 'soon'" in proc.stderr
    for ttl in ("0", "0h", "nan", "inf"):
        proc = cli("token", "create", f"--ttl={ttl}", server_url=serve.url)
        assert proc.returncode == 2 and proc.stderr.strip() == f"error: --ttl '{ttl}': a lifetime must be more than 0", proc
    # 3: nothing listening
    dead = f"http://127.0.0.1:{support.closed_port()}"
    proc = cli("get", "sites", server_url=dead)
    assert proc.returncode == 3, proc
    assert proc.stderr.startswith(f"error: cannot reach the control plane at {dead}")
    assert cli("--server", dead, "status").returncode == 3  # the flag works as well as the variable
    proc = cli("get", "sites", server_url=serve.url, env={"EDGEPLANE_TOKEN_FILE": str(tmp_path / "no-token")})
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: EDGEPLANE_TOKEN_FILE {tmp_path / 'no-token'}: No such file or directory"
    proc = cli("chat", "assistant", "Hello", server_url=dead)  # the client's way: replicas, then the gateway
    assert proc.returncode == 3 and f"is 'edgeplane serve' running at {dead}?" in proc.stderr, proc
    # 0
    assert cli("--server", serve.url, "get", "sites").returncode == 0


def test_a_reader_that_stops_early_gets_no_traceback(serve: support.ServeProcess, applied) -> None:  # type: ignore[no-untyped-def]
    """`edgeplane get sites -o yaml | head`: the pipe closes before the command writes."""
    env = support.clean_env(EDGEPLANE_SERVER=serve.url)
    proc = subprocess.Popen([str(support.EDGEPLANE), "get", "sites", "-o", "yaml"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `head` that has read its lines and gone
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 1
    assert err == "", err


def test_a_name_is_one_path_segment_never_another_object(serve: support.ServeProcess, applied) -> None:  # type: ignore[no-untyped-def]
    """A name goes into the URL escaped: ``..``, ``/``, ``?`` and ``%`` in it name that object
    (which does not exist), never another path or a query."""
    ok("apply", "-f", "-", server=serve, stdin=doc("Site", "cli-victim", support.edge_site_spec()))
    try:
        for argv in (["delete", "model", "../sites/cli-victim"], ["captures", "EU", "--delete", "../../sites/cli-victim"]):
            assert cli(*argv, server_url=serve.url).returncode == 1
            assert "cli-victim" in ok("get", "site", "cli-victim", server=serve), f"edgeplane {' '.join(argv)} deleted Site cli-victim"
        for argv, error in ((["get", "sites", "edge-lyon?x=1"], "Site 'edge-lyon?x=1' does not exist"),
                            (["get", "site", ".."], "Site '..' does not exist"),
                            (["describe", "site", "edge-lyon%2f"], "Site 'edge-lyon%2f' does not exist"),
                            (["describe", "site", "edge-lyon/"],  # the server redirects to edge-lyon: not the object asked for
                             "the control plane answered GET /v1/site/edge-lyon%2F with HTTP 307 and no JSON object"),
                            (["infer", "intent-classifier?x=1", "--data", '{"input": [[0.5]]}'], "model 'intent-classifier?x=1' is not deployed")):
            proc = cli(*argv, server_url=serve.url)
            assert proc.returncode == 1 and proc.stderr.splitlines()[0].startswith(f"error: {error}"), proc
            assert len(proc.stderr.splitlines()) == 1 and proc.stdout == "", proc
    finally:
        ok("delete", "site", "cli-victim", server=serve)


class _Sites(loopback.CannedHandler):
    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self.reply(200, json.dumps({"kind": "Site", "items": []}).encode())


def _https_server(tmp_path: pathlib.Path, *, client_certificate: bool = False) -> Iterator[tuple[str, pathlib.Path]]:
    """An HTTPS server on loopback (a reverse proxy in front of a control plane, as it were)
    whose certificate a CA of its own signed: its URL and that CA's certificate file. With
    ``client_certificate``, it asks each caller for one of that CA's (a proxy with mutual
    TLS), in TLS 1.2, where that refusal comes in the handshake, before a request is sent."""
    authority = ca.CertificateAuthority.load_or_create(tmp_path / "ca", name="a company's own CA")
    cert, key = authority.issue_server(["127.0.0.1"])
    (tmp_path / "server.crt").write_bytes(cert)
    (tmp_path / "server.key").write_bytes(key)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    if client_certificate:
        tls.verify_mode = ssl.CERT_REQUIRED
        tls.load_verify_locations(tmp_path / "ca" / "ca.crt")
        tls.maximum_version = ssl.TLSVersion.TLSv1_2
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sites)
    httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    with loopback.in_thread(httpd):
        yield f"https://127.0.0.1:{httpd.server_port}", tmp_path / "ca" / "ca.crt"


@pytest.fixture
def behind_tls(tmp_path: pathlib.Path) -> Iterator[tuple[str, pathlib.Path]]:
    yield from _https_server(tmp_path)


@pytest.fixture
def behind_mutual_tls(tmp_path: pathlib.Path) -> Iterator[tuple[str, pathlib.Path]]:
    yield from _https_server(tmp_path, client_certificate=True)


def test_a_certificate_not_trusted_is_said_so_with_how_to_trust_it(behind_tls: tuple[str, pathlib.Path],
                                                                    serve: support.ServeProcess) -> None:
    """It read as 'cannot reach the control plane ...; is edgeplane serve running?', of a
    server that answered, and said nothing of how to make the CLI trust it."""
    url, ca_file = behind_tls
    for argv in (["get", "sites"], ["status"], ["infer", "m", "--data", '{"x": [1]}'], ["chat", "m", "hi"]):
        proc = cli(*argv, server_url=url)
        assert proc.returncode == 3, proc
        assert len(proc.stderr.splitlines()) == 1 and proc.stdout == "", proc
        assert proc.stderr.startswith(f"error: the control plane at {url} presented a certificate this machine does not trust "
                                      "(unable to get local issuer certificate): "), proc.stderr
        assert "SSL_CERT_FILE" in proc.stderr and "is 'edgeplane serve' running" not in proc.stderr, proc.stderr
    trusted = cli("get", "sites", server_url=url, env={"SSL_CERT_FILE": str(ca_file)})
    assert trusted.returncode == 0 and trusted.stdout == "No Site objects.\n", trusted
    # https:// to a control plane that serves plain HTTP: it is there, it speaks no TLS
    plain = serve.url.replace("http://", "https://")
    proc = cli("get", "sites", server_url=plain)
    assert proc.returncode == 3 and len(proc.stderr.splitlines()) == 1, proc
    assert proc.stderr.startswith(f"error: {plain} does not speak TLS (wrong version number): "), proc.stderr
    assert "http://" in proc.stderr and "is 'edgeplane serve' running" not in proc.stderr, proc.stderr


def _first_line_then_exit(argv: list[str], url: str) -> tuple[str, int | None]:
    """``edgeplane *argv`` against ``url``: the first line it says on stderr, and its exit
    code once it has said it (None: still running, so it was stopped)."""
    proc = subprocess.Popen([str(support.EDGEPLANE), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=support.clean_env(EDGEPLANE_SERVER=url), cwd=support.REPO)
    assert proc.stderr is not None
    try:
        first = proc.stderr.readline()
        try:
            return first, proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            return first, None
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("argv", [["events", "-w"], ["events", "-w", "-o", "json"], ["drain", "site", "edge-lyon", "--wait"]], ids=" ".join)
def test_waiting_commands_stop_at_once_on_tls_that_fails(argv: list[str], behind_tls: tuple[str, pathlib.Path],
                                                         serve: support.ServeProcess) -> None:
    """A certificate not trusted, or https:// to a control plane that speaks plain HTTP, does
    not go away by asking again: events -w asked again every second, for ever, as if the
    control plane were restarting. It stops at once with its one line (exit 3), with -o json
    its one object, which starts the same."""
    url, _ = behind_tls
    plain = serve.url.replace("http://", "https://")
    for server, said in ((url, f"the control plane at {url} presented a certificate this machine does not trust"),
                         (plain, f"{plain} does not speak TLS")):
        first, code = _first_line_then_exit(argv, server)
        if "json" in argv:
            assert first == "{\n" and code == 3, (first, code)
        else:
            assert first.startswith(f"error: {said}") and code == 3, (first, code)


def test_a_drain_followed_stops_at_once_when_tls_fails(behind_tls: tuple[str, pathlib.Path]) -> None:
    """drain --wait asks the control plane again until its --timeout when it is away; a
    certificate not trusted met while it follows is not waited out."""
    url, _ = behind_tls
    api = cli_http.ApiClient(url, None)
    try:
        args = argparse.Namespace(name="edge-lyon", timeout=5.0, interval=0.1, output="table")
        with pytest.raises(cli_http.CliError) as raised:
            maintenance_cli.follow_drain(api, args)
    finally:
        api.close()
    assert raised.value.code == 3 and "presented a certificate this machine does not trust" in str(raised.value), raised.value


@pytest.mark.parametrize(("error", "wait"), [
    (cli_http.CliError("cannot reach the control plane", 3), 1.0),
    (cli_http.RetryLater("busy", 503, 5.0), 5.0),
    (cli_http.CliError("refused"), None),
    (cli_http.TlsFailure("a certificate this machine does not trust"), None),
])
def test_what_a_waiting_command_asks_again_after(error: cli_http.CliError, wait: float | None) -> None:
    assert events.wait_to_ask_again(error, 1.0) == wait


def test_a_tls_server_that_refuses_the_handshake_is_not_said_to_speak_no_tls(behind_mutual_tls: tuple[str, pathlib.Path]) -> None:
    """Every TLS error that was not a certificate's read as 'does not speak TLS ...: a
    control plane without a reverse proxy in front serves http://', of a proxy that spoke
    TLS and refused the connection (it asks for a client certificate): the user was sent to
    drop the https:// that the proxy needs."""
    url, ca_file = behind_mutual_tls
    for argv in (["get", "sites"], ["chat", "m", "hi"]):
        proc = cli(*argv, server_url=url, env={"SSL_CERT_FILE": str(ca_file)})
        assert proc.returncode == 3, proc
        assert len(proc.stderr.splitlines()) == 1 and proc.stdout == "", proc
        assert proc.stderr.startswith(f"error: the control plane at {url} refused the TLS handshake (sslv3 alert handshake failure): "), proc.stderr
        assert "does not speak TLS" not in proc.stderr and "is 'edgeplane serve' running" not in proc.stderr, proc.stderr


def test_a_directory_with_a_broken_link_applies_nothing_and_names_it(serve: support.ServeProcess, tmp_path: pathlib.Path) -> None:
    """A directory of manifests where one is a link to a file moved away (or a loop): the
    part of the fleet it held is not silently left out of the apply."""
    folder = tmp_path / "fleet"
    folder.mkdir()
    (folder / "a.yaml").write_text(doc("Site", "cli-before-the-link", support.edge_site_spec()))
    (folder / "b.yaml").symlink_to(tmp_path / "moved" / "b.yaml")
    (folder / "c.yaml").symlink_to(folder / "c.yaml")  # a link to itself
    for command in ("apply", "plan"):
        proc = cli(command, "-f", str(folder), server_url=serve.url)
        assert proc.returncode == 2, proc
        assert proc.stderr.strip() == f"error: {folder / 'b.yaml'}: a link to {tmp_path / 'moved' / 'b.yaml'}, which leads to no file", proc
    (folder / "b.yaml").unlink()
    proc = cli("apply", "-f", str(folder), server_url=serve.url)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {folder / 'c.yaml'}: a link to {folder / 'c.yaml'}, which leads to no file"
    assert "does not exist" in cli("get", "site", "cli-before-the-link", server_url=serve.url).stderr
