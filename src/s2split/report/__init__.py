"""Reports: tables, JSON, explanations and plots of counts and estimates."""


def saving(base: float, value: float) -> float | None:
    """Percent of ``base`` that ``value`` saves (positive: less work), or None
    when there is nothing to save from."""
    if base == 0:
        return None
    return 100.0 * (base - value) / base
