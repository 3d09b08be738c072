"""MeteredMachine instances: the trigger API, callbacks, serialization, cancellation, errors,
the metrics every machine class exports, and the lifecycle of a machine."""

from __future__ import annotations

import functools
import gc
import inspect
import types
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from prometheus_client import CollectorRegistry
from transitions.extensions.asyncio import AsyncMachine

from statemachine_metrics import MachineCollector, MachineError, MeteredMachine

pytestmark = pytest.mark.anyio

Labels = dict[str, str]


# -- reading metrics --------------------------------------------------------------------------


def scrape(cls: type[MeteredMachine]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(MachineCollector(cls))
    return registry


def enum_state(cls: type[MeteredMachine], **labels: str) -> str | None:
    """The state at 1 in the Enum series with exactly these label values; None if absent."""
    name = cls.metric_names()[0]
    (enum,) = [metric for metric in scrape(cls).collect() if metric.name == name]
    series = [
        sample
        for sample in enum.samples
        if {k: v for k, v in sample.labels.items() if k != name} == labels
    ]
    if not series:
        return None
    assert sorted(sample.labels[name] for sample in series) == sorted(cls.state_names())
    (current,) = [sample.labels[name] for sample in series if sample.value == 1]
    assert all(sample.value == 0 for sample in series if sample.labels[name] != current)
    return current


def machines(cls: type[MeteredMachine]) -> dict[str, float | None]:
    """The ``_machines`` gauge: live machines in each state."""
    name = cls.metric_names()[0]
    registry = scrape(cls)
    return {
        state: registry.get_sample_value(f"{name}_machines", {name: state})
        for state in cls.state_names()
    }


def counts(cls: type[MeteredMachine], **live: int) -> dict[str, float]:
    """What `machines` shows with `live` machines in the given states, 0 elsewhere."""
    return {state: float(live.get(state, 0)) for state in cls.state_names()}


def transitions_total(cls: type[MeteredMachine], source: str, dest: str, trigger: str) -> float:
    name = cls.metric_names()[0]
    labels = {"from": source, "to": dest, "trigger": trigger}
    value = scrape(cls).get_sample_value(f"{name}_transitions_total", labels)
    assert value is not None, f"no transitions_total series for {labels}"
    return value


def errors_total(cls: type[MeteredMachine]) -> dict[tuple[str, str], float]:
    name = cls.metric_names()[0]
    (errors,) = [m for m in scrape(cls).collect() if m.name == f"{name}_errors"]
    return {
        (s.labels["trigger"], s.labels["error"]): s.value
        for s in errors.samples
        if s.name.endswith("_total")
    }


def duration(cls: type[MeteredMachine], state: str, suffix: str, **labels: str) -> float | None:
    name = cls.metric_names()[0]
    return scrape(cls).get_sample_value(
        f"{name}_duration_seconds_{suffix}", {name: state, **labels}
    )


def assert_consistent(cls: type[MeteredMachine], machine: MeteredMachine, **labels: str) -> None:
    """The machine's series shows its state, and it is the one live machine of the class."""
    assert enum_state(cls, **labels) == machine.state
    assert machines(cls) == counts(cls, **{machine.state: 1})


# -- machine classes --------------------------------------------------------------------------


def worker_class(labelnames: tuple[str, ...] = ("worker",)) -> type[MeteredMachine]:
    """A fresh class each time, so that counters start from zero."""

    class Worker(MeteredMachine, registry=None, labelnames=labelnames):
        """Current state of the background worker"""

        states = ["idle", "running", "error"]
        transitions = [
            ["start", "idle", "running"],
            ["finish", "running", "idle"],
            ["fail", ["idle", "running"], "error"],
            {"trigger": "reset", "source": "error", "dest": "idle"},
        ]

    return Worker


def record(name: str, result: object = None, *, asynchronous: bool) -> Callable[..., Any]:
    """A callback method that appends (name, state, args, kwargs) to ``self.calls``."""
    if asynchronous:

        async def callback(self: Any, *args: Any, **kwargs: Any) -> object:
            self.calls.append((name, self.state, args, kwargs))
            await anyio.lowlevel.checkpoint()
            return result

    else:

        def callback(self: Any, *args: Any, **kwargs: Any) -> object:
            self.calls.append((name, self.state, args, kwargs))
            return result

    return callback


def recorded_class(asynchronous: bool) -> type[MeteredMachine]:
    class Recorded(MeteredMachine, registry=None):
        states = [
            {"name": "a", "on_exit": "exit_listed"},
            {"name": "b", "on_enter": ["enter_listed"]},
        ]
        transitions = [
            {
                "trigger": "go",
                "source": "a",
                "dest": "b",
                "prepare": "prepare",
                "conditions": "condition",
                "unless": "unless_",
                "before": "before",
                "after": "after",
            },
            {"trigger": "poke", "source": "a", "dest": None, "before": "before", "after": "after"},
            {"trigger": "again", "source": "a", "dest": "=", "before": "before"},
            ["back", "b", "a"],
        ]

        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[str, str, tuple[Any, ...], dict[str, Any]]] = []

        prepare = record("prepare", asynchronous=asynchronous)
        condition = record("condition", True, asynchronous=asynchronous)
        unless_ = record("unless", False, asynchronous=asynchronous)
        before = record("before", asynchronous=asynchronous)
        exit_listed = record("exit_listed", asynchronous=asynchronous)
        on_exit_a = record("on_exit_a", asynchronous=asynchronous)
        enter_listed = record("enter_listed", asynchronous=asynchronous)
        on_enter_b = record("on_enter_b", asynchronous=asynchronous)
        on_enter_a = record("on_enter_a", asynchronous=asynchronous)
        after = record("after", asynchronous=asynchronous)

    return Recorded


# Callbacks of one phase run concurrently when they are async (as AsyncMachine gathers
# them), so only the order of phases is fixed; sync callbacks run in list order.
GO_PHASES = [
    ["prepare"],
    ["condition", "unless"],
    ["before"],
    ["exit_listed", "on_exit_a"],
    ["enter_listed", "on_enter_b"],
    ["after"],
]


def assert_phases(names: list[str], phases: list[list[str]], asynchronous: bool) -> None:
    flat = [name for phase in phases for name in phase]
    if not asynchronous:
        assert names == flat
        return
    assert len(names) == len(flat), names
    start = 0
    for phase in phases:
        assert sorted(names[start : start + len(phase)]) == sorted(phase), names
        start += len(phase)


# -- instances --------------------------------------------------------------------------------


async def test_new_machine_state_and_generated_methods() -> None:
    worker = worker_class()(labels={"worker": "w1"})
    assert worker.state == "idle"
    assert worker.is_idle()
    assert not worker.is_running()
    assert worker.labels == {"worker": "w1"}
    assert not worker.closed
    assert await worker.start() is True
    assert worker.state == "running"
    assert worker.is_running()
    assert not worker.is_idle()


@pytest.mark.parametrize(
    "labels",
    [None, {}, {"pool": "p"}, {"worker": "w1", "pool": "p"}],
    ids=["none", "empty", "wrong-name", "extra-name"],
)
def test_labels_must_match_labelnames(labels: Labels | None) -> None:
    cls = worker_class()
    with pytest.raises(ValueError, match="labels must be exactly worker"):
        cls(labels=labels)
    assert machines(cls) == counts(cls)


def test_labels_for_an_unlabelled_class() -> None:
    cls = worker_class(())
    with pytest.raises(ValueError, match="labels must be exactly none; got worker"):
        cls(labels={"worker": "w1"})
    assert cls(labels={}).state == "idle"


def test_label_values_are_strings() -> None:
    cls = worker_class(("worker", "pool"))
    worker = cls(labels={"pool": "p", "worker": 7})
    assert worker.labels == {"worker": "7", "pool": "p"}
    assert enum_state(cls, worker="7", pool="p") == "idle"


@pytest.mark.parametrize("initial", ["nope", "", 3])
def test_unknown_initial_state(initial: Any) -> None:
    cls = worker_class()
    with pytest.raises(ValueError, match=f"unknown initial state {initial!r}"):
        cls(labels={"worker": "w1"}, initial=initial)
    assert machines(cls) == counts(cls)
    assert enum_state(cls, worker="w1") is None


async def test_initial_restores_a_state() -> None:
    cls = worker_class()
    worker = cls(labels={"worker": "w1"}, initial="error")
    assert worker.state == "error"
    assert worker.is_error()
    assert_consistent(cls, worker, worker="w1")
    assert await worker.reset()
    assert worker.state == "idle"
    assert transitions_total(cls, "error", "idle", "reset") == 1
    assert duration(cls, "error", "count") == 1


async def test_trigger_by_name() -> None:
    worker = worker_class()(labels={"worker": "w1"})
    assert await worker.trigger("start") is True
    assert worker.state == "running"
    assert await worker.trigger("fail") is True
    assert worker.state == "error"


async def test_trigger_by_unknown_name() -> None:
    worker = worker_class()(labels={"worker": "w1"})
    with pytest.raises(AttributeError, match="nope"):
        await worker.trigger("nope")
    assert worker.state == "idle"


async def test_invalid_trigger_raises_machine_error_and_counts() -> None:
    cls = worker_class()
    worker = cls(labels={"worker": "w1"})
    with pytest.raises(MachineError, match="finish"):
        await worker.finish()
    with pytest.raises(MachineError):
        await worker.trigger("reset")
    assert worker.state == "idle"
    assert_consistent(cls, worker, worker="w1")
    assert errors_total(cls) == {("finish", "MachineError"): 1, ("reset", "MachineError"): 1}
    assert await worker.start()  # the machine is still usable


# -- callbacks --------------------------------------------------------------------------------


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_callback_order_and_arguments(asynchronous: bool) -> None:
    machine: Any = recorded_class(asynchronous)()
    assert await machine.go(1, "two", key="value") is True
    names = [name for name, *_ in machine.calls]
    assert_phases(names, GO_PHASES, asynchronous)
    for name, state, args, kwargs in machine.calls:
        assert (args, kwargs) == ((1, "two"), {"key": "value"}), name
        # The state changes between exit and enter.
        before_change = name in ("prepare", "condition", "unless", "before") or "exit" in name
        assert state == ("a" if before_change else "b"), name


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_internal_transition_runs_no_exit_or_enter(asynchronous: bool) -> None:
    cls = recorded_class(asynchronous)
    machine: Any = cls()
    assert await machine.poke(5)
    assert [(name, args) for name, _, args, _ in machine.calls] == [
        ("before", (5,)),
        ("after", (5,)),
    ]
    assert machine.state == "a"
    assert transitions_total(cls, "a", "a", "poke") == 1
    assert duration(cls, "a", "count") == 0  # the state was not left
    assert_consistent(cls, machine)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_reflexive_transition_exits_and_enters(asynchronous: bool) -> None:
    cls = recorded_class(asynchronous)
    machine: Any = cls()
    assert await machine.again()
    names = [name for name, *_ in machine.calls]
    assert_phases(names, [["before"], ["exit_listed", "on_exit_a"], ["on_enter_a"]], asynchronous)
    assert machine.state == "a"
    assert transitions_total(cls, "a", "a", "again") == 1
    assert duration(cls, "a", "count") == 1
    assert_consistent(cls, machine)


async def test_callbacks_given_as_callables() -> None:
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def prepare(*args: Any, **kwargs: Any) -> None:
        calls.append(("prepare", args, kwargs))

    async def condition(*args: Any, **kwargs: Any) -> bool:
        calls.append(("condition", args, kwargs))
        return True

    def unless(*args: Any, **kwargs: Any) -> bool:
        calls.append(("unless", args, kwargs))
        return False

    async def before(*args: Any, **kwargs: Any) -> None:
        calls.append(("before", args, kwargs))

    def on_exit(*args: Any, **kwargs: Any) -> None:
        calls.append(("exit", args, kwargs))

    async def on_enter(*args: Any, **kwargs: Any) -> None:
        calls.append(("enter", args, kwargs))

    def after(*args: Any, **kwargs: Any) -> None:
        calls.append(("after", args, kwargs))

    class Machine(MeteredMachine, registry=None):
        states = [{"name": "a", "on_exit": on_exit}, {"name": "b", "on_enter": [on_enter]}]
        transitions = [
            {
                "trigger": "go",
                "source": "a",
                "dest": "b",
                "prepare": prepare,
                "conditions": [condition],
                "unless": unless,
                "before": before,
                "after": [after],
            }
        ]

    machine = Machine()
    assert await machine.go(3, flag=True)
    assert all(call[1:] == ((3,), {"flag": True}) for call in calls)
    phases = [["prepare"], ["condition", "unless"], ["before"], ["exit"], ["enter"], ["after"]]
    assert_phases([name for name, *_ in calls], phases, asynchronous=True)
    assert machine.state == "b"


CALLBACK_NAMES = ["prepare", "c1", "c2", "b1", "b2", "on_exit_a", "on_enter_b", "a1", "a2"]


def asyncmachine_order(sync: set[str]) -> tuple[Any, Any]:
    """A transitions AsyncMachine model and one of ours, recording callbacks in ``.calls``.

    Callbacks named in `sync` are plain functions, the others coroutine functions.
    """

    def callback(name: str) -> Callable[..., Any]:
        if name in sync:

            def plain(self: Any, *args: Any, **kwargs: Any) -> bool:
                self.calls.append(name)
                return True

            return plain

        async def coroutine(self: Any, *args: Any, **kwargs: Any) -> bool:
            self.calls.append(name)
            await anyio.lowlevel.checkpoint()
            return True

        return coroutine

    callbacks = {name: callback(name) for name in CALLBACK_NAMES}
    states = ["a", "b"]
    transitions = [
        {
            "trigger": "go",
            "source": "a",
            "dest": "b",
            "prepare": "prepare",
            "conditions": ["c1", "c2"],
            "before": ["b1", "b2"],
            "after": ["a1", "a2"],
        }
    ]
    model: Any = type("Model", (), {**callbacks, "calls": None})()
    model.calls = []
    AsyncMachine(model=model, states=states, transitions=transitions, initial="a")
    ours: Any = types.new_class(
        "Ours",
        (MeteredMachine,),
        {"registry": None},
        lambda ns: ns.update(callbacks, states=states, transitions=transitions),
    )()
    ours.calls = []
    return model, ours


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_callbacks_run_as_asyncmachine_runs_them(kind: str) -> None:
    model, ours = asyncmachine_order(set(CALLBACK_NAMES) if kind == "sync" else set())
    assert await model.go(1, k=2)
    assert await ours.go(1, k=2)
    assert ours.calls == model.calls


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_mixed_sync_and_async_callbacks_run_as_asyncmachine_runs_them() -> None:
    model, ours = asyncmachine_order({"c2", "b2", "a2"})
    assert await model.go()
    assert await ours.go()
    assert ours.calls == model.calls


def gate_class() -> type[Any]:
    """A fresh class each time, so that counters start from zero."""

    class Gate(MeteredMachine, registry=None):
        states = ["closed", "open", "fast", "slow"]
        transitions = [
            {
                "trigger": "open_",
                "source": "closed",
                "dest": "open",
                "conditions": ["allowed", "allowed_async"],
                "unless": "jammed",
            },
            ["close", "open", "closed"],
            {"trigger": "route", "source": "closed", "dest": "fast", "conditions": "express"},
            {"trigger": "route", "source": "closed", "dest": "slow"},
            {"trigger": "unlock", "source": "closed", "dest": "open", "conditions": "has_key"},
        ]

        def __init__(self, ok: bool = True, ok_async: bool = True, jam: bool = False) -> None:
            super().__init__()
            self.ok, self.ok_async, self.jam = ok, ok_async, jam

        def allowed(self) -> bool:
            return self.ok

        async def allowed_async(self) -> bool:
            await anyio.lowlevel.checkpoint()
            return self.ok_async

        @property
        def jammed(self) -> bool:
            return self.jam

        @property
        def express(self) -> bool:
            return self.ok

        def has_key(self, key: str | None = None) -> bool:
            return key == "secret"

    return Gate


@pytest.mark.parametrize(
    ("ok", "ok_async", "jam", "expected"),
    [
        (True, True, False, True),
        (False, True, False, False),
        (True, False, False, False),
        (True, True, True, False),
    ],
    ids=["all-pass", "sync-condition-fails", "async-condition-fails", "unless-property-holds"],
)
async def test_conditions_decide_the_result(
    ok: bool, ok_async: bool, jam: bool, expected: bool
) -> None:
    gate = gate_class()(ok, ok_async, jam)
    assert await gate.may_open_() is expected
    assert await gate.open_() is expected
    assert gate.state == ("open" if expected else "closed")


async def test_first_transition_whose_conditions_pass_runs() -> None:
    cls = gate_class()
    fast, slow = cls(ok=True), cls(ok=False)
    assert await fast.route() is True
    assert await slow.route() is True
    assert (fast.state, slow.state) == ("fast", "slow")


async def test_conditions_get_the_trigger_arguments() -> None:
    gate = gate_class()()
    assert await gate.unlock(key="wrong") is False
    assert await gate.may_unlock(key="secret") is True
    assert await gate.unlock(key="secret") is True
    assert gate.state == "open"


async def test_condition_stop_changes_no_metric() -> None:
    cls = gate_class()
    gate = cls(ok=False)
    assert await gate.open_() is False
    assert transitions_total(cls, "closed", "open", "open_") == 0
    assert duration(cls, "closed", "count") == 0
    assert errors_total(cls) == {}
    assert_consistent(cls, gate)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_may_runs_prepare_and_conditions_only(asynchronous: bool) -> None:
    cls = recorded_class(asynchronous)
    machine: Any = cls()
    assert await machine.may_go(1, key="v") is True
    names = [name for name, *_ in machine.calls]
    assert_phases(names, GO_PHASES[:2], asynchronous)
    assert all(call[2:] == ((1,), {"key": "v"}) for call in machine.calls)
    assert machine.state == "a"
    assert transitions_total(cls, "a", "b", "go") == 0
    assert_consistent(cls, machine)


async def test_may_is_false_for_a_trigger_invalid_here() -> None:
    worker = worker_class()(labels={"worker": "w1"})
    assert await worker.may_finish() is False
    assert await worker.may_start() is True
    assert worker.state == "idle"


# -- one transition at a time -----------------------------------------------------------------


def chain_class() -> type[Any]:

    class Chain(MeteredMachine, registry=None):
        states = [
            "a",
            "b",
            {"name": "c", "on_enter": ["noted", "forward"]},
            "d",
        ]
        transitions = [["go", "a", "b"], ["next_", "b", "c"], ["last", "c", "d"]]

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        async def on_enter_b(self) -> None:
            assert await self.next_()
            self.seen.append(self.state)

        async def noted(self) -> None:
            await anyio.lowlevel.checkpoint()
            self.seen.append("noted")

        async def forward(self) -> None:
            # Nested from one of two callbacks that run concurrently.
            await anyio.lowlevel.checkpoint()
            assert await self.trigger("last")

    return Chain


async def test_trigger_from_own_callback_runs_nested() -> None:
    cls = chain_class()
    chain = cls()
    with anyio.fail_after(2):
        assert await chain.go()
    assert chain.state == "d"
    assert sorted(chain.seen) == ["d", "noted"]
    assert transitions_total(cls, "a", "b", "go") == 1
    assert transitions_total(cls, "b", "c", "next_") == 1
    assert transitions_total(cls, "c", "d", "last") == 1
    assert_consistent(cls, chain)


def serial_class() -> type[MeteredMachine]:
    class Serial(MeteredMachine, registry=None):
        states = ["a", "b"]
        transitions = [
            {
                "trigger": "tick",
                "source": ["a", "b"],
                "dest": "b",
                "prepare": "step",
                "conditions": "check",
                "before": "step",
                "after": "step",
            },
        ]

        def __init__(self) -> None:
            super().__init__()
            self.log: list[tuple[str, int]] = []

        async def step(self, i: int) -> None:
            self.log.append(("enter", i))
            await anyio.lowlevel.checkpoint()
            await anyio.lowlevel.checkpoint()
            self.log.append(("leave", i))

        async def check(self, i: int) -> bool:
            await self.step(i)
            return True

        on_exit_a = on_exit_b = on_enter_b = step

    return Serial


async def test_concurrent_triggers_run_one_at_a_time_in_arrival_order() -> None:
    cls = serial_class()
    machine: Any = cls()
    arrivals: list[int] = []

    async def fire(i: int) -> None:
        arrivals.append(i)
        assert await machine.tick(i)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            for i in range(20):
                group.start_soon(fire, i)

    assert len(arrivals) == 20
    log = machine.log
    # Callbacks never interleave: every enter is followed by its own leave.
    assert all(
        log[k][0] == "enter" and log[k + 1] == ("leave", log[k][1]) for k in range(0, len(log), 2)
    )
    # Each transition's callbacks run together, transitions in arrival order.
    order = [i for kind, i in log if kind == "enter"]
    per_transition = [6] * 20  # prepare, check, before, exit, enter, after
    ran: list[int] = []
    start = 0
    for size in per_transition:
        chunk = order[start : start + size]
        assert len(set(chunk)) == 1, order
        ran.append(chunk[0])
        start += size
    assert ran == arrivals
    assert transitions_total(cls, "a", "b", "tick") == 1
    assert transitions_total(cls, "b", "b", "tick") == 19
    assert_consistent(cls, machine)


async def test_concurrent_triggers_on_separate_machines_interleave() -> None:
    cls = serial_class()
    first: Any = cls()
    second: Any = cls()
    second.log = first.log
    with anyio.fail_after(2):
        async with anyio.create_task_group() as group:
            group.start_soon(first.tick, 1)
            group.start_soon(second.tick, 2)
    # One turn per machine, not per class: their callbacks overlapped.
    assert len(first.log) == 24
    assert any(first.log[k][1] != first.log[k + 1][1] for k in range(0, 24, 2))
    assert machines(cls) == counts(cls, b=2)


# -- cancellation -----------------------------------------------------------------------------


# ``go`` a -> b with a callback named after each phase; ``back`` returns.
EVERY_PHASE = [
    {
        "trigger": "go",
        "source": "a",
        "dest": "b",
        "prepare": "prepare",
        "conditions": "condition",
        "before": "before",
        "after": "after",
    },
    ["back", "b", "a"],
]


def blocking_class() -> type[MeteredMachine]:
    """``go`` a -> b with an async callback in every phase; ``block`` names the phase that
    stops (on an Event, ``gate``) until released or cancelled."""

    class Blocking(MeteredMachine, registry=None, labelnames=("id",)):
        states = ["a", "b"]
        transitions = EVERY_PHASE

        def __init__(self, block: str | None = None) -> None:
            super().__init__(labels={"id": "1"})
            self.block = block
            self.reached = anyio.Event()
            self.gate = anyio.Event()
            self.phases: list[str] = []

        async def _phase(self, phase: str) -> None:
            self.phases.append(phase)
            if phase == self.block:
                self.reached.set()
                await self.gate.wait()

        async def prepare(self) -> None:
            await self._phase("prepare")

        async def condition(self) -> bool:
            await self._phase("condition")
            return True

        async def before(self) -> None:
            await self._phase("before")

        async def on_exit_a(self) -> None:
            await self._phase("exit")

        async def on_enter_b(self) -> None:
            await self._phase("enter")

        async def after(self) -> None:
            await self._phase("after")

    return Blocking


PHASES_AND_STATES = [
    ("prepare", "a"),
    ("condition", "a"),
    ("before", "a"),
    ("exit", "a"),
    ("enter", "b"),
    ("after", "b"),
]


@pytest.mark.parametrize(("phase", "expected"), PHASES_AND_STATES)
async def test_cancellation_in_a_callback_keeps_metric_and_state_together(
    phase: str, expected: str
) -> None:
    cls = blocking_class()
    machine: Any = cls(block=phase)
    with anyio.fail_after(2):
        async with anyio.create_task_group() as group:
            group.start_soon(machine.go)
            await machine.reached.wait()
            group.cancel_scope.cancel()
    assert machine.phases[-1] == phase
    assert machine.state == expected
    assert_consistent(cls, machine, id="1")
    assert transitions_total(cls, "a", "b", "go") == (1 if expected == "b" else 0)
    assert errors_total(cls) == {}  # a cancellation is not an error

    machine.block = None
    with anyio.fail_after(1):  # not stuck: the next trigger runs
        assert await (machine.go() if expected == "a" else machine.back())
    assert machine.state == ("b" if expected == "a" else "a")
    assert_consistent(cls, machine, id="1")


@pytest.mark.parametrize(("phase", "expected"), PHASES_AND_STATES)
async def test_cancellation_by_timeout(phase: str, expected: str) -> None:
    cls = blocking_class()
    machine: Any = cls(block=phase)
    with anyio.move_on_after(0.01) as scope:
        await machine.go()
    assert scope.cancelled_caught
    assert machine.state == expected
    assert_consistent(cls, machine, id="1")
    machine.block = None
    with anyio.fail_after(1):
        await machine.trigger("go" if expected == "a" else "back")
    assert_consistent(cls, machine, id="1")


async def test_cancelled_while_queued_gives_up_its_turn() -> None:
    cls = blocking_class()
    machine: Any = cls(block="before")
    queued = anyio.CancelScope()

    async def cancelled_go() -> None:
        with queued:
            await machine.go()
        assert queued.cancelled_caught

    with anyio.fail_after(2):
        async with anyio.create_task_group() as group:
            group.start_soon(machine.go)
            await machine.reached.wait()
            group.start_soon(cancelled_go)
            group.start_soon(machine.back)  # queued behind both
            await anyio.wait_all_tasks_blocked()
            queued.cancel()
            await anyio.wait_all_tasks_blocked()
            assert machine.phases == ["prepare", "condition", "before"]
            machine.gate.set()
    # go ran once (the cancelled one never started), then back.
    assert machine.phases == ["prepare", "condition", "before", "exit", "enter", "after"]
    assert machine.state == "a"
    assert transitions_total(cls, "a", "b", "go") == 1
    assert transitions_total(cls, "b", "a", "back") == 1
    assert_consistent(cls, machine, id="1")


async def test_cancelled_as_its_turn_comes_does_not_stick_the_machine() -> None:
    cls = blocking_class()
    machine: Any = cls(block="before")
    handed = anyio.CancelScope()

    async def first() -> None:
        await machine.go()
        handed.cancel()  # at once, as the turn is handed to the next in line

    async def second() -> None:
        with handed:
            await machine.back()

    with anyio.fail_after(2):
        async with anyio.create_task_group() as group:
            group.start_soon(first)
            await machine.reached.wait()
            group.start_soon(second)
            await anyio.wait_all_tasks_blocked()
            machine.gate.set()
        # Whether `back` ran or not, the machine agrees with its metric and moves on.
        assert_consistent(cls, machine, id="1")
        assert await machine.trigger("back" if machine.state == "b" else "go")
    assert_consistent(cls, machine, id="1")


# -- exceptions -------------------------------------------------------------------------------


class Boom(Exception):
    pass


def fragile_class(asynchronous: bool) -> type[MeteredMachine]:
    def phase_method(phase: str, result: object = None) -> Callable[..., Any]:
        if asynchronous:

            async def callback(self: Any) -> object:
                await anyio.lowlevel.checkpoint()
                if self.fail == phase:
                    raise Boom(phase)
                return result

        else:

            def callback(self: Any) -> object:
                if self.fail == phase:
                    raise Boom(phase)
                return result

        return callback

    class Fragile(MeteredMachine, registry=None, labelnames=("id",)):
        states = ["a", "b"]
        transitions = EVERY_PHASE

        def __init__(self, fail: str | None) -> None:
            super().__init__(labels={"id": "1"})
            self.fail = fail

        prepare = phase_method("prepare")
        condition = phase_method("condition", True)
        before = phase_method("before")
        on_exit_a = phase_method("exit")
        on_enter_b = phase_method("enter")
        after = phase_method("after")

    return Fragile


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(("phase", "expected"), PHASES_AND_STATES)
async def test_exception_in_a_callback_propagates_and_counts(
    phase: str, expected: str, asynchronous: bool
) -> None:
    cls = fragile_class(asynchronous)
    machine: Any = cls(fail=phase)
    with pytest.raises(Boom, match=phase):
        await machine.go()
    assert machine.state == expected
    assert_consistent(cls, machine, id="1")
    assert errors_total(cls) == {("go", "Boom"): 1}
    assert transitions_total(cls, "a", "b", "go") == (1 if expected == "b" else 0)


@pytest.mark.parametrize(("phase", "expected"), PHASES_AND_STATES)
async def test_machine_usable_after_an_exception(phase: str, expected: str) -> None:
    cls = fragile_class(True)
    machine: Any = cls(fail=phase)
    with pytest.raises(Boom):
        await machine.go()
    machine.fail = None
    with anyio.fail_after(1):
        assert await machine.trigger("go" if expected == "a" else "back")
    assert machine.state == ("b" if expected == "a" else "a")
    assert_consistent(cls, machine, id="1")
    assert errors_total(cls) == {("go", "Boom"): 1}


# -- metrics ----------------------------------------------------------------------------------


def test_new_machine_writes_its_initial_state() -> None:
    cls = worker_class()
    assert enum_state(cls, worker="w1") is None
    first = cls(labels={"worker": "w1"})
    assert enum_state(cls, worker="w1") == "idle"
    second = cls(labels={"worker": "w2"}, initial="running")
    assert enum_state(cls, worker="w2") == "running"
    assert machines(cls) == counts(cls, idle=1, running=1)
    del first, second


async def test_unlabelled_class_has_one_series() -> None:
    cls = worker_class(())
    assert enum_state(cls) == "idle"  # exists before any machine, like an unlabelled Enum
    worker = cls()
    assert await worker.start()
    assert enum_state(cls) == "running"
    other = cls()  # a new machine writes its initial state
    assert enum_state(cls) == "idle"
    assert machines(cls) == counts(cls, idle=1, running=1)
    del other


async def test_machines_sharing_labels_share_one_series() -> None:
    cls = worker_class()
    first = cls(labels={"worker": "w"})
    second = cls(labels={"worker": "w"})
    assert await first.start()
    assert enum_state(cls, worker="w") == "running"
    assert await second.fail()
    assert enum_state(cls, worker="w") == "error"  # last transition wins
    assert await first.finish()
    assert enum_state(cls, worker="w") == "idle"
    assert machines(cls) == counts(cls, idle=1, error=1)


async def test_machines_gauge_counts_live_machines_per_state() -> None:
    cls = worker_class()
    assert machines(cls) == counts(cls)  # every state listed, zeros included
    workers = [cls(labels={"worker": str(i)}) for i in range(5)]
    for worker in workers[:3]:
        await worker.start()
    await workers[0].fail()
    assert machines(cls) == counts(cls, idle=2, running=2, error=1)
    await workers[1].aclose()
    assert machines(cls) == counts(cls, idle=2, running=1, error=1)


async def test_transitions_total_by_from_to_and_trigger() -> None:
    cls = worker_class()
    worker = cls(labels={"worker": "w1"})
    await worker.start()
    await worker.fail()
    await worker.reset()
    await worker.fail()
    await worker.reset()
    assert transitions_total(cls, "idle", "running", "start") == 1
    assert transitions_total(cls, "running", "error", "fail") == 1
    assert transitions_total(cls, "idle", "error", "fail") == 1
    assert transitions_total(cls, "error", "idle", "reset") == 2
    assert transitions_total(cls, "running", "idle", "finish") == 0


async def test_duration_observes_time_in_a_state_when_it_is_left() -> None:
    cls = worker_class(())
    worker = cls()
    await worker.start()
    await anyio.sleep(0.05)
    assert duration(cls, "running", "count") == 0  # still in it: not observed yet
    await worker.finish()
    running_sum = duration(cls, "running", "sum")
    assert running_sum is not None
    assert running_sum >= 0.05
    assert duration(cls, "running", "count") == 1
    assert duration(cls, "running", "bucket", le="0.01") == 0
    assert duration(cls, "running", "bucket", le="1.0") == 1
    assert duration(cls, "running", "bucket", le="+Inf") == 1
    assert duration(cls, "idle", "count") == 1
    assert duration(cls, "error", "count") == 0
    assert duration(cls, "error", "sum") == 0


async def test_duration_buckets_of_the_class() -> None:
    class Timed(MeteredMachine, registry=None):
        states = ["a", "b"]
        transitions = [["go", "a", "b"]]
        duration_buckets = [0.01, 10.0]

    machine = Timed()
    await anyio.sleep(0.02)
    await machine.go()
    assert duration(Timed, "a", "bucket", le="0.01") == 0
    assert duration(Timed, "a", "bucket", le="10.0") == 1
    assert duration(Timed, "a", "bucket", le="+Inf") == 1
    assert duration(Timed, "a", "bucket", le="1.0") is None


# -- lifecycle --------------------------------------------------------------------------------


async def test_aclose_ends_a_machine_and_its_label_set_with_the_last() -> None:
    cls = worker_class()
    first = cls(labels={"worker": "w"})
    second = cls(labels={"worker": "w"})
    other = cls(labels={"worker": "x"})
    await first.start()
    await first.aclose()
    assert first.closed
    assert machines(cls) == counts(cls, idle=2)
    assert enum_state(cls, worker="w") == "running"  # second still lives there
    await second.aclose()
    assert enum_state(cls, worker="w") is None
    assert enum_state(cls, worker="x") == "idle"
    assert machines(cls) == counts(cls, idle=1)
    # The label set comes back with a new machine, in its initial state.
    again = cls(labels={"worker": "w"})
    assert enum_state(cls, worker="w") == "idle"
    del other, again


async def test_async_with_ends_the_machine() -> None:
    cls = worker_class()
    async with cls(labels={"worker": "w"}) as worker:
        await worker.start()
        assert machines(cls) == counts(cls, running=1)
        assert enum_state(cls, worker="w") == "running"
    assert worker.closed
    assert machines(cls) == counts(cls)
    assert enum_state(cls, worker="w") is None


async def test_async_with_ends_the_machine_on_an_exception() -> None:
    cls = worker_class()
    worker = cls(labels={"worker": "w"})

    async def fail_inside() -> None:
        async with worker:
            await worker.start()
            raise Boom

    with pytest.raises(Boom):
        await fail_inside()
    assert worker.closed
    assert machines(cls) == counts(cls)
    assert enum_state(cls, worker="w") is None


async def test_unlabelled_series_keeps_the_last_state() -> None:
    cls = worker_class(())
    worker = cls()
    await worker.start()
    await worker.aclose()
    assert enum_state(cls) == "running"
    assert machines(cls) == counts(cls)


@contextmanager
def no_garbage_collector() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


async def test_dropping_the_last_reference_ends_the_machine() -> None:
    cls = worker_class()
    with no_garbage_collector():
        worker = cls(labels={"worker": "w"})
        await worker.start()
        await worker.fail()
        assert machines(cls) == counts(cls, error=1)
        del worker
        assert machines(cls) == counts(cls)
        assert enum_state(cls, worker="w") is None


def test_dropping_an_unlabelled_machine_keeps_its_series() -> None:
    cls = worker_class(())
    with no_garbage_collector():
        worker = cls(initial="error")
        del worker
        assert machines(cls) == counts(cls)
        assert enum_state(cls) == "error"


async def test_closed_machine_refuses_triggers() -> None:
    cls = worker_class()
    worker = cls(labels={"worker": "w"})
    await worker.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await worker.start()
    with pytest.raises(RuntimeError, match="closed"):
        await worker.trigger("start")
    assert worker.state == "idle"
    assert machines(cls) == counts(cls)


async def test_closing_twice_is_harmless() -> None:
    cls = worker_class()
    first = cls(labels={"worker": "w"})
    second = cls(labels={"worker": "w"})
    await first.aclose()
    await first.aclose()
    assert machines(cls) == counts(cls, idle=1)
    assert enum_state(cls, worker="w") == "idle"  # second's series survives
    del first
    assert machines(cls) == counts(cls, idle=1)
    del second
    assert machines(cls) == counts(cls)


async def test_aclose_inside_async_with_is_harmless() -> None:
    cls = worker_class()
    async with cls(labels={"worker": "w"}) as worker:
        await worker.aclose()
        assert machines(cls) == counts(cls)
    assert worker.closed
    assert machines(cls) == counts(cls)


async def test_aclose_waits_for_a_running_transition() -> None:
    cls = blocking_class()
    machine: Any = cls(block="exit")
    closed = anyio.Event()

    async def close() -> None:
        await machine.aclose()
        closed.set()

    with anyio.fail_after(2):
        async with anyio.create_task_group() as group:
            group.start_soon(machine.go)
            await machine.reached.wait()
            group.start_soon(close)
            await anyio.wait_all_tasks_blocked()
            assert not closed.is_set()
            assert not machine.closed
            machine.gate.set()
    assert machine.closed
    assert machine.state == "b"
    assert machine.phases == ["prepare", "condition", "before", "exit", "enter", "after"]
    assert transitions_total(cls, "a", "b", "go") == 1
    assert machines(cls) == counts(cls)
    assert enum_state(cls, id="1") is None


# -- bugs -------------------------------------------------------------------------------------


async def test_aclose_from_own_callback_keeps_counts_right() -> None:
    class SelfClosing(MeteredMachine, registry=None):
        states = ["a", "b"]
        transitions = [["go", "a", "b"]]

        async def on_exit_a(self) -> None:
            await self.aclose()

    machine = SelfClosing()
    with anyio.fail_after(2):
        # Refusing to finish the transition of a closed machine would be fine too.
        with suppress(RuntimeError):
            await machine.go()
    assert machine.closed
    assert machines(SelfClosing) == counts(SelfClosing)


async def test_subclass_with_own_states_does_not_touch_parent_metrics() -> None:
    class Parent(MeteredMachine, registry=None):
        states = ["a", "b"]
        transitions = [["go", "a", "b"]]

    class Child(Parent, registry=None):
        states = ["a", "b", "c"]
        transitions = [["run", "a", "c"]]

    child: Any = Child()
    with suppress(AttributeError, MachineError):
        await child.go()
    assert machines(Parent) == counts(Parent)
    assert_consistent(Child, child)


# -- every async test is bounded --------------------------------------------------------------


def _bounded(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    @functools.wraps(test)  # keeps the signature and the marks
    async def run(*args: Any, **kwargs: Any) -> None:
        with anyio.fail_after(5):
            await test(*args, **kwargs)

    return run


# A machine whose turn is never released hangs the next trigger: fail instead of hanging.
for _name, _test in list(globals().items()):
    if _name.startswith("test_") and inspect.iscoroutinefunction(_test):
        globals()[_name] = _bounded(_test)
