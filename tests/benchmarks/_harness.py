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


@dataclass
class Table:
    title: str
    unit: str = "µs/op"
    rows: list[Row] = field(default_factory=list)
    following: list[Table] = field(default_factory=list)

    def then(self, other: Table) -> Table:
        """Print `other` after this table."""
        self.following.append(other)
        return self

    def add(self, name: str, seconds: float, anchor: str | None = None) -> Row:
        row = Row(name, seconds, anchor)
        self.rows.append(row)
        return row

    def render(self) -> str:
        by_name = {row.name: row for row in self.rows}
        scale = {"µs/op": 1e6, "ms/op": 1e3, "s/op": 1.0, "bytes": 1.0}[self.unit]
        width = max(len(row.name) for row in self.rows)
        lines = [f"## {self.title}", "", f"| case | {self.unit} | ratio |", "| --- | ---: | ---: |"]
        for row in self.rows:
            ratio = ""
            if row.anchor is not None:
                ratio = f"{row.seconds / by_name[row.anchor].seconds:.2f}x {row.anchor}"
            lines.append(f"| {row.name:<{width}} | {row.seconds * scale:.3f} | {ratio} |")
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
