"""Listeners: `add_listener` / `remove_listener` on classes and machines, on asyncio and trio."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from statemachine_metrics import MachineError, MeteredMachine, TransitionEvent
from tests._machines import STATES, TRANSITIONS, metered

pytestmark = pytest.mark.anyio


def subclass(base: Any, name: str, **members: Any) -> Any:
    """A subclass of `base` that reuses its machine and metrics."""
    return type(name, (base,), members)


class Seen:
    """A listener that keeps what it was given."""

    def __init__(self, tag: str = "", into: list[tuple[str, TransitionEvent]] | None = None):
        self.tag = tag
        self.events: list[TransitionEvent] = []
        self.into = into

    def __call__(self, event: TransitionEvent) -> None:
        self.events.append(event)
        if self.into is not None:
            self.into.append((self.tag, event))

    def moves(self) -> list[tuple[str, str, str]]:
        return [(e.trigger, e.source, e.dest) for e in self.events]


def sample(cls: Any, suffix: str, **labels: str) -> float:
    """A sample of the class's metrics, read from its own registry."""
    registry: CollectorRegistry = cls.registry_
    value = registry.get_sample_value(cls.metric_names()[0] + suffix, labels)
    return 0.0 if value is None else value


# -- what a listener gets ------------------------------------------------------------------


async def test_a_class_listener_gets_each_transition_with_its_fields(anyio_backend: str) -> None:
    Worker = metered()
    seen = Seen()
    Worker.add_listener(seen)
    w = Worker()
    await anyio.sleep(0.03)
    before = time.time()
    assert await w.start() is True
    after = time.time()
    assert await w.finish() is True

    assert seen.moves() == [("start", "idle", "running"), ("finish", "running", "idle")]
    first = seen.events[0]
    assert isinstance(first, TransitionEvent)
    assert first.machine is w
    assert first.internal is False
    assert before <= first.time <= after
    assert first.elapsed is not None
    assert 0.02 <= first.elapsed < 5.0
    assert seen.events[1].elapsed is not None
    assert 0.0 <= seen.events[1].elapsed < first.elapsed


async def test_an_internal_transition_keeps_the_state_and_says_so(anyio_backend: str) -> None:
    Worker = metered()
    seen = Seen()
    Worker.add_listener(seen)
    w = Worker()
    await w.start()
    assert await w.heartbeat() is True
    event = seen.events[-1]
    assert (event.trigger, event.source, event.dest) == ("heartbeat", "running", "running")
    assert event.internal is True
    assert event.elapsed is None


async def test_a_reflexive_transition_is_not_internal(anyio_backend: str) -> None:
    Worker = metered()
    seen = Seen()
    Worker.add_listener(seen)
    w = Worker()
    await w.start()
    await anyio.sleep(0.02)
    assert await w.restart() is True
    event = seen.events[-1]
    assert (event.trigger, event.source, event.dest) == ("restart", "running", "running")
    assert event.internal is False
    assert event.elapsed is not None
    assert event.elapsed >= 0.015


async def test_callbacks_do_not_change_what_listeners_get(anyio_backend: str) -> None:
    # With callbacks, a trigger leaves the fast path; listeners see the same events.
    calls: list[str] = []

    async def on_enter_running(self: Any) -> None:
        await anyio.lowlevel.checkpoint()
        calls.append("enter")

    Worker = metered(on_enter_running=on_enter_running)
    seen = Seen()
    Worker.add_listener(seen)
    w = Worker()
    assert await w.start() is True
    assert await w.heartbeat() is True
    assert calls == ["enter"]
    assert [(e.trigger, e.source, e.dest, e.internal) for e in seen.events] == [
        ("start", "idle", "running", False),
        ("heartbeat", "running", "running", True),
    ]


async def test_no_event_for_a_stopped_or_an_invalid_trigger(anyio_backend: str) -> None:
    Worker = metered()
    seen = Seen()
    Worker.add_listener(seen)
    w = Worker()
    assert await w.start_if() is False  # the condition stops it
    with pytest.raises(MachineError):
        await w.finish()  # not valid from idle
    with pytest.raises(AttributeError):
        await w.trigger("nope")
    assert seen.events == []
    assert w.state == "idle"


async def test_the_listener_sees_the_new_state_and_updated_metrics(anyio_backend: str) -> None:
    Worker = metered()
    w = Worker()
    observed: list[tuple[Any, ...]] = []

    def look(event: TransitionEvent) -> None:
        observed.append(
            (
                event.machine.state,
                event.dest,
                sample(
                    Worker,
                    "_transitions_total",
                    **{"from": "idle", "to": "running"},
                    trigger="start",
                ),
                sample(Worker, "_machines", worker_state="running"),
                sample(Worker, "_machines", worker_state="idle"),
                sample(Worker, "", worker_state="running"),
            )
        )

    Worker.add_listener(look)
    await w.start()
    assert observed == [("running", "running", 1.0, 1.0, 0.0, 1.0)]


# -- a listener that raises ----------------------------------------------------------------


async def test_a_listener_that_raises_is_logged_and_the_transition_stands(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    Worker = metered()
    order: list[tuple[str, TransitionEvent]] = []

    def broken(event: TransitionEvent) -> None:
        order.append(("broken", event))
        raise RuntimeError("listener bug")

    Worker.add_listener(broken)
    Worker.add_listener(Seen("class", order))
    w = Worker()
    w.add_listener(Seen("own", order))
    with caplog.at_level(logging.ERROR, logger="statemachine_metrics"):
        assert await w.start() is True
    assert w.state == "running"
    assert (
        sample(Worker, "_transitions_total", trigger="start", **{"from": "idle", "to": "running"})
        == 1.0
    )
    assert sample(Worker, "_machines", worker_state="running") == 1.0
    assert [tag for tag, _ in order] == ["broken", "class", "own"]
    records = [r for r in caplog.records if r.name == "statemachine_metrics"]
    assert len(records) == 1
    assert records[0].levelno == logging.ERROR
    assert records[0].exc_info is not None
    assert isinstance(records[0].exc_info[1], RuntimeError)
    assert "Worker" in records[0].getMessage()
    # The machine goes on working.
    assert await w.finish() is True
    assert [tag for tag, _ in order] == ["broken", "class", "own"] * 2


async def test_an_instance_listener_that_raises_does_not_break_the_trigger(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def on_enter_running(self: Any) -> None:
        await anyio.lowlevel.checkpoint()

    Worker = metered(on_enter_running=on_enter_running)
    w = Worker()

    def broken(event: TransitionEvent) -> None:
        raise ValueError("nope")

    w.add_listener(broken)
    with caplog.at_level(logging.ERROR, logger="statemachine_metrics"):
        assert await w.start() is True
    assert w.state == "running"
    assert sample(Worker, "_errors_total", trigger="start", error="ValueError") == 0.0
    assert any(r.name == "statemachine_metrics" for r in caplog.records)


# -- adding and removing -------------------------------------------------------------------


async def test_remove_listener_stops_it_and_refuses_an_unknown_one(anyio_backend: str) -> None:
    Worker = metered()
    on_class, on_machine = Seen(), Seen()
    Worker.add_listener(on_class)
    w = Worker()
    w.add_listener(on_machine)
    await w.start()
    Worker.remove_listener(on_class)
    w.remove_listener(on_machine)
    await w.finish()
    assert on_class.moves() == on_machine.moves() == [("start", "idle", "running")]

    with pytest.raises(ValueError, match="Worker"):
        Worker.remove_listener(on_class)
    with pytest.raises(ValueError, match="Worker"):
        w.remove_listener(on_machine)
    with pytest.raises(ValueError, match="Worker"):
        w.remove_listener(on_class)  # a class listener is not the machine's own


def test_remove_listener_only_where_it_was_added() -> None:
    Worker = metered()
    Child = subclass(Worker, "Child")
    seen = Seen()
    Worker.add_listener(seen)
    with pytest.raises(ValueError, match="Child"):
        Child.remove_listener(seen)  # it was added on the parent
    with pytest.raises(ValueError, match="MeteredMachine"):
        MeteredMachine.remove_listener(seen)
    Worker.remove_listener(seen)


async def test_a_listener_on_a_template_covers_its_concrete_subclasses(
    anyio_backend: str,
) -> None:
    Template: Any = type(
        "Template",
        (MeteredMachine,),
        {"states": STATES, "transitions": TRANSITIONS, "allowed": False},
        abstract=True,
        registry=CollectorRegistry(),
    )
    seen = Seen()
    Template.add_listener(seen)
    First = subclass(Template, "First")
    Second: Any = type("Second", (Template,), {}, name="second_state")
    first, second = First(), Second()
    await first.start()
    await second.fail()
    assert [(type(e.machine).__name__, e.trigger) for e in seen.events] == [
        ("First", "start"),
        ("Second", "fail"),
    ]


async def test_a_listener_added_twice_is_called_twice_until_removed_twice(
    anyio_backend: str,
) -> None:
    Worker = metered()
    seen = Seen()
    Worker.add_listener(seen)
    Worker.add_listener(seen)
    w = Worker()
    await w.start()
    assert len(seen.events) == 2
    Worker.remove_listener(seen)
    await w.finish()
    assert len(seen.events) == 3
    Worker.remove_listener(seen)
    await w.start()
    assert len(seen.events) == 3
    with pytest.raises(ValueError, match="not a listener"):
        Worker.remove_listener(seen)


async def test_an_instance_listener_sees_only_its_machine(anyio_backend: str) -> None:
    Worker = metered()
    a, b = Worker(), Worker()
    seen = Seen()
    a.add_listener(seen)
    await a.start()
    await b.start()
    await b.fail()
    await a.finish()
    assert [e.machine for e in seen.events] == [a, a]
    assert seen.moves() == [("start", "idle", "running"), ("finish", "running", "idle")]


async def test_a_class_listener_covers_machines_and_subclasses_created_later(
    anyio_backend: str,
) -> None:
    Worker = metered()
    early = Worker()
    # A subclass with a definition (and metrics) of its own, created before the listener.
    Own = subclass(Worker, "Own", states=["new", "old"], transitions=[["age", "new", "old"]])
    seen = Seen()
    Worker.add_listener(seen)

    async def on_enter_error(self: Any) -> None:
        await anyio.lowlevel.checkpoint()

    Child = subclass(Worker, "Child", on_enter_error=on_enter_error)
    late = Worker()
    child = Child()
    await early.start()
    await late.fail()
    await child.fail()
    own = Own()
    await own.age()
    assert [(e.machine, e.trigger) for e in seen.events] == [
        (early, "start"),
        (late, "fail"),
        (child, "fail"),
        (own, "age"),
    ]


async def test_a_listener_on_a_subclass_or_a_sibling_sees_nothing_of_the_parent(
    anyio_backend: str,
) -> None:
    Worker = metered()
    Child = subclass(Worker, "Child")
    Sibling = subclass(Worker, "Sibling")
    on_child, on_sibling = Seen(), Seen()
    Child.add_listener(on_child)
    Sibling.add_listener(on_sibling)
    parent, child = Worker(), Child()
    await parent.start()
    await child.start()
    assert [e.machine for e in on_child.events] == [child]
    assert on_sibling.events == []


async def test_a_class_with_no_listener_calls_none(anyio_backend: str) -> None:
    One = metered("One")
    Other = metered("Other")
    seen = Seen()
    Other.add_listener(seen)
    w = One()
    await w.start()
    await w.heartbeat()
    await w.restart()
    await w.fail()
    assert seen.events == []


async def test_a_listener_on_metered_machine_sees_every_machine(anyio_backend: str) -> None:
    One = metered("One")
    seen = Seen()
    MeteredMachine.add_listener(seen)
    try:
        Two = metered("Two")  # a class created after the listener was added
        one, two = One(), Two()
        await one.start()
        await two.fail()
    finally:
        MeteredMachine.remove_listener(seen)
    await one.finish()
    assert [(e.machine, e.trigger) for e in seen.events] == [(one, "start"), (two, "fail")]


async def test_listeners_run_base_classes_first_then_the_machines_own(anyio_backend: str) -> None:
    Worker = metered()
    Child = subclass(Worker, "Child")
    order: list[tuple[str, TransitionEvent]] = []
    c = Child()
    # Added in the reverse of the order they run in.
    c.add_listener(Seen("own", order))
    Child.add_listener(Seen("child", order))
    Worker.add_listener(Seen("worker", order))
    on_base = Seen("base", order)
    MeteredMachine.add_listener(on_base)
    try:
        await c.start()
    finally:
        MeteredMachine.remove_listener(on_base)
    assert [tag for tag, _ in order] == ["base", "worker", "child", "own"]


# -- nested triggers and timeouts ----------------------------------------------------------


async def test_nested_triggers_are_each_notified_once_in_the_order_they_changed_state(
    anyio_backend: str,
) -> None:
    async def on_enter_running(self: Any) -> None:
        await self.finish()  # nested in start's transition, after its state change

    async def before_fail(self: Any) -> None:
        await self.start()  # nested before fail's state change: fail leaves running

    Worker = metered(
        on_enter_running=on_enter_running,
        before_fail=before_fail,
        transitions=[
            *TRANSITIONS[:2],
            {
                "trigger": "fail",
                "source": ["idle", "running"],
                "dest": "error",
                "before": "before_fail",
            },
            *TRANSITIONS[3:],
        ],
    )
    seen = Seen()
    Worker.add_listener(seen)
    w = Worker()
    assert await w.start() is True
    assert seen.moves() == [("start", "idle", "running"), ("finish", "running", "idle")]
    assert w.state == "idle"

    del seen.events[:]
    assert await w.fail() is True
    assert w.state == "error"
    # fail's before callback ran start (which ran finish) before fail changed the state.
    assert seen.moves() == [
        ("start", "idle", "running"),
        ("finish", "running", "idle"),
        ("fail", "idle", "error"),
    ]


async def test_a_state_timeout_notifies_listeners(anyio_backend: str) -> None:
    Worker = metered(timeouts={"running": (0.02, "fail")})
    seen = Seen()
    Worker.add_listener(seen)
    failed = anyio.Event()
    Worker.add_listener(lambda event: failed.set() if event.dest == "error" else None)
    async with Worker() as w:
        await w.start()
        with anyio.fail_after(5):
            await failed.wait()
    assert seen.moves() == [("start", "idle", "running"), ("fail", "running", "error")]
    assert seen.events[1].machine is w
    assert seen.events[1].elapsed is not None
    assert seen.events[1].elapsed >= 0.015


# -- any sequence --------------------------------------------------------------------------

TRIGGERS = [t["trigger"] if isinstance(t, dict) else t[0] for t in TRANSITIONS]


@settings(max_examples=30, deadline=None)
@given(
    backend=st.sampled_from(["asyncio", "trio"]),
    triggers=st.lists(st.sampled_from(TRIGGERS), max_size=12),
    machines=st.integers(min_value=1, max_value=3),
)
def test_listeners_see_exactly_the_transitions_that_ran(
    backend: str, triggers: list[str], machines: int
) -> None:
    Worker = metered()
    on_class = Seen()
    Worker.add_listener(on_class)

    async def main() -> None:
        fleet = [Worker() for _ in range(machines)]
        own = [Seen() for _ in fleet]
        for machine, listener in zip(fleet, own):
            machine.add_listener(listener)
        expected: list[list[tuple[str, str, str, bool]]] = [[] for _ in fleet]
        for i, trigger in enumerate(triggers):
            k = i % len(fleet)
            machine = fleet[k]
            source = machine.state
            try:
                ran = await machine.trigger(trigger)
            except MachineError:
                assert machine.state == source
                continue
            if ran:
                internal = trigger == "heartbeat"
                expected[k].append((trigger, source, machine.state, internal))
        for k, listener in enumerate(own):
            got = [(e.trigger, e.source, e.dest, e.internal) for e in listener.events]
            assert got == expected[k]
            assert all(e.machine is fleet[k] for e in listener.events)
        total = sum(len(moves) for moves in expected)
        assert len(on_class.events) == total
        ran_total = sum(
            sample(Worker, "_transitions_total", trigger=t, **{"from": s, "to": d})
            for t, s, d in {(e.trigger, e.source, e.dest) for e in on_class.events}
        )
        assert ran_total == total

    anyio.run(main, backend=backend)
