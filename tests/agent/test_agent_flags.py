"""``edgeplane-agent`` refuses, before it starts, what the control plane would refuse at the
join or what could never work (a CA file that is not there, a join port past 65535, a
country that is not one): one line naming the flag."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from edge_agent import main as agent_main
from orchestrator.testing import harness

BASE = ["--control-plane", "127.0.0.1:8081", "--token", "t", "--data-dir", "/tmp/unused"]


@pytest.mark.parametrize(("args", "message"), [
    (["--site", "Edge_X"], "argument --site: 'Edge_X' must be a DNS label"),
    (["--site", "edge-x", "--label", "rack=a b"], "argument --label: label rack='a b': a value is empty or letters"),
    (["--site", "edge-x", "--label", "ra ck=a"], "argument --label: label key 'ra ck' must be letters"),
    (["--site", "edge-x", "--label", "rack=" + "a" * 64], "at most 63 characters"),
    (["--site", "x" * 64], "must be a DNS label"),
    # a look-alike: the character that makes it one is named, as in a manifest
    (["--site", "\u0440aris"], "must be a DNS label: lowercase letters, digits and '-', at most 63 characters; "
                              "its character 1 is U+0440 CYRILLIC SMALL LETTER ER, not ASCII"),
    (["--site", "paris\u200b"], "; its character 6 is U+200B ZERO WIDTH SPACE, not ASCII"),
    (["--site", "cafe\u0301"], "; its character 5 is U+0301 COMBINING ACUTE ACCENT, not ASCII"),
    (["--site", "edge-x", "--label", "zone=eu\u00a0west"], "; its character 3 is U+00A0 NO-BREAK SPACE, not ASCII"),
    (["--site", "edge-x", "--label", "z\u043ene=eu"], "label key 'z\u043ene' must be letters, digits and '-_./', starting and ending "
                                                     "with a letter or digit, at most 253 characters; its character 2 is U+043E "
                                                     "CYRILLIC SMALL LETTER O, not ASCII"),
    (["--site", "edge-x", "--country", "FRA"], "argument --country: 'FRA' must be an ISO 3166 alpha-2 code"),
    (["--site", "edge-x", "--country", "XX"], "argument --country: 'XX' must be an ISO 3166 alpha-2 code"),
    (["--site", "edge-x", "--country", "eu"], "argument --country: 'eu' must be an ISO 3166 alpha-2 code"),
    (["--site", "edge-x", "--heartbeat-interval", "nan"], "argument --heartbeat-interval: 'nan' is not a finite number"),
    (["--site", "edge-x", "--heartbeat-interval", "5000000"], "argument --heartbeat-interval: 5000000 is not from 0.05 to 300"),
    (["--site", "edge-x", "--heartbeat-interval", "0.01"], "argument --heartbeat-interval: 0.01 is not from 0.05 to 300"),
    (["--site", "edge-x", "--lat", "nan", "--lon", "1"], "argument --lat: 'nan' is not a finite number"),
    (["--site", "edge-x", "--lat", "95", "--lon", "1"], "argument --lat: 95 is not from -90 to 90"),
    (["--site", "edge-x", "--lat", "45", "--lon", "181"], "argument --lon: 181 is not from -180 to 180"),
    (["--site", "edge-x", "--lat", "45.7"], "argument --lat: --lat and --lon go together"),
    (["--site", "edge-x", "--lon", "4.8"], "argument --lon: --lat and --lon go together"),
    (["--site", "edge-x", "--ca-file", "ca.crt", "--ca-sha256", "ab" * 32], "argument --ca-sha256: not allowed with argument --ca-file"),
    # the URLs the control plane refuses at every join
    (["--site", "edge-x", "--advertise-url", "10.1.2.3:8090"], "argument --advertise-url: '10.1.2.3:8090' must be an http(s) URL"),
    (["--site", "edge-x", "--advertise-url", "ftp://10.1.2.3"], "argument --advertise-url: 'ftp://10.1.2.3' must be an http(s) URL"),
    (["--site", "edge-x", "--advertise-url", "http://10.1.2.3:99999"], "must be an http(s) URL with a host and, if any, a port"),
    (["--site", "edge-x", "--advertise-url", "http://[::1"], "argument --advertise-url: 'http://[::1' is not a URL (Invalid IPv6 URL)"),
    (["--site", "edge-x", "--advertise-url", "http://0.0.0.0:8090"], "argument --advertise-url: 'http://0.0.0.0:8090' is an address to listen on, not one others can reach"),
    (["--site", "edge-x", "--workers", "-1"], "argument --workers: -1 is not from 0 to 1024"),
    (["--site", "edge-x", "--max-queued-runs", "-1"], "argument --max-queued-runs: -1 is not from 0 to"),
    (["--site", "edge-x", "--max-inflight-bytes", "-1"], "argument --max-inflight-bytes: -1 is not from 0 to"),
    (["--site", "edge-x", "--max-request-bytes", "0"], "argument --max-request-bytes: 0 is not from 1 to"),
    (["--site", "edge-x", "--inline-max-ms", "-5"], "argument --inline-max-ms: must be >= 0"),
    (["--site", "edge-x", "--max-artifact-gb", "0"], "argument --max-artifact-gb: must be > 0"),
    (["--site", "edge-x", "--max-downloads", "-1"], "argument --max-downloads: -1 is not from 0 to 64"),
    (["--site", "edge-x", "--download-timeout", "0"], "argument --download-timeout: must be > 0"),
    (["--site", "edge-x", "--download-speed-limit", "-1"], "argument --download-speed-limit: -1 is not from 0 to"),
    (["--site", "edge-x", "--download-speed-time", "0"], "argument --download-speed-time: must be > 0"),
    (["--site", "edge-x", "--drain-timeout", "inf"], "argument --drain-timeout: 'inf' is not a finite number"),
    (["--site", "edge-x", "--log-level", "bogus"], "argument --log-level: invalid choice: 'bogus'"),
    (["--site", "edge-x", "--ca-sha256", "abc"], "argument --ca-sha256: 'abc' is not a SHA-256"),
    (["--site", "edge-x", "--control-plane", "nohostport"], "argument --control-plane: 'nohostport' must be HOST:PORT"),
    (["--site", "edge-x", "--control-plane", "127.0.0.1:abc"], "argument --control-plane: '127.0.0.1:abc' must be HOST:PORT"),
    (["--site", "edge-x", "--control-plane", "127.0.0.1:\u00b2"], "argument --control-plane: '127.0.0.1:\u00b2' must be HOST:PORT"),
    (["--site", "edge-x", "--control-plane", "127.0.0.1:99999"], "argument --control-plane: '127.0.0.1:99999': 99999 is not a port"),
    (["--site", "edge-x", "--control-plane", "cp:0"], "argument --control-plane: 'cp:0': 0 is not a port to dial"),
    (["--site", "edge-x", "--control-plane", "::1:8081"], "argument --control-plane: '::1:8081': an IPv6 address goes in brackets"),
    (["--site", "edge-x", "--control-plane", "cp-a:8081,cp-b"], "argument --control-plane: 'cp-b' must be HOST:PORT"),
    (["--site", "edge-x", "--control-plane", " , "], "argument --control-plane: needs at least one HOST:PORT"),
    (["--site", "edge-x", "--join-address", "cp:65536"], "argument --join-address: 'cp:65536': 65536 is not a port"),
    (["--site", "edge-x", "--control-plane", "cp:65535"],
     "argument --control-plane: 'cp:65535': the join listener is looked for at the next port, and 65535 has none: give --join-address"),
    (["--site", "edge-x", "--control-plane", "cp-a:8081,[::1]:65535", "--ca-sha256", "ab" * 32], "'[::1]:65535': the join listener"),
    (["--site", "edge-x", "--runtimes", "onnx,vllm"], "argument --runtimes: 'vllm' is not a runtime an agent runs (onnx, onnx-genai)"),
    (["--site", "edge-x", "--runtimes", " , "], "argument --runtimes: needs at least one of onnx, onnx-genai"),
])
def test_a_bad_flag_is_a_usage_error(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        agent_main.parser().parse_args(BASE + args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err
    assert len(err.splitlines()) == 1, err  # the usage would bury it


@pytest.mark.parametrize(("args", "message"), [
    (["--ca-file", "/nonexistent/ca.crt"], r"--ca-file /nonexistent/ca.crt: No such file or directory"),
    (["--ca-file", "NOT_PEM"], r"not.pem: not a PEM certificate"),
])
def test_what_cannot_work_stops_the_start(args: list[str], message: str, tmp_path: pathlib.Path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    named = {"NOT_PEM": str(not_pem), "CA": str(ca)}
    parsed = agent_main.parser().parse_args(BASE + ["--site", "edge-x"] + [named.get(a, a) for a in args])
    with pytest.raises(SystemExit, match=message):
        agent_main.config_from_args(parsed)


def test_good_flags_reach_the_config(tmp_path: pathlib.Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    config = agent_main.config_from_args(agent_main.parser().parse_args(
        BASE + ["--site", "edge-lyon", "--ca-file", str(ca), "--country", "fr", "--lat", "45.76", "--lon", "4.84"]))
    assert agent_main.parser().parse_args(BASE + ["--site", "edge-lyon", "--log-level", "WARNING"]).log_level == "warning"
    assert (config.site, config.country, config.ca_file, config.lat, config.lon) == ("edge-lyon", "FR", ca, 45.76, 4.84)
    assert agent_main.parser().parse_args(BASE + ["--site", "edge-x", "--country", "gr"]).country == "GR"
    assert agent_main.config_from_args(agent_main.parser().parse_args(
        BASE + ["--site", "edge-x", "--advertise-url", "https://[2001:db8::5]:8443/"])).advertise_url == "https://[2001:db8::5]:8443/"
    assert agent_main.config_from_args(agent_main.parser().parse_args(
        BASE + ["--site", "edge-x", "--max-queued-runs", "8"])).max_queued_runs == 8
    assert agent_main.config_from_args(agent_main.parser().parse_args(
        BASE + ["--site", "edge-x", "--max-inflight-bytes", "268435456"])).max_inflight_bytes == 256 << 20
    assert agent_main.config_from_args(agent_main.parser().parse_args(BASE + ["--site", "edge-x"])).max_inflight_bytes == 0


def test_runtimes_offered_reach_the_config_once_each_and_default_to_those_installed() -> None:
    def config(*args: str) -> tuple[str, ...] | None:
        return agent_main.config_from_args(agent_main.parser().parse_args(BASE + ["--site", "edge-x", *args])).runtimes
    assert config() is None  # the agent offers what it finds installed (edge_agent.runtime.installed)
    assert config("--runtimes", "onnx") == ("onnx",)
    assert config("--runtimes", "onnx-genai, onnx,onnx-genai") == ("onnx-genai", "onnx")


#: An agent's Python on a machine without onnxruntime-genai: its import fails, as when it is not installed.
WITHOUT_GENAI = "import sys; sys.modules['onnxruntime_genai'] = None; "


def test_the_agent_offers_onnx_genai_only_where_onnxruntime_genai_is_installed() -> None:
    code = "from edge_agent import runtime; print(','.join(runtime.installed())); print(sorted(set(sys.modules) & {'onnxruntime_genai'}))"
    assert subprocess.run([sys.executable, "-c", "import sys; " + code], capture_output=True, text=True,
                          check=True).stdout.split() == ["onnx,onnx-genai", "[]"]  # looked up, not imported
    assert subprocess.run([sys.executable, "-c", WITHOUT_GENAI + code], capture_output=True, text=True,
                          check=True).stdout.split()[0] == "onnx"


def test_offering_a_runtime_not_installed_stops_the_start() -> None:
    proc = subprocess.run([sys.executable, *harness.WITHOUT_GENAI, *BASE, "--site", "edge-x", "--runtimes", "onnx,onnx-genai"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "edgeplane-agent: --runtimes onnx,onnx-genai: onnx-genai is not installed here (onnx-genai needs onnxruntime-genai "
        "with its library: pip install 'edgeplane[cpu]' or 'edgeplane[gpu]')"), proc.stderr


def test_the_artifact_size_limit_takes_the_documented_edge_model_and_can_be_set() -> None:
    default = agent_main.config_from_args(agent_main.parser().parse_args(BASE + ["--site", "edge-x"]))
    assert default.max_artifact_bytes >= 14_000_000_000  # gpt-oss-20b's package (docs/generative.md)
    config = agent_main.config_from_args(agent_main.parser().parse_args(BASE + ["--site", "edge-x", "--max-artifact-gb", "1.5"]))
    assert config.max_artifact_bytes == 3 << 29


def test_downloads_at_once_are_not_limited_unless_asked() -> None:
    default = agent_main.config_from_args(agent_main.parser().parse_args(BASE + ["--site", "edge-x"]))
    assert default.max_downloads == 0
    one = agent_main.config_from_args(agent_main.parser().parse_args(BASE + ["--site", "edge-x", "--max-downloads", "1"]))
    assert one.max_downloads == 1


def test_a_download_s_timeout_and_speed_limit_are_curl_s_and_can_be_set() -> None:
    default = agent_main.config_from_args(agent_main.parser().parse_args(BASE + ["--site", "edge-x"]))
    assert (default.download_timeout, default.download_speed_limit, default.download_speed_time) == (30.0, 1000, 60.0)
    thin = agent_main.config_from_args(agent_main.parser().parse_args(
        BASE + ["--site", "edge-x", "--download-timeout", "90", "--download-speed-limit", "0", "--download-speed-time", "120"]))
    assert (thin.download_timeout, thin.download_speed_limit, thin.download_speed_time) == (90.0, 0, 120.0)


@pytest.mark.parametrize("args", [
    ["--control-plane", "cp:65535", "--join-address", "cp:8082"],
    ["--control-plane", "cp:65535", "--insecure"],  # no join listener with plaintext gRPC
])
def test_an_agent_port_of_65535_is_taken_when_the_join_listener_needs_no_guess(args: list[str]) -> None:
    assert agent_main.parser().parse_args(["--site", "edge-x", "--token", "t", *args]).control_plane == "cp:65535"


@pytest.mark.parametrize(("value", "targets"), [
    ("cp.example:7443", ["cp.example:7443"]),
    ("[::1]:8081", ["[::1]:8081"]),
    ("[2001:db8::1]:8081, cp-b:8081,", ["[2001:db8::1]:8081", "cp-b:8081"]),
    ("10.0.0.1:8081,10.0.0.2:65535", ["10.0.0.1:8081", "10.0.0.2:65535"]),
])
def test_good_control_plane_addresses_are_dialled_as_written(value: str, targets: list[str]) -> None:
    args = agent_main.parser().parse_args(["--control-plane", value, "--site", "edge-x", "--token", "t", "--join-address", "[::1]:8082"])
    assert agent_main.config_from_args(args).control_planes == targets and args.join_address == "[::1]:8082"


def test_checking_the_country_keeps_pycountry_out_of_the_daemon() -> None:
    code = ("import sys; from edge_agent import main; "
            "main.parser().parse_args(['--control-plane', 'cp:8081', '--site', 'edge-x', '--token', 't', '--country', 'FR']); "
            "print(sorted({'pycountry', 'email', 'zipfile', 'tempfile'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # the ISO 3166 list is read as data
