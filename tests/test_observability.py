"""Stuck machines, trigger latency and exemplars, on asyncio and trio.

`<name>_oldest_seconds`, `<name>_trigger_duration_seconds` and the OpenTelemetry trace ids
that the OpenMetrics exposition shows as exemplars. Times are checked with inequalities and
margins, never for exact values.
"""

from __future__ import annotations

import gc
import math
import re
import time
from typing import Any

import anyio
import anyio.lowlevel
import opentelemetry.trace  # before the classes: it switches exemplars on
import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

import statemachine_metrics
from statemachine_metrics import MachineError, TransitionEvent
from tests._machines import STATES, metered

pytestmark = pytest.mark.anyio

assert opentelemetry.trace  # imported for its effect


def sample(cls: Any, suffix: str, **labels: str) -> float | None:
    name: str = cls.metric_names()[0]
    value: float | None = cls.registry_.get_sample_value(name + suffix, labels)
    return value


def oldest(cls: Any, state: str) -> float:
    value = sample(cls, "_oldest_seconds", worker_state=state)
    assert value is not None, f"no oldest_seconds sample for {state!r}"
    return value


def count(cls: Any, trigger: str) -> float:
    value = sample(cls, "_trigger_duration_seconds_count", trigger=trigger)
    return 0.0 if value is None else value


def total(cls: Any, trigger: str) -> float:
    value = sample(cls, "_trigger_duration_seconds_sum", trigger=trigger)
    return 0.0 if value is None else value


# -- <name>_oldest_seconds -----------------------------------------------------------------


async def test_oldest_is_zero_for_a_state_with_no_machine(anyio_backend: str) -> None:
    Worker = metered()
    assert [oldest(Worker, s) for s in STATES] == [0.0, 0.0, 0.0]
    w = Worker()
    await anyio.sleep(0.02)
    assert oldest(Worker, "idle") >= 0.015
    assert oldest(Worker, "running") == oldest(Worker, "error") == 0.0
    assert w.state == "idle"
    assert "worker_state_oldest_seconds" in Worker.metric_names()


async def test_oldest_grows_between_scrapes_for_a_machine_that_stays(anyio_backend: str) -> None:
    Worker = metered()
    w = Worker()
    await w.start()
    first = oldest(Worker, "running")
    await anyio.sleep(0.05)
    second = oldest(Worker, "running")
    assert second - first >= 0.04
    assert second < 5.0
    assert oldest(Worker, "idle") == 0.0


async def test_when_the_oldest_leaves_the_next_oldest_shows(anyio_backend: str) -> None:
    Worker = metered()
    a = Worker()
    await anyio.sleep(0.06)
    before_b = time.perf_counter()
    b = Worker()
    after_b = time.perf_counter()
    await anyio.sleep(0.02)
    assert oldest(Worker, "idle") >= 0.075  # a's stay

    await a.start()
    low = time.perf_counter() - after_b
    shown = oldest(Worker, "idle")
    high = time.perf_counter() - before_b
    assert low <= shown <= high  # b's stay, not a's
    assert oldest(Worker, "running") < shown

    # Back in idle, a is the newest there: b stays the oldest.
    back = time.perf_counter()
    await a.finish()
    assert oldest(Worker, "idle") >= low
    await b.start()
    assert oldest(Worker, "idle") <= time.perf_counter() - back  # a, which came back
    assert b.state == "running"


async def test_a_closed_machine_no_longer_counts(anyio_backend: str) -> None:
    Worker = metered()
    a = Worker()
    await anyio.sleep(0.05)
    before_b = time.perf_counter()
    b = Worker()
    assert oldest(Worker, "idle") >= 0.045
    await a.aclose()
    assert oldest(Worker, "idle") <= time.perf_counter() - before_b  # b's stay
    await b.aclose()
    assert oldest(Worker, "idle") == 0.0


async def test_a_machine_in_an_async_with_block_leaves_oldest_at_its_end(
    anyio_backend: str,
) -> None:
    Worker = metered()
    async with Worker() as w:
        await w.fail()
        await anyio.sleep(0.02)
        assert oldest(Worker, "error") >= 0.015
    assert oldest(Worker, "error") == 0.0


async def test_a_garbage_collected_machine_no_longer_counts(anyio_backend: str) -> None:
    Worker = metered()
    a = Worker()
    await anyio.sleep(0.05)
    before_b = time.perf_counter()
    b = Worker()
    assert oldest(Worker, "idle") >= 0.045
    del a  # the last reference: the machine ends at once
    assert oldest(Worker, "idle") <= time.perf_counter() - before_b  # b's stay
    # One in a reference cycle ends when the collector runs.
    cycle: list[Any] = [b]
    cycle.append(cycle)
    del b, cycle
    gc.collect()
    assert oldest(Worker, "idle") == 0.0


async def test_a_reflexive_transition_restarts_the_stay(anyio_backend: str) -> None:
    Worker = metered()
    w = Worker()
    await w.start()
    await anyio.sleep(0.05)
    assert oldest(Worker, "running") >= 0.045
    restarted = time.perf_counter()
    await w.restart()  # running -> running: leaves and re-enters
    assert oldest(Worker, "running") <= time.perf_counter() - restarted


async def test_an_internal_transition_does_not_restart_the_stay(anyio_backend: str) -> None:
    Worker = metered()
    w = Worker()
    await w.start()
    await anyio.sleep(0.05)
    await w.heartbeat()  # internal: stays in running
    assert oldest(Worker, "running") >= 0.045


async def test_each_state_has_its_own_oldest(anyio_backend: str) -> None:
    Worker = metered()
    idle, busy, broken = Worker(), Worker(), Worker()
    await busy.start()
    await anyio.sleep(0.04)
    failed = time.perf_counter()
    await broken.fail()
    first = {s: oldest(Worker, s) for s in STATES}
    assert first["idle"] >= 0.035
    assert first["running"] >= 0.035
    assert first["error"] <= time.perf_counter() - failed

    # Moving machines in and out of other states leaves a state's oldest as it is.
    newcomer = Worker()
    await newcomer.start()
    await newcomer.fail()
    await busy.fail()
    second = {s: oldest(Worker, s) for s in STATES}
    assert second["idle"] >= first["idle"]
    assert second["error"] >= first["error"]
    assert second["running"] == 0.0
    assert idle.state == "idle"


async def test_oldest_spans_every_label_set_of_a_class(anyio_backend: str) -> None:
    Worker = metered(labelnames=("worker",))
    a = Worker(labels={"worker": "a"})
    await anyio.sleep(0.05)
    before_b = time.perf_counter()
    b = Worker(labels={"worker": "b"})
    c = Worker(labels={"worker": "a"})  # shares a's series
    assert oldest(Worker, "idle") >= 0.045
    await a.start()
    a_running = time.perf_counter()
    assert oldest(Worker, "idle") <= time.perf_counter() - before_b  # b or c
    await b.start()
    await c.start()
    assert oldest(Worker, "idle") == 0.0
    floor = time.perf_counter() - a_running
    assert oldest(Worker, "running") >= floor  # a, the first there


async def test_a_nested_trigger_updates_oldest(anyio_backend: str) -> None:
    async def on_enter_running(self: Any) -> None:
        await self.finish()

    Worker = metered(on_enter_running=on_enter_running)
    w = Worker()
    await anyio.sleep(0.05)
    began = time.perf_counter()
    await w.start()  # idle -> running -> idle
    assert w.state == "idle"
    assert oldest(Worker, "running") == 0.0
    assert oldest(Worker, "idle") <= time.perf_counter() - began


# -- <name>_trigger_duration_seconds ---------------------------------------------------------


async def test_every_trigger_that_got_its_turn_is_observed(anyio_backend: str) -> None:
    async def on_enter_error(self: Any) -> None:
        raise RuntimeError("callback failed")

    Worker = metered(on_enter_error=on_enter_error)
    w = Worker()
    assert await w.start_if() is False  # a condition stopped it
    assert await w.start() is True  # ran (fast path: no callbacks)
    assert await w.heartbeat() is True  # internal
    with pytest.raises(MachineError):
        await w.reset()  # invalid in running
    with pytest.raises(RuntimeError):
        await w.fail()  # its callback raised
    assert [count(Worker, t) for t in ("start_if", "start", "heartbeat", "reset", "fail")] == [
        1.0,
        1.0,
        1.0,
        1.0,
        1.0,
    ]
    assert count(Worker, "finish") == 0.0
    inf = sample(Worker, "_trigger_duration_seconds_bucket", trigger="start", le="+Inf")
    assert inf == 1.0


async def test_the_sum_includes_time_in_async_callbacks(anyio_backend: str) -> None:
    async def on_enter_running(self: Any) -> None:
        await anyio.sleep(0.05)

    Worker = metered(on_enter_running=on_enter_running)
    w = Worker()
    began = time.perf_counter()
    await w.start()
    took = time.perf_counter() - began
    assert 0.05 <= total(Worker, "start") <= took
    assert sample(Worker, "_trigger_duration_seconds_bucket", trigger="start", le="0.025") == 0.0
    assert sample(Worker, "_trigger_duration_seconds_bucket", trigger="start", le="+Inf") == 1.0


async def test_the_sum_includes_time_in_conditions_even_when_they_stop_it(
    anyio_backend: str,
) -> None:
    async def allowed(self: Any) -> bool:
        await anyio.sleep(0.03)
        return False

    Worker = metered(allowed=allowed)
    w = Worker()
    assert await w.start_if() is False
    assert count(Worker, "start_if") == 1.0
    assert total(Worker, "start_if") >= 0.03


async def test_a_nested_trigger_has_its_own_observation(anyio_backend: str) -> None:
    async def on_enter_running(self: Any) -> None:
        await anyio.sleep(0.02)
        await self.finish()

    async def on_enter_idle(self: Any) -> None:
        await anyio.sleep(0.03)

    Worker = metered(on_enter_running=on_enter_running, on_enter_idle=on_enter_idle)
    w = Worker()
    await w.start()
    assert w.state == "idle"
    assert count(Worker, "start") == 1.0
    assert count(Worker, "finish") == 1.0
    assert total(Worker, "finish") >= 0.03
    # start's own time includes the nested finish it waited for.
    assert total(Worker, "start") >= total(Worker, "finish") + 0.02


async def test_time_waiting_for_the_turn_is_not_included(anyio_backend: str) -> None:
    entered = anyio.Event()

    async def on_enter_running(self: Any) -> None:
        entered.set()
        await anyio.sleep(0.1)

    Worker = metered(on_enter_running=on_enter_running)
    w = Worker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(w.start)
        await entered.wait()
        began = time.perf_counter()
        assert await w.heartbeat() is True  # waits ~0.1 s for start to finish
        waited = time.perf_counter() - began
    assert waited >= 0.05
    assert count(Worker, "heartbeat") == 1.0
    assert total(Worker, "heartbeat") < waited / 2
    assert total(Worker, "start") >= 0.09


async def test_trigger_buckets_change_the_buckets(anyio_backend: str) -> None:
    Worker = metered(trigger_buckets=[0.01, 0.2])
    w = Worker()
    await w.start()
    bounds = {
        s.labels["le"]
        for metric in Worker.registry_.collect()
        if metric.name == "worker_state_trigger_duration_seconds"
        for s in metric.samples
        if s.name.endswith("_bucket") and s.labels["trigger"] == "start"
    }
    assert bounds == {"0.01", "0.2", "+Inf"}
    assert sample(Worker, "_trigger_duration_seconds_bucket", trigger="start", le="0.01") == 1.0


@pytest.mark.parametrize("buckets", [[0.2, 0.1], [0.1, 0.1], ["fast"], [], [math.nan], None])
def test_bad_trigger_buckets_fail_at_class_creation(buckets: Any) -> None:
    with pytest.raises(ValueError, match=r"^Worker\.trigger_buckets "):
        metered(trigger_buckets=buckets)


def test_bad_trigger_buckets_on_a_subclass_fail_at_its_creation() -> None:
    Worker = metered()
    with pytest.raises(ValueError, match=r"^Child\.trigger_buckets\b"):
        type("Child", (Worker,), {"trigger_buckets": [0.2, 0.1]})


# -- exemplars -----------------------------------------------------------------------------

EXEMPLAR = re.compile(r' # \{trace_id="([0-9a-f]{32})"\} (\S+)')


def exposition_lines(cls: Any) -> list[str]:
    lines: list[str] = openmetrics_latest(cls.registry_).decode().splitlines()
    # The library's own exposition shows the same exemplars (oldest_seconds moves on).
    ours = statemachine_metrics.generate_latest(cls.registry_, openmetrics=True)
    steady = [line for line in lines if "_oldest_seconds{" not in line]
    assert [line for line in ours.decode().splitlines() if "_oldest_seconds{" not in line] == (
        steady
    )
    return lines


def line_of(lines: list[str], start: str) -> str:
    found = [line for line in lines if line.startswith(start)]
    assert len(found) == 1, (start, found)
    return found[0]


async def test_a_transition_under_a_span_carries_its_trace_id(anyio_backend: str) -> None:
    async def on_exit_idle(self: Any) -> None:
        await anyio.lowlevel.checkpoint()

    Worker = metered(on_exit_idle=on_exit_idle)
    events: list[TransitionEvent] = []
    Worker.add_listener(events.append)
    tracer = TracerProvider().get_tracer(__name__)
    w = Worker()
    await anyio.sleep(0.002)
    with tracer.start_as_current_span("job") as span:
        await w.start()
    trace_id = format(span.get_span_context().trace_id, "032x")
    lines = exposition_lines(Worker)

    counter = line_of(
        lines, 'worker_state_transitions_total{from="idle",to="running",trigger="start"}'
    )
    match = EXEMPLAR.search(counter)
    assert match is not None, counter
    assert match.group(1) == trace_id

    # The duration histogram: the bucket the time spent in idle went to, and only that one.
    elapsed = events[0].elapsed
    assert elapsed is not None
    marked = [
        line
        for line in lines
        if line.startswith('worker_state_duration_seconds_bucket{le="')
        and 'worker_state="idle"' in line
        and EXEMPLAR.search(line)
    ]
    assert len(marked) == 1, marked
    bucket = float(re.search(r'le="([^"]+)"', marked[0]).group(1))  # type: ignore[union-attr]
    match = EXEMPLAR.search(marked[0])
    assert match is not None
    assert match.group(1) == trace_id
    assert float(match.group(2)) == pytest.approx(elapsed)
    assert elapsed <= bucket
    lower = [b for b in Worker.duration_buckets if b < bucket]
    assert not lower or elapsed > max(lower)


async def test_the_fast_path_and_another_span_give_their_own_trace_ids(
    anyio_backend: str,
) -> None:
    Worker = metered()  # no callbacks: the fast path
    tracer = TracerProvider().get_tracer(__name__)
    w = Worker()
    with tracer.start_as_current_span("first") as first:
        await w.start()
    with tracer.start_as_current_span("second") as second:
        await w.heartbeat()  # internal: the counter only
        await w.finish()
    lines = exposition_lines(Worker)
    ids = {}
    for trigger, source, dest in (
        ("start", "idle", "running"),
        ("heartbeat", "running", "running"),
        ("finish", "running", "idle"),
    ):
        line = line_of(
            lines,
            f'worker_state_transitions_total{{from="{source}",to="{dest}",trigger="{trigger}"}}',
        )
        match = EXEMPLAR.search(line)
        assert match is not None, line
        ids[trigger] = match.group(1)
    assert ids == {
        "start": format(first.get_span_context().trace_id, "032x"),
        "heartbeat": format(second.get_span_context().trace_id, "032x"),
        "finish": format(second.get_span_context().trace_id, "032x"),
    }
    # One exemplar per state left: idle (start) and running (finish).
    marked = [line for line in lines if line.startswith("worker_state_duration") and " # {" in line]
    assert len(marked) == 2, marked


async def test_no_span_no_exemplar(anyio_backend: str) -> None:
    async def on_enter_running(self: Any) -> None:
        await anyio.lowlevel.checkpoint()

    Worker = metered(on_enter_running=on_enter_running)
    w = Worker()
    await w.start()
    await w.heartbeat()
    await w.restart()
    await w.finish()
    lines = exposition_lines(Worker)
    assert any(line.startswith("worker_state_transitions_total{") for line in lines)
    assert [line for line in lines if " # {" in line] == []
