"""The phases of ``dirty_log_perf_test`` and the lines it prints for them (numpy-free).

The model, the reports, the real-KVM harness, its importer of upstream output
and calibration all name phases alike: ``populate``, ``enable_dirty_logging``,
``iterN_dirty``, ``iterN_get_dirty_log``, ``iterN_clear_dirty_log``,
``disable_dirty_logging`` (and, in the model, ``create_vm``/``destroy_vm``);
the selftest prints ``Populate memory time: S.NNNNNNNNNs`` and so on.
"""

from __future__ import annotations

import re

_FIXED = {"populate": "Populate memory", "enable_dirty_logging": "Enabling dirty logging",
          "disable_dirty_logging": "Disabling dirty logging"}
#: The per-iteration phases and the words upstream prints for them.
ITERATION_PHASES = {"dirty": "dirty memory", "get_dirty_log": "get dirty log",
                    "clear_dirty_log": "clear dirty log"}
_BY_LABEL = {v.lower(): k for k, v in _FIXED.items()}
_ITER_BY_LABEL = {v: k for k, v in ITERATION_PHASES.items()}
_ITER = re.compile(r"iteration (\d+) (.+)")


def phase_names(iterations: int, manual_protect: bool, vm: bool = True) -> list[str]:
    """The phases of one run, in order (``vm``: with VM creation and teardown)."""
    names = ["populate", "enable_dirty_logging"]
    for i in range(1, iterations + 1):
        names += [f"iter{i}_dirty", f"iter{i}_get_dirty_log"]
        if manual_protect:
            names.append(f"iter{i}_clear_dirty_log")
    names.append("disable_dirty_logging")
    return ["create_vm", *names, "destroy_vm"] if vm else names


def upstream_label(phase: str) -> str | None:
    """What the selftest prints before `` time:`` for a phase (None: not printed)."""
    if phase in _FIXED:
        return _FIXED[phase]
    if phase.startswith("iter"):
        n, _, what = phase[4:].partition("_")
        if n.isdigit() and what in ITERATION_PHASES:
            return f"Iteration {n} {ITERATION_PHASES[what]}"
    return None


def phase_from_label(text: str) -> str | None:
    """The phase of an upstream label (``"Iteration 2 clear dirty log time"``,
    any case, `` time`` optional), or None."""
    low = text.strip().lower().removesuffix(" time").strip()
    if low in _BY_LABEL:
        return _BY_LABEL[low]
    m = _ITER.fullmatch(low)
    if m and m.group(2) in _ITER_BY_LABEL:
        return f"iter{m.group(1)}_{_ITER_BY_LABEL[m.group(2)]}"
    return None


def format_seconds(ns: int) -> str:
    """``S.NNNNNNNNNs``, as the selftest prints a ``struct timespec``."""
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}s"
