"""How tests and benchmarks write a figure measured several times: its median, then the range of the samples.

    median_range([2.9, 3.1, 3.0])                    '3.00 (2.90–3.10)'
    median_range([2.9, 3.1, 3.0], 1, dash="-")       '3.0 (2.9-3.1)'
    spread([2.9, 3.1, 3.0], "s")                     '3.000 s (2.900–3.100, n=3)'   (docs/benchmarks.md's tables)
    ratio(1.4234)                                    '1.42'
"""

from __future__ import annotations

import statistics
from typing import Sequence

NONE = "–"  # what a table shows where there is no figure


def value_range(values: Sequence[float], digits: int = 2, *, dash: str = "–", count: bool = False) -> str:
    """``(min–max)``, or ``(min–max, n=N)`` with ``count``."""
    tail = f", n={len(values)}" if count else ""
    return f"({min(values):.{digits}f}{dash}{max(values):.{digits}f}{tail})"


def median_range(values: Sequence[float], digits: int = 2, *, unit: str = "", dash: str = "–",
                 count: bool = False, range_of_one: bool = False) -> str:
    """The median (with its unit), then ``value_range``; NONE for no values. The range of a single value
    is left out unless ``range_of_one``."""
    if not values:
        return NONE
    text = f"{statistics.median(values):.{digits}f}" + (f" {unit}" if unit else "")
    if len(values) > 1 or range_of_one:
        text += " " + value_range(values, digits, dash=dash, count=count)
    return text


def spread(values: Sequence[float], unit: str) -> str:
    """A benchmark's figure as docs/benchmarks.md shows it: three decimals below 10, one from 10 on, and
    the number of samples."""
    digits = 3 if values and max(abs(v) for v in values) < 10 else 1
    return median_range(values, digits, unit=unit, count=True)


def ratio(value: float | None, none: str = NONE) -> str:
    """A ratio (a figure over its floor), two decimals; ``none`` where there is none."""
    return none if value is None else f"{value:.2f}"
