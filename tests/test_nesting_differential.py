"""Nested `MeteredMachine`s against transitions' `HierarchicalAsyncMachine`.

Hypothesis draws a nested definition (compound states up to three levels deep, with and
without an ``initial`` child, ``on_enter``/``on_exit`` lists and ``on_enter_<state>``
methods, some raising) and a sequence of calls (trigger methods, ``trigger(name)`` with
known and unknown names, ``may_<trigger>()``). The reference runs them under
`asyncio.run` (it only runs on asyncio); the trace is then replayed on our class under
each anyio backend, comparing after every call: the return value or the exception type,
the state, every ``is_<state>()`` with and without ``allow_substates``, the callback log,
and the metrics (the Enum series, ``_machines``, ``_transitions_total``).

Our messages for `MachineError` and unknown triggers differ in wording (they name the
class), so only their types are compared. A callback that raises or suspends before it
logs comes only last in its list, as in tests/test_differential.py: `AsyncMachine` runs
the callbacks of one list together (`asyncio.gather`), we run them in turn.

The second test runs many nested machines with concurrent triggers on each and checks
that their transitions never overlap and that the metrics agree with ``.state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transitions.extensions.asyncio import HierarchicalAsyncMachine

from statemachine_metrics import MachineCollector, MachineError, MeteredMachine

ARG_KEYS = 3
PLAIN_CALLBACKS = ("p0", "p1", "a0")  # a0: async, logs before it suspends
LAST_CALLBACKS = ("a1", "r0")  # a1: async, logs after it suspends; r0 may raise
CONDITIONS = ("c0", "c1", "ac0")


class Boom(Exception):
    pass


Entry = tuple[str, tuple[Any, ...]]


class Op(NamedTuple):
    kind: str  # "fire", "trigger" (by name) or "may"
    name: str
    args: tuple[int, ...]


@dataclass
class Case:
    states: list[Any]
    names: list[str]  # every full name
    transitions: list[dict[str, Any]]
    initial: str | None
    dynamic: list[str]  # on_enter_<state> / on_exit_<state> methods
    results: dict[str, tuple[bool, ...]]  # condition results, per argument key
    raises: tuple[bool, ...]  # whether r0 raises, per argument key
    ops: list[Op] = field(default_factory=list)

    @property
    def triggers(self) -> list[str]:
        return list(dict.fromkeys(t["trigger"] for t in self.transitions))


def namespace(case: Case, log: list[Entry]) -> dict[str, Any]:
    """The methods that both the model and our class carry; each logs its call."""
    ns: dict[str, Any] = {}

    def plain(name: str) -> Any:
        def method(self: object, *args: Any) -> None:
            log.append((name, args))
            if name == "r0" and case.raises[sum(args) % ARG_KEYS]:
                raise Boom(name)

        return method

    def condition(name: str) -> Any:
        def method(self: object, *args: Any) -> bool:
            log.append((name, args))
            return case.results[name][sum(args) % ARG_KEYS]

        async def async_method(self: object, *args: Any) -> bool:
            log.append((name, args))
            await anyio.lowlevel.checkpoint()
            return case.results[name][sum(args) % ARG_KEYS]

        return async_method if name.startswith("a") else method

    def asynchronous(name: str, late: bool) -> Any:
        async def method(self: object, *args: Any) -> None:
            if not late:
                log.append((name, args))
            await anyio.lowlevel.checkpoint()
            if late:
                log.append((name, args))

        return method

    for name in ("p0", "p1", "r0", *case.dynamic):
        ns[name] = plain(name)
    ns["a0"] = asynchronous("a0", late=False)
    ns["a1"] = asynchronous("a1", late=True)
    for name in CONDITIONS:
        ns[name] = condition(name)
    return ns


# -- generating cases ----------------------------------------------------------------------


@st.composite
def callback_lists(draw: st.DrawFn) -> list[str]:
    names = draw(st.lists(st.sampled_from(PLAIN_CALLBACKS), max_size=2))
    last = draw(st.sampled_from((None, None, None, None, *LAST_CALLBACKS)))
    return names if last is None else [*names, last]


@st.composite
def state_entries(draw: st.DrawFn, local: str, prefix: str, depth: int, names: list[str]) -> Any:
    full = f"{prefix}{local}"
    names.append(full)
    children: list[Any] = []
    if depth < 3 and draw(st.integers(0, 2)) > 0:
        count = draw(st.integers(1, 3))
        for child in "abc"[:count]:
            children.append(draw(state_entries(child, f"{full}_", depth + 1, names)))
    entry: dict[str, Any] = {"name": local}
    for kind in ("on_enter", "on_exit"):
        if draw(st.booleans()):
            # Plain ones only: an on_enter_<state> method may come after the list.
            entry[kind] = draw(st.lists(st.sampled_from(PLAIN_CALLBACKS), max_size=2))
    if children:
        entry["children"] = children
        locals_ = [c if isinstance(c, str) else c["name"] for c in children]
        initial = draw(st.none() | st.sampled_from(locals_))
        if initial is not None:
            entry["initial"] = initial
    if len(entry) == 1 and draw(st.booleans()):
        return local
    return entry


@st.composite
def transitions_of(draw: st.DrawFn, names: list[str], triggers: list[str]) -> dict[str, Any]:
    state = st.sampled_from(names)
    shape = draw(st.sampled_from(("name", "name", "name", "list", "*")))
    source: Any
    if shape == "name":
        source = draw(state)
    elif shape == "list":
        source = draw(st.lists(state, min_size=1, max_size=3, unique=True))
    else:
        source = "*"
    spec: dict[str, Any] = {
        "trigger": draw(st.sampled_from(triggers)),
        "source": source,
        "dest": draw(st.sampled_from((*names, *names, "=", None))),
    }
    count = draw(st.sampled_from((0, 0, 1, 1, 2)))
    for _ in range(count):
        key = draw(st.sampled_from(("conditions", "unless")))
        spec.setdefault(key, []).append(draw(st.sampled_from(CONDITIONS)))
    for key in ("prepare", "before", "after"):
        listed = draw(callback_lists())
        if listed:
            spec[key] = listed
    return spec


@st.composite
def cases(draw: st.DrawFn) -> Case:
    names: list[str] = []
    states = [
        draw(state_entries(local, "", 1, names)) for local in "xyz"[: draw(st.integers(1, 3))]
    ]
    if len(names) == 1:
        states.append("w")
        names.append("w")
    triggers = [f"t{i}" for i in range(draw(st.integers(1, 4)))]
    transitions = draw(st.lists(transitions_of(names, triggers), min_size=1, max_size=10))
    dynamic = draw(
        st.lists(
            st.sampled_from(
                [f"{kind}_{name}" for kind in ("on_enter", "on_exit") for name in names]
            ),
            max_size=4,
            unique=True,
        )
    )
    results = {
        name: tuple(draw(st.sampled_from((True, True, False))) for _ in range(ARG_KEYS))
        for name in CONDITIONS
    }
    raises = tuple(draw(st.sampled_from((False, False, True))) for _ in range(ARG_KEYS))
    case = Case(
        states,
        names,
        transitions,
        draw(st.none() | st.sampled_from(names)),
        dynamic,
        results,
        raises,
    )
    args = st.lists(st.integers(0, 2), max_size=2).map(tuple)

    def op(kind: str) -> st.SearchStrategy[Op]:
        known = case.triggers
        return st.builds(
            Op,
            st.just(kind),
            st.sampled_from([*known, "nope"] if kind == "trigger" else known),
            args,
        )

    ops = st.sampled_from(("fire", "fire", "fire", "trigger", "may")).flatmap(op)
    case.ops = draw(st.lists(ops, min_size=3, max_size=15))
    return case


# -- running both sides --------------------------------------------------------------------


class Returned(NamedTuple):
    value: object


class Raised(NamedTuple):
    type: type[BaseException]


class Observation(NamedTuple):
    outcome: Returned | Raised
    state: str
    inside: dict[str, tuple[bool, bool]]  # is_<state>() without and with allow_substates
    log: list[Entry]
    transitions: dict[tuple[str, str, str], int]


async def perform(machine: Any, op: Op) -> Returned | Raised:
    try:
        if op.kind == "fire":
            result = await getattr(machine, op.name)(*op.args)
        elif op.kind == "trigger":
            result = await machine.trigger(op.name, *op.args)
        else:
            result = await getattr(machine, f"may_{op.name}")(*op.args)
    except Exception as exc:
        return Raised(type(exc))
    return Returned(result)


def inside(machine: Any, names: list[str]) -> dict[str, tuple[bool, bool]]:
    return {
        name: (
            getattr(machine, f"is_{name}")(),
            getattr(machine, f"is_{name}")(allow_substates=True),
        )
        for name in names
    }


class Reference(HierarchicalAsyncMachine):
    """`HierarchicalAsyncMachine` noting where our metrics count a transition."""

    def __init__(self, **kwargs: Any) -> None:
        self.counted: Counter[tuple[str, str, str]] = Counter()
        self.firing = ""
        self.recording = False
        super().__init__(**kwargs)

    def set_state(self, state: Any, model: Any = None) -> None:
        if self.recording and model is not None:
            self.counted[(model.state, state, self.firing)] += 1
        super().set_state(state, model)

    async def callbacks(self, funcs: Any, event_data: Any) -> None:  # type: ignore[override]
        transition = event_data.transition
        if transition is not None and transition.dest is None and funcs is transition.after:
            state = event_data.model.state  # an internal transition has run
            self.counted[(state, state, self.firing)] += 1
        await super().callbacks(funcs, event_data)


async def run_reference(case: Case) -> tuple[str, list[Observation]]:
    log: list[Entry] = []
    model: Any = type("Model", (), namespace(case, log))()
    machine = Reference(
        model=model,
        states=copy.deepcopy(case.states),
        transitions=copy.deepcopy(case.transitions),
        initial=case.initial or case.names[0],
        auto_transitions=False,
    )
    initial = model.state
    machine.recording = True
    trace = []
    for op in case.ops:
        machine.firing = op.name
        outcome = await perform(model, op)
        trace.append(
            Observation(
                outcome, model.state, inside(model, case.names), list(log), dict(machine.counted)
            )
        )
    return initial, trace


def assert_metrics(cls: Any, state: str, transitions: dict[tuple[str, str, str], int]) -> None:
    enum_name, machines, ran = cls.metric_names()[:3]
    current = {s: (1.0 if s == state else 0.0) for s in cls.state_names()}
    (family,) = cls.metric.collect()
    assert {s.labels[enum_name]: s.value for s in family.samples} == current
    samples = [s for f in MachineCollector(cls).collect() for s in f.samples]
    assert {s.labels[enum_name]: s.value for s in samples if s.name == machines} == current
    counted = {
        (s.labels["from"], s.labels["to"], s.labels["trigger"]): s.value
        for s in samples
        if s.name == ran and s.value
    }
    assert counted == transitions


async def replay(case: Case, initial: str, trace: list[Observation]) -> None:
    log: list[Entry] = []
    ns = namespace(case, log)
    ns["states"] = copy.deepcopy(case.states)
    ns["transitions"] = copy.deepcopy(case.transitions)
    if case.initial is not None:
        ns["initial"] = case.initial
    cls: Any = type("Nested", (MeteredMachine,), ns, registry=None)
    machine = cls()
    assert machine.state == initial
    assert_metrics(cls, initial, {})
    for i, (op, expected) in enumerate(zip(case.ops, trace)):
        outcome = await perform(machine, op)
        where = f"after ops[{i}] = {op}"
        assert outcome == expected.outcome, where
        assert machine.state == expected.state, where
        assert inside(machine, case.names) == expected.inside, where
        assert log == expected.log, where
        assert_metrics(cls, expected.state, expected.transitions)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases())
def test_behaves_like_hierarchical_async_machine(anyio_backend: str, case: Case) -> None:
    initial, trace = asyncio.run(run_reference(case))
    anyio.run(replay, case, initial, trace, backend=anyio_backend)


# -- concurrency ---------------------------------------------------------------------------


class Crawler(MeteredMachine, registry=None, labelnames=("crawler",)):
    states = [
        "idle",
        {
            "name": "running",
            "initial": "fetching",
            "on_enter": "busy",
            "on_exit": "busy",
            "children": [
                "fetching",
                {"name": "parsing", "initial": "html", "children": ["html", "json"]},
            ],
        },
        "failed",
    ]
    transitions = [
        ["start", "idle", "running"],
        ["parse", "running_fetching", "running_parsing"],
        ["switch", "running_parsing_html", "running_parsing_json"],
        ["fetch", "running", "running_fetching"],
        ["stop", "running", "idle"],
        ["fail", "*", "failed"],
        ["reset", "failed", "idle"],
    ]

    def __init__(self, name: str) -> None:
        super().__init__(labels={"crawler": name})
        self.active = 0
        self.overlaps = 0

    async def busy(self) -> None:
        self.active += 1
        if self.active > 1:
            self.overlaps += 1
        await anyio.lowlevel.checkpoint()
        self.active -= 1


@pytest.mark.anyio
async def test_concurrent_triggers_stay_serialized(anyio_backend: str) -> None:
    rng = random.Random(16)
    machines = [Crawler(f"c{i}") for i in range(40)]
    ran = Counter[str]()
    triggers = Crawler.trigger_names()

    async def poke(machine: Crawler, trigger: str) -> None:
        with contextlib.suppress(MachineError):  # not valid in the state it is in by now
            if await machine.trigger(trigger):
                ran[trigger] += 1

    async with anyio.create_task_group() as tg:
        for _ in range(30):
            for machine in machines:
                tg.start_soon(poke, machine, rng.choice(triggers))

    assert sum(m.overlaps for m in machines) == 0
    states = Counter(m.state for m in machines)
    samples = [s for f in MachineCollector(Crawler).collect() for s in f.samples]
    enum_name, machines_name, transitions_name = Crawler.metric_names()[:3]
    counts = {s.labels[enum_name]: s.value for s in samples if s.name == machines_name}
    assert counts == {state: float(states[state]) for state in Crawler.state_names()}
    series = {
        s.labels["crawler"]: s.labels[enum_name]
        for s in samples
        if s.name == enum_name and s.value == 1.0
    }
    assert series == {m.labels["crawler"]: m.state for m in machines}
    counted = Counter[str]()
    for s in samples:
        if s.name == transitions_name:
            counted[s.labels["trigger"]] += int(s.value)
    assert +counted == ran
    assert sum(ran.values()) > 100
