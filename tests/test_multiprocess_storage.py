"""Multiprocess mode under churn: label sets that go leave the files, forks, reserved labels.

As in tests/test_multiprocess.py, the writers are spawned children that inherit
``PROMETHEUS_MULTIPROC_DIR``; they read the merged output themselves through
`MultiProcessCollector`, as a process answering scrapes would.
"""

from __future__ import annotations

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


# -- tests -----------------------------------------------------------------------------------


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
