"""The tables ``s2split calibrate --savings`` prints: the pinned cost and why,
the fitted costs with their intervals and status, every row fitted against
given, the verdict, and the predictions."""

from __future__ import annotations

from typing import Any

from rich.table import Table

STATUS = {"pinned": "pinned (sets the scale)", "determined": "determined",
          "conditional": "determined*",
          "undetermined": "undetermined: kept start",
          "absent": "not in these cells: kept start"}


def _where(where: str, source: str) -> str:
    """``line 4`` (CSV) or ``row 3`` (JSON) of the table."""
    rest = where[len(source):].lstrip(": ") if where.startswith(source) else where
    return f"line {rest}" if rest.isdigit() else rest


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}%"


def print_fit(fit: Any, source: str, predictions: list[Any], cells: Any,
              output: str | None) -> None:
    from ..tasks.calibrate_savings import SCALE_FREE
    from ..plumbing.console import rich_console
    console = rich_console()
    conf = f"{100 * fit.confidence:g}%"
    console.print(f"Fitting unit costs to {len(fit.rows)} published saving(s) from {source}, "
                  f"starting from profile {fit.base.name}. The savings are the model's "
                  "estimates under the fitted profile (not measurements), computed as "
                  "'s2split reproduce' computes time_saved_pct.", highlight=False)
    pinned = fit.costs[0]
    console.print(f"Pinned: {fit.pin} = {pinned.value:g} ns (its starting value). Why: "
                  f"{SCALE_FREE}: one cost must be held to set the scale. {fit.pin} "
                  f"{fit.pin_reason}. Fitted costs are in its units; the costs not fitted keep "
                  "their starting values (their starting ratios to it).", highlight=False)
    t = Table(title=f"Unit costs ({conf} intervals; ns, in units of the pinned {fit.pin})",
              title_justify="left")
    for col in ("key", "start (ns)", "fitted (ns)", f"{conf} interval", f"/ {fit.pin}",
                "status"):
        t.add_column(col, justify="right" if "ns" in col or "/" in col else "left")
    for c in fit.costs:
        iv = "-" if c.low is None else f"{c.low:.4g}..{c.high:.4g}"
        status = STATUS[c.status] + (", at the bound 0" if "bound" in c.note else "")
        t.add_row(c.key, f"{c.start:.4g}", f"{c.value:.4g}", iv,
                  f"{c.value / pinned.value:.4g}", status)
    console.print(t)
    held = [c.key for c in fit.costs if c.status == "undetermined"]
    for c in fit.costs:
        if c.status == "undetermined":
            console.print(f"  {c.key}: {c.note}.", highlight=False)
    if held:
        console.print(f"  * determined once {', '.join(held)} is held at its starting value; "
                      "the intervals take the held costs as exact.", highlight=False)
    r = Table(title="Savings: given vs fitted (estimates under the fitted profile)",
              title_justify="left")
    for col in ("where", "scenario", "backing", "granule", "variant"):
        r.add_column(col)
    for col in ("given", "+/- (1 sd)", "fitted", f"{conf} interval", "residual", "z"):
        r.add_column(col, justify="right")
    for rf in fit.rows:
        row = rf.row
        r.add_row(_where(row.where, source), row.scenario, row.backing, row.granule_label,
                  row.variant, _pct(row.saved_pct), f"{rf.sigma:.3g}", _pct(rf.fitted),
                  f"{rf.low:.2f}..{rf.high:.2f}", f"{rf.residual:+.2f}", f"{rf.z:+.2f}")
    console.print(r)
    sources = sorted({rf.sigma_source for rf in fit.rows})
    console.print(f"Uncertainties: {', '.join(sources)}.", highlight=False)
    console.print(f"Verdict: {fit.verdict}.", highlight=False)
    if predictions:
        p = Table(title=f"Predictions: estimates under the fitted profile ({conf} intervals "
                  "from the fitted costs' uncertainty)", title_justify="left")
        for col in ("scenario", "backing", "granule", "variant"):
            p.add_column(col)
        for col in ("predicted", f"{conf} interval", "given"):
            p.add_column(col, justify="right")
        for pr in predictions:
            row = pr.row
            p.add_row(row.scenario, row.backing, row.granule_label, row.variant,
                      _pct(pr.predicted), f"{pr.low:.2f}..{pr.high:.2f}",
                      _pct(row.saved_pct))
        console.print(p)
    console.print(f"Cells: {cells.computed} computed, {cells.found} found in the results "
                  "database.", highlight=False)
    if output:
        console.print(f"Fitted profile written to {output}", highlight=False)
