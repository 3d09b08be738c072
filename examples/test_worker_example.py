"""Testing a worker pool with the statemachine_metrics pytest plugin.

The plugin is loaded automatically wherever statemachine_metrics is installed: no
conftest. It gives the ``machine_recorder`` and ``machine_metrics`` fixtures and zeroes
machine counters before each test. Run this suite with

    pytest examples/test_worker_example.py

tests/test_pytest_plugin.py runs it too. docs/testing.md walks through it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import pytest

from statemachine_metrics import MeteredMachine, Trigger
from statemachine_metrics.testing import MachineMetrics, Recorder, record

# -- the code under test (in an application, it lives in its own package) ----------------

Job = Callable[[], Awaitable[None]]


# registry=None keeps this class out of the default registry: a test file can be
# imported more than once in one process, and each time defines the class anew.
class Worker(MeteredMachine, namespace="example", labelnames=("worker",), registry=None):
    """Current state of a pool worker"""

    states = ["idle", "running", "error"]
    start = Trigger("idle", "running")
    finish = Trigger("running", "idle")
    fail = Trigger(["idle", "running"], "error")
    reset = Trigger("error", "idle")


async def process(worker: Worker, job: Job) -> None:
    """Run one job on `worker`; a job that raises leaves it in ``error``."""
    await worker.start()
    try:
        await job()
    except Exception:
        await worker.fail()
        raise
    await worker.finish()


async def serve(jobs: list[Job], size: int) -> list[Exception]:
    """Run `jobs` on a pool of `size` workers; a worker whose job failed is reset and
    takes the next one. Returns the jobs' exceptions."""
    failures: list[Exception] = []
    send, receive = anyio.create_memory_object_stream[Job](len(jobs))

    async def work(name: str) -> None:
        async with Worker(labels={"worker": name}) as worker:
            async for job in receive:
                try:
                    await process(worker, job)
                except Exception as exc:
                    failures.append(exc)
                    await worker.reset()

    async with receive, anyio.create_task_group() as group:
        for i in range(size):
            group.start_soon(work, f"w{i}")
        async with send:
            for job in jobs:
                await send.send(job)
    return failures


async def ok() -> None:
    await anyio.sleep(0.001)


async def broken() -> None:
    raise ValueError("bad input")


# -- the tests -----------------------------------------------------------------------------

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_a_job_takes_the_worker_to_running_and_back(machine_recorder: Recorder) -> None:
    worker = Worker(labels={"worker": "w1"})
    await process(worker, ok)
    machine_recorder.assert_path(worker, ["idle", "running", "idle"])


async def test_a_failed_job_leaves_the_worker_in_error(
    machine_recorder: Recorder, machine_metrics: MachineMetrics
) -> None:
    worker = Worker(labels={"worker": "w1"})
    with pytest.raises(ValueError, match="bad input"):
        await process(worker, broken)
    machine_recorder.assert_triggers(worker, ["start", "fail"])
    # The metrics agree: read by short name, with the class's own labels.
    assert machine_metrics.transitions(Worker, "fail", source="running") == 1
    assert machine_metrics.state(Worker, worker="w1") == "error"
    assert machine_metrics.count(Worker, "error") == 1


async def test_the_pool_recovers_from_a_failed_job(machine_metrics: MachineMetrics) -> None:
    with record(Worker) as recorder:  # every Worker, including those the pool creates
        failures = await serve([ok, broken, ok, ok], size=2)
    assert [str(exc) for exc in failures] == ["bad input"]
    assert len(recorder.machines) == 2
    for worker in recorder.machines:
        assert recorder.path(worker)[0] == recorder.path(worker)[-1] == "idle"
    assert recorder.uncovered_transitions(Worker) == [("fail", "idle", "error")]
    assert machine_metrics.transitions(Worker, "start") == 4
    assert machine_metrics.transitions(Worker, "reset") == 1
    assert all(worker.closed for worker in recorder.machines)  # the pool closed them


async def test_counters_start_from_zero_in_every_test(machine_metrics: MachineMetrics) -> None:
    # The tests above ran transitions of Worker; the plugin zeroed them before this test.
    assert machine_metrics.transitions(Worker) == 0
    assert machine_metrics.value(Worker, "duration_seconds_count") == 0
