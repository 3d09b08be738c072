"""Defects found by adversarial use, each pinned by a test that failed before its fix."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from prometheus_client import CollectorRegistry
from transitions.extensions.asyncio import AsyncMachine

from statemachine_metrics import MachineCollector, MeteredMachine, TaskMachine

pytestmark = pytest.mark.anyio


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def run_script(code: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter; a hang fails the test instead of the suite."""
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the script hung for {timeout} s")


# -- hangs -----------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_creates_machines_while_a_parent_thread_held_the_locks() -> None:
    # Another thread of the parent holds every lock a machine's creation takes, at the
    # moment of the fork: the child, which has no such thread, must not wait for it.
    result = run_script(
        """
        import os, sys, threading, time
        from prometheus_client import CollectorRegistry
        from statemachine_metrics import MeteredMachine
        from statemachine_metrics import _collector

        class Worker(MeteredMachine, labelnames=("w",), registry=CollectorRegistry()):
            states = ["idle", "busy"]
            transitions = [["go", "idle", "busy"]]

        held, release = threading.Event(), threading.Event()

        def hold():
            with Worker._family.lock, Worker.metric._lock, _collector._lock:
                held.set()
                release.wait()

        threading.Thread(target=hold).start()
        held.wait()
        pid = os.fork()
        if pid == 0:
            Worker(labels={"w": "child"})
            class Later(MeteredMachine, registry=CollectorRegistry()):
                states = ["a"]
            Later()
            os._exit(0)
        release.set()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                sys.exit(os.waitstatus_to_exitcode(status))
            time.sleep(0.02)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        sys.exit("the child hung")
        """
    )
    assert result.returncode == 0, result.stderr


def test_collection_inside_a_locked_enum_section_does_not_deadlock() -> None:
    # The last machine of a label set, in a reference cycle, is ended by the garbage
    # collector while the same thread is inside the Enum's own locked section (as in
    # Worker.metric.collect() or remove_by_labels()).
    result = run_script(
        """
        import gc
        from prometheus_client import CollectorRegistry
        from statemachine_metrics import MeteredMachine

        class Worker(MeteredMachine, labelnames=("w",), registry=CollectorRegistry()):
            states = ["idle", "busy"]

        gc.disable()
        machine = Worker(labels={"w": "cyclic"})
        cycle = [machine]
        cycle.append(cycle)
        del machine, cycle
        with Worker.metric._lock:
            gc.collect()
        # Once the lock is free, the machine's end is applied.
        assert Worker._family.live_counts() == [0, 0], Worker._family.live_counts()
        assert [labels for labels, _ in Worker.metric._snapshot()] == []
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# -- wrong metrics or wrong order --------------------------------------------------------


@pytest.mark.parametrize("where", ["prepare", "conditions", "before", "exit"])
async def test_nested_trigger_before_the_state_change_books_the_real_source(where: str) -> None:
    registry = CollectorRegistry()

    class Hop(MeteredMachine, registry=registry, name="hop"):
        states = ["a", "b", "c"]
        transitions = [
            {
                "trigger": "go",
                "source": "a",
                "dest": "c",
                **({} if where == "exit" else {where: "jump"}),
            },
            ["skip", "a", "b"],
        ]

        jumped = False

        async def jump(self) -> bool:
            if not self.jumped:  # `skip` leaves a too
                self.jumped = True
                await self.skip()
            return True

        if where == "exit":
            on_exit_a = jump

    machine = Hop()
    assert await machine.go()
    assert machine.state == "c"
    counts = {s: value(registry, "hop_machines", hop=s) for s in "abc"}
    assert counts == {"a": 0, "b": 0, "c": 1}
    assert value(registry, "hop_transitions_total", **{"from": "a", "to": "b", "trigger": "skip"})
    assert value(
        registry, "hop_transitions_total", **{"from": "b", "to": "c", "trigger": "go"}
    ) == (1.0)
    assert value(
        registry, "hop_transitions_total", **{"from": "a", "to": "c", "trigger": "go"}
    ) == (0.0)
    assert value(registry, "hop_duration_seconds_count", hop="a") == 1
    assert value(registry, "hop_duration_seconds_count", hop="b") == 1
    assert value(registry, "hop", hop="c") == 1


class Relay(MeteredMachine, registry=None, name="relay"):
    states = ["a", "b", "c"]
    transitions = [
        {"trigger": "go", "source": "a", "dest": "b", "before": "spawn"},
        ["step", ["a", "b"], "c"],
    ]
    group: Any = None
    inner = False

    async def spawn(self) -> None:
        if self.inner:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.step)
        else:
            self.group.start_soon(self.step)
            await anyio.sleep(0.01)  # the spawned task runs now, in mid-transition


async def test_task_spawned_into_an_outer_task_group_waits_its_turn() -> None:
    relay = Relay()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            relay.group = tg
            await relay.go()
    # `go` ran whole, then `step`: the spawned trigger did not cut into it.
    assert relay.state == "c"


async def test_task_spawned_into_a_group_hosted_elsewhere_waits_its_turn() -> None:
    relay = Relay()

    async def host(task_status: anyio.abc.TaskStatus[Any]) -> None:
        async with anyio.create_task_group() as tg:
            task_status.started(tg)
            await anyio.sleep_forever()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as outer:
            relay.group = await outer.start(host)
            await relay.go()
            await anyio.sleep(0.05)
            outer.cancel_scope.cancel()
    assert relay.state == "c"


async def test_task_group_opened_inside_the_callback_nests() -> None:
    relay = Relay()
    relay.inner = True
    with anyio.fail_after(5):  # waiting its turn here would deadlock
        assert await relay.go()
    # As transitions runs a nested trigger: `step` ran inside `go`, which then ended in b.
    assert relay.state == "b"


class Jobs(TaskMachine, registry=None, name="rel_jobs"):
    pass


async def test_mixed_exception_group_settles_a_task_machine(anyio_backend: str) -> None:
    seen: list[Jobs] = []

    async def fails() -> None:
        with anyio.CancelScope(shield=True):  # fails while the outer scope cancels
            await anyio.sleep(0.01)
        raise ValueError("child failed")

    @Jobs.task
    async def body(scope: anyio.CancelScope) -> None:
        seen.append(Jobs.current())
        async with anyio.create_task_group() as tg:
            tg.start_soon(fails)
            scope.cancel()
            await anyio.sleep(1)

    raised: list[BaseException] = []
    with anyio.fail_after(5), anyio.CancelScope() as scope:
        try:
            await body(scope)
        except BaseException as exc:  # an exception group, with or without the cancellation
            raised.append(exc)
    assert "child failed" in repr(raised)
    (machine,) = seen
    assert machine.state == "failed"
    assert machine.closed


async def test_mixed_exception_group_settles_a_tracked_machine() -> None:
    class Conn(MeteredMachine, registry=None, name="rel_conn"):
        states = ["idle", "busy", "broken", "dropped"]
        transitions = [
            ["use", "idle", "busy"],
            ["done", "busy", "idle"],
            ["fail", "busy", "broken"],
            ["drop", "busy", "dropped"],
        ]

    conn = Conn()

    async def fails() -> None:
        with anyio.CancelScope(shield=True):  # fails while the outer scope cancels
            await anyio.sleep(0.01)
        raise ValueError("child failed")

    raised: list[BaseException] = []
    with anyio.fail_after(5), anyio.CancelScope() as scope:
        try:
            async with (
                conn.track("use", "done", error="fail", cancel="drop"),
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(fails)
                scope.cancel()
                await anyio.sleep(1)
        except BaseException as exc:
            raised.append(exc)
    assert "child failed" in repr(raised)
    assert conn.state == "broken"


async def test_trigger_queued_behind_aclose_does_not_run() -> None:
    registry = CollectorRegistry()

    class Door(MeteredMachine, registry=registry, name="door"):
        states = ["shut", "open"]
        transitions = [["push", "shut", "open"], ["pull", "open", "shut"]]
        gate: anyio.Event

        async def on_enter_open(self) -> None:
            await self.gate.wait()

    door = Door()
    door.gate = anyio.Event()
    outcome: list[object] = []

    async def pull() -> None:
        try:
            outcome.append(await door.pull())
        except RuntimeError as exc:
            outcome.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(door.push)
            await anyio.sleep(0.01)
            tg.start_soon(door.aclose)
            await anyio.sleep(0.01)
            tg.start_soon(pull)
            await anyio.sleep(0.01)
            door.gate.set()
    (result,) = outcome
    assert isinstance(result, RuntimeError)
    assert "closed" in str(result)
    assert (
        value(
            registry, "door_transitions_total", **{"from": "open", "to": "shut", "trigger": "pull"}
        )
        == 0
    )
    assert door.state == "open"


async def test_cancelled_enter_callback_after_the_move_settles_track() -> None:
    class Job(MeteredMachine, registry=None, name="rel_job"):
        states = ["idle", "running", "done", "failed", "cancelled"]
        transitions = [
            ["begin", "idle", "running"],
            ["finish", "running", "done"],
            ["fail", "running", "failed"],
            ["cancel", "running", "cancelled"],
        ]

        async def on_enter_running(self) -> None:
            await anyio.sleep(10)

    job = Job()
    with anyio.move_on_after(0.05):
        async with job.track("begin", "finish", error="fail", cancel="cancel"):
            pytest.fail("the body must not run")
    assert job.state == "cancelled"


async def test_live_machine_series_comes_back_after_clear_and_remove() -> None:
    registry = CollectorRegistry()

    class Pump(MeteredMachine, registry=registry, labelnames=("unit",), name="pump"):
        states = ["off", "on"]
        transitions = [["start", "off", "on"], ["stop", "on", "off"]]

    def shown() -> dict[str, str]:
        (enum,) = (m for m in registry.collect() if m.name == "pump")
        return {s.labels["unit"]: s.labels["pump"] for s in enum.samples if s.value == 1}

    one, two = Pump(labels={"unit": "1"}), Pump(labels={"unit": "2"})
    assert shown() == {"1": "off", "2": "off"}
    Pump.metric.clear()
    assert shown() == {}
    await one.start()
    assert shown() == {"1": "on"}
    await two.start()
    assert shown() == {"1": "on", "2": "on"}
    Pump.metric.remove("1")
    assert shown() == {"2": "on"}
    await one.stop()
    assert shown() == {"1": "off", "2": "on"}


# -- bad exposition ----------------------------------------------------------------------


def test_class_created_after_an_all_classes_collector_is_exported_once() -> None:
    registry = CollectorRegistry()
    registry.register(MachineCollector())

    class Late(MeteredMachine, registry=registry, name="late_once"):
        states = ["a", "b"]

    Late()
    names = [metric.name for metric in registry.collect()]
    assert names.count("late_once") == 1
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", ["le", "from", "to", "trigger", "error"])
def test_metric_named_like_a_derived_label_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=rf"Clash: metric name '{name}' clashes"):

        class Clash(MeteredMachine, registry=None, name=name):
            states = ["a"]


# -- bad input and messages --------------------------------------------------------------


@pytest.mark.parametrize(
    ("keyword", "given", "error"),
    [
        ("documentation", 123, TypeError),
        ("namespace", ["x"], TypeError),
        ("namespace", True, TypeError),
        ("subsystem", ("a",), TypeError),
        ("labelnames", 1.5, TypeError),
        ("registry", "x", TypeError),
    ],
)
def test_class_keyword_of_the_wrong_type_names_class_and_keyword(
    keyword: str, given: object, error: type[Exception]
) -> None:
    options: dict[str, Any] = {"registry": None, keyword: given}
    with pytest.raises(error, match=rf"\.Bad: {keyword}="):

        class Bad(MeteredMachine, **options):
            states = ["a"]


def test_non_string_docstring_is_refused_with_the_class_name() -> None:
    with pytest.raises(TypeError, match=r"\.Odd: its docstring must be a string"):

        class Odd(MeteredMachine, registry=None):
            __doc__ = 42  # type: ignore[assignment]
            states = ["a"]


async def test_timer_of_a_machine_closed_inside_async_with_stays_silent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Kettle(MeteredMachine, registry=None, name="kettle"):
        states = ["cold", "hot"]
        transitions = [["boil", "cold", "hot"]]
        timeouts = {"cold": (0.02, "boil")}

    caplog.set_level(logging.DEBUG, logger="statemachine_metrics")
    async with Kettle() as kettle:
        await kettle.aclose()
        await anyio.sleep(0.1)
    assert kettle.state == "cold"
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # AsyncMachine runs on asyncio only
async def test_on_enter_methods_resolve_as_async_machine_resolves_them() -> None:
    calls: list[str] = []

    class Spec:
        @classmethod
        def on_enter_b(cls) -> None:
            calls.append("classmethod enter b")

        @staticmethod
        def on_exit_a() -> None:
            calls.append("staticmethod exit a")

    class Model(Spec):
        pass

    machine = AsyncMachine(Model(), states=["a", "b"], transitions=[["go", "a", "b"]], initial="a")
    await machine.models[0].go()
    expected, calls[:] = list(calls), []

    class Ours(Spec, MeteredMachine, registry=None, name="resolve_ours"):
        states = ["a", "b"]
        transitions = [["go", "a", "b"]]

    await Ours().go()
    assert calls == expected == ["classmethod enter b"]


def test_initial_may_name_a_compound_state_or_an_enum_member() -> None:
    import enum

    class Nested(MeteredMachine, registry=None, name="rel_nested"):
        states = [
            "idle",
            {"name": "running", "children": ["fetching", "parsing"], "initial": "fetching"},
        ]
        transitions = [["go", "idle", "running"]]

    assert Nested(initial="running").state == "running_fetching"

    class Phase(enum.Enum):
        A = 1
        B = 2

    class Phased(MeteredMachine, registry=None, name="rel_phased"):
        states = Phase
        transitions = [["go", "A", "B"]]

    assert Phased(initial=Phase.B).state is Phase.B  # type: ignore[comparison-overlap]
    assert Phased().state is Phase.A  # type: ignore[comparison-overlap]
