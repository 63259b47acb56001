"""``s2split report --plots DIR``: each cell's estimated time per kernel operation.

One figure per scenario and backing, one panel per granule, one bar per
variant, stacked by the operations of :mod:`.breakdown` (the walks split by
level, in shades of one colour). Estimates under the report's profile.
"""

from __future__ import annotations

from pathlib import Path

from ..arm64.arch import granule_name
from . import breakdown as B

_COLOURS = {B.SPLIT_WALK: "Blues", B.WRPROTECT_WALK: "Oranges", B.TABLE_BUILDING: "Greens",
            B.TLB_BARRIERS: "Reds", B.DIRTY_BITMAP: "Purples", B.KVM_LAYER: "Greys",
            B.OTHER_WALKS: "YlOrBr"}


def _colour(key: B.Key, keys: list[B.Key]):
    import matplotlib
    same = [k for k in keys if k[0] == key[0]]
    cmap = matplotlib.colormaps[_COLOURS[key[0]]]
    # Darkest for the deepest level; spread over the upper part of the map.
    return cmap(0.45 + 0.5 * (same.index(key) + 1) / len(same))


def write_breakdown_plots(outcome, directory: str) -> list[str]:
    """Write ``breakdown_<scenario>_<backing>.{png,svg}``; return the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..tasks.reproduce import BACKING_LABELS
    from .plots import save_figure

    m = outcome.matrix
    prof = outcome.profile
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    for s in m.scenarios:
        for b in m.backings:
            parts = {(g, v): B.breakdown_ns(outcome.phase_counts(g, b, s, v), prof)
                     for g in m.granules for v in m.variants}
            keys = B.ordered_keys(k for p in parts.values() for k in p)
            fig, axes = plt.subplots(1, len(m.granules), figsize=(4.6 * len(m.granules), 4.6),
                                     squeeze=False)
            for ax, g in zip(axes[0], m.granules):
                bottoms = [0.0] * len(m.variants)
                for k in keys:
                    vals = [parts[(g, v)].get(k, 0.0) / 1e6 for v in m.variants]
                    ax.bar(range(len(m.variants)), vals, bottom=bottoms, label=B.key_label(k),
                           color=_colour(k, keys), edgecolor="white", linewidth=0.3)
                    bottoms = [x + y for x, y in zip(bottoms, vals)]
                ax.set_xticks(range(len(m.variants)), m.variants, rotation=20, ha="right",
                              fontsize=8)
                ax.set_title(f"{granule_name(g)} pages")
                ax.set_ylabel("estimated ms")
            handles, labels = axes[0][0].get_legend_handles_labels()
            fig.legend(handles[::-1], labels[::-1], fontsize=7, loc="center left",
                       bbox_to_anchor=(1.0, 0.5))
            fig.suptitle(f"{s}: {BACKING_LABELS[b]} -- estimated syscall time by kernel "
                         f"operation (profile {prof.name}; estimates)")
            fig.tight_layout()
            written += save_figure(fig, out_dir / f"breakdown_{s}_{b}")
            plt.close(fig)
    return written
