"""The metric family of a machine class: its `Enum` and the metrics derived from it.

Values live in plain lists indexed by state and by compiled transition, updated under one
lock per family, so that a transition is a handful of integer updates and a scrape copies a
consistent snapshot. Names and label sets are computed once, when the class is created.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
import time
from collections.abc import Sequence
from operator import itemgetter

from prometheus_client import metrics
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from ._enum import Enum
from ._multiprocess import family_mirror

__all__ = ["DEFAULT_BUCKETS", "Family", "Series"]

_order = itertools.count()

#: Histogram buckets for the time spent in a state, in seconds: from 100 µs to a day.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.001,
    0.01,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    10800.0,
    43200.0,
    86400.0,
    math.inf,
)


class Series:
    """One label set of the `Enum`, shared by the live machines bound to it."""

    __slots__ = ("child", "key", "live")

    def __init__(self, child: Enum, key: tuple[str, ...] | None) -> None:
        self.child = child
        self.key = key
        self.live = 0


def check_buckets(owner: str, buckets: Sequence[float]) -> tuple[float, ...]:
    """Validated, sorted bucket bounds ending with +Inf, or a ValueError naming `owner`."""
    try:
        bounds = [float(b) for b in buckets]
    except (TypeError, ValueError):
        raise ValueError(f"{owner}.duration_buckets must be numbers, got {buckets!r}") from None
    if not bounds or any(b != b for b in bounds) or bounds != sorted(set(bounds)):
        raise ValueError(
            f"{owner}.duration_buckets must be distinct numbers in increasing order, "
            f"got {buckets!r}"
        )
    if bounds[-1] != math.inf:
        bounds.append(math.inf)
    return tuple(bounds)


class Family:
    """Storage and exposition of one machine class's metrics (shared with its subclasses)."""

    def __init__(
        self,
        owner: str,
        metric: Enum,
        buckets: tuple[float, ...],
        transitions: Sequence[tuple[str, str, str]],
    ) -> None:
        states = metric._states
        self.owner = owner
        self.machines_help = f"Live {owner} machines in each state"
        self.transitions_help = f"Transitions of {owner} machines that ran"
        self.duration_help = f"Time {owner} machines spent in a state, observed when they leave it"
        self.errors_help = f"Triggers of {owner} machines that raised, by exception class"
        self.metric = metric
        self.name = metric._name
        self.states = states
        self.labelled = bool(metric._labelnames)
        self.label_count = len(metric._labelnames)
        # Picks a machine's label values out of its labels dict, in label order.
        self.pick = itemgetter(*metric._labelnames) if self.labelled else None
        self.lock = threading.Lock()
        self.counts = [0] * len(states)
        self.transition_labels = tuple(transitions)
        self.transitions = [0] * len(self.transition_labels)
        self.bounds = buckets
        self.bucket_names = tuple(str(floatToGoString(b)) for b in buckets)  # type: ignore[no-untyped-call]
        self.hist = [[0] * len(buckets) for _ in states]
        self.hist_sum = [0.0] * len(states)
        self.errors: dict[tuple[str, str], list[float]] = {}
        self.created = time.time()
        self.created_order = next(_order)
        self.slots = {labels: i for i, labels in enumerate(self.transition_labels)}
        self.series: dict[tuple[str, ...], Series] = {}
        self.single = None if self.labelled else Series(metric, None)
        # Machines whose end was seen while the lock was taken (by a scrape in another
        # thread, or by a collection running inside a locked section): applied by the next
        # holder of the lock, before it reads or writes anything.
        self.pending: list[tuple[Series, int]] = []
        # In multiprocess mode, every update is also written to the shared value files.
        self.mirror = family_mirror(self)

    # -- names ---------------------------------------------------------------------------

    @property
    def machines_name(self) -> str:
        return f"{self.name}_machines"

    @property
    def transitions_name(self) -> str:
        return f"{self.name}_transitions_total"

    @property
    def duration_name(self) -> str:
        return f"{self.name}_duration_seconds"

    @property
    def errors_name(self) -> str:
        return f"{self.name}_errors_total"

    # -- machine lifecycle ---------------------------------------------------------------

    def attach(self, key: tuple[str, ...] | None, state: int) -> Series:
        """Count a new machine in `state`, bound to label values `key`, and show its state."""
        with self.lock:
            if self.pending:
                self._drain()
            if key is None:
                series = self.single
                assert series is not None
            else:
                series = self.series.get(key)
                if series is None:
                    series = self.series[key] = Series(self.metric._child(key), key)
                elif self.metric._metrics.get(key) is not series.child:
                    # Removed from the Enum (remove(), clear()) while machines were bound
                    # to it: a new machine brings the series back, for them all.
                    series.child = self.metric._child(key)
            series.live += 1
            series.child._value = state
            self.counts[state] += 1
            if self.mirror is not None:
                self.mirror.attach(key, state)
            return series

    def detach(self, series: Series, state: int) -> None:
        """Forget a machine that ended in `state`; its label set goes with its last machine.

        Never blocks: this runs from ``__del__``, possibly while this thread holds the lock.
        """
        if not self.lock.acquire(blocking=False):
            self.pending.append((series, state))
            return
        try:
            self._detach(series, state)
            if self.pending:
                self._drain()
        finally:
            self.lock.release()

    def _detach(self, series: Series, state: int) -> None:
        self.counts[state] -= 1
        series.live -= 1
        key = series.key
        removed = False
        if key is not None and series.live == 0 and self.series.get(key) is series:
            removed = True
            del self.series[key]
            metric = self.metric
            with metric._lock:
                if metric._metrics.get(key) is series.child:
                    del metric._metrics[key]
        if self.mirror is not None:
            self.mirror.detach(key, state, removed)

    def _drain(self) -> None:
        pending = self.pending
        while pending:
            self._detach(*pending.pop())

    def live_counts(self) -> list[int]:
        """Live machines in each state, indexed like the states."""
        with self.lock:
            if self.pending:
                self._drain()
            return list(self.counts)

    def error(self, trigger: str, error: BaseException) -> None:
        """Count a trigger that raised."""
        key = (trigger, type(error).__name__)
        with self.lock:
            cell = self.errors.get(key)
            if cell is None:
                self.errors[key] = [1.0, time.time()]
            else:
                cell[0] += 1
            if self.mirror is not None:
                self.mirror.error(*key)

    def reset(self) -> None:
        """Zero the counters and histograms, as if the class had just been created."""
        with self.lock:
            self.transitions = [0] * len(self.transition_labels)
            self.hist = [[0] * len(self.bounds) for _ in self.states]
            self.hist_sum = [0.0] * len(self.states)
            self.errors = {}
            self.created = time.time()
            if self.mirror is not None:
                self.mirror.reset()

    # -- exposition ----------------------------------------------------------------------

    @functools.cached_property
    def exposed_names(self) -> frozenset[str]:
        """Every sample name the family may expose, suffixes included, as a registry sees
        them: two families sharing one cannot be exported together."""
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
        }
        return frozenset(
            name
            for metric in self.describe()
            for name in (metric.name, *(metric.name + s for s in suffixes.get(metric.type, ())))
        )

    def describe(self) -> list[Metric]:
        return [
            Metric(self.name, self.metric._documentation, "stateset"),
            GaugeMetricFamily(self.machines_name, "", labels=()),
            CounterMetricFamily(self.transitions_name, "", labels=()),
            HistogramMetricFamily(self.duration_name, "", labels=()),
            CounterMetricFamily(self.errors_name, "", labels=()),
        ]

    def collect(self) -> list[Metric]:
        """The family's metrics, from one consistent snapshot."""
        metric = self.metric
        with self.lock:
            if self.pending:
                self._drain()
            enum = metric._snapshot()
            counts = list(self.counts)
            transitions = list(self.transitions)
            hist = [list(row) for row in self.hist]
            hist_sum = list(self.hist_sum)
            errors = [(key, cell[0], cell[1]) for key, cell in self.errors.items()]
            created: float | None = self.created
        state_label = [self.name]
        if not metrics._use_created:  # disable_created_metrics(), or its variable
            created = None

        machines = GaugeMetricFamily(self.machines_name, self.machines_help, labels=state_label)
        for state, count in zip(self.states, counts):
            machines.add_metric((state,), count)

        ran = CounterMetricFamily(
            self.transitions_name,
            self.transitions_help,
            labels=("from", "to", "trigger"),
        )
        for labels, value in zip(self.transition_labels, transitions):
            ran.add_metric(labels, value, created=created)

        duration = HistogramMetricFamily(
            self.duration_name,
            self.duration_help,
            labels=state_label,
        )
        for state, row, total in zip(self.states, hist, hist_sum):
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for name, count in zip(self.bucket_names, row):
                cumulative += count
                buckets.append((name, cumulative))
            duration.add_metric((state,), buckets, total)
            if created is not None:
                duration.samples.append(
                    Sample(f"{self.duration_name}_created", {self.name: state}, created, None, None)
                )

        failed = CounterMetricFamily(
            self.errors_name,
            self.errors_help,
            labels=("trigger", "error"),
        )
        for (trigger, error), times, first in errors:
            failed.add_metric((trigger, error), times, created=first if created else None)

        return [metric._exposed(enum), machines, ran, duration, failed]
