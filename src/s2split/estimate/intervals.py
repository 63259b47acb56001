"""Exact intervals of estimated savings over a profile's cost ranges.

An estimate is linear in the unit costs ``c`` (one per cost key,
:meth:`s2split.estimate.cost.Profile.coefficients`): vanilla's time is ``b . c``, a
variant's ``v . c``, and its saving ``100 (1 - (v . c) / (b . c))``. Over the
box ``low <= c <= high`` of the profile's ranges that is a linear-fractional
program, and its extremes are attained at vertices of the box.

They are found exactly by Dinkelbach's parametric method: for a trial ratio
``lam``, the box minimum of the linear form ``(v - lam b) . c`` is separable
(each cost at its low end where its coefficient is positive, else at its high
end), its vertex gives a ratio no larger than ``lam``, and the ratio falls
strictly until the form's minimum is zero, which is the optimality condition.
The ratios visited are those of distinct vertices, so the loop ends after
finitely many steps (a handful in practice) at a vertex whose ratio is the
exact optimum (as exact as one ratio of two dot products in floating point).
Tests check it against the vertices enumerated by brute force and against the
Charnes-Cooper linear program solved by ``scipy.optimize.linprog``.

A mean of savings (the ``avg`` over granules) is not linear-fractional: the
mean of each granule's exact extremes is an outer bound of the mean's
extremes, and it *is* the mean's exact extreme when one vertex attains the
extreme in every granule (:func:`mean_interval` says which).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..counting.counts import Counts


@dataclass(frozen=True)
class Interval:
    """A saving in percent: the point estimate and its exact extremes over
    the box of cost ranges, with the vertices (cost vectors) attaining them."""

    point: float
    low: float
    high: float
    low_costs: np.ndarray
    high_costs: np.ndarray

    @property
    def width(self) -> float:
        return self.high - self.low


def _min_ratio(v: np.ndarray, b: np.ndarray, low: np.ndarray, high: np.ndarray,
               point: np.ndarray) -> tuple[float, np.ndarray]:
    """The minimum of ``(v . c) / (b . c)`` over the box and a vertex attaining
    it (``b . c > 0`` on the whole box; see the module docstring)."""
    def vertex(lam: float) -> np.ndarray:
        return np.where(v - lam * b > 0, low, high)

    def ratio(c: np.ndarray) -> float:
        return float(v @ c) / float(b @ c)

    # The point is in the box, so the vertex of its ratio does no worse.
    c = vertex(ratio(point))
    lam = ratio(c)
    while True:
        c_next = vertex(lam)
        lam_next = ratio(c_next)
        if not lam_next < lam:
            return lam, c
        c, lam = c_next, lam_next


def ratio_extremes(v: np.ndarray, b: np.ndarray, low: np.ndarray, high: np.ndarray,
                   point: np.ndarray) -> tuple[tuple[float, np.ndarray], tuple[float, np.ndarray]]:
    """``((min ratio, vertex), (max ratio, vertex))`` of ``(v . c) / (b . c)``
    over ``low <= c <= high``; ``b`` and the box non-negative, ``b . low > 0``."""
    rmin, cmin = _min_ratio(v, b, low, high, point)
    neg, cmax = _min_ratio(-v, b, low, high, point)
    return (rmin, cmin), (-neg, cmax)


def saving_interval(profile, base: Counts, other: Counts) -> Interval | None:
    """The saving of ``other`` against ``base`` (percent of base's estimate)
    under ``profile``, with its exact range over the profile's cost box; None
    when base's estimate can be zero somewhere in the box (no saving to speak of)."""
    b = profile.coefficients(base)
    v = profile.coefficients(other)
    low, point, high = profile.bounds()
    eb = profile.estimate_ns(base)
    # The point as every table computes it (the same sum, the same rounding).
    p = 100.0 * (eb - profile.estimate_ns(other)) / eb if eb > 0 else None
    return interval_of(v, b, low, point, high, p)


def interval_of(v: np.ndarray, b: np.ndarray, low: np.ndarray, point: np.ndarray,
                high: np.ndarray, p: float | None = None) -> Interval | None:
    if float(b @ low) <= 0 or float(b @ point) <= 0:
        return None
    if p is None:
        p = 100.0 * (1.0 - float(v @ point) / float(b @ point))
    # Only the costs some count multiplies can move the ratio.
    used = (b != 0) | (v != 0)
    if (low[used] == high[used]).all():
        return Interval(p, p, p, point.copy(), point.copy())
    lo, hi, pt = low[used], high[used], point[used]
    (rmin, cmin), (rmax, cmax) = ratio_extremes(v[used], b[used], lo, hi, pt)
    at_min, at_max = point.copy(), point.copy()
    at_min[used], at_max[used] = cmin, cmax
    # The largest saving is at the smallest ratio; never let rounding put the
    # point outside its own interval.
    lo_s, hi_s = 100.0 * (1.0 - rmax), 100.0 * (1.0 - rmin)
    return Interval(p, min(lo_s, p), max(hi_s, p), at_max, at_min)


@dataclass(frozen=True)
class MeanInterval:
    point: float
    low: float
    high: float
    exact: bool  # the bounds are the mean's exact extremes (one vertex for all)


def mean_interval(parts: list[Interval], b_v: list[tuple[np.ndarray, np.ndarray]]
                  ) -> MeanInterval | None:
    """The mean of several savings and the mean of their extremes (an outer
    bound of the mean's range). It is exact when the vertex of each part's
    low end gives every part its low end, and likewise for the high end."""
    if not parts:
        return None
    n = len(parts)
    point = sum(p.point for p in parts) / n
    low = sum(p.low for p in parts) / n
    high = sum(p.high for p in parts) / n

    def mean_at(c: np.ndarray) -> float:
        return sum(100.0 * (1.0 - float(v @ c) / float(b @ c)) for b, v in b_v) / n

    tol = 1e-9 * max(1.0, abs(low), abs(high))
    exact = any(abs(mean_at(p.low_costs) - low) <= tol for p in parts) and \
        any(abs(mean_at(p.high_costs) - high) <= tol for p in parts)
    return MeanInterval(point, min(low, point), max(high, point), exact)


def fmt_interval(point: float | None, low: float | None, high: float | None) -> str:
    """``15.1% (9.8-22.4)``; a zero-width interval shows the point alone."""
    if point is None:
        return "n/a"
    if low is None or high is None or (f"{low:.1f}" == f"{point:.1f}" == f"{high:.1f}"):
        return f"{point:.1f}%"
    return f"{point:.1f}% ({low:.1f}-{high:.1f})"


__all__ = ["Interval", "MeanInterval", "ratio_extremes", "saving_interval", "interval_of",
           "mean_interval", "fmt_interval"]
