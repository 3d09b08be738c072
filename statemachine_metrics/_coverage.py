"""Transition coverage: how often each declared transition of each machine class ran.

The pytest plugin's ``--machine-coverage`` uses this: a `TransitionCoverage` listens to
every machine (`MeteredMachine.add_listener`) while the session runs, counts the
transitions of the class that owns each machine's definition, and reports the declared
transitions (``cls.transition_table()``) with their counts. Nothing here runs unless the
option is given.

A class is known by its module and qualified name, so that a class defined anew (a test
module imported twice, a class made by a factory function, another process of the same
run) adds to one entry; its declared transitions are the union of those of its versions.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _collector
from ._events import TransitionEvent
from ._machine import MeteredMachine

__all__ = ["ClassCoverage", "TransitionCoverage", "format_report"]

#: (trigger, source, dest); dest is None for an internal transition, as in
#: ``transition_table()``.
Spec = tuple[str, str, "str | None"]

#: The version of the JSON report's layout.
REPORT_FORMAT = 1


@dataclass
class ClassCoverage:
    """The declared transitions of one machine class and how often each ran."""

    module: str
    qualname: str
    #: Every declared transition, in declaration order, with its count.
    counts: dict[Spec, int] = field(default_factory=dict)

    @property
    def declared(self) -> int:
        return len(self.counts)

    @property
    def ran(self) -> int:
        return sum(1 for count in self.counts.values() if count)

    @property
    def percent(self) -> float:
        """The share of declared transitions that ran; 100 for a class that declares none."""
        return 100.0 * self.ran / self.declared if self.counts else 100.0

    def never_ran(self) -> list[Spec]:
        return [spec for spec, count in self.counts.items() if not count]

    def as_json(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "qualname": self.qualname,
            "declared": self.declared,
            "ran": self.ran,
            "percent": round(self.percent, 2),
            "transitions": [
                {"trigger": trigger, "source": source, "dest": dest, "count": count}
                for (trigger, source, dest), count in self.counts.items()
            ],
        }


def _owner(cls: type[MeteredMachine]) -> type[MeteredMachine] | None:
    """The class whose definition and metrics `cls` uses (itself, or the ancestor it
    inherits them from); None for a template or a class without states."""
    family = cls._family
    if family is None:
        return None
    owner = cls
    for base in cls.__mro__[1:]:
        if vars(base).get("_family") is family and issubclass(base, MeteredMachine):
            owner = base
    return owner


class TransitionCoverage:
    """Counts the transitions of every machine while started, by declared transition."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.classes: dict[str, ClassCoverage] = {}
        # Every class seen (subclasses sharing a definition included) -> its entry.
        self._entries: weakref.WeakKeyDictionary[type, ClassCoverage | None] = (
            weakref.WeakKeyDictionary()
        )
        # A transition whose (trigger, source, dest) the table does not list as such (a
        # nested state's child) -> the declared transition it belongs to.
        self._matched: dict[tuple[str, Spec], Spec] = {}
        self._started = False

    def start(self) -> None:
        """Listen to every machine; note the machine classes that exist now."""
        if not self._started:
            MeteredMachine.add_listener(self._on_transition)
            self._started = True
        self.scan()

    def stop(self) -> None:
        if self._started:
            MeteredMachine.remove_listener(self._on_transition)
            self._started = False

    def scan(self) -> None:
        """Note every machine class alive: a class with no transition run shows 0%."""
        with _collector._lock:
            classes = list(_collector._classes)
        for cls in classes:
            self._entry(cls)

    def _entry(self, cls: type[MeteredMachine]) -> ClassCoverage | None:
        try:
            return self._entries[cls]
        except KeyError:
            pass
        owner = _owner(cls)
        entry = None
        if owner is not None:
            key = f"{owner.__module__}.{owner.__qualname__}"
            with self._lock:
                entry = self.classes.get(key)
                if entry is None:
                    entry = self.classes[key] = ClassCoverage(owner.__module__, owner.__qualname__)
                for spec in owner.transition_table():
                    entry.counts.setdefault((spec[0], spec[1], spec[2]), 0)
        self._entries[cls] = entry
        return entry

    def _on_transition(self, event: TransitionEvent) -> None:
        entry = self._entry(type(event.machine))
        if entry is None:
            return
        spec: Spec = (event.trigger, event.source, None if event.internal else event.dest)
        with self._lock:
            counts = entry.counts
            if spec not in counts:
                spec = self._match(entry, spec)
            counts[spec] = counts.get(spec, 0) + 1

    def _match(self, entry: ClassCoverage, spec: Spec) -> Spec:
        """The declared transition a nested one ran as: its source or dest may be a child
        (``running_fetching``) of the declared state (``running``)."""
        key = (f"{entry.module}.{entry.qualname}", spec)
        found = self._matched.get(key)
        if found is None:
            trigger, source, dest = spec
            found = spec
            for candidate in _ancestors(source):
                for target in [None] if dest is None else _ancestors(dest):
                    if (trigger, candidate, target) in entry.counts:
                        found = (trigger, candidate, target)
                        break
                if found != spec:
                    break
            self._matched[key] = found
        return found

    # -- results -------------------------------------------------------------------------

    def merge(self, data: Mapping[str, Any]) -> None:
        """Add a report made by `as_json` (another process's) to these counts."""
        with self._lock:
            for item in data["classes"]:
                key = f"{item['module']}.{item['qualname']}"
                entry = self.classes.get(key)
                if entry is None:
                    entry = self.classes[key] = ClassCoverage(item["module"], item["qualname"])
                for row in item["transitions"]:
                    spec = (row["trigger"], row["source"], row["dest"])
                    entry.counts[spec] = entry.counts.get(spec, 0) + int(row["count"])

    def sorted_classes(self) -> list[ClassCoverage]:
        with self._lock:
            return sorted(self.classes.values(), key=lambda e: (e.module, e.qualname))

    def totals(self) -> tuple[int, int, float]:
        """(declared, ran, percent) over every class; 100% when nothing is declared."""
        classes = self.sorted_classes()
        declared = sum(entry.declared for entry in classes)
        ran = sum(entry.ran for entry in classes)
        return declared, ran, (100.0 * ran / declared if declared else 100.0)

    def as_json(self) -> dict[str, Any]:
        declared, ran, percent = self.totals()
        return {
            "format": REPORT_FORMAT,
            "declared": declared,
            "ran": ran,
            "percent": round(percent, 2),
            "classes": [entry.as_json() for entry in self.sorted_classes()],
        }

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_json(), indent=2) + "\n")


def _ancestors(state: str) -> Iterator[str]:
    """`state`, then each shorter ``_``-joined prefix of it: its possible parents."""
    parts = state.split("_")
    for end in range(len(parts), 0, -1):
        yield "_".join(parts[:end])


def _describe(spec: Spec) -> tuple[str, str]:
    trigger, source, dest = spec
    return trigger, f"{source} (internal)" if dest is None else f"{source} -> {dest}"


def format_percent(percent: float) -> str:
    """Rounded down, as coverage tools do: 99.9% is not shown as 100%."""
    return f"{int(percent)}%"


def format_report(coverage: TransitionCoverage, *, details: bool = True) -> list[str]:
    """The terminal table: per class, its declared transitions with their counts (or,
    without `details`, only those that never ran), then the total."""
    classes = coverage.sorted_classes()
    if not classes:
        return ["no machine class with metrics was seen"]
    lines: list[str] = []
    for entry in classes:
        if not entry.counts:
            lines.append(f"{entry.qualname} ({entry.module}): no transitions declared")
            continue
        lines.append(
            f"{entry.qualname} ({entry.module}): {entry.ran} of {entry.declared} "
            f"transitions ran, {format_percent(entry.percent)}"
        )
        # Columns line up within a class: its rows read the same whatever else ran.
        rows = [_describe(spec) for spec in entry.counts]
        trigger_width = max(len(trigger) for trigger, _ in rows)
        move_width = max(len(move) for _, move in rows)
        count_width = max(len(str(count)) for count in entry.counts.values())
        for spec, count in entry.counts.items():
            if not details and count:
                continue
            trigger, move = _describe(spec)
            never = "  never ran" if not count else ""
            lines.append(
                f"  {count:>{count_width}}  {trigger:<{trigger_width}}  "
                f"{move:<{move_width}}{never}".rstrip()
            )
    declared, ran, percent = coverage.totals()
    lines.append(f"TOTAL: {ran} of {declared} declared transitions ran, {format_percent(percent)}")
    return lines
