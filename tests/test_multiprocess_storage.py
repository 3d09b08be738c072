"""Multiprocess mode under churn: label sets that go leave the files, forks, reserved labels.

As in tests/test_multiprocess.py, the writers are spawned children that inherit
``PROMETHEUS_MULTIPROC_DIR``; they read the merged output themselves through
`MultiProcessCollector`, as a process answering scrapes would.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from statemachine_metrics import MeteredMachine

from .test_multiprocess import SPAWN, TIMEOUT, VARIABLE, finish, receive, start

STATES = ("idle", "running", "error")


class Conn(MeteredMachine, namespace="mps", labelnames=("conn",), registry=None):
    """State of a connection"""

    states = list(STATES)
    transitions = [
        ["start", "idle", "running"],
        ["finish", "running", "idle"],
        ["fail", ["idle", "running"], "error"],
        ["reset", "error", "idle"],
    ]


Series = dict[tuple[str, str], float]  # (conn, state) -> value, for one pid


def merged(path: str, pid: int | None = None) -> Series:
    """The Enum series of the merged output (of one pid, or of any)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    found: Series = {}
    for metric in registry.collect():
        if metric.name != "mps_conn_state":
            continue
        for s in metric.samples:
            if pid is None or s.labels["pid"] == str(pid):
                found[(s.labels["conn"], s.labels["mps_conn_state"])] = s.value
    return found


def showing(series: Series) -> Series:
    """The series of label sets that show a state: a closed one shows none until its
    entries leave the file."""
    shown = {conn for (conn, _), value in series.items() if value}
    return {key: value for key, value in series.items() if key[0] in shown}


def in_memory() -> Series:
    """What this process's own exposition of the class says."""
    (metric,) = Conn.metric.collect()
    return {(s.labels["conn"], s.labels["mps_conn_state"]): s.value for s in metric.samples}


def liveall_size(path: str) -> int:
    return os.path.getsize(os.path.join(path, f"gauge_liveall_{os.getpid()}.db"))


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


# -- what the children run -------------------------------------------------------------------


def run_churn(report: Any, count: int, live: int) -> None:
    """`count` machines with unique labels, at most `live` at a time, each started."""
    path = os.environ[VARIABLE]

    async def churn() -> list[Conn]:
        alive: list[Conn] = []
        for i in range(count):
            machine = Conn(labels={"conn": f"c{i}"})
            await machine.start()
            alive.append(machine)
            if len(alive) > live:
                await alive.pop(0).aclose()
        return alive

    try:
        alive = anyio.run(churn)
        listed = merged(path, os.getpid())
        shown = showing(listed)
        expected = {
            (f"c{i}", s): float(s == "running") for i in range(count - live, count) for s in STATES
        }
        label_sets = len({conn for conn, _ in listed})
        report.put(("ok", shown == expected, label_sets, liveall_size(path)))
        del alive
    except BaseException:
        report.put(("error", traceback.format_exc()))


def run_many_live(report: Any, count: int) -> None:
    """Many live label sets, most of them then closed: dead ones go in bulk, never pile up."""
    path = os.environ[VARIABLE]
    try:
        machines = [Conn(labels={"conn": f"c{i}"}) for i in range(count)]
        big = liveall_size(path)
        steps = []
        while len(machines) > 10:
            del machines[-(count // 10) :]
            shown = merged(path, os.getpid())
            live = {f"c{i}" for i in range(len(machines))}
            stale = {conn for conn, _ in shown} - live
            # Every live series is right; a dead one shows no state, and they are fewer
            # than the live ones (or than a few dozen).
            ok = all(shown.get((c, s)) == float(s == "idle") for c in live for s in STATES)
            ok = ok and all(shown[(c, s)] == 0.0 for c in stale for s in STATES)
            steps.append((ok, len(stale) <= max(len(live), 50)))
        del machines[:]
        left = showing(merged(path, os.getpid()))
        report.put(("ok", steps, left, big, liveall_size(path)))
    except BaseException:
        report.put(("error", traceback.format_exc()))


def run_operations(report: Any) -> None:
    """Random machine lifecycles: after every step, the files say what memory says."""
    path = os.environ[VARIABLE]
    pid = os.getpid()
    operation = st.one_of(
        st.tuples(st.just("new"), st.integers(0, 4)),
        st.tuples(st.just("drop"), st.integers(0, 9)),
        st.tuples(st.sampled_from(["start", "finish", "fail", "reset"]), st.integers(0, 9)),
        st.tuples(st.just("remove"), st.integers(0, 4)),
        st.tuples(st.just("clear"), st.just(0)),
    )

    async def fire(machine: Conn, trigger: str) -> None:
        if await getattr(machine, f"may_{trigger}")():
            await machine.trigger(trigger)

    @settings(max_examples=40, deadline=None, database=None)
    @given(st.lists(operation, max_size=25))
    def check(operations: list[tuple[str, int]]) -> None:
        async def body() -> None:
            machines: list[Conn] = []
            for name, arg in operations:
                if name == "new":
                    machines.append(Conn(labels={"conn": f"c{arg}"}))
                elif name == "drop" and machines:
                    del machines[arg % len(machines)]
                elif name == "remove":
                    Conn.metric.remove(f"c{arg}")
                elif name == "clear":
                    Conn.metric.clear()
                elif name not in ("new", "drop") and machines:
                    await fire(machines[arg % len(machines)], name)
                shown, memory = showing(merged(path, pid)), in_memory()
                assert shown == memory, (name, arg, shown, memory)
            machines.clear()
            assert showing(merged(path, pid)) == in_memory() == {}

        anyio.run(body)

    try:
        check()
        report.put(("ok",))
    except BaseException:
        report.put(("error", traceback.format_exc()))


def run_fork_under_load(report: Any, forks: int) -> None:
    """A thread creates machines without pause while the main thread forks; each child
    creates a machine and must exit at once."""
    stop = threading.Event()

    def hammer() -> None:
        n = 0
        while not stop.is_set():
            Conn(labels={"conn": f"h{n % 50}"})
            n += 1

    thread = threading.Thread(target=hammer)
    thread.start()
    outcomes = []
    try:
        for _ in range(forks):
            time.sleep(0.002)
            pid = os.fork()
            if pid == 0:
                Conn(labels={"conn": "child"})
                os._exit(0)
            deadline = time.monotonic() + 10
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    outcomes.append(os.waitstatus_to_exitcode(status))
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    outcomes.append("hung")
                    break
                time.sleep(0.005)
    finally:
        stop.set()
        thread.join()
    report.put(outcomes)


# -- values written in place -----------------------------------------------------------------


def diff_class(namespace: str = "mpd") -> type[MeteredMachine]:
    """A class made in the child, after its value class was chosen. `go` moves the machine
    first through a nested trigger, so that it counts a transition the class never
    declared (from running), which the files meet only then."""

    class Diff(MeteredMachine, namespace=namespace, labelnames=("conn",), registry=None):
        """State of a compared connection"""

        states = list(STATES)
        transitions = [
            ["start", "idle", "running"],
            ["finish", "running", "idle"],
            ["fail", ["idle", "running"], "error"],
            ["reset", "error", "idle"],
            ["ping", "running", None],
            {"trigger": "go", "source": "idle", "dest": "error", "before": "hop"},
            ["hop_t", "idle", "running"],
        ]

        async def hop(self) -> None:
            await self.trigger("hop_t")

    return Diff


class OpaqueValue:
    """prometheus_client's value class behind a wrapper that does not say where its file
    is, as another value class would not: values are written through it."""

    _multiprocess = True
    inner: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.value = self.inner(*args, **kwargs)

    def inc(self, amount: float) -> None:
        self.value.inc(amount)

    def set(self, value: float, timestamp: float | None = None) -> None:
        self.value.set(value, timestamp)

    def get(self) -> float:
        return float(self.value.get())

    def set_exemplar(self, exemplar: Any) -> None:
        pass

    def get_exemplar(self) -> None:
        return None


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def family_samples(metrics: Any, prefix: str) -> Samples:
    """Samples of the metrics named `prefix`..., by name and labels, without `pid` and
    what only one side has: `_created`, the oldest machine, a label set showing no state
    (still listed in the file until it is compacted) and error counters at 0 (after a
    reset the files keep the entry, memory forgets it)."""
    samples: Samples = {}
    for metric in metrics:
        if not metric.name.startswith(prefix) or "oldest" in metric.name:
            continue
        for s in metric.samples:
            if s.name.endswith("_created"):
                continue
            if s.name.endswith("_errors_total") and s.value == 0:
                continue
            labels = frozenset((k, v) for k, v in s.labels.items() if k != "pid")
            samples[(s.name, labels)] = s.value
    enum = f"{prefix}_state"

    def series(labels: frozenset[tuple[str, str]]) -> frozenset[tuple[str, str]]:
        return frozenset(label for label in labels if label[0] != enum)

    shown = {series(labels) for (name, labels), value in samples.items() if name == enum and value}
    return {
        (name, labels): value
        for (name, labels), value in samples.items()
        if name != enum or series(labels) in shown
    }


def run_differential(report: Any, opaque: bool) -> None:
    """Random machine lifecycles: after every step, the merged files say exactly what
    memory says, sums and bucket counts included (they add the same floats in the same
    order), and the oldest entry times agree with memory's ages."""
    from prometheus_client import values

    from statemachine_metrics import MachineCollector, MachineError
    from statemachine_metrics.testing import reset_metrics

    path = os.environ[VARIABLE]
    if opaque:
        OpaqueValue.inner = values.ValueClass
        values.ValueClass = OpaqueValue
    Diff = diff_class()
    family: Any = Diff._family
    mirror = family.mirror
    registry = CollectorRegistry()
    registry.register(MachineCollector(Diff))
    triggers = ["start", "finish", "fail", "reset", "ping", "go"]
    operation = st.one_of(
        st.tuples(st.just("new"), st.integers(0, 3)),
        st.tuples(st.just("drop"), st.integers(0, 9)),
        st.tuples(st.just("close"), st.integers(0, 9)),
        st.tuples(st.sampled_from(triggers), st.integers(0, 9)),
        st.tuples(st.just("reset_metrics"), st.just(0)),
    )

    def check() -> None:
        memory = list(registry.collect())
        merged_registry = CollectorRegistry()
        MultiProcessCollector(merged_registry, path=path)
        merged = list(merged_registry.collect())
        expected, found = family_samples(memory, "mpd_diff"), family_samples(merged, "mpd_diff")
        assert found == expected, sorted(set(found.items()) ^ set(expected.items()))
        now = time.time()
        ages = {
            s.labels["mpd_diff_state"]: s.value
            for m in memory
            if m.name == "mpd_diff_state_oldest_seconds"
            for s in m.samples
        }
        counts = {
            s.labels["mpd_diff_state"]: s.value
            for m in memory
            if m.name == "mpd_diff_state_machines"
            for s in m.samples
        }
        for m in merged:
            if m.name == "mpd_diff_state_oldest_timestamp_seconds":
                for s in m.samples:
                    state = s.labels["mpd_diff_state"]
                    if counts[state]:
                        assert abs(now - s.value - ages[state]) < 5, (state, s.value)
                    else:
                        assert s.value == float("inf"), (state, s.value)

    @settings(max_examples=30, deadline=None, database=None)
    @given(st.lists(operation, max_size=20))
    def steps(operations: list[tuple[str, int]]) -> None:
        async def body() -> None:
            machines: list[MeteredMachine] = []
            for name, arg in operations:
                if name == "new":
                    machines.append(Diff(labels={"conn": f"c{arg}"}))
                elif name == "reset_metrics":
                    reset_metrics(Diff)
                elif not machines:
                    continue
                elif name == "drop":
                    del machines[arg % len(machines)]
                elif name == "close":
                    await machines.pop(arg % len(machines)).aclose()
                else:
                    # A trigger that cannot run is counted as an error, in both.
                    with contextlib.suppress(MachineError):
                        await machines[arg % len(machines)].trigger(name)
                check()
            machines.clear()
            check()

        anyio.run(body)

    try:
        steps()
        report.put(("ok", mirror.direct))
    except BaseException:
        report.put(("error", traceback.format_exc()))


def run_beside_prometheus_metrics(report: Any) -> None:
    """prometheus_client's own metrics append to the same files before, between and after
    the machines' entries, and past their first 64 KiB: each side's values stay whole."""
    from prometheus_client import Counter, Gauge, Histogram

    try:
        counter = Counter("own_total", "d", ["n"], registry=None)
        live = Gauge("own_live", "d", ["n"], multiprocess_mode="livesum", registry=None)
        counter.labels("before").inc(2)
        Early = diff_class()
        # Many entries: the files grow past the map made for the first class.
        long = "x" * 200
        for i in range(400):
            counter.labels(f"{long}{i}").inc(i)
            live.labels(f"{long}{i}").set(i)
        Late = diff_class("mpl")
        histogram = Histogram("own_seconds", "d", registry=None)
        low = Gauge("own_low", "d", multiprocess_mode="livemin", registry=None)

        async def run() -> list[MeteredMachine]:
            machines = []
            for cls in (Early, Late):
                for i in range(3):
                    machine = cls(labels={"conn": f"c{i}"})
                    await machine.trigger("start")
                    await machine.trigger("ping")
                    machines.append(machine)
                await machine.trigger("finish")
                await machine.trigger("go")  # leaves from running: a transition met late
            return machines

        machines = anyio.run(run)
        histogram.observe(0.2)
        low.set(7)
        counter.labels("after").inc(3)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=os.environ[VARIABLE])
        got = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for m in registry.collect()
            for s in m.samples
        }

        def value(name: str, **labels: str) -> float | None:
            return got.get((name, tuple(sorted(labels.items()))))

        own = [
            value("own_total", n="before"),
            value("own_total", n="after"),
            sum(value("own_total", n=f"{long}{i}") or 0 for i in range(400)),
            sum(value("own_live", n=f"{long}{i}") or 0 for i in range(400)),
            value("own_seconds_count"),
            value("own_low"),
        ]
        ran = []
        for prefix in ("mpd_diff", "mpl_diff"):
            state = f"{prefix}_state"
            ran.append(
                [
                    value(
                        f"{state}_transitions_total",
                        **{"from": "idle", "to": "running", "trigger": "start"},
                    ),
                    value(
                        f"{state}_transitions_total",
                        **{"from": "running", "to": "running", "trigger": "ping"},
                    ),
                    value(
                        f"{state}_transitions_total",
                        **{"from": "running", "to": "error", "trigger": "go"},
                    ),
                    value(f"{state}_machines", **{state: "running"}),
                    value(f"{state}_machines", **{state: "error"}),
                    value(f"{state}_duration_seconds_count", **{state: "idle"}),
                ]
            )
        families: list[Any] = [Early._family, Late._family]
        mirrors = [family.mirror.direct for family in families]
        report.put(("ok", own, ran, mirrors))
        del machines
    except BaseException:
        report.put(("error", traceback.format_exc()))


def run_fork_apart(report: Any) -> None:
    """After a fork, parent and child each count in their own files."""
    from statemachine_metrics import MachineError

    try:
        Diff = diff_class()

        async def cycles(machine: MeteredMachine, count: int) -> None:
            for _ in range(count):
                await machine.trigger("start")
                await machine.trigger("finish")
            with pytest.raises(MachineError):
                await machine.trigger("finish")

        machine = Diff(labels={"conn": "c"})
        anyio.run(cycles, machine, 2)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            code = 0
            try:
                anyio.run(cycles, machine, 5)
                os.write(write, b"ok")
            except BaseException:
                os.write(write, traceback.format_exc().encode()[:4000])
                code = 1
            os._exit(code)
        os.close(write)
        said = os.read(read, 4096).decode()
        os.waitpid(pid, 0)
        anyio.run(cycles, machine, 1)
        report.put(("ok", said, os.getpid(), pid))
        del machine
    except BaseException:
        report.put(("error", traceback.format_exc()))


def own_counts(path: Path, pid: int) -> dict[str, float]:
    """What one process's counter and histogram files say about the `Diff` class."""
    files = [str(path / f"{kind}_{pid}.db") for kind in ("counter", "histogram")]
    counts: dict[str, float] = {}
    for metric in MultiProcessCollector.merge(files):
        for s in metric.samples:
            if s.name == "mpd_diff_state_transitions_total" and s.labels["trigger"] == "start":
                counts["start"] = s.value
            elif s.name == "mpd_diff_state_errors_total":
                counts["errors"] = s.value
            elif s.name == "mpd_diff_state_trigger_duration_seconds_count" and (
                s.labels["trigger"] == "finish"
            ):
                counts["finish_latencies"] = s.value
    return counts


def child_result(path: Path | None, target: Any, *args: Any) -> Any:
    report: Any = SPAWN.Queue()
    process = start(path, target, report, *args)
    (result,) = receive(report, [process], 1)
    finish(process)
    assert result[0] != "error", result[1]
    return result


def test_closed_label_sets_leave_the_files(tmp_path: Path) -> None:
    _, exact, label_sets, size = child_result(tmp_path, run_churn, 2000, 20)
    # The 20 live machines show their state; of the 1980 closed ones, a few dozen at most
    # are still listed (showing no state), and the file stays at its initial size instead
    # of growing with every label set ever used.
    assert exact
    assert 20 <= label_sets <= 20 + 50
    assert size == 1 << 16


def test_dead_series_never_outnumber_live_ones(tmp_path: Path) -> None:
    _, steps, left, big, small = child_result(tmp_path, run_many_live, 2000)
    assert steps
    assert all(ok for ok, _ in steps), steps
    assert all(bounded for _, bounded in steps), steps
    assert left == {}
    assert big > 1 << 16 >= small


def test_files_follow_memory_through_random_lifecycles(tmp_path: Path) -> None:
    child_result(tmp_path, run_operations)


@pytest.mark.parametrize("multiprocess", [True, False], ids=["multiprocess", "single"])
def test_fork_while_another_thread_creates_machines(tmp_path: Path, multiprocess: bool) -> None:
    report: Any = SPAWN.Queue()
    process = start(tmp_path if multiprocess else None, run_fork_under_load, report, 30)
    (outcomes,) = receive(report, [process], 1)
    finish(process)
    assert outcomes == [0] * 30


def test_dead_process_leaves_no_series(tmp_path: Path) -> None:
    code = """
import os
from tests.test_multiprocess_storage import Conn
machines = [Conn(labels={"conn": f"c{i}"}) for i in range(5)]
print(os.getpid(), flush=True)
os.kill(os.getpid(), 9)
"""
    env = {**os.environ, VARIABLE: str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=Path(__file__).resolve().parent.parent,
    )
    pid = int(done.stdout.split()[0])
    assert len(merged(str(tmp_path), pid)) == 5 * len(STATES)
    mark_process_dead(pid, str(tmp_path))
    assert merged(str(tmp_path)) == {}


PID_LABEL_CODE = """
from statemachine_metrics import Enum, MeteredMachine
for make in (
    lambda: type("Proc", (MeteredMachine,), {"states": ["a"]}, labelnames=("pid",), registry=None),
    lambda: Enum("proc_state", "d", ["pid"], states=["a"], registry=None),
):
    try:
        make()
        print("accepted")
    except ValueError as exc:
        print("ValueError", exc)
"""


@pytest.mark.parametrize("multiprocess", [True, False], ids=["multiprocess", "single"])
def test_pid_label(tmp_path: Path, multiprocess: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    if multiprocess:
        env[VARIABLE] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", PID_LABEL_CODE],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    if not multiprocess:
        assert lines == ["accepted", "accepted"]
        return
    machine, enum = lines
    assert machine.startswith("ValueError Proc: label name 'pid' is taken")
    assert enum.startswith("ValueError Enum proc_state: label name 'pid' is taken")
    assert "rename the label" in machine


@pytest.mark.parametrize("opaque", [False, True], ids=["in-place", "value-class"])
def test_files_equal_memory_through_random_transitions(tmp_path: Path, opaque: bool) -> None:
    # In place where prometheus_client's value class says which file holds a value; through
    # the value class itself where it does not (another value class): both exact.
    _, direct = child_result(tmp_path, run_differential, opaque)
    assert direct is not opaque


def test_values_beside_prometheus_client_metrics(tmp_path: Path) -> None:
    _, own, ran, mirrors = child_result(tmp_path, run_beside_prometheus_metrics)
    assert mirrors == [True, True]
    assert own == [2.0, 3.0, float(sum(range(400))), float(sum(range(400))), 1.0, 7.0]
    # Per class: 3 starts, 3 pings and one late `go`; 2 running, 1 in error; idle left 4
    # times (3 starts, and the hop before `go`).
    assert ran == [[3.0, 3.0, 1.0, 2.0, 1.0, 4.0]] * 2


def test_forked_parent_and_child_count_apart(tmp_path: Path) -> None:
    _, said, parent, child = child_result(tmp_path, run_fork_apart)
    assert said == "ok"
    # The child's counts start at 0 in its own files; the parent's never see them. (Each
    # `cycles` ends with a `finish` that raises: an error, and a latency too.)
    assert own_counts(tmp_path, parent) == {"start": 3.0, "errors": 2.0, "finish_latencies": 5.0}
    assert own_counts(tmp_path, child) == {"start": 5.0, "errors": 1.0, "finish_latencies": 6.0}
