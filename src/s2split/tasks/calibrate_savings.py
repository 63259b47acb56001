"""``s2split calibrate --savings``: which unit costs explain a table of
published relative savings, and what they predict for other cells.

The model's estimated time of a cell is linear in the unit costs: t = a . c,
with ``a`` the cell's counts summed per cost key (the key that prices each
counter, by the profile's precedence) and ``c`` the costs. A variant's saving
is therefore a ratio of two linear forms, ``100 (a0.c - a1.c) / a0.c``
(``granule=avg``: the mean of three such ratios), computed exactly as
``s2split reproduce`` computes ``time_saved_pct`` -- the numbers reported equal
those of :func:`s2split.report.reproduce.savings` under the fitted profile.

Savings are unchanged when every cost is multiplied by one factor, so a table
of savings fixes costs only relative to one another: one cost is *pinned*
at its starting value to set the scale, and the fitted costs are in its units.
The costs not fitted keep their starting values -- their starting ratios to
the pinned one.

The chosen costs are fitted by weighted least squares on the percentages with
``scipy.optimize.least_squares`` (bounded: costs are non-negative). Which
costs the data determine comes from the rank of the weighted Jacobian at the
solution: a cost is determined when no direction of its null space moves it.
Costs the data cannot tell apart are held at their starting values (one at a
time, keeping those that raise the rank), named as such, and the fit is
redone. Intervals are Wald intervals from the Jacobian; the verdict is a
chi-squared test of the residuals against the rows' uncertainties.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..estimate.cost import Profile, governing_keys, load_profile
from ..plumbing.errors import S2Error
from .savings_table import AVG, SavingsRow, read_savings

FORMAT = "s2split-calibrate-savings/1"
#: The split visitor's calls (the per-page work skip-levels removes) and the
#: visitors of the other walks that make up most of the rest of the syscalls'
#: time. The level-3 entry reads are left out: in these cells they move with the
#: split visits (saved) and the write-protect visits (not saved) at nearly fixed
#: ratios, so a table of savings can barely tell them apart.
DEFAULT_SAVINGS_FIT = ("split:visit_leaf", "wrprotect:visit_leaf", "create_unlinked:visit_leaf")
SCALE_FREE = ("savings are ratios of two linear forms in the unit costs, unchanged when "
              "every cost is multiplied by one factor, so the table fixes costs only "
              "relative to one another")

# -- the counts behind the rows ------------------------------------------------------


@dataclass
class Cells:
    """The counts of every row's cells, summed per cost key."""

    keys: list[str]
    start: np.ndarray  # the starting cost of each key
    forms: list[tuple[np.ndarray, np.ndarray]]  # per row: (vanilla, variant), (granules, keys)
    outcomes: list[Any]  # per row: the reproduce Outcome holding its cells
    computed: int = 0
    found: int = 0


def cost_keys(base: Profile, extra: list[str]) -> list[str]:
    """The starting profile's keys, then any fitted or pinned key it lacks."""
    return list(base.unit_costs_ns) + [k for k in dict.fromkeys(extra)
                                       if k not in base.unit_costs_ns]


def _per_key(counts: Any, gov: np.ndarray, nkeys: int) -> np.ndarray:
    flat = counts.array.reshape(-1).astype(float)
    return np.bincount(gov.reshape(-1) + 1, weights=flat, minlength=nkeys + 1)[1:]


def compute_cells(rows: list[SavingsRow], base: Profile, keys: list[str], store: Any,
                  engine: str = "auto", executor: Any = None) -> Cells:
    """Run (or find in ``store``) every cell the rows need, with ``reproduce``:
    one matrix per (size, chunk size), over the granules, backings, scenarios
    and variants its rows name (an ``avg`` row: all three granules)."""
    from .reproduce import Matrix, profile_option, reproduce
    from .savings_table import ALL_GRANULES
    groups: dict[tuple[int, int | None], list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r.size, r.chunk), []).append(i)
    gov = governing_keys(keys, "--fit")
    outcomes: list[Any] = [None] * len(rows)
    cells = Cells(keys, np.zeros(len(keys)), [None] * len(rows), outcomes)  # type: ignore
    for (size, chunk), idx in groups.items():
        sub = [rows[i] for i in idx]
        granules = tuple(g for g in ALL_GRANULES if any(g in r.granules for r in sub))
        matrix_kw = dict(
            size=size, chunk=chunk, granules=granules,
            backings=tuple(dict.fromkeys(r.backing for r in sub)),
            scenarios=tuple(dict.fromkeys(r.scenario for r in sub)),
            variants=("vanilla",) + tuple(dict.fromkeys(r.variant for r in sub)),
            profile=profile_option(base))
        try:
            matrix = Matrix(**matrix_kw)
            from ..arm64.arch import size_name
            from ..workload import memstress_layout
            for g in granules:  # errors before any cell runs, naming the row
                for b in matrix.backings:
                    params = matrix.params(g, b, "clear", base.features)
                    memstress_layout(params)
                    geom, c = params.geometry(), params.chunk_size
                    if c and (c & (c - 1) or not c & geom.supported_block_sizes_bitmap):
                        raise S2Error(
                            f"chunk_size {size_name(c)} is not a supported block size with "
                            f"{size_name(g)} pages "
                            f"({', '.join(size_name(x) for x in geom.supported_block_sizes)})")
            outcome = reproduce(matrix, store, engine, executor)
        except S2Error as e:
            raise S2Error(f"{sub[0].where}: {e}") from None
        cells.computed += outcome.ran
        cells.found += outcome.skipped
        for i in idx:
            r = rows[i]
            outcomes[i] = outcome
            van = np.array([_per_key(outcome.phase_counts(g, r.backing, r.scenario, "vanilla"),
                                     gov, len(keys)) for g in r.granules])
            var = np.array([_per_key(outcome.phase_counts(g, r.backing, r.scenario, r.variant),
                                     gov, len(keys)) for g in r.granules])
            cells.forms[i] = (van, var)
    cells.start = _start_costs(base, keys, gov, cells.forms)
    return cells


def _start_costs(base: Profile, keys: list[str], gov: np.ndarray,
                 forms: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Starting cost per key: the profile's, or for a key it lacks, what the
    profile charged for the counters that key now prices (weighted by their
    counts in these cells, so that the starting estimates stay as they were)."""
    out = np.zeros(len(keys))
    for i, k in enumerate(keys):
        if k in base.unit_costs_ns:
            out[i] = base.unit_costs_ns[k]
            continue
        charged = base.array[gov == i]
        if charged.size and np.all(charged == charged[0]):
            out[i] = float(charged[0])
        elif charged.size:
            out[i] = float(np.mean(charged))
    return out


# -- the model ---------------------------------------------------------------------------

def model(forms: list[tuple[np.ndarray, np.ndarray]],
          theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Savings (%) of every row under the costs ``theta``, and their gradient
    (rows x keys): d/dc [100 (1 - a1.c / a0.c)] = 100 (a1.c a0 - a0.c a1) / (a0.c)^2,
    averaged over the row's granules."""
    pred = np.zeros(len(forms))
    grad = np.zeros((len(forms), len(theta)))
    for i, (van, var) in enumerate(forms):
        t0 = van @ theta
        t1 = var @ theta
        t0 = np.where(t0 > 0, t0, np.finfo(float).tiny)
        pred[i] = float(np.mean(100.0 * (1.0 - t1 / t0)))
        grad[i] = np.mean(100.0 * (t1[:, None] * van - t0[:, None] * var) / (t0 ** 2)[:, None],
                          axis=0)
    return pred, grad


def exact_savings(outcome: Any, row: SavingsRow, profile: Profile) -> float | None:
    """The row's saving under ``profile`` exactly as ``reproduce`` reports it
    (``time_saved_pct``, :func:`s2split.report.reproduce.savings`, which sits in
    a layer above this one): per granule, the percent of vanilla's estimated
    time the variant saves, None where vanilla has no time; ``avg``, the mean
    of the granules that have one. tests/test_calibrate_savings.py checks the
    two agree to the last digit."""
    by_granule: dict[int, float | None] = {}
    for g in row.granules:
        base = profile.estimate_ns(outcome.phase_counts(g, row.backing, row.scenario,
                                                        "vanilla"))
        value = profile.estimate_ns(outcome.phase_counts(g, row.backing, row.scenario,
                                                         row.variant))
        by_granule[g] = None if base == 0 else 100.0 * (base - value) / base
    if row.granule != AVG:
        return by_granule[int(row.granule)]
    vals = [v for v in by_granule.values() if v is not None]
    return sum(vals) / len(vals) if vals else None


#: A direction of the costs that the table determines this many times less
#: well than its best-determined one counts as undetermined: its interval would
#: be wider than the best one's by as much (a condition number of 10^6).
RANK_TOL = 1e-6


def _rank(J: np.ndarray) -> int:
    """Rank of the (column-normalized) weighted Jacobian, to :data:`RANK_TOL`."""
    if J.size == 0:
        return 0
    norms = np.linalg.norm(J, axis=0)
    norms[norms == 0] = 1.0
    s = np.linalg.svd(J / norms, compute_uv=False)
    return int((s > RANK_TOL * s[0]).sum()) if len(s) and s[0] > 0 else 0


def _conditioning(J: np.ndarray) -> float:
    """Smallest over largest singular value of the column-normalized matrix."""
    if J.size == 0:
        return 1.0
    norms = np.linalg.norm(J, axis=0)
    norms[norms == 0] = 1.0
    s = np.linalg.svd(J / norms, compute_uv=False)
    return float(s[-1] / s[0]) if s[0] > 0 else 0.0


def _determined(J: np.ndarray) -> list[bool]:
    """Column j is determined iff it is non-zero and dropping it lowers the
    rank: e_j lies in the row space, no (near-)null direction moves it alone."""
    r = _rank(J)
    return [bool(np.any(J[:, j])) and _rank(np.delete(J, j, axis=1)) == r - 1
            for j in range(J.shape[1])]


# -- the fit -----------------------------------------------------------------------------

@dataclass
class CostFit:
    key: str
    start: float
    value: float
    low: float | None
    high: float | None
    status: str  # pinned, determined, conditional, undetermined, absent, fixed
    note: str = ""


@dataclass
class RowFit:
    row: SavingsRow
    sigma: float
    sigma_source: str
    fitted: float
    low: float
    high: float

    @property
    def residual(self) -> float:
        return self.fitted - (self.row.saved_pct or 0.0)

    @property
    def z(self) -> float:
        return self.residual / self.sigma


@dataclass
class Prediction:
    row: SavingsRow
    predicted: float
    low: float
    high: float

    def to_json(self) -> dict[str, Any]:
        out = self.row.identity() | {"predicted_pct": self.predicted, "low": self.low,
                                     "high": self.high}
        if self.row.saved_pct is not None:
            out["given_pct"] = self.row.saved_pct
        return out


@dataclass
class SavingsFit:
    base: Profile
    profile: Profile  # the fitted profile (undetermined costs at their starting values)
    pin: str
    pin_reason: str
    costs: list[CostFit]
    rows: list[RowFit]
    chi2: float
    dof: int
    p_value: float | None
    explained: bool
    verdict: str
    confidence: float
    free: list[str]  # the costs fitted in the end (determined, possibly conditionally)
    cov: np.ndarray = field(repr=False)  # of ``free``, in ns^2
    theta: np.ndarray = field(repr=False)  # every key's cost
    keys: list[str] = field(repr=False)

    @property
    def z(self) -> float:
        from scipy.stats import norm
        return float(norm.ppf(0.5 + self.confidence / 2))

    def interval(self, grad: np.ndarray, value: float) -> tuple[float, float]:
        """Wald interval of a quantity with gradient ``grad`` over all keys."""
        idx = [self.keys.index(k) for k in self.free]
        g = grad[idx]
        sd = math.sqrt(max(float(g @ self.cov @ g), 0.0)) if idx else 0.0
        return value - self.z * sd, value + self.z * sd


def row_sigma(row: SavingsRow, stderr: float | None) -> tuple[float, str]:
    """A row's standard error in percentage points, and where it comes from:
    its ``stderr_pct``; else ``--stderr`` (the standard deviation of one run)
    over the square root of its ``runs``; else the rounding of the printed
    value (uniform over one unit of the last digit: unit / sqrt 12)."""
    if row.stderr_pct is not None:
        return row.stderr_pct, "stderr_pct"
    if stderr is not None:
        n = row.runs or 1
        return stderr / math.sqrt(n), f"--stderr/sqrt({n} runs)" if row.runs else "--stderr"
    unit = row.printed_unit if row.printed_unit is not None else 0.1
    return unit / math.sqrt(12), f"rounding to {unit:g}"


def choose_pin(keys: list[str], start: np.ndarray, forms: list[tuple[np.ndarray, np.ndarray]],
               free: list[str]) -> tuple[str, str]:
    """The cost outside ``free`` with the largest share of the rows' vanilla
    time under the starting profile, and why."""
    time = np.zeros(len(keys))
    for van, _ in forms:
        time += (van * start).sum(axis=0)
    order = [i for i in np.argsort(-time, kind="stable") if keys[i] not in free and time[i] > 0]
    if not order:
        raise S2Error("no cost outside --fit has a count in these cells to pin the scale: "
                      "fit fewer keys or give --pin")
    i = order[0]
    share = 100 * time[i] / time.sum()
    return keys[i], (f"has the largest share ({share:.1f}%) of the estimated vanilla time "
                     "of these cells among the costs not fitted")


def fit_savings(rows: list[SavingsRow], cells: Cells, base: Profile, fit_keys: list[str],
                pin: str | None = None, confidence: float = 0.95,
                stderr: float | None = None, name: str | None = None) -> SavingsFit:
    """Fit ``fit_keys`` (all but the pinned cost) to the rows' ``saved_pct``."""
    from scipy.optimize import least_squares
    from scipy.stats import chi2 as chi2_dist, norm

    keys, start, forms = cells.keys, cells.start, cells.forms
    if not 0 < confidence < 1:
        raise S2Error(f"--confidence must be between 0 and 1, got {confidence:g}")
    if pin is not None and pin not in keys:
        raise S2Error(f"--pin {pin}: not a cost key of these cells")
    pin_reason = ""
    if pin is None:
        pin, pin_reason = choose_pin(keys, start, forms, fit_keys)
    else:
        pin_reason = "chosen with --pin"
    pi = keys.index(pin)
    if not any(van[:, pi].any() for van, _ in forms):
        raise S2Error(f"--pin {pin}: no count in these cells, so it cannot set the scale")
    if start[pi] <= 0:
        raise S2Error(f"--pin {pin}: its starting cost is 0, which cannot set a scale")
    free0 = [k for k in dict.fromkeys(fit_keys) if k != pin]
    if len(rows) < len(free0):
        raise S2Error(f"{len(rows)} row(s) cannot determine {len(free0)} free costs "
                      f"({', '.join(free0)}): give more rows or fewer --fit keys")
    y = np.array([r.saved_pct for r in rows], dtype=float)
    sig = [row_sigma(r, stderr) for r in rows]
    sigma = np.array([s for s, _ in sig])

    used = np.zeros(len(keys), dtype=bool)
    for van, var in forms:
        used |= (van != 0).any(axis=0) | (var != 0).any(axis=0)
    absent = [k for k in free0 if not used[keys.index(k)]]

    def solve(free: list[str], theta_from: np.ndarray) -> np.ndarray:
        idx = np.array([keys.index(k) for k in free], dtype=int)
        theta = theta_from.copy()
        if not len(idx):
            return theta
        sc = np.where(start[idx] > 0, start[idx], 1.0)  # unit-free parameters

        def resid(u: np.ndarray) -> np.ndarray:
            th = theta.copy()
            th[idx] = u * sc
            return (model(forms, th)[0] - y) / sigma

        def jac(u: np.ndarray) -> np.ndarray:
            th = theta.copy()
            th[idx] = u * sc
            return model(forms, th)[1][:, idx] * sc / sigma[:, None]

        res = least_squares(resid, theta[idx] / sc, jac=jac, bounds=(0.0, np.inf),
                            method="trf", xtol=1e-14, ftol=1e-14, gtol=1e-14, max_nfev=2000)
        theta[idx] = np.maximum(res.x, 0.0) * sc
        return theta

    candidates = [k for k in free0 if k not in absent]
    theta = solve(candidates, start)
    # Identifiability at the solution: while the Jacobian is rank-deficient,
    # hold at its starting value the confounded cost whose removal leaves the
    # best-conditioned set, and fit again; the confounded costs kept are
    # determined only given the held ones.
    held: list[str] = []
    conditional: list[str] = []
    for _ in range(len(candidates) + 1):
        J = model(forms, theta)[1] / sigma[:, None]
        if _rank(J[:, [keys.index(k) for k in candidates]]) == len(candidates):
            break
        keep = list(candidates)
        det = _determined(J[:, [keys.index(k) for k in keep]])
        conditional += [k for k, d in zip(keep, det) if not d and k not in conditional]
        while _rank(J[:, [keys.index(k) for k in keep]]) < len(keep):
            det = _determined(J[:, [keys.index(k) for k in keep]])
            confounded = [k for k, d in zip(keep, det) if not d]
            drop = max(confounded, key=lambda k: (_conditioning(
                J[:, [keys.index(x) for x in keep if x != k]]), keep.index(k)))
            keep.remove(drop)
            held.append(drop)
            theta[keys.index(drop)] = start[keys.index(drop)]
        candidates = keep
        theta = solve(candidates, theta)
    conditional = [k for k in conditional if k not in held]
    free = candidates

    J = model(forms, theta)[1] / sigma[:, None]
    idx = [keys.index(k) for k in free]
    Jf = J[:, idx]
    cov = np.linalg.pinv(Jf.T @ Jf, rcond=1e-15, hermitian=True) if idx else np.zeros((0, 0))
    z = float(norm.ppf(0.5 + confidence / 2))

    # Every key the fit priced with, so that the profile estimates exactly what was fitted.
    costs_ns = {k: float(theta[i]) for i, k in enumerate(keys)}
    fitted_name = name or f"{base.name}-savings-fit"
    profile = Profile(fitted_name, base.description, base.provenance, base.features, costs_ns,
                      base.notes, "")
    cost_rows = []
    for k in dict.fromkeys([pin] + fit_keys):
        i = keys.index(k)
        if k == pin:
            cost_rows.append(CostFit(k, start[i], start[i], None, None, "pinned",
                                     "held at its starting value to set the scale"))
        elif k in absent:
            cost_rows.append(CostFit(k, start[i], start[i], None, None, "absent",
                                     "no count in these cells: kept the starting value"))
        elif k in held:
            others = ", ".join(x for x in free if x in conditional) or "the fitted costs"
            cost_rows.append(CostFit(k, start[i], start[i], None, None, "undetermined",
                                     f"not separable from {others} by this table: kept the "
                                     "starting value"))
        else:
            j = free.index(k)
            sd = math.sqrt(max(float(cov[j, j]), 0.0))
            status = "conditional" if k in conditional else "determined"
            note = (f"determined with {', '.join(held)} held at the starting value"
                    if status == "conditional" else "")
            if theta[i] == 0:
                note = (note + "; " if note else "") + "at the bound 0"
            cost_rows.append(CostFit(k, start[i], float(theta[i]), max(theta[i] - z * sd, 0.0),
                                     float(theta[i] + z * sd), status, note))

    row_fits = []
    preds, grads = model(forms, theta)
    fit = SavingsFit(base, profile, pin, pin_reason, cost_rows, [], 0.0, 0, None, False, "",
                     confidence, free, cov, theta, keys)
    for i, r in enumerate(rows):
        value = exact_savings(cells.outcomes[i], r, profile)
        if value is None:
            raise S2Error(f"{r.where}: the model estimates no time for vanilla in this cell")
        lo, hi = fit.interval(grads[i], value)
        row_fits.append(RowFit(r, float(sigma[i]), sig[i][1], value, lo, hi))
    fit.rows = row_fits
    zs = np.array([rf.z for rf in row_fits])
    fit.chi2 = float((zs ** 2).sum())
    fit.dof = len(rows) - _rank(Jf)
    worst = max(row_fits, key=lambda rf: abs(rf.z))
    worst_text = (f"largest residual {worst.residual:+.2f} points ({worst.z:+.1f} sigma) at "
                  f"{worst.row.where}")
    if fit.dof > 0:
        fit.p_value = float(chi2_dist.sf(fit.chi2, fit.dof))
        fit.explained = fit.p_value >= 1 - confidence
        test = f"chi2 = {fit.chi2:.3g} for {fit.dof} degree(s) of freedom, p = {fit.p_value:.3g}"
        fit.verdict = (f"explained: one cost model reproduces every row within its uncertainty "
                       f"({test}; {worst_text})" if fit.explained else
                       f"not explained: no cost model of this form reproduces the table "
                       f"within its uncertainties ({test} < {1 - confidence:.3g}; {worst_text})")
    else:
        fit.explained = bool(np.all(np.abs(zs) <= z))
        fit.verdict = ((f"explained, but not tested: as many determined costs as rows, so "
                        f"the fit has no degree of freedom left (every row within {z:.2f} "
                        "sigma); add rows to test the model") if fit.explained else
                       f"not explained: even with as many costs as rows, non-negative costs "
                       f"cannot reach the table ({worst_text})")
    return fit


def predict(fit: SavingsFit, rows: list[SavingsRow], cells: Cells) -> list[Prediction]:
    """Savings of ``rows`` under the fitted profile, with intervals from the
    fitted costs' uncertainty (the held and pinned costs taken as exact)."""
    gov_keys = cells.keys
    if gov_keys != fit.keys:
        raise S2Error("internal: the prediction cells use other cost keys")  # pragma: no cover
    _, grads = model(cells.forms, fit.theta)
    out = []
    for i, r in enumerate(rows):
        value = exact_savings(cells.outcomes[i], r, fit.profile)
        if value is None:
            raise S2Error(f"{r.where}: the model estimates no time for vanilla in this cell")
        lo, hi = fit.interval(grads[i], value)
        out.append(Prediction(r, value, lo, hi))
    return out


# -- the command ---------------------------------------------------------------------------

def add_savings_options(p: argparse.ArgumentParser) -> None:
    """The options of ``calibrate --savings`` (registered with ``calibrate``)."""
    g = p.add_argument_group("calibrating to relative savings")
    g.add_argument("--savings", metavar="FILE", default=None,
                   help="fit to a table of published savings (CSV or JSON: scenario, backing, "
                   "granule, variant, saved_pct, optional stderr_pct or runs, size, "
                   "chunk_size) instead of measured times")
    g.add_argument("--predict", metavar="FILE", default=None,
                   help="with --savings: predict these rows (saved_pct optional) with intervals")
    g.add_argument("--pin", metavar="KEY", default=None,
                   help="with --savings: the cost held at its starting value to set the scale "
                   "(default: the largest share of the vanilla time among the costs not fitted)")
    g.add_argument("--stderr", type=float, default=None, metavar="PCT",
                   help="with --savings: standard deviation of one run in percentage points, "
                   "for rows without stderr_pct (divided by sqrt(runs)); default: the rounding "
                   "of each printed value")
    g.add_argument("--confidence", type=float, default=0.95, metavar="P",
                   help="with --savings: confidence level of intervals and verdict "
                   "(default: 0.95)")
    g.add_argument("--json", action="store_true", help="with --savings: print JSON")


def fit_json(fit: SavingsFit, source: str, predictions: list[Prediction]) -> dict[str, Any]:
    return {
        "format": FORMAT, "start_profile": fit.base.name, "savings": source,
        "times_are": f"estimates under profile {fit.profile.name} (fitted)",
        "confidence": fit.confidence,
        "pinned": {"key": fit.pin, "value_ns": fit.costs[0].value,
                   "why": f"{SCALE_FREE}; {fit.pin} {fit.pin_reason}"},
        "costs": [{"key": c.key, "start_ns": c.start, "fitted_ns": c.value, "low": c.low,
                   "high": c.high, "ratio_to_pinned": c.value / fit.costs[0].value,
                   "status": c.status, "note": c.note} for c in fit.costs],
        "rows": [rf.row.identity() | {"given_pct": rf.row.saved_pct, "stderr_pct": rf.sigma,
                                      "uncertainty": rf.sigma_source,
                                      "fitted_pct": rf.fitted, "low": rf.low, "high": rf.high,
                                      "residual_pct": rf.residual, "z": rf.z,
                                      "where": rf.row.where} for rf in fit.rows],
        "verdict": {"explained": fit.explained, "chi2": fit.chi2, "dof": fit.dof,
                    "p_value": fit.p_value, "text": fit.verdict},
        "predictions": [p.to_json() for p in predictions],
    }


def savings_command(args: argparse.Namespace,
                    print_fit: Callable[[SavingsFit, str, list[Prediction], Cells, str | None],
                                        None]) -> int:
    """``s2split calibrate --savings FILE [--predict FILE] [-o PROFILE] [--json]``.
    ``print_fit`` prints the fit as tables (the command line passes
    :func:`s2split.report.savings_fit.print_fit`: reports sit above the tasks)."""
    from ..storage.store import DEFAULT_DB, Store
    if args.measurements:
        raise S2Error("give either MEASUREMENTS or --savings, not both")
    if args.output and Path(args.output).is_dir():
        raise S2Error(f"-o {args.output}: is a directory")
    from .savings_table import MAX_STDERR_PCT, MIN_STDERR_PCT
    if args.stderr is not None and not (MIN_STDERR_PCT <= args.stderr <= MAX_STDERR_PCT):
        raise S2Error(f"--stderr must be between {MIN_STDERR_PCT:g} and {MAX_STDERR_PCT:g} "
                      f"percentage points, got {args.stderr:g}")
    if not 0 < args.confidence < 1:
        raise S2Error(f"--confidence must be between 0 and 1, got {args.confidence:g}")
    base = load_profile(args.profile)
    rows = read_savings(args.savings)
    wanted = read_savings(args.predict, need_saved=False) if args.predict else []
    fit_keys = [k.strip() for k in (args.fit.split(",") if args.fit else DEFAULT_SAVINGS_FIT)
                if k.strip()]
    fit_keys = list(dict.fromkeys(fit_keys))
    if not fit_keys:
        raise S2Error("--fit: no cost key to fit")
    keys = cost_keys(base, fit_keys + ([args.pin] if args.pin else []))
    governing_keys(keys, "--fit")  # bad keys fail before any work
    free = [k for k in fit_keys if k != args.pin]
    if len(rows) < len(free):
        raise S2Error(f"{args.savings}: {len(rows)} row(s) cannot determine {len(free)} free "
                      f"costs ({', '.join(free)}): give more rows or fewer --fit keys")
    store = Store.open(args.db or DEFAULT_DB)
    try:
        cells = compute_cells(rows, base, keys, store, args.engine)
        pcells = compute_cells(wanted, base, keys, store, args.engine) if wanted else None
    finally:
        store.close()
    fit = fit_savings(rows, cells, base, fit_keys, args.pin, args.confidence, args.stderr,
                      args.name)
    predictions = predict(fit, wanted, pcells) if pcells else []
    if args.output:
        from ..plumbing.output import write_atomic
        write_atomic(args.output, json.dumps(profile_json(fit, args.savings), indent=2) + "\n")
    if args.json:
        data = fit_json(fit, args.savings, predictions)
        data["cells"] = {"computed": cells.computed + (pcells.computed if pcells else 0),
                         "found": cells.found + (pcells.found if pcells else 0)}
        if args.output:
            data["profile_written"] = args.output
        json.dump(data, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    print_fit(fit, args.savings, predictions, cells, args.output)
    return 0


def profile_json(fit: SavingsFit, source: str) -> dict[str, Any]:
    """The fitted profile, with where it comes from."""
    determined = [c.key for c in fit.costs if c.status in ("determined", "conditional")]
    kept = [c.key for c in fit.costs if c.status in ("undetermined", "absent")]
    rows = ", ".join(rf.row.where.rsplit("/", 1)[-1] for rf in fit.rows)
    data = fit.profile.to_json()
    data["description"] = (f"{fit.base.name} with unit costs fitted to published savings "
                           f"({source}). {fit.base.description}")
    data["provenance"] = (
        f"Fitted by s2split calibrate --savings to {len(fit.rows)} row(s) of {source} "
        f"({rows}), starting from profile {fit.base.name} "
        f"({fit.base.source or fit.base.name}). {fit.pin} is pinned at "
        f"{fit.costs[0].value:g} ns: {SCALE_FREE}; the fitted costs are in its units. "
        f"Determined: {', '.join(determined) or 'none'}; kept at the starting value: "
        f"{', '.join(kept) or 'none'}; every other cost is the starting profile's. "
        f"Verdict: {fit.verdict}.")
    data["calibration"] = {
        "kind": "savings", "source": source, "start_profile": fit.base.name,
        "pinned": fit.pin, "rows": [rf.row.identity() | {"given_pct": rf.row.saved_pct,
                                                         "fitted_pct": rf.fitted,
                                                         "where": rf.row.where}
                                    for rf in fit.rows],
        "costs": {c.key: {"fitted_ns": c.value, "low": c.low, "high": c.high,
                          "status": c.status} for c in fit.costs},
        "explained": fit.explained, "chi2": fit.chi2, "dof": fit.dof}
    return data
