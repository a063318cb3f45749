"""What a generated token costs in calls: ``runtime.oga`` (the C API through ctypes) against
onnxruntime-genai's Python binding, same model, same process, taking turns.

    .venv/bin/python -m bench.genai_calls [--quick] [--against OLD_OGA_PY]

Each loop is the one the agent runs per token, without the agent around it: a step, the
next token, its text from a tokenizer stream, and ``is_done``. ``step alone`` is the
library's step with nothing else (the C API, GIL kept), the floor both loops stand on; what
each loop adds over it is what its calls cost per token. The model is ``bench.genai_agent``'s
``tiny``, whose steps take about 15 us here, so the calls are a large share of a token; with
steps of milliseconds they are lost in the steps' own noise. ``--against`` times another copy of ``runtime/oga.py`` (say, ``git show REV:...``) in the
same turns. Writes bench/results/genai_calls.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from rich.console import Console
from rich.table import Table

from edge_agent.runtime import oga
from orchestrator.testing import genai_model

RESULTS = Path(__file__).parent / "results" / "genai_calls.json"
PROMPT = "The agent serves the request"
#: An end-of-sequence bias of -1000 keeps every loop going for as many tokens as asked.
MODEL = dict(context_length=1024, eos_bias=-1000.0)
TOKENS = 400


def binding_loop(directory: Path, tokens: int) -> Callable[[], float]:
    import onnxruntime_genai as og

    model = og.Model(str(directory))
    tokenizer = og.Tokenizer(model)
    prompt = tokenizer.encode(PROMPT)

    def run() -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + tokens, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        stream = tokenizer.create_stream()
        n, started = 0, time.perf_counter()
        while n < tokens - 1 and not generator.is_done():
            generator.generate_next_token()
            stream.decode(int(generator.get_next_tokens()[0]))
            n += 1
        return (time.perf_counter() - started) / n

    return run


def oga_loop(module: ModuleType, directory: Path, tokens: int, *, step_alone: bool = False) -> Callable[[], float]:
    model = module.Model(directory)
    tokenizer = module.Tokenizer(model)
    prompt = tokenizer.encode(PROMPT)

    def run() -> float:
        generator = module.Generator(model, dict(max_length=len(prompt) + tokens, do_sample=False))
        generator.append_tokens(prompt)
        stream = module.TokenizerStream(tokenizer)
        step = module.api().step_holding
        n, started = 0, time.perf_counter()
        if step_alone:
            while n < tokens - 1:
                step(generator.ptr)
                n += 1
        else:
            while n < tokens - 1 and not generator.is_done():
                generator.generate_next_token()
                stream.decode(generator.next_token())
                n += 1
        took = (time.perf_counter() - started) / n
        stream.close()
        generator.close()
        return took

    return run


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("oga_against", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(directory: Path, tokens: int, rounds: int, against: ModuleType | None) -> dict[str, dict[str, float]]:
    loops = {"step alone": oga_loop(oga, directory, tokens, step_alone=True),
             "binding": binding_loop(directory, tokens),
             "runtime.oga": oga_loop(oga, directory, tokens)}
    if against is not None:
        loops["--against"] = oga_loop(against, directory, tokens)
    for loop in loops.values():
        loop()  # warm
    taken: dict[str, list[float]] = {name: [] for name in loops}
    for i in range(rounds):
        names = list(loops)
        for name in names[i % len(names):] + names[:i % len(names)]:  # a rotating order
            taken[name].append(loops[name]())
    floor = statistics.median(taken["step alone"])
    return {name: {"us_per_token_p50": round(statistics.median(t) * 1e6, 2),
                   "us_per_token_min": round(min(t) * 1e6, 2),
                   "added_us_p50": round((statistics.median(t) - floor) * 1e6, 2)}
            for name, t in taken.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--against", type=Path, metavar="OLD_OGA_PY", help="another runtime/oga.py to time in the same turns")
    args = parser.parse_args()
    against = load_module(args.against) if args.against else None
    rounds = 10 if args.quick else 40
    with tempfile.TemporaryDirectory() as work:
        directory = Path(work) / "tiny"
        genai_model.build_model_dir(directory, **MODEL)
        results = measure(directory, TOKENS, rounds, against)
    table = Table(title=f"the tiny model: a token's calls, us ({os.cpu_count()} cores, {rounds} rounds taking turns)")
    for col in ("loop", "p50", "min", "added to the step, p50"):
        table.add_column(col, justify="left" if col == "loop" else "right")
    for loop, row in results.items():
        table.add_row(loop, f"{row['us_per_token_p50']:.2f}", f"{row['us_per_token_min']:.2f}",
                      "" if loop == "step alone" else f"{row['added_us_p50']:+.2f}")
    Console().print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "genai_calls", "quick": args.quick, "cpu_count": os.cpu_count(),
                                   "load_avg_1m": os.getloadavg()[0], "against": str(args.against or ""),
                                   "tokens_per_loop": TOKENS, "rounds": rounds, "loops": results}, indent=2))


if __name__ == "__main__":
    main()
