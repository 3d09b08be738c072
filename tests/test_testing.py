"""`statemachine_metrics.testing`: recording transitions, assertions, reading metrics."""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
import weakref
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from statemachine_metrics import MachineError, MeteredMachine, TaskMachine, TransitionSpec
from statemachine_metrics.testing import (
    MachineMetrics,
    RecordedTransition,
    Recorder,
    record,
    reset_metrics,
)

pytestmark = pytest.mark.anyio


class Worker(MeteredMachine, namespace="test_testing", labelnames=("worker",), registry=None):
    """State of a test worker"""

    states = ["idle", "running", "error"]
    transitions = [
        ["start", "idle", "running"],
        ["finish", "running", "idle"],
        ["fail", ["idle", "running"], "error"],
        ["reset", "error", "idle"],
        ["heartbeat", "running", None],  # internal: callbacks run, the state stays
        ["restart", "running", "="],  # reflexive: leaves and re-enters running
        {"trigger": "start_if", "source": "idle", "dest": "running", "conditions": "allowed"},
    ]

    allowed = False


class EagerWorker(Worker):
    """Shares Worker's machine and metrics; finishes as soon as it starts."""

    async def on_enter_running(self) -> None:
        await self.finish()


class Job(MeteredMachine, namespace="test_testing", registry=None):
    states = ["queued", "done"]
    transitions = [["run", "queued", "done"]]


class Template(MeteredMachine):
    """No states: a base class for machines, with no metrics of its own."""

    async def on_enter_on(self) -> None:
        pass


class Lamp(Template, registry=None):
    states = ["off", "on"]
    transitions = [["flip", "off", "on"], ["flop", "on", "off"]]


def worker(name: str = "w", **kwargs: Any) -> Worker:
    return Worker(labels={"worker": name}, **kwargs)


def fresh_worker_class() -> type[MeteredMachine]:
    """Worker's definition in a class of its own, whose metrics start at zero."""

    class Fresh(MeteredMachine, labelnames=("worker",), registry=None):
        states = Worker.states
        transitions = Worker.transitions
        allowed = False

    return Fresh


# -- recording -----------------------------------------------------------------------------


async def test_records_each_transition_with_machine_trigger_states_and_time() -> None:
    w = worker()
    before = time.time()
    with record(w) as recorder:
        await w.start()
        await w.finish()
    after = time.time()

    first, second = recorder.transitions
    assert first.machine is w
    assert (first.trigger, first.source, first.dest) == ("start", "idle", "running")
    assert (second.trigger, second.source, second.dest) == ("finish", "running", "idle")
    assert not first.internal
    assert not second.internal
    assert before <= first.time <= second.time <= after
    assert str(first) == "start: idle -> running"


async def test_an_instance_target_records_that_machine_only() -> None:
    w, other = worker("w"), worker("other")
    with record(w) as recorder:
        await other.start()
        await w.start()
    assert [t.machine for t in recorder.transitions] == [w]
    with pytest.raises(ValueError, match="is not recorded here"):
        recorder.path(other)


async def test_a_class_target_covers_subclasses_and_machines_created_while_recording() -> None:
    before = worker("before")
    job = Job()
    with record(Worker) as recorder:
        await before.start()
        during = worker("during")
        await during.start()
        eager = EagerWorker(labels={"worker": "eager"})
        await eager.start()
        await job.run()
    assert recorder.machines == [before, during, eager]
    assert recorder.path(eager) == ["idle", "running", "idle"]
    with pytest.raises(ValueError, match="records Worker machines"):
        recorder.path(job)


async def test_an_abstract_class_target_covers_its_concrete_subclasses() -> None:
    lamp = Lamp()
    with record(Template) as recorder:
        await lamp.flip()
    assert recorder.path(lamp) == ["off", "on"]


async def test_a_task_machine_class_target_records_every_call() -> None:
    class Fetch(TaskMachine, registry=None):
        pass

    @Fetch.task
    async def fetch(fail: bool) -> None:
        if fail:
            raise ValueError("failed")

    with record(Fetch) as recorder:
        await fetch(False)
        with pytest.raises(ValueError, match="failed"):
            await fetch(True)
    succeeded, failed = recorder.machines
    recorder.assert_path(succeeded, ["pending", "running", "succeeded"])
    recorder.assert_path(failed, ["pending", "running", "failed"])


async def test_no_target_records_every_machine() -> None:
    w, job = worker(), Job()
    with record() as recorder:
        await w.start()
        await job.run()
    assert recorder.machines == [w, job]
    assert recorder.path(job) == ["queued", "done"]


async def test_nothing_is_recorded_outside_the_block() -> None:
    w = worker()
    recorder = record(w)
    await w.start()
    with recorder:
        await w.finish()
    await w.start()
    assert recorder.triggers(w) == ["finish"]
    assert recorder.path(w) == ["running", "idle"]


async def test_internal_transitions_keep_the_state_and_stay_out_of_the_path() -> None:
    w = worker()
    with record(w) as recorder:
        await w.start()
        await w.heartbeat()
        await w.restart()
    internal, reflexive = recorder.transitions[1:]
    assert (internal.source, internal.dest, internal.internal) == ("running", "running", True)
    assert (reflexive.source, reflexive.dest, reflexive.internal) == ("running", "running", False)
    assert str(internal) == "heartbeat: running -> running (internal)"
    assert recorder.triggers(w) == ["start", "heartbeat", "restart"]
    assert recorder.path(w) == ["idle", "running", "running"]


async def test_a_transition_stopped_by_a_condition_is_not_recorded() -> None:
    w = worker()
    with record(w) as recorder:
        assert not await w.start_if()
        with pytest.raises(MachineError):
            await w.finish()
    recorder.assert_no_transitions()
    assert recorder.path(w) == ["idle"]


async def test_the_path_starts_where_each_machine_was_when_recording_began() -> None:
    moved, unmoved_target, unmoved = worker("moved"), worker("target"), worker("unmoved")
    await moved.start()
    await unmoved_target.fail()
    await unmoved.start()
    with record(moved, unmoved_target, Worker) as recorder:
        await moved.heartbeat()  # internal: the path stays ["running"] until now
        assert recorder.path(moved) == ["running"]
        await moved.finish()
        restored = worker("restored", initial="error")
        await restored.reset()
        created = worker("created")
    # Moved after recording: the recorder knew unmoved_target's state when it began; a
    # machine watched through its class and never recorded shows its current state.
    await unmoved_target.reset()
    assert recorder.path(moved) == ["running", "idle"]
    assert recorder.path(unmoved_target) == ["error"]
    assert recorder.path(unmoved) == ["running"]
    assert recorder.path(restored) == ["error", "idle"]
    assert recorder.path(created) == ["idle"]


async def test_a_trigger_fired_from_a_callback_is_recorded_in_the_order_states_changed() -> None:
    eager = EagerWorker(labels={"worker": "eager"})
    with record(eager) as recorder:
        await eager.start()
    assert recorder.triggers(eager) == ["start", "finish"]
    assert [(t.source, t.dest) for t in recorder.transitions] == [
        ("idle", "running"),
        ("running", "idle"),
    ]


async def test_clear_forgets_and_starts_the_paths_again() -> None:
    w = worker()
    with record(w) as recorder:
        await w.start()
        recorder.clear()
        assert recorder.transitions == []
        assert recorder.path(w) == ["running"]
        await w.finish()
    assert recorder.path(w) == ["running", "idle"]


def test_records_are_immutable() -> None:
    entry = RecordedTransition(worker(), "start", "idle", "running", False, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.dest = "error"  # type: ignore[misc]


def test_targets_must_be_machines_or_machine_classes() -> None:
    with pytest.raises(TypeError, match="record\\(\\) takes machines and MeteredMachine classes"):
        record(Worker, "idle")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="record\\(\\) takes"):
        record(int)  # type: ignore[arg-type]


def test_a_recorder_records_once() -> None:
    with record() as recorder:
        with pytest.raises(RuntimeError, match="records once"):
            recorder.__enter__()
        assert recorder.recording
    assert not recorder.recording
    with pytest.raises(RuntimeError, match="records once"), recorder:
        pass


# -- cost and concurrency ------------------------------------------------------------------


def recorder_listeners() -> int:
    """How many listeners of the testing module every machine calls after a transition."""
    listeners = MeteredMachine._own_listeners
    return sum(fn.__module__ == "statemachine_metrics.testing" for fn in listeners)


def test_the_listener_is_added_only_while_a_recorder_is_active() -> None:
    assert recorder_listeners() == 0
    with record() as outer:
        assert recorder_listeners() == 1
        with record(Worker):
            assert recorder_listeners() == 1  # one listener for all recorders
        assert recorder_listeners() == 1
        assert outer.recording
    assert recorder_listeners() == 0
    with pytest.raises(KeyError), record():
        raise KeyError("the block failed")
    assert recorder_listeners() == 0


async def test_nested_recorders_each_see_their_own_targets() -> None:
    a, b = worker("a"), worker("b")
    with record() as everything:
        await a.start()
        with record(b) as only_b:
            await a.finish()
            await b.start()
        await b.finish()
    assert everything.triggers(a) == ["start", "finish"]
    assert everything.triggers(b) == ["start", "finish"]
    assert only_b.triggers(b) == ["start"]
    assert only_b.transitions[0] is everything.transitions[2]  # one record, shared


async def test_recorders_in_concurrent_tasks() -> None:
    recorders: dict[str, Recorder] = {}

    async def run(name: str) -> None:
        w = worker(name)
        with record(w) as recorder:
            recorders[name] = recorder
            for _ in range(20):
                await w.start()
                await anyio.lowlevel.checkpoint()
                await w.finish()

    async with anyio.create_task_group() as group:
        for name in ("a", "b", "c"):
            group.start_soon(run, name)
    for recorder in recorders.values():
        (machine,) = recorder.machines
        recorder.assert_path(machine, ["idle", *["running", "idle"] * 20])
    assert recorder_listeners() == 0


def test_recorders_in_concurrent_threads() -> None:
    threads = 8
    barrier = threading.Barrier(threads)
    results: list[list[str]] = []
    failures: list[BaseException] = []

    async def run(index: int) -> None:
        w = worker(f"t{index}")
        barrier.wait()  # every thread starts and stops recorders at the same time
        for _ in range(30):
            with record(w) as recorder:
                await w.start()
                await w.finish()
            results.append(recorder.path(w))

    def thread(index: int) -> None:
        try:
            anyio.run(run, index)
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    workers = [threading.Thread(target=thread, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert failures == []
    assert results == [["idle", "running", "idle"]] * (threads * 30)
    assert recorder_listeners() == 0


async def test_a_recorder_keeps_what_it_recorded_alive_until_dropped() -> None:
    recorded, untouched = worker("recorded"), worker("untouched")
    with record(recorded, untouched) as recorder:
        await recorded.start()
    recorded_ref, untouched_ref = weakref.ref(recorded), weakref.ref(untouched)
    del recorded, untouched
    gc.collect()
    assert recorded_ref() is not None
    assert untouched_ref() is None  # a target that made no transition is not held
    del recorder
    gc.collect()
    assert recorded_ref() is None


# -- assertions ----------------------------------------------------------------------------


async def test_assert_path_and_assert_triggers_pass_on_what_happened() -> None:
    w = worker()
    with record(w) as recorder:
        await w.start()
        await w.fail()
        await w.reset()
    recorder.assert_path(w, ["idle", "running", "error", "idle"])
    recorder.assert_path(w, ("idle", "running", "error", "idle"))
    recorder.assert_triggers(w, ["start", "fail", "reset"])


async def test_assert_path_failure_shows_both_paths_where_they_diverge_and_the_record() -> None:
    w = worker("w1")
    with record(w) as recorder:
        await w.start()
        await w.heartbeat()
        await w.fail()
        await w.reset()
    with pytest.raises(AssertionError) as failure:
        recorder.assert_path(w, ["idle", "running", "idle"])
    assert str(failure.value) == (
        "unexpected path of <Worker state='idle' labels={'worker': 'w1'}>\n"
        "  expected: idle -> running -> idle\n"
        "  actual:   idle -> running -> error -> idle\n"
        "                               ^^^^^\n"
        "first difference at index 2: expected 'idle', got 'error'\n"
        "recorded transitions of it:\n"
        "  1. start: idle -> running\n"
        "  2. heartbeat: running -> running (internal)\n"
        "  3. fail: running -> error\n"
        "  4. reset: error -> idle"
    )


async def test_assert_path_failure_when_one_path_is_a_prefix_of_the_other() -> None:
    w = worker()
    with record(w) as recorder:
        await w.start()
    with pytest.raises(AssertionError, match="index 2: expected 'idle', but the actual path ends"):
        recorder.assert_path(w, ["idle", "running", "idle"])
    with pytest.raises(AssertionError, match="index 1: expected the end, got 'running'\n"):
        recorder.assert_path(w, ["idle"])


async def test_assert_path_hints_at_names_that_are_not_states() -> None:
    w = worker()
    with record(w) as recorder:
        await w.start()
    with pytest.raises(AssertionError) as failure:
        recorder.assert_path(w, ["idle", "runing"])
    hint = "hint: 'runing' is not a state of Worker; its states are idle, running, error"
    assert hint in str(failure.value)


async def test_assert_triggers_failure() -> None:
    w = worker("w1")
    with record(w) as recorder:
        await w.start()
        await w.finish()
    with pytest.raises(AssertionError) as failure:
        recorder.assert_triggers(w, ["start", "stop"])
    message = str(failure.value)
    assert message.startswith(
        "unexpected triggers of <Worker state='idle' labels={'worker': 'w1'}>\n"
        "  expected: start, stop\n"
        "  actual:   start, finish\n"
        "                   ^^^^^^\n"
        "first difference at index 1: expected 'stop', got 'finish'\n"
        "hint: 'stop' is not a trigger of Worker; its triggers are start, finish, "
    )
    with pytest.raises(AssertionError, match=r"expected the end, got 'start' \(then 1 more\)"):
        recorder.assert_triggers(w, [])


async def test_assert_no_transitions() -> None:
    w, other = worker("w1"), worker("other")
    with record() as recorder:
        recorder.assert_no_transitions()
        await other.start()
    recorder.assert_no_transitions(w)
    with pytest.raises(AssertionError) as failure:
        recorder.assert_no_transitions()
    assert str(failure.value) == (
        "expected no transitions, 1 recorded:\n"
        "  1. <Worker state='running' labels={'worker': 'other'}> start: idle -> running"
    )
    with pytest.raises(AssertionError, match="1 recorded"):
        recorder.assert_no_transitions(w, other)


def test_assertions_take_a_list_of_names() -> None:
    w = worker()
    with record(w) as recorder:
        pass
    with pytest.raises(TypeError, match="takes a list of state names, not 'idle'"):
        recorder.assert_path(w, "idle")
    with pytest.raises(TypeError, match="takes a list of trigger names"):
        recorder.assert_triggers(w, "start")


async def test_uncovered_transitions() -> None:
    w = worker()
    with record(Worker) as recorder:
        await w.start()
        await w.heartbeat()
        await w.restart()
        await w.fail()
        await w.reset()
    assert recorder.uncovered_transitions(Worker) == [
        TransitionSpec("finish", "running", "idle"),
        TransitionSpec("fail", "idle", "error"),
        TransitionSpec("start_if", "idle", "running"),
    ]
    with pytest.raises(TypeError):
        recorder.uncovered_transitions(w)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    backend=st.sampled_from(["asyncio", "trio"]),
    triggers=st.lists(st.sampled_from(Worker.trigger_names()), max_size=15),
)
def test_path_and_triggers_follow_any_sequence_of_triggers(
    backend: str, triggers: list[str]
) -> None:
    Fresh = fresh_worker_class()
    metrics = MachineMetrics()

    async def main() -> None:
        w = Fresh(labels={"worker": "w"})
        states, ran = [w.state], []
        with record(Fresh) as recorder:
            for trigger in triggers:
                try:
                    changed = await w.trigger(trigger)
                except MachineError:
                    continue
                if changed:
                    ran.append(trigger)
                    if trigger != "heartbeat":
                        states.append(w.state)
        recorder.assert_path(w, states)
        recorder.assert_triggers(w, ran)
        assert metrics.transitions(Fresh) == len(recorder.transitions) == len(ran)

    anyio.run(main, backend=backend)


# -- metrics -------------------------------------------------------------------------------


async def test_machine_metrics_reads_counters_gauges_states_and_histograms() -> None:
    Fresh = fresh_worker_class()
    metrics = MachineMetrics()
    a, b = Fresh(labels={"worker": "a"}), Fresh(labels={"worker": "b"})
    await a.start()
    await a.fail()
    await b.fail()
    await b.reset()
    await b.start()
    await b.heartbeat()

    assert metrics.transitions(Fresh) == 6
    assert metrics.transitions(Fresh, "fail") == 2
    assert metrics.transitions(Fresh, "fail", source="idle") == 1
    assert metrics.transitions(Fresh, dest="running") == 3  # the internal one included
    assert metrics.value(Fresh, "transitions_total", source="running", to="error") == 1
    assert metrics.value(Fresh, "transitions_total", **{"from": "error"}) == 1
    assert metrics.count(Fresh) == 2
    assert metrics.count(Fresh, "error") == 1
    assert metrics.count(Fresh, "running") == 1
    assert metrics.count(Fresh, "idle") == 0
    assert metrics.state(Fresh, worker="a") == "error"
    assert metrics.state(Fresh, worker="b") == "running"
    assert metrics.value(Fresh, "", worker="a", state="error") == 1
    assert metrics.value(Fresh, "duration_seconds_count", state="idle") == 3
    assert metrics.value(Fresh, "duration_seconds_count") == 5
    assert metrics.value(Fresh, "duration_seconds_bucket", state="idle", le=float("inf")) == 3
    assert metrics.value(Fresh, "duration_seconds_sum", state="idle") > 0
    full = Fresh.metric_names()[2]
    assert metrics.value(Fresh, full, trigger="fail") == 2


async def test_machine_metrics_counts_errors() -> None:
    Fresh = fresh_worker_class()
    metrics = MachineMetrics()
    w = Fresh(labels={"worker": "w"})
    assert metrics.errors(Fresh) == 0
    with pytest.raises(MachineError):
        await w.finish()
    assert metrics.errors(Fresh) == 1
    assert metrics.errors(Fresh, "finish", error=MachineError) == 1
    assert metrics.errors(Fresh, error="MachineError") == 1
    assert metrics.errors(Fresh, "start") == 0
    assert metrics.errors(Fresh, error=KeyError) == 0


async def test_a_closed_machine_series_reads_as_none() -> None:
    Fresh = fresh_worker_class()
    metrics = MachineMetrics()
    w = Fresh(labels={"worker": "w"})
    assert metrics.state(Fresh, worker="w") == "idle"
    await w.aclose()
    assert metrics.state(Fresh, worker="w") is None
    assert metrics.count(Fresh) == 0


def test_machine_metrics_reads_a_class_without_labels() -> None:
    metrics = MachineMetrics()
    job = Job()
    assert metrics.state(Job) == "queued"
    assert metrics.count(Job, "queued") >= 1
    del job


@pytest.mark.parametrize(
    ("read", "message"),
    [
        (
            lambda m: m.value(Worker, "duration_seconds"),
            "no metric 'duration_seconds' \\(a histogram: read its _count, _sum or _bucket\\)",
        ),
        (lambda m: m.value(Worker, "transitions"), "a counter: read transitions_total"),
        (lambda m: m.value(Worker, "nope"), "its metrics are '' \\(the Enum\\), 'machines'"),
        (
            lambda m: m.value(Worker, "transitions_total", worker="w"),
            "no label 'worker'; their labels are from \\(source=\\), to \\(dest=\\), trigger",
        ),
        (
            lambda m: m.transitions(Worker, "strat"),
            "'strat' is not a trigger of Worker; its triggers are start, finish",
        ),
        (
            lambda m: m.count(Worker, "runing"),
            "'runing' is not a state of Worker; its states are idle, running, error",
        ),
        (lambda m: m.state(Worker), "exactly these labels: worker; got none"),
        (lambda m: m.state(Job, job="x"), "exactly these labels: none; got job"),
    ],
)
def test_machine_metrics_names_what_is_valid(read: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read(MachineMetrics())


def test_machine_metrics_takes_machine_classes_with_metrics() -> None:
    with pytest.raises(TypeError, match="takes a MeteredMachine class"):
        MachineMetrics().count(worker())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Template is abstract"):
        MachineMetrics().count(Template)


async def test_reset_metrics_zeroes_counters_and_histograms_not_live_counts() -> None:
    Fresh, Other = fresh_worker_class(), fresh_worker_class()
    metrics = MachineMetrics()
    w, other = Fresh(labels={"worker": "w"}), Other(labels={"worker": "o"})
    await w.start()
    await other.start()
    with pytest.raises(MachineError):
        await w.reset()

    reset_metrics(Fresh)
    assert metrics.transitions(Fresh) == 0
    assert metrics.errors(Fresh) == 0
    assert metrics.value(Fresh, "duration_seconds_count") == 0
    assert metrics.value(Fresh, "duration_seconds_sum") == 0
    assert metrics.count(Fresh, "running") == 1  # live: not reset
    assert metrics.state(Fresh, worker="w") == "running"
    assert metrics.transitions(Other) == 1  # another class: untouched

    metrics.reset()  # every class
    assert metrics.transitions(Other) == 0
    with pytest.raises(TypeError, match="reset_metrics\\(\\) takes a MeteredMachine class"):
        reset_metrics(w)  # type: ignore[arg-type]


async def test_histograms_after_reset_metrics_count_every_path() -> None:
    """The time-in-state and trigger-latency buckets go on counting after a reset, on the
    bare step, the compiled one (a condition) and a task's fused lifecycle alike."""
    registry = CollectorRegistry()

    class Checked(MeteredMachine, registry=registry):
        states = ["idle", "running"]
        transitions = [
            ["start", "idle", "running"],
            {"trigger": "finish", "source": "running", "dest": "idle", "conditions": "ok"},
        ]

        def ok(self) -> bool:
            return True

    class Calls(TaskMachine, registry=registry):
        pass

    @Calls.task
    async def call() -> None:
        pass

    def counted(cls: type[MeteredMachine], metric: str, label: str) -> float | None:
        """The +Inf bucket of the time in state `label` or of the trigger `label`."""
        names = cls.metric_names()
        if metric == "trigger":
            name, labels = names[-1], {"trigger": label}
        else:
            name, labels = names[3], {names[0]: label}
        return registry.get_sample_value(f"{name}_bucket", {**labels, "le": "+Inf"})

    w = Checked()
    await w.start()
    await w.finish()
    await call()
    reset_metrics(Checked)
    reset_metrics(Calls)
    assert counted(Checked, "trigger", "finish") == 0

    await w.start()  # bare
    await w.finish()  # compiled: its condition runs
    await call()
    assert counted(Checked, "state", "idle") == 1
    assert counted(Checked, "state", "running") == 1
    assert counted(Checked, "trigger", "start") == 1
    assert counted(Checked, "trigger", "finish") == 1
    assert counted(Calls, "state", "pending") == 1
    assert counted(Calls, "state", "running") == 1
    assert counted(Calls, "trigger", "start") == 1
    assert counted(Calls, "trigger", "succeed") == 1
