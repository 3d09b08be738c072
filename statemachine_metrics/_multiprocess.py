"""Machine metrics in prometheus_client's multiprocess mode.

When ``PROMETHEUS_MULTIPROC_DIR`` is set as prometheus_client is imported, its
`values.ValueClass` is an mmap-backed value that writes to one file per process and kind
(``gauge_liveall_<pid>.db``, ``counter_<pid>.db``, ...), and
`prometheus_client.multiprocess.MultiProcessCollector` merges those files at scrape time. We
write through that same value class, so our samples share the files of the process's other
prometheus_client metrics and merge exactly as theirs do:

- the Enum: a gauge in mode ``liveall``, one series per live process (``pid`` label);
- ``<name>_machines``: a gauge in mode ``livesum``, summed over live processes;
- ``<name>_transitions_total``, ``<name>_errors_total``: counters, and
  ``<name>_duration_seconds``: a histogram, summed over all processes, dead ones included.

The family's in-memory lists stay the single-process truth; a mirror copies each update into
the files under the family's lock. A transition costs at most seven value writes: the Enum
series (old state to 0, new state to 1), the two ``_machines`` counts, the transition
counter, and the histogram's bucket and sum. Value files cannot delete an entry, so a series
that goes away is written with every state at 0; its label set leaves the merged output when
`mark_process_dead` deletes the process's live files.
"""

from __future__ import annotations

import gc
import os
import threading
import weakref
from bisect import bisect_left
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from prometheus_client import values

if TYPE_CHECKING:
    from ._family import Family

__all__ = ["EnumFiles", "FamilyFiles", "FamilyMirror", "StateFile", "enabled", "family_mirror"]

Key = tuple[str, ...]


class FamilyMirror(Protocol):
    """Copies a family's updates into the multiprocess value files.

    Every hook runs with the family's lock held, after the family's lists were updated.
    """

    def attach(self, key: Key | None, state: int) -> None:
        """A machine bound to `key` started in `state`."""

    def detach(self, key: Key | None, state: int, removed: bool) -> None:
        """A machine in `state` ended; `removed`: its label set went with it."""

    def moved(self, key: Key | None, src: int, dst: int, slot: int, elapsed: float) -> None:
        """A live machine bound to `key` ran transition `slot`, from `src` to `dst`."""

    def counted(self, slot: int) -> None:
        """Transition `slot` ran and no state change is shown (an internal transition)."""

    def observed(self, state: int, elapsed: float) -> None:
        """A machine left `state` after `elapsed` seconds, with no `moved` call."""

    def error(self, trigger: str, error: str) -> None:
        """`trigger` raised an exception of class `error`."""

    def reset(self) -> None:
        """The family's counters and histograms went back to zero."""


class _Value(Protocol):
    """What we use of prometheus_client's `MmapedValue`."""

    def inc(self, amount: float) -> None: ...

    def set(self, value: float, timestamp: float | None = None) -> None: ...


class _Lock(Protocol):
    def locked(self) -> bool: ...


def enabled() -> bool:
    """Whether prometheus_client writes metric values to multiprocess files here.

    Decided as prometheus_client decides it: by `values.ValueClass`, chosen when
    prometheus_client was imported (with ``PROMETHEUS_MULTIPROC_DIR`` set or not).
    """
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def _value(
    typ: str,
    metric: str,
    sample: str,
    labelnames: Sequence[str],
    labelvalues: Sequence[str],
    documentation: str,
    mode: str = "",
) -> _Value:
    """A value in this process's file for `typ` (and gauge `mode`), as a metric makes one."""
    value: _Value = values.ValueClass(
        typ, metric, sample, labelnames, labelvalues, documentation, multiprocess_mode=mode
    )
    return value


# -- the Enum ------------------------------------------------------------------------------


class StateFile:
    """One Enum series in the process's ``liveall`` gauge file: a value per state.

    `current` is the state written at 1, or -1 when the series shows none. The owning
    `EnumFiles` lock is held by callers.
    """

    __slots__ = ("current", "values")

    def __init__(self, values: tuple[_Value, ...]) -> None:
        self.values = values
        self.current = 0
        self.rewrite()

    def show(self, index: int) -> None:
        current = self.current
        if current != index:
            values = self.values
            # The old state goes to 0 first: a concurrent scrape may see no state at 1 for
            # an instant, never two.
            if current >= 0:
                values[current].set(0.0)
            values[index].set(1.0)
            self.current = index

    def hide(self) -> None:
        current = self.current
        if current >= 0:
            self.values[current].set(0.0)
            self.current = -1

    def rewrite(self) -> None:
        """Write every state: a fresh file after a fork, or a reused pid's, may say else."""
        current = self.current
        for i, value in enumerate(self.values):
            value.set(1.0 if i == current else 0.0)


class EnumFiles:
    """The series of one `Enum` in the process's ``liveall`` gauge file.

    A label set's values are made once and kept for the life of the process, as
    prometheus_client keeps every value it makes; a label set that comes back reuses them.
    """

    __slots__ = ("__weakref__", "documentation", "labelnames", "lock", "name", "series", "states")

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], states: Sequence[str]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = (*labelnames, name)
        self.states = tuple(states)
        self.lock = threading.Lock()
        self.series: dict[Key, StateFile] = {}
        _enum_files.add(self)

    def file(self, key: Key) -> StateFile:
        """The series for label values `key`, showing the first state."""
        with self.lock:
            file = self.series.get(key)
            if file is None:
                name, documentation, labelnames = self.name, self.documentation, self.labelnames
                file = self.series[key] = StateFile(
                    tuple(
                        _value("gauge", name, name, labelnames, (*key, s), documentation, "liveall")
                        for s in self.states
                    )
                )
            else:
                file.show(0)
            return file

    def show(self, file: StateFile, index: int) -> None:
        with self.lock:
            file.show(index)

    def hide(self, key: Key) -> None:
        with self.lock:
            file = self.series.get(key)
            if file is not None:
                file.hide()

    def after_fork(self) -> None:
        self.lock = threading.Lock()  # a thread of the parent may have held it
        for file in self.series.values():
            file.rewrite()


# -- a machine family ----------------------------------------------------------------------


class FamilyFiles:
    """The `FamilyMirror` of a machine family in multiprocess mode."""

    __slots__ = (
        "__weakref__",
        "backlog",
        "bounds",
        "buckets",
        "enum",
        "errors",
        "errors_help",
        "errors_name",
        "family",
        "machines",
        "single",
        "sums",
        "transitions",
    )

    def __init__(self, family: Family, enum: EnumFiles) -> None:
        name = family.name
        self.family = family
        self.enum = enum
        self.single = None if family.labelled else enum.file(())
        # Help texts are those `Family.collect` gives, so that HELP lines match.
        machines = family.machines_name
        self.machines = tuple(
            _value(
                "gauge",
                machines,
                machines,
                (name,),
                (state,),
                family.machines_help,
                "livesum",
            )
            for state in family.states
        )
        # A counter is stored as prometheus_client's Counter stores it: the metric without
        # `_total`, the sample with it.
        ran = family.transitions_name[: -len("_total")]
        self.transitions = tuple(
            _value(
                "counter",
                ran,
                family.transitions_name,
                ("from", "to", "trigger"),
                labels,
                family.transitions_help,
            )
            for labels in family.transition_labels
        )
        # A histogram as prometheus_client's Histogram stores it: one non-cumulative count
        # per bucket (with `le`) and the sum; the collector adds up `_bucket` and `_count`.
        duration = family.duration_name
        help_duration = family.duration_help
        self.bounds = family.bounds
        self.buckets = tuple(
            tuple(
                _value(
                    "histogram",
                    duration,
                    f"{duration}_bucket",
                    (name, "le"),
                    (state, le),
                    help_duration,
                )
                for le in family.bucket_names
            )
            for state in family.states
        )
        self.sums = tuple(
            _value("histogram", duration, f"{duration}_sum", (name,), (state,), help_duration)
            for state in family.states
        )
        self.errors_name = family.errors_name[: -len("_total")]
        self.errors_help = family.errors_help
        self.errors: dict[tuple[str, str], _Value] = {}
        # Detaches that came while this thread may hold prometheus_client's value lock (a
        # machine finalized by the garbage collector during a value write): writing then
        # would deadlock, so the next hook replays them.
        self.backlog: list[tuple[Key | None, int, bool]] = []
        self.rewrite()
        _family_files.add(self)

    def rewrite(self) -> None:
        for value, count in zip(self.machines, self.family.counts):
            value.set(float(count))

    def _file(self, key: Key | None) -> StateFile:
        return self.single if key is None else self.enum.series[key]  # type: ignore[return-value]

    def attach(self, key: Key | None, state: int) -> None:
        if self.backlog:
            self._replay()
        self.enum.show(self._file(key), state)
        self.machines[state].set(float(self.family.counts[state]))

    def detach(self, key: Key | None, state: int, removed: bool) -> None:
        if _collecting and _values_busy():
            self.backlog.append((key, state, removed))
            return
        if self.backlog:
            self._replay()
        self._detach(key, state, removed)

    def _detach(self, key: Key | None, state: int, removed: bool) -> None:
        self.machines[state].set(float(self.family.counts[state]))
        # Replayed late, the label set may have come back in the meantime.
        if removed and key is not None and key not in self.family.series:
            self.enum.hide(key)

    def _replay(self) -> None:
        backlog = self.backlog
        while backlog:
            self._detach(*backlog.pop(0))

    def moved(self, key: Key | None, src: int, dst: int, slot: int, elapsed: float) -> None:
        if self.backlog:
            self._replay()
        file = self.single if key is None else self.enum.series[key]
        assert file is not None
        if file.current != dst:  # only this family writes its series, under its lock
            with self.enum.lock:
                file.show(dst)
        if src != dst:
            machines = self.machines
            counts = self.family.counts
            machines[src].set(float(counts[src]))
            machines[dst].set(float(counts[dst]))
        self.transitions[slot].inc(1.0)
        self.buckets[src][bisect_left(self.bounds, elapsed)].inc(1.0)
        self.sums[src].inc(elapsed)

    def counted(self, slot: int) -> None:
        if self.backlog:
            self._replay()
        self.transitions[slot].inc(1.0)

    def observed(self, state: int, elapsed: float) -> None:
        if self.backlog:
            self._replay()
        self.buckets[state][bisect_left(self.bounds, elapsed)].inc(1.0)
        self.sums[state].inc(elapsed)

    def error(self, trigger: str, error: str) -> None:
        if self.backlog:
            self._replay()
        key = (trigger, error)
        value = self.errors.get(key)
        if value is None:
            name = self.errors_name
            value = self.errors[key] = _value(
                "counter", name, f"{name}_total", ("trigger", "error"), key, self.errors_help
            )
        value.inc(1.0)

    def reset(self) -> None:
        """Zero this process's share of the counters and histograms."""
        if self.backlog:
            self._replay()
        for value in (*self.transitions, *self.sums, *self.errors.values()):
            value.set(0.0)
        for row in self.buckets:
            for value in row:
                value.set(0.0)


def family_mirror(family: Family) -> FamilyMirror | None:
    """The mirror for `family` when multiprocess mode is on, else None."""
    enum = family.metric._files
    if enum is None:
        return None
    _watch_collections()
    return FamilyFiles(family, enum)


# -- process-wide bookkeeping --------------------------------------------------------------

_enum_files: weakref.WeakSet[EnumFiles] = weakref.WeakSet()
_family_files: weakref.WeakSet[FamilyFiles] = weakref.WeakSet()

# True while the garbage collector runs (and so may finalize machines) in some thread.
_collecting = False
_watching = False


def _on_collection(phase: str, info: dict[str, int]) -> None:
    global _collecting
    _collecting = phase == "start"


def _watch_collections() -> None:
    global _watching
    if not _watching:
        _watching = True
        gc.callbacks.append(_on_collection)


def _values_busy() -> bool:
    """Whether prometheus_client's value lock is held (by any thread), as far as we know.

    MultiProcessValue keeps its one lock in a closure; if we cannot find it, say busy.
    """
    method = getattr(values.ValueClass, "set", None)
    code = getattr(method, "__code__", None)
    cells = getattr(method, "__closure__", None)
    if code is not None and cells:
        for name, cell in zip(code.co_freevars, cells):
            if name == "lock":
                lock: _Lock = cell.cell_contents
                return lock.locked()
    return True


def _after_fork_in_child() -> None:
    # The child writes to files of its own pid, fresh (or left by a dead process that had
    # the same pid): write what this process's memory says. No family lock is taken: only
    # the forking thread runs here.
    if not enabled():
        return
    for enum in list(_enum_files):
        enum.after_fork()
    for family in list(_family_files):
        family.rewrite()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
