"""What ``s2split fidelity`` prints."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..fidelity import RunCheck


def print_fidelity(console: Console, checks: list[RunCheck], show_all: bool = False) -> bool:
    ok_all = True
    for chk in checks:
        bad = chk.mismatches
        ok = not bad and chk.layout_ok
        ok_all &= ok
        console.print(f"{chk.fixture} [{chk.label}] {chk.command}", markup=False, highlight=False)
        console.print(f"  {chk.layout_note}", markup=False, highlight=False)
        t = Table(show_edge=False, pad_edge=False, box=None)
        for col, just in (("phase", "left"), ("function", "left"), ("key", "left"),
                          ("kernel", "right"), ("model", "right"), ("diff", "right"),
                          ("", "left")):
            t.add_column(col, justify=just)
        shown = 0
        for r in chk.rows:
            if not (show_all or (r.compared and not r.ok) or (r.note and r.compared)):
                continue
            key = f"{r.key}.{r.field}" if r.key else r.field
            status = "ok" if r.ok else "DIFF"
            if not r.compared:
                status = "info"
            t.add_row(r.phase, r.function, key, f"{r.kernel:,}", f"{r.model:,}",
                      f"{r.model - r.kernel:+,}", f"{status} {r.note}".strip())
            shown += 1
        if shown:
            console.print(t)
        verdict = "all compared counts match" if ok else f"{len(bad)} compared count(s) differ"
        console.print(f"  {chk.compared} counts compared: {verdict}\n", markup=False,
                      highlight=False)
    return ok_all
