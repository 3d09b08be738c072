"""`MeteredMachine` against transitions' `AsyncMachine`, the reference for what a trigger does.

Hypothesis draws a machine definition and a sequence of calls. The definition is compiled
twice: as a `MeteredMachine` subclass (``registry=None``), and as an `AsyncMachine` over a
plain model object carrying the same methods. The calls run on the reference first, under
`asyncio.run` (`AsyncMachine` only runs on asyncio), which gives the expected trace; the
same calls are then replayed on our machine under each anyio backend (asyncio and trio),
comparing after every call.

What the definitions contain:

- 2 to 6 states, as names or as state dicts with ``on_enter``/``on_exit`` (a name or a
  list), plus ``on_enter_<state>``/``on_exit_<state>`` methods, sync or async; an optional
  ``initial``;
- transitions as ``[trigger, source, dest, conditions, unless, before, after]`` lists (3 to
  7 items) and as dicts (with ``prepare``): sources as names, lists and ``"*"``; dests as
  names, ``"="`` (reflexive) and ``None`` (internal); several transitions for one trigger
  and source (the first whose conditions pass wins);
- ``conditions`` and ``unless`` naming sync and async methods, and plain attributes, whose
  results (True, False, 1, 0, None, "yes") come from a per-example table indexed by the
  trigger's arguments; ``prepare``/``before``/``after`` and state callbacks, sync and async,
  some raising an exception (again as the table says for the arguments). Every callback
  and condition method logs its name and arguments.

Each feature of "Coming from transitions" has its own test on top of that (so that a
failure shrinks to the feature that broke): machine-level callbacks (``prepare_event``,
``before_state_change``, ``after_state_change``, ``finalize_event``, ``on_exception``,
``on_final``, as method names and as plain functions) with final states; ``send_event``
(every callback logs the fields of the event data it gets); ``queued``; states given as an
`enum.Enum` class or as its members; ``ordered_transitions``. Callbacks that fire a
trigger of their own machine (``f0``, ``f1``, within a budget per call) come with the
machine-level callbacks and with ``queued``.

What runs: trigger methods with positional and keyword arguments, ``trigger(name)`` with
known and unknown names, ``may_<trigger>()``, in states where they are valid or not.

What is compared after each call: the return value or the exception (type; message equal,
or equal after our ``"<ClassName>: "`` prefix), the state, ``is_<state>()``, the callback
log, and the metrics: the class's `Enum` (1 exactly for the current state), and through
`MachineCollector`: ``_machines`` (1 for the current state), ``_transitions_total`` per
(from, to, trigger), the ``_duration_seconds`` count per state left, and ``_errors_total``
per (trigger, exception class), counted under the trigger that raised (a nested or queued
trigger under its own name), also when ``on_exception`` takes the exception and the
trigger returns False. The expected counts are taken from the reference: a
transition counts once its state change happens (internal ones once their ``before``
callbacks are done, with to == from), so one whose ``on_enter`` or ``after`` raises counts
too; every trigger call that raises counts an error, including `MachineError`, while
``may_<trigger>()`` and unknown names given to ``trigger()`` count none.

Known, intended differences (docs/machines.md), not tested here:

- concurrent triggers of one machine are serialized instead of cancelling each other;
- cancellation propagates instead of making the trigger return False;
- our `MachineError` and unknown-trigger messages start with the class name
  (``"Diff: Can't trigger event t0 from state s1!"``) and say more after transitions' text;
- with ``queued = True``, a trigger called from outside returns whether its own transition
  ran (`AsyncMachine` returns True whatever happened); one called from a callback is
  queued and returns True, as there;
- the callbacks of one list (and the conditions plus unless of one transition) run in
  turn, each awaited before the next starts, where `AsyncMachine` starts them in the same
  order as tasks that overlap through `asyncio.gather`. So a coroutine that suspends
  before it logs finishes before the next callback starts, and an exception stops the
  list where it is (`AsyncMachine` still runs the callbacks after it).

So that the comparison stays exact, a generated list (or conditions plus unless) holds at
most one callback that suspends before logging or may raise, and only in the last place.
Async callbacks that log before suspending can come anywhere, several in one list: their
order is the same on both sides, under asyncio and trio.
"""

from __future__ import annotations

import asyncio
import copy
import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transitions import MachineError
from transitions.extensions.asyncio import AsyncEvent, AsyncMachine

from statemachine_metrics import MachineCollector, MeteredMachine

# -- callbacks shared by both sides ----------------------------------------------------------


class Boom(Exception):
    pass


class Bust(Exception):
    pass


class Crash(Exception):
    pass


@dataclass(frozen=True)
class Behaviour:
    """What a generated method does besides logging its call."""

    is_async: bool = False
    late_log: bool = False  # async: log after the first checkpoint rather than before
    error: type[Exception] | None = None  # raised for the argument keys the table says
    fires: bool = False  # fires the trigger the case names for it, on its own machine


PLAIN = Behaviour()
ASYNC = Behaviour(is_async=True)

#: Callbacks for prepare/before/after/on_enter/on_exit lists, anywhere in a list.
PLAIN_CALLBACKS = ("p0", "p1", "p2", "a0")
#: Callbacks that may only come last in a list (see the module docstring).
SPECIAL_CALLBACKS = ("a1", "r0", "r1", "ar0")
#: Conditions: methods returning table values, and plain attributes.
PLAIN_CONDITIONS = ("c0", "c1", "c2", "ac0", "k0", "k1")
SPECIAL_CONDITIONS = ("ac1", "rc0", "arc0")
CONSTANTS = ("k0", "k1")

BEHAVIOURS: dict[str, Behaviour] = {
    "p0": PLAIN,
    "p1": PLAIN,
    "p2": PLAIN,
    "a0": ASYNC,
    "a1": Behaviour(is_async=True, late_log=True),
    "r0": Behaviour(error=ValueError),
    "r1": Behaviour(error=Boom),
    "ar0": Behaviour(is_async=True, error=Crash),
    "c0": PLAIN,
    "c1": PLAIN,
    "c2": PLAIN,
    "ac0": ASYNC,
    "ac1": Behaviour(is_async=True, late_log=True),
    "rc0": Behaviour(error=Bust),
    "arc0": Behaviour(is_async=True, late_log=True, error=Boom),
    "f0": Behaviour(is_async=True, fires=True),
    "f1": Behaviour(is_async=True, fires=True),
}
#: Callbacks that fire a trigger: last in a list, and only where the state has changed.
FIRING_CALLBACKS = ("f0", "f1")
#: How many triggers the firing callbacks may fire during one call (so none loops forever).
FIRE_BUDGET = 2
MACHINE_CALLBACKS = (
    "prepare_event",
    "before_state_change",
    "after_state_change",
    "finalize_event",
    "on_exception",
    "on_final",
)
DYNAMIC_BEHAVIOURS = (
    PLAIN,
    ASYNC,
    Behaviour(is_async=True, late_log=True),
    Behaviour(error=Bust),
    Behaviour(is_async=True, error=Crash),
)
CONDITION_NAMES = ("c0", "c1", "c2", "ac0", "ac1", "rc0", "arc0")
RESULTS = (True, False, 1, 0, None, "yes")
#: Drawn for the tables: passing values more often, so that transitions run.
DRAWN_RESULTS = (True, True, False, False, *RESULTS)
DRAWN_RAISES = (False, False, False, True)
ARG_KEYS = 3

Entry = tuple[Any, ...]


def arg_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Which column of the tables a call reads: a function of the trigger's arguments."""
    return int(sum(args) + 2 * sum(kwargs.values()) + len(kwargs)) % ARG_KEYS


class Op(NamedTuple):
    kind: str  # "fire" (the trigger method), "trigger" (by name) or "may"
    name: str
    args: tuple[int, ...]
    kwargs: dict[str, int]


@dataclass
class Case:
    states: list[Any]
    transitions: list[Any]
    initial: str | None
    dynamic: dict[str, Behaviour]  # on_enter_<state> / on_exit_<state> methods
    constants: dict[str, object]
    results: dict[str, tuple[object, ...]]  # condition results, per argument key
    raises: dict[str, tuple[bool, ...]]  # whether a raising method raises, per argument key
    ops: list[Op]
    #: Machine-level callbacks: attribute -> a name, a "fn:<name>" function, or a list.
    machine: dict[str, Any] = field(default_factory=dict)
    send_event: bool = False
    queued: bool = False
    enum_form: str | None = None  # states as an Enum "class", or as its "members"
    ordered: Any = None  # ordered_transitions: True or a dict
    fires: dict[str, str] = field(default_factory=dict)  # firing callback -> trigger

    @property
    def state_names(self) -> list[str]:
        return [s if isinstance(s, str) else s["name"] for s in self.states]

    @property
    def triggers(self) -> list[str]:
        names = [t[0] if isinstance(t, list) else t["trigger"] for t in self.transitions]
        if self.ordered is not None:
            ordered = {} if self.ordered is True else self.ordered
            names.append(ordered.get("trigger", "next_state"))
        return list(dict.fromkeys(names))


def _name(value: Any) -> Any:
    """A state's name, whether it is given as a name, an Enum member or a state object."""
    return getattr(value, "name", value)


def snapshot(event: Any) -> tuple[Any, ...]:
    """What a callback sees of the event data it gets with ``send_event``."""
    transition = event.transition
    error = event.error
    return (
        event.event.name,
        _name(event.state),
        None if transition is None else (_name(transition.source), _name(transition.dest)),
        tuple(event.args),
        dict(event.kwargs),
        None if error is None else type(error).__name__,
        event.result,
    )


class Side:
    """What the callbacks of one side (reference or ours) share: the log and the budget."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.log: list[Entry] = []
        self.budget = FIRE_BUDGET
        self.functions: dict[str, Any] = {}

    def arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The trigger's arguments, and what to log of them, however the callback got them."""
        if self.case.send_event:
            (event,) = args
            return tuple(event.args), dict(event.kwargs), snapshot(event), event
        return args, kwargs, (args, kwargs), None

    def function(self, marker: str) -> Any:
        """The plain function (no self) a "fn:<name>" marker stands for, one per side."""
        if marker not in self.functions:

            def function(*args: Any, **kwargs: Any) -> None:
                self.log.append((marker, self.arguments(args, kwargs)[2]))

            function.__name__ = marker.replace(":", "_")
            self.functions[marker] = function
        return self.functions[marker]

    def resolve(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {key: self.resolve(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.resolve(item) for item in value]
        if isinstance(value, str) and value.startswith("fn:"):
            return self.function(value)
        return value

    def machine_options(self) -> dict[str, Any]:
        case = self.case
        options = {name: self.resolve(value) for name, value in case.machine.items()}
        return {**options, "send_event": case.send_event, "queued": case.queued}


_ENUMS: dict[tuple[str, ...], type[enum.Enum]] = {}


def first_state(case: Case) -> Any:
    first = case.state_names[0]
    return first if case.enum_form is None else _ENUMS[tuple(case.state_names)][first]


def declared(side: Side) -> tuple[Any, list[Any], Any]:
    """The case's states, transitions and initial state, as the case gives them: with
    names, or with the members of an Enum (one class per list of names, for both sides),
    and the side's functions for "fn:" markers."""
    case = side.case
    states = [
        s if isinstance(s, str) else {k: side.resolve(v) for k, v in s.items()}
        for s in copy.deepcopy(case.states)
    ]
    transitions = [
        [*t[:3], *(side.resolve(v) for v in t[3:])]
        if isinstance(t, list)
        else {k: v if k in ("trigger", "source", "dest") else side.resolve(v) for k, v in t.items()}
        for t in copy.deepcopy(case.transitions)
    ]
    if case.enum_form is None:
        return states, transitions, case.initial
    names = tuple(case.state_names)
    members: Any = _ENUMS.setdefault(names, enum.Enum("States", names))  # type: ignore[misc]

    def member(value: Any) -> Any:
        if isinstance(value, list):
            return [member(v) for v in value]
        return members[value] if isinstance(value, str) and value in names else value

    if case.enum_form == "class" and all(isinstance(s, str) for s in states):
        given: Any = members
    else:
        given = [
            member(s) if isinstance(s, str) else {**s, "name": member(s["name"])} for s in states
        ]
    for entry in transitions:
        for key, index in (("source", 1), ("dest", 2)):
            if isinstance(entry, list):
                entry[index] = member(entry[index])
            else:
                entry[key] = member(entry[key])
    return given, transitions, member(case.initial)


def make_method(name: str, behaviour: Behaviour, side: Side) -> Any:
    case = side.case
    results = case.results.get(name)
    raises = case.raises.get(name)
    error = behaviour.error

    def outcome(args: tuple[Any, ...], kwargs: dict[str, Any]) -> object:
        key = arg_key(args, kwargs)
        if error is not None and raises is not None and raises[key]:
            raise error(f"{name} raised for key {key}")
        return None if results is None else results[key]

    def seen(self: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        args, kwargs, logged, event = side.arguments(args, kwargs)
        if event is not None:
            logged = (*logged, event.model is self)
        return args, kwargs, logged

    if behaviour.fires:

        async def firing(self: object, *args: Any, **kwargs: Any) -> None:
            target = case.fires.get(name, case.triggers[0])
            side.log.append((name, seen(self, args, kwargs)[2], target))
            if side.budget <= 0:
                return
            side.budget -= 1
            await anyio.lowlevel.checkpoint()
            result = await getattr(self, target)()
            side.log.append((name, "returned", result))

        firing.__name__ = name
        return firing

    if behaviour.is_async:

        async def async_method(self: object, *args: Any, **kwargs: Any) -> object:
            args, kwargs, logged = seen(self, args, kwargs)
            if not behaviour.late_log:
                side.log.append((name, logged))
            await anyio.lowlevel.checkpoint()
            if behaviour.late_log:
                side.log.append((name, logged))
            return outcome(args, kwargs)

        async_method.__name__ = name
        return async_method

    def method(self: object, *args: Any, **kwargs: Any) -> object:
        args, kwargs, logged = seen(self, args, kwargs)
        side.log.append((name, logged))
        return outcome(args, kwargs)

    method.__name__ = name
    return method


def namespace(side: Side) -> dict[str, Any]:
    """The methods and attributes that both the model and our class carry."""
    ns: dict[str, Any] = dict(side.case.constants)
    for name, behaviour in {**BEHAVIOURS, **side.case.dynamic}.items():
        ns[name] = make_method(name, behaviour, side)
    return ns


# -- generating cases --------------------------------------------------------------------------


def _field(draw: st.DrawFn, names: list[str]) -> str | list[str]:
    """A callback field as transitions takes it: a single name or a list."""
    if len(names) == 1 and draw(st.booleans()):
        return names[0]
    return names


@st.composite
def callback_lists(
    draw: st.DrawFn, specials: tuple[str, ...] = SPECIAL_CALLBACKS, functions: bool = False
) -> list[str]:
    names = draw(st.lists(st.sampled_from(PLAIN_CALLBACKS), max_size=3))
    if functions:  # some of them as plain functions rather than method names
        names = [f"fn:{n}" if n != "a0" and draw(st.booleans()) else n for n in names]
    special = draw(st.sampled_from((None,) * 10 + specials)) if specials else None
    return names if special is None else [*names, special]


@st.composite
def condition_lists(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    """`conditions` and `unless`: transitions checks them as one list, conditions first."""
    # Few of them, or hardly any transition would pass.
    count = draw(st.sampled_from((0, 0, 0, 1, 1, 2)))
    conditions: list[str] = []
    unless: list[str] = []
    for _ in range(count):
        name = draw(st.sampled_from(PLAIN_CONDITIONS))
        (conditions if draw(st.booleans()) else unless).append(name)
    special = draw(st.sampled_from((None,) * 8 + SPECIAL_CONDITIONS))
    if special is not None:
        if bool(unless) or draw(st.booleans()):
            unless.append(special)
        else:
            conditions.append(special)
    return conditions, unless


@st.composite
def transitions_of(
    draw: st.DrawFn, names: list[str], triggers: list[str], firing: tuple[str, ...] = ()
) -> list[Any] | dict[str, Any]:
    trigger = draw(st.sampled_from(triggers))
    state = st.sampled_from(names)
    shape = draw(st.sampled_from(("name", "name", "list", "*")))
    source: str | list[str]
    if shape == "name":
        source = draw(state)
    elif shape == "list":
        source = draw(st.lists(state, min_size=1, max_size=3))
    else:
        source = "*"
    # Mostly moves to another state: reflexive and internal ones come up often anyway.
    others = [name for name in names if name != source]
    dest = draw(st.sampled_from((*others, *others, *names, "=", None)))
    conditions, unless = draw(condition_lists())
    fields: dict[str, list[str]] = {
        "conditions": conditions,
        "unless": unless,
        "before": draw(callback_lists()),
        "after": draw(callback_lists(SPECIAL_CALLBACKS + firing)),
        "prepare": draw(callback_lists()),
    }
    if not fields["prepare"] and draw(st.booleans()):
        # List form: positional fields up to the last one given, None for the gaps.
        positional = ("conditions", "unless", "before", "after")
        used = [i for i, key in enumerate(positional) if fields[key]]
        entry: list[Any] = [trigger, source, dest]
        for key in positional[: used[-1] + 1 if used else draw(st.integers(0, 4))]:
            entry.append(_field(draw, fields[key]) if fields[key] else None)
        return entry
    spec: dict[str, Any] = {"trigger": trigger, "source": source, "dest": dest}
    for key, value in fields.items():
        if value:
            spec[key] = _field(draw, value)
    return spec


@st.composite
def cases(draw: st.DrawFn, features: frozenset[str] = frozenset()) -> Case:
    """A case; `features` adds: "callbacks" (machine-level), "final" (final states),
    "fires" (callbacks firing triggers), "send_event", "queued", "enum", "ordered"."""
    names = [f"s{i}" for i in range(draw(st.integers(2, 6)))]
    firing = FIRING_CALLBACKS if "fires" in features else ()
    dynamic: dict[str, Behaviour] = {}
    states: list[Any] = []
    for name in names:
        entry: dict[str, Any] = {"name": name}
        as_dict = draw(st.booleans())
        for kind in ("on_enter", "on_exit"):
            specials = SPECIAL_CALLBACKS + (firing if kind == "on_enter" else ())
            listed = draw(callback_lists(specials)) if as_dict else []
            if listed or (as_dict and draw(st.booleans())):
                entry[kind] = _field(draw, listed) if listed else []
            # The <kind>_<state> method comes after the listed ones: never after a special.
            last_is_special = bool(listed) and listed[-1] in specials
            if not last_is_special and draw(st.booleans()):
                dynamic[f"{kind}_{name}"] = draw(st.sampled_from(DYNAMIC_BEHAVIOURS))
        if "final" in features and draw(st.sampled_from((False, False, True))):
            entry["final"] = as_dict = True
        states.append(entry if as_dict else name)
    triggers = [f"t{i}" for i in range(draw(st.integers(1, 4)))]
    transitions = draw(st.lists(transitions_of(names, triggers, firing), min_size=1, max_size=10))
    initial = draw(st.none() | st.sampled_from(names))
    results: dict[str, tuple[object, ...]] = {
        name: tuple(draw(st.sampled_from(DRAWN_RESULTS)) for _ in range(ARG_KEYS))
        for name in CONDITION_NAMES
    }
    raising = [name for name, b in {**BEHAVIOURS, **dynamic}.items() if b.error is not None]
    raises = {
        name: tuple(draw(st.sampled_from(DRAWN_RAISES)) for _ in range(ARG_KEYS))
        for name in raising
    }
    constants: dict[str, object] = {name: draw(st.sampled_from(RESULTS)) for name in CONSTANTS}
    case = Case(states, transitions, initial, dynamic, constants, results, raises, ops=[])
    if "callbacks" in features:
        allowed = {
            "prepare_event": SPECIAL_CALLBACKS,
            "before_state_change": SPECIAL_CALLBACKS,
            "after_state_change": SPECIAL_CALLBACKS + firing,
            "on_final": SPECIAL_CALLBACKS + firing,
            # Neither raises: which error a raising handler would count is not compared.
            "finalize_event": ("a1", *firing),
            "on_exception": ("a1",),
        }
        for attribute, specials in allowed.items():
            if draw(st.booleans()):
                listed = draw(callback_lists(specials, functions=True))
                case.machine[attribute] = _field(draw, listed) if listed else []
    case.fires = {name: draw(st.sampled_from(case.triggers)) for name in firing}
    case.send_event = "send_event" in features
    case.queued = "queued" in features
    if "enum" in features:
        case.enum_form = draw(st.sampled_from(("class", "members")))
    if "ordered" in features:
        case.ordered = draw(
            st.just(True)
            | st.fixed_dictionaries(
                {},
                optional={
                    "trigger": st.sampled_from(["next_state", "t0", "advance"]),
                    "loop": st.booleans(),
                    "loop_includes_initial": st.booleans(),
                    "conditions": st.sampled_from(PLAIN_CONDITIONS),
                    # One list for every ordered transition (more would be one each).
                    "after": callback_lists().map(lambda names: [names]),
                },
            )
        )
    defined = case.triggers
    args = st.lists(st.integers(0, 2), max_size=2).map(tuple)
    kwargs = st.dictionaries(st.sampled_from(["x", "y"]), st.integers(0, 2), max_size=2)

    def op(kind: str) -> st.SearchStrategy[Op]:
        names = [*defined, "nope"] if kind == "trigger" else defined
        return st.builds(Op, st.just(kind), st.sampled_from(names), args, kwargs)

    ops = st.sampled_from(("fire", "fire", "fire", "trigger", "may")).flatmap(op)
    case.ops = draw(st.lists(ops, min_size=3, max_size=20))
    return case


# -- running both sides ------------------------------------------------------------------------


class Returned(NamedTuple):
    value: object


class Raised(NamedTuple):
    type: type[Exception]
    args: tuple[Any, ...]


Outcome = Returned | Raised


class Observation(NamedTuple):
    """The reference's state of things after one call."""

    outcome: Outcome
    state: str
    log: list[Entry]
    transitions: dict[tuple[str, str, str], int]
    left: dict[str, int]
    errors: dict[tuple[str, str], int]


async def perform(machine: Any, op: Op) -> Outcome:
    try:
        if op.kind == "fire":
            result = await getattr(machine, op.name)(*op.args, **op.kwargs)
        elif op.kind == "trigger":
            result = await machine.trigger(op.name, *op.args, **op.kwargs)
        else:
            result = await getattr(machine, f"may_{op.name}")(*op.args, **op.kwargs)
    except Exception as exc:
        return Raised(type(exc), exc.args)
    return Returned(result)


class RecordingEvent(AsyncEvent):
    """transitions' event, noting which trigger runs, what it returns and what it raises."""

    machine: Reference

    async def _trigger(self, event_data: Any) -> Any:
        machine = self.machine
        machine.running.append(self.name)
        try:
            result = await super()._trigger(event_data)
        except Exception as exc:
            machine.raised[(self.name, type(exc).__name__)] += 1
            raise
        finally:
            machine.running.pop()
        machine.results.append(result)
        return result


class Reference(AsyncMachine):
    """`AsyncMachine` noting where our metrics count a transition; behaviour unchanged."""

    event_cls = RecordingEvent

    def __init__(self, **kwargs: Any) -> None:
        self.counted: Counter[tuple[str, str, str]] = Counter()
        self.left: Counter[str] = Counter()
        self.raised: Counter[tuple[str, str]] = Counter()
        self.running: list[str] = []
        self.results: list[bool] = []
        self.recording = False
        self.checking = False  # in may_<trigger>(), which counts no errors
        super().__init__(**kwargs)

    def set_state(self, state: Any, model: Any = None) -> None:
        if self.recording:
            source = _name(model.state)
            self.counted[(source, _name(state), self.running[-1])] += 1
            self.left[source] += 1
        super().set_state(state, model)

    async def callbacks(self, funcs: Any, event_data: Any) -> None:  # type: ignore[override]
        transition = event_data.transition
        if transition is not None and transition.dest is None and funcs is transition.after:
            # An internal transition has passed its `before` callbacks: it ran.
            source = transition.source
            self.counted[(source, source, event_data.event.name)] += 1
        if funcs is self._on_exception and not self.checking:
            # on_exception takes the exception: the trigger still counts an error.
            self.raised[(event_data.event.name, type(event_data.error).__name__)] += 1
        await super().callbacks(funcs, event_data)


async def run_reference(case: Case) -> tuple[Any, list[Observation]]:
    side = Side(case)
    model: Any = type("Model", (), namespace(side))()
    states, transitions, initial = declared(side)
    options = side.machine_options()
    machine = Reference(
        model=model,
        states=states,
        transitions=transitions,
        initial=first_state(case) if initial is None else initial,
        auto_transitions=False,
        ordered_transitions=case.ordered is True,
        **options,
    )
    if isinstance(case.ordered, dict):
        machine.add_ordered_transitions(**copy.deepcopy(side.resolve(case.ordered)))
    start = model.state
    machine.recording = True
    trace = []
    for op in case.ops:
        side.budget = FIRE_BUDGET
        machine.results.clear()
        machine.checking = op.kind == "may"
        outcome = await perform(model, op)
        if case.queued and op.kind != "may" and isinstance(outcome, Returned):
            # AsyncMachine's queued trigger returns True whatever happened; ours returns
            # what its own transition did, as the first trigger of the call returned.
            outcome = Returned(machine.results[0] if machine.results else outcome.value)
        trace.append(
            Observation(
                outcome,
                model.state,
                list(side.log),
                dict(machine.counted),
                dict(machine.left),
                dict(machine.raised),
            )
        )
    return start, trace


def assert_same_outcome(cls: type, ours: Outcome, expected: Outcome) -> None:
    if isinstance(expected, Returned):
        assert isinstance(ours, Returned), f"ours raised {ours}, the reference returned"
        assert type(ours.value) is type(expected.value)
        assert ours.value == expected.value
        return
    assert isinstance(ours, Raised), f"ours returned {ours}, the reference raised {expected}"
    assert issubclass(ours.type, expected.type), (ours, expected)
    if ours.args != expected.args:
        # MachineError and the unknown-trigger AttributeError name our class first, and
        # may say more after transitions' own message.
        assert issubclass(expected.type, (MachineError, AttributeError)), (ours, expected)
        (message,) = ours.args
        assert message.startswith(f"{cls.__name__}: {expected.args[0].rstrip('.')}"), (
            ours,
            expected,
        )


def assert_metrics(cls: Any, state: Any, expected: Observation | None) -> None:
    state = _name(state)
    enum_name, machines, transitions, duration, errors, *_ = cls.metric_names()
    states = cls.state_names()
    current = {s: (1.0 if s == state else 0.0) for s in states}

    (family,) = cls.metric.collect()
    assert {s.labels[enum_name]: s.value for s in family.samples} == current

    samples = [s for f in MachineCollector(cls).collect() for s in f.samples]

    def values(name: str, *labels: str) -> dict[Any, float]:
        found = {}
        for s in samples:
            if s.name == name:
                key = tuple(s.labels[label] for label in labels)
                found[key[0] if len(key) == 1 else key] = s.value
        return found

    assert values(enum_name, enum_name) == current
    assert values(machines, enum_name) == current
    ran = {k: v for k, v in values(transitions, "from", "to", "trigger").items() if v}
    left = {k: v for k, v in values(f"{duration}_count", enum_name).items() if v}
    raised = values(errors, "trigger", "error")
    if expected is None:
        assert ran == left == raised == {}
    else:
        assert ran == expected.transitions
        assert left == expected.left
        assert raised == expected.errors


def machine_class(side: Side) -> Any:
    """The case as a `MeteredMachine` class."""
    case = side.case
    ns = {**namespace(side), **side.machine_options()}
    ns["states"], ns["transitions"], initial = declared(side)
    if initial is not None:
        ns["initial"] = initial
    if case.ordered is not None:
        ns["ordered_transitions"] = side.resolve(copy.deepcopy(case.ordered))
    return type("Diff", (MeteredMachine,), ns, registry=None)


async def replay(case: Case, initial: Any, trace: list[Observation]) -> None:
    side = Side(case)
    cls = machine_class(side)
    machine = cls()
    assert machine.state == initial
    assert_metrics(cls, initial, None)
    for i, (op, expected) in enumerate(zip(case.ops, trace)):
        side.budget = FIRE_BUDGET
        outcome = await perform(machine, op)
        where = f"after ops[{i}] = {op}"
        assert side.log == expected.log, where
        assert_same_outcome(cls, outcome, expected.outcome)
        assert machine.state == expected.state, where
        for state in case.state_names:
            assert getattr(machine, f"is_{state}")() == (state == _name(expected.state)), where
        assert_metrics(cls, expected.state, expected)


def check(case: Case, backend: str) -> None:
    initial, trace = asyncio.run(run_reference(case))
    anyio.run(replay, case, initial, trace, backend=backend)


# -- the tests -----------------------------------------------------------------------------------

_EVERYTHING = Case(
    states=[
        "s0",
        {"name": "s1", "on_enter": ["p0", "a0"], "on_exit": "p1"},
        {"name": "s2", "on_enter": []},
    ],
    transitions=[
        ["t0", "*", "s1", "c0", None, ["p1", "r0"]],
        {"trigger": "t0", "source": "s0", "dest": "s2", "prepare": "p2", "after": ["p0", "ar0"]},
        {"trigger": "t1", "source": ["s1", "s2"], "dest": "=", "unless": ["c1", "arc0"]},
        {"trigger": "t2", "source": "*", "dest": None, "conditions": ["k0", "ac1"], "after": "a1"},
    ],
    initial=None,
    dynamic={"on_enter_s2": DYNAMIC_BEHAVIOURS[4], "on_exit_s0": ASYNC, "on_exit_s1": PLAIN},
    constants={"k0": True, "k1": "yes"},
    results={
        "c0": (False, True, 1),
        "c1": (None, 0, False),
        "ac1": (True, 1, "yes"),
        "arc0": (False, False, False),
    },
    raises={
        "r0": (False, True, False),
        "ar0": (True, False, False),
        "arc0": (False, False, True),
        "on_enter_s2": (False, False, True),
    },
    ops=[
        Op("may", "t1", (), {}),
        Op("fire", "t0", (), {}),
        Op("trigger", "t2", (1,), {}),
        Op("fire", "t1", (), {"x": 0}),
        Op("trigger", "nope", (), {}),
        Op("fire", "t0", (1,), {}),
        Op("fire", "t1", (2,), {}),
        Op("fire", "t0", (0,), {"x": 1, "y": 2}),
        Op("may", "t2", (2,), {"y": 1}),
        Op("fire", "t2", (), {"y": 2}),
    ],
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases())
@example(case=_EVERYTHING)
def test_behaves_like_async_machine(anyio_backend: str, case: Case) -> None:
    check(case, anyio_backend)


def _two_callbacks(**transition: Any) -> Case:
    return Case(
        states=["s0", "s1"],
        transitions=[{"trigger": "go", "source": "s0", "dest": "s1", **transition}],
        initial=None,
        dynamic={},
        constants={},
        results=dict.fromkeys(CONDITION_NAMES, (True,) * ARG_KEYS),
        raises=dict.fromkeys(("r0", "rc0"), (True,) * ARG_KEYS),
        ops=[Op("fire", "go", (), {})],
    )


@pytest.mark.parametrize(
    "transition",
    [
        {"after": ["a0", "p0"]},
        {"before": ["p0", "a0", "a0", "p1"], "after": ["a0", "a1"]},
        {"prepare": ["a0", "p2"], "conditions": ["ac0", "c0"], "unless": ["ac0", "ac1"]},
    ],
    ids=["after", "before", "prepare-conditions"],
)
def test_async_callbacks_start_in_list_order(
    anyio_backend: str, transition: dict[str, Any]
) -> None:
    case = _two_callbacks(**transition)
    case.results["ac1"] = (False,) * ARG_KEYS
    check(case, anyio_backend)


def _log_of_ours(case: Case, backend: str) -> list[Entry]:
    side = Side(case)
    cls = machine_class(side)

    async def run() -> None:
        machine = cls()
        for op in case.ops:
            await perform(machine, op)

    anyio.run(run, backend=backend)
    return side.log


@pytest.mark.parametrize(
    "transition",
    [{"before": ["r0", "p0"]}, {"conditions": ["rc0", "c0"]}],
    ids=["callbacks", "conditions"],
)
def test_documented_difference_an_exception_stops_the_list(
    anyio_backend: str, transition: dict[str, Any]
) -> None:
    """AsyncMachine runs the rest of a list after a callback raised; ours stops there."""
    case = _two_callbacks(**transition)
    _, trace = asyncio.run(run_reference(case))
    assert isinstance(trace[0].outcome, Raised)
    names = [entry[0] for entry in trace[0].log]
    assert len(names) == 2
    assert [entry[0] for entry in _log_of_ours(case, anyio_backend)] == names[:1]


FEATURES = {
    "machine-callbacks": {"callbacks", "final", "fires"},
    "send-event": {"send_event", "callbacks", "final"},
    "queued": {"queued", "fires", "callbacks"},
    "enum-states": {"enum", "final"},
    "ordered-transitions": {"ordered"},
}


@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES)
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_transitions_features_behave_like_async_machine(
    anyio_backend: str, features: set[str], data: st.DataObject
) -> None:
    check(data.draw(cases(frozenset(features)), label="case"), anyio_backend)


def _case(**fields: Any) -> Case:
    """A hand-written case: two or three states, conditions passing, nothing raising."""
    base: dict[str, Any] = {
        "states": ["s0", "s1", "s2"],
        "transitions": [["t0", "s0", "s1"], ["t1", "s1", "s2"]],
        "initial": None,
        "dynamic": {},
        "constants": {"k0": True, "k1": False},
        "results": dict.fromkeys(CONDITION_NAMES, (True,) * ARG_KEYS),
        "raises": dict.fromkeys(("r0", "r1", "ar0", "rc0", "arc0"), (False,) * ARG_KEYS),
        "ops": [Op("fire", "t0", (1,), {"x": 2}), Op("fire", "t1", (), {})],
    }
    return Case(**{**base, **fields})


EVERY_PHASE = {
    "prepare_event": ["p0", "fn:p1"],
    "before_state_change": "a0",
    "after_state_change": ["fn:p2", "a1"],
    "finalize_event": "p2",
    "on_final": ["a0", "fn:p0"],
}
SAMPLES = {
    "every-phase": _case(
        states=["s0", "s1", {"name": "s2", "final": True, "on_enter": "p1"}],
        transitions=[
            {"trigger": "t0", "source": "s0", "dest": "s1", "prepare": "p1", "after": "a0"},
            {"trigger": "t1", "source": "s1", "dest": "s2", "before": "p0", "after": "p1"},
            ["t2", "s2", None, None, None, "p0"],
            ["t3", "s2", "="],
        ],
        machine=EVERY_PHASE,
        ops=[
            Op("fire", "t0", (1,), {"x": 2}),
            Op("may", "t1", (), {}),
            Op("fire", "t1", (), {}),
            Op("fire", "t2", (0,), {}),
            Op("fire", "t3", (), {}),
            Op("fire", "t0", (), {}),
        ],
    ),
    "on-exception": _case(
        transitions=[
            ["t0", "s0", "s1", None, None, None, ["p0", "r0"]],
            ["t1", "s1", "s2", "rc0"],
        ],
        machine={"on_exception": ["p1", "fn:p2"], "finalize_event": "a0"},
        raises={
            **dict.fromkeys(("r1", "ar0", "arc0"), (False,) * 3),
            "r0": (True,) * 3,
            "rc0": (True,) * 3,
        },
        ops=[
            Op("fire", "t0", (), {}),
            Op("fire", "t1", (), {}),
            Op("fire", "t0", (), {}),
            Op("trigger", "t1", (2,), {}),
        ],
    ),
    "finalize-after-an-exception": _case(
        transitions=[["t0", "s0", "s1", None, None, "ar0"]],
        machine={"finalize_event": ["p0", "fn:p1"]},
        raises={**dict.fromkeys(("r0", "r1", "rc0", "arc0"), (False,) * 3), "ar0": (True,) * 3},
        ops=[Op("fire", "t0", (), {}), Op("fire", "t0", (), {})],
    ),
    "send-event": _case(
        states=["s0", {"name": "s1", "on_enter": "p0", "on_exit": "fn:p1"}, "s2"],
        transitions=[
            {"trigger": "t0", "source": "s0", "dest": "s1", "conditions": "c0", "after": "a0"},
            {"trigger": "t1", "source": "s1", "dest": None, "before": "p2"},
            {"trigger": "t2", "source": "s1", "dest": "s2", "after": "r0"},
        ],
        machine={**EVERY_PHASE, "on_exception": "p1"},
        send_event=True,
        raises={**dict.fromkeys(("r1", "ar0", "rc0", "arc0"), (False,) * 3), "r0": (True,) * 3},
        ops=[
            Op("fire", "t0", (1,), {"x": 2}),
            Op("fire", "t1", (2,), {}),
            Op("fire", "t2", (), {"y": 1}),
            Op("fire", "t0", (), {}),
        ],
    ),
    "queued": _case(
        transitions=[
            ["t0", "s0", "s1", None, None, None, ["p0", "f0"]],
            ["t1", "s1", "s2", None, None, None, "p1"],
        ],
        machine={"after_state_change": "p2", "finalize_event": "a0"},
        fires={"f0": "t1", "f1": "t0"},
        queued=True,
        ops=[Op("fire", "t0", (), {})],
    ),
    "nested-by-default": _case(
        transitions=[
            ["t0", "s0", "s1", None, None, None, ["p0", "f0"]],
            ["t1", "s1", "s2", None, None, None, "p1"],
        ],
        machine={"after_state_change": "p2", "finalize_event": "a0"},
        fires={"f0": "t1", "f1": "t0"},
        ops=[Op("fire", "t0", (), {})],
    ),
    "queued-error-clears-the-queue": _case(
        transitions=[
            ["t0", "s0", "s1", None, None, None, ["p0", "f0"]],
            ["t1", "s1", "s2", None, None, None, "r1"],
        ],
        fires={"f0": "t1", "f1": "t0"},
        queued=True,
        raises={**dict.fromkeys(("r0", "ar0", "rc0", "arc0"), (False,) * 3), "r1": (True,) * 3},
        ops=[Op("fire", "t0", (), {}), Op("trigger", "t1", (), {})],
    ),
    "enum-class": _case(
        enum_form="class",
        initial="s1",
        ops=[Op("fire", "t1", (), {}), Op("fire", "t0", (), {}), Op("may", "t1", (), {})],
    ),
    "enum-members": _case(
        states=["s0", {"name": "s1", "on_enter": "p0"}, {"name": "s2", "final": True}],
        transitions=[["t0", ["s0", "s2"], "s1"], ["t1", "*", "s2"]],
        enum_form="members",
        machine={"on_final": "p1"},
        ops=[Op("fire", "t0", (), {}), Op("fire", "t1", (), {}), Op("fire", "t0", (), {})],
    ),
    "ordered": _case(
        transitions=[],
        initial="s1",
        ordered={"loop_includes_initial": False, "after": [["p0", "fn:p1"]], "conditions": "c1"},
        ops=[Op("fire", "next_state", (), {})] * 4,
    ),
    "ordered-no-loop": _case(
        transitions=[["t0", "s2", "s0"]],
        ordered={"trigger": "t1", "loop": False},
        ops=[Op("fire", "t1", (), {})] * 3 + [Op("fire", "t0", (), {}), Op("may", "t1", (), {})],
    ),
}


@pytest.mark.parametrize("case", SAMPLES.values(), ids=SAMPLES)
def test_each_feature_behaves_like_async_machine(anyio_backend: str, case: Case) -> None:
    check(case, anyio_backend)
