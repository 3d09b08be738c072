"""Timing helpers: medians of repeated runs, reported as ratios against an anchor."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Row:
    """One measured case: per-operation median in seconds, compared with an anchor row."""

    name: str
    seconds: float
    anchor: str | None = None
    #: A second row to compare with (the floor, where the anchor is a contender).
    also: str | None = None


@dataclass
class Table:
    title: str
    unit: str = "µs/op"
    rows: list[Row] = field(default_factory=list)
    following: list[Table] = field(default_factory=list)
    #: Printed under the title, for a table that could not be measured.
    note: str = ""

    def then(self, other: Table) -> Table:
        """Print `other` after this table."""
        self.following.append(other)
        return self

    def add(
        self, name: str, seconds: float, anchor: str | None = None, also: str | None = None
    ) -> Row:
        row = Row(name, seconds, anchor, also)
        self.rows.append(row)
        return row

    def render(self) -> str:
        if not self.rows:
            return f"## {self.title}\n\n{self.note}\n"
        by_name = {row.name: row for row in self.rows}
        scale = {"µs/op": 1e6, "ms/op": 1e3, "s/op": 1.0, "bytes": 1.0, "instructions": 1.0}
        digits = 0 if self.unit == "instructions" else 3
        width = max(len(row.name) for row in self.rows)
        lines = [f"## {self.title}", "", f"| case | {self.unit} | ratio |", "| --- | ---: | ---: |"]
        for row in self.rows:
            ratios = [
                f"{row.seconds / by_name[other].seconds:.2f}x {other}"
                for other in (row.anchor, row.also)
                if other is not None
            ]
            ratio = "; ".join(ratios)
            value = row.seconds * scale[self.unit]
            lines.append(f"| {row.name:<{width}} | {value:.{digits}f} | {ratio} |")
        text = "\n".join(lines) + "\n"
        return "\n".join([text, *(table.render() for table in self.following)])


def median_time(run: Callable[[], object], operations: int, repeats: int = 7) -> float:
    """Median seconds per operation of `run`, which performs `operations` operations."""
    samples = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) / operations)
    return statistics.median(samples)


def interleaved(
    cases: dict[str, tuple[Callable[[], object], int]], rounds: int = 5
) -> dict[str, float]:
    """Median seconds per operation of each case, its runs interleaved round by round.

    `cases` maps a name to ``(run, operations)``. Interleaving spreads the machine's slow
    moments over every case alike, so the ratios between them hold up on a busy machine.
    """
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (run, operations) in cases.items():
            gc.collect()
            start = time.perf_counter()
            run()
            samples[name].append((time.perf_counter() - start) / operations)
    return {name: statistics.median(times) for name, times in samples.items()}
