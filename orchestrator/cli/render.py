"""How read commands print: tables for people, ``-o json|yaml`` for scripts."""

from __future__ import annotations

import codecs
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import yaml
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from edgeplane_proto import logformat
from orchestrator import units

COLUMNS: dict[str, list[tuple[str, Any]]] = {
    "Site": [
        ("NAME", lambda o: o["metadata"]["name"]),
        ("TIER", lambda o: o["spec"]["tier"]),
        ("COUNTRY", lambda o: o["spec"]["location"]["country"]),
        ("REGION", lambda o: o["spec"]["location"].get("region") or "-"),
        ("CPU", lambda o: _num(_capacity(o).get("cpu"))),
        ("MEM GiB", lambda o: _num(_capacity(o).get("memoryGiB"))),
        ("GPUS", lambda o: _gpus(_capacity(o).get("gpus") or [])),
        ("RUNTIMES", lambda o: runtimes(o)),
        ("HEALTH", lambda o: o.get("status", {}).get("health", "-")),
        ("SCHEDULING", lambda o: scheduling(o.get("status", {}))),
        ("POWER W", lambda o: power(o.get("status", {}))),
        ("SOURCE", lambda o: o.get("status", {}).get("capacitySource", "declared")),
    ],
    "Model": [
        ("NAME", lambda o: o["metadata"]["name"]),
        ("VARIANTS", lambda o: ", ".join(f"{v['name']}({v['runtime']})" for v in o["spec"]["variants"])),
        ("GENERATION", lambda o: o["metadata"]["generation"]),
    ],
    "ModelDeployment": [
        ("NAME", lambda o: o["metadata"]["name"]),
        ("MODEL", lambda o: o["spec"]["model"]),
        ("REPLICAS", lambda o: f"{o.get('status', {}).get('readyReplicas', 0)}/{o.get('status', {}).get('replicas', 0)} (min {o['spec']['replicas']['min']}, max {o['spec']['replicas']['max']})"),
        ("RESIDENCY", lambda o: ",".join(o["spec"].get("placement", {}).get("residency") or []) or "any"),
        ("PHASE", lambda o: _phase(o.get("status", {}))),
        ("REASON", lambda o: o.get("status", {}).get("reason") or ""),
    ],
}


def scheduling(status: dict[str, Any]) -> str:
    """A Site's maintenance in a word or three: ``Schedulable``, ``Cordoned``,
    ``Draining (n replicas left)`` or ``Drained``."""
    m = status.get("maintenance")
    if not m:
        return "Schedulable"
    if m.get("state") == "Draining":
        left = m.get("replicasLeft", 0)
        return f"Draining ({left} replica{'' if left == 1 else 's'} left)"
    return str(m.get("state", "-"))


def runtimes(site: dict[str, Any]) -> str:
    """The model runtimes a site runs replicas of: its agent's (``onnx,onnx-genai``), every
    one in a data centre (``any``), none known without an agent (``-``)."""
    agent = site.get("status", {}).get("agent")
    if agent is not None:
        return ",".join(agent.get("runtimes") or []) or "-"  # a control plane of an earlier release says none
    return "any" if site["spec"].get("tier") == "datacenter" else "-"


def power(status: dict[str, Any]) -> str:
    """A budgeted site's estimated draw against its budget, facility watts: ``144/150``
    (``-`` without a budget)."""
    p = status.get("power")
    if not p:
        return "-"
    return f"{units.show_watts(p.get('estimatedWatts', 0))}/{units.show_watts(p.get('budgetWatts', 0))}"


def _phase(status: dict[str, Any]) -> str:
    """The phase, with a rollout's progress and the autoscaler's count when there are."""
    out = status.get("phase", "Pending")
    rollout = status.get("rollout")
    if rollout:
        total = rollout["upgraded"] + rollout["switching"] + rollout["waiting"]
        step = f", canary {rollout['canaryStep']}" if "canaryStep" in rollout else ""
        out += f", rollout {rollout['upgraded']}/{total}{step}" + (" HALTED" if "halted" in rollout else "")
        if rollout.get("replacing"):
            out += f", replacing on {', '.join(rollout['replacing'])}"
    scaling = status.get("autoscaling")
    if scaling and "desiredReplicas" in scaling:
        out += f", autoscaled to {scaling['desiredReplicas']}"
        if "observedPerReplica" in scaling:  # absent while no replica reports load (the count is held)
            out += f" ({scaling['observedPerReplica']:g} {scaling.get('metric', '')}/replica)"
    return out


def _capacity(o: dict[str, Any]) -> dict[str, Any]:
    return o.get("status", {}).get("capacity") or o["spec"].get("capacity") or {}


def _num(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def _gpus(gpus: list[dict[str, Any]]) -> str:
    return ", ".join(f"{g['count']}x{g['model']} {g['memoryGiB']:g}GiB" for g in gpus) or "-"


def dump(data: Any, output: str, stream: TextIO | None = None) -> None:
    """``data`` as JSON or YAML on ``stream`` (standard output by default), text in any script
    as itself (escaped only where the stream cannot hold it: :func:`holds_text`)."""
    stream = stream or sys.stdout
    plain = holds_text(stream)
    if output == "json":
        stream.write(json_text(data, indent=2, ascii_only=not plain) + "\n")
    else:
        # YAML has .nan and .inf; a lone surrogate is escaped even with allow_unicode
        yaml.safe_dump(data, stream, sort_keys=False, allow_unicode=plain)


def holds_text(stream: Any) -> bool:
    """Whether ``stream`` writes UTF-8, so that "北京" or "👩‍💻" print as themselves: a
    terminal with a latin-1 (or ASCII) locale gets the escapes JSON and YAML define instead,
    which read back the same, not an error part way through."""
    try:
        return codecs.lookup(getattr(stream, "encoding", None) or "ascii").name == "utf-8"
    except LookupError:
        return False


def json_text(data: Any, indent: int | None = None, sort_keys: bool = False, ascii_only: bool = True) -> str:
    """``data`` as JSON that any parser reads: a model's output may hold NaN or infinities,
    which JSON has no numbers for (Python's json would write bare ``NaN``, which JavaScript,
    Go or jq refuse), so they are the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``,
    as protobuf's JSON mapping writes them. Without ``ascii_only`` text prints as itself,
    but for a lone surrogate (no UTF-8 can hold it), which is escaped."""
    text = json.dumps(_finite(data), indent=indent, sort_keys=sort_keys, allow_nan=False, ensure_ascii=ascii_only)
    if not ascii_only and any("\ud800" <= c <= "\udfff" for c in text):
        return json.dumps(_finite(data), indent=indent, sort_keys=sort_keys, allow_nan=False)
    return text


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


#: the most a REASON cell shows on a terminal (piped: whole)
REASON_WIDTH = 70
#: no column is cut narrower than this on a terminal: a short name, a word, a number stays whole
NARROWEST = 8
#: the blanks between two columns of a table
GAP = 2


def column_caps(widths: Sequence[int], room: int) -> list[int] | None:
    """The widest each column may print so that the columns, ``widths`` wide whole, fit
    ``room`` cells (the gaps between them taken off): the first (what a row is: the name a
    person types next) stays whole, the widest of the others are cut first, all to one width,
    and none below :data:`NARROWEST`. None when even that does not fit: the table is then
    printed whole, never with a column dropped or every cell cut to a letter or two."""
    if sum(widths) <= room:
        return list(widths)
    first, rest = widths[0], widths[1:]
    for cap in range(max(rest, default=0) - 1, NARROWEST - 1, -1):  # bounded by the widest column
        if first + sum(min(w, cap) for w in rest) <= room:
            return [first, *(min(w, cap) for w in rest)]
    return None


def one_line(value: Any) -> str:
    """``value`` as a cell of a line a person reads: what users, agents and Ray wrote (a reason,
    a description, an error) with each control character escaped as the text log writes it
    (``\\n``, ``\\t``, ``\\x1b``: ``edgeplane_proto.logformat.escape``), so that it neither
    starts a row or column of its own nor moves or colours the terminal."""
    return logformat.escape(str(value))


def table(title: str | None, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """One object a line under a header. A terminal gets its own width (the first column whole,
    the widest others cut with "…" first, a long REASON at 70 characters; a table that cannot
    fit so is printed whole and the terminal wraps it: rich, left to fit it, cut every column
    alike, a number to "1…", and dropped the narrowest); piped output (scripts, grep) gets
    every cell whole, however wide: a script cannot see what was cut. Whether stdout is a
    terminal is asked of stdout itself: rich takes FORCE_COLOR or TTY_COMPATIBLE, which CI
    pipelines set for coloured logs, for one, and would cut a pipe's lines to 80 columns."""
    # Every string goes in as Text: rich reads "[...]" in a plain str as markup, and the cells
    # hold what users wrote (an event's reason, a token's description): "[incident-42]" vanished
    # and "[/x]" raised MarkupError. Their control characters are escaped (one_line).
    held = _held_by(sys.stdout)
    cells = [[Text(held(one_line(c))) for c in r] for r in rows]
    heads = [Text(held(h)) for h in headers]
    widths = [max([heads[i].cell_len, *(r[i].cell_len for r in cells if i < len(r))]) for i in range(len(heads))]
    terminal = _stdout_is_terminal()
    if terminal:
        widths = [min(w, REASON_WIDTH) if h == "REASON" else w for h, w in zip(headers, widths)]
    console = Console()
    caps = column_caps(widths, console.width - GAP * (len(widths) - 1)) if terminal else None
    t = Table(title=Text(held(title)) if title is not None else None, box=None, header_style="bold", pad_edge=False)
    if caps is not None and held("…") != "…":  # cut here, with a mark the terminal holds, to the width measured
        heads = [_cut(h, cap) for h, cap in zip(heads, caps)]
        cells = [[_cut(c, cap) for c, cap in zip(r, caps)] for r in cells]
    for head, cap in zip(heads, caps or widths):
        # no_wrap: one object, one line, tables stay greppable
        t.add_column(head, no_wrap=True, overflow="ellipsis", max_width=cap if terminal else None)
    for r in cells:
        t.add_row(*r)
    if caps is not None:
        console.print(t)
        return
    whole = Measurement.get(console, console.options.update_width(sys.maxsize), t).maximum
    Console(width=whole).print(t)


def _cut(cell: Text, cap: int) -> Text:
    """``cell`` cut to ``cap`` cells with "..." where the terminal cannot hold "…", the mark
    rich cuts with: its escape would print 6 characters where the table measured one. The
    cell holds only what the terminal holds (:func:`_held_by`), one cell a character."""
    return cell if cell.cell_len <= cap else Text(cell.plain[:max(cap - 3, 0)] + "..."[:cap])


def _held_by(stream: Any) -> Callable[[str], str]:
    """What ``stream`` writes of a text: as itself where it holds it (UTF-8), else each
    character its encoding (latin-1, ASCII) lacks as the escape written instead ("北京" as
    ``\\u5317\\u4eac``, as the CLI sets standard output to write it: ``main._print_any_text``).
    A table measures its columns on that, not on the 4 cells "北京" takes printed as itself."""
    if holds_text(stream):
        return str
    try:
        encoding = codecs.lookup(getattr(stream, "encoding", None) or "ascii").name
    except LookupError:
        encoding = "ascii"
    return lambda text: text.encode(encoding, "backslashreplace").decode(encoding)


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False


def objects(kind: str, items: list[dict[str, Any]]) -> None:
    cols = COLUMNS[kind]
    if not items:
        print(f"No {kind} objects.")
        return
    table(None, [c[0] for c in cols], [[c[1](o) for c in cols] for o in items])
