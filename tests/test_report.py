"""``s2split report``: the mail-ready report against independent paths.

The text report is checked for what mailing lists need (ASCII, 80 columns),
its numbers against ``reproduce --json`` and the stored counts, its measured
column against ``hw compare --json`` on the same database, the per-operation
breakdown against the estimate it divides, and bad input for one-line errors
that leave no file behind. Expected values come from those other commands or
from the public API, never pasted.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sqlite3
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from s2split.cli.parser import main
from s2split.estimate.cost import builtin_profiles, load_profile
from s2split.counting.counters import KINDS, OPS
from s2split.counting.counts import Counts
from s2split.report import breakdown as B
from s2split.report.document import wrap_command
from s2split.report.mail import choose_format
from s2split.storage.store import Store

# A small matrix: one granule, two backings, both scenarios.
MATRIX = ["--size", "64M", "--granule", "4K", "--backing", "regular,thp", "--workers", "1"]


def run(argv: list[str]) -> tuple[int, str, str]:
    """(status, stdout, stderr) of ``s2split ARGV`` in this process (stdout is
    not a terminal here)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The matrix computed once: the database, reproduce's JSON, the report as
    text (default off a terminal) and JSON."""
    d = tmp_path_factory.mktemp("report")
    db = str(d / "r.sqlite")
    code, repro, err = run(["reproduce", *MATRIX, "--db", db, "--json", "--no-progress"])
    assert code == 0, err
    code, text, err = run(["report", *MATRIX, "--db", db, "--no-progress", "--full"])
    assert code == 0, err
    code, cover, err = run(["report", *MATRIX, "--db", db, "--no-progress"])
    assert code == 0, err
    code, doc, err = run(["report", *MATRIX, "--db", db, "--format", "json", "--no-progress"])
    assert code == 0, err
    return {"db": db, "dir": d, "repro": json.loads(repro), "text": text, "cover": cover,
            "json": json.loads(doc)}


def one_line(err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and needle in lines[0], lines[0]


def section(text: str, title: str) -> str:
    """The body of a top-level section of the text report."""
    m = re.search(rf"^{re.escape(title)}\n-+\n(.*?)(?=^\S[^\n]*\n-+\n|\Z)", text, re.S | re.M)
    assert m, title
    return m.group(1)


# -- the text format -------------------------------------------------------------------

def test_text_is_ascii_and_80_columns(small):
    text = small["text"]
    assert text.isascii()
    assert max(len(line) for line in text.splitlines()) <= 80
    for title in ("Setup", "Estimated saving against vanilla", "Measured beside modelled",
                  "Exact invocations", "Where the gains are", "Sensitivity of each estimate",
                  "Per-operation breakdown"):
        assert section(text, title).strip(), title
    # times are labelled as estimates under the named profile
    assert "estimate under the hardware profile 'server-vhe'" in text


def test_wrapped_commands_are_the_commands():
    cmd = ("s2split perf-test -m 6 -b 64G -s anonymous_hugetlb --chunk-size 2M "
           "--variant skip-levels+skip-children --profile server-nvhe-norange")
    lines = wrap_command(cmd)
    assert len(lines) > 1 and all(len(x) <= 80 for x in lines)
    assert all(x.endswith(" \\") for x in lines[:-1])
    assert " ".join(x.removesuffix(" \\").strip() for x in lines) == cmd
    # an option keeps its value on its line
    assert not any(x.rstrip(" \\").endswith(("-b", "-s", "--variant")) for x in lines)


def _commands(text: str) -> list[str]:
    """Commands of the text report, continuation lines joined."""
    joined = re.sub(r" \\\n\s+", " ", text)
    return [line.strip() for line in joined.splitlines()
            if line.strip().startswith("s2split ")]


def _saving_tables(text: str) -> dict[tuple[str, str, str], list[str]]:
    """{(scenario, backing label, variant): [cells...]} of the savings tables;
    a saving's interval, printed on the line below it, joined to it."""
    body = section(text, "Estimated saving against vanilla")
    out: dict[tuple[str, str, str], list[str]] = {}
    scenario = backing = None
    last: tuple[str, str, str] | None = None
    for line in body.splitlines():
        m = re.match(r"^(clear|enable): ", line)
        if m:
            scenario = m.group(1)
            continue
        if line.startswith("In brackets"):
            break
        if scenario is None or not line.strip() or line.startswith(("backing", "---")):
            continue
        cols = re.split(r"\s{2,}", line.strip())
        if cols[0].startswith("(") and last is not None:
            # the intervals of the row above, right-aligned under its cells
            cells = out[last]
            tail = len(cells) - len(cols)
            out[last] = cells[:tail] + [f"{c} {i}" for c, i in zip(cells[tail:], cols)]
            continue
        if not line.startswith(" "):
            backing = cols.pop(0)
        last = (scenario, backing, cols[0])
        out[last] = cols[1:]
    return out


def test_numbers_equal_reproduce_json(small):
    text, repro = small["text"], small["repro"]
    tables = _saving_tables(text)
    labels = {"regular": "regular pages", "thp": "THP"}
    checked = 0
    for row in repro["rows"]:
        if row["variant"] == "vanilla":
            continue
        cells = tables[(row["scenario"], labels[row["backing"]], row["variant"])]
        pct, low, high = (row[f"time_saved_pct{e}"] for e in ("", "_low", "_high"))
        star = "" if row["time_saved_pct_avg_interval"].startswith("exact") else "*"
        assert cells == [f"{pct[g]:.1f}% ({low[g]:.1f}-{high[g]:.1f})" + ("" if g == "4K" else
                                                                          star)
                         for g in ("4K", "avg")]
        checked += 1
    assert checked == 2 * 2 * 2  # scenarios x backings x non-vanilla variants
    # The JSON report carries reproduce's rows unchanged.
    assert small["json"]["rows"] == repro["rows"]
    # Every command reproduce prints is in the report, whole.
    printed = set(_commands(text))
    for row in repro["rows"]:
        assert set(row["commands"].values()) <= printed


def test_vanilla_time_is_the_stored_estimate(small):
    """Vanilla's time in the report: the profile's estimate of the stored
    counts of the scenario's syscalls (summed over its phases)."""
    profile = load_profile("server-vhe")
    store = Store.open(small["db"], create=False)
    try:
        got = {}
        for c in store.cells():
            if c.variant != "vanilla" or c.config["features"] != profile.features.as_dict():
                continue
            manual = c.config["manual_protect"]
            names = [n for n, _, _ in c.phases if (re.fullmatch(r"iter\d+_clear_dirty_log", n)
                                                   if manual else n == "enable_dirty_logging")]
            total = sum(profile.estimate_ns(c.phase(n)) for n in names)
            got[("clear" if manual else "enable", c.config["backing"])] = total
    finally:
        store.close()
    names = {"anonymous": "regular", "anonymous_thp": "thp"}
    vanilla = {(v["scenario"], v["backing"]): v["estimate_ns"] for v in small["json"]["vanilla"]}
    assert len(vanilla) == 4
    for (s, b), ns in got.items():
        assert vanilla[(s, names[b])] == pytest.approx(ns, rel=1e-12)
    tables = _saving_tables(small["text"])
    for (s, b), ns in vanilla.items():
        label = {"regular": "regular pages", "thp": "THP"}[b]
        value, unit = tables[(s, label, "vanilla: est. time")][0].split()
        assert value == f"{ns / {'ms': 1e6, 'us': 1e3}[unit]:,.2f}"


# -- breakdown -------------------------------------------------------------------------

def test_categories_partition_the_counters():
    masks = B.category_masks()
    stacked = np.sum([m.astype(int) for m in masks.values()], axis=0)
    assert (stacked == 1).all()  # every (op, kind, level) in exactly one category


def test_breakdown_sums_to_the_estimate_exactly(small):
    """The parts add up to the estimate: exactly in rational arithmetic (the
    same float products, grouped differently), and as floats to rounding."""
    profile = load_profile("server-vhe")
    store = Store.open(small["db"], create=False)
    try:
        cells = list(store.cells())
    finally:
        store.close()
    assert cells
    for c in cells:
        for _, counts, _ in c.phases:
            prod = counts.array * profile.array
            whole = sum((Fraction(float(x)) for x in prod.ravel()), Fraction(0))
            parts = sum((sum((Fraction(float(x)) for x in prod[m]), Fraction(0))
                         for m in B.category_masks().values()), Fraction(0))
            assert parts == whole
            got = B.breakdown_ns(counts, profile)
            assert sum(got.values()) == pytest.approx(profile.estimate_ns(counts), rel=1e-12)
    for entry in small["json"]["breakdown"]:
        total = sum(p["ns"] for p in entry["parts"])
        assert total == pytest.approx(entry["estimate_ns"], rel=1e-12)


def test_breakdown_maps_counters_to_kernel_operations():
    """A hand-made count: where each counter's time must land."""
    p = load_profile("server-vhe")
    arr = Counts.zeros().array

    def put(op, kind, level, n):
        from s2split.counting.counters import KIND, OP, slot
        arr[OP[op], KIND[kind], slot(level)] = n
    put("split", "read_leaf", 3, 10)          # the split walk, at level 3
    put("split", "walks", None, 2)            # the split walk, per walk
    put("split", "bbm", 2, 1)                 # installing the new table
    put("split", "tlbi_ipa", 2, 1)            # maintenance, though issued by split
    put("create_unlinked", "visit_leaf", 3, 4)  # building the new table
    put("wrprotect", "pte_write", 3, 5)       # write-protecting is the wrprotect walk
    put("kvm", "bitmap_words", None, 7)       # the dirty bitmap
    put("kvm", "ioctls", None, 1)             # the KVM layer
    put("kvm", "cache_pages_alloc", None, 3)  # pages for new tables
    got = B.breakdown_ns(Counts(arr), p)
    u = p.unit_cost
    assert got == pytest.approx({
        ("split walk", 3): 10 * u("split", "read_leaf", 3),
        ("split walk", None): 2 * u("split", "walks", None),
        ("table building", 2): 1 * u("split", "bbm", 2),
        ("table building", 3): 4 * u("create_unlinked", "visit_leaf", 3),
        ("table building", None): 3 * u("kvm", "cache_pages_alloc", None),
        ("TLB maintenance and barriers", None): 1 * u("split", "tlbi_ipa", 2),
        ("write-protect walk", 3): 5 * u("wrprotect", "pte_write", 3),
        ("dirty-bitmap work", None): 7 * u("kvm", "bitmap_words", None),
        ("KVM MMU layer", None): 1 * u("kvm", "ioctls", None)})
    assert set(B.CATEGORIES) == {B.category_of(o, k) for o in OPS for k in KINDS}


def test_breakdown_tables_show_the_estimates(small):
    body = section(small["text"], "Per-operation breakdown")
    profile = load_profile("server-vhe")
    for entry in small["json"]["breakdown"]:
        if entry["variant"] != "vanilla":
            continue
        label = {"regular": "regular pages", "thp": "THP"}[entry["backing"]]
        title = f"{entry['scenario']}, {label}, {entry['granule']} (estimated "
        unit, rest = body.split(title, 1)[1].split(")", 1)
        table = rest.split("\n\n", 2)[1]
        total = next(line for line in table.splitlines() if line.startswith("total"))
        div = {"ms": 1e6, "us": 1e3}[unit]
        assert total.split()[2] == f"{entry['estimate_ns'] / div:,.3f}"
        # one row per operation with time, each the JSON's part
        parts = {B.key_label((p["operation"], p["level"])): p["ns"] for p in entry["parts"]}
        for name, ns in parts.items():
            row = next(line for line in table.splitlines() if line.startswith(name + "  "))
            assert row[len(name):].split()[0] == f"{ns / div:,.3f}"
    assert profile.name == small["json"]["setup"]["profile"]


def test_plots_png_and_svg(small, tmp_path):
    out = tmp_path / "plots"
    code, stdout, err = run(["report", *MATRIX, "--db", small["db"], "--plots", str(out),
                             "-o", str(tmp_path / "r.txt"), "--no-progress"])
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"breakdown_{s}_{b}.{ext}" for s in ("clear", "enable")
                           for b in ("regular", "thp") for ext in ("png", "svg"))
    assert (out / "breakdown_clear_thp.png").read_bytes().startswith(b"\x89PNG")
    assert b"<svg" in (out / "breakdown_clear_thp.svg").read_bytes()[:400]


# -- sensitivity --------------------------------------------------------------------------

def test_sensitivity_under_every_shipped_profile(small):
    """Each profile's saving and its interval are reproduce's under that
    profile (same numbers through another command)."""
    sens = small["json"]["sensitivity"]
    assert {n for r in sens for n in r["profiles"]} == set(builtin_profiles())
    for name in builtin_profiles():
        code, out, err = run(["reproduce", *MATRIX, "--db", small["db"], "--json",
                              "--no-progress", "--profile", name])
        assert code == 0, err
        rows = {(r["scenario"], r["backing"], r["variant"]): r for r in json.loads(out)["rows"]}
        for r in sens:
            got = r["profiles"][name]
            want = rows[(r["scenario"], r["backing"], r["variant"])]
            assert got["saved_pct"] == pytest.approx(want["time_saved_pct"]["4K"], rel=1e-12)
            assert got["low_pct"] == want["time_saved_pct_low"]["4K"]
            assert got["high_pct"] == want["time_saved_pct_high"]["4K"]
            assert got["low_pct"] <= got["saved_pct"] <= got["high_pct"]


def test_sensitivity_bounds_are_optimal_and_sentences_match(small):
    """At the vertex of the interval's high end, every ranged cost sits at the
    bound its partial derivative points to (a vertex that is the maximum must
    satisfy that), and at the low end the opposite; recomputed here from the
    stored counts. Each sentence prints the JSON's interval; a variant doing
    vanilla-different work has Sobol indices in [0, 1 + noise] over the ranged
    costs it uses."""
    profile = load_profile("server-vhe")
    store = Store.open(small["db"], create=False)
    try:
        cells = {(c.config["backing"], c.config["manual_protect"], c.variant): c
                 for c in store.cells() if c.config["features"] == profile.features.as_dict()}
    finally:
        store.close()
    low, point, high = profile.bounds()
    keys = profile.keys
    body = " ".join(section(small["text"], "Sensitivity of each estimate").split())
    names = {"regular": "anonymous", "thp": "anonymous_thp"}
    checked = 0
    for r in small["json"]["sensitivity"]:
        a = r["analysis"]
        if r["same_work_as"]:
            continue
        phases = ["enable_dirty_logging"] if r["scenario"] == "enable" else \
            ["iter1_clear_dirty_log", "iter2_clear_dirty_log"]
        manual = r["scenario"] == "clear"

        def summed(v):
            c = cells[(names[r["backing"]], manual, v)]
            return sum(profile.coefficients(c.phase(p)) for p in phases)
        b, v = summed("vanilla"), summed(r["variant"])
        for end, bounds in (("high", a["bounds_at_high"]), ("low", a["bounds_at_low"])):
            c = np.where([bounds.get(k) == "high" for k in keys], high, low)
            c = np.where([k in bounds for k in keys], c, point)
            B, V = b @ c, v @ c
            # d/dc_i of 100 (1 - V/B) = 100 (b_i V - v_i B) / B^2
            grad = b * V - v * B
            for i, k in enumerate(keys):
                if k not in bounds or abs(grad[i]) < 1e-9 * abs(B * B):
                    continue
                up = grad[i] > 0 if end == "high" else grad[i] < 0
                assert bounds[k] == ("high" if up else "low"), (r, end, k)
            saving = 100 * (1 - V / B)
            assert saving == pytest.approx(a[f"{end}_pct"], abs=1e-9)
        assert f"lies in {a['low_pct']:.1f}-{a['high_pct']:.1f}%" in body
        assert all(-0.05 <= st <= 1.2 for st in a["sobol_total"].values())
        checked += 1
    assert checked >= 4


# -- measured beside modelled ---------------------------------------------------------------

def _measurements(label: str, config: dict, key: str, manual: bool, medians: dict,
                  n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    phases = ["iter1_clear_dirty_log", "iter2_clear_dirty_log"] if manual else \
        ["enable_dirty_logging"]
    out = []
    for rep in range(n):
        for ph in phases:
            out.append({"label": label, "config_key": key, "config": config, "phase": ph,
                        "repetition": rep, "seconds": medians[ph] * rng.lognormal(0, 0.03),
                        "source": "test", "host": {"kernel_release": label}})
    return out


@pytest.fixture(scope="module")
def measured(small, tmp_path_factory):
    """A copy of the database with hw-run-like measurements of three of the
    four cells under BASE (10 runs) and PATCHED (12 runs, about 15% faster)."""
    from s2split.hw.params import HwParams
    from s2split.selftest.modes import mode_for
    d = tmp_path_factory.mktemp("measured")
    db = d / "m.sqlite"
    db.write_bytes(Path(small["db"]).read_bytes())
    store = Store.open(db, create=False)
    keys = {}
    for backing, manual in (("anonymous", True), ("anonymous_thp", True),
                            ("anonymous_thp", False)):
        hp = HwParams(vcpu_memory_bytes=64 << 20, backing=backing, manual_protect=manual,
                      mode=mode_for(4096, 40), chunk_size=2 << 20)
        config = hp.to_config() | {"arch": "arm64"}
        key = hp.config_key()
        keys[(backing, manual)] = key
        base = {"iter1_clear_dirty_log": 0.004, "iter2_clear_dirty_log": 0.003,
                "enable_dirty_logging": 0.005}
        fast = {k: 0.85 * v for k, v in base.items()}
        store.add_measurements(_measurements("BASE", config, key, manual, base, 10, 1))
        store.add_measurements(_measurements("PATCHED", config, key, manual, fast, 12, 2))
    store.close()
    code, out, err = run(["hw", "compare", "BASE", "PATCHED", "--db", str(db), "--json",
                          "--no-model"])
    assert code == 0, err
    code, text, err = run(["report", *MATRIX, "--db", str(db), "--measured", "BASE",
                           "PATCHED", "--no-progress", "--full"])
    assert code == 0, err
    code, cover, err = run(["report", *MATRIX, "--db", str(db), "--measured", "BASE",
                            "PATCHED", "--no-progress"])
    assert code == 0, err
    code, doc, err = run(["report", *MATRIX, "--db", str(db), "--measured", "BASE",
                          "PATCHED", "--format", "json", "--no-progress"])
    assert code == 0, err
    return {"db": str(db), "keys": keys, "compare": json.loads(out), "text": text,
            "cover": cover, "json": json.loads(doc)}


def test_measured_equals_hw_compare(measured):
    rows = {(r["config_key"], r["phase"]): r for r in measured["compare"]["rows"]}
    cells = measured["json"]["measured"]["cells"]
    assert len(cells) == 4
    seen = 0
    for cell in cells:
        if cell["measured"] is None:
            assert (cell["scenario"], cell["backing"]) == ("enable", "regular")
            continue
        want = rows[(cell["config_key"], cell["phase"])]
        got = cell["measured"]
        for k in ("change", "ci_low", "ci_high", "n_a", "n_b", "median_a", "median_b",
                  "p_adjusted", "verdict"):
            assert got[k] == want[k], k
        assert got["saved_pct"] == -100 * want["change"]
        seen += 1
    assert seen == 3
    # the clear scenario is compared on the per-run sum of its KVM_CLEAR_DIRTY_LOG calls
    assert {c["phase"] for c in cells} == {"clear_dirty_log_total", "enable_dirty_logging"}


def test_measured_column_of_the_text(measured):
    text = measured["text"]
    assert text.isascii() and max(len(x) for x in text.splitlines()) <= 80
    body = section(text, "Measured beside modelled")
    rows = {(r["config_key"], r["phase"]): r for r in measured["compare"]["rows"]}
    model = {(r["scenario"], r["backing"]): r["time_saved_pct"]["4K"]
             for r in measured["json"]["rows"] if r["variant"] == "skip-levels"}
    for (backing, manual), key in measured["keys"].items():
        scenario = "clear" if manual else "enable"
        label = {"anonymous": "regular pages", "anonymous_thp": "THP"}[backing]
        r = rows[(key, "clear_dirty_log_total" if manual else "enable_dirty_logging")]
        b = "regular" if backing == "anonymous" else "thp"
        want = (f"{scenario}, {label}, 4K  {model[(scenario, b)]:.1f}%  "
                f"{-100 * r['change']:.1f}%  [{-100 * r['ci_high']:.1f}, "
                f"{-100 * r['ci_low']:.1f}]  {r['n_a']}/{r['n_b']}")
        assert want in re.sub(r" {2,}", "  ", body), want
    assert re.search(r"enable, regular pages, 4K\s+\S+%\s+not measured", body)
    # the hw run commands carry the labels, chunk size and repetitions
    assert "s2split hw run -m 6 -b 64M -s anonymous_thp --chunk-size 2M --repeat 9 " \
        "--label BASE" in _commands(text)


# -- formats, files and bad input ------------------------------------------------------------

def test_format_choice():
    assert choose_format(None, None, isatty=True) == "rich"
    assert choose_format(None, None, isatty=False) == "text"
    assert choose_format(None, "-", isatty=False) == "text"
    assert choose_format(None, "cover.md", isatty=True) == "markdown"
    assert choose_format(None, "r.json", isatty=True) == "json"
    assert choose_format(None, "cover-letter", isatty=True) == "text"
    assert choose_format("json", "cover.md", isatty=True) == "json"


def test_output_files_by_suffix(small, tmp_path):
    md, js = tmp_path / "r.md", tmp_path / "r.json"
    for path in (md, js):
        code, out, err = run(["report", *MATRIX, "--db", small["db"], "-o", str(path),
                              "--no-progress"])
        assert code == 0, err
        assert out.strip() == f"wrote the report ({path.suffix.strip('.').replace('md', 'markdown')}) to {path}"
    assert "| cell | 4K | avg |" in md.read_text()  # the cover letter's table
    assert json.loads(js.read_text())["format"] == "s2split-report/1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]  # no temp files


def _foreign(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE foo (x)")
    con.commit()
    con.close()


@pytest.mark.parametrize("case", ["unknown-label", "empty-file", "empty-sqlite", "foreign",
                                  "unknown-format", "measured-nothing"])
def test_bad_input_is_one_line_exit_2_and_no_file(small, tmp_path, case):
    out = tmp_path / "report.txt"
    db = tmp_path / "db.sqlite"
    extra: list[str] = []
    if case == "unknown-label":
        db.write_bytes(Path(small["db"]).read_bytes())
        extra, needle = ["--measured", "BASE", "nope"], "no measurements labelled 'BASE'"
    elif case == "empty-file":
        db.write_bytes(b"")
        needle = "empty database"
    elif case == "empty-sqlite":
        sqlite3.connect(db).close()
        needle = "not an s2split results database" if db.stat().st_size else "empty database"
    elif case == "foreign":
        _foreign(db)
        needle = "not an s2split results database"
    elif case == "unknown-format":
        db.write_bytes(Path(small["db"]).read_bytes())
        extra, needle = ["--format", "xml"], "invalid choice: 'xml'"
    else:  # labels that exist but measured other configurations
        from s2split.storage.store import Store as S
        db.write_bytes(Path(small["db"]).read_bytes())
        s = S.open(db, create=False)
        row = {"config_key": "-m 6 -b 1G -s anonymous", "config": {}, "phase": "populate",
               "repetition": 0, "seconds": 1.0}
        s.add_measurements([row | {"label": "BASE"}, row | {"label": "PATCHED"}])
        s.close()
        extra, needle = ["--measured", "BASE", "PATCHED"], "no measurement of this matrix's"
    before = db.read_bytes() if db.exists() else None
    code, stdout, err = run(["report", *MATRIX, "--db", str(db), "-o", str(out),
                             "--no-progress", *extra])
    assert code == 2
    one_line(err, needle)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db.sqlite"]
    if case in ("empty-file", "foreign"):
        assert db.read_bytes() == before  # refused untouched


# -- the cover letter (the default text) ------------------------------------------------------

def _unwrap(text: str) -> str:
    """The text with wrapped command lines joined again."""
    return re.sub(r" \\\n\s+", " ", text)


@pytest.fixture(scope="module")
def default_cover(tmp_path_factory):
    """The default matrix (64G, three granules, backings, scenarios, variants):
    the cover letter, the report's JSON and hw plan's JSON on the same cells."""
    db = str(tmp_path_factory.mktemp("cover") / "r.sqlite")
    code, cover, err = run(["report", "--db", db, "--no-progress"])
    assert code == 0, err
    code, doc, err = run(["report", "--db", db, "--no-progress", "--format", "json"])
    assert code == 0, err
    code, plan, err = run(["hw", "plan", "--db", db, "--no-progress", "--format", "json"])
    assert code == 0, err
    return {"db": db, "cover": cover, "json": json.loads(doc), "plan": json.loads(plan)}


def test_cover_letter_fits_for_the_default_matrix(default_cover):
    text = default_cover["cover"]
    lines = text.splitlines()
    assert text.isascii() and len(lines) <= 100 and max(len(x) for x in lines) <= 80
    titles = [lines[i - 1] for i, x in enumerate(lines) if i and re.fullmatch(r"-+", x)]
    assert titles == ["Setup", "Estimated saving", "Where the gains are", "Measuring it",
                      "Reproducing this report"]


def test_cover_letter_savings_are_reproduces(default_cover):
    """Every saving and its range in the cover's table is reproduce --json's."""
    from s2split.estimate.intervals import fmt_interval
    body = section(default_cover["cover"], "Estimated saving")
    label = {"regular": "regular pages", "thp": "THP", "hugetlb": "hugetlb"}
    # the table's cells, rejoined: "30.3% (8.7-58.2)" per granule
    rows = re.findall(r"^(clear|enable), (\S+(?: pages)?)?\s+(.*)\n(?:pages)?\s+(.*)$", body,
                      re.M)
    assert len(rows) == 6
    for r in default_cover["json"]["rows"]:
        if r["variant"] != "skip-levels":
            continue
        want = [fmt_interval(r["time_saved_pct"][g], r["time_saved_pct_low"][g],
                             r["time_saved_pct_high"][g]) for g in ("4K", "16K", "64K")]
        row = next(x for x in rows if x[0] == r["scenario"] and
                   label[r["backing"]].startswith(x[1].strip()))
        points, ranges = row[2].split(), row[3].split()
        assert [f"{p} {q}" for p, q in zip(points, ranges)][:3] == want


def test_cover_letter_prints_twins_once_with_the_reason(default_cover):
    text = default_cover["cover"]
    body = section(text, "Estimated saving")
    flat = " ".join(body.split())
    assert flat.count("skip-levels+skip-children: the same work as skip-levels in every "
                      "cell, because") == 1
    assert "skip-levels+skip-children" not in body.split("- In brackets")[0]
    # the reason's figures: skips moved from one kind to the other, summed over the cells
    moved = re.search(r"\(-([\d,]+) skip-level, \+([\d,]+) skip-children", flat)
    assert moved and moved.group(1) == moved.group(2)


def test_cover_letter_plan_summary_and_command(default_cover, capsys):
    flat = " ".join(default_cover["cover"].split())
    for line in default_cover["plan"]["summary"]:
        assert " ".join(line.split()) in flat
    assert "s2split hw plan --size 64G --format sh -o hw-plan" in flat
    # the one command reproduces the report: run it, get the same text
    cmd = next(x for x in _unwrap(section(default_cover["cover"],
                                          "Reproducing this report")).splitlines()
               if x.strip().startswith("s2split report"))
    argv = cmd.split()[1:] + ["--db", default_cover["db"], "--no-progress"]
    code, again, err = run(argv)
    assert code == 0, err
    assert again == default_cover["cover"]


def test_full_is_the_cover_and_the_whole_report(small):
    full, cover = small["text"], small["cover"]
    assert full.startswith(cover.rstrip("\n").rsplit("\n", 3)[0])
    for title in ("Appendix", "Estimated saving against vanilla", "Exact invocations",
                  "Per-operation breakdown"):
        assert section(full, title) is not None
    assert "Exact invocations" not in cover


def test_cover_letter_measured_is_hw_compares(measured):
    """m under each measured saving is hw compare's -change, per cell."""
    body = section(measured["cover"], "Estimated saving")
    rows = {(r["config_key"], r["phase"]): r for r in measured["compare"]["rows"]}
    got = re.findall(r"^(clear|enable), (\S+).*\n.*\n\s+m (\S+)$", body, re.M)
    # cells without measurements under both labels say so: "m -"
    want = {(s, b): "-" for s in ("clear", "enable") for b in ("regular", "THP")}
    for (backing, manual), key in measured["keys"].items():
        r = rows.get((key, "clear_dirty_log_total" if manual else "enable_dirty_logging"))
        name = {"anonymous": "regular", "anonymous_thp": "THP"}[backing]
        want[("clear" if manual else "enable", name)] = \
            "-" if r is None else f"{-100 * r['change']:.1f}%"
    assert {(s, b): m for s, b, m in got} == want
    assert "m: measured on real hardware" in " ".join(body.split())


def test_measured_labels_per_granule(measured, tmp_path):
    """--measured 'base-{granule}' 'patched-{granule}' (hw plan's labels) reads
    the same measurements as the plain labels they were stored under."""
    import shutil
    db = tmp_path / "g.sqlite"
    shutil.copy(measured["db"], db)
    store = Store.open(str(db))
    for old, new in (("BASE", "base-4K"), ("PATCHED", "patched-4K")):
        store.add_measurements([dict(r, label=new) for r in store.measurements(old)])
    store.close()
    code, doc, err = run(["report", *MATRIX, "--db", str(db), "--measured", "base-{granule}",
                          "patched-{granule}", "--format", "json", "--no-progress"])
    assert code == 0, err
    got = json.loads(doc)["measured"]["cells"]
    want = measured["json"]["measured"]["cells"]
    assert [c["measured"] and c["measured"]["saved_pct"] for c in got] == \
        [c["measured"] and c["measured"]["saved_pct"] for c in want]
    # a granule without its labels is a one-line error
    code, out, err = run(["report", *MATRIX[:2], "--granule", "4K,16K", *MATRIX[4:],
                          "--db", str(db), "--measured", "base-{granule}", "patched-{granule}",
                          "--no-progress"])
    assert code == 2
    one_line(err, "no measurements labelled 'base-16K'")
