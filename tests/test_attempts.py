"""A trigger method called without arguments runs its steps as one compiled function.

It must do exactly what the engine's general path does (``machine.trigger(name)``, or the
method called with arguments): the same callbacks in the same order, the same results,
errors and metrics, whatever the callbacks are (methods, functions, plain values,
properties, names that stop being methods) and wherever one returns an awaitable.
"""

from __future__ import annotations

import gc
import traceback
import weakref
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from statemachine_metrics import MeteredMachine

from .test_trigger_paths import samples

pytestmark = pytest.mark.anyio

NAMES = [f"c{i}" for i in range(6)]
KINDS = ["sync", "async", "returns awaitable", "value", "property", "raises"]
VALUES = [True, False, None, 1, 0]

behaviours = st.fixed_dictionaries(
    {name: st.tuples(st.sampled_from(KINDS), st.sampled_from(VALUES)) for name in NAMES}
)
callbacks = st.lists(st.sampled_from(NAMES), max_size=2)
candidate = st.fixed_dictionaries(
    {
        "trigger": st.just("go"),
        "source": st.just("a"),
        "dest": st.sampled_from(["b", "c", None, "a"]),
        "prepare": callbacks,
        "conditions": callbacks,
        "unless": callbacks,
        "before": callbacks,
        "after": callbacks,
    }
)
definitions = st.tuples(behaviours, st.lists(candidate, min_size=1, max_size=3), callbacks)


def machine_class(
    behaviour: dict[str, tuple[str, object]],
    transitions: list[dict[str, Any]],
    on_enter_b: list[str],
    log: list[str],
    registry: CollectorRegistry,
) -> type[MeteredMachine]:
    """A class whose callback ``cN`` behaves as `behaviour` says, logging each call."""
    namespace: dict[str, Any] = {
        "states": ["a", {"name": "b", "on_enter": on_enter_b, "on_exit": "c0"}, "c"],
        "transitions": transitions,
    }
    for name, (kind, value) in behaviour.items():

        def sync(self: Any, name: str = name, value: object = value) -> object:
            log.append(name)
            return value

        async def asynchronous(self: Any, name: str = name, value: object = value) -> object:
            log.append(name)
            await anyio.lowlevel.checkpoint()
            log.append(f"{name} resumed")
            return value

        def returns_awaitable(self: Any, name: str = name, value: object = value) -> object:
            log.append(name)

            async def later() -> object:
                await anyio.lowlevel.checkpoint()
                log.append(f"{name} awaited")
                return value

            return later()

        def getter(self: Any, name: str = name, value: object = value) -> object:
            log.append(f"{name} read")
            return value

        def raises(self: Any, name: str = name) -> object:
            log.append(name)
            raise (TypeError if name in ("c0", "c3") else AttributeError)(f"{name} failed")

        namespace[name] = {
            "sync": sync,
            "async": asynchronous,
            "returns awaitable": returns_awaitable,
            "value": value,
            "property": property(getter),
            "raises": raises,
        }[kind]
    return type("Drawn", (MeteredMachine,), namespace, registry=registry)


async def outcome(call: Any) -> object:
    try:
        return await call
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


@settings(max_examples=60, deadline=None)
@given(definition=definitions)
def test_the_compiled_attempt_does_what_the_general_path_does(
    definition: tuple[dict[str, tuple[str, object]], list[dict[str, Any]], list[str]],
) -> None:
    behaviour, transitions, on_enter_b = definition

    async def run(how: str) -> tuple[list[object], list[str], object]:
        log: list[str] = []
        registry = CollectorRegistry()
        cls = machine_class(behaviour, transitions, on_enter_b, log, registry)
        outcomes: list[object] = []
        for _ in range(3):  # a second call runs the attempt compiled by the first
            machine: Any = cls()
            if how == "method":
                outcomes.append(await outcome(machine.go()))
            else:
                outcomes.append(await outcome(machine.trigger("go")))
            outcomes.append(machine.state)
        return outcomes, log, samples(registry)

    for backend in ("asyncio", "trio"):
        expected = anyio.run(run, "by name", backend=backend)
        assert anyio.run(run, "method", backend=backend) == expected


class Worker(MeteredMachine, registry=None):
    states = ["idle", "running"]
    transitions = [
        ["start", "idle", "running", "ready", None, "before", "after"],
        ["stop", "running", "idle"],
    ]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log: list[str] = []

    def ready(self) -> bool:
        self.log.append("ready")
        return True

    def before(self) -> None:
        self.log.append("before")

    def after(self) -> None:
        self.log.append("after")


async def cycle(machine: Any) -> object:
    """`start` then `stop`: twice, so the second `start` runs the compiled attempt."""
    for _ in range(2):
        started = await outcome(machine.start())
        await machine.stop()
    return started


async def test_an_instance_attribute_replaces_the_method_for_that_machine() -> None:
    machine: Any = Worker()
    other: Any = Worker()
    await cycle(machine)
    machine.ready = lambda: False  # a callable: called, as transitions would
    assert await machine.start() is False
    assert machine.state == "idle"
    machine.ready = 0  # a plain value: the condition's result, as transitions would
    assert await machine.start() is False
    machine.ready = 1
    assert await machine.start() is True
    assert await cycle(other) is True  # the class's method still serves the others


async def test_a_name_that_stops_being_a_method_fails_as_the_general_path_does() -> None:
    class Changing(MeteredMachine, registry=None):
        states = ["a", "b"]
        transitions = [["go", "a", "b", "ready"], ["back", "b", "a"]]

        def ready(self) -> bool:
            return True

    machine: Any = Changing()
    for _ in range(2):
        assert await machine.go() is True
        await machine.back()
    Changing.ready = property(lambda self: False)  # type: ignore[assignment, method-assign]
    assert await machine.go() is False
    Changing.ready = 1  # type: ignore[assignment, method-assign]
    assert await machine.go() is True
    await machine.back()
    del Changing.ready
    expected = await outcome(Changing().trigger("go"))
    assert "Changing: callback 'ready' is neither an attribute" in str(expected)
    assert await outcome(machine.go()) == expected


async def test_an_error_raised_inside_a_method_is_raised_unchanged() -> None:
    class Faulty(Worker, registry=None):
        error: BaseException = TypeError("inside")

        def before(self) -> None:
            raise self.error

    machine: Any = Faulty()
    for error in (TypeError("inside"), AttributeError("inside"), ValueError("inside")):
        Faulty.error = error
        for _ in range(2):
            with pytest.raises(type(error)) as caught:
                await machine.start()
            assert caught.value is error
            # the line that called it, and the method itself, are in the traceback
            shown = "".join(traceback.format_exception(caught.value))
            assert "r = m.before()" in shown
            assert "raise self.error" in shown
            assert machine.state == "idle"  # before the state change


async def test_a_property_condition_is_read_once_per_trigger() -> None:
    reads: list[int] = []

    class Guarded(MeteredMachine, registry=None):
        states = ["a", "b"]
        transitions = [["go", "a", "b", "ready"], ["back", "b", "a"]]

        @property
        def ready(self) -> bool:
            reads.append(1)
            return True

    machine: Any = Guarded()
    for _ in range(3):
        assert await machine.go() is True
        await machine.back()
    assert len(reads) == 3


async def test_functions_and_import_paths_are_called_as_given() -> None:
    calls: list[str] = []
    IMPORTED.clear()

    def check() -> bool:
        calls.append("check")
        return True

    class Given(MeteredMachine, registry=None):
        states = ["a", "b"]
        transitions = [
            {
                "trigger": "go",
                "source": "a",
                "dest": "b",
                "conditions": check,
                "after": "tests.test_attempts.imported",
            },
            ["back", "b", "a"],
        ]

    machine: Any = Given()
    for _ in range(2):
        assert await machine.go() is True
        await machine.back()
    assert calls == ["check", "check"]
    assert IMPORTED == [1, 1]


IMPORTED: list[int] = []


def imported() -> None:
    IMPORTED.append(1)


async def test_an_awaitable_midway_resumes_after_the_callback_that_returned_it() -> None:
    class Midway(Worker, registry=None):
        async def before(self) -> None:
            self.log.append("before")
            await anyio.lowlevel.checkpoint()
            self.log.append("before done")

    machine: Any = Midway()
    for _ in range(2):
        machine.log.clear()
        assert await machine.start() is True
        assert machine.log == ["ready", "before", "before done", "after"]
        await machine.stop()


async def test_a_failing_candidate_gives_way_to_the_next_one() -> None:
    class Choice(MeteredMachine, registry=None):
        states = ["a", "b", "c"]
        transitions = [
            ["go", "a", "b", "never"],
            ["go", "a", "c", "always"],
            ["back", ["b", "c"], "a"],
        ]

        def never(self) -> bool:
            return False

        async def always(self) -> bool:
            await anyio.lowlevel.checkpoint()
            return True

    machine: Any = Choice()
    for _ in range(2):
        assert await machine.go() is True
        assert machine.state == "c"
        await machine.back()


def test_a_class_and_a_machine_whose_attempts_ran_are_garbage_collected() -> None:
    def make() -> tuple[weakref.ref[Any], weakref.ref[Any]]:
        class Short(MeteredMachine, registry=None):
            states = ["a", "b"]
            transitions = [["go", "a", "b", "ready", None, "pause"]]

            def ready(self) -> bool:
                return True

            async def pause(self) -> None:
                await anyio.lowlevel.checkpoint()

        machine: Any = Short()
        assert anyio.run(machine.go) is True  # compiled, and resumed after `before`
        return weakref.ref(Short), weakref.ref(machine)

    cls, machine = make()
    gc.collect()
    assert machine() is None
    assert cls() is None
