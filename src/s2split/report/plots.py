"""Plots for ``s2split reproduce --plots DIR`` (PNG and SVG).

Per scenario x backing: estimated syscall time of each variant stacked by
counter (one panel per granule; estimates under the run's profile), and the
entries read per level by each variant (exact).
"""

from __future__ import annotations

import io
from pathlib import Path

from ..arm64.arch import granule_name
from ..tasks.reproduce import BACKING_LABELS, Outcome

TOP_KINDS = 7


def save_figure(fig, base: Path) -> list[str]:
    """Write ``fig`` as ``base.png`` and ``base.svg``, each atomically."""
    from ..plumbing.output import write_atomic
    out = []
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=110, bbox_inches="tight")
        path = base.with_suffix(f".{ext}")
        write_atomic(path, buf.getvalue())
        out.append(str(path))
    return out


def _time_by_kind(outcome: Outcome, g: int, b: str, s: str, v: str) -> dict[str, float]:
    c = outcome.phase_counts(g, b, s, v)
    by: dict[str, float] = {}
    for (op, kind, level), ns in outcome.profile.breakdown_ns(c).items():
        by[kind] = by.get(kind, 0.0) + ns
    return by


def write_plots(outcome: Outcome, directory: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = outcome.matrix
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    for s in m.scenarios:
        for b in m.backings:
            # Stacked estimated time by counter.
            kinds_total: dict[str, float] = {}
            data = {}
            for g in m.granules:
                for v in m.variants:
                    by = _time_by_kind(outcome, g, b, s, v)
                    data[(g, v)] = by
                    for k, ns in by.items():
                        kinds_total[k] = kinds_total.get(k, 0.0) + ns
            top = [k for k, _ in sorted(kinds_total.items(), key=lambda kv: -kv[1])][:TOP_KINDS]
            fig, axes = plt.subplots(1, len(m.granules), figsize=(4.2 * len(m.granules), 4.2),
                                     squeeze=False)
            for ax, g in zip(axes[0], m.granules):
                bottoms = [0.0] * len(m.variants)
                for k in [*top, "other"]:
                    vals = []
                    for v in m.variants:
                        by = data[(g, v)]
                        ns = by.get(k, 0.0) if k != "other" else \
                            sum(x for kk, x in by.items() if kk not in top)
                        vals.append(ns / 1e6)
                    ax.bar(range(len(m.variants)), vals, bottom=bottoms, label=k)
                    bottoms = [a + c for a, c in zip(bottoms, vals)]
                ax.set_xticks(range(len(m.variants)), m.variants, rotation=20, ha="right",
                              fontsize=8)
                ax.set_title(f"{granule_name(g)} pages")
                ax.set_ylabel("estimated ms")
            axes[0][-1].legend(fontsize=7, loc="upper right")
            fig.suptitle(f"{s}: {BACKING_LABELS[b]} -- estimated time by counter "
                         f"(profile {outcome.profile.name}; estimates)")
            written += save_figure(fig, out_dir / f"time_{s}_{b}")
            plt.close(fig)

            # Entries read per level.
            fig, axes = plt.subplots(1, len(m.granules), figsize=(4.2 * len(m.granules), 4.2),
                                     squeeze=False)
            for ax, g in zip(axes[0], m.granules):
                levels = sorted({lv for v in m.variants for kind in
                                 ("read_table", "read_leaf", "read_invalid")
                                 for lv in outcome.phase_counts(g, b, s, v).by_level(None, kind)
                                 if lv is not None})
                width = 0.8 / max(1, len(m.variants))
                for i, v in enumerate(m.variants):
                    c = outcome.phase_counts(g, b, s, v)
                    vals = [sum(c.by_level(None, kind).get(lv, 0) for kind in
                                ("read_table", "read_leaf", "read_invalid")) for lv in levels]
                    ax.bar([x + i * width for x in range(len(levels))], vals, width, label=v)
                ax.set_xticks([x + width * (len(m.variants) - 1) / 2 for x in range(len(levels))],
                              [f"L{lv}" for lv in levels])
                ax.set_yscale("log")
                ax.set_title(f"{granule_name(g)} pages")
                ax.set_ylabel("entries read")
            axes[0][-1].legend(fontsize=7)
            fig.suptitle(f"{s}: {BACKING_LABELS[b]} -- entries read per level (exact)")
            written += save_figure(fig, out_dir / f"reads_{s}_{b}")
            plt.close(fig)
    return written
