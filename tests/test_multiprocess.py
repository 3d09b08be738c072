"""Machine metrics under prometheus_client's multiprocess mode, with real processes.

prometheus_client picks its value class when it is imported, from ``PROMETHEUS_MULTIPROC_DIR``,
so this test process never switches modes: the writers are spawned children that get the
variable through their environment, and the parent only reads their files with
`MultiProcessCollector(registry, path=...)`, as the process answering scrapes does in a
gunicorn-style deployment.
"""

from __future__ import annotations

import gc
import os
import queue
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import get_context
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from statemachine_metrics import Enum, MachineCollector, MachineError, MeteredMachine

VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
ROOT = Path(__file__).resolve().parent.parent
SPAWN = get_context("spawn")
TIMEOUT = 30.0


class Worker(MeteredMachine, namespace="mp", labelnames=("worker",), registry=None):
    """Current state of a worker"""

    states = ["idle", "running", "error"]
    transitions = [
        ["start", "idle", "running"],
        ["finish", "running", "idle"],
        ["fail", ["idle", "running"], "error"],
        ["ping", "running", None],
    ]


class Job(MeteredMachine, namespace="mp", registry=None):
    states = ["pending", "done"]
    transitions = [["finish", "pending", "done"]]


# -- what the children run -------------------------------------------------------------------


async def scenario(number: int) -> list[MeteredMachine]:
    """Worker `number`'s machines; the ones returned stay alive.

    Per process: `w<number>` ends running after number + 2 starts and number + 1 finishes
    (and a ping); `shared` stays idle and raises one MachineError; `gone<number>` starts and
    is closed, so its series goes; a `Job` ends done.
    """
    mine = Worker(labels={"worker": f"w{number}"})
    for _ in range(number + 1):
        await mine.start()
        await mine.finish()
    await mine.start()
    await mine.ping()
    shared = Worker(labels={"worker": "shared"})
    with pytest.raises(MachineError):
        await shared.finish()
    gone = Worker(labels={"worker": f"gone{number}"})
    await gone.start()
    await gone.aclose()
    job = Job()
    await job.finish()
    return [mine, shared, job]


def run_worker(number: int, report: Queue[Any], release: Connection) -> None:
    """A writer process: runs the scenario, reports, and keeps its machines until released.

    Released by a pipe, not a shared Event: killing a process blocked on an Event would
    break the Event for the others.
    """
    machines = anyio.run(scenario, number)
    # Whether every value of both classes is written in place in prometheus_client's files.
    direct = all(cls._family.mirror.direct for cls in (Worker, Job))  # type: ignore[union-attr]
    report.put((number, os.getpid(), values.ValueClass._multiprocess and direct))
    release.poll(TIMEOUT)
    del machines


def run_single(report: Queue[Any]) -> None:
    """The scenario without multiprocess mode: the exposition of one process's registry."""
    machines = anyio.run(scenario, 0)
    registry = CollectorRegistry()
    registry.register(MachineCollector(Worker, Job))
    mirrors = [Worker._family.mirror, Job._family.mirror]  # type: ignore[union-attr]
    report.put((generate_latest(registry).decode(), values.ValueClass._multiprocess, mirrors))
    del machines


def run_forking(report: Queue[Any]) -> None:
    """Forks with a live machine: the child's own files must show what its memory holds."""
    machines = anyio.run(scenario, 0)
    pid = os.fork()
    if pid == 0:
        os._exit(0)  # the at-fork hook has written the child's files by now
    os.waitpid(pid, 0)
    report.put(pid)
    del machines


def run_collected_in_value_lock(report: Queue[Any]) -> None:
    """A machine in a reference cycle, finalized by a collection inside a value write."""
    from prometheus_client import Counter, mmap_dict

    cycle: list[Any] = [Worker(labels={"worker": "cyclic"})]
    cycle.append(cycle)
    del cycle
    original = mmap_dict.MmapedDict.write_value

    def write_value(self: Any, *args: Any) -> Any:
        mmap_dict.MmapedDict.write_value = original  # type: ignore[method-assign]
        gc.collect()  # as an automatic collection may, while the value lock is held
        return original(self, *args)

    mmap_dict.MmapedDict.write_value = write_value  # type: ignore[method-assign]
    Counter("unrelated", "d").inc()  # would deadlock if the mirror wrote from the finalizer
    mirror: Any = Worker._family.mirror  # type: ignore[union-attr]
    deferred = len(mirror.backlog)
    machines = anyio.run(scenario, 0)  # the next update replays the machine's exit
    counts = list(Worker._family.counts)  # type: ignore[union-attr]
    report.put((deferred, len(mirror.backlog), counts))
    del machines


# -- helpers -----------------------------------------------------------------------------------


@contextmanager
def multiprocess_env(path: Path | None) -> Iterator[None]:
    """The variable as children should inherit it; this process's mode stays as it was."""
    before = os.environ.get(VARIABLE)
    if path is None:
        os.environ.pop(VARIABLE, None)
    else:
        os.environ[VARIABLE] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(VARIABLE, None)
        else:
            os.environ[VARIABLE] = before


def start(path: Path | None, target: Any, *args: Any) -> BaseProcess:
    process = SPAWN.Process(target=target, args=args, daemon=True)
    with multiprocess_env(path):
        process.start()
    return process


def start_writer(path: Path, number: int, report: Queue[Any]) -> tuple[BaseProcess, Connection]:
    """A `run_worker` process, and the pipe end that releases it when closed."""
    reader, writer = SPAWN.Pipe(duplex=False)
    process = start(path, run_worker, number, report, reader)
    reader.close()
    return process, writer


def receive(report: Queue[Any], processes: list[BaseProcess], count: int) -> list[Any]:
    """`count` reports, failing at once if a child dies first."""
    received: list[Any] = []
    deadline = time.monotonic() + TIMEOUT
    while len(received) < count:
        try:
            received.append(report.get(timeout=0.05))
        except queue.Empty:
            dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            assert not dead, f"a child failed (exit codes {dead}); see its stderr"
            assert time.monotonic() < deadline, "children did not report in time"
    return received


def finish(process: BaseProcess) -> None:
    process.join(TIMEOUT)
    assert process.exitcode == 0, f"child exit code {process.exitcode}"


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(path: Path) -> tuple[str, Samples]:
    """The merged exposition of a multiprocess directory, and its samples by labels."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    text = generate_latest(registry).decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def sample(samples: Samples, name: str, **labels: object) -> float | None:
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())))


def pids(samples: Samples) -> set[str]:
    return {value for (_, labels) in samples for key, value in labels if key == "pid"}


def enum_states(samples: Samples, pid: int, worker: str) -> dict[str, float | None]:
    return {
        state: sample(samples, "mp_worker_state", mp_worker_state=state, pid=pid, worker=worker)
        for state in ("idle", "running", "error")
    }


# -- tests -----------------------------------------------------------------------------------


def test_this_process_is_not_in_multiprocess_mode() -> None:
    # The premise of every test below: only the children write files.
    assert not values.ValueClass._multiprocess
    assert Worker._family is not None
    assert Worker._family.mirror is None
    assert Worker.metric._files is None
    assert Worker.metric._file is None
    enum = Enum("plain", "d", ["k"], states=["a", "b"], registry=None)
    enum.labels("x").state("b")
    assert "_file" not in type(enum.labels("x")).__slots__


def test_merged_exposition_of_live_and_dead_workers(tmp_path: Path) -> None:
    report: Queue[Any] = SPAWN.Queue()
    started = [start_writer(tmp_path, number, report) for number in range(3)]
    processes = [process for process, _ in started]
    try:
        reports = sorted(receive(report, processes, 3))
        pid = [p for _, p, _ in reports]
        assert all(multiprocess_in_place for *_, multiprocess_in_place in reports)
        _, live = scrape(tmp_path)

        # The Enum: one series per process and label set, pid included.
        for number in range(3):
            assert enum_states(live, pid[number], f"w{number}") == {
                "idle": 0,
                "running": 1,
                "error": 0,
            }
            assert enum_states(live, pid[number], "shared")["idle"] == 1
            # Closed: its label set shows no state (until its entries leave the file).
            gone = set(enum_states(live, pid[number], f"gone{number}").values())
            assert gone in ({0}, {None})
            assert sample(live, "mp_job_state", mp_job_state="done", pid=pid[number]) == 1
        assert pids(live) == {str(p) for p in pid}

        # `_machines`: summed over live processes.
        machines = {
            state: sample(live, "mp_worker_state_machines", mp_worker_state=state)
            for state in ("idle", "running", "error")
        }
        assert machines == {"idle": 3, "running": 3, "error": 0}
        assert sample(live, "mp_job_state_machines", mp_job_state="done") == 3

        # Counters and the histogram: summed over processes.
        starts = sum(n + 2 for n in range(3)) + 3  # the `gone` machines started once each

        def counters(samples: Samples) -> tuple[float | None, ...]:
            ran = "mp_worker_state_transitions_total"
            return (
                sample(samples, ran, **{"from": "idle", "to": "running", "trigger": "start"}),
                sample(samples, ran, **{"from": "running", "to": "idle", "trigger": "finish"}),
                sample(samples, ran, **{"from": "running", "to": "running", "trigger": "ping"}),
                sample(samples, ran, **{"from": "idle", "to": "error", "trigger": "fail"}),
                sample(
                    samples, "mp_worker_state_errors_total", trigger="finish", error="MachineError"
                ),
                sample(samples, "mp_worker_state_duration_seconds_count", mp_worker_state="idle"),
                sample(
                    samples,
                    "mp_worker_state_duration_seconds_bucket",
                    mp_worker_state="idle",
                    le="+Inf",
                ),
                sample(
                    samples,
                    "mp_job_state_transitions_total",
                    **{"from": "pending", "to": "done", "trigger": "finish"},
                ),
            )

        expected = (starts, sum(n + 1 for n in range(3)), 3, 0, 3, starts, starts, 3)
        assert counters(live) == expected

        # Killed mid-way, then cleaned up as gunicorn's child_exit hook does.
        processes[1].kill()
        processes[1].join(TIMEOUT)
        mark_process_dead(pid[1], str(tmp_path))
        _, after = scrape(tmp_path)
        assert pids(after) == {str(pid[0]), str(pid[2])}
        assert enum_states(after, pid[1], "w1") == {"idle": None, "running": None, "error": None}
        assert sample(after, "mp_worker_state_machines", mp_worker_state="running") == 2
        assert sample(after, "mp_worker_state_machines", mp_worker_state="idle") == 2
        assert sample(after, "mp_job_state_machines", mp_job_state="done") == 2
        assert counters(after) == expected  # a dead process's counts are kept

        for number in (0, 2):
            started[number][1].close()
            finish(processes[number])
            mark_process_dead(pid[number], str(tmp_path))
        _, gone = scrape(tmp_path)
        assert not pids(gone)
        assert sample(gone, "mp_worker_state_machines", mp_worker_state="running") is None
        assert counters(gone) == expected
    finally:
        for process, release in started:
            release.close()
            process.join(TIMEOUT)


def normalized(text: str, *, drop: str = "") -> dict[str, Any]:
    """Families by name: type, help and samples, without what depends on timing or mode.

    Bucket counts and sums depend on timing; `_created` samples, the `pid` label and
    families with no sample depend on the mode. Everything else must match.
    """
    result: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):
            continue  # the text format shows `_created` samples as families of their own
        samples = set()
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            labels = frozenset((k, v) for k, v in s.labels.items() if k != drop)
            timing = s.name.endswith("_sum") or (
                s.name.endswith("_bucket") and s.labels.get("le") != "+Inf"
            )
            samples.add((s.name, labels, None if timing else s.value))
        if not samples:
            continue  # HELP and TYPE of a family with no sample yet: the files cannot say
        result[family.name] = (family.type, family.documentation, samples)
    return result


def test_merged_exposition_matches_single_process(tmp_path: Path) -> None:
    report: Queue[Any] = SPAWN.Queue()
    single = start(None, run_single, report)
    writer, release = start_writer(tmp_path, 0, report)
    try:
        results = receive(report, [single, writer], 2)
        text, _ = scrape(tmp_path)
        single_text, multiprocess, mirrors = next(r for r in results if isinstance(r[0], str))
        # Without the variable: no mirrors, no files.
        assert (multiprocess, mirrors) == (False, [None, None])
        # The documented difference: the oldest machine per state is stored as a time.
        # A closed label set shows no state until its entries leave the file.
        gone = re.compile(r'^mp_worker_state\{.*worker="gone0"\} 0\.0\n', re.MULTILINE)
        merged = normalized(gone.sub("", text), drop="pid")
        assert merged.pop("mp_worker_state_oldest_timestamp_seconds")[0] == "gauge"
        assert merged.pop("mp_job_state_oldest_timestamp_seconds")[0] == "gauge"
        alone = normalized(single_text)
        for name in ("mp_worker_state_oldest_seconds", "mp_job_state_oldest_seconds"):
            alone.pop(name, None)
        assert merged == alone
        assert "_created" not in text
    finally:
        release.close()
        finish(single)
        finish(writer)
    prefixes = sorted(f.name.rsplit("_", 1)[0] for f in tmp_path.iterdir())
    assert prefixes == [
        "counter",
        "gauge_liveall",
        "gauge_livemin",
        "gauge_livesum",
        "histogram",
    ]


def test_forked_child_writes_its_own_series(tmp_path: Path) -> None:
    report: Queue[Any] = SPAWN.Queue()
    parent = start(tmp_path, run_forking, report)
    (child_pid,) = receive(report, [parent], 1)
    finish(parent)
    _, samples = scrape(tmp_path)
    # The forked child holds copies of the machines: its series and counts are its own.
    # (It left by os._exit; the parent exited normally, its machines ending as it did.)
    assert enum_states(samples, child_pid, "w0") == {"idle": 0, "running": 1, "error": 0}
    assert enum_states(samples, child_pid, "shared")["idle"] == 1
    assert sample(samples, "mp_worker_state_machines", mp_worker_state="running") == 1
    assert sample(samples, "mp_job_state", mp_job_state="done", pid=child_pid) == 1
    # Its counters start at zero, as prometheus_client's do after a fork.
    assert (
        sample(
            samples,
            "mp_job_state_transitions_total",
            **{"from": "pending", "to": "done", "trigger": "finish"},
        )
        == 1
    )


def test_machine_collected_inside_a_value_write_does_not_deadlock(tmp_path: Path) -> None:
    report: Queue[Any] = SPAWN.Queue()
    process = start(tmp_path, run_collected_in_value_lock, report)
    ((deferred, left, counts),) = receive(report, [process], 1)
    finish(process)
    assert deferred > 0
    assert (left, counts) == (0, [1, 1, 0])
    _, samples = scrape(tmp_path)
    (pid,) = pids(samples)
    assert set(enum_states(samples, int(pid), "cyclic").values()) in ({0}, {None})


def test_enum_on_its_own(tmp_path: Path) -> None:
    code = """
import os
from statemachine_metrics import Enum
plain = Enum("task_state", "Task", states=["starting", "running", "stopped"], registry=None)
plain.state("running")
e = Enum("conn_state", "Conn", ["pool"], states=["idle", "busy"], registry=None)
e.labels("a").state("busy")
e.labels("b").state("busy")
e.labels("c")
e.remove("b")
e.remove_by_labels({"pool": "c"})
for call in (lambda: e.remove("a", "x"), lambda: plain.remove("a"), lambda: e.remove_by_labels([])):
    try:
        call()
    except (ValueError, TypeError) as exc:
        print(type(exc).__name__, exc)
e.labels("b").state("idle")  # back: its values are reused
print(os.getpid())
"""
    env = {**os.environ, VARIABLE: str(tmp_path), "PYTHONWARNINGS": "error"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stderr
    *errors, pid = done.stdout.splitlines()
    assert errors == [
        "ValueError Incorrect label count (expected 1, got ('a', 'x'))",
        "ValueError No label names were set when constructing stateset:task_state",
        "TypeError labels must be a dict of {label_name: label_value}",
    ]
    _, samples = scrape(tmp_path)

    def states(name: str, **labels: str) -> list[float | None]:
        return [
            sample(samples, name, **{name: s}, pid=pid, **labels)
            for s in (["idle", "busy"] if name == "conn_state" else ["starting", "running"])
        ]

    assert states("task_state") == [0, 1]
    assert states("conn_state", pool="a") == [0, 1]
    assert states("conn_state", pool="b") == [1, 0]
    assert states("conn_state", pool="c") in ([0, 0], [None, None])  # removed: no state


def test_example_runs() -> None:
    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "multiprocess_workers.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert 'example_connection_state_machines{example_connection_state="busy"} 6.0' in out
    busy = re.findall(
        r'^example_connection_state\{conn="c\d",example_connection_state="busy",'
        r'pid="(\d+)"\} 1\.0$',
        out,
        re.MULTILINE,
    )
    assert len(busy) == 6  # two busy connections per worker
    assert len(set(busy)) == 3
    assert re.search(r"after the workers exited: 0 live series, \d+ transitions counted", out)
