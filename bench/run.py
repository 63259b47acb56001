"""s2split benchmarks: the figures of BENCHMARKS.md.

    python bench/run.py                 # all of them, 5 runs each (about 30 minutes)
    python bench/run.py --runs 3 --only 1,2
    python bench/run.py --quick         # small sizes, to check the script itself
    python bench/run.py --only 5,6      # cold start from a fresh clone; compile per function

Each whole-command benchmark runs the ``s2split`` CLI in a fresh process and
reads that child's wall time and peak RSS (``os.wait4``: the kernel's
accounting for exactly that process, as ``/usr/bin/time -v`` reports it).
Medians over ``--runs`` runs are printed as a Markdown section and, with
``--write``, replace the generated section of BENCHMARKS.md. The numba cache
is warmed first; the cold-start cost is measured separately by clearing a
private copy of the cache (``NUMBA_CACHE_DIR``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compile_table  # noqa: E402  (bench/compile_table.py, beside this script)

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
VARIANTS = ("vanilla", "skip-levels", "skip-levels+skip-children")


def s2split(*args: str) -> list[str]:
    return [sys.executable, "-m", "s2split", *args]


def run_child(argv: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {err.strip()}")
    return wall, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def medians(argv: list[str], runs: int, env: dict | None = None) -> dict:
    samples = [run_child(argv, env) for _ in range(runs)]
    walls = [w for w, _ in samples]
    rss = [r for _, r in samples]
    return {"command": " ".join(["s2split", *argv[3:]]), "runs": runs,
            "wall_s": statistics.median(walls), "wall_all": walls,
            "rss_mib": statistics.median(rss), "rss_max_mib": max(rss)}


def bench_variants(size: str, runs: int) -> list[dict]:
    """1: 64 GiB, 4K, regular pages, enable-dirty-log scenario, one variant per run."""
    out = []
    for v in VARIANTS:
        r = medians(s2split("perf-test", "-m", "6", "-b", size, "-s", "anonymous", "-g",
                            "--chunk-size", "2M", "--variant", v, "--engine", "fast"), runs)
        r["variant"] = v
        out.append(r)
    return out


def bench_bbml2(size: str, runs: int) -> list[dict]:
    """7: 64 GiB, 4K, THP, enable-dirty-log: vanilla and bbml2 (--cpu +bbml2)."""
    out = []
    for v in ("vanilla", "bbml2"):
        r = medians(s2split("perf-test", "-m", "6", "-b", size, "-s", "anonymous_thp", "-g",
                            "--chunk-size", "2M", "--cpu", "+bbml2", "--variant", v,
                            "--engine", "fast"), runs)
        r["variant"] = v
        out.append(r)
    return out


def bench_wrprotect(size: int, runs: int) -> dict:
    """2: the fast engine's write-protect walk over every level-3 entry of a
    populated VM against one numpy pass over the same descriptors."""
    import numpy as np

    from s2split.engine import get_engine
    from s2split.selftest.modes import parse_mode
    from s2split.model.pgtable.variants import get as get_variant
    from s2split.engine.state import S
    from s2split.workload import PerfTestParams, phase_steps, memstress_layout

    p = PerfTestParams(vcpu_memory_bytes=size, mode=parse_mode(6), manual_protect=False,
                       chunk_size=2 << 20)
    vm = get_engine("fast", p, get_variant("vanilla")).create_vm(
        p.geometry(), p.features, get_variant("vanilla"), p.host_va_bits)
    ctx: dict = {}
    for name, step in phase_steps(p, memstress_layout(p)):
        if name == "enable_dirty_logging":
            break
        step(vm, ctx)
    slot = next(iter(vm.memslots.values()))
    used = int(vm.M[S.NEXT_PAGE])
    T = vm.T[:used]
    snap = vm.snapshot()
    vm.take_counts()
    walk, scan, scan_and = [], [], []
    for i in range(runs + 1):  # the first round warms dispatch and caches; not kept
        vm.restore(snap)
        t0 = time.perf_counter()
        vm.wp_memory_region(slot)
        w = time.perf_counter() - t0
        counts = vm.take_counts()
        # Two single passes: count_nonzero streams the array once with no
        # temporary (the stricter bound); T & 1 also writes a temporary.
        t0 = time.perf_counter()
        nonzero = int(np.count_nonzero(T))
        s1 = time.perf_counter() - t0
        t0 = time.perf_counter()
        valid = int(np.count_nonzero(T & 1))
        s2 = time.perf_counter() - t0
        if i:
            walk.append(w)
            scan.append(s1)
            scan_and.append(s2)
    leaves = counts.by_level("wrprotect", "read_leaf").get(3, 0)
    ratios = [w / s for w, s in zip(walk, scan)]
    return {"entries": valid, "nonzero": nonzero, "level3_entries_read": leaves,
            "walk_s": statistics.median(walk), "numpy_s": statistics.median(scan),
            "numpy_and_s": statistics.median(scan_and),
            "ratio": statistics.median(ratios), "ratios": ratios,
            "ratio_and": statistics.median([w / s for w, s in zip(walk, scan_and)]),
            "ns_per_entry": statistics.median(walk) / max(leaves, 1) * 1e9}


def bench_matrix(size: str, runs: int) -> dict:
    """3: the 54-cell matrix of ``s2split reproduce`` (a fresh database each run)."""
    walls, rss = [], []
    with tempfile.TemporaryDirectory() as d:
        for i in range(runs):
            db = os.path.join(d, f"r{i}.sqlite")
            w, r = run_child(s2split("reproduce", "--size", size, "--db", db, "--no-progress"))
            walls.append(w)
            rss.append(r)
    return {"command": f"s2split reproduce --size {size}", "runs": runs,
            "wall_s": statistics.median(walls), "wall_all": walls,
            "rss_mib": statistics.median(rss)}


def bench_cold(size: str) -> dict:
    """The cost of the first run on a machine: compiling the kernels."""
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, NUMBA_CACHE_DIR=d)
        cold, _ = run_child(s2split("perf-test", "-b", size, "-g", "--chunk-size", "2M",
                                    "--variant", "vanilla", "--engine", "fast"), env)
        warm, _ = run_child(s2split("perf-test", "-b", size, "-g", "--chunk-size", "2M",
                                    "--variant", "vanilla", "--engine", "fast"), env)
    return {"cold_s": cold, "warm_s": warm, "compile_s": cold - warm}


def bench_fresh(size: str | None) -> dict:
    """5: the README's main command from a fresh clone: a new virtual
    environment, ``pip install .`` of a clone of HEAD, the first ``s2split
    reproduce`` (empty compile cache: numba caches next to the installed
    package) and the same command again (warm)."""
    extra = ["--size", size] if size else []
    with tempfile.TemporaryDirectory() as d:
        src, venv = os.path.join(d, "s2split"), os.path.join(d, "venv")
        env = {k: v for k, v in os.environ.items()
               if k not in ("NUMBA_CACHE_DIR", "VIRTUAL_ENV", "PYTHONPATH")}
        subprocess.run(["git", "clone", "--quiet", str(ROOT), src], check=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        venv_s = time.perf_counter() - t0
        pip_s, _ = run_child([os.path.join(venv, "bin", "pip"), "install", "-q", src], env)
        exe = os.path.join(venv, "bin", "s2split")
        first, _ = run_child([exe, "reproduce", *extra, "--db", os.path.join(d, "a.sqlite")],
                             env)
        warm, _ = run_child([exe, "reproduce", *extra, "--db", os.path.join(d, "b.sqlite")],
                            env)
    install = venv_s + pip_s
    return {"command": " ".join(["s2split reproduce", *extra]), "venv_s": venv_s,
            "pip_s": pip_s, "install_s": install, "first_s": first, "warm_s": warm,
            "total_s": install + first, "compile_s": first - warm}


def bench_terabyte(size: str, runs: int) -> list[dict]:
    """4: a 1 TiB VM on 4K pages (48-bit IPA), enable-dirty-log scenario."""
    out = []
    for v in ("vanilla", "skip-levels"):
        r = medians(s2split("perf-test", "-m", "3", "-b", size, "-s", "anonymous", "-g",
                            "--chunk-size", "2M", "--variant", v, "--engine", "fast"), runs)
        r["variant"] = v
        out.append(r)
    return out


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import numba
    import numpy
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, numpy "
            f"{numpy.__version__}, numba {numba.__version__}")


def swap_used_mib() -> float:
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        total = int(info["SwapTotal"].split()[0])
        free = int(info["SwapFree"].split()[0])
        return (total - free) / 1024
    except (OSError, KeyError, ValueError):
        return float("nan")


def _variant_table(title: str, intro: str, rows: list[dict], digits: int) -> list[str]:
    """A section of one row per variant: median wall, peak RSS, the command."""
    out = [title, "", intro, "", "| variant | wall (s) | peak RSS (MiB) | command |",
           "|---|---:|---:|---|"]
    out += [f"| {r['variant']} | {r['wall_s']:.{digits}f} | {r['rss_mib']:.0f} | "
            f"`{r['command']}` |" for r in rows]
    return out + [""]


def markdown(res: dict, args: argparse.Namespace) -> str:
    L = [BEGIN, "", f"Generated by `python bench/run.py --runs {args.runs}` on "
         f"{time.strftime('%Y-%m-%d')}.", "", f"Machine: {res['machine']}.", ""]
    if "cold" in res:
        c = res["cold"]
        L += [f"Cold start (empty numba cache, `-b {args.small}` perf-test): "
              f"{c['cold_s']:.1f} s, of which compiling the kernels {c['compile_s']:.1f} s; "
              f"the same command warm: {c['warm_s']:.1f} s.", ""]
    if "variants" in res:
        L += _variant_table(f"### 1. {args.size}, 4K, regular pages, enable-dirty-log (`-g`)",
                            f"Median of {args.runs} runs, each a fresh process.",
                            res["variants"], 2)
    if "wrprotect" in res:
        w = res["wrprotect"]
        L += [f"### 2. Write-protect walk vs one numpy pass ({args.size}, 4K)", "",
              f"In one process, {args.runs} alternating runs: `kvm_mmu_wp_memory_region` on the "
              f"fast engine (reads {w['level3_entries_read']:,} level-3 entries) against "
              f"one numpy pass over the same table array ({w['entries']:,} valid "
              f"descriptors). Ratios are medians of the per-run ratios.", "",
              "| walk (s) | ns per entry | `np.count_nonzero(T)` (s) | ratio | "
              "`np.count_nonzero(T & 1)` (s) | ratio |", "|---:|---:|---:|---:|---:|---:|",
              f"| {w['walk_s']:.4f} | {w['ns_per_entry']:.2f} | {w['numpy_s']:.4f} | "
              f"{w['ratio']:.2f}x | {w['numpy_and_s']:.4f} | {w['ratio_and']:.2f}x |", ""]
    if "matrix" in res:
        m = res["matrix"]
        L += [f"### 3. The 54-cell matrix (`{m['command']}`)", "",
              f"Median wall {m['wall_s']:.1f} s over {m['runs']} runs (fresh database each "
              f"run, warm compile cache); runs: "
              f"{', '.join(f'{x:.1f}' for x in m['wall_all'])} s. Peak RSS of the parent "
              f"process {m['rss_mib']:.0f} MiB (workers are separate processes).", ""]
    if "terabyte" in res:
        L += _variant_table(f"### 4. {args.tera}, 4K (48-bit IPA), enable-dirty-log (`-g`)",
                            f"Median of {args.tera_runs} runs; swap in use after the runs: "
                            f"{res['swap_after_mib']:.0f} MiB.", res["terabyte"], 1)
    if "fresh" in res:
        f = res["fresh"]
        L += ["### 5. Cold start: fresh clone to the first answer", "",
              "A clone of HEAD, `python3 -m venv` and `pip install .` into a new "
              f"environment, then `{f['command']}` twice (the first with an empty compile "
              "cache; one run each).", "",
              "| step | wall (s) |", "|---|---:|",
              f"| `python3 -m venv` + `pip install .` | {f['install_s']:.1f} |",
              f"| first `{f['command']}` (compiles the fast engine) | {f['first_s']:.1f} |",
              f"| fresh clone to the end of the first reproduce | {f['total_s']:.1f} |",
              f"| the same reproduce warm | {f['warm_s']:.1f} |", ""]
    if "compile_table" in res:
        L += ["### 6. Where the cold compile goes, per compiled function", "",
              *compile_table.markdown(res["compile_table"]), ""]
    if "bbml2" in res:
        L += _variant_table(f"### 7. {args.size}, 4K, THP, enable-dirty-log (`-g`): vanilla "
                            "and bbml2", f"Median of {args.runs} runs, each a fresh process.",
                            res["bbml2"], 2)
    L.append(END)
    return "\n".join(L)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tera-runs", type=int, default=3)
    ap.add_argument("--only", default="0,1,2,3,4,5,6,7",
                    help="benchmarks to run (0: cold start of one perf-test, 5: fresh clone "
                    "to the first reproduce, 6: the compile time per function, 7: THP "
                    "enable-log under vanilla and bbml2)")
    ap.add_argument("--quick", action="store_true", help="small sizes, to test the script")
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    ap.add_argument("--json", default=str(ROOT / "bench" / "latest.json"))
    args = ap.parse_args()
    args.size, args.tera, args.small = ("64G", "1T", "1G") if not args.quick else \
        ("256M", "1G", "64M")
    only = {int(x) for x in args.only.split(",")}
    # Warm the numba cache so that no timed run pays for compilation.
    subprocess.run(s2split("perf-test", "-b", "64M", "--engine", "fast"), check=True,
                   stdout=subprocess.DEVNULL)
    res: dict = {"machine": machine()}
    if 0 in only:
        res["cold"] = bench_cold(args.small)
    if 1 in only:
        res["variants"] = bench_variants(args.size, args.runs)
    if 2 in only:
        from s2split.selftest.sizes import parse_size
        res["wrprotect"] = bench_wrprotect(parse_size(args.size), args.runs)
    if 3 in only:
        res["matrix"] = bench_matrix(args.size, args.runs)
    if 4 in only:
        res["terabyte"] = bench_terabyte(args.tera, args.tera_runs)
        res["swap_after_mib"] = swap_used_mib()
    if 5 in only:
        res["fresh"] = bench_fresh("1G" if args.quick else None)
    if 6 in only:
        res["compile_table"] = compile_table.measure(
            ["reproduce", "--size", "1G"] if args.quick else ["reproduce"])
    if 7 in only:
        res["bbml2"] = bench_bbml2(args.size, args.runs)
    text = markdown(res, args)
    print(text)
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    if args.write:
        path = ROOT / "BENCHMARKS.md"
        doc = path.read_text()
        if BEGIN not in doc or END not in doc:
            raise SystemExit(f"{path}: no generated section ({BEGIN} ... {END})")
        head, rest = doc.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(head + text + tail)
        tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
