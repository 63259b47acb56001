"""What ``s2split fidelity`` prints: per run, the differences, the bounds and
everything not compared; then one screen of summary."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..tasks.fidelity import Row, RunCheck


def _say(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _table(console: Console, table: Table) -> None:
    """A table at its natural width: a row stays one line (for grep and for
    the tests) even when it is wider than the terminal."""
    from rich.measure import Measurement
    need = Measurement.get(console, console.options.update(width=100_000), table).maximum
    width = console.width
    console.width = max(width, need)
    try:
        console.print(table)
    finally:
        console.width = width


def _allowed(r: Row) -> str:
    if not r.bound:
        return f"{r.model:,}"
    hi = "inf" if r.hi is None else f"{r.hi:,}"
    return f"[{r.lo:,}, {hi}]"


def print_fidelity(console: Console, checks: list[RunCheck], show_all: bool = False) -> bool:
    ok_all = True
    last_fixture = None
    for chk in checks:
        if chk.fixture != last_fixture:
            last_fixture = chk.fixture
            for note in chk.fixture_notes:
                _say(console, f"{chk.fixture}: note: {note}")
        bad = chk.mismatches
        ok = not bad and chk.layout_ok
        ok_all &= ok
        variant = "" if chk.variant == "vanilla" else f" (model variant {chk.variant})"
        _say(console, f"{chk.fixture} [{chk.label}] {chk.command}{variant}")
        if chk.layout_note:
            _say(console, f"  {chk.layout_note}")
        for note in chk.notes:
            _say(console, f"  note: {note}")
        for phase, why in chk.bound_notes.items():
            _say(console, f"  bounds in {phase}: {why}")
        t = Table(show_edge=False, pad_edge=False, box=None)
        for col, just in (("phase", "left"), ("function", "left"), ("key", "left"),
                          ("kernel", "right"), ("model", "right"), ("allowed", "right"),
                          ("diff", "right"), ("", "left")):
            t.add_column(col, justify=just)
        shown = 0
        for r in chk.rows:
            if not (show_all or (r.compared and not r.ok) or (r.note and r.compared)):
                continue
            key = f"{r.key}.{r.field}" if r.key else r.field
            status = "ok" if r.ok else "DIFF"
            if not r.compared:
                status = "info"
            t.add_row(r.phase, r.function, key, f"{r.kernel:,}", f"{r.model:,}", _allowed(r),
                      f"{r.model - r.kernel:+,}", f"{status} {r.note}".strip())
            shown += 1
        if shown:
            _table(console, t)
        verdict = "all compared counts match" if ok else f"{len(bad)} compared count(s) differ"
        _say(console, f"  {chk.compared} counts compared ({chk.compared_exact} exactly, "
                      f"{chk.compared_bounds} as bounds): {verdict}\n")
    print_summary(console, checks)
    return ok_all


def worst(rows: list[Row]) -> Row | None:
    """The compared row farthest outside what it allows (None: none is)."""
    bad = [r for r in rows if r.compared and not r.ok]
    return max(bad, key=lambda r: (r.excess, r.phase, r.function, r.key)) if bad else None


def print_summary(console: Console, checks: list[RunCheck]) -> None:
    """Fixtures and runs checked; counts compared exactly, as bounds and
    differing; per fixture the worst difference."""
    fixtures: dict[str, list[RunCheck]] = {}
    for chk in checks:
        fixtures.setdefault(chk.fixture, []).append(chk)
    t = Table(title="fidelity summary", show_edge=False, pad_edge=False, box=None)
    for col, just in (("fixture", "left"), ("runs", "right"), ("exact", "right"),
                      ("bounds", "right"), ("differ", "right"), ("notes", "right"),
                      ("worst difference", "left")):
        t.add_column(col, justify=just)
    totals = [0, 0, 0, 0, 0]
    for name, runs in fixtures.items():
        rows = [r for c in runs for r in c.rows]
        exact = sum(c.compared_exact for c in runs)
        bounds = sum(c.compared_bounds for c in runs)
        differ = sum(len(c.mismatches) for c in runs) + sum(not c.layout_ok for c in runs)
        notes = len(runs[0].fixture_notes) + sum(len(c.notes) for c in runs)
        w = worst(rows)
        if w is not None:
            key = f" {w.key}" if w.key else ""
            text = (f"{w.phase} {w.function}{key}.{w.field}: kernel {w.kernel:,}, "
                    f"{'allowed ' + _allowed(w) if w.bound else f'model {w.model:,}'}")
        elif any(not c.layout_ok for c in runs):
            text = "test memory placed elsewhere"
        else:
            text = "none"
        t.add_row(name, str(len(runs)), f"{exact:,}", f"{bounds:,}", f"{differ:,}",
                  str(notes), text)
        for i, v in enumerate((len(runs), exact, bounds, differ, notes)):
            totals[i] += v
    _table(console, t)
    _say(console, f"{len(fixtures)} fixture(s), {totals[0]} run(s): {totals[1]:,} counts "
                  f"compared exactly, {totals[2]:,} as bounds, {totals[3]:,} differing; "
                  f"{totals[4]} note(s) above")
