"""Manifests and data files saved as UTF-16 or UTF-32 with a byte-order mark, as Windows
PowerShell 5 writes every ``>`` redirect and ``Out-File`` (``edgeplane get site x -o yaml >
site.yaml``): YAML 1.1 defines them, kubectl applies them, and so do ``apply -f``, ``--data
@FILE`` and ``POST /v1/apply``. Without a byte-order mark text is UTF-8, and anything else is
refused in one line naming the file."""

from __future__ import annotations

import pathlib

import pytest

from orchestrator.cli import http, textfile
from orchestrator.cli.http import CliError
from orchestrator.manifests import loader
from orchestrator.manifests.errors import ManifestError

SITE = """apiVersion: edgeplane.io/v1alpha1
kind: Site
metadata:
  name: beijing
  annotations: {description: "北京边缘站点 👩‍💻"}
spec:
  tier: edge
  location: {country: CN, region: 北京, lat: 39.9, lon: 116.4}
  capacity: {cpu: 4, memoryGiB: 8}
"""

ENCODED = [
    pytest.param(SITE.encode("utf-16"), id="utf-16 (PowerShell 5)"),
    pytest.param(SITE.encode("utf-16-be")[:0] + b"\xfe\xff" + SITE.encode("utf-16-be"), id="utf-16-be"),
    pytest.param(SITE.replace("\n", "\r\n").encode("utf-16"), id="utf-16 with CRLF"),
    pytest.param(SITE.encode("utf-32"), id="utf-32"),
    pytest.param(SITE.encode("utf-8-sig"), id="utf-8 with a byte-order mark"),
]


@pytest.mark.parametrize("raw", ENCODED)
def test_the_api_reads_a_manifest_with_a_byte_order_mark(raw: bytes) -> None:
    (doc,) = loader.load_text(raw, "<request>")
    assert doc.doc.metadata.annotations["description"] == "北京边缘站点 👩‍💻"
    assert doc.doc.spec.location.region == "北京"  # type: ignore[union-attr]


@pytest.mark.parametrize("raw", ENCODED)
def test_a_command_reads_a_file_with_a_byte_order_mark(raw: bytes, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "sité de Paris.yaml"
    path.write_bytes(raw)
    assert textfile.read(path).replace("\r\n", "\n") == SITE
    assert [text.replace("\r\n", "\n") for _, text in textfile.manifest_texts(str(path))] == [SITE]


ASCII_SITE = SITE.replace("北京边缘站点 👩‍💻", "Beijing edge").replace("北京", "Beijing")
NO_MARK = "looks like UTF-16 without a byte-order mark: save it as UTF-8"


@pytest.mark.parametrize("raw", [
    pytest.param(SITE.encode("utf-16-le"), id="utf-16-le"),
    pytest.param(SITE.encode("utf-16-be"), id="utf-16-be"),
    pytest.param(ASCII_SITE.encode("utf-16-le"), id="utf-16-le, ASCII alone (valid UTF-8 but for its NULs)"),
    pytest.param(ASCII_SITE.replace("\n", "\r\n").encode("utf-16-be"), id="utf-16-be, ASCII alone, CRLF"),
])
def test_utf16_without_a_byte_order_mark_is_refused_saying_so(raw: bytes, tmp_path: pathlib.Path) -> None:
    _refused_as_utf16(raw, tmp_path)


def _refused_as_utf16(raw: bytes, tmp_path: pathlib.Path) -> None:
    """Both readers, a file's and a request body's, refuse it with the hint to save it as UTF-8."""
    path = tmp_path / "site.yaml"
    path.write_bytes(raw)
    with pytest.raises(CliError, match=rf"^{path}: not UTF-8 text \(byte \d+\): it {NO_MARK}$"):
        textfile.read(path)
    with pytest.raises(ManifestError, match=rf"not UTF-8 text \(byte \d+\): it {NO_MARK}"):
        loader.load_text(raw, "<request>")


#: What a person writes first in Chinese: 、，。 hold a control byte in UTF-16 (U+3001, U+FF0C,
#: U+3002), the ideographs none, and no ASCII comes for the first 256 characters.
CJK_HEAD = "# 北京边缘站点的清单，由运维组维护。修改前请先与机房值班、网络组和安全组确认，并在工单中记录原因。" * 6


@pytest.mark.parametrize("raw", [
    pytest.param((CJK_HEAD + "\n" + SITE).encode("utf-16-le"), id="utf-16-le, a long Chinese comment first"),
    pytest.param((CJK_HEAD + "\n" + SITE).encode("utf-16-be"), id="utf-16-be, a long Chinese comment first"),
    pytest.param(CJK_HEAD[2:].encode("utf-16-le"), id="utf-16-le, Chinese alone: no NUL at all"),
])
def test_utf16_of_text_mostly_not_ascii_is_refused_saying_so(raw: bytes, tmp_path: pathlib.Path) -> None:
    """Its first bytes hold few NULs, or none: they read as UTF-16 of assigned characters
    with the control bytes text in any 8-bit encoding never holds, where UTF-8 cannot read them."""
    assert raw[:512].count(0) < 512 // 4
    _refused_as_utf16(raw, tmp_path)


@pytest.mark.parametrize(("text", "encoding"), [
    ("# 北京边缘站点的清单，由运维组维护。\nname: 北京\n", "gbk"),
    ("# 東京のエッジサイト、運用チームが管理。\nname: 東京\n", "shift_jis"),
    ("# 서울 엣지 사이트\nname: 서울\n", "euc_kr"),
    ("# Fa\u00e7ade: g\u00e9r\u00e9e par l'\u00e9quipe r\u00e9seau\f\nname: caf\u00e9\n", "cp1252"),
    # short files whose few byte pairs all happen to read as assigned characters
    ("# r\u00e9seau\f\nkind: Site\n", "latin-1"),
    ("\x1b[32mname: caf\u00e9\x1b[0m\n", "latin-1"),  # a terminal's colours kept by a redirect
    ("name: na\u00efve\x1a", "cp1252"),  # a DOS end-of-file mark
])
def test_text_of_8_bit_encodings_is_not_called_utf16(text: str, encoding: str, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_bytes(text.encode(encoding))
    with pytest.raises(CliError, match=r"site.yaml: not UTF-8 text \(byte \d+\)$"):
        textfile.read(path)


def test_other_bytes_are_not_called_utf16(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_bytes("na\u00efve: caf\u00e9".encode("latin-1"))
    with pytest.raises(CliError, match=r"site.yaml: not UTF-8 text \(byte 2\)$"):
        textfile.read(path)
    path.write_bytes(b"a: 1\n\x00b: 2\n")  # a NUL alone is UTF-8: read as it is (YAML then says what it makes of it)
    assert textfile.read(path) == "a: 1\n\x00b: 2\n"


def test_a_broken_utf16_file_is_refused_naming_its_encoding(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_bytes(SITE.encode("utf-16")[:-1])  # cut in the middle of a character
    with pytest.raises(CliError, match=r"site.yaml: not UTF-16 text \(byte \d+\)"):
        textfile.read(path)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_a_token_file_powershell_or_notepad_wrote_is_read(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, encoding: str) -> None:
    """``edgeplane token create ... > token.txt`` in PowerShell 5 writes UTF-16 with a mark,
    Notepad UTF-8 with one: EDGEPLANE_TOKEN_FILE is the token, the mark no part of it."""
    (tmp_path / "token.txt").write_text("ept_abc-123\r\n", encoding=encoding)
    monkeypatch.delenv("EDGEPLANE_TOKEN", raising=False)
    monkeypatch.setenv("EDGEPLANE_TOKEN_FILE", str(tmp_path / "token.txt"))
    assert http.token_from_env(None) == "ept_abc-123"
