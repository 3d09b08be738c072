"""The metric family of a machine class: its `Enum` and the metrics derived from it.

Values live in plain lists indexed by state and by compiled transition, updated under one
lock per family, so that a transition is a handful of integer updates and a scrape copies a
consistent snapshot. Names and label sets are computed once, when the class is created.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Sequence
from operator import itemgetter
from typing import Any, NamedTuple

from prometheus_client import metrics
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Exemplar, Sample
from prometheus_client.utils import floatToGoString

from ._enum import Enum
from ._multiprocess import family_mirror

__all__ = ["DEFAULT_BUCKETS", "DEFAULT_TRIGGER_BUCKETS", "Family", "Series", "Snapshot"]

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


#: Histogram buckets for a trigger's latency, in seconds: from 100 µs to a minute.
DEFAULT_TRIGGER_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    math.inf,
)


class Snapshot(NamedTuple):
    """One consistent copy of a family's values, taken under its lock."""

    #: The Enum's series: (label values, index of the current state).
    enum: list[tuple[tuple[str, ...], int]]
    #: Live machines per state.
    counts: list[int]
    #: Transitions that ran, indexed like `Family.transition_labels`.
    transitions: list[int]
    #: Time-in-state histogram per state: non-cumulative bucket counts, and the sums.
    hist: list[list[int]]
    hist_sum: list[float]
    #: Errors: ((trigger, error class), count, first seen).
    errors: list[tuple[tuple[str, str], float, float]]
    #: Seconds the longest-staying live machine has spent in each state (0: none).
    oldest: list[float]
    #: Trigger latency histogram per trigger (indexed like `Family.trigger_names`).
    trigger_hist: list[list[int]]
    trigger_sum: list[float]
    #: When the counters started (None: created samples are switched off).
    created: float | None
    #: The last exemplar of each transition counter, and of each duration bucket (per
    #: state, non-cumulative bucket index); None where there is none.
    transition_exemplars: list[Exemplar | None]
    hist_exemplars: list[list[Exemplar | None]]
    #: With ``snapshot(series=True)``, instead of `enum`: the Enum's series objects and the
    #: index of each one's current state (what `Enum._exposed_series` takes).
    series: tuple[list[Enum], list[int]] | None = None


class _Removed:
    """Stands in for a series that was removed from the Enum while machines were bound to
    it: the next state written brings the series back (with the family's lock held)."""

    __slots__ = ("family", "series")

    def __init__(self, family: Family, series: Series) -> None:
        self.family = family
        self.series = series

    @property
    def _value(self) -> int:
        return -1

    @_value.setter
    def _value(self, state: int) -> None:
        series = self.series
        key = series.key
        assert key is not None
        child = series.child = self.family.metric._child(key)
        child._value = state


class Series:
    """One label set of the `Enum`, shared by the live machines bound to it."""

    __slots__ = ("child", "key", "live")

    def __init__(self, child: Enum, key: tuple[str, ...] | None) -> None:
        self.child = child
        self.key = key
        self.live = 0


def check_buckets(
    owner: str, buckets: Sequence[float], attribute: str = "duration_buckets"
) -> tuple[float, ...]:
    """Validated, sorted bucket bounds ending with +Inf, or a ValueError naming `owner`."""
    try:
        bounds = [float(b) for b in buckets]
    except (TypeError, ValueError):
        raise ValueError(f"{owner}.{attribute} must be numbers, got {buckets!r}") from None
    if not bounds or any(b != b for b in bounds) or bounds != sorted(set(bounds)):
        raise ValueError(
            f"{owner}.{attribute} must be distinct numbers in increasing order, got {buckets!r}"
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
        triggers: Sequence[str] = (),
        trigger_buckets: tuple[float, ...] = DEFAULT_TRIGGER_BUCKETS,
    ) -> None:
        states = metric._states
        self.owner = owner
        #: The module of the class that owns the family (for messages).
        self.module = ""
        self.machines_help = f"Live {owner} machines in each state"
        self.transitions_help = f"Transitions of {owner} machines that ran"
        self.duration_help = f"Time {owner} machines spent in a state, observed when they leave it"
        self.errors_help = f"Triggers of {owner} machines that raised, by exception class"
        self.oldest_help = (
            f"Seconds the longest-staying live {owner} machine has been in each state (0 when none)"
        )
        self.trigger_duration_help = (
            f"Time from a trigger of {owner} machines taking its turn to returning"
        )
        self.metric = metric
        self.name = metric._name
        self.states = states
        self.labelled = bool(metric._labelnames)
        self.label_count = len(metric._labelnames)
        # Picks a machine's label values out of its labels dict, in label order.
        self.pick = itemgetter(*metric._labelnames) if self.labelled else None
        self.lock = threading.Lock()
        self.index = {state: i for i, state in enumerate(states)}
        self.counts = [0] * len(states)
        # Per state, the live machines in it: token -> perf_counter() when it entered. A
        # dict keeps insertion order, so its first entry is the longest-staying machine.
        self.stays: list[dict[int, float]] = [{} for _ in states]
        self.transition_labels = tuple(transitions)
        self.transitions = [0] * len(self.transition_labels)
        self.bounds = buckets
        self.bucket_names = tuple(str(floatToGoString(b)) for b in buckets)
        self.hist = [[0] * len(buckets) for _ in states]
        self.hist_sum = [0.0] * len(states)
        # The last exemplar (trace id) of each transition counter and histogram bucket.
        self.transition_exemplars: list[Exemplar | None] = [None] * len(self.transition_labels)
        self.hist_exemplars: list[list[Exemplar | None]] = [[None] * len(buckets) for _ in states]
        self.trigger_names = tuple(triggers)
        self.trigger_bounds = trigger_buckets
        #: The bucket of a trigger observed as taking no time.
        self.quick = bisect_left(trigger_buckets, 0.0)
        self.trigger_bucket_names = tuple(str(floatToGoString(b)) for b in trigger_buckets)
        self.trigger_hist = [[0] * len(trigger_buckets) for _ in self.trigger_names]
        self.trigger_sum = [0.0] * len(self.trigger_names)
        self.errors: dict[tuple[str, str], list[float]] = {}
        self.created = time.time()
        self.created_order = next(_order)
        self.slots = {labels: i for i, labels in enumerate(self.transition_labels)}
        self.series: dict[tuple[str, ...], Series] = {}
        self.single = None if self.labelled else Series(metric, None)
        # Machines whose end was seen while the lock was taken (by a scrape in another
        # thread, or by a collection running inside a locked section): applied by the next
        # holder of the lock, before it reads or writes anything.
        self.pending: list[tuple[Series, int, int]] = []
        # In multiprocess mode, every update is also written to the shared value files.
        self.mirror = family_mirror(self)
        _families.add(self)
        metric._removed_hook = self._removed

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

    @property
    def oldest_name(self) -> str:
        return f"{self.name}_oldest_seconds"

    @property
    def trigger_duration_name(self) -> str:
        return f"{self.name}_trigger_duration_seconds"

    def slot(self, source: str, dest: str, trigger: str) -> int:
        """The transition counter's slot for these labels, added if new (lock held).

        Compiled steps know their slot; this serves the rare transition whose machine was
        moved by a nested trigger before its state change, and so leaves another state.
        """
        labels = (source, dest, trigger)
        slot = self.slots.get(labels)
        if slot is None:
            slot = self.slots[labels] = len(self.transition_labels)
            self.transition_labels = (*self.transition_labels, labels)
            self.transitions.append(0)
            self.transition_exemplars.append(None)
        return slot

    # -- machine lifecycle ---------------------------------------------------------------

    def attach(self, key: tuple[str, ...] | None, state: int, token: int) -> Series:
        """Count a new machine in `state`, bound to label values `key`, and show its state."""
        now = time.perf_counter()
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
            stays = self.stays[state]
            first = not stays
            stays[token] = now
            if self.mirror is not None:
                self.mirror.attach(key, state)
                if first:
                    self.mirror.oldest(state, time.time())
            return series

    def detach(self, series: Series, state: int, token: int) -> None:
        """Forget a machine that ended in `state`; its label set goes with its last machine.

        Never blocks: this runs from ``__del__``, possibly while this thread holds the
        family's lock or the Enum's (inside ``collect()`` or ``remove_by_labels()``).
        """
        if not self.lock.acquire(blocking=False):
            self.pending.append((series, state, token))
            return
        try:
            if self.pending:
                self._drain()
            if not self._detach(series, state, token):
                self.pending.append((series, state, token))
        finally:
            self.lock.release()

    def _detach(self, series: Series, state: int, token: int) -> bool:
        """Forget one machine (lock held); False, changing nothing, if its label set would
        go and the Enum's lock is taken: the caller keeps it for later."""
        key = series.key
        removed = key is not None and series.live == 1 and self.series.get(key) is series
        if removed and key is not None:
            metric = self.metric
            if not metric._lock.acquire(blocking=False):
                return False
            try:
                if metric._metrics.get(key) is series.child:
                    del metric._metrics[key]
            finally:
                metric._lock.release()
            del self.series[key]
        self.counts[state] -= 1
        series.live -= 1
        stays = self.stays[state]
        oldest = self.mirror is not None and stays and next(iter(stays)) == token
        stays.pop(token, None)
        if self.mirror is not None:
            self.mirror.detach(key, state, removed)
            if oldest:
                self.mirror.oldest(state, self._since(stays))
        return True

    def _since(self, stays: dict[int, float]) -> float | None:
        """The wall-clock time the first machine of `stays` entered its state, if any."""
        for token in stays:
            return time.time() - (time.perf_counter() - stays[token])
        return None

    def _removed(self, keys: set[tuple[str, ...]]) -> None:
        """The Enum's remove() or clear() took these label sets away: the next transition
        of a live machine bound to one brings it back."""
        with self.lock:
            for key in keys:
                series = self.series.get(key)
                if series is not None:
                    series.child = _Removed(self, series)  # type: ignore[assignment]

    def _drain(self) -> None:
        pending = self.pending
        kept = []
        while pending:
            entry = pending.pop()
            if not self._detach(*entry):
                kept.append(entry)
        pending.extend(kept)

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

    def triggered(self, index: int, elapsed: float) -> None:
        """Observe one trigger's latency (`acquire`/`release`: cheaper than `with`).

        Most triggers take less than the lowest bucket's bound: one comparison finds it.
        """
        bounds = self.trigger_bounds
        bucket = 0 if elapsed <= bounds[0] else bisect_left(bounds, elapsed)
        lock = self.lock
        lock.acquire()
        try:
            self.trigger_hist[index][bucket] += 1
            self.trigger_sum[index] += elapsed
            if self.mirror is not None:
                self.mirror.triggered(index, elapsed)
        finally:
            lock.release()

    def reset(self) -> None:
        """Zero the counters and histograms, as if the class had just been created."""
        with self.lock:
            self.transitions = [0] * len(self.transition_labels)
            # The bucket rows are zeroed in place: each compiled step holds its own.
            for row in (*self.hist, *self.trigger_hist):
                row[:] = [0] * len(row)
            self.hist_sum = [0.0] * len(self.states)
            self.transition_exemplars = [None] * len(self.transition_labels)
            self.hist_exemplars = [[None] * len(self.bounds) for _ in self.states]
            self.trigger_sum = [0.0] * len(self.trigger_names)
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
            GaugeMetricFamily(self.oldest_name, "", labels=()),
            HistogramMetricFamily(self.trigger_duration_name, "", labels=()),
        ]

    def snapshot(self, *, series: bool = False) -> Snapshot:
        """Copy every value under the lock: a scrape never sees a half-updated machine.

        With `series`, the Enum's states come as `Snapshot.series` (and `enum` is empty).
        """
        metric = self.metric
        with self.lock:
            if self.pending:
                self._drain()
            now = time.perf_counter()
            oldest = []
            for stays in self.stays:
                seconds = 0.0
                for token in stays:  # the first is the longest-staying machine
                    seconds = now - stays[token]
                    break
                oldest.append(seconds)
            return Snapshot(
                enum=[] if series else metric._snapshot(),
                counts=list(self.counts),
                transitions=list(self.transitions),
                hist=[list(row) for row in self.hist],
                hist_sum=list(self.hist_sum),
                errors=[(key, cell[0], cell[1]) for key, cell in self.errors.items()],
                oldest=oldest,
                trigger_hist=[list(row) for row in self.trigger_hist],
                trigger_sum=list(self.trigger_sum),
                created=self.created if metrics._use_created else None,
                transition_exemplars=list(self.transition_exemplars),
                hist_exemplars=[list(row) for row in self.hist_exemplars],
                series=metric._series() if series else None,
            )

    def collect(self) -> list[Metric]:
        """The family's metrics, from one consistent snapshot."""
        snap = self.snapshot(series=True)
        assert snap.series is not None
        created = snap.created
        state_label = [self.name]

        machines = GaugeMetricFamily(self.machines_name, self.machines_help, labels=state_label)
        for state, count in zip(self.states, snap.counts):
            machines.add_metric((state,), count)

        ran = CounterMetricFamily(
            self.transitions_name,
            self.transitions_help,
            labels=("from", "to", "trigger"),
        )
        for labels, value, exemplar in zip(
            self.transition_labels, snap.transitions, snap.transition_exemplars
        ):
            ran.add_metric(labels, value, created=created, exemplar=exemplar)

        duration = self._histogram(
            self.duration_name,
            self.duration_help,
            self.name,
            self.states,
            self.bucket_names,
            snap.hist,
            snap.hist_sum,
            created,
            snap.hist_exemplars,
        )

        failed = CounterMetricFamily(
            self.errors_name,
            self.errors_help,
            labels=("trigger", "error"),
        )
        for (trigger, error), times, first in snap.errors:
            failed.add_metric((trigger, error), times, created=first if created else None)

        oldest = GaugeMetricFamily(self.oldest_name, self.oldest_help, labels=state_label)
        for state, seconds in zip(self.states, snap.oldest):
            oldest.add_metric((state,), seconds)

        latency = self._histogram(
            self.trigger_duration_name,
            self.trigger_duration_help,
            "trigger",
            self.trigger_names,
            self.trigger_bucket_names,
            snap.trigger_hist,
            snap.trigger_sum,
            created,
        )
        return [
            self.metric._exposed_series(*snap.series),
            machines,
            ran,
            duration,
            failed,
            oldest,
            latency,
        ]

    @staticmethod
    def _histogram(
        name: str,
        documentation: str,
        label: str,
        values: Sequence[str],
        bucket_names: Sequence[str],
        rows: list[list[int]],
        sums: list[float],
        created: float | None,
        exemplars: list[list[Exemplar | None]] | None = None,
    ) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=(label,))
        for i, (value, row, total) in enumerate(zip(values, rows, sums)):
            cumulative = 0
            buckets: list[Any] = []
            marks = exemplars[i] if exemplars is not None else None
            for j, (bucket, count) in enumerate(zip(bucket_names, row)):
                cumulative += count
                mark = marks[j] if marks is not None else None
                buckets.append((bucket, cumulative) if mark is None else (bucket, cumulative, mark))
            family.add_metric((value,), buckets, total)
            if created is not None:
                family.samples.append(
                    Sample(f"{name}_created", {label: value}, created, None, None)
                )
        return family


# -- fork ----------------------------------------------------------------------------------

_families: weakref.WeakSet[Family] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # Another thread of the parent may have held a family's lock at the fork; that thread
    # does not exist here, so the lock would never be released.
    for family in list(_families):
        family.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
