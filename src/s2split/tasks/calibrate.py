"""``s2split calibrate``: fit a profile's unit costs to measured times.

Each measurement is (perf-test options, phase, seconds). The model runs each
configuration once and counts every phase exactly; a measured time is then
modelled as the sum over counters of count x unit cost. The chosen cost keys
are fitted by non-negative least squares (``scipy.optimize.nnls``); every
other counter keeps the starting profile's cost. A key is *determined* when
the measurements pin it down (its column is non-zero and not a combination of
the others); undetermined keys keep their starting values and are reported.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..counting.counts import Counts
from ..estimate.cost import Profile, governing_keys, load_profile, parse_cost_key
from ..plumbing.errors import S2Error
from ..selftest.phases import phase_from_label
from ..storage.schemas import MAX_SECONDS

DEFAULT_FIT = ("read_leaf", "visit_leaf", "pte_write", "pte_cas", "dsb_ish", "aborts",
               "guest_accesses", "ioctls")


@dataclass
class Measurement:
    options: str
    phase: str
    seconds: float
    where: str  # file:line, for messages


@dataclass
class Fit:
    keys: list[str]
    values: dict[str, float]
    determined: dict[str, bool]
    rows: list[tuple[Measurement, float, float]]  # measurement, measured ns, fitted ns
    profile: Profile

    @property
    def rms_rel(self) -> float:
        rel = [(f - m) / m for _, m, f in self.rows if m]
        return float(np.sqrt(np.mean(np.square(rel)))) if rel else 0.0


def _phase_name(text: str, where: str) -> str:
    """A phase name, or the line upstream prints for it."""
    t = text.strip()
    if t.startswith("iter") or t in ("create_vm", "populate", "enable_dirty_logging",
                                     "disable_dirty_logging", "destroy_vm"):
        return t
    name = phase_from_label(t)
    if name is None:
        raise S2Error(f"{where}: unknown phase {text!r} (use names such as "
                      "enable_dirty_logging or iter1_clear_dirty_log)")
    return name


def _row(options: Any, phase: Any, seconds: Any, where: str) -> Measurement:
    if not isinstance(options, str) or not isinstance(phase, str):
        raise S2Error(f"{where}: options and phase must be text")
    if isinstance(seconds, bool):
        raise S2Error(f"{where}: seconds {seconds!r} is not a number")
    try:
        sec = float(seconds)
    except (TypeError, ValueError):
        raise S2Error(f"{where}: seconds {seconds!r} is not a number") from None
    if not sec > 0 or sec != sec or sec == float("inf"):
        raise S2Error(f"{where}: seconds must be a positive number, got {seconds!r}")
    if sec > MAX_SECONDS:  # the bound the results store keeps too
        raise S2Error(f"{where}: seconds must be <= {MAX_SECONDS:g} (a phase time), got "
                      f"{seconds!r}")
    return Measurement(options.strip(), _phase_name(phase, where), sec, where)


def read_measurements(path: str) -> list[Measurement]:
    """CSV with columns options,phase,seconds -- or JSON: a list of such objects
    (or ``{"measurements": [...]}``)."""
    from ..plumbing.validate import read_text
    p = Path(path)
    text = read_text(path, "measurements")
    rows: list[Measurement] = []
    if p.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        from ..plumbing.validate import loads
        data = loads(text, path)
        items = data.get("measurements") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise S2Error(f"{path}: expected a list of measurements")
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not {"options", "phase", "seconds"} <= set(item):
                raise S2Error(f"{path}: measurement {i} needs options, phase and seconds")
            rows.append(_row(item["options"], item["phase"], item["seconds"],
                             f"{path}: measurement {i}"))
    else:
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None or not {"options", "phase", "seconds"} <= \
                set(reader.fieldnames):
            raise S2Error(f"{path}: a CSV needs the columns options, phase, seconds")
        for i, r in enumerate(reader, start=2):
            rows.append(_row(r["options"], r["phase"], r["seconds"], f"{path}:{i}"))
    if not rows:
        raise S2Error(f"{path}: no measurements")
    return rows


def params_of(options: str, where: str, profile: Profile) -> tuple[Any, str]:
    """Perf-test params (and variant) from an options string."""
    from ..selftest.options import add_perf_test_options, parse_command
    from .perftest import perf_test_params
    args, extra = parse_command(options, f"{where}: bad options", add_perf_test_options)
    if extra:
        raise S2Error(f"{where}: bad options {options!r}: unrecognized arguments: "
                      f"{' '.join(extra)}")
    if args.profile is None:
        args.profile = profile.source if profile.source.endswith(".json") else profile.name
    try:
        params = perf_test_params(args)
    except S2Error as e:
        raise S2Error(f"{where}: {e}") from None
    if len(params) != 1:
        raise S2Error(f"{where}: one guest mode per measurement")
    variants = args.variant or ["vanilla"]
    if len(variants) != 1:
        raise S2Error(f"{where}: one variant per measurement")
    return params[0], variants[0]


def _governing(profile_keys: set[str], fit: list[str]) -> np.ndarray:
    """For every counter cell, the index of the fit key that prices it, or -1."""
    keys = sorted(profile_keys | set(fit))
    to_fit = np.array([fit.index(k) if k in fit else -1 for k in keys] + [-1])
    return to_fit[governing_keys(keys, "--fit")]


def fit(measurements: list[Measurement], profile: Profile, keys: list[str],
        engine: str = "auto") -> Fit:
    from ..model.pgtable.variants import get as get_variant
    from ..workload import run_perf_test
    keys = list(dict.fromkeys(keys))  # a repeated key would get a zero column
    if not keys:
        raise S2Error("--fit: no cost key to fit")
    for k in keys:
        parse_cost_key(k, "--fit")
    runs: dict[tuple[str, str], dict[str, Counts]] = {}
    for m in measurements:
        params, variant = params_of(m.options, m.where, profile)
        key = (json.dumps(params.to_dict(), sort_keys=True), variant)
        if key not in runs:
            try:
                res = run_perf_test(params, get_variant(variant), engine)
            except S2Error as e:
                raise S2Error(f"{m.where}: {e}") from None
            runs[key] = dict(res.phases)
        if m.phase not in runs[key]:
            raise S2Error(f"{m.where}: this configuration has no phase {m.phase!r}")
        m._counts = runs[key][m.phase]  # type: ignore[attr-defined]
    gov = _governing(set(profile.unit_costs_ns), keys)
    fixed = profile.array * (gov < 0)
    A = np.zeros((len(measurements), len(keys)))
    b = np.zeros(len(measurements))
    for i, m in enumerate(measurements):
        c = m._counts.array  # type: ignore[attr-defined]
        b[i] = m.seconds * 1e9 - float((c * fixed).sum())
        for j in range(len(keys)):
            A[i, j] = float(c[gov == j].sum())
    # Scale columns for a well-conditioned fit and an honest rank test.
    scale = np.abs(A).max(axis=0)
    scale[scale == 0] = 1.0
    from scipy.optimize import nnls
    theta_scaled, _ = nnls(A / scale, b)
    theta = theta_scaled / scale
    determined = _determined(A / scale)
    values = {}
    costs = dict(profile.unit_costs_ns)
    for j, k in enumerate(keys):
        values[k] = float(theta[j])
        if determined[j]:
            costs[k] = float(theta[j])
    fitted = Profile(profile.name, profile.description, profile.provenance, profile.features,
                     costs, profile.notes, profile.source)
    rows = []
    for m in measurements:
        rows.append((m, m.seconds * 1e9, fitted.estimate_ns(m._counts)))  # type: ignore
    return Fit(list(keys), values, {k: bool(determined[j]) for j, k in enumerate(keys)},
               rows, fitted)


def _determined(A: np.ndarray, tol: float = 1e-9) -> list[bool]:
    """Key j is determined iff its column is non-zero and the unit vector e_j
    lies in the row space of A (no null-space direction moves it)."""
    n = A.shape[1]
    if A.size == 0:
        return [False] * n
    _, s, vt = np.linalg.svd(A, full_matrices=True)
    rank = int((s > tol * (s[0] if len(s) else 1.0)).sum())
    null = vt[rank:]  # rows spanning the null space
    out = []
    for j in range(n):
        nonzero = bool(np.any(A[:, j] != 0))
        out.append(nonzero and (null.shape[0] == 0 or float(np.abs(null[:, j]).max()) < 1e-8))
    return out


def calibrate_command(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..plumbing.console import rich_console
    if not args.measurements:
        raise S2Error("give MEASUREMENTS (a file, or a label with --db) or --savings FILE")
    if args.predict or args.pin or args.stderr is not None or args.json:
        raise S2Error("--predict, --pin, --stderr and --json need --savings")
    base = load_profile(args.profile)
    keys = [k.strip() for k in (args.fit.split(",") if args.fit is not None else DEFAULT_FIT)
            if k.strip()]
    if not keys:
        raise S2Error(f"--fit {args.fit!r}: no cost key to fit")
    keys = list(dict.fromkeys(keys))
    if args.output and Path(args.output).is_dir():
        raise S2Error(f"-o {args.output}: is a directory")
    if args.db:
        measurements = measurements_from_store(args.db, args.measurements)
    else:
        measurements = read_measurements(args.measurements)
    result = fit(measurements, base, keys, args.engine)
    console = rich_console()
    t = Table(title=f"Fitted unit costs (starting from {base.name})", title_justify="left")
    for col in ("key", "start (ns)", "fitted (ns)", "determined by the data"):
        t.add_column(col)
    for k in keys:
        t.add_row(k, f"{base.unit_costs_ns.get(k, 0.0):.4g}", f"{result.values[k]:.4g}",
                  "yes" if result.determined[k] else "no: kept the starting value")
    console.print(t)
    r = Table(title="Residuals (estimates under the fitted profile vs measurements)",
              title_justify="left")
    for col in ("measurement", "phase", "measured", "fitted", "residual"):
        r.add_column(col)
    for m, meas, fitted_ns in result.rows:
        r.add_row(m.options, m.phase, f"{meas / 1e9:.6f} s", f"{fitted_ns / 1e9:.6f} s",
                  f"{100 * (fitted_ns - meas) / meas:+.2f}%")
    console.print(r)
    console.print(f"RMS relative residual: {100 * result.rms_rel:.2f}%", highlight=False)
    name = args.name or f"{base.name}-fit"
    prof = replace(result.profile, name=name,
                   provenance=f"fitted by s2split calibrate to {len(measurements)} "
                   f"measurement(s) from {args.measurements}, starting from {base.name}; keys "
                   f"{', '.join(k for k in keys if result.determined[k])} determined")
    if args.output:
        from ..plumbing.output import write_atomic
        write_atomic(args.output, json.dumps(prof.to_json(), indent=2) + "\n")
        console.print(f"Fitted profile written to {args.output}", highlight=False)
    return 0


def measurements_from_store(db: str, label: str) -> list[Measurement]:
    """The measured phases of one label in the results store (``s2split hw run``
    or ``hw import``): the median over repetitions of each configuration and
    phase, one measurement each."""
    import shlex
    import statistics

    from ..hw.params import HwParams
    from ..storage.store import Store
    store = Store.open(db, create=False)
    try:
        rows = store.measurements(label)
    finally:
        store.close()
    if not rows:
        raise S2Error(f"{db}: no measurements labelled {label!r}")
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        config = r["config"] if isinstance(r["config"], dict) else {}
        opts = config.get("options")
        if not opts:
            try:
                hp = HwParams.from_config(config)
                argv = hp.argv()
            except (S2Error, KeyError, TypeError, ValueError) as e:
                raise S2Error(f"{db}: measurement of {r['config_key']} has no usable "
                              f"configuration ({e})") from None
            # the stage-2 granule is the host kernel's page size
            page = (r.get("host") or {}).get("page_size")
            if page and page != hp.granule:
                argv += ["--host-page-size", f"{page // 1024}K"]
            opts = shlex.join(argv)
        groups.setdefault((opts, r["phase"]), []).append(float(r["seconds"]))
    return [_row(opts, phase, statistics.median(secs),
                 f"{db}: {label} {opts} {phase} (median of {len(secs)})")
            for (opts, phase), secs in groups.items()]
