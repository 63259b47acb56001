"""``s2split hw compare A B``: does B differ from A, phase by phase?

For every configuration measured under both labels and every phase (plus the
per-repetition totals ``get_dirty_log_total`` and ``clear_dirty_log_total``):

* the medians of A and B and the relative change ``median(B) / median(A) - 1``;
* a 95% bootstrap confidence interval of that change (``scipy.stats.bootstrap``,
  the two samples resampled independently, percentile method);
* the two-sided Mann-Whitney U p-value (``scipy.stats.mannwhitneyu``), and the
  same p-value Holm-corrected over all the rows compared (many phases are
  tested at once; without a correction some would differ "significantly" by
  chance);
* the verdict: ``no significant difference`` unless the corrected p-value is
  below ``alpha``; then ``faster``/``slower``, and a **regression** when B is
  slower by more than the threshold (the command then exits 1);
* warnings: fewer than ``min_reps`` repetitions, a coefficient of variation
  above ``max_cv`` in either sample;
* the model's estimate of the phase for the same configuration (arm64
  configurations only), under a cost profile -- an estimate, not a
  measurement.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..plumbing.errors import S2Error

TOTALS = {"get_dirty_log_total": "_get_dirty_log", "clear_dirty_log_total": "_clear_dirty_log"}


def _phase_order(phase: str) -> tuple:
    m = re.match(r"iter(\d+)_(\w+)$", phase)
    if m:
        sub = {"dirty": 0, "get_dirty_log": 1, "clear_dirty_log": 2}.get(m.group(2), 3)
        return (2, int(m.group(1)), sub)
    return {"populate": (0,), "enable_dirty_logging": (1,), "disable_dirty_logging": (3,),
            "get_dirty_log_total": (4,), "clear_dirty_log_total": (5,)}.get(phase, (6, phase))


@dataclass
class Stats:
    n_a: int
    n_b: int
    median_a: float
    median_b: float
    change: float  # median(B) / median(A) - 1
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    cv_a: float
    cv_b: float


def sample_stats(a: list[float] | np.ndarray, b: list[float] | np.ndarray,
                 confidence: float = 0.95, n_resamples: int = 4000,
                 seed: int | None = 0) -> Stats:
    """Medians, relative change with a bootstrap CI, Mann-Whitney U p-value."""
    from scipy import stats

    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if len(a) == 0 or len(b) == 0:
        raise S2Error("both samples need at least one measurement")
    med_a, med_b = float(np.median(a)), float(np.median(b))
    if med_a <= 0:
        raise S2Error("the baseline median is not positive; phase times must be positive")
    change = med_b / med_a - 1
    ci_low = ci_high = p = None
    if len(a) >= 2 and len(b) >= 2:
        def stat(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
            return np.median(y, axis=axis) / np.median(x, axis=axis) - 1

        if np.ptp(a) == 0 and np.ptp(b) == 0:
            ci_low = ci_high = change  # no spread: every resample gives the same change
        else:
            import inspect
            gen = np.random.default_rng(seed)
            seeding = {"rng": gen} if "rng" in inspect.signature(stats.bootstrap).parameters \
                else {"random_state": gen}
            res = stats.bootstrap((a, b), stat, vectorized=True, paired=False,
                                  confidence_level=confidence, n_resamples=n_resamples,
                                  method="percentile", **seeding)
            ci_low, ci_high = float(res.confidence_interval.low), \
                float(res.confidence_interval.high)
        p = float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)
    return Stats(len(a), len(b), med_a, med_b, change, ci_low, ci_high, p,
                 _cv(a), _cv(b))


def _cv(x: np.ndarray) -> float:
    if len(x) < 2 or np.mean(x) <= 0:
        return 0.0
    return float(np.std(x, ddof=1) / np.mean(x))


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (None stays None)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    m = len(idx)
    order = sorted(idx, key=lambda i: pvalues[i])  # type: ignore[arg-type,return-value]
    out: list[float | None] = list(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        adj = min(1.0, (m - rank) * float(pvalues[i]))  # type: ignore[arg-type]
        running = max(running, adj)
        out[i] = running
    return out


@dataclass
class Row:
    config_key: str
    phase: str
    stats: Stats
    p_adjusted: float | None = None
    verdict: str = ""
    regression: bool = False
    warnings: list[str] = field(default_factory=list)
    model_ns: float | None = None


@dataclass
class Report:
    a: str
    b: str
    threshold: float
    alpha: float
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    model_notes: dict[str, str] = field(default_factory=dict)
    profile: str = ""
    #: config_key -> (label A's, label B's) smallest backing coverage (None:
    #: not checked, e.g. imported upstream output)
    coverage: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.regression]

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "threshold": self.threshold, "alpha": self.alpha,
                "profile": self.profile, "notes": self.notes, "model_notes": self.model_notes,
                "coverage": {k: list(v) for k, v in self.coverage.items()},
                "rows": [{"config_key": r.config_key, "phase": r.phase, **asdict(r.stats),
                          "p_adjusted": r.p_adjusted, "verdict": r.verdict,
                          "regression": r.regression, "warnings": r.warnings,
                          "model_ns": r.model_ns} for r in self.rows],
                "regressions": len(self.regressions)}


def _samples(measurements: list[dict[str, Any]]) -> tuple[dict, dict, dict]:
    """(config_key, phase) -> seconds; config_key -> config; config_key -> hosts."""
    by: dict[tuple[str, str], list[float]] = {}
    per_rep: dict[tuple[str, str, int], float] = {}
    configs: dict[str, dict] = {}
    hosts: dict[str, list[dict]] = {}
    for m in measurements:
        key, phase = m["config_key"], m["phase"]
        by.setdefault((key, phase), []).append(float(m["seconds"]))
        configs.setdefault(key, m["config"])
        hosts.setdefault(key, []).append(m.get("host", {}))
        for total, suffix in TOTALS.items():
            if phase.endswith(suffix) and phase.startswith("iter"):
                k = (key, total, int(m["repetition"]))
                per_rep[k] = per_rep.get(k, 0.0) + float(m["seconds"])
    for (key, total, _rep), value in sorted(per_rep.items()):
        by.setdefault((key, total), []).append(value)
    return by, configs, hosts


def compare_measurements(ma: list[dict[str, Any]], mb: list[dict[str, Any]], a: str = "A",
                         b: str = "B", threshold: float = 0.05, alpha: float = 0.05,
                         min_reps: int = 9, max_cv: float = 0.10, model: bool = False,
                         profile: str | None = None, config: str | None = None,
                         seed: int | None = 0) -> Report:
    """Compare two lists of measurement rows (see the module docstring)."""
    sa, configs_a, hosts_a = _samples(ma)
    sb, configs_b, hosts_b = _samples(mb)
    report = Report(a, b, threshold, alpha)
    keys = sorted(set(sa) & set(sb), key=lambda k: (k[0], _phase_order(k[1])))
    if config is not None:
        keys = [k for k in keys if k[0] == config]
        if not keys:
            raise S2Error(f"configuration {config!r} is not measured under both labels")
    only_a = sorted({k for k, _ in sa} - {k for k, _ in sb})
    only_b = sorted({k for k, _ in sb} - {k for k, _ in sa})
    for k in only_a:
        report.notes.append(f"configuration '{k}' is measured only under '{a}'")
    for k in only_b:
        report.notes.append(f"configuration '{k}' is measured only under '{b}'")
    if not keys:
        raise S2Error(f"'{a}' and '{b}' have no configuration and phase in common")
    report.notes += _host_notes(hosts_a, hosts_b, a, b)
    report.notes += _settings_notes(ma, a) + _settings_notes(mb, b)
    cov_a, cov_b = _coverage(ma), _coverage(mb)
    for key in sorted({k for k, _ in keys}):
        ca, cb = cov_a.get(key), cov_b.get(key)
        report.coverage[key] = (ca, cb)
        for label, c in ((a, ca), (b, cb)):
            if c is not None and c < 1:
                report.notes.append(f"'{label}', configuration '{key}': only {c:.1%} of the "
                                    "guest memory was backed by its backing's page size "
                                    "(hw run --allow-partial)")
    for key, phase in keys:
        st = sample_stats(sa[(key, phase)], sb[(key, phase)], seed=seed)
        report.rows.append(Row(key, phase, st))
    adjusted = holm([r.stats.p_value for r in report.rows])
    for row, padj in zip(report.rows, adjusted):
        row.p_adjusted = padj
        _judge(row, threshold, alpha, min_reps, max_cv)
    if model:
        _add_model(report, {k: configs_a[k] for k, _ in keys}, hosts_a, profile)
    return report


def compare_labels(store: Any, a: str, b: str, **kw: Any) -> Report:
    ma, mb = store.measurements(a), store.measurements(b)
    labels = store.labels()
    for label, rows in ((a, ma), (b, mb)):
        if not rows:
            raise S2Error(f"no measurements labelled '{label}' in {store.path} (labels: "
                          f"{', '.join(labels) or 'none'})")
    return compare_measurements(ma, mb, a, b, **kw)


def _judge(row: Row, threshold: float, alpha: float, min_reps: int, max_cv: float) -> None:
    st = row.stats
    n = min(st.n_a, st.n_b)
    if n < min_reps:
        row.warnings.append(f"only {n} repetition{'s' if n != 1 else ''} "
                            f"({min_reps} or more recommended)")
    for name, cv in (("A", st.cv_a), ("B", st.cv_b)):
        if cv > max_cv:
            row.warnings.append(f"unstable {name}: coefficient of variation {cv:.0%}")
    if st.p_value is None:
        row.verdict = "too few samples to test (need 2 or more on each side)"
        return
    if row.p_adjusted is None or row.p_adjusted >= alpha:
        row.verdict = "no significant difference"
        return
    direction = "slower" if st.change > 0 else "faster"
    if st.change > threshold:
        row.regression = True
        row.verdict = f"REGRESSION: {direction} by {st.change:+.1%}"
    elif abs(st.change) > threshold:
        row.verdict = f"{direction} by {st.change:+.1%}"
    else:
        row.verdict = f"{direction} by {st.change:+.1%} (within the {threshold:.0%} threshold)"


def _coverage(rows: list[dict[str, Any]]) -> dict[str, float]:
    """config_key -> the smallest backing coverage of its checked runs."""
    out: dict[str, float] = {}
    for m in rows:
        b = m.get("backing")
        if b and b.get("coverage") is not None:
            k = m["config_key"]
            out[k] = min(out.get(k, 1.0), float(b["coverage"]))
    return out


def _settings_notes(rows: list[dict[str, Any]], label: str) -> list[str]:
    """A warning when DAMON_STAT was on during a label's runs: its page aging
    samples the guest memory while the ioctls are timed."""
    from .backing_check import damon_stat_on
    n = sum(1 for m in rows if damon_stat_on((m.get("host") or {}).get("settings")))
    if not n:
        return []
    return [f"warning: DAMON_STAT was on during {n} of the {len(rows)} measurements of "
            f"'{label}' (it samples memory in the background; boot with "
            "damon_stat.enabled=N)"]


def _host_notes(ha: dict, hb: dict, a: str, b: str) -> list[str]:
    def values(hosts: dict, field_: str) -> set:
        out = set()
        for hs in hosts.values():
            for h in hs:
                v = h.get(field_) if field_ != "cpu" else \
                    (h.get("cpu") or {}).get("model name") or (h.get("cpu") or {}).get("midr_el1")
                if v:
                    out.add(str(v))
        return out
    notes = []
    for f, what in (("kernel_release", "kernel"), ("cpu", "CPU"), ("kernel_cmdline",
                                                                   "kernel command line")):
        va, vb = values(ha, f), values(hb, f)
        if len(va) > 1:
            notes.append(f"'{a}' mixes {len(va)} different {what}s")
        if len(vb) > 1:
            notes.append(f"'{b}' mixes {len(vb)} different {what}s")
        if va and vb and va != vb:
            if f == "cpu":
                notes.append(f"different CPUs ({', '.join(sorted(va))} vs "
                             f"{', '.join(sorted(vb))}): the comparison mixes hardware "
                             "with whatever else changed")
            elif f == "kernel_release":
                notes.append(f"kernels: {', '.join(sorted(va))} vs {', '.join(sorted(vb))}")
            else:
                notes.append(f"the {what}s differ")
    return notes


def _add_model(report: Report, configs: dict[str, dict], hosts: dict[str, list[dict]],
               profile: str | None) -> None:
    from ..estimate.cost import load_profile
    prof = load_profile(profile)
    report.profile = prof.name
    estimates: dict[str, dict[str, float]] = {}
    for key, cfg in configs.items():
        try:
            estimates[key] = model_estimates(cfg, prof, _host_page_size(hosts.get(key, [])))
        except S2Error as e:
            report.model_notes[key] = f"no model estimate: {e}"
        except (KeyError, TypeError, ValueError) as e:  # a configuration missing a key
            report.model_notes[key] = f"no model estimate: incomplete configuration ({e!r})"
    for row in report.rows:
        est = estimates.get(row.config_key)
        if est is not None and row.phase in est:
            row.model_ns = est[row.phase]


def _host_page_size(hosts: list[dict]) -> int | None:
    """The page size of the host kernel that ran a configuration (the
    stage-2 granule), or None when the measurements do not say."""
    sizes = sorted({h.get("page_size") for h in hosts if h.get("page_size")})
    if len(sizes) > 1:
        raise S2Error("the measurements come from hosts with different page sizes ("
                      + ", ".join(f"{s // 1024}K" for s in sizes) + ")")
    return sizes[0] if sizes else None


def model_estimates(config: dict[str, Any], profile: Any,
                    host_page_size: int | None = None) -> dict[str, float]:
    """The model's estimate (ns) of each phase of a stored configuration, on a
    host kernel with ``host_page_size`` pages (None: the guest mode's)."""
    from ..selftest.modes import GuestMode
    from ..model.pgtable.variants import get
    from ..workload import run_perf_test
    from .params import HwParams, mode_from_config

    arch = str(config.get("arch") or "")
    if arch not in ("arm64", "aarch64"):
        where = arch or "an unknown architecture"
        raise S2Error(f"the model is of arm64 KVM; this configuration ran on {where}")
    mode = mode_from_config(config)
    if not isinstance(mode, GuestMode) or not mode.pa_bits:
        raise S2Error("the configuration has no guest physical address size")
    p = HwParams.from_config(config).perf_test_params(profile.features, host_page_size)
    result = run_perf_test(p, get("vanilla"), "auto")
    out = {name: profile.estimate_ns(c) for name, c in result.phases}
    for total, suffix in TOTALS.items():
        parts = [v for k, v in out.items() if k.startswith("iter") and k.endswith(suffix)]
        if parts:
            out[total] = sum(parts)
    return out


def _fmt_s(x: float) -> str:
    if x >= 1:
        return f"{x:.3f}s"
    if x >= 1e-3:
        return f"{x * 1e3:.3f}ms"
    return f"{x * 1e6:.1f}us"


def print_comparison(report: Report, write=print) -> None:
    write(f"hw compare: '{report.b}' against '{report.a}' (change = median B / median A - 1; "
          f"95% bootstrap CI; Mann-Whitney U p, Holm-corrected over {len(report.rows)} rows; "
          f"regression: slower by more than {report.threshold:.0%} at alpha {report.alpha})")
    for note in report.notes:
        write(f"note: {note}")
    current = None
    for row in report.rows:
        if row.config_key != current:
            current = row.config_key
            write("")
            write(f"configuration: {current}")
            if current in report.model_notes:
                write(f"  model: {report.model_notes[current]}")
            cov = report.coverage.get(current, (None, None))
            if cov != (None, None):
                write("  backing: " + ", ".join(
                    f"{label} {'not checked' if c is None else f'{c:.1%}'}"
                    for label, c in zip((report.a, report.b), cov)) +
                      " of the guest memory in its backing's page size")
            write(f"  {'phase':24} {'n A/B':>7} {'median A':>11} {'median B':>11} "
                  f"{'change [95% CI]':>26} {'p (adj)':>9} {'model est.':>11}  verdict")
        st = row.stats
        ci = (f"[{st.ci_low:+.1%}, {st.ci_high:+.1%}]" if st.ci_low is not None and
              not math.isnan(st.ci_low) else "")
        p = f"{row.p_adjusted:.3g}" if row.p_adjusted is not None else "-"
        model = _fmt_s(row.model_ns / 1e9) if row.model_ns is not None else "-"
        write(f"  {row.phase:24} {st.n_a:>3}/{st.n_b:<3} {_fmt_s(st.median_a):>11} "
              f"{_fmt_s(st.median_b):>11} {st.change:>+8.1%} {ci:>17} {p:>9} {model:>11}  "
              f"{row.verdict}")
        for w in row.warnings:
            write(f"  {'':24} warning: {w}")
    if report.profile and any(r.model_ns is not None for r in report.rows):
        write("")
        write(f"model est.: the model's estimate under profile '{report.profile}' for the "
              "same configuration -- an estimate, not a measurement")
    write("")
    n = len(report.regressions)
    write(f"{n} regression{'s' if n != 1 else ''} beyond {report.threshold:.0%}" if n else
          f"no regression beyond {report.threshold:.0%}")
