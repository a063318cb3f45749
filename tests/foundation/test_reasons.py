"""A caller's reason through ``X-Edgeplane-Reason``: what the CLI sends, what the control plane reads."""

from __future__ import annotations

import pytest

from orchestrator import reasons


@pytest.mark.parametrize(("reason", "sent"), [
    ("disk swap", "disk swap"),  # ASCII goes as it is, readable in any proxy's log
    ("50% done", "50% done"),
    ("  padded  ", "padded"),
    ("maintenance électrique", "UTF-8''maintenance%20%C3%A9lectrique"),
    ("終わり", "UTF-8''%E7%B5%82%E3%82%8F%E3%82%8A"),
    ("utf-8'' as written", "UTF-8''utf-8%27%27%20as%20written"),  # would be read as encoded otherwise
    ("one\ntwo", "one two"),
])
def test_what_the_cli_sends(reason: str, sent: str) -> None:
    assert reasons.to_header(reason) == sent
    assert reasons.from_header(sent, "default") == reasons.cleaned(reason)


@pytest.mark.parametrize(("value", "read"), [
    (None, "default"),
    ("", "default"),
    ("disk swap", "disk swap"),
    ("50%20 done", "50%20 done"),  # not encoded: a % is a %
    ("réparé".encode().decode("latin-1"), "réparé"),  # curl's UTF-8 bytes, as the server reads a header
    ("r\xe9par\xe9", "r\xe9par\xe9"),  # bytes that are not UTF-8: latin-1 indeed
    ("utf-8''%C3%A9t%C3%A9", "été"),  # the prefix in any case
    ("UTF-8''%FF%FE", "\ufffd\ufffd"),  # not UTF-8 once decoded: replaced, not refused
    ("UTF-8''a%0D%0Ab%09c", "a  b c"),  # no reason makes a line of its own in the log
    ("UTF-8''%20%0A", "default"),
    ("x" * 600, "x" * reasons.MAX_CHARS),
])
def test_what_the_control_plane_reads(value: str | None, read: str) -> None:
    assert reasons.from_header(value, "default") == read
