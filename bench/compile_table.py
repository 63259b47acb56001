"""Where the fast engine's cold compile time goes, per compiled function.

    python bench/compile_table.py                 # the default `s2split reproduce` matrix
    python bench/compile_table.py --json out.json -- perf-test -b 1G -g --engine fast

Runs an ``s2split`` command in a child process with an empty numba cache
(``NUMBA_CACHE_DIR`` in a temporary directory) and ``--workers 1`` for
``reproduce``, so that every compilation happens in the one process that
listens. numba announces each compilation as a ``numba:compile`` event
(:mod:`numba.core.event`) that starts when a dispatcher begins compiling a
signature and ends when it has the machine code; a callee that is not yet
compiled compiles *inside* its caller's event. Each function's own time is
its event's duration less its callees' events; what remains is typing,
lowering and -- most of it -- LLVM optimizing and generating code for the
function together with every callee it links in.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

#: Runs inside the child: record the events, run the command, dump the records.
CHILD = r"""
import json, sys, time
from numba.core import event as ev

records, stack = [], []

class Listener(ev.Listener):
    def on_start(self, event):
        stack.append([event.data["dispatcher"], time.perf_counter(), 0.0])

    def on_end(self, event):
        disp, t0, children = stack.pop()
        total = time.perf_counter() - t0
        if stack:
            stack[-1][2] += total
        fn = disp.py_func
        records.append({"function": fn.__module__ + "." + fn.__qualname__,
                        "doc": (fn.__doc__ or "").strip().split("\n")[0],
                        "inclusive_s": total, "own_s": total - children,
                        "depth": len(stack)})

ev.register("numba:compile", Listener())
from s2split.cli.parser import main
t0 = time.perf_counter()
try:
    code = main(sys.argv[2:])
except SystemExit as e:
    code = e.code
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    json.dump({"records": records, "wall_s": wall, "code": code}, f)
"""


def measure(command: list[str]) -> dict:
    """Run ``s2split COMMAND`` cold in a child; the per-function compile times."""
    if command and command[0] == "reproduce" and "--workers" not in command:
        command = [*command, "--workers", "1"]
    shown = "s2split " + " ".join(command)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "records.json")
        env = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(d, "cache"))
        if command and command[0] in ("reproduce", "report") and "--db" not in command:
            command = [*command, "--db", os.path.join(d, "results.sqlite")]
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", CHILD, out, *command], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        with open(out) as f:
            data = json.load(f)
    per: dict[str, dict] = {}
    for r in data["records"]:
        row = per.setdefault(r["function"], {"function": r["function"], "doc": r["doc"],
                                             "own_s": 0.0, "signatures": 0, "top": False})
        row["own_s"] += r["own_s"]
        row["signatures"] += 1
        row["top"] |= r["depth"] == 0
    rows = sorted(per.values(), key=lambda r: -r["own_s"])
    total = sum(r["own_s"] for r in rows)
    for r in rows:
        r["share"] = r["own_s"] / total if total else 0.0
    modules: dict[str, float] = {}
    for r in rows:
        mod = r["function"].rpartition(".")[0].removeprefix("s2split.")
        modules[mod] = modules.get(mod, 0.0) + r["own_s"]
    return {"command": shown, "rows": rows, "compile_s": total, "process_s": wall,
            "functions": len(rows), "compilations": sum(r["signatures"] for r in rows),
            "modules": sorted(modules.items(), key=lambda kv: -kv[1])}


def markdown(res: dict, limit: int = 15) -> list[str]:
    """The table for BENCHMARKS.md: the costliest functions, the rest summed."""
    rows = res["rows"]
    L = [f"{res['functions']} functions compiled ({res['compilations']} signatures), "
         f"{res['compile_s']:.1f} s of compiling in a {res['process_s']:.1f} s run of "
         f"`{res['command']}` (one process, empty cache). "
         "Own time: a function's `numba:compile` event less its callees' (mostly LLVM "
         "optimizing the function with the callees it links in); entry: called from Python.",
         "", "| function | own compile (s) | share | entry | what it is |",
         "|---|---:|---:|:---:|---|"]
    for r in rows[:limit]:
        name = r["function"].removeprefix("s2split.")
        L.append(f"| `{name}` | {r['own_s']:.2f} | {r['share']:.1%} | "
                 f"{'yes' if r['top'] else ''} | {r['doc'].replace('|', '/')[:90]} |")
    rest = rows[limit:]
    if rest:
        L.append(f"| {len(rest)} others | {sum(r['own_s'] for r in rest):.2f} | "
                 f"{sum(r['share'] for r in rest):.1%} | | |")
    total = res["compile_s"] or 1.0
    L += ["", "Per module: " + ", ".join(f"`{m}` {s:.1f} s ({s / total:.0%})"
                                         for m, s in res["modules"] if s >= 0.05) + "."]
    return L


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="write every row here")
    ap.add_argument("--limit", type=int, default=15, help="rows in the table")
    ap.add_argument("command", nargs="*", default=["reproduce"],
                    help="the s2split command (default: reproduce)")
    args = ap.parse_args()
    res = measure(args.command or ["reproduce"])
    print("\n".join(markdown(res, args.limit)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
