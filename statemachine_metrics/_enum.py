"""The `Enum` metric: a drop-in for `prometheus_client.Enum` with an O(1) `state()`."""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import REGISTRY, CollectorRegistry
from prometheus_client.samples import Sample

from . import _multiprocess
from ._multiprocess import EnumFiles, StateFile

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Enum"]

_E = TypeVar("_E", bound="Enum")

# Attributes a labelled child must not share with its parent through the class.
_PER_INSTANCE = frozenset(
    {"_lock", "_metrics", "_value", "_labelvalues", "_child_type", "_file", "_shown"}
)


_M = TypeVar("_M", bound=Callable[..., None])
_new_tuple = tuple.__new__
# A Sample's fields after name, labels and value (timestamp, exemplar, ...), all unset.
_NO_MORE = (None,) * (len(Sample._fields) - 3)


def _notifying(method: _M) -> _M:
    """Tell the metric's `_removed_hook` (a machine family) which series `method` removed."""

    @functools.wraps(method)
    def wrapper(self: Enum, *args: Any, **kwargs: Any) -> None:
        hook = self._removed_hook
        if hook is None:
            method(self, *args, **kwargs)
            return
        with self._lock:
            before = set(self._metrics)
        try:
            method(self, *args, **kwargs)
        finally:
            with self._lock:
                gone = before.difference(self._metrics)
            if gone:
                hook(gone)

    return cast(_M, wrapper)


class Enum(MetricWrapperBase):
    """Which one of a fixed set of states something is in.

    A drop-in for `prometheus_client.Enum`: same constructor, same errors, and the same
    exposition, byte for byte. Differences: `state()` is O(1) in the number of states and
    lock-free (the current state is one integer, so a concurrent scrape always sees exactly
    one state at 1), and duplicate states are refused.

        e = Enum("my_task_state", "Description of enum",
                 states=["starting", "running", "stopped"])
        e.state("running")

    Args:
        name: metric name; the full name is ``namespace_subsystem_name``.
        documentation: the help text.
        labelnames: label names; the metric's own full name is not allowed among them.
        namespace: optional prefix of the name.
        subsystem: optional middle part of the name.
        unit: must be empty (a stateset has no unit).
        registry: where to register; ``None`` skips registration.
        states: the non-empty list of states; the first one is the initial state.

    Raises:
        ValueError: for empty or duplicate states, a unit, the metric name used as a label
            name, or an invalid metric or label name.
    """

    _type = "stateset"
    _states: tuple[str, ...]
    _index: dict[str, int]
    _value: int
    _metrics: dict[tuple[str, ...], Enum]  # type: ignore[assignment]
    _child_type: type[Enum] | None
    # Multiprocess mode only: the metric's series in this process's value files, and the
    # series of this (unlabelled or child) metric. None otherwise.
    _files: EnumFiles | None = None
    # Told which label sets remove(), remove_by_labels() or clear() took away (set by the
    # machine family that owns the metric, whose live machines bring them back).
    _removed_hook: Callable[[set[tuple[str, ...]]], None] | None = None
    _file: StateFile | None = None
    # The series' samples as collect() last exposed them, one per state: reused while the
    # state is the same, so that a scrape of unchanged series allocates nothing per series.
    _shown: tuple[Sample, ...] | None = None

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        namespace: str = "",
        subsystem: str = "",
        unit: str = "",
        registry: CollectorRegistry | None = REGISTRY,
        states: Sequence[str] | None = None,
        _labelvalues: Sequence[str] | None = None,
    ) -> None:
        labelnames = tuple(labelnames)
        if name in labelnames:
            raise ValueError(f"Overlapping labels for Enum metric: {name}")
        if not states:
            raise ValueError(f"No states provided for Enum metric: {name}")
        states = tuple(states)
        index = {state: i for i, state in enumerate(states)}
        if len(index) != len(states):
            dupes = sorted({s for s in states if states.count(s) > 1})
            raise ValueError(f"Duplicate states for Enum metric {name}: {', '.join(dupes)}")
        self._states = states
        self._index = index
        self._child_type = None
        super().__init__(
            name=name,
            documentation=documentation,
            labelnames=labelnames,
            namespace=namespace,
            subsystem=subsystem,
            unit=unit,
            registry=None,
            _labelvalues=_labelvalues,
        )
        if self._name in labelnames:
            raise ValueError(f"Overlapping labels for Enum metric: {self._name}")
        self._kwargs["states"] = list(states)
        # An instance attribute, so that `state()` checks it at the cost of a plain load.
        self._file = None
        if _multiprocess.enabled() and not self._labelvalues:
            self._files = EnumFiles(self._name, self._documentation, labelnames, states)
            if not labelnames:
                self._file = self._files.file(())
        if not self._labelvalues:
            _enums.add(self)
        if registry is not None and not self._labelvalues:
            registry.register(self)

    def _metric_init(self) -> None:
        self._value = 0

    def state(self, state: str) -> None:
        """Set the current state.

        Raises:
            ValueError: if `state` is not one of the states, or if the metric has label
                names and no label values were chosen with `labels()`.
        """
        self._raise_if_not_observable()  # type: ignore[no-untyped-call]
        try:
            self._value = self._index[state]
        except (KeyError, TypeError):
            raise ValueError(
                f"{state!r} is not a state of Enum {self._name}; "
                f"states are {', '.join(self._states)}"
            ) from None
        file = self._file
        if file is not None:
            self._write_file(file)

    def _write_file(self, file: StateFile) -> None:
        """Multiprocess mode: show the current state in this process's value file."""
        files = self._files
        assert files is not None
        with files.lock:
            # Read under the lock, so that the file ends with the last state set.
            file.show(self._value)

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> Self:
        """Return the child for the given label values, creating it on first use.

        Errors are those of `prometheus_client`: no label names, chained calls, mixed
        positional and keyword values, a wrong count, or unknown label names.
        """
        if not self._labelnames:
            raise ValueError(f"No label names were set when constructing {self}")
        if self._labelvalues:
            raise ValueError(
                f"{self} already has labels set "
                f"({dict(zip(self._labelnames, self._labelvalues))}); "
                "can not chain calls to .labels()"
            )
        if labelvalues and labelkwargs:
            raise ValueError("Can't pass both *args and **kwargs")
        if labelkwargs:
            if sorted(labelkwargs) != sorted(self._labelnames):
                raise ValueError("Incorrect label names")
            key = tuple(str(labelkwargs[n]) for n in self._labelnames)
        else:
            if len(labelvalues) != len(self._labelnames):
                raise ValueError("Incorrect label count")
            key = tuple(str(v) for v in labelvalues)
        return self._child(key)

    def _child(self: _E, key: tuple[str, ...]) -> _E:
        """The child for label values already turned into strings."""
        child = self._metrics.get(key)
        if child is None:
            with self._lock:
                child = self._metrics.get(key)
                if child is None:
                    child = self._metrics[key] = self._new_child(key)
        return child  # type: ignore[return-value]

    def _new_child(self, key: tuple[str, ...]) -> Enum:
        # A child is an instance of a per-parent subclass that holds everything the parent
        # and its children share as class attributes, so a child costs two slots.
        child_type = self._child_type
        if child_type is None:
            shared = {k: v for k, v in vars(self).items() if k not in _PER_INSTANCE}
            slots = ("_labelvalues", "_value", "_shown")
            shared["__slots__"] = slots if self._files is None else (*slots, "_file")
            shared["__module__"] = type(self).__module__
            shared["__qualname__"] = type(self).__qualname__
            child_type = self._child_type = type(type(self).__name__, (type(self),), shared)
        child = object.__new__(child_type)
        child._labelvalues = key
        child._value = 0
        child._shown = None
        files = self._files
        if files is not None:
            child._file = files.file(key)
        return child

    @_notifying
    def remove(self, *labelvalues: Any) -> None:
        """Remove the series of the given label values (errors as in prometheus_client).

        In multiprocess mode the series leaves this process's value file too.
        """
        if self._files is None:
            super().remove(*labelvalues)
            return
        if not self._labelnames:
            raise ValueError(f"No label names were set when constructing {self}")
        if len(labelvalues) != len(self._labelnames):
            raise ValueError(
                f"Incorrect label count (expected {len(self._labelnames)}, got {labelvalues})"
            )
        key = tuple(str(v) for v in labelvalues)
        self._forget(lambda k: k == key)

    @_notifying
    def remove_by_labels(self, labels: dict[str, str]) -> None:
        """Remove every series whose label values include `labels`.

        In multiprocess mode the series leave this process's value file too.
        """
        if self._files is None:
            super().remove_by_labels(labels)
            return
        if not self._labelnames:
            raise ValueError(f"No label names were set when constructing {self}")
        if not isinstance(labels, dict):
            raise TypeError("labels must be a dict of {label_name: label_value}")
        if not labels:
            return
        invalid = [k for k in labels if k not in self._labelnames]
        if invalid:
            raise ValueError(f"Unknown label names: {invalid}; expected {self._labelnames}")
        wanted = [(self._labelnames.index(k), str(v)) for k, v in labels.items()]
        self._forget(lambda k: all(k[i] == v for i, v in wanted))

    @_notifying
    def clear(self) -> None:
        """Remove every series.

        In multiprocess mode the series leave this process's value file too.
        """
        if not self._labelnames:
            return  # a no-op, as in prometheus_client (before 0.26 it raised AttributeError)
        if self._files is None:
            super().clear()
            return
        self._forget(lambda k: True)

    def _forget(self, match: Callable[[tuple[str, ...]], bool]) -> None:
        """Multiprocess mode: drop the matching children and their series in the file.

        prometheus_client warns that it cannot remove label sets in this mode, and leaves
        their last values; our series live in a file of our own, which can forget them.
        """
        files = self._files
        assert files is not None
        with self._lock:
            for key in [k for k in self._metrics if match(k)]:
                child = self._metrics.pop(key)
                child._file = None  # a child still held elsewhere no longer writes
                files.hide(key)

    def collect(self) -> Iterable[Metric]:
        return [self._exposed_series(*self._series())]

    def _snapshot(self) -> list[tuple[tuple[str, ...], int]]:
        """The current state of each series: (label values, state index)."""
        if not self._labelnames:
            return [((), self._value)]
        with self._lock:
            return [(key, child._value) for key, child in self._metrics.items()]

    def _series(self) -> tuple[list[Enum], list[int]]:
        """Each series (this metric, or its children) and its current state index.

        Two lists and no object per series: a scrape of many series should not feed the
        garbage collector.
        """
        if not self._labelnames:
            return [self], [self._value]
        with self._lock:
            children = list(self._metrics.values())
        return children, [child._value for child in children]

    def _exposed_series(self, series: list[Enum], states: list[int]) -> Metric:
        """The metric family of `series` in `states`, sample for sample what the reference
        builds. Each series keeps the samples it was last exposed with, and makes new ones
        only for the states whose value changed since."""
        metric = Metric(self._name, self._documentation, "stateset")
        samples = metric.samples
        extend = samples.extend
        for child, current in zip(series, states):
            shown = child._shown
            # Exactly one of a series' samples is 1: the one of the state it was shown in.
            if shown is None or shown[current][2] != 1:
                shown = child._shown = self._samples_of(child, current, shown)
            extend(shown)
        return metric

    def _samples_of(
        self, child: Enum, current: int, shown: tuple[Sample, ...] | None
    ) -> tuple[Sample, ...]:
        """The samples of `child` in state `current`: those of `shown` (its samples in
        another state) whose value is unchanged, new ones with the same labels otherwise."""
        name = self._name
        if shown is None:
            series = dict(zip(self._labelnames, child._labelvalues))
            labels = []
            for state in self._states:
                one = series.copy()
                one[name] = state
                labels.append(one)
            # Sample(name, labels, value) without the keyword-aware constructor.
            return tuple(
                [
                    _new_tuple(Sample, (name, one, 1 if i == current else 0, *_NO_MORE))
                    for i, one in enumerate(labels)
                ]
            )
        return tuple(
            [
                sample
                if sample[2] == (i == current)
                else _new_tuple(Sample, (name, sample[1], 1 if i == current else 0, *_NO_MORE))
                for i, sample in enumerate(shown)
            ]
        )

    def _child_samples(self) -> Iterable[Sample]:
        name = self._name
        current = self._value
        return [
            Sample("", {name: state}, 1 if i == current else 0, None, None)
            for i, state in enumerate(self._states)
        ]

    def _multi_samples(self) -> Iterable[Sample]:
        return [
            Sample("", sample.labels, sample.value, None, None)
            for sample in self._exposed_series(*self._series()).samples
        ]


# Every parent Enum, to give each a fresh lock in a forked child: a thread of the parent
# may have held one at the fork, and that thread does not exist in the child.
_enums: weakref.WeakSet[Enum] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for metric in list(_enums):
        metric._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
