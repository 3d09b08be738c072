"""Machine metrics in prometheus_client's multiprocess mode.

When ``PROMETHEUS_MULTIPROC_DIR`` is set as prometheus_client is imported, every process
writes its metric values to files named ``<type>[_<mode>]_<pid>.db`` in that directory, and
`prometheus_client.multiprocess.MultiProcessCollector` merges them at scrape time;
`mark_process_dead(pid)` deletes a dead process's ``gauge_live*_<pid>.db`` files. Machine
metrics go to the same files, stored the way prometheus_client stores its own:

- ``<name>_machines``: gauge, mode ``livesum`` (summed over live processes);
- ``<name>_oldest_timestamp_seconds``: gauge, mode ``livemin``: when the longest-staying live
  machine entered each state, over live processes (``+Inf`` for none);
- ``<name>_transitions_total``, ``<name>_errors_total``: counters, and
  ``<name>_duration_seconds``, ``<name>_trigger_duration_seconds``: histograms, summed over
  all processes, dead ones included.

These have a fixed set of label sets, and share the process's files with its other metrics
(``counter_<pid>.db``, ``histogram_<pid>.db``, ``gauge_livesum_<pid>.db``,
``gauge_livemin_<pid>.db``: the names `mark_process_dead` and the collector know). Two
writers appending to one file would destroy each other's entries, so prometheus_client's
value class (`values.ValueClass`) makes every entry of ours, as it makes a metric's; we then
map the file ourselves (`ValueFile`), find where each value sits, and write it there: one
8-byte store into the map per value, at an index computed once. Where an entry cannot be
found (a value class of another kind, a file of another format), the value is written
through its value object instead (`_Values`): slower, and as correct.

The Enum is different: one series per label set, and label sets come and go with machines.
prometheus_client's value files can never drop an entry, and its value class keeps every
value it made for the life of the process. So the Enum series are kept in a file of our
own, `LiveFile`, with the name and format prometheus_client gives a ``liveall`` gauge
(``gauge_liveall_<pid>.db``): `MultiProcessCollector` reads it (one series per live process,
with a ``pid`` label) and `mark_process_dead` deletes it, with nothing for users to add. As
we alone write it, we can forget a label set: its entries are zeroed at once (the series
shows no state), and the file is rewritten without them (a new file renamed over the old
one, so that a concurrent scrape reads the old file or the new, whole) once dead entries
make up half of the file and 16 KiB.

A family's values are written with the family's lock held, so they need no lock of their
own, and a fork cannot split a one-store write. The live file's structure, the Enum writes
into it, the making of entries and every write through a value object happen under one
process-wide lock, `_lock`, which a fork waits for: a child never inherits a half-done
compaction, nor prometheus_client's value lock held by one of our threads. A transition
takes `_lock` once. In the child, the maps of the parent's files are closed before anything
runs, and every value is found again in the child's own files.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import mmap
import os
import struct
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from prometheus_client import values

if TYPE_CHECKING:
    from ._family import Family

__all__ = [
    "EnumFiles",
    "FamilyFiles",
    "FamilyMirror",
    "LiveFile",
    "StateFile",
    "ValueFile",
    "check_labelnames",
    "enabled",
    "family_mirror",
]

logger = logging.getLogger("statemachine_metrics")

Key = tuple[str, ...]

#: The label `MultiProcessCollector` adds to every series of a ``liveall`` gauge.
PID_LABEL = "pid"


class FamilyMirror(Protocol):
    """Copies a family's updates into the multiprocess value files.

    Every hook runs with the family's lock held, after the family's lists were updated.
    """

    def attach(self, key: Key | None, state: int) -> None:
        """A machine bound to `key` started in `state`."""

    def detach(self, key: Key | None, state: int, removed: bool) -> None:
        """A machine in `state` ended; `removed`: its label set went with it."""

    def transition(
        self,
        key: Key | None,
        src: int,
        dst: int,
        slot: int,
        elapsed: float,
        now: float,
        first: bool,
        empty: bool,
        tindex: int,
        latency: float | None,
    ) -> None:
        """All that one transition of a live machine writes, in one call: the machine
        bound to `key` ran transition `slot` from `src` to `dst`, `elapsed` seconds after
        it entered `src`; the oldest entry time of `src` if the machine was its
        longest-staying (`first`), and of `dst` if no machine was there (`empty`), `now`
        being the ``perf_counter()`` time it entered `dst`; and `triggered(tindex,
        latency)` unless `latency` is None."""

    def counted(self, slot: int) -> None:
        """Transition `slot` ran and no state change is shown (an internal transition)."""

    def observed(self, state: int, elapsed: float) -> None:
        """A machine left `state` after `elapsed` seconds, with no `transition` call."""

    def error(self, trigger: str, error: str) -> None:
        """`trigger` raised an exception of class `error`."""

    def triggered(self, index: int, elapsed: float) -> None:
        """Trigger `family.trigger_names[index]` returned `elapsed` seconds after its turn
        started."""

    def oldest(self, state: int, since: float | None) -> None:
        """The oldest live machine of this process in `state` entered it at `since`
        (``time.time()``), or there is none (None). Called when it changes."""

    def reset(self) -> None:
        """The family's counters and histograms went back to zero."""


class _Value(Protocol):
    """What we use of prometheus_client's value class."""

    def inc(self, amount: float) -> None: ...

    def set(self, value: float, timestamp: float | None = None) -> None: ...

    def get(self) -> float: ...


def enabled() -> bool:
    """Whether prometheus_client writes metric values to multiprocess files here.

    Decided as prometheus_client decides it: by `values.ValueClass`, chosen when
    prometheus_client was imported (with ``PROMETHEUS_MULTIPROC_DIR`` set or not).
    """
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def check_labelnames(owner: str, labelnames: Sequence[str]) -> None:
    """Refuse label names that multiprocess mode cannot show (only when it is on).

    Raises:
        ValueError: for a label named ``pid``, which `MultiProcessCollector` replaces with
            the process id in every Enum series.
    """
    if PID_LABEL in labelnames and enabled():
        raise ValueError(
            f"{owner}: label name {PID_LABEL!r} is taken in prometheus_client's multiprocess "
            "mode (PROMETHEUS_MULTIPROC_DIR is set): the merged output labels each process's "
            f"series with its {PID_LABEL!r}; rename the label (for example to 'worker_pid')"
        )


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


# -- the process's own liveall file ---------------------------------------------------------

# The value file format of prometheus_client's `MmapedDict`, which `MultiProcessCollector`
# reads: a 4-byte count of the bytes used, 4 bytes of padding, then entries of a 4-byte key
# length, the UTF-8 key (a JSON list) padded with spaces to 8-byte alignment, and two
# doubles: the value and a timestamp.
_INT = struct.Struct("i")
_DOUBLE = struct.Struct("d")
_TWO_DOUBLES = struct.Struct("dd")
_MIN_CAPACITY = 1 << 16
_DEAD_SLACK = 1 << 14
# What a file's doubles are before it is mapped: writing there is a bug, and raises.
_NO_DOUBLES = memoryview(b"").cast("d")


def _entry_head(key: str) -> bytes:
    """An entry's length and key, padded so that its value starts 8-byte aligned."""
    encoded = key.encode("utf-8")
    return _INT.pack(len(encoded)) + encoded + b" " * (8 - (len(encoded) + 4) % 8)


class Group:
    """Entries of the live file that come and go together (one Enum series).

    `values` is the truth the file is rebuilt from; `positions` are where the values sit
    in the current file, in doubles from its start (rewritten by a compaction).
    """

    __slots__ = ("heads", "positions", "size", "values")

    def __init__(self, heads: Sequence[bytes], values: list[float]) -> None:
        self.heads = tuple(heads)
        self.values = values
        self.positions = [0] * len(self.heads)
        self.size = sum(len(h) for h in self.heads) + 16 * len(self.heads)


class LiveFile:
    """This process's ``gauge_liveall_<pid>.db``, written by this library alone.

    Entries are appended as prometheus_client appends them, values are written in place,
    and removed entries are zeroed and then dropped by rewriting the file. All methods run
    under `_lock`.
    """

    def __init__(self) -> None:
        self.groups: dict[Group, None] = {}  # live groups, in file order
        self.mm: mmap.mmap | None = None
        # The file as doubles: a value is written by one 8-byte store.
        self.doubles: memoryview[float] = _NO_DOUBLES
        self.fd = -1
        self.pid = 0
        self.used = 8
        self.capacity = 0
        self.live_bytes = 0
        self.dead_bytes = 0
        self.rewrites = 0

    # -- what a series does -------------------------------------------------------------

    def add(self, group: Group) -> None:
        """Append `group`'s entries, with their values."""
        self.groups[group] = None
        self.live_bytes += group.size
        mm = self.mm
        if mm is None or self.used + group.size > self.capacity or self._foreign():
            self.rewrite()
            return
        position = self.used
        chunks = []
        for i, head in enumerate(group.heads):
            chunks.append(head)
            position += len(head)
            group.positions[i] = position >> 3
            chunks.append(_TWO_DOUBLES.pack(group.values[i], 0.0))
            position += 16
        mm[self.used : position] = b"".join(chunks)
        # The count last: a concurrent reader sees the new entries whole, or not at all.
        mm[0:4] = _INT.pack(position)
        self.used = position

    def set(self, group: Group, index: int, value: float) -> None:
        group.values[index] = value
        self.doubles[group.positions[index]] = value

    def remove(self, group: Group) -> None:
        """Forget `group`: it shows nothing at once, and leaves the file soon."""
        if group not in self.groups:
            return
        del self.groups[group]
        self.live_bytes -= group.size
        self.dead_bytes += group.size
        for i, value in enumerate(group.values):
            if value:
                self.set(group, i, 0.0)
        # Dead entries stay listed (at 0) until the file is rewritten, once they make up
        # half of it and at least `_DEAD_SLACK` bytes: a rewrite costs a rename (over a
        # millisecond on ext4, which flushes a file renamed over another), so it must
        # come at a constant amortized share of each removal.
        if self.dead_bytes >= max(self.live_bytes, _DEAD_SLACK):
            self.rewrite()

    # -- the file -----------------------------------------------------------------------

    def _foreign(self) -> bool:
        """Whether something else appended to our file (a prometheus_client ``liveall``
        gauge of this process): then our appends and rewrites would destroy its entries."""
        mm = self.mm
        return mm is not None and _INT.unpack_from(mm, 0)[0] != self.used

    def rewrite(self) -> None:
        """Write every live entry to a fresh file and rename it over the current one."""
        directory = _directory()
        pid = os.getpid()
        path = os.path.join(directory, f"gauge_liveall_{pid}.db")
        if (self.mm is not None and self._foreign()) or (self.mm is None and _open_here(path)):
            _shared_file_warning(path)
        chunks = [b""]
        position = 8
        for group in self.groups:
            positions = group.positions
            for i, head in enumerate(group.heads):
                chunks.append(head)
                position += len(head)
                positions[i] = position >> 3
                chunks.append(_TWO_DOUBLES.pack(group.values[i], 0.0))
                position += 16
        chunks[0] = _INT.pack(position) + b"\0\0\0\0"
        capacity = _MIN_CAPACITY
        while capacity < position * 2:
            capacity *= 2
        # Not ending in ``.db``: the collector's glob never sees the file half-written.
        temporary = f"{path}.new"
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, capacity)
            mm = mmap.mmap(fd, capacity)
            mm[0:position] = b"".join(chunks)
            os.replace(temporary, path)
        except BaseException:
            os.close(fd)
            raise
        self._close()
        self.mm, self.fd, self.pid = mm, fd, pid
        self.doubles = memoryview(mm).cast("d")
        self.used, self.capacity, self.dead_bytes = position, capacity, 0
        self.rewrites += 1

    def _close(self) -> None:
        if self.mm is not None:
            self.doubles.release()  # a stale holder fails instead of writing
            self.doubles = _NO_DOUBLES
            self.mm.close()
            os.close(self.fd)
            self.mm, self.fd = None, -1

    def after_fork(self) -> None:
        """In a forked child: the inherited map is the parent's file; write our own."""
        if self.mm is not None:
            self._close()
            self.rewrite()


def _directory() -> str:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        raise RuntimeError(
            "statemachine_metrics: PROMETHEUS_MULTIPROC_DIR was unset after prometheus_client "
            "chose multiprocess mode; machine states have nowhere to go"
        )
    return directory


def _open_here(path: str) -> bool:
    """Whether this process has `path` open already (Linux; elsewhere, we cannot tell)."""
    if not os.path.exists(path):
        return False
    path = os.path.realpath(path)
    try:
        descriptors = os.listdir("/proc/self/fd")
    except OSError:
        return False
    for fd in descriptors:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == path:
                return True
        except OSError:
            pass
    return False


_warned = False


def _shared_file_warning(path: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.error(
            "%s was also written by a prometheus_client gauge with multiprocess_mode="
            "'liveall' in this process; that file holds machine states. Its entries are lost "
            "from the merged output: give that gauge another mode.",
            path,
        )


# -- the Enum ------------------------------------------------------------------------------


class StateFile:
    """One Enum series in the live file: an entry per state.

    `current` is the state written at 1, or -1 once the series left the file: it is
    written no more, as a compaction may give its places to other entries.
    """

    __slots__ = ("current", "group")

    def __init__(self, group: Group) -> None:
        self.group = group
        self.current = 0

    def show(self, index: int) -> None:
        """Show state `index` (under `_lock`)."""
        current = self.current
        if current != index and current >= 0:
            group = self.group
            values, positions, doubles = group.values, group.positions, _live.doubles
            # The old state goes to 0 first: a concurrent scrape may see no state at 1 for
            # an instant, never two.
            values[current] = 0.0
            doubles[positions[current]] = 0.0
            values[index] = 1.0
            doubles[positions[index]] = 1.0
            self.current = index


class EnumFiles:
    """The series of one `Enum` in the process's live file, one per label set in use."""

    __slots__ = ("__weakref__", "labelnames", "prefix", "series", "states", "suffix")

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], states: Sequence[str]
    ) -> None:
        check_labelnames(f"Enum {name}", labelnames)
        self.labelnames = (*labelnames, name)
        self.states = tuple(states)
        # A key is prometheus_client's: json.dumps([metric, sample, labels, help],
        # sort_keys=True); the labels are the only part that varies.
        self.prefix = json.dumps([name, name])[:-1] + ", "
        self.suffix = ", " + json.dumps(documentation) + "]"
        self.series: dict[Key, StateFile] = {}
        _enum_files.add(self)

    @property
    def lock(self) -> threading.Lock:
        """The lock every multiprocess write takes."""
        return _lock

    def _heads(self, key: Key) -> list[bytes]:
        name = self.labelnames[-1]
        labels = dict(zip(self.labelnames, key))
        heads = []
        for state in self.states:
            labels[name] = state
            heads.append(
                _entry_head(self.prefix + json.dumps(labels, sort_keys=True) + self.suffix)
            )
        return heads

    def file(self, key: Key) -> StateFile:
        """The series for label values `key`, showing the first state."""
        with _lock:
            return self._file(key)

    def _file(self, key: Key) -> StateFile:
        file = self.series.get(key)
        if file is None:
            first = [0.0] * len(self.states)
            first[0] = 1.0
            file = self.series[key] = StateFile(Group(self._heads(key), first))
            _live.add(file.group)
        else:
            file.show(0)
        return file

    def show(self, file: StateFile, index: int) -> None:
        with _lock:
            file.show(index)

    def hide(self, key: Key) -> None:
        """The label set is gone: its series leaves the file."""
        with _lock:
            file = self.series.pop(key, None)
            if file is not None:
                file.current = -1
                _live.remove(file.group)


# -- prometheus_client's value files, written in place --------------------------------------


class ValueFile:
    """Our own map of one of prometheus_client's value files of this process.

    prometheus_client's `MmapedDict` alone appends entries to the file (for our values
    too, when its value class makes them); we only find where an entry's value sits and
    store it there, as one 8-byte write. Entries never move, so a map of the file's start
    stays right as the file grows: a longer map is made only for entries beyond it, and
    the older maps, which families may still hold, stay valid.
    """

    __slots__ = ("doubles", "fd", "maps", "path", "positions", "scanned")

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR)
        self.maps: list[tuple[mmap.mmap, memoryview[float]]] = []
        self.doubles = _NO_DOUBLES
        self.scanned = 8
        # Every key of the file, to the index (in doubles) of its value.
        self.positions: dict[str, int] = {}

    def find(self, key: str) -> int | None:
        """Where `key`'s value is in `doubles`, or None if the file has no such entry."""
        index = self.positions.get(key)
        if index is None:
            self._scan()
            index = self.positions.get(key)
        return index

    def _scan(self) -> None:
        """Read the entries appended since the last scan."""
        used = int(_INT.unpack(os.pread(self.fd, 4, 0))[0])
        if used > self.doubles.nbytes:
            size = os.fstat(self.fd).st_size
            size -= size % 8
            if size < used:
                return  # not the format we know: nothing is found, values take the slow path
            mm = mmap.mmap(self.fd, size)
            self.doubles = memoryview(mm).cast("d")
            self.maps.append((mm, self.doubles))
        data = self.doubles.cast("B")
        position, positions = self.scanned, self.positions
        try:
            while position < used:
                length = _INT.unpack_from(data, position)[0]
                start = position + 4
                position = start + length + 8 - (length + 4) % 8
                if length <= 0 or position + 16 > used:
                    break
                positions[bytes(data[start : start + length]).decode("utf-8")] = position >> 3
                position += 16
                self.scanned = position
        finally:
            data.release()

    def close(self) -> None:
        for mm, doubles in self.maps:
            doubles.release()  # a stale holder fails instead of writing
            mm.close()
        self.maps.clear()
        self.doubles = _NO_DOUBLES
        os.close(self.fd)


class _Values:
    """Values written through prometheus_client's value class, indexed as a file's doubles
    are: where an entry cannot be found in a file we can map (another value class, another
    file format), it is written the slow way, and correctly."""

    __slots__ = ("values",)

    def __init__(self, values: Sequence[_Value]) -> None:
        self.values = list(values)

    def __getitem__(self, index: int) -> float:
        with _lock:
            return self.values[index].get()

    def __setitem__(self, index: int, value: float) -> None:
        # Under `_lock`, which a fork waits for: the child must not inherit
        # prometheus_client's lock held by a thread of ours.
        with _lock:
            self.values[index].set(float(value))


#: A value of ours in one of prometheus_client's files: its value object (which made the
#: entry) and its key there.
_Cell = tuple["_Value", str]


def _value_file(value: _Value) -> ValueFile | None:
    """Our map of the file prometheus_client keeps `value` in, if it says which."""
    path = getattr(getattr(value, "_file", None), "_fname", None)
    if not isinstance(path, str):
        return None
    file = _value_files.get(path)
    if file is None:
        try:
            file = _value_files[path] = ValueFile(path)
        except (OSError, ValueError):
            return None
    return file


def _place(cells: Sequence[_Cell]) -> tuple[_Doubles, list[int]]:
    """Where `cells` (of one file) are written: the file's doubles and their indices
    there, or, if one cannot be found, their value objects."""
    if cells:
        # After a fork, this moves every value of prometheus_client's to files of this
        # process, before we look for them.
        cells[0][0].get()
        file = _value_file(cells[0][0])
        if file is not None:
            indices = []
            for value, key in cells:
                index = file.find(key) if _value_file(value) is file else None
                if index is None:
                    break
                indices.append(index)
            else:
                return file.doubles, indices
    return _Values([value for value, _ in cells]), list(range(len(cells)))


class _Doubles(Protocol):
    """A file's values by index: a `memoryview` of doubles, or `_Values`."""

    def __getitem__(self, index: int, /) -> float: ...

    def __setitem__(self, index: int, value: float, /) -> None: ...


# -- a machine family ----------------------------------------------------------------------


class FamilyFiles:
    """The `FamilyMirror` of a machine family in multiprocess mode.

    Each value has its entry in one of prometheus_client's files, made by its value class
    as a metric's would be; we then write it in place, through `ValueFile` (or through the
    value object, where its place cannot be found). A hook takes `_lock` once for all of
    its writes, and indexes precomputed tables: no key, no dict, no struct per write.
    """

    __slots__ = (
        "__weakref__",
        "backlog",
        "bounds",
        "buckets",
        "buckets_at",
        "counters",
        "enum",
        "errors",
        "errors_help",
        "errors_name",
        "family",
        "histograms",
        "livemin",
        "livesum",
        "machines",
        "machines_at",
        "oldest_at",
        "oldest_values",
        "series",
        "since",
        "since_stale",
        "single",
        "sums",
        "sums_at",
        "transitions",
        "transitions_at",
        "trigger_bounds",
        "trigger_buckets",
        "trigger_buckets_at",
        "trigger_sums",
        "trigger_sums_at",
    )

    def __init__(self, family: Family, enum: EnumFiles) -> None:
        name = family.name
        self.family = family
        self.enum = enum
        self.series = enum.series
        self.single = None if family.labelled else enum.file(())
        state_label = (name,)
        # Help texts are those `Family.collect` gives, so that HELP lines match.
        machines = family.machines_name
        self.machines = tuple(
            _cell("gauge", machines, machines, state_label, (s,), family.machines_help, "livesum")
            for s in family.states
        )
        self.transitions: list[_Cell] = []
        self.bounds = family.bounds
        self.buckets, self.sums = _histogram(
            family.duration_name,
            family.duration_help,
            name,
            family.states,
            family.bucket_names,
        )
        self.trigger_bounds = family.trigger_bounds
        self.trigger_buckets, self.trigger_sums = _histogram(
            family.trigger_duration_name,
            family.trigger_duration_help,
            "trigger",
            family.trigger_names,
            family.trigger_bucket_names,
        )
        oldest = f"{name}_oldest_timestamp_seconds"
        oldest_help = (
            f"When the longest-staying live {family.owner} machine entered each state "
            "(Unix time; +Inf for none)"
        )
        self.since = [math.inf] * len(family.states)
        self.since_stale = False
        self.oldest_values = tuple(
            _cell("gauge", oldest, oldest, state_label, (s,), oldest_help, "livemin")
            for s in family.states
        )
        self.errors_name = family.errors_name[: -len("_total")]
        self.errors_help = family.errors_help
        self.errors: dict[tuple[str, str], _Value] = {}
        # Detaches that came during a garbage collection: the collection may have started
        # inside a value write of this thread, holding `_lock` or prometheus_client's own
        # lock, so writing then could deadlock. The next hook writes them.
        self.backlog: list[tuple[Key | None, int, bool] | None] = []
        with _lock:
            self._add_transitions(len(family.transition_labels) - 1)
            self._locate()
        self.rewrite()
        _family_files.add(self)

    def _add_transitions(self, slot: int) -> None:
        """Make the transition counters up to `slot` (the family adds slots as it meets
        transitions it had not compiled)."""
        # A counter is stored as prometheus_client's Counter stores it: the metric without
        # `_total`, the sample with it.
        family = self.family
        ran = family.transitions_name[: -len("_total")]
        for labels in family.transition_labels[len(self.transitions) : slot + 1]:
            self.transitions.append(
                _cell(
                    "counter",
                    ran,
                    family.transitions_name,
                    ("from", "to", "trigger"),
                    labels,
                    family.transitions_help,
                )
            )

    def _locate(self) -> None:
        """Find every value's place (again, after a fork: the files are new)."""
        self.livesum, self.machines_at = _place(self.machines)
        self.livemin, self.oldest_at = _place(self.oldest_values)
        self.counters, self.transitions_at = _place(self.transitions)
        rows = (*self.buckets, self.sums, *self.trigger_buckets, self.trigger_sums)
        self.histograms, at = _place([cell for row in rows for cell in row])
        tables = []
        for row in rows:
            tables.append(tuple(at[: len(row)]))
            del at[: len(row)]
        states = len(self.buckets)
        self.buckets_at = tuple(tables[:states])
        self.sums_at = tables[states]
        self.trigger_buckets_at = tuple(tables[states + 1 : -1])
        self.trigger_sums_at = tables[-1]

    @property
    def direct(self) -> bool:
        """Whether every value is written in place (else some go through their objects)."""
        views = (self.livesum, self.livemin, self.counters, self.histograms)
        return all(isinstance(view, memoryview) for view in views)

    def rewrite(self) -> None:
        """Write the live counts and the oldest entry times from memory."""
        livesum, livemin = self.livesum, self.livemin
        for at, count in zip(self.machines_at, self.family.counts):
            livesum[at] = count
        for at, since in zip(self.oldest_at, self.since):
            livemin[at] = since

    def _file(self, key: Key | None) -> StateFile | None:
        """The series of `key`; None after `Enum.remove()` or `clear()` took it away (the
        Enum brings it back through `EnumFiles.file`, as it makes a new child)."""
        return self.single if key is None else self.series.get(key)

    def attach(self, key: Key | None, state: int) -> None:
        if self.backlog:
            self._replay()
        with _lock:
            file = self._file(key)
            if file is not None:
                file.show(state)
        self.livesum[self.machines_at[state]] = self.family.counts[state]

    def detach(self, key: Key | None, state: int, removed: bool) -> None:
        if _collecting:
            self.backlog.append((key, state, removed))
            return
        if self.backlog:
            self._replay()
        self._detach(key, state, removed)

    def _detach(self, key: Key | None, state: int, removed: bool) -> None:
        self.livesum[self.machines_at[state]] = self.family.counts[state]
        # Replayed late, the label set may have come back in the meantime.
        if removed and key is not None and key not in self.family.series:
            with _lock:
                file = self.series.pop(key, None)
                if file is not None:
                    file.current = -1
                    _live.remove(file.group)

    def _replay(self) -> None:
        backlog = self.backlog
        while backlog:
            entry = backlog.pop(0)
            if entry is not None:
                self._detach(*entry)
        if self.since_stale:
            self.since_stale = False
            for at, since in zip(self.oldest_at, self.since):
                self.livemin[at] = since

    def transition(
        self,
        key: Key | None,
        src: int,
        dst: int,
        slot: int,
        elapsed: float,
        now: float,
        first: bool,
        empty: bool,
        tindex: int,
        latency: float | None,
    ) -> None:
        # `moved`, `oldest` and `triggered` in one body: a call less for each.
        if self.backlog:
            self._replay()
        _lock.acquire()
        try:
            file = self.single if key is None else self.series.get(key)
            if file is not None:
                current = file.current
                if current != dst and current >= 0:
                    group = file.group
                    values, positions, doubles = group.values, group.positions, _live.doubles
                    values[current] = 0.0
                    doubles[positions[current]] = 0.0
                    values[dst] = 1.0
                    doubles[positions[dst]] = 1.0
                    file.current = dst
        finally:
            _lock.release()
        if src != dst:
            livesum, at, counts = self.livesum, self.machines_at, self.family.counts
            livesum[at[src]] = counts[src]
            livesum[at[dst]] = counts[dst]
        try:
            self.counters[self.transitions_at[slot]] += 1.0
        except IndexError:
            self._count_new(slot)
        histograms = self.histograms
        histograms[self.buckets_at[src][bisect_left(self.bounds, elapsed)]] += 1.0
        histograms[self.sums_at[src]] += elapsed
        if first or empty:
            # One clock read: wall time is `perf_counter()` time plus this offset.
            offset = _wall_clock() - now
            livemin, at, since = self.livemin, self.oldest_at, self.since
            if first:
                value = math.inf
                leaving = self.family.stays[src]
                for token in leaving:
                    value = leaving[token] + offset
                    break
                livemin[at[src]] = since[src] = value
            if empty:
                livemin[at[dst]] = since[dst] = now + offset
        if latency is not None:
            row = self.trigger_buckets_at[tindex]
            histograms[row[bisect_left(self.trigger_bounds, latency)]] += 1.0
            histograms[self.trigger_sums_at[tindex]] += latency

    def _count_new(self, slot: int) -> None:
        """Count a transition the family added after this mirror was made."""
        with _lock:
            self._add_transitions(slot)
            self.counters, self.transitions_at = _place(self.transitions)
        self.counters[self.transitions_at[slot]] += 1.0

    def counted(self, slot: int) -> None:
        if self.backlog:
            self._replay()
        try:
            self.counters[self.transitions_at[slot]] += 1.0
        except IndexError:
            self._count_new(slot)

    def observed(self, state: int, elapsed: float) -> None:
        if self.backlog:
            self._replay()
        histograms = self.histograms
        histograms[self.buckets_at[state][bisect_left(self.bounds, elapsed)]] += 1.0
        histograms[self.sums_at[state]] += elapsed

    def triggered(self, index: int, elapsed: float) -> None:
        if self.backlog:
            self._replay()
        histograms = self.histograms
        histograms[self.trigger_buckets_at[index][bisect_left(self.trigger_bounds, elapsed)]] += 1.0
        histograms[self.trigger_sums_at[index]] += elapsed

    def oldest(self, state: int, since: float | None) -> None:
        value = self.since[state] = math.inf if since is None else since
        if _collecting:  # as for `detach`
            self.since_stale = True
            self.backlog.append(None)
            return
        if self.backlog:
            self._replay()
        self.livemin[self.oldest_at[state]] = value

    def error(self, trigger: str, error: str) -> None:
        if self.backlog:
            self._replay()
        # Rare: written through prometheus_client's value class, which makes the entry.
        with _lock:
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
        counters, histograms = self.counters, self.histograms
        for at in self.transitions_at:
            counters[at] = 0.0
        for rows in (self.buckets_at, (self.sums_at,), self.trigger_buckets_at):
            for row in rows:
                for at in row:
                    histograms[at] = 0.0
        for at in self.trigger_sums_at:
            histograms[at] = 0.0
        with _lock:
            for value in self.errors.values():
                value.set(0.0)


def _cell(
    typ: str,
    metric: str,
    sample: str,
    labelnames: Sequence[str],
    labelvalues: Sequence[str],
    documentation: str,
    mode: str = "",
) -> _Cell:
    """A value of ours, its entry made by prometheus_client's value class, and its key."""
    value = _value(typ, metric, sample, labelnames, labelvalues, documentation, mode)
    labels = dict(zip(labelnames, labelvalues))
    return value, json.dumps([metric, sample, labels, documentation], sort_keys=True)


def _histogram(
    metric: str,
    documentation: str,
    label: str,
    labelvalues: Sequence[str],
    bucket_names: Sequence[str],
) -> tuple[tuple[tuple[_Cell, ...], ...], tuple[_Cell, ...]]:
    """A histogram's values as prometheus_client's Histogram stores them: one
    non-cumulative count per bucket (with `le`), and the sum; the collector adds up
    ``_bucket`` and ``_count``."""
    buckets = tuple(
        tuple(
            _cell("histogram", metric, f"{metric}_bucket", (label, "le"), (v, le), documentation)
            for le in bucket_names
        )
        for v in labelvalues
    )
    sums = tuple(
        _cell("histogram", metric, f"{metric}_sum", (label,), (v,), documentation)
        for v in labelvalues
    )
    return buckets, sums


def family_mirror(family: Family) -> FamilyMirror | None:
    """The mirror for `family` when multiprocess mode is on, else None."""
    enum = family.metric._files
    if enum is None:
        return None
    _watch_collections()
    return FamilyFiles(family, enum)


# -- process-wide bookkeeping --------------------------------------------------------------

_lock = threading.Lock()
_wall_clock = time.time
_live = LiveFile()
_enum_files: weakref.WeakSet[EnumFiles] = weakref.WeakSet()
_value_files: dict[str, ValueFile] = {}
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


def _before_fork() -> None:
    # Wait for any write in progress: the child must not inherit `_lock` (or
    # prometheus_client's value lock, taken only under it) held by a thread it lacks.
    _lock.acquire()


def _after_fork_in_parent() -> None:
    _lock.release()


def _after_fork_in_child() -> None:
    # The child writes to files of its own pid, fresh (or left by a dead process that had
    # the same pid): write what this process's memory says. No family lock is taken: only
    # the forking thread runs here.
    families: list[FamilyFiles] = []
    try:
        if enabled():
            _live.after_fork()
            # Our maps are of the parent's files: its counts, not to be touched.
            for file in _value_files.values():
                file.close()
            _value_files.clear()
            families = list(_family_files)
            for family in families:
                family._locate()
    finally:
        _lock.release()
    for family in families:
        family.rewrite()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
