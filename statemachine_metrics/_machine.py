"""`MeteredMachine`: declarative machine classes, compiled once per class.

A class's definition is checked and built by `_definition`; this module turns it into
per-state dispatch tables of `_engine.Step`, binds the class's metric family, and
generates the trigger methods.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
from prometheus_client.registry import REGISTRY, CollectorRegistry

from . import _diagram, _engine, _tasks
from ._collector import MachineCollector, remember
from ._definition import Definition, TransitionSpec, metric_for
from ._engine import Callback, Condition, Step
from ._enum import Enum
from ._family import DEFAULT_BUCKETS, Family, Series, check_buckets

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["MeteredMachine", "TransitionSpec"]

_DEFINITION_ATTRIBUTES = ("transitions", "initial", "auto_transitions", "ignore_invalid_triggers")
_GENERATED = "__statemachine_metrics_generated__"
_KEYWORDS = frozenset(
    ("name", "documentation", "labelnames", "namespace", "subsystem", "unit", "registry")
)


def _inherited_family(cls: type[MeteredMachine]) -> Family | None:
    for base in cls.__mro__[1:]:
        if "_family" in vars(base):
            family: Family | None = vars(base)["_family"]
            return family
    return None


class MeteredMachine:
    """Base class of machines whose every transition updates Prometheus metrics.

    Declare states and transitions in `transitions`' own vocabulary; the class is compiled
    and checked when it is created, and gets a trigger method per trigger:

        class Worker(MeteredMachine, namespace="myapp", labelnames=("worker",)):
            \"\"\"Current state of the background worker\"\"\"

            states = ["idle", "running", "error"]          # the first is the initial state
            transitions = [
                ["start", "idle", "running"],
                ["finish", "running", "idle"],
                ["fail", ["idle", "running"], "error"],
                {"trigger": "reset", "source": "error", "dest": "idle"},
            ]

        w = Worker(labels={"worker": "w1"})
        await w.start()            # True; w.state == "running"

    Class keywords: ``name`` (default: the class name in snake_case + ``_state``),
    ``documentation`` (default: the docstring's first line), ``labelnames``, ``namespace``,
    ``subsystem``, ``unit`` (must be empty), ``registry`` (default `REGISTRY`; ``None``
    exports the class only through a `MachineCollector` that names it), and ``abstract``
    (a template: checked, never instantiated, each subclass gets its own metrics).

    Class attributes: ``states`` (names or state dicts with ``on_enter``/``on_exit``),
    ``transitions`` (``[trigger, source, dest]`` lists or dicts with ``conditions``,
    ``unless``, ``before``, ``after``, ``prepare``), ``initial``, ``auto_transitions``
    (default False), ``ignore_invalid_triggers``, ``duration_buckets``.

    Transitions of one machine run one at a time, in arrival order; a trigger awaited from
    the machine's own callback runs at once, nested in the running transition.
    """

    __slots__ = ("__weakref__", "_entered", "_owner", "_series", "_state", "_timers", "_waiters")

    _state: str
    _entered: float
    _owner: object | None
    _waiters: Any
    _series: Series | None
    _timers: Any

    #: The class's bound `Enum` (shared with subclasses that declare no states).
    metric: ClassVar[Enum]
    states: ClassVar[Sequence[str | Mapping[str, Any]]]
    transitions: ClassVar[Sequence[Sequence[Any] | Mapping[str, Any]]]
    initial: ClassVar[str | None] = None
    auto_transitions: ClassVar[bool] = False
    ignore_invalid_triggers: ClassVar[bool | None] = None
    duration_buckets: ClassVar[Sequence[float]] = DEFAULT_BUCKETS
    timeouts: ClassVar[Mapping[str, tuple[float, str]]] = {}

    _definition: ClassVar[Definition | None] = None
    _family: ClassVar[Family | None] = None
    _index: ClassVar[dict[str, int]] = {}
    _triggers: ClassVar[dict[str, dict[str, tuple[Step, ...]]]] = {}
    _ignore_invalid: ClassVar[frozenset[str]] = frozenset()
    _keywords: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, *, abstract: bool = False, **options: Any) -> None:
        super().__init_subclass__()
        owner = cls.__qualname__
        unknown = sorted(set(options) - _KEYWORDS)
        if unknown:
            raise TypeError(
                f"{owner}: unknown class keyword(s) {', '.join(unknown)}; "
                f"the keywords are {', '.join(sorted(_KEYWORDS))} and abstract"
            )
        # A class's keywords are defaults for its subclasses (a base class may carry the
        # namespace and labelnames), except its own name and documentation.
        merged = {**cls._keywords, **options}
        cls._keywords = {k: v for k, v in merged.items() if k not in ("name", "documentation")}
        labelnames = merged.get("labelnames", ())
        registry: CollectorRegistry | None = merged.get("registry", REGISTRY)
        declares = "states" in cls.__dict__
        if not declares:
            redefined = [a for a in _DEFINITION_ATTRIBUTES if a in cls.__dict__]
            if redefined:
                raise TypeError(
                    f"{owner} declares {', '.join(redefined)} but no states: a subclass "
                    "either reuses its parent's definition whole or declares its own states"
                )
        parent = cls._definition
        if declares:
            cls._definition = Definition(cls, abstract, _RESERVED)
        elif parent is None:
            cls._family = None  # abstract: its keywords wait for a subclass with states
            return
        elif abstract != parent.abstract:
            # A template's subclass is concrete unless it says otherwise, and vice versa.
            cls._definition = copy.copy(parent)
            cls._definition.abstract = abstract
        definition = cls._definition
        assert definition is not None

        keywords_given = bool(options)
        family = None
        if not definition.abstract:
            if declares or keywords_given or cls._family is None:
                buckets = check_buckets(owner, cls.duration_buckets)
                cls.metric = metric_for(cls, merged, labelnames)
                family = Family(cls.__name__, cls.metric, buckets, definition.transition_labels)
            else:
                family = cls._family
        cls._family = family
        _compile(cls, definition)
        _tasks.check_timeouts(cls)
        if family is not None and family is not _inherited_family(cls):
            if registry is not None:
                try:
                    registry.register(MachineCollector(cls))
                except ValueError as exc:
                    raise ValueError(
                        f"{owner}: its metric names are taken in its registry ({exc})"
                    ) from None
            remember(cls)

    # -- instances -----------------------------------------------------------------------

    def __init__(
        self, *, labels: Mapping[str, object] | None = None, initial: str | None = None
    ) -> None:
        cls = type(self)
        family = cls._family
        definition = cls._definition
        if family is None or definition is None:
            why = "it declares no states" if definition is None else "it is a template"
            raise TypeError(f"{cls.__qualname__} is abstract ({why}); subclass it with states")
        state = definition.initial if initial is None else initial
        index = cls._index.get(state) if isinstance(state, str) else None
        if index is None:
            raise ValueError(
                f"{cls.__qualname__}: unknown initial state {state!r}; "
                f"states are {', '.join(definition.states)}"
            )
        key = _label_key(cls, family, labels)
        self._state = state
        self._owner = None
        self._waiters = None
        self._timers = None
        self._entered = time.perf_counter()
        self._series = family.attach(key, index)

    @property
    def state(self) -> str:
        """The current state."""
        return self._state

    @property
    def labels(self) -> dict[str, str]:
        """The label values this machine's series is bound to."""
        family = type(self)._family
        assert family is not None
        series = self._series
        key = series.key if series is not None else None
        return dict(zip(family.metric._labelnames, key or ()))

    @property
    def closed(self) -> bool:
        """True once the machine has ended (`aclose`, or the end of ``async with``)."""
        return self._series is None

    async def trigger(self, trigger_name: str, *args: Any, **kwargs: Any) -> bool:
        """Fire a trigger by name; the same as calling its method.

        Raises:
            AttributeError: no trigger has that name.
            transitions.MachineError: the trigger is not valid in the current state.
        """
        table = type(self)._triggers.get(trigger_name)
        if table is None:
            definition = type(self)._definition
            assert definition is not None
            if definition.ignore_unknown or self._state in type(self)._ignore_invalid:
                return False
            raise AttributeError(
                f"{type(self).__qualname__}: Do not know event named '{trigger_name}'."
            )
        return await _engine.fire(self, trigger_name, table, args, kwargs)

    async def aclose(self) -> None:
        """End the machine: it leaves the counts, and its label set goes with its last
        machine. Waits for a running transition to finish; closing twice is harmless."""
        if self._series is None:
            return
        await _engine.fire_exclusive(self, self._end)

    async def __aenter__(self) -> Self:
        """Enter the machine: its state timeouts run until the block ends, then it closes."""
        await _tasks.enter(self)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await _tasks.exit(self)
        finally:
            with anyio.CancelScope(shield=True):  # an outer cancellation must not skip it
                await self.aclose()

    def track(
        self,
        enter: str,
        success: str,
        error: str | None = None,
        cancel: str | None = None,
    ) -> _tasks.Track:
        """Fire triggers around a coroutine: a decorator and an async context manager.

        `enter` fires first, then the body runs, then `success`; on an exception `error`
        fires and the exception propagates; on cancellation `cancel` (else `error`) fires,
        shielded, and the cancellation propagates. Trigger names are checked here.
        """
        return _tasks.Track(self, enter, success, error, cancel)

    @classmethod
    def mermaid(cls, counts: bool = False) -> str:
        """The machine as a Mermaid ``stateDiagram-v2``; with `counts`, live machines per
        state in each state's label."""
        return _diagram.mermaid(cls, counts=counts)

    @classmethod
    def state_names(cls) -> tuple[str, ...]:
        """The states, in declaration order (the initial one is `initial_state()`)."""
        return cls._require_definition().states

    @classmethod
    def initial_state(cls) -> str:
        """The state a new machine starts in."""
        return cls._require_definition().initial

    @classmethod
    def trigger_names(cls) -> tuple[str, ...]:
        """The triggers, in declaration order."""
        return tuple(cls._triggers)

    @classmethod
    def transition_table(cls) -> tuple[TransitionSpec, ...]:
        """Every allowed transition, wildcards and source lists expanded, in declaration
        order; `dest` is None for an internal transition."""
        definition = cls._require_definition()
        return tuple(
            TransitionSpec(trigger, source, t.dest)
            for trigger, event in definition.machine.events.items()
            for source, candidates in event.transitions.items()
            for t in candidates
        )

    @classmethod
    def metric_names(cls) -> tuple[str, ...]:
        """The full names of the class's metrics: the Enum first, then the derived ones."""
        family = cls._family
        if family is None:
            return ()
        return (
            family.name,
            family.machines_name,
            family.transitions_name,
            family.duration_name,
            family.errors_name,
        )

    @classmethod
    def _require_definition(cls) -> Definition:
        if cls._definition is None:
            raise TypeError(f"{cls.__qualname__} is abstract: it declares no states")
        return cls._definition

    def _end(self) -> None:
        series = self._series
        if series is not None:
            self._series = None
            family = type(self)._family
            assert family is not None
            family.detach(series, type(self)._index[self._state])

    def __del__(self) -> None:
        try:
            series = self._series
        except AttributeError:
            return  # never fully initialised
        if series is not None:
            self._end()

    def __repr__(self) -> str:
        labels = self.labels if self._series is not None else {}
        shown = f" labels={labels}" if labels else ""
        closed = " closed" if self._series is None else ""
        return f"<{type(self).__qualname__} state={self._state!r}{shown}{closed}>"


def _label_key(
    cls: type[MeteredMachine], family: Family, labels: Mapping[str, object] | None
) -> tuple[str, ...] | None:
    labelnames = family.metric._labelnames
    if labels is None:
        if not labelnames:
            return None
    elif type(labels) is dict and len(labels) == family.label_count and family.pick:
        try:
            picked = family.pick(labels)
        except KeyError:
            pass  # explained below
        else:
            return (str(picked),) if family.label_count == 1 else tuple(map(str, picked))
    given = {} if labels is None else labels
    if not isinstance(given, Mapping):
        raise TypeError(f"{cls.__qualname__}: labels must be a dict, got {labels!r}")
    if set(given) != set(labelnames):
        expected = ", ".join(labelnames) if labelnames else "none"
        got = ", ".join(sorted(map(str, given))) or "none"
        raise ValueError(f"{cls.__qualname__}: labels must be exactly {expected}; got {got}")
    if not labelnames:
        return None
    return tuple(str(given[name]) for name in labelnames)


def _compile(cls: type[MeteredMachine], definition: Definition) -> None:
    """Build the class's dispatch tables and trigger methods from the definition."""
    family = cls._family
    owner = cls.__qualname__
    machine = definition.machine
    cls._index = {state: i for i, state in enumerate(definition.states)}
    cls._ignore_invalid = definition.ignore_invalid

    def compile_callbacks(references: Sequence[Any], where: str) -> tuple[Callback, ...]:
        compiled = []
        for reference in references:
            if isinstance(reference, str):
                compiled.append(Callback(reference, None))
            elif callable(reference):
                name = getattr(reference, "__qualname__", None) or repr(reference)
                compiled.append(Callback(name, reference))
            else:
                raise TypeError(
                    f"{owner}: {where} callback {reference!r} must be a method name or a callable"
                )
        return tuple(compiled)

    def state_callbacks(kind: str, state: str) -> tuple[Callback, ...]:
        listed = list(getattr(machine.states[state], kind))
        # transitions' convention: a method named on_enter_<state> / on_exit_<state>.
        method = f"{kind}_{state}"
        if method not in listed and inspect.isfunction(getattr(cls, method, None)):
            listed.append(method)
        return compile_callbacks(listed, f"state {state!r} {kind}")

    enter = {state: state_callbacks("on_enter", state) for state in definition.states}
    exit_ = {state: state_callbacks("on_exit", state) for state in definition.states}
    triggers: dict[str, dict[str, tuple[Step, ...]]] = {}
    if family is not None:
        for trigger, event in machine.events.items():
            table: dict[str, tuple[Step, ...]] = {}
            for source, candidates in event.transitions.items():
                steps = []
                for t in candidates:
                    where = f"transition {trigger!r} from {source!r}"
                    dest_label = t.dest if t.dest is not None else source
                    steps.append(
                        Step(
                            family,
                            trigger,
                            source,
                            t.dest,
                            family.slots[(source, dest_label, trigger)],
                            prepare=compile_callbacks(t.prepare, where),
                            conditions=tuple(
                                Condition(compile_callbacks([c.func], where)[0], c.target)
                                for c in t.conditions
                            ),
                            before=compile_callbacks(t.before, where),
                            exit=exit_[source] if t.dest is not None else (),
                            enter=enter[t.dest] if t.dest is not None else (),
                            after=compile_callbacks(t.after, where),
                        )
                    )
                table[source] = tuple(steps)
            triggers[trigger] = table
    else:
        triggers = {trigger: {} for trigger in machine.events}
    cls._triggers = triggers

    generated: dict[str, Any] = {}

    for state in definition.states:
        generated[f"is_{state}"] = _is_method(cls, state)
    for trigger, table in triggers.items():
        generated[f"may_{trigger}"] = _may_method(cls, trigger, table)
    for trigger, table in triggers.items():
        if trigger in generated:
            raise ValueError(
                f"{owner}: trigger {trigger!r} clashes with the generated method {trigger!r}"
            )
        generated[trigger] = _trigger_method(cls, trigger, table)
    # What a parent generated for its own definition must not reach this class's machines.
    for klass in cls.__mro__[1:]:
        for name, value in vars(klass).items():
            if getattr(value, _GENERATED, False) and name not in generated:
                generated[name] = _Absent(name)
    for name, method in generated.items():
        for klass in cls.__mro__:
            if name in vars(klass):
                existing = vars(klass)[name]
                if not getattr(existing, _GENERATED, False):
                    what = "trigger" if name in triggers else "generated method"
                    raise ValueError(
                        f"{owner}: {what} {name!r} clashes with the attribute "
                        f"{klass.__qualname__}.{name}"
                    )
                break
        setattr(cls, name, method)


class _Absent:
    """Hides a parent's generated method from a subclass with its own definition."""

    def __init__(self, name: str) -> None:
        self.name = name
        setattr(self, _GENERATED, True)

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        cls = owner if owner is not None else type(instance)
        raise AttributeError(f"{cls.__qualname__} has no trigger or state method {self.name!r}")


def _describe(table: Mapping[str, tuple[Step, ...]]) -> str:
    moves = sorted(
        {
            f"{s.source} -> {s.dest if s.dest is not None else s.source}"
            for steps in table.values()
            for s in steps
        }
    )
    return "; ".join(moves) or "no transitions"


def _trigger_method(
    cls: type[MeteredMachine], trigger: str, table: dict[str, tuple[Step, ...]]
) -> Callable[..., Any]:
    fire = _engine.fire

    async def method(self: MeteredMachine, *args: Any, **kwargs: Any) -> bool:
        return await fire(self, trigger, table, args, kwargs)

    method.__name__ = trigger
    method.__qualname__ = f"{cls.__qualname__}.{trigger}"
    method.__doc__ = (
        f"Fire {trigger!r} ({_describe(table)}). True if a transition ran, False if a "
        "condition stopped it; MachineError if it is not valid in the current state."
    )
    setattr(method, _GENERATED, True)
    return method


def _may_method(
    cls: type[MeteredMachine], trigger: str, table: dict[str, tuple[Step, ...]]
) -> Callable[..., Any]:
    may = _engine.may

    async def method(self: MeteredMachine, *args: Any, **kwargs: Any) -> bool:
        return await may(self, table, args, kwargs)

    method.__name__ = f"may_{trigger}"
    method.__qualname__ = f"{cls.__qualname__}.may_{trigger}"
    method.__doc__ = f"Whether {trigger!r} would run now (runs prepare and conditions only)."
    setattr(method, _GENERATED, True)
    return method


def _is_method(cls: type[MeteredMachine], state: str) -> Callable[..., Any]:
    def method(self: MeteredMachine) -> bool:
        return self._state == state

    method.__name__ = f"is_{state}"
    method.__qualname__ = f"{cls.__qualname__}.is_{state}"
    method.__doc__ = f"Whether the machine is in state {state!r}."
    setattr(method, _GENERATED, True)
    return method


# Names a trigger may not take: MeteredMachine's own attributes and methods.
_RESERVED = frozenset(dir(MeteredMachine))
