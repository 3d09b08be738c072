"""The one-step paths of `TaskMachine.task` and `track()`, against the engine's path.

A task whose state changes only the metrics can see is made already started and closed in
the same locked step as ``succeed``; a tracked call's triggers change the state at once
(`_now`, by the engine's `_move`) when the turn is free and the step has no callbacks.
The same jobs run with those paths on and forced off must export the same samples (all
but timings' values) and the same listener events and spans; where anything but the
metrics could see the difference, the one-step paths must not be taken at all.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from statemachine_metrics import (
    MeteredMachine,
    TaskMachine,
    TransitionEvent,
    _engine,
    _taskmachine,
    _tasks,
)

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


class Boom(Exception):
    pass


KINDS = ("ok", "error", "cancel", "group error", "group cancel", "final", "listen", "close")
SHARDS = ("a", "b")
Event = tuple[str, str, str, bool]
Sample = tuple[str, tuple[tuple[str, str], ...], float | None, object]


class Taken:
    """How often each one-step path ran."""

    def __init__(self) -> None:
        self.counts = {"_attach_moved": 0, "_detach_moved": 0, "_move": 0}

    def reset(self) -> None:
        self.counts = dict.fromkeys(self.counts, 0)

    def total(self) -> int:
        return sum(self.counts.values())


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> Taken:
    """Counts the one-step paths taken; exemplars off (OpenTelemetry's API, once imported
    by any test, turns them on whenever a class is made), so that they may be taken."""
    seen = Taken()
    monkeypatch.setattr(_engine, "exemplar_source", None)
    monkeypatch.setattr(_engine, "use_opentelemetry_exemplars", lambda: None)
    for module, name in (
        (_taskmachine, "_attach_moved"),
        (_taskmachine, "_detach_moved"),
        (_tasks, "_move"),
    ):
        real = getattr(module, name)

        def counting(*args: Any, _real: Any = real, _name: str = name) -> Any:
            seen.counts[_name] += 1
            return _real(*args)

        monkeypatch.setattr(module, name, counting)
    return seen


def fusing(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    monkeypatch.setattr(_tasks, "_fuse", on)
    # `track()` fires at once through `_now`; off, every trigger takes the awaited path.
    if on:
        monkeypatch.setattr(_tasks, "_now", _NOW)
    else:
        monkeypatch.setattr(_tasks, "_now", lambda machine, trigger: False)


_NOW = _tasks._now


def exported(registry: CollectorRegistry) -> list[Sample]:
    """Every sample and its exemplar's labels, in exposition order; timings' values
    (time in a state, trigger latencies, ages, creation times) left out, except how
    many were observed."""
    samples: list[Sample] = []
    for metric in registry.collect():
        timed = metric.name.endswith(("_duration_seconds", "_oldest_seconds"))
        for s in metric.samples:
            value: float | None = s.value
            timing = timed and not (s.name.endswith("_count") or s.labels.get("le") == "+Inf")
            if timing or s.name.endswith("_created"):
                value = None
            # Which bucket holds a duration's exemplar depends on the duration too.
            exemplar = None
            if s.exemplar is not None and not timed:
                exemplar = sorted(s.exemplar.labels.items())
            samples.append((s.name, tuple(sorted(s.labels.items())), value, exemplar))
    return samples


def task_class(labelled: bool, **members: Any) -> tuple[type[TaskMachine], CollectorRegistry]:
    registry = CollectorRegistry()
    keywords: dict[str, Any] = {"registry": registry, "namespace": "fused"}
    if labelled:
        keywords["labelnames"] = ("shard",)
    cls = type(TaskMachine)("Jobs", (TaskMachine,), {"__slots__": (), **members}, **keywords)
    return cls, registry


async def _boom() -> None:
    await anyio.lowlevel.checkpoint()
    raise Boom


async def body(kind: str, machine: MeteredMachine, events: list[Event]) -> str:
    """The body of a job that ends as `kind` says."""
    if kind == "group cancel":
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.sleep_forever)
            await anyio.sleep_forever()
    await anyio.lowlevel.checkpoint()
    if kind == "error":
        raise Boom
    if kind == "group error":
        async with anyio.create_task_group() as tg:
            tg.start_soon(_boom)
    if kind == "final":
        await machine.trigger("fail")
    if kind == "listen":

        def listener(e: TransitionEvent) -> None:
            events.append((e.trigger, e.source, e.dest, e.internal))

        machine.add_listener(listener)
    if kind == "close":
        await machine.aclose()
    return kind


def described(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return f"{type(exc).__name__}({', '.join(map(described, exc.exceptions))})"
    return f"{type(exc).__name__}: {exc}"


async def run_jobs(
    job: Callable[[str, str], Any], plan: list[tuple[str, str]], concurrent: bool
) -> list[str]:
    """Run the jobs of `plan` (kind, shard), one after another or all at once; how each
    ended."""
    ends: list[str] = [""] * len(plan)

    async def one(i: int, kind: str, shard: str) -> None:
        with anyio.CancelScope() as scope:
            if kind in ("cancel", "group cancel"):
                scope.cancel()
            try:
                ends[i] = await job(kind, shard)
            except Exception as exc:
                ends[i] = described(exc)
        if scope.cancelled_caught:
            ends[i] = "cancelled"

    if concurrent:
        async with anyio.create_task_group() as tg:
            for i, (kind, shard) in enumerate(plan):
                tg.start_soon(one, i, kind, shard)
    else:
        for i, (kind, shard) in enumerate(plan):
            await one(i, kind, shard)
    return ends


def run_tasks(
    backend: str,
    labelled: bool,
    plan: list[tuple[str, str]],
    concurrent: bool,
    setup: Callable[[Any], None] | None = None,
    **members: Any,
) -> tuple[list[str], list[Sample], list[Event]]:
    cls, registry = task_class(labelled, **members)
    if setup is not None:
        setup(cls)
    events: list[Event] = []

    @cls.task(labels=(lambda kind, shard: {"shard": shard}) if labelled else None)
    async def job(kind: str, shard: str) -> str:
        return await body(kind, cls.current(), events)

    ends = anyio.run(run_jobs, job, plan, concurrent, backend=backend)
    return ends, exported(registry), events


plans = st.lists(st.tuples(st.sampled_from(KINDS), st.sampled_from(SHARDS)), max_size=8)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plan=plans, labelled=st.booleans(), concurrent=st.booleans())
def test_fused_task_exports_what_the_engine_path_does(
    anyio_backend: str,
    monkeypatch: pytest.MonkeyPatch,
    taken: Taken,
    plan: list[tuple[str, str]],
    labelled: bool,
    concurrent: bool,
) -> None:
    taken.reset()
    fusing(monkeypatch, False)
    slow = run_tasks(anyio_backend, labelled, plan, concurrent)
    assert taken.counts["_attach_moved"] == taken.counts["_detach_moved"] == 0
    fusing(monkeypatch, True)
    fast = run_tasks(anyio_backend, labelled, plan, concurrent)
    if concurrent:
        # trio runs ready tasks in an order of its own choosing: the same calls end the
        # same ways, but events and new label sets may come in another order, and the
        # Enum shows the state of whichever machine of a label set moved last.
        assert fast[0] == slow[0]
        assert sorted(s for s in fast[1] if s[0] != "fused_jobs_state") == sorted(
            s for s in slow[1] if s[0] != "fused_jobs_state"
        )
        assert sorted(fast[2]) == sorted(slow[2])
    else:
        assert fast == slow
    # Every call is made started in one step; each that returned without leaving the
    # turn taken, the machine closed or a listener on it, closes in one step.
    assert taken.counts["_attach_moved"] == len(plan)
    assert taken.counts["_detach_moved"] == plan.count(("ok", "a")) + plan.count(("ok", "b"))


def test_fused_task_counts_like_the_engine_path_in_detail(
    monkeypatch: pytest.MonkeyPatch, taken: Taken
) -> None:
    """The samples a fused call changes, spelled out: it started, succeeded, its time in
    each state and its triggers' latencies were observed, and it left the counts."""
    fusing(monkeypatch, True)
    ends, samples, _ = run_tasks("asyncio", True, [("ok", "a")], False)
    assert ends == ["ok"]
    counted = {(name, labels): value for name, labels, value, _ in samples if value}
    state = "fused_jobs_state"
    assert counted == {
        (
            f"{state}_transitions_total",
            (("from", "pending"), ("to", "running"), ("trigger", "start")),
        ): 1,
        (
            f"{state}_transitions_total",
            (("from", "running"), ("to", "succeeded"), ("trigger", "succeed")),
        ): 1,
        (f"{state}_duration_seconds_bucket", ((state, "pending"), ("le", "+Inf"))): 1,
        (f"{state}_duration_seconds_count", ((state, "pending"),)): 1,
        (f"{state}_duration_seconds_bucket", ((state, "running"), ("le", "+Inf"))): 1,
        (f"{state}_duration_seconds_count", ((state, "running"),)): 1,
        (f"{state}_trigger_duration_seconds_bucket", (("le", "+Inf"), ("trigger", "start"))): 1,
        (f"{state}_trigger_duration_seconds_count", (("trigger", "start"),)): 1,
        (f"{state}_trigger_duration_seconds_bucket", (("le", "+Inf"), ("trigger", "succeed"))): 1,
        (f"{state}_trigger_duration_seconds_count", (("trigger", "succeed"),)): 1,
    }
    # No machine left, and the label set went with its last machine.
    assert not [s for s in samples if s[0] == state]
    assert taken.counts == {"_attach_moved": 1, "_detach_moved": 1, "_move": 0}


# -- track() ---------------------------------------------------------------------------


def worker_class(**members: Any) -> tuple[type[MeteredMachine], CollectorRegistry]:
    registry = CollectorRegistry()
    namespace = {
        "states": ["idle", "running", "error"],
        "transitions": [
            ["start", "idle", "running"],
            ["finish", "running", "idle"],
            ["fail", "running", "error"],
            ["drop", "running", "idle"],
            ["reset", "error", "idle"],
        ],
        **members,
    }
    cls = type(MeteredMachine)("Worker", (MeteredMachine,), namespace, registry=registry)
    return cls, registry


TRACK_KINDS = ("ok", "error", "cancel", "group error", "listen", "reset")


def run_tracked(
    backend: str,
    plan: list[tuple[str, bool]],
    setup: Callable[[Any], None] | None = None,
    **members: Any,
) -> tuple[list[str], list[Sample], list[Event]]:
    """Jobs on one worker, one after another, each tracked by the decorator or by
    ``async with``."""
    cls, registry = worker_class(**members)
    if setup is not None:
        setup(cls)
    worker = cls()
    events: list[Event] = []
    tracker = worker.track(enter="start", success="finish", error="fail", cancel="drop")

    async def job(kind: str) -> str:
        if kind == "reset":
            await anyio.lowlevel.checkpoint()
            await worker.trigger("fail")  # the body fails the worker itself: a MachineError follows
            return kind
        return await body(kind, worker, events)

    decorated = tracker(job)

    async def either(kind: str, shard: str) -> str:
        if shard == "a":
            return await decorated(kind)
        async with tracker:
            return await job(kind)

    jobs = [(kind, "a" if use_decorator else "b") for kind, use_decorator in plan]

    async def main() -> list[str]:
        async with worker:  # its timeouts, if any, run
            ends = await run_jobs(either, jobs, False)
            if worker.state == "error":
                await worker.trigger("reset")
        return ends

    ends = anyio.run(main, backend=backend)
    return ends, exported(registry), events


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plan=st.lists(st.tuples(st.sampled_from(TRACK_KINDS), st.booleans()), max_size=8))
def test_one_step_track_exports_what_the_engine_path_does(
    anyio_backend: str,
    monkeypatch: pytest.MonkeyPatch,
    taken: Taken,
    plan: list[tuple[str, bool]],
) -> None:
    taken.reset()
    fusing(monkeypatch, False)
    slow = run_tracked(anyio_backend, plan)
    assert taken.total() == 0
    fusing(monkeypatch, True)
    fast = run_tracked(anyio_backend, plan)
    assert fast == slow
    if plan and plan[0][0] != "listen":
        assert taken.counts["_move"] > 0  # at least the first job's start


# -- where the one-step paths must not be taken ------------------------------------------

FALLBACK_PLAN = [("ok", "a"), ("error", "b"), ("cancel", "a"), ("final", "a"), ("ok", "a")]
FALLBACK_TRACK = [("ok", True), ("ok", False), ("error", True), ("reset", False), ("ok", True)]


def noted(events: list[Event]) -> Callable[[TransitionEvent], None]:
    def listener(e: TransitionEvent) -> None:
        events.append((e.trigger, e.source, e.dest, e.internal))

    return listener


def both_ways(
    monkeypatch: pytest.MonkeyPatch,
    taken: Taken,
    run: Callable[[], Any],
    untouched: tuple[str, ...] = ("_attach_moved", "_detach_moved"),
) -> tuple[Any, Any]:
    """`run` with the one-step paths forced off, then on: the same results, and the
    `untouched` paths never taken."""
    fusing(monkeypatch, False)
    slow = run()
    fusing(monkeypatch, True)
    fast = run()
    assert fast == slow
    assert {name: taken.counts[name] for name in untouched} == dict.fromkeys(untouched, 0)
    return slow, fast


TASK_PATHS = ("_attach_moved", "_detach_moved")


@pytest.mark.parametrize(
    ("members", "untouched"),
    [
        # Timers: a task's machine is entered (the worker's triggers may still fire at
        # once: the engine's `_move` restarts timers).
        pytest.param({"timeouts": {"running": (60.0, "fail")}}, TASK_PATHS, id="timeouts"),
        # `start` has a callback: no task is made started; `finish` may still be one step.
        pytest.param({"on_enter_running": "note"}, TASK_PATHS, id="callback entering running"),
        # `succeed` and `finish` have a callback.
        pytest.param(
            {"on_exit_running": "note"}, ("_detach_moved",), id="callback leaving running"
        ),
        pytest.param({"prepare_event": "noted"}, (*TASK_PATHS, "_move"), id="machine-level hook"),
        pytest.param({"__init__": "own"}, TASK_PATHS, id="own __init__"),
    ],
)
def test_a_class_the_fused_paths_cannot_serve_takes_the_engine_path(
    anyio_backend: str,
    monkeypatch: pytest.MonkeyPatch,
    taken: Taken,
    members: dict[str, Any],
    untouched: tuple[str, ...],
) -> None:
    calls: list[str] = []

    def note(self: Any, *args: Any) -> None:
        calls.append(self.state)

    def own(self: Any, **kwargs: Any) -> None:
        calls.append("init")
        MeteredMachine.__init__(self, **kwargs)

    functions = {"own": own, "note": note}
    members = {k: functions.get(v, v) if isinstance(v, str) else v for k, v in members.items()}
    members["noted"] = note

    def run() -> Any:
        calls.clear()
        tasks = run_tasks(anyio_backend, False, FALLBACK_PLAN, False, **members)
        tracked = run_tracked(anyio_backend, FALLBACK_TRACK, **members)
        return tasks, tracked, list(calls)

    slow, _ = both_ways(monkeypatch, taken, run, untouched)
    if "timeouts" not in members:
        assert slow[2], "the class's own code ran"


def test_listeners_of_the_class_are_served_by_the_engine_path(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch, taken: Taken
) -> None:
    def run() -> tuple[Any, list[Event], Any, list[Event]]:
        task_events: list[Event] = []
        track_events: list[Event] = []
        task_listener, track_listener = noted(task_events), noted(track_events)
        tasks = run_tasks(
            anyio_backend,
            False,
            FALLBACK_PLAN,
            False,
            setup=lambda c: c.add_listener(task_listener),
        )
        tracked = run_tracked(
            anyio_backend, FALLBACK_TRACK, setup=lambda c: c.add_listener(track_listener)
        )
        return tasks, task_events, tracked, track_events

    slow, _ = both_ways(monkeypatch, taken, run)
    assert ("start", "pending", "running", False) in slow[1]
    assert ("finish", "running", "idle", False) in slow[3]


def test_exemplars_are_served_by_the_engine_path(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch, taken: Taken
) -> None:
    monkeypatch.setattr(_engine, "exemplar_source", lambda: {"trace_id": "ab" * 16})

    def run() -> tuple[Any, ...]:
        return (
            run_tasks(anyio_backend, False, FALLBACK_PLAN, False),
            run_tracked(anyio_backend, FALLBACK_TRACK),
        )

    slow, _ = both_ways(monkeypatch, taken, run)
    tasks, tracked = slow
    for _, samples, _ in (tasks, tracked):
        assert [s for s in samples if s[3] == [("trace_id", "ab" * 16)]]


def test_instrumented_classes_are_served_by_the_engine_path(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch, taken: Taken
) -> None:
    """OpenTelemetry instrumentation wraps `Dispatch.fire`: every trigger is a span,
    whichever way the one-step paths are set."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from statemachine_metrics import otel

    def run() -> tuple[Any, ...]:
        exporter = InMemorySpanExporter()
        provider = TracerProvider(shutdown_on_exit=False)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        classes: list[Any] = []
        with otel.instrument(tracer_provider=provider):
            tasks = run_tasks(anyio_backend, False, FALLBACK_PLAN, False, setup=classes.append)
            tracked = run_tracked(anyio_backend, FALLBACK_TRACK, setup=classes.append)
        provider.shutdown()
        # Each run has traces of its own: the samples keep whether they have an exemplar.
        tasks, tracked = (
            (ends, [(*sample[:3], sample[3] is not None) for sample in samples], events)
            for ends, samples, events in (tasks, tracked)
        )
        spans = [
            (span.name, sorted((span.attributes or {}).items()), span.status.status_code)
            for span in exporter.get_finished_spans()
        ]
        return tasks, tracked, spans

    slow, _ = both_ways(monkeypatch, taken, run, (*TASK_PATHS, "_move"))
    names = {name for name, _, _ in slow[2]}
    assert {"Jobs start", "Jobs succeed", "Worker start", "Worker finish"} <= names, names


def test_a_fused_call_s_machine_is_what_construction_and_start_make(
    monkeypatch: pytest.MonkeyPatch, taken: Taken
) -> None:
    """Every slot `MeteredMachine.__init__` sets is set on a machine made started, as
    ``cls(labels=...)`` then ``start`` would have; it ends closed, in ``succeeded``."""
    fusing(monkeypatch, True)
    cls, _ = task_class(True)
    slots = [name for name in MeteredMachine.__slots__ if name != "__weakref__"]
    seen: dict[str, Any] = {}

    @cls.task(labels=lambda: {"shard": "a"})
    async def job() -> TaskMachine:
        machine = cls.current()
        seen.update((name, getattr(machine, name)) for name in slots)
        seen["labels"], seen["closed"] = machine.labels, machine.closed
        return machine

    async def main() -> tuple[TaskMachine, dict[str, Any]]:
        machine = await job()
        reference = cls(labels={"shard": "a"})
        await reference.trigger("start")
        made = {name: getattr(reference, name) for name in slots}
        made["labels"], made["closed"] = reference.labels, reference.closed
        await reference.aclose()
        return machine, made

    machine, made = anyio.run(main)
    assert taken.counts == {"_attach_moved": 1, "_detach_moved": 1, "_move": 0}
    for different in ("_token", "_series"):
        assert seen.pop(different) != made.pop(different)
    assert seen == made
    assert (machine.state, machine.closed) == ("succeeded", True)
