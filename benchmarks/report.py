"""What every speed benchmark reports: a figure beside its floor, measured in the same run, as a ratio with
the goal it is held against. ``benchmarks/speed.py`` gathers the comparisons of all of them and writes them
into docs/benchmarks.md between the markers below.

A comparison keeps its raw samples, so the table shows the median and the spread (min-max) of each side."""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from vjobs.testing.figures import ratio, spread

BEGIN = "<!-- speed.py: begin (generated; edit benchmarks/speed.py, not this) -->"
END = "<!-- speed.py: end -->"


@dataclass
class Comparison:
    """``values`` against ``floor_values`` (same unit). ``lower_is_better`` for times and memory; the ratio
    is always value / floor, and the goal is met when it is <= ``goal_ratio`` (or >= for speeds)."""

    goal: str  # which goal of issue 11, e.g. "1. fixed per-job cost"
    what: str  # e.g. "`vjobs run` hello job, qemu_user, cold boot"
    values: list[float]
    floor: str  # e.g. "plain QEMU (plain-qemu-floor.sh)"
    floor_values: list[float]
    unit: str = "s"
    goal_ratio: float | None = None
    lower_is_better: bool = True
    note: str = ""
    absolute_goal: float | None = None  # e.g. 0.5 s to the payload: met when median <= it (>= for speeds)

    @property
    def ratio(self) -> float | None:
        floor = statistics.median(self.floor_values) if self.floor_values else 0
        return statistics.median(self.values) / floor if floor else None

    @property
    def met(self) -> bool | None:
        checks = []
        if self.goal_ratio is not None and self.ratio is not None:
            checks.append(self.ratio <= self.goal_ratio if self.lower_is_better else self.ratio >= self.goal_ratio)
        if self.absolute_goal is not None:
            median = statistics.median(self.values)
            checks.append(median <= self.absolute_goal if self.lower_is_better else median >= self.absolute_goal)
        return all(checks) if checks else None

    def goal_text(self) -> str:
        sign = "≤" if self.lower_is_better else "≥"
        parts = []
        if self.goal_ratio is not None:
            parts.append(f"{sign} {self.goal_ratio:g} ×")
        if self.absolute_goal is not None:
            parts.append(f"{sign} {self.absolute_goal:g} {self.unit}")
        return ", ".join(parts) or "(shown for reference)"


def table(comparisons: list[Comparison]) -> str:
    lines = ["| goal | measured | median (min–max, n) | floor, same run | floor median (min–max, n) | ratio | "
             "goal | met |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in comparisons:
        met = {True: "**yes**", False: "**no**", None: "–"}[c.met]
        lines.append(f"| {c.goal} | {c.what} | {spread(c.values, c.unit)} | {c.floor} | "
                     f"{spread(c.floor_values, c.unit)} | {ratio(c.ratio)} | {c.goal_text()} | {met} |")
    notes = [f"- {c.what}: {c.note}" for c in comparisons if c.note]
    return "\n".join(lines + ([""] + notes if notes else []))


def print_comparisons(comparisons: list[Comparison]) -> None:
    for c in comparisons:
        print(f"  {c.goal}: {c.what}: {spread(c.values, c.unit)} against {c.floor}: "
              f"{spread(c.floor_values, c.unit)}; ratio {ratio(c.ratio, none='-')}, goal {c.goal_text()}, "
              f"met: {c.met}")


def print_section(section: "Section") -> None:
    """What each benchmark script prints when run alone: its comparisons, their notes, its text."""
    print(f"{section.title}:")
    print_comparisons(section.comparisons)
    for comparison in section.comparisons:
        if comparison.note:
            print(f"    {comparison.what}: {comparison.note}")
    if section.text:
        print(section.text)


def write_section(document: Path, markdown: str) -> None:
    """Replace what lies between BEGIN and END in ``document`` (appended at the end the first time)."""
    text = document.read_text() if document.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{markdown.rstrip()}\n{END}"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    document.write_text(text)


@dataclass
class Section:
    """One benchmark's part of the generated text: its comparisons and what to say about them."""

    title: str
    comparisons: list[Comparison] = field(default_factory=list)
    text: str = ""  # markdown said after the table: how it was measured, why a goal is missed
