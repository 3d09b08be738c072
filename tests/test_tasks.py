"""`machine.track()`, `TaskMachine` and state timeouts, on asyncio and trio."""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import math
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from statemachine_metrics import MachineError, MeteredMachine, TaskMachine

pytestmark = pytest.mark.anyio


class Boom(Exception):
    pass


WORKER_TRANSITIONS: list[Any] = [
    ["start", "idle", "running"],
    ["finish", "running", "idle"],
    ["fail", ["idle", "running"], "error"],
    ["abort", "running", "idle"],
    ["reset", "error", "idle"],
    ["touch", "running", "running"],
    ["ping", "running", None],
]


def worker_class(
    timeouts: Mapping[str, Any] | None = None, /, **members: Any
) -> tuple[Any, CollectorRegistry]:
    """A fresh Worker class (idle/running/error) with its own registry; instances keep
    the states they went through in `.path`."""
    registry = CollectorRegistry()

    def __init__(self: Any, **kwargs: Any) -> None:
        MeteredMachine.__init__(self, **kwargs)
        self.path = [self.state]

    def noted(self: Any) -> None:
        self.path.append(self.state)

    namespace: dict[str, Any] = {
        "__doc__": "Current state of the background worker",
        "states": [{"name": s, "on_enter": "noted"} for s in ("idle", "running", "error")],
        "transitions": WORKER_TRANSITIONS,
        "timeouts": dict(timeouts or {}),
        "__init__": __init__,
        "noted": noted,
        **members,
    }
    cls = type(MeteredMachine)("Worker", (MeteredMachine,), namespace, registry=registry)
    return cls, registry


def counted(registry: CollectorRegistry, source: str, dest: str, trigger: str) -> float:
    value = registry.get_sample_value(
        "worker_state_transitions_total", {"from": source, "to": dest, "trigger": trigger}
    )
    assert value is not None
    return value


def errors(registry: CollectorRegistry, base: str, trigger: str, error: str) -> float:
    value = registry.get_sample_value(f"{base}_errors_total", {"trigger": trigger, "error": error})
    return 0.0 if value is None else value


async def wait_until(predicate: Callable[[], bool], within: float = 2.0) -> None:
    with anyio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 (polls a machine's state)
            await anyio.sleep(0.005)


# -- track(): decorator ----------------------------------------------------------------


async def test_track_decorator_fires_enter_then_success() -> None:
    cls, registry = worker_class()
    worker = cls()
    seen = []

    @worker.track(enter="start", success="finish", error="fail")
    async def job(n: int, *, scale: float = 1.0) -> float:
        """Process a job."""
        seen.append(worker.state)
        await anyio.lowlevel.checkpoint()
        return n * scale

    assert await job(2, scale=1.5) == 3.0
    assert await job(1) == 1.0
    assert seen == ["running", "running"]
    assert worker.path == ["idle", "running", "idle", "running", "idle"]
    assert counted(registry, "running", "idle", "finish") == 2


def test_track_decorator_keeps_the_function_identity() -> None:
    cls, _ = worker_class()

    async def job(n: int, *, scale: float = 1.0) -> float:
        """Process a job."""
        return n * scale

    tracked = cls().track("start", "finish")(job)
    assert tracked.__name__ == "job"
    assert tracked.__qualname__ == job.__qualname__
    assert tracked.__doc__ == "Process a job."
    assert tracked.__wrapped__ is job  # type: ignore[attr-defined]
    assert inspect.signature(tracked) == inspect.signature(job)
    assert inspect.iscoroutinefunction(tracked)


async def test_track_decorator_error_fires_error_and_reraises() -> None:
    cls, registry = worker_class()
    worker = cls()
    boom = Boom("job failed")

    @worker.track(enter="start", success="finish", error="fail")
    async def job() -> None:
        await anyio.lowlevel.checkpoint()
        raise boom

    with pytest.raises(Boom) as caught:
        await job()
    assert caught.value is boom
    assert worker.state == "error"
    assert counted(registry, "running", "error", "fail") == 1
    assert counted(registry, "running", "idle", "finish") == 0


async def test_track_without_error_trigger_leaves_the_state_on_exception() -> None:
    cls, _ = worker_class()
    worker = cls()

    @worker.track(enter="start", success="finish")
    async def job() -> None:
        raise Boom

    with pytest.raises(Boom):
        await job()
    assert worker.path == ["idle", "running"]


def test_track_decorates_only_coroutine_functions() -> None:
    cls, _ = worker_class()
    track = cls().track("start", "finish")

    def sync_job() -> None:
        pass

    with pytest.raises(TypeError, match=r"Worker\.track\(\) decorates coroutine functions"):
        track(sync_job)


# -- track(): async with ---------------------------------------------------------------


async def test_track_as_context_manager() -> None:
    cls, _ = worker_class()
    worker = cls()
    track = worker.track(enter="start", success="finish", error="fail")
    async with track:
        assert worker.state == "running"
    with pytest.raises(Boom):
        async with track:
            raise Boom
    assert worker.path == ["idle", "running", "idle", "running", "error"]


async def test_track_enter_failure_skips_the_body() -> None:
    cls, _ = worker_class()
    worker = cls()
    await worker.fail()  # error: 'start' is not allowed
    ran = False
    with pytest.raises(MachineError):
        async with worker.track(enter="start", success="finish", error="fail"):
            ran = True
    assert not ran
    assert worker.path == ["idle", "error"]


async def test_track_condition_stopping_a_trigger_is_not_an_error() -> None:
    cls, _ = worker_class(
        transitions=[
            ["start", "idle", "running"],
            {"trigger": "finish", "source": "running", "dest": "idle", "unless": "busy"},
        ],
        busy=lambda self: True,
    )
    worker = cls()
    async with worker.track("start", "finish"):
        pass
    assert worker.path == ["idle", "running"]


async def test_track_lets_baseexceptions_through_without_triggers() -> None:
    cls, _ = worker_class()
    worker = cls()
    with pytest.raises(SystemExit):
        async with worker.track("start", "finish", error="fail", cancel="abort"):
            raise SystemExit(3)
    assert worker.path == ["idle", "running"]


# -- track(): cancellation -------------------------------------------------------------


def slow_enter_error() -> dict[str, Any]:
    """Members making the error state's on_enter await: it only completes shielded."""

    async def on_enter_error(self: Any) -> None:
        await anyio.sleep(0.01)
        self.path.append("error entered")

    return {"on_enter_error": on_enter_error}


async def test_track_cancelled_in_the_middle_fires_cancel_shielded() -> None:
    cls, registry = worker_class()
    worker = cls()
    reached = []

    @worker.track(enter="start", success="finish", error="fail", cancel="abort")
    async def job() -> None:
        reached.append("body")
        await anyio.sleep(5)
        reached.append("end")  # never

    with anyio.move_on_after(0.02) as scope:
        await job()
    assert scope.cancelled_caught  # the cancellation went through to its scope
    assert reached == ["body"]
    assert worker.path == ["idle", "running", "idle"]
    assert counted(registry, "running", "idle", "abort") == 1


async def test_track_cancel_falls_back_to_error_and_runs_async_callbacks_shielded() -> None:
    cls, _ = worker_class(**slow_enter_error())
    worker = cls()

    async def job() -> None:
        async with worker.track(enter="start", success="finish", error="fail"):
            await anyio.sleep(5)

    async with anyio.create_task_group() as group:
        group.start_soon(job)
        await wait_until(worker.is_running)
        group.cancel_scope.cancel()
    assert worker.path == ["idle", "running", "error", "error entered"]


async def test_track_cancelled_without_cancel_or_error_fires_nothing() -> None:
    cls, _ = worker_class()
    worker = cls()
    with anyio.move_on_after(0.01) as scope:
        async with worker.track(enter="start", success="finish"):
            await anyio.sleep(5)
    assert scope.cancelled_caught
    assert worker.path == ["idle", "running"]


async def test_track_cancelled_while_waiting_to_record_success_records_the_cancel() -> None:
    # The body returns, but `finish` waits for a slow transition; the caller's deadline
    # passes meanwhile. The caller sees a cancellation: the machine records `abort`.
    async def slow_ping(self: Any) -> None:
        await anyio.sleep(0.1)

    transitions = [
        *WORKER_TRANSITIONS[:-1],
        {"trigger": "ping", "source": "running", "dest": None, "before": "slow_ping"},
    ]
    cls, _ = worker_class(transitions=transitions, slow_ping=slow_ping)
    worker = cls()

    async with anyio.create_task_group() as group:
        with anyio.move_on_after(0.05) as scope:
            async with worker.track("start", "finish", error="fail", cancel="abort"):
                group.start_soon(worker.ping)
                await anyio.sleep(0.01)
        assert scope.cancelled_caught
    assert worker.path == ["idle", "running", "idle"]
    assert worker.state == "idle"


async def test_track_failing_cancel_trigger_is_logged_and_the_cancellation_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cls, _ = worker_class()
    worker = cls()
    with anyio.move_on_after(0.01) as scope:
        async with worker.track("start", "finish", cancel="reset"):  # reset: error only
            await anyio.sleep(5)
    assert scope.cancelled_caught
    assert worker.state == "running"
    [record] = [r for r in caplog.records if r.name == "statemachine_metrics"]
    assert record.levelno == logging.ERROR
    assert "'reset', fired because the body was cancelled, raised" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], MachineError)


# -- track(): a failing trigger on the way out ------------------------------------------


async def test_track_error_trigger_failure_is_chained_from_the_body_exception() -> None:
    cls, registry = worker_class()
    worker = cls()
    boom = Boom("the body's own error")

    @worker.track(enter="start", success="finish", error="fail")
    async def job() -> None:
        await worker.fail()  # the body moves on its own: 'fail' from error is invalid
        raise boom

    with pytest.raises(MachineError) as caught:
        await job()
    assert caught.value.__cause__ is boom
    assert errors(registry, "worker_state", "fail", "MachineError") == 1


async def test_track_success_trigger_failure_propagates_unchained() -> None:
    cls, _ = worker_class()
    worker = cls()
    with pytest.raises(MachineError) as caught:
        async with worker.track(enter="start", success="finish"):
            await worker.finish()
    assert caught.value.__cause__ is None


async def test_track_trigger_callback_error_is_chained_too() -> None:
    def on_enter_error(self: Any) -> None:
        raise KeyError("callback")

    cls, _ = worker_class(on_enter_error=on_enter_error)
    worker = cls()
    boom = Boom()
    with pytest.raises(KeyError) as caught:
        async with worker.track("start", "finish", error="fail"):
            raise boom
    assert caught.value.__cause__ is boom
    assert worker.state == "error"  # the state changed before the callback raised


# -- track(): validation ----------------------------------------------------------------


def test_track_checks_trigger_names_when_called() -> None:
    cls, _ = worker_class()
    worker = cls()
    with pytest.raises(ValueError, match="unknown trigger 'strat' for enter") as caught:
        worker.track(enter="strat", success="finish")
    message = str(caught.value)
    assert message.startswith("Worker.track(): ")
    assert "triggers are start, finish, fail, abort, reset, touch, ping" in message
    with pytest.raises(ValueError, match="unknown trigger 'oops' for cancel"):
        worker.track("start", "finish", cancel="oops")
    with pytest.raises(ValueError, match="unknown trigger 'is_idle' for error"):
        worker.track("start", "finish", error="is_idle")
    with pytest.raises(TypeError, match="expected a trigger name for success, got None"):
        worker.track("start", None)  # type: ignore[arg-type]
    assert worker.path == ["idle"]


# -- TaskMachine -----------------------------------------------------------------------


def task_class(**keywords: Any) -> tuple[Any, CollectorRegistry]:
    registry = CollectorRegistry()
    namespace: dict[str, Any] = keywords.pop("members", {})
    cls = type(TaskMachine)("Fetch", (TaskMachine,), namespace, registry=registry, **keywords)
    return cls, registry


def task_counts(registry: CollectorRegistry, base: str = "fetch_state") -> dict[str, float]:
    counts = {}
    for state in TaskMachine.states:
        value = registry.get_sample_value(f"{base}_machines", {base: state})
        assert value is not None
        counts[state] = value
    return counts


def task_moves(registry: CollectorRegistry, base: str = "fetch_state") -> dict[str, float]:
    moves = {}
    for family in registry.collect():
        if family.name == f"{base}_transitions":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.value:
                    labels = sample.labels
                    moves[f"{labels['from']}>{labels['to']}"] = sample.value
    return moves


def test_task_machine_is_a_template() -> None:
    assert TaskMachine.state_names() == ("pending", "running", "succeeded", "failed", "cancelled")
    assert TaskMachine.trigger_names() == ("start", "succeed", "fail", "cancel")
    assert TaskMachine.metric_names() == ()
    with pytest.raises(TypeError, match="TaskMachine is abstract"):
        TaskMachine()
    with pytest.raises(TypeError, match="TaskMachine is a template without metrics"):

        @TaskMachine.task
        async def job() -> None:
            pass


def test_task_machine_subclass_gets_its_own_metrics() -> None:
    registry = CollectorRegistry()

    class Fetch(TaskMachine, namespace="myapp", registry=registry):
        pass

    class Parse(TaskMachine, registry=registry):
        """Parsing jobs"""

    assert Fetch.metric_names()[0] == "myapp_fetch_state"
    assert Parse.metric_names()[0] == "parse_state"
    assert Fetch.metric is not Parse.metric
    assert Parse.metric._documentation == "Parsing jobs"
    assert Fetch.final_states == frozenset({"succeeded", "failed", "cancelled"})
    transitions = {(t.trigger, t.source, t.dest) for t in Fetch.transition_table()}
    assert ("fail", "pending", "failed") in transitions
    assert ("cancel", "pending", "cancelled") in transitions
    assert registry.get_sample_value("myapp_fetch_state", {"myapp_fetch_state": "pending"}) == 1


async def test_task_success_runs_in_a_fresh_machine_closed_afterwards() -> None:
    cls, registry = task_class()
    machines = []

    @cls.task
    async def fetch(url: str, *, retries: int = 3) -> str:
        """Fetch a URL."""
        machine = cls.current()
        assert machine.state == "running"
        assert task_counts(registry)["running"] == 1
        machines.append(machine)
        await anyio.lowlevel.checkpoint()
        return url.upper()

    assert fetch.__name__ == "fetch"
    assert fetch.__doc__ == "Fetch a URL."
    assert str(inspect.signature(fetch)) == "(url: 'str', *, retries: 'int' = 3) -> 'str'"
    assert await fetch("a") == "A"
    assert await fetch("b", retries=1) == "B"
    first, second = machines
    assert first is not second
    assert first.closed
    assert second.closed
    assert first.state == "succeeded"
    assert task_moves(registry) == {"pending>running": 2, "running>succeeded": 2}
    assert set(task_counts(registry).values()) == {0}
    with pytest.raises(LookupError, match=r"Fetch.current\(\): no Fetch task is running"):
        cls.current()


async def test_task_failure_records_failed_and_reraises() -> None:
    cls, registry = task_class()
    boom = Boom()

    @cls.task
    async def fetch() -> None:
        raise boom

    with pytest.raises(Boom) as caught:
        await fetch()
    assert caught.value is boom
    assert task_moves(registry) == {"pending>running": 1, "running>failed": 1}
    assert set(task_counts(registry).values()) == {0}


async def test_task_cancelled_in_the_middle_records_cancelled() -> None:
    cls, registry = task_class()
    machines = []

    @cls.task
    async def fetch() -> None:
        machines.append(cls.current())
        await anyio.sleep(5)

    with anyio.move_on_after(0.02) as scope:
        await fetch()
    assert scope.cancelled_caught
    [machine] = machines
    assert machine.state == "cancelled"
    assert machine.closed
    assert task_moves(registry) == {"pending>running": 1, "running>cancelled": 1}
    assert set(task_counts(registry).values()) == {0}


async def test_task_cancelled_by_its_task_group() -> None:
    cls, registry = task_class()
    started = anyio.Event()

    @cls.task
    async def fetch() -> None:
        started.set()
        await anyio.sleep(5)

    async with anyio.create_task_group() as group:
        for _ in range(3):
            group.start_soon(fetch)
        await started.wait()
        await wait_until(lambda: task_counts(registry)["running"] == 3)
        group.cancel_scope.cancel()
    assert task_moves(registry) == {"pending>running": 3, "running>cancelled": 3}


async def test_task_start_failing_records_a_failure_from_pending() -> None:
    def ready(self: Any) -> bool:
        raise Boom("cannot start")

    transitions = [
        {"trigger": "start", "source": "pending", "dest": "running", "conditions": "ready"},
        *TaskMachine.transitions[1:],
    ]
    cls, registry = task_class(
        members={"states": TaskMachine.states, "transitions": transitions, "ready": ready}
    )
    ran = []

    @cls.task
    async def fetch() -> None:
        ran.append(True)

    with pytest.raises(Boom, match="cannot start"):
        await fetch()
    assert not ran
    assert task_moves(registry) == {"pending>failed": 1}


async def test_task_labels_from_the_call_arguments() -> None:
    cls, registry = task_class(labelnames=("host",))
    inside = []

    @cls.task(labels=lambda url, **_: {"host": url.split("/")[2]})
    async def fetch(url: str, *, tries: int = 1) -> None:
        inside.append(cls.current().labels)
        value = registry.get_sample_value("fetch_state", {"fetch_state": "running", "host": "a.b"})
        assert value == 1

    await fetch("https://a.b/x", tries=2)
    assert inside == [{"host": "a.b"}]
    # The series went with the last machine bound to it.
    assert (
        registry.get_sample_value("fetch_state", {"fetch_state": "succeeded", "host": "a.b"})
        is None
    )


def test_task_labels_are_checked_at_decoration() -> None:
    labelled, _ = task_class(labelnames=("host",))
    plain, _ = task_class()

    async def fetch(url: str) -> None:
        pass

    with pytest.raises(TypeError, match=r"Fetch has labelnames \(host\); pass labels="):
        labelled.task(fetch)
    with pytest.raises(TypeError, match="labels= given, but Fetch has no labelnames"):
        plain.task(labels=lambda url: {"host": url})(fetch)
    with pytest.raises(TypeError, match="decorates coroutine functions"):
        plain.task(lambda: None)


async def test_task_wrong_label_values_fail_the_call() -> None:
    cls, _ = task_class(labelnames=("host",))

    @cls.task(labels=lambda: {"hots": "x"})
    async def fetch() -> None:
        pass

    with pytest.raises(ValueError, match="labels must be exactly host; got hots"):
        await fetch()


async def test_task_current_is_the_innermost_machine_of_the_class() -> None:
    fetch_cls, _ = task_class()
    parse_cls, _ = task_class(name="parse_state")
    seen: dict[str, Any] = {}

    @parse_cls.task
    async def parse() -> None:
        seen["parse"] = parse_cls.current()
        seen["fetch in parse"] = fetch_cls.current()
        seen["any in parse"] = TaskMachine.current()

    @fetch_cls.task
    async def fetch() -> None:
        seen["fetch"] = fetch_cls.current()
        await parse()
        async with anyio.create_task_group() as group:
            group.start_soon(child)

    async def child() -> None:
        seen["child"] = fetch_cls.current()

    await fetch()
    assert seen["fetch in parse"] is seen["fetch"]
    assert seen["any in parse"] is seen["parse"]
    assert seen["child"] is seen["fetch"]
    assert isinstance(seen["parse"], parse_cls)


async def test_task_subclass_with_more_states() -> None:
    registry = CollectorRegistry()

    class Download(TaskMachine, registry=registry):
        states = [*TaskMachine.states, "retrying"]
        transitions = [
            *TaskMachine.transitions,
            ["retry", "running", "retrying"],
            ["resume", "retrying", "running"],
            ["fail", "retrying", "failed"],
            ["cancel", "retrying", "cancelled"],
        ]

    attempts = []

    @Download.task
    async def download(fail_times: int) -> int:
        machine: Any = Download.current()
        for attempt in range(5):
            attempts.append(machine.state)
            if attempt >= fail_times:
                return attempt
            await machine.retry()
            await anyio.lowlevel.checkpoint()
            await machine.resume()
        raise AssertionError("unreachable")

    assert await download(2) == 2
    assert attempts == ["running", "running", "running"]
    moves = task_moves(registry, "download_state")
    assert moves == {
        "pending>running": 1,
        "running>retrying": 2,
        "retrying>running": 2,
        "running>succeeded": 1,
    }
    assert Download.final_states == frozenset({"succeeded", "failed", "cancelled"})


async def test_task_body_reaching_a_final_state_itself_skips_the_outcome() -> None:
    cls, registry = task_class()

    @cls.task
    async def soft_failure() -> str:
        await cls.current().fail()
        return "handled"

    @cls.task
    async def fail_then_raise() -> None:
        await cls.current().fail()
        raise Boom

    assert await soft_failure() == "handled"
    with pytest.raises(Boom) as caught:
        await fail_then_raise()
    assert caught.value.__cause__ is None
    assert task_moves(registry) == {"pending>running": 2, "running>failed": 2}


@pytest.mark.parametrize(
    ("members", "message"),
    [
        (
            {"states": ["pending", "running"], "transitions": [["start", "pending", "running"]]},
            "a TaskMachine needs the triggers start, succeed, fail and cancel; missing "
            "succeed, fail, cancel",
        ),
        (
            {"states": TaskMachine.states, "initial": "running"},
            "'start' must be allowed from the initial state 'running'",
        ),
    ],
)
def test_task_machine_subclass_is_checked(members: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"^Fetch: {message}$"):
        task_class(members=members)


async def test_task_timeout_marks_a_slow_call_failed() -> None:
    cls, registry = task_class(members={"timeouts": {"running": (0.03, "fail")}})

    @cls.task
    async def slow() -> str:
        await anyio.sleep(0.1)
        return "done anyway"

    assert await slow() == "done anyway"
    assert task_moves(registry) == {"pending>running": 1, "running>failed": 1}


async def test_task_outcome_racing_a_timeout_is_skipped_in_turn() -> None:
    # The timeout's `fail` holds the turn (a callback awaits before the state changes)
    # when the body returns: `succeed` waits, then finds the machine in a final state and
    # does not fire.
    async def on_exit_running(self: Any) -> None:
        await anyio.sleep(0.1)

    cls, registry = task_class(
        members={"timeouts": {"running": (0.02, "fail")}, "on_exit_running": on_exit_running}
    )

    @cls.task
    async def slow() -> str:
        await anyio.sleep(0.06)  # the timeout (0.02) holds the turn from 0.02 to 0.12
        return "done"

    assert await slow() == "done"
    assert task_moves(registry) == {"pending>running": 1, "running>failed": 1}
    assert errors(registry, "fetch_state", "succeed", "MachineError") == 0


# -- state timeouts: definitions --------------------------------------------------------


@pytest.mark.parametrize(
    ("timeouts", "message"),
    [
        ({"runing": (1, "fail")}, r"Worker.timeouts\['runing'\]: unknown state 'runing'; "),
        ({"running": (1, "fial")}, r"Worker.timeouts\['running'\]: unknown trigger 'fial'"),
        ({"running": (0, "fail")}, r"\['running'\]: seconds must be a positive finite number"),
        ({"running": (-1.5, "fail")}, "seconds must be a positive finite number, got -1.5"),
        ({"running": (math.nan, "fail")}, "seconds must be a positive finite number, got nan"),
        ({"running": (math.inf, "fail")}, "seconds must be a positive finite number, got inf"),
        ({"running": ("30", "fail")}, "seconds must be a positive finite number, got '30'"),
        ({"running": (True, "fail")}, "seconds must be a positive finite number, got True"),
        ({"running": (1, "fail", "x")}, r"expected \(seconds, trigger\), got \(1, 'fail', 'x'\)"),
        ({"running": 30}, r"\['running'\]: expected \(seconds, trigger\), got 30"),
        ({"running": "fail"}, r"expected \(seconds, trigger\), got 'fail'"),
        ({"running": (1, None)}, r"expected \(seconds, trigger\), got \(1, None\)"),
        ({"idle": (1, "finish")}, r"\['idle'\]: trigger 'finish' has no transition from 'idle'"),
    ],
)
def test_timeouts_are_checked_at_class_creation(timeouts: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        worker_class(timeouts)
    assert str(caught.value).startswith("Worker.timeouts[")


def test_timeouts_must_be_a_dict() -> None:
    with pytest.raises(TypeError, match=r"Worker.timeouts must be a dict of state"):
        worker_class(None, timeouts=[("running", 1, "fail")])


def test_timeouts_unknown_state_lists_the_states() -> None:
    with pytest.raises(ValueError, match=r"states are idle, running, error$"):
        worker_class({"runing": (1, "fail")})


def test_timeouts_checked_on_a_template_and_inherited() -> None:
    with pytest.raises(
        ValueError,
        match=r"Slow.timeouts\['running'\]: unknown trigger 'give_up'; triggers are start, ",
    ):

        class Slow(TaskMachine, abstract=True):
            timeouts = {"running": (1.0, "give_up")}

    class Limited(TaskMachine, abstract=True):
        timeouts = {"running": (0.05, "fail")}

    class Job(Limited, registry=None):
        pass

    assert Job.timeouts == {"running": (0.05, "fail")}


# -- state timeouts: running -------------------------------------------------------------


async def test_timeout_fires_while_entered() -> None:
    cls, registry = worker_class({"running": (0.05, "fail")})
    async with cls() as worker:
        await worker.start()
        await anyio.sleep(0.01)
        assert worker.state == "running"
        await wait_until(worker.is_error)
    assert worker.path == ["idle", "running", "error"]
    assert counted(registry, "running", "error", "fail") == 1
    assert worker.closed


async def test_timeout_counts_from_entering_a_machine_already_in_the_state() -> None:
    cls, _ = worker_class({"running": (0.05, "fail")})
    worker = cls(initial="running")
    async with worker:
        await anyio.sleep(0.02)
        assert worker.is_running()
        await wait_until(worker.is_error)


async def test_timeout_outside_the_context_nothing_fires() -> None:
    cls, _ = worker_class({"running": (0.02, "fail")})
    worker = cls()
    await worker.start()
    await anyio.sleep(0.06)
    assert worker.path == ["idle", "running"]  # never entered: no timer
    other = cls()
    async with other:
        await other.start()
    await anyio.sleep(0.06)
    assert other.path == ["idle", "running"]  # left before the deadline
    assert other.closed


async def test_timeout_cancelled_by_leaving_the_state() -> None:
    cls, registry = worker_class({"running": (0.05, "fail")})
    async with cls() as worker:
        await worker.start()
        await anyio.sleep(0.02)
        await worker.finish()
        await anyio.sleep(0.08)
        assert worker.path == ["idle", "running", "idle"]
    assert counted(registry, "running", "error", "fail") == 0


async def test_timeout_rearmed_when_the_state_is_entered_again() -> None:
    cls, _ = worker_class({"running": (0.08, "fail")})
    async with cls() as worker:
        await worker.start()
        await anyio.sleep(0.03)
        await worker.finish()
        await worker.start()  # a new stay: a new deadline, 0.08 s from now
        again = anyio.current_time()
        await wait_until(worker.is_error)
        # Not at the first stay's deadline, 0.05 s after the second stay began.
        assert anyio.current_time() - again >= 0.075
    assert worker.path == ["idle", "running", "idle", "running", "error"]


async def test_timeout_restarted_by_a_reflexive_transition_not_an_internal_one() -> None:
    cls, _ = worker_class({"running": (0.08, "fail")})
    async with cls() as worker:
        await worker.start()
        for _ in range(4):  # 0.12 s in running, never 0.08 s since the last touch
            await anyio.sleep(0.03)
            await worker.touch()
        assert worker.is_running()
        await anyio.sleep(0.05)
        pinged = anyio.current_time()
        await worker.ping()  # internal: the state is not left, the timer goes on
        await wait_until(worker.is_error)
        assert anyio.current_time() - pinged < 0.07  # 0.03 s were left, not 0.08
    assert worker.path == ["idle", "running", *["running"] * 4, "error"]


async def test_timeout_racing_a_manual_transition_does_not_fire_late() -> None:
    # `finish` takes the turn before the deadline and moves to idle after it: the timer,
    # woken at the deadline, waits for its turn and then finds the machine elsewhere.
    async def slow(self: Any) -> None:
        await anyio.sleep(0.1)

    transitions = [
        ["start", "idle", "running"],
        {"trigger": "finish", "source": "running", "dest": "idle", "before": "slow"},
        ["fail", ["idle", "running"], "error"],
    ]
    cls, registry = worker_class({"running": (0.05, "fail")}, transitions=transitions, slow=slow)
    async with cls() as worker:
        await worker.start()
        await anyio.sleep(0.01)
        await worker.finish()  # holds the turn across the deadline
        await anyio.sleep(0.05)
        assert worker.path == ["idle", "running", "idle"]
    assert counted(registry, "running", "error", "fail") == 0


async def test_timeout_racing_a_reflexive_transition_keeps_only_the_new_deadline() -> None:
    # Same state, new stay: the epoch, not the state, tells the stale timer apart.
    async def slow(self: Any) -> None:
        await anyio.sleep(0.08)

    transitions = [
        ["start", "idle", "running"],
        {"trigger": "touch", "source": "running", "dest": "running", "before": "slow"},
        ["fail", ["idle", "running"], "error"],
    ]
    cls, _ = worker_class({"running": (0.05, "fail")}, transitions=transitions, slow=slow)
    async with cls() as worker:
        await worker.start()
        await anyio.sleep(0.01)
        await worker.touch()  # holds the turn past the first deadline, re-enters running
        touched = anyio.current_time()
        await wait_until(worker.is_error)
        # The first deadline passed during the touch; only the new one (0.05 s) fired.
        assert anyio.current_time() - touched >= 0.045
    assert worker.path == ["idle", "running", "running", "error"]


async def test_timeout_trigger_runs_in_turn_with_other_triggers() -> None:
    log = []

    async def on_enter_error(self: Any) -> None:
        log.append("error in")
        await anyio.sleep(0.03)
        log.append("error out")

    cls, _ = worker_class({"running": (0.02, "fail")}, on_enter_error=on_enter_error)
    async with cls() as worker:
        await worker.start()
        await wait_until(lambda: log == ["error in"])
        await worker.reset()  # queued behind the timeout's transition
        log.append("reset")
    assert log == ["error in", "error out", "reset"]
    assert worker.path == ["idle", "running", "error", "idle"]


async def test_timeout_trigger_errors_are_logged_and_timers_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def on_enter_error(self: Any) -> None:
        raise Boom("callback")

    cls, registry = worker_class(
        {"running": (0.02, "fail"), "error": (0.02, "reset")}, on_enter_error=on_enter_error
    )
    async with cls() as worker:
        await worker.start()
        await wait_until(lambda: worker.path[-1] == "idle")
        await worker.start()
        await wait_until(lambda: worker.path[-1] == "idle")
    assert worker.path == ["idle", "running", "error", "idle", "running", "error", "idle"]
    records = [r for r in caplog.records if r.name == "statemachine_metrics"]
    assert len(records) == 2
    assert all(r.levelno == logging.ERROR for r in records)
    assert "Worker: the timeout of state 'running' fired 'fail', which raised" in (
        records[0].getMessage()
    )
    assert records[0].exc_info is not None
    assert isinstance(records[0].exc_info[1], Boom)
    assert errors(registry, "worker_state", "fail", "Boom") == 2


async def test_timeout_stopped_by_a_condition_fires_once_per_stay() -> None:
    asked = []

    def allowed(self: Any) -> bool:
        asked.append(self.state)
        return False

    transitions = [
        ["start", "idle", "running"],
        ["finish", "running", "idle"],
        {"trigger": "fail", "source": "running", "dest": "error", "conditions": "allowed"},
    ]
    cls, _ = worker_class({"running": (0.02, "fail")}, transitions=transitions, allowed=allowed)
    async with cls() as worker:
        await worker.start()
        await anyio.sleep(0.1)
        assert asked == ["running"]
        await worker.finish()
        await worker.start()
        await wait_until(lambda: len(asked) == 2)
    assert worker.path == ["idle", "running", "idle", "running"]


async def test_timeout_body_exception_is_not_wrapped() -> None:
    cls, _ = worker_class({"running": (1, "fail")})
    boom = Boom()
    worker = cls()

    async def body() -> None:
        async with worker:
            await worker.start()
            raise boom

    with pytest.raises(Boom) as caught:
        await body()
    assert caught.value is boom
    assert worker.closed


async def test_timeout_machine_cancelled_from_outside() -> None:
    cls, _ = worker_class({"running": (1, "fail")})
    with anyio.move_on_after(0.02) as scope:
        async with cls() as worker:
            await worker.start()
            await anyio.sleep(5)
    assert scope.cancelled_caught
    assert worker.closed
    assert worker.state == "running"


async def test_timeout_entering_twice_or_closed_is_an_error() -> None:
    cls, _ = worker_class({"running": (1, "fail")})
    async with cls() as worker:
        with pytest.raises(RuntimeError, match="Worker machine is already entered"):
            async with worker:
                pass
        assert not worker.closed
    with pytest.raises(RuntimeError, match="Worker machine is closed; it cannot be entered"):
        async with worker:
            pass


async def test_timeout_entered_machine_holds_no_cycle() -> None:
    cls, _ = worker_class({"running": (1, "fail")})
    gc.disable()
    try:
        async with cls() as worker:
            await worker.start()
            ref = weakref.ref(worker)
        del worker
        assert ref() is None
    finally:
        gc.enable()


async def test_machine_without_timeouts_starts_no_timer() -> None:
    cls, _ = worker_class()
    async with cls() as worker:
        assert worker._timers is None
        await worker.start()
    assert worker.closed


# -- triggers fired and machines closed at once, and when they wait ----------------------


async def held(self: Any, gate: anyio.Event, entered: anyio.Event) -> None:
    """The `after` callback of `hold`: the trigger keeps the machine's turn until `gate`."""
    entered.set()
    await gate.wait()


HOLD = {"trigger": "hold", "source": "*", "dest": None, "after": "held"}


def holding_task_class() -> tuple[Any, CollectorRegistry]:
    """A TaskMachine whose task triggers have no callbacks, plus ``hold(gate, entered)``,
    an internal trigger from every state that holds the turn until `gate` is set."""
    return task_class(
        members={
            "states": TaskMachine.states,
            "transitions": [*TaskMachine.transitions, HOLD],
            "held": held,
        }
    )


def plain_worker_class() -> tuple[Any, CollectorRegistry]:
    """A Worker without callbacks on its own triggers, plus ``hold`` as above."""
    registry = CollectorRegistry()
    namespace = {
        "states": ["idle", "running", "error"],
        "transitions": [*WORKER_TRANSITIONS, HOLD],
        "held": held,
    }
    cls = type(MeteredMachine)("Worker", (MeteredMachine,), namespace, registry=registry)
    return cls, registry


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def triggers_seen(cls: Any) -> list[str]:
    seen: list[str] = []
    cls.add_listener(lambda event: seen.append(event.trigger))
    return seen


async def test_task_without_callbacks_keeps_every_metric_and_listener() -> None:
    cls, registry = task_class()
    events = []
    cls.add_listener(lambda event: events.append((event.trigger, event.source, event.dest)))
    machines = []

    @cls.task
    async def job(n: int) -> int:
        machines.append(cls.current())
        return n

    assert [await job(n) for n in range(3)] == [0, 1, 2]
    assert events == [("start", "pending", "running"), ("succeed", "running", "succeeded")] * 3
    assert all(machine.closed for machine in machines)
    assert task_moves(registry) == {"pending>running": 3, "running>succeeded": 3}
    assert set(task_counts(registry).values()) == {0}
    for state in ("pending", "running"):
        assert sample(registry, "fetch_state_duration_seconds_count", fetch_state=state) == 3
    for trigger in ("start", "succeed"):
        assert sample(registry, "fetch_state_trigger_duration_seconds_count", trigger=trigger) == 3


async def test_track_without_callbacks_keeps_every_metric_and_listener() -> None:
    cls, registry = plain_worker_class()
    worker = cls()
    seen = triggers_seen(cls)

    @worker.track(enter="start", success="finish", error="fail")
    async def job() -> str:
        assert worker.state == "running"
        return "done"

    assert await job() == "done"
    async with worker.track(enter="start", success="finish"):
        assert worker.state == "running"
    assert seen == ["start", "finish"] * 2
    assert worker.state == "idle"
    assert counted(registry, "idle", "running", "start") == 2
    assert counted(registry, "running", "idle", "finish") == 2
    assert sample(registry, "worker_state_duration_seconds_count", worker_state="running") == 2
    assert sample(registry, "worker_state_trigger_duration_seconds_count", trigger="finish") == 2


async def test_task_outcome_waits_for_a_transition_holding_the_turn() -> None:
    cls, registry = holding_task_class()
    seen = triggers_seen(cls)
    gate, entered = anyio.Event(), anyio.Event()
    results: list[str] = []

    @cls.task
    async def job(group: Any) -> str:
        group.start_soon(cls.current().hold, gate, entered)
        await entered.wait()
        return "done"

    async def call(group: Any) -> None:
        results.append(await job(group))

    async with anyio.create_task_group() as group:
        group.start_soon(call, group)
        await anyio.wait_all_tasks_blocked()
        assert results == []  # `succeed` waits for the turn `hold` holds
        assert task_counts(registry)["running"] == 1
        gate.set()
    assert results == ["done"]
    assert seen == ["start", "hold", "succeed"]
    moves = {"pending>running": 1, "running>running": 1, "running>succeeded": 1}
    assert task_moves(registry) == moves
    assert set(task_counts(registry).values()) == {0}


async def test_task_closing_waits_for_a_trigger_queued_behind_the_outcome() -> None:
    cls, registry = holding_task_class()
    seen = triggers_seen(cls)
    first, second, entered = anyio.Event(), anyio.Event(), anyio.Event()
    machines: list[Any] = []
    results: list[str] = []

    @cls.task
    async def job(group: Any) -> str:
        machines.append(cls.current())
        group.start_soon(cls.current().hold, first, entered)
        await entered.wait()
        return "done"

    async def call(group: Any) -> None:
        results.append(await job(group))

    async with anyio.create_task_group() as group:
        group.start_soon(call, group)
        await anyio.wait_all_tasks_blocked()  # `succeed` waits for the first hold
        [machine] = machines
        group.start_soon(machine.hold, second, anyio.Event())  # queued behind `succeed`
        await anyio.wait_all_tasks_blocked()
        first.set()
        await anyio.wait_all_tasks_blocked()
        # `succeed` ran and handed the turn to the second hold: closing waits for it.
        assert machine.state == "succeeded"
        assert not machine.closed
        assert results == []
        second.set()
    assert machine.closed
    assert results == ["done"]
    assert seen == ["start", "hold", "succeed", "hold"]
    assert set(task_counts(registry).values()) == {0}


async def test_task_cancelled_while_the_outcome_waits_for_its_turn_records_the_cancel() -> None:
    cls, registry = holding_task_class()
    seen = triggers_seen(cls)
    gate, entered = anyio.Event(), anyio.Event()
    scopes: list[anyio.CancelScope] = []

    @cls.task
    async def job(group: Any) -> str:
        group.start_soon(cls.current().hold, gate, entered)
        await entered.wait()
        return "done"

    async def call(group: Any) -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await job(group)

    async with anyio.create_task_group() as group:
        group.start_soon(call, group)
        await anyio.wait_all_tasks_blocked()
        [scope] = scopes
        scope.cancel()  # while `succeed` waits: the caller sees a cancellation
        await anyio.wait_all_tasks_blocked()  # `cancel` waits for the turn, shielded
        assert task_counts(registry)["running"] == 1
        gate.set()
    assert scope.cancelled_caught
    assert seen == ["start", "hold", "cancel"]
    moves = {"pending>running": 1, "running>running": 1, "running>cancelled": 1}
    assert task_moves(registry) == moves
    assert set(task_counts(registry).values()) == {0}


@pytest.mark.parametrize("form", ["decorator", "async with"])
async def test_track_cancelled_while_success_waits_for_its_turn_records_the_cancel(
    form: str,
) -> None:
    cls, registry = plain_worker_class()
    worker = cls()
    seen = triggers_seen(cls)
    gate, entered = anyio.Event(), anyio.Event()
    scopes: list[anyio.CancelScope] = []
    tracked = worker.track("start", "finish", error="fail", cancel="abort")

    async def body(group: Any) -> None:
        group.start_soon(worker.hold, gate, entered)
        await entered.wait()

    async def call(group: Any) -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            if form == "decorator":
                await tracked(body)(group)
            else:
                async with tracked:
                    await body(group)

    async with anyio.create_task_group() as group:
        group.start_soon(call, group)
        await anyio.wait_all_tasks_blocked()
        [scope] = scopes
        scope.cancel()
        await anyio.wait_all_tasks_blocked()
        assert worker.state == "running"
        gate.set()
    assert scope.cancelled_caught
    assert seen == ["start", "hold", "abort"]
    assert counted(registry, "running", "idle", "abort") == 1


@pytest.mark.parametrize("form", ["decorator", "async with"])
async def test_track_enter_waits_for_a_transition_holding_the_turn(form: str) -> None:
    cls, _ = plain_worker_class()
    worker = cls()
    seen = triggers_seen(cls)
    gate, entered = anyio.Event(), anyio.Event()
    ran: list[str] = []
    tracked = worker.track("start", "finish")

    async def body() -> None:
        ran.append(worker.state)

    async def call() -> None:
        if form == "decorator":
            await tracked(body)()
        else:
            async with tracked:
                await body()

    async with anyio.create_task_group() as group:
        group.start_soon(worker.hold, gate, entered)
        await entered.wait()
        group.start_soon(call)
        await anyio.wait_all_tasks_blocked()
        assert ran == []  # `start` waits for the turn
        assert worker.state == "idle"
        gate.set()
    assert ran == ["running"]
    assert seen == ["hold", "start", "finish"]


async def test_task_outcome_with_callbacks_is_awaited() -> None:
    async def on_enter_succeeded(self: Any) -> None:
        await anyio.lowlevel.checkpoint()
        entered.append(self.state)

    entered: list[str] = []
    cls, registry = task_class(members={"on_enter_succeeded": on_enter_succeeded})

    @cls.task
    async def job() -> str:
        return "done"

    assert await job() == "done"
    assert entered == ["succeeded"]
    assert task_moves(registry) == {"pending>running": 1, "running>succeeded": 1}


async def test_task_with_timeouts_quick_calls_succeed_and_their_timers_stop() -> None:
    cls, registry = task_class(members={"timeouts": {"running": (0.05, "fail")}})

    @cls.task
    async def quick(n: int) -> int:
        timers = len(anyio.get_running_tasks())
        await anyio.lowlevel.checkpoint()
        return timers

    outside = len(anyio.get_running_tasks())
    assert [await quick(n) for n in range(3)] == [outside + 1] * 3  # one timer each
    await anyio.sleep(0.08)
    assert len(anyio.get_running_tasks()) == outside
    assert task_moves(registry) == {"pending>running": 3, "running>succeeded": 3}


OUTCOMES = ("return", "raise", "cancel", "fail itself")


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(outcomes=st.lists(st.sampled_from(OUTCOMES), max_size=12), checkpoints=st.booleans())
def test_concurrent_calls_leave_metrics_consistent(
    anyio_backend: str, outcomes: list[str], checkpoints: bool
) -> None:
    """Calls of a task and of a tracked function, ending every way at once, side by side:
    every machine ends where its call says, and every metric agrees."""
    cls, registry = task_class()
    worker_cls, worker_registry = plain_worker_class()
    seen = triggers_seen(cls)
    ends = {"return": "succeed", "raise": "fail", "cancel": "cancel", "fail itself": "fail"}

    async def body(outcome: str, scope: anyio.CancelScope, machine: Any = None) -> None:
        if checkpoints:
            await anyio.lowlevel.checkpoint()
        if outcome == "raise":
            raise Boom
        if outcome == "cancel":
            scope.cancel()
            await anyio.lowlevel.checkpoint()
        if outcome == "fail itself" and machine is not None:  # a task only
            await machine.fail()

    @cls.task
    async def job(outcome: str, scope: anyio.CancelScope) -> None:
        await body(outcome, scope, cls.current())

    async def call(outcome: str) -> None:
        worker = worker_cls()
        tracked = worker.track("start", "finish", error="fail", cancel="abort")
        with anyio.CancelScope() as scope:
            with contextlib.suppress(Boom):
                await job(outcome, scope)
        with anyio.CancelScope() as scope:
            with contextlib.suppress(Boom):
                await tracked(body)(outcome, scope)
        await worker.aclose()

    async def main() -> None:
        async with anyio.create_task_group() as group:
            for outcome in outcomes:
                group.start_soon(call, outcome)

    anyio.run(main, backend=anyio_backend)
    total = len(outcomes)
    assert sorted(seen) == sorted(["start"] * total + [ends[o] for o in outcomes])
    assert set(task_counts(registry).values()) == {0}
    moves = task_moves(registry)
    assert moves.get("pending>running", 0) == total
    for dest, outcome in (("succeeded", "return"), ("cancelled", "cancel")):
        assert moves.get(f"running>{dest}", 0) == outcomes.count(outcome)
    failed = outcomes.count("raise") + outcomes.count("fail itself")
    assert moves.get("running>failed", 0) == failed
    for state, count in (("pending", total), ("running", total)):
        assert sample(registry, "fetch_state_duration_seconds_count", fetch_state=state) == count
    assert sample(registry, "fetch_state_trigger_duration_seconds_count", trigger="start") == total
    # Tracked: each worker went idle -> running, then back (finish, abort) or to error;
    # its body does not fail the machine itself, it returns.
    workers = {
        (source, dest, trigger): sample(
            worker_registry,
            "worker_state_transitions_total",
            **{"from": source, "to": dest, "trigger": trigger},
        )
        for source, dest, trigger in (
            ("idle", "running", "start"),
            ("running", "idle", "finish"),
            ("running", "idle", "abort"),
            ("running", "error", "fail"),
        )
    }
    assert workers == {
        ("idle", "running", "start"): total,
        ("running", "idle", "finish"): outcomes.count("return") + outcomes.count("fail itself"),
        ("running", "idle", "abort"): outcomes.count("cancel"),
        ("running", "error", "fail"): outcomes.count("raise"),
    }
    for state in ("idle", "running", "error"):
        assert sample(worker_registry, "worker_state_machines", worker_state=state) == 0
