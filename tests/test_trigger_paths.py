"""The ways a trigger method runs, and the cases where each must give way to the next.

``machine.<trigger>()`` moves a machine at once for a step without callbacks, runs
callbacks synchronously while they return plain values (no turn is held: nothing is
awaited, so nothing can come between), takes the turn at the first awaitable a callback
returns, and leaves everything else to the engine's general path. ``machine.trigger(name)``
always takes the general path, so it is the reference the other paths are compared with.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from statemachine_metrics import MeteredMachine

pytestmark = pytest.mark.anyio


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample but timings' values and creation times (trigger counts stay)."""
    found = {}
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name.endswith("_created"):
                continue
            timing = sample.name.endswith("_sum") or (
                sample.name.endswith("_bucket") and sample.labels.get("le") != "+Inf"
            )
            if timing or metric.name.endswith("_oldest_seconds"):
                continue
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def worker_class(log: list[str], registry: CollectorRegistry | None = None) -> Any:
    """A class with every kind of step: bare, sync callbacks, a condition that may stop it,
    an internal step, and a callback that raises on demand."""

    class Worker(MeteredMachine, registry=registry):
        states = ["idle", "running", "done"]
        transitions = [
            ["start", "idle", "running"],
            {
                "trigger": "check",
                "source": "running",
                "dest": "done",
                "conditions": "ok",
                "before": "note",
                "after": "note",
            },
            {"trigger": "poke", "source": "running", "dest": None, "after": "note"},
            {"trigger": "explode", "source": "running", "dest": "idle", "before": "boom"},
            ["reset", "done", "idle"],
        ]

        allowed = True

        def ok(self) -> bool:
            log.append("ok")
            return self.allowed

        def note(self) -> None:
            log.append(f"note:{self.state}")

        def boom(self) -> None:
            log.append("boom")
            raise ValueError("boom")

    return Worker


OPS = st.lists(
    st.tuples(st.sampled_from(["start", "check", "poke", "explode", "reset"]), st.booleans()),
    max_size=12,
)


@settings(max_examples=25, deadline=None)
@given(ops=OPS)
def test_trigger_methods_and_trigger_by_name_agree(ops: list[tuple[str, bool]]) -> None:
    async def run(by_name: bool) -> tuple[list[Any], list[str], Any]:
        log: list[str] = []
        registry = CollectorRegistry()
        machine = worker_class(log, registry)()
        outcomes: list[Any] = []
        for trigger, allowed in ops:
            machine.allowed = allowed
            try:
                if by_name:
                    outcomes.append(await machine.trigger(trigger))
                else:
                    outcomes.append(await getattr(machine, trigger)())
            except Exception as exc:
                outcomes.append(f"{type(exc).__name__}: {exc}")
            outcomes.append(machine.state)
        return outcomes, log, samples(registry)

    for backend in ("asyncio", "trio"):
        assert anyio.run(run, False, backend=backend) == anyio.run(run, True, backend=backend)


class Slow(MeteredMachine, registry=None):
    """`start`'s sync `before` runs first, then its `after` awaits: the turn is taken there."""

    states = ["idle", "running", "stopped"]
    transitions = [
        {
            "trigger": "start",
            "source": "idle",
            "dest": "running",
            "before": "sync_note",
            "after": "wait",
        },
        {"trigger": "stop", "source": "running", "dest": "stopped", "before": "sync_note"},
        {"trigger": "halt", "source": "running", "dest": "stopped"},
    ]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log: list[str] = []
        self.gate = anyio.Event()
        self.nest = False

    def sync_note(self) -> None:
        self.log.append(f"sync:{self.state}")

    async def wait(self) -> None:
        self.log.append("waiting")
        if self.nest:
            self.log.append(f"nested:{await self.halt()}")  # type: ignore[attr-defined]
        await self.gate.wait()
        self.log.append("woken")


async def test_a_trigger_arriving_while_a_callback_awaits_waits_its_turn() -> None:
    machine = Slow()
    async with anyio.create_task_group() as tg:
        tg.start_soon(machine.start)  # type: ignore[attr-defined]
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(machine.stop)  # type: ignore[attr-defined]
        await anyio.wait_all_tasks_blocked()
        assert machine.log == ["sync:idle", "waiting"]  # stop has not run its callback
        machine.gate.set()
    assert machine.log == ["sync:idle", "waiting", "woken", "sync:running"]
    assert machine.state == "stopped"


async def test_a_trigger_from_the_awaiting_callback_nests() -> None:
    machine = Slow()
    machine.nest = True
    machine.gate.set()
    with anyio.fail_after(5):
        assert await machine.start() is True  # type: ignore[attr-defined]
    assert machine.log == ["sync:idle", "waiting", "nested:True", "woken"]
    assert machine.state == "stopped"


async def test_cancelled_while_a_callback_awaits_frees_the_turn() -> None:
    machine = Slow()
    with anyio.move_on_after(0.05):
        await machine.start()  # type: ignore[attr-defined]
    assert machine.state == "running"  # moved before `after` began to wait
    with anyio.fail_after(5):
        assert await machine.stop() is True  # type: ignore[attr-defined]
    assert machine.state == "stopped"


async def test_an_error_counts_once_whether_raised_before_or_after_an_await() -> None:
    registry = CollectorRegistry()

    class Faulty(MeteredMachine, registry=registry):
        states = ["a", "b"]
        transitions = [
            {"trigger": "early", "source": "a", "dest": "b", "before": "fail_now"},
            {"trigger": "late", "source": "a", "dest": "b", "before": "fail_later"},
        ]

        def fail_now(self) -> None:
            raise KeyError("early")

        async def fail_later(self) -> None:
            await anyio.lowlevel.checkpoint()
            raise KeyError("late")

    machine = Faulty()
    for trigger in ("early", "late"):
        with pytest.raises(KeyError):
            await getattr(machine, trigger)()
    for trigger in ("early", "late"):
        labels = {"trigger": trigger, "error": "KeyError"}
        assert registry.get_sample_value("faulty_state_errors_total", labels) == 1
        count = registry.get_sample_value(
            "faulty_state_trigger_duration_seconds_count", {"trigger": trigger}
        )
        assert count == 1
    assert machine.state == "a"
    with anyio.fail_after(5):  # the turn is free again
        with pytest.raises(KeyError):
            await machine.early()  # type: ignore[attr-defined]


async def test_a_sync_callback_returning_an_awaitable_is_awaited_in_the_turn() -> None:
    seen: list[str] = []

    class Returns(MeteredMachine, registry=None):
        states = ["a", "b"]
        transitions = [{"trigger": "go", "source": "a", "dest": "b", "after": "later"}]

        def later(self) -> Any:
            async def body() -> None:
                await anyio.lowlevel.checkpoint()
                seen.append(self.state)

            return body()

    machine = Returns()
    assert await machine.go() is True  # type: ignore[attr-defined]
    assert seen == ["b"]


async def test_an_async_condition_that_fails_stops_the_trigger() -> None:
    class Guarded(MeteredMachine, registry=None):
        states = ["a", "b"]
        transitions = [{"trigger": "go", "source": "a", "dest": "b", "conditions": "ready"}]

        async def ready(self) -> bool:
            await anyio.lowlevel.checkpoint()
            return False

    machine = Guarded()
    assert await machine.go() is False  # type: ignore[attr-defined]
    assert machine.state == "a"


async def test_a_closed_machine_refuses_every_kind_of_trigger() -> None:
    log: list[str] = []
    machine = worker_class(log)()
    await machine.start()
    await machine.aclose()
    for trigger in ("start", "check", "poke"):
        with pytest.raises(RuntimeError, match="machine is closed"):
            await getattr(machine, trigger)()
    assert log == []


async def test_an_internal_step_without_callbacks_counts_and_stays() -> None:
    registry = CollectorRegistry()

    class Beating(MeteredMachine, registry=registry):
        states = ["a"]
        transitions = [{"trigger": "beat", "source": "a", "dest": None}]

    machine = Beating()
    for _ in range(3):
        assert await machine.beat() is True  # type: ignore[attr-defined]
    labels = {"from": "a", "to": "a", "trigger": "beat"}
    assert registry.get_sample_value("beating_state_transitions_total", labels) == 3
    assert machine.state == "a"


async def test_a_wrapped_fire_sees_every_trigger_method_call() -> None:
    # Instrumentation (OpenTelemetry) wraps `Dispatch.fire`: the method must then leave its
    # own paths to the wrapper, for bare steps and callbacks alike.
    log: list[str] = []
    cls = worker_class(log)
    seen: list[str] = []
    dispatches = cls._triggers
    originals = {name: d.fire for name, d in dispatches.items()}

    def wrapping(name: str) -> Any:
        async def wrapper(*args: Any, **kwargs: Any) -> bool:
            seen.append(name)
            return await originals[name](*args, **kwargs)

        return wrapper

    for name, dispatch in dispatches.items():
        dispatch.fire = wrapping(name)
    try:
        machine = cls()
        await machine.start()
        await machine.check()
    finally:
        for name, dispatch in dispatches.items():
            dispatch.fire = originals[name]
    assert seen == ["start", "check"]
    assert machine.state == "done"


def latency(registry: CollectorRegistry, name: str, trigger: str) -> tuple[float, float, float]:
    """(count, sum, first bucket) of `trigger`'s latency histogram."""
    labels = {"trigger": trigger}
    histogram = f"{name}_trigger_duration_seconds"
    values = [
        registry.get_sample_value(f"{histogram}_count", labels),
        registry.get_sample_value(f"{histogram}_sum", labels),
        registry.get_sample_value(f"{histogram}_bucket", {**labels, "le": "0.0001"}),
    ]
    return tuple(0.0 if v is None else v for v in values)  # type: ignore[return-value]


async def test_a_trigger_taken_at_once_is_observed_as_taking_no_time() -> None:
    # No callback ran and nothing was awaited: zero, whichever way it was fired. A trigger
    # that ran a callback is observed with the time it took.
    registry = CollectorRegistry()
    log: list[str] = []
    worker = worker_class(log, registry)()
    name = type(worker).metric_names()[0]
    await worker.start()
    await worker.trigger("check")  # callbacks: measured
    await worker.reset()
    await worker.trigger("start")
    assert latency(registry, name, "start") == (2.0, 0.0, 2.0)
    assert latency(registry, name, "reset") == (1.0, 0.0, 1.0)
    count, seconds, _ = latency(registry, name, "check")
    assert count == 1.0
    assert seconds > 0.0


async def test_a_class_whose_latency_buckets_go_below_zero_still_counts_zero_right() -> None:
    registry = CollectorRegistry()

    class Odd(MeteredMachine, registry=registry):
        states = ["idle", "running"]
        transitions = [["start", "idle", "running"]]
        trigger_buckets = (-1.0, 0.0, 1.0)

    await Odd().start()
    name = Odd.metric_names()[0]
    histogram = f"{name}_trigger_duration_seconds_bucket"
    buckets = [
        registry.get_sample_value(histogram, {"trigger": "start", "le": le})
        for le in ("-1.0", "0.0", "1.0")
    ]
    assert buckets == [0.0, 1.0, 1.0]
