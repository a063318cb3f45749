"""More bad input at the edges users touch: ``serve --store``, a ``serve`` that cannot
start, ``--server`` with more than a base URL, values YAML reads as another type, and the
times ``captures`` prints."""

from __future__ import annotations

import argparse
import http.server
import json
import os
import pathlib
import re
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from orchestrator import catalog, server_options
from orchestrator.cli import main as cli_main
from orchestrator.distill import store as capture_store
from orchestrator.manifests import loader, schema
from orchestrator.manifests.errors import ManifestError
from orchestrator.store import open_store
from orchestrator.testing import loopback

from . import support
from .conftest import start_control_plane
from .support import doc

STORE_REFUSED = "is not a store URL: give postgresql://user@host/db (PostgreSQL, shared by replicas) or sqlite:///path/state.db (a file)"


@pytest.fixture(autouse=True)
def no_edgeplane_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("EDGEPLANE_")]:
        monkeypatch.delenv(key)


# --- serve --store ------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["postgresql://edgeplane@db.example.test/edgeplane", "postgres://u:p@127.0.0.1:5432/db",
                                 "sqlite:///var/lib/edgeplane/state.db", "SQLite:///tmp/state.db", "sqlite://relative/state.db"])
def test_the_two_store_url_forms_are_taken_as_written(url: str) -> None:
    assert server_options.store_url(url) == url


@pytest.mark.parametrize("text", ["garbage", "state.db", "./data/state.db", "/var/lib/edgeplane/state.db", "sqlite://",
                                  "sqlite:/state.db", "mysql://root@db/edgeplane", "postgresql:/db", ""])
def test_anything_else_is_refused_naming_both_forms(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"{text!r} {STORE_REFUSED}")):
        server_options.store_url(text)


@pytest.mark.parametrize(("argv", "env", "said"), [
    (["--store", "garbage"], {}, f"'garbage' {STORE_REFUSED}"),
    (["--store", "mysql://root@db/edgeplane"], {}, f"'mysql://root@db/edgeplane' {STORE_REFUSED}"),
    ([], {"EDGEPLANE_STORE": "garbage"}, f"'garbage' (from $EDGEPLANE_STORE) {STORE_REFUSED}"),
])
def test_serve_with_a_store_that_is_no_url_stops_before_creating_anything(argv: list[str], env: dict[str, str], said: str,
                                                                           tmp_path: pathlib.Path) -> None:
    """``--store garbage`` used to become a new, empty SQLite file ``./garbage``."""
    proc = subprocess.run([str(support.EDGEPLANE), "serve", *argv, "--port", str(support.free_port())], capture_output=True,
                          text=True, timeout=60, env=support.clean_env(**env), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc
    assert proc.stderr.strip().splitlines() == [f"edgeplane serve: error: argument --store: {said}"], proc.stderr
    assert list(tmp_path.iterdir()) == []  # no ./garbage, no .edgeplane


def test_an_empty_edgeplane_store_is_no_store_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPLANE_STORE", "")
    args = cli_main.build_parser().parse_args(["serve"])
    assert args.store is None


# --- a serve that fails leaves no admin token ---------------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_start_that_fails_leaves_no_admin_token_and_the_next_one_writes_it(busy_port: int, tmp_path: pathlib.Path,
                                                                             offline_fleet: pathlib.Path) -> None:
    data = tmp_path / "data"
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{busy_port}"):
        start_control_plane(data, offline_fleet, port=busy_port, auth="token")
    assert not (data / "admin.token").exists()
    store = open_store(data / "state.db")
    try:
        assert not store.has_api_tokens()  # else the next start would find one and write no file
    finally:
        store.close()
    cp = start_control_plane(data, offline_fleet, auth="token")
    try:
        assert cp.cp is not None and cp.cp.admin_token
        assert (data / "admin.token").read_text().strip() == cp.cp.admin_token
    finally:
        cp.stop()


def test_an_admin_token_file_left_readable_by_others_is_replaced_by_one_only_the_owner_reads(
        tmp_path: pathlib.Path, offline_fleet: pathlib.Path) -> None:
    """Writing into an existing admin.token (beside a new store) kept its mode: the new secret was readable by all."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "admin.token").write_text("a token of a store since reset\n")
    (data / "admin.token").chmod(0o644)
    cp = start_control_plane(data, offline_fleet, auth="token")
    try:
        assert cp.cp is not None and (data / "admin.token").read_text() == cp.cp.admin_token + "\n"
        assert (data / "admin.token").stat().st_mode & 0o777 == 0o600
        assert sorted(p.name for p in data.iterdir() if "admin" in p.name) == ["admin.token"]
    finally:
        cp.stop()


def test_a_start_that_fails_keeps_the_admin_token_an_earlier_run_wrote(busy_port: int, tmp_path: pathlib.Path,
                                                                       offline_fleet: pathlib.Path) -> None:
    data = tmp_path / "data"
    cp = start_control_plane(data, offline_fleet, auth="token")
    cp.stop()
    written = (data / "admin.token").read_text()
    with pytest.raises(OSError, match="cannot listen on"):
        start_control_plane(data, offline_fleet, port=busy_port, auth="token")
    assert (data / "admin.token").read_text() == written
    store = open_store(data / "state.db")
    try:
        assert store.verify_token(written.strip(), "api") is not None  # still the token operators hold
    finally:
        store.close()


# --- --server: a base URL, a path being a reverse proxy's prefix --------------------------------


NOT_A_DNS_NAME = "the host is no DNS name: each dot-separated label 1 to 63 characters, an xn-- label valid punycode"


@pytest.mark.parametrize(("server", "why"), [
    ("http://127.0.0.1:9/some/path?x=1", "no query in a base URL: ?x=1"),
    ("http://127.0.0.1:9/#top", "no fragment in a base URL: #top"),
    ("localhost:8080", "it needs http:// or https:// and a host"),
    ("ftp://127.0.0.1:9", "it needs http:// or https:// and a host"),
    ("http:///v1", "it needs http:// or https:// and a host"),
    ("http://ex..ample:8080", NOT_A_DNS_NAME),  # what the resolver refuses, found before any request
    (f"http://{'a' * 64}.example:8080", NOT_A_DNS_NAME),
    ("http://xn--a.example:8080", NOT_A_DNS_NAME),  # no punycode: httpx's own parsing raised
])
def test_a_server_url_that_cannot_be_a_base_url_is_a_usage_error(server: str, why: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main.main(["--server", server, "get", "sites"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: --server {server.rstrip('/')!r} is not a URL such as "
                                                    f"http://127.0.0.1:8080 ({why})"]


@pytest.mark.parametrize("server", ["http://ops:s3cret@127.0.0.1:9", "https://ops@proxy.example/edgeplane", "ops:s3cret@127.0.0.1:9"])
def test_a_server_url_with_a_user_or_password_is_refused_without_showing_it(
        server: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx sent such a password as Basic auth in place of the bearer token, and every error
    message about the server showed it."""
    monkeypatch.setenv("EDGEPLANE_SERVER", server)
    assert cli_main.main(["--token", "ep_x", "get", "sites"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: EDGEPLANE_SERVER '") and "***@" in err, err
    assert "s3cret" not in err and "ops" not in err, err
    assert "no user name or password in a base URL" in err, err


@pytest.mark.parametrize(("setting", "said"), [
    ("socks5://ops:s3cret@127.0.0.1:1080", "a SOCKS proxy needs the socksio package (pip install socksio), or unset it for edgeplane"),
    ("socks4://127.0.0.1:1080", "Unknown scheme for proxy URL"),
    ("http://ops:s3cret@127.0.0.1:abc", "not a URL (Invalid port: 'abc')"),
    ("http://[::1", "not a URL (Invalid port"),
])
def test_a_proxy_in_the_environment_that_cannot_be_used_is_one_line_naming_it(
        setting: str, said: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``ssh -D`` tunnel in ALL_PROXY made every command print a Python traceback: httpx
    mounts the proxies of the environment when the client is made, before any request."""
    for name in [k for k in os.environ if k.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ALL_PROXY", setting)
    assert cli_main.main(["--server", f"http://127.0.0.1:{support.closed_port()}", "get", "sites"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"error: ALL_PROXY='{setting.replace('ops:s3cret', '***')}': {said}"), err


class _Proxy(http.server.ThreadingHTTPServer):
    """Stands in for a reverse proxy serving the control plane under /edgeplane: answers an
    empty Site list and remembers the paths asked for."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        proxy = self

        class Handler(loopback.CannedHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                proxy.paths.append(self.path)
                self.reply(200, json.dumps({"kind": "Site", "items": []}).encode())

        super().__init__(("127.0.0.1", 0), Handler)


def test_a_path_in_the_server_url_is_the_prefix_of_every_request(capsys: pytest.CaptureFixture[str]) -> None:
    with loopback.in_thread(_Proxy()) as proxy:
        assert cli_main.main(["--server", f"http://127.0.0.1:{proxy.server_port}/edgeplane/", "get", "sites"]) == 0
        assert cli_main.main(["--server", f"http://127.0.0.1:{proxy.server_port}/edgeplane", "get", "site", "a b"]) == 0
    assert proxy.paths == ["/edgeplane/v1/sites?limit=500", "/edgeplane/v1/site/a%20b"]  # a list is read in pages
    assert "No Site objects." in capsys.readouterr().out


def test_a_path_nothing_serves_says_to_check_the_base_url(control_plane: support.ServerThread,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A 404 where even the health route is not found comes from a path in --server that leads
    nowhere (it used to say only "Not Found"); the 404 of an object that does not exist keeps
    the control plane's own words."""
    base = f"{control_plane.url}/some/path"
    assert cli_main.main(["--server", base, "get", "sites"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: nothing at {base}/v1/sites nor at {base}/healthz (HTTP 404): is {base} the control plane's base URL "
        "(--server / EDGEPLANE_SERVER)? A path in it must be the prefix a reverse proxy serves the control plane under"]
    assert cli_main.main(["--server", control_plane.url, "get", "site", "no-such-site"]) == 1
    assert capsys.readouterr().err.splitlines() == ["error: Site 'no-such-site' does not exist"]


# --- captures: times as the other commands write them -------------------------------------------


RFC3339 = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def test_captures_shows_times_as_rfc3339_in_tables_and_json(control_plane: support.ServerThread,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert control_plane.cp is not None
    # records are kept only for a deployment that captures
    docs = [{"kind": "Model", "metadata": {"name": "intent"}, "spec": {"variants": [
                {"name": v, "runtime": "onnx", "artifact": {"uri": f"{v}.onnx", "sha256": c * 64}} for v, c in (("small", "0"), ("large", "1"))]}},
            {"kind": "ModelDeployment", "metadata": {"name": "intent-eu"}, "spec": {
                "model": "intent", "variant": {"edge": "small", "datacenter": "large"},
                "cascade": {"stages": [{"variant": "small", "escalate": {"confidence": {"output": "p", "below": 0.8}}}, {"variant": "large"}],
                            "capture": {"sampleRate": 0.1, "zones": ["EU"]}}}}]
    catalog.apply_documents(control_plane.cp.store, loader.load_text("---\n".join(
        json.dumps({"apiVersion": "edgeplane.io/v1alpha1", **d}) + "\n" for d in docs)), actor="test")
    now = time.time()
    record = capture_store.Record(capture_store.Record.new_id(), "intent-eu", "intent", "EU", now, now + 86400.0, "edge-lyon",
                                  "small", 0.42, b"{}", None, b"{}", None)
    control_plane.cp.captures.zone("EU").add([record])
    expected = [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) for t in (now, now + 86400.0)]
    assert cli_main.main(["--server", control_plane.url, "captures", "EU", "-o", "json"]) == 0
    item = next(i for i in json.loads(capsys.readouterr().out)["items"] if i["id"] == record.id)
    assert [item["capturedAt"], item["expiresAt"]] == expected
    assert item["firstConfidence"] == 0.42  # the other numbers stay numbers
    assert cli_main.main(["--server", control_plane.url, "captures", "EU"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if record.id in line)
    assert re.findall(RFC3339, row) == expected, row
    assert not re.search(r"\d{10}\.\d", row), row  # no raw epoch seconds


# --- manifests: values YAML reads as another type, repeated fallback tiers ----------------------


DIGITS_SHA = "0123456701234567" * 4  # 64 digits: YAML reads it as a number (an octal one, even)


def model_with_sha(sha: str) -> str:
    return (f"apiVersion: edgeplane.io/v1alpha1\nkind: Model\nmetadata:\n  name: m\nspec:\n  variants:\n"
            f"  - name: small\n    runtime: onnx\n    artifact:\n      uri: artifacts/m.onnx\n      sha256: {sha}\n")


def issues_of(text: str) -> list[str]:
    with pytest.raises(ManifestError) as exc_info:
        loader.load_text(text, "m.yaml")
    return [str(i) for i in exc_info.value.issues]


def test_an_unquoted_all_digit_sha256_says_it_was_read_as_a_number() -> None:
    assert issues_of(model_with_sha(DIGITS_SHA)) == [
        f"m.yaml:11 (document 0): spec.variants[0].artifact.sha256: {DIGITS_SHA} was read as a number, not text: put it in quotes"]
    assert loader.load_text(model_with_sha(f'"{DIGITS_SHA}"'))[0].doc.spec.variants[0].artifact.sha256 == DIGITS_SHA  # type: ignore[union-attr]


@pytest.mark.parametrize(("field", "written", "said"), [
    ("spec.location.country", "NO", "NO was read as a boolean (false), not text: put it in quotes"),
    ("spec.location.region", "12.5", "12.5 was read as a number, not text: put it in quotes"),
    ("spec.location.region", "1e5", None),  # no dot: YAML reads text, which is fine
    ("metadata.labels.version", "2", "2 was read as a number, not text: put it in quotes"),
    ("metadata.annotations.since", "2024-05-01", "2024-05-01 was read as a date, not text: put it in quotes"),
])
def test_a_text_field_given_another_type_says_to_quote_it(field: str, written: str, said: str | None) -> None:
    values = {"spec.location.country": "FR", "spec.location.region": "eu-west", "metadata.labels.version": "v1",
              "metadata.annotations.since": "x", field: written}
    text = ("apiVersion: edgeplane.io/v1alpha1\nkind: Site\nmetadata:\n  name: s\n"
            f"  labels: {{version: {values['metadata.labels.version']}}}\n"
            f"  annotations: {{since: {values['metadata.annotations.since']}}}\n"
            "spec:\n  tier: edge\n"
            f"  location: {{country: {values['spec.location.country']}, region: {values['spec.location.region']}, lat: 45, lon: 4}}\n")
    if said is None:
        loader.load_text(text)
        return
    assert [i.split(": ", 1)[1] for i in issues_of(text)] == [f"{field}: {said}"]


def deployment(fallback: str) -> str:
    return (doc("Model", "m", support.model_spec())
            + f"---\napiVersion: edgeplane.io/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: d\nspec:\n  model: m\n"
              f"  routing:\n    fallback: {fallback}\n")


def test_a_fallback_that_names_a_tier_twice_is_refused() -> None:
    issues = issues_of(deployment("[edge, datacenter, edge]"))
    assert len(issues) == 1 and issues[0].endswith(
        "(document 1): spec.routing.fallback: edge is listed more than once: give each tier once, in the order to try them"), issues
    assert [d.name for d in loader.load_text(deployment("[edge, datacenter]"))] == ["m", "d"]


def test_a_stored_fallback_with_a_repeated_tier_still_reads() -> None:
    """Earlier versions stored it: the reconciler reads stored specs and must not stop on one."""
    spec = schema.ModelDeploymentSpec.model_validate({"model": "m", "routing": {"fallback": ["edge", "edge"]}})
    assert spec.routing.fallback == ["edge", "edge"]


def test_apply_prints_the_quote_hint_and_applies_nothing(control_plane: support.ServerThread, tmp_path: pathlib.Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(model_with_sha(DIGITS_SHA))
    assert cli_main.main(["--server", control_plane.url, "apply", "-f", str(path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: 1 problem(s) in the manifests; nothing was applied",
        f"  {path}:11 (document 0): spec.variants[0].artifact.sha256: {DIGITS_SHA} was read as a number, not text: put it in quotes"]
    assert cli_main.main(["--server", control_plane.url, "get", "model", "m"]) == 1


@pytest.mark.parametrize("args", [["apply", "-f", "-"], ["plan", "-f", "-"], ["infer", "m", "--data", "@-"],
                                  ["cascade", "tune", "m", "-f", "-"]])
def test_a_closed_standard_input_is_a_usage_error(args: list[str]) -> None:
    """``-f -`` or ``@-`` with standard input closed (a service, ``<&-``): one line and exit 2,
    where ``apply -f -`` reported an AttributeError as a bug."""
    command = " ".join([str(support.EDGEPLANE), "--server", "http://127.0.0.1:9", *args]) + " <&-"
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc
    assert proc.stderr.strip().splitlines() == [f"error: {'--data @-' if '@-' in args else '-f -'}: standard input is closed"]
