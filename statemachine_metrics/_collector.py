"""`MachineCollector`: exports machine classes through a `prometheus_client` registry."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ._family import Family

if TYPE_CHECKING:
    from ._machine import MeteredMachine

__all__ = ["MachineCollector", "all_families", "remember"]

_lock = threading.Lock()
_classes: weakref.WeakSet[type[MeteredMachine]] = weakref.WeakSet()


def remember(cls: type[MeteredMachine]) -> None:
    """Note a machine class that owns a metric family, for `MachineCollector()`."""
    with _lock:
        _classes.add(cls)


def all_families() -> list[Family]:
    """The families of every machine class alive, oldest class first."""
    with _lock:
        classes = list(_classes)
    families = [cls._family for cls in classes if cls._family is not None]
    return sorted(set(families), key=lambda f: f.created_order)


class MachineCollector(Collector):
    """A `prometheus_client` collector for machine classes.

    ``MachineCollector(Worker, Job)`` exports those classes (and so every subclass that
    shares their metrics); ``MachineCollector()`` exports every machine class that exists,
    including ones created later, holding them weakly. Each class contributes its `Enum`
    and the derived metrics (``_machines``, ``_transitions_total``, ``_duration_seconds``,
    ``_errors_total``). A collector never emits two families with one name: where two
    classes' metrics share a name, the older class is exported.

        registry = CollectorRegistry()
        registry.register(MachineCollector(Worker))

    Scraping is thread-safe and sees each class in one consistent state.

    Raises:
        TypeError: for an argument that is not a machine class with metrics.
    """

    def __init__(self, *classes: type[MeteredMachine]) -> None:
        from ._machine import MeteredMachine

        families: list[Family] = []
        for cls in classes:
            if not (isinstance(cls, type) and issubclass(cls, MeteredMachine)):
                raise TypeError(f"MachineCollector takes MeteredMachine classes, not {cls!r}")
            family = cls._family
            if family is None:
                raise TypeError(
                    f"MachineCollector: {cls.__qualname__} is abstract and has no metrics"
                )
            if family not in families:
                families.append(family)
        self._families = tuple(families) if classes else None

    def _current(self) -> Iterable[Family]:
        families = all_families() if self._families is None else self._families
        seen: set[str] = set()
        for family in families:
            names = family.exposed_names
            if seen.isdisjoint(names):
                seen.update(names)
                yield family

    def describe(self) -> Iterable[Metric]:
        return [metric for family in self._current() for metric in family.describe()]

    def collect(self) -> Iterable[Metric]:
        return [metric for family in self._current() for metric in family.collect()]


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
