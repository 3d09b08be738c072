"""`MeteredMachine`: declarative machine classes, compiled once per class.

A class's definition is checked and built by `_definition`; this module turns it into
per-state dispatch tables of `_engine.Step`, binds the class's metric family, and
generates the trigger methods.
"""

from __future__ import annotations

import difflib
import enum
import inspect
import itertools
from collections.abc import Callable, Coroutine, Generator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import anyio
from prometheus_client.registry import REGISTRY, CollectorRegistry

from . import _diagram, _engine, _ops, _tasks, _trigger
from ._collector import MachineCollector, all_families, remember
from ._definition import Definition, TransitionSpec, metric_for
from ._engine import Callback, Condition, Dispatch, Hooks, Step
from ._enum import Enum
from ._events import Listener, StateInfo
from ._family import DEFAULT_BUCKETS, DEFAULT_TRIGGER_BUCKETS, Family, Series, check_buckets

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["MeteredMachine", "TransitionSpec"]

_DEFINITION_ATTRIBUTES = ("transitions", "initial", "auto_transitions", "ignore_invalid_triggers")
_GENERATED = "__statemachine_metrics_generated__"
_KEYWORDS = frozenset(
    ("name", "documentation", "labelnames", "namespace", "subsystem", "unit", "registry")
)


#: Called with every machine class that gets its own compiled definition, once created
#: (instrumentation of classes created later hooks in here).
class_hooks: list[Callable[[type[MeteredMachine]], None]] = []

# Each machine's key in its family's per-state bookkeeping: unique for the process's life,
# unlike id(), which a new machine may reuse while a dead one's end is still pending.
_tokens = itertools.count()


class _either:
    """A method that works on the class (every machine of it) and on one machine."""

    def __init__(self, func: Callable[[Any, Listener], None]) -> None:
        self.func = func
        self.__doc__ = func.__doc__
        self.__name__ = func.__name__

    def __get__(self, instance: object, owner: type | None = None) -> Callable[[Listener], None]:
        target = owner if instance is None else instance
        func = self.func

        def bound(fn: Listener) -> None:
            func(target, fn)

        bound.__doc__ = func.__doc__
        return bound


def _relisten(cls: type[MeteredMachine]) -> None:
    """Recompute, in place, the listener lists of `cls` and its subclasses."""
    pending = [cls]
    while pending:
        klass = pending.pop()
        klass._listening[:] = [
            fn
            for base in reversed(klass.__mro__)
            if isinstance(base, type) and issubclass(base, MeteredMachine)
            for fn in vars(base).get("_own_listeners", ())
        ]
        pending.extend(klass.__subclasses__())


def _unexpected(cls: type[MeteredMachine], unexpected: Mapping[str, object]) -> NoReturn:
    names = ", ".join(map(repr, unexpected))
    family = cls._family
    labelnames = family.metric._labelnames if family is not None else ()
    shown = {name: "..." for name in unexpected if name in labelnames}
    shown = shown or dict.fromkeys(labelnames, "...")
    hint = (
        f"; label values go in labels=, e.g. {cls.__qualname__}(labels={shown})".replace(
            "'...'", "..."
        )
        if labelnames
        else ""
    )
    raise TypeError(
        f"{cls.__qualname__}() got unexpected keyword argument(s) {names}; it takes labels= "
        f"and initial={hint}"
    )


def _name_clash(cls: type[MeteredMachine], registry: CollectorRegistry) -> str:
    family = cls._family
    assert family is not None
    names = set(family.exposed_names)
    holders = []
    for collector, taken in list(registry._collector_to_names.items()):
        if names.intersection(taken):
            owners = getattr(collector, "_families", None)
            described = ", ".join(f"{f.owner} (module {f.module})" for f in owners or ())
            holders.append(described or type(collector).__name__)
    for other in all_families():
        if other is not family and not names.isdisjoint(other.exposed_names):
            holders.append(f"{other.owner} (module {other.module})")
    holders = list(dict.fromkeys(holders))
    where = f"; they belong to {', '.join(holders)}" if holders else ""
    return (
        f"{cls.__qualname__}: its metric names are taken in its registry ({family.name!r} and "
        f"the names derived from it{where}). Give {cls.__qualname__} (module "
        f"{cls.__module__}) another name= or namespace=, or registry=None to export it only "
        "through a MachineCollector; a module imported twice (a script also imported by "
        "name, or importlib.reload) defines its classes twice"
    )


def _register(cls: type[MeteredMachine], family: Family, registry: CollectorRegistry) -> None:
    """Export the class in `registry`, unless a `MachineCollector()` there (every class,
    including those created later) exports it already: never twice."""
    collectors = list(registry._collector_to_names)
    if any(isinstance(c, MachineCollector) and c._families is None for c in collectors):
        # Still refuse names taken there: by another collector, or by another class that
        # collector exports.
        names = family.exposed_names
        taken = any(name in registry._names_to_collectors for name in names) or any(
            not names.isdisjoint(other.exposed_names)
            for other in all_families()
            if other is not family
        )
        if taken:
            raise ValueError(_name_clash(cls, registry))
        return
    try:
        registry.register(MachineCollector(cls))
    except ValueError:
        raise ValueError(_name_clash(cls, registry)) from None


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

    ```python
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
    ```

    Class keywords: ``name`` (default: the class name in snake_case + ``_state``),
    ``documentation`` (default: the docstring's first line), ``labelnames``, ``namespace``,
    ``subsystem``, ``unit`` (must be empty), ``registry`` (default `REGISTRY`; ``None``
    exports the class only through a `MachineCollector` that names it), and ``abstract``
    (a template: checked, never instantiated, each subclass gets its own metrics).

    Class attributes: ``states`` (names or state dicts with ``on_enter``/``on_exit``),
    ``transitions`` (``[trigger, source, dest]`` lists or dicts with ``conditions``,
    ``unless``, ``before``, ``after``, ``prepare``), ``initial``, ``auto_transitions``
    (default False), ``ignore_invalid_triggers``, ``duration_buckets``,
    ``trigger_buckets``, ``timeouts`` (``{"running": (30.0, "fail")}`` fires ``fail`` when a
    machine stays 30 s in ``running``; timers run while the machine is entered, ``async
    with``) and ``stuck_after`` (``{"error": 600.0}``: seconds after which a machine in
    that state counts as stuck, for the generated alerts).

    Transitions of one machine run one at a time, in arrival order; a trigger awaited from
    the machine's own callback runs at once, nested in the running transition.
    """

    __slots__ = (
        "__weakref__",
        "_listeners",
        "_owner",
        "_series",
        "_state",
        "_timers",
        "_token",
        "_waiters",
    )

    _state: str
    _token: int
    _listeners: tuple[Listener, ...] | None
    _owner: _engine.Turn | None
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
    trigger_buckets: ClassVar[Sequence[float]] = DEFAULT_TRIGGER_BUCKETS
    timeouts: ClassVar[Mapping[str, tuple[float, str]]] = {}
    stuck_after: ClassVar[Mapping[str, float]] = {}

    _definition: ClassVar[Definition | None] = None
    _family: ClassVar[Family | None] = None
    _index: ClassVar[dict[str, int]] = {}
    _triggers: ClassVar[dict[str, Dispatch]] = {}
    _hooks: ClassVar[Hooks | None] = None
    _members: ClassVar[Mapping[str, object] | None] = None
    # Listeners added on this class, and those of this class and its bases, which every
    # compiled step of the class holds (one list, changed in place).
    _own_listeners: ClassVar[list[Listener]] = []
    _listening: ClassVar[list[Listener]] = []
    _ignore_invalid: ClassVar[frozenset[str]] = frozenset()
    _keywords: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, *, abstract: bool = False, **options: Any) -> None:
        super().__init_subclass__()
        owner = cls.__qualname__
        cls._own_listeners = []
        cls._listening = [*cls._listening]
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
        if registry is not None and not isinstance(registry, CollectorRegistry):
            raise TypeError(
                f"{owner}: registry= must be a prometheus_client CollectorRegistry or None, "
                f"got {registry!r}"
            )
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
            cls._definition = Definition(cls, abstract, _RESERVED).for_class(cls, abstract)
        elif parent is None:
            cls._family = None  # abstract: its keywords wait for a subclass with states
            return
        else:
            # A template's subclass is concrete unless it says otherwise, and vice versa; a
            # subclass may set its own machine-level callbacks, send_event and queued.
            cls._definition = parent.for_class(cls, abstract)
        definition = cls._definition
        assert definition is not None

        keywords_given = bool(options)
        family = None
        if not definition.abstract:
            if declares or keywords_given or cls._family is None:
                buckets = check_buckets(owner, cls.duration_buckets)
                cls.metric = metric_for(cls, merged, labelnames)
                family = Family(
                    cls.__name__,
                    cls.metric,
                    buckets,
                    definition.transition_labels,
                    tuple(definition.machine.events),
                    check_buckets(owner, cls.trigger_buckets, "trigger_buckets"),
                )
                family.module = cls.__module__
            else:
                family = cls._family
                for attribute in ("duration_buckets", "trigger_buckets"):
                    if attribute in cls.__dict__:
                        raise ValueError(
                            f"{owner}.{attribute}: {owner} shares the metrics of its parent, "
                            "whose buckets it keeps; declare states (or a class keyword such "
                            "as name=) to give it metrics of its own"
                        )
        cls._family = family
        _compile(cls, definition)
        _tasks.check_timeouts(cls)
        _ops.check_stuck_after(cls)
        if family is not None and family is not _inherited_family(cls):
            if registry is not None:
                _register(cls, family, registry)
            remember(cls)
        _engine.use_opentelemetry_exemplars()
        for hook in class_hooks:
            hook(cls)

    # -- instances -----------------------------------------------------------------------

    def __init__(
        self,
        *,
        labels: Mapping[str, object] | None = None,
        initial: str | None = None,
        **unexpected: NoReturn,
    ) -> None:
        cls = type(self)
        if unexpected:
            _unexpected(cls, unexpected)
        family = cls._family
        definition = cls._definition
        if family is None or definition is None:
            why = "it declares no states" if definition is None else "it is a template"
            raise TypeError(f"{cls.__qualname__} is abstract ({why}); subclass it with states")
        state = definition.initial if initial is None else initial
        if isinstance(state, enum.Enum) and cls._members is not None:
            state = state.name
        tree = definition.tree
        if tree is not None and isinstance(state, str) and state in tree.nodes:
            # A compound state with an initial child: the machine starts in that child.
            node = tree.nodes[state]
            while node.initial is not None:
                node = tree.nodes[node.initial]
            state = node.name
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
        self._listeners = None
        self._token = token = next(_tokens)
        self._series = family.attach(key, index, token)

    @property
    def state(self) -> str:
        """The current state: its name or, when the class gives its states as an
        `enum.Enum` class, its member (as in transitions; declare the enum with the `str`
        mixin, ``class Phase(str, enum.Enum)``, for the member to be a `str` too)."""
        members = type(self)._members
        if members is None:
            return self._state
        return members[self._state]  # type: ignore[return-value]

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
        cls = type(self)
        dispatch = cls._triggers.get(trigger_name)
        if dispatch is None:
            definition = cls._definition
            assert definition is not None
            if definition.ignore_unknown or self._state in cls._ignore_invalid:
                return False
            known = list(cls._triggers)
            close = difflib.get_close_matches(str(trigger_name), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise AttributeError(
                f"{cls.__qualname__}: Do not know event named {trigger_name!r}{hint} "
                f"The triggers are {', '.join(known) or 'none'}."
            )
        return await dispatch.fire(self, dispatch, args, kwargs)

    @_either
    def add_listener(target: MeteredMachine | type[MeteredMachine], fn: Listener) -> None:
        """Call ``fn(event)`` after every transition that runs: on a class, of every machine
        of it and its subclasses; on a machine, of that machine.

        `fn` gets a `TransitionEvent` (``.machine``, ``.trigger``, ``.source``, ``.dest``,
        ``.internal``, ``.time``), synchronously, once the state and the metrics changed.
        A listener that raises is logged to the ``statemachine_metrics`` logger; the
        transition stands. Adding one listener twice calls it twice.

            Worker.add_listener(print)        # every Worker
            w.add_listener(audit)             # this machine only
        """
        if not callable(fn):
            raise TypeError(f"add_listener takes a callable, not {fn!r}")
        if isinstance(target, type):
            target._own_listeners.append(fn)
            _relisten(target)
        else:
            target._listeners = (*(target._listeners or ()), fn)

    @_either
    def remove_listener(target: MeteredMachine | type[MeteredMachine], fn: Listener) -> None:
        """Stop calling a listener added with `add_listener` on the same class or machine.

        Raises:
            ValueError: `fn` is not a listener of that class or machine.
        """
        if isinstance(target, type):
            try:
                target._own_listeners.remove(fn)
            except ValueError:
                raise ValueError(
                    f"{target.__qualname__}.remove_listener: {fn!r} is not a listener of "
                    f"{target.__qualname__}"
                ) from None
            _relisten(target)
            return
        listeners = list(target._listeners or ())
        try:
            listeners.remove(fn)
        except ValueError:
            raise ValueError(
                f"{type(target).__qualname__}.remove_listener: {fn!r} is not a listener of "
                "this machine"
            ) from None
        target._listeners = tuple(listeners) or None

    async def aclose(self) -> None:
        """End the machine: it leaves the counts, and its label set goes with its last
        machine. Waits for a running transition to finish; closing twice is harmless."""
        if self._series is None:
            return
        if self._owner is None:
            self._end()  # the turn is free: nothing can come between
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
            family.oldest_name,
            family.trigger_duration_name,
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
            family.detach(series, type(self)._index[self._state], self._token)

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
            if family.label_count == 1:
                if picked is not None:
                    return (str(picked),)
            elif None not in picked:
                return tuple(map(str, picked))
    given = {} if labels is None else labels
    if not isinstance(given, Mapping):
        raise TypeError(f"{cls.__qualname__}: labels must be a dict, got {labels!r}")
    if set(given) != set(labelnames):
        expected = ", ".join(labelnames) if labelnames else "none"
        got = ", ".join(sorted(map(str, given))) or "none"
        raise ValueError(f"{cls.__qualname__}: labels must be exactly {expected}; got {got}")
    if not labelnames:
        return None
    missing = [name for name in labelnames if given[name] is None]
    if missing:
        raise ValueError(
            f"{cls.__qualname__}: label value of {', '.join(map(repr, missing))} is None; "
            "give a string (an empty one if there is no value)"
        )
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
        if method not in listed and _binds_as_method(cls, method):
            listed.append(method)
        return compile_callbacks(listed, f"state {state!r} {kind}")

    callbacks_of = {
        kind: {state: state_callbacks(kind, state) for state in machine.states}
        for kind in ("on_enter", "on_exit")
    }

    def path_callbacks(kind: str, path: Sequence[str]) -> tuple[Callback, ...]:
        chosen = callbacks_of[kind]
        return tuple(callback for state in path for callback in chosen[state])

    machine_callbacks: Mapping[str, Sequence[Any]] = getattr(definition, "machine_callbacks", {})

    def hook(name: str) -> tuple[Callback, ...]:
        return compile_callbacks(list(machine_callbacks.get(name, ())), name)

    before_change, after_change, on_final = (
        hook("before_state_change"),
        hook("after_state_change"),
        hook("on_final"),
    )
    finals: frozenset[str] = getattr(definition, "final_states", frozenset())
    state_on_final: Mapping[str, Sequence[Any]] = getattr(definition, "state_on_final", {})

    def entering(t: Any, source: str) -> tuple[Callback, ...]:
        callbacks = path_callbacks("on_enter", getattr(t, "enter_path", (t.dest,)))
        if t.dest in finals:
            # As AsyncMachine: a final state's own on_final, then the machine's.
            where = f"state {t.dest!r} on_final"
            callbacks += compile_callbacks(list(state_on_final.get(t.dest, ())), where)
            callbacks += on_final
        return callbacks

    send_event = bool(getattr(definition, "send_event", False))
    queued = bool(getattr(definition, "queued", False))
    prepare_event, finalize_event, on_exception = (
        hook("prepare_event"),
        hook("finalize_event"),
        hook("on_exception"),
    )
    hooks = None
    if send_event or queued or prepare_event or finalize_event or on_exception:
        hooks = Hooks(
            prepare_event,
            finalize_event,
            on_exception,
            send_event,
            queued,
            {state: StateInfo(state, state in finals) for state in machine.states},
        )
    cls._hooks = hooks
    cls._members = getattr(definition, "enum_members", None) or None

    triggers: dict[str, Dispatch] = {}
    if family is not None:
        for trigger, event in machine.events.items():
            table: dict[str, tuple[Step, ...]] = {}
            for source, candidates in event.transitions.items():
                steps = []
                level: object = None
                for i, t in enumerate(candidates):
                    where = f"transition {trigger!r} from {source!r}"
                    # prepare_event runs before the first candidate of each group tried
                    # together: one group, or with nested states, one per level.
                    leads = i == 0 or getattr(t, "level", None) != level
                    level = getattr(t, "level", None)
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
                            before=before_change + compile_callbacks(t.before, where),
                            # A nested definition gives the states a transition leaves and
                            # enters, in callback order; a flat one, its source and dest.
                            exit=()
                            if t.dest is None
                            else path_callbacks("on_exit", getattr(t, "exit_path", (source,))),
                            enter=() if t.dest is None else entering(t, source),
                            after=compile_callbacks(t.after, where) + after_change,
                            listening=cls._listening,
                            lead=prepare_event if leads else (),
                        )
                    )
                    if t.dest is not None:
                        steps[-1].entered = frozenset(getattr(t, "enter_path", (t.dest,)))
                if len(steps) == 1:
                    only = steps[0]
                    only.bare = only.dest is not None and not (
                        only.prepare
                        or only.conditions
                        or only.before
                        or only.exit
                        or only.enter
                        or only.after
                    )
                table[source] = tuple(steps)
            triggers[trigger] = Dispatch(trigger, table, family, hooks)
    else:  # a template: its triggers are known, and never fired
        triggers = {trigger: Dispatch(trigger, {}, None, hooks) for trigger in machine.events}
    cls._triggers = triggers
    _trigger.check(cls, triggers)

    generated: dict[str, Any] = {}

    substates: Mapping[str, frozenset[str]] = getattr(definition, "substates", None) or {
        state: frozenset((state,)) for state in definition.states
    }
    for state, inside in substates.items():
        generated[f"is_{state}"] = _is_method(cls, state, inside)
    for trigger, dispatch in triggers.items():
        generated[f"may_{trigger}"] = _may_method(cls, trigger, dispatch)
    for trigger, dispatch in triggers.items():
        if trigger in generated:
            raise ValueError(
                f"{owner}: trigger {trigger!r} clashes with the generated method {trigger!r}"
            )
        generated[trigger] = _trigger_method(cls, trigger, dispatch)
    # What a parent generated for its own definition must not reach this class's machines.
    for klass in cls.__mro__[1:]:
        for name, value in vars(klass).items():
            if getattr(value, _GENERATED, False) and name not in generated:
                generated[name] = _Absent(name)
    for name, method in generated.items():
        for klass in cls.__mro__:
            if name in vars(klass):
                existing = vars(klass)[name]
                declared = isinstance(existing, _trigger.Trigger)  # becomes its method
                if not (getattr(existing, _GENERATED, False) or declared):
                    what = "trigger" if name in triggers else "generated method"
                    raise ValueError(
                        f"{owner}: {what} {name!r} clashes with the attribute "
                        f"{klass.__qualname__}.{name}"
                    )
                break
        setattr(cls, name, method)


def _binds_as_method(cls: type, name: str) -> bool:
    """Whether ``instance.<name>`` is a bound method: transitions' test for an
    ``on_enter_<state>``/``on_exit_<state>`` method (functions and classmethods are, a
    staticmethod or a callable object is not)."""
    for klass in cls.__mro__:
        if name in vars(klass):
            raw = vars(klass)[name]
            return inspect.isfunction(raw) or isinstance(raw, classmethod)
    return False


class _Absent:
    """Hides a parent's generated method from a subclass with its own definition."""

    def __init__(self, name: str) -> None:
        self.name = name
        setattr(self, _GENERATED, True)

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        cls = owner if owner is not None else type(instance)
        raise AttributeError(f"{cls.__qualname__} has no trigger or state method {self.name!r}")


def _describe(dispatch: Dispatch) -> str:
    moves = sorted(
        {
            f"{s.source} -> {s.dest if s.dest is not None else s.source}"
            for steps in dispatch.steps.values()
            for s in steps
        }
    )
    return "; ".join(moves) or "no transitions"


def _trigger_method(
    cls: type[MeteredMachine], trigger: str, dispatch: Dispatch
) -> Callable[..., Any]:
    method = _engine.trigger_method(dispatch)
    method.__name__ = trigger
    method.__qualname__ = f"{cls.__qualname__}.{trigger}"
    method.__doc__ = (
        f"Fire {trigger!r} ({_describe(dispatch)}). True if a transition ran, False if a "
        "condition stopped it; MachineError if it is not valid in the current state."
    )
    setattr(method, _GENERATED, True)
    return method


class _Maybe(Coroutine[Any, Any, bool]):
    """What ``may_<trigger>()`` returns: a coroutine that is never true unawaited."""

    __slots__ = ("_coroutine", "_name")

    def __init__(self, coroutine: Coroutine[Any, Any, bool], name: str) -> None:
        self._coroutine = coroutine
        self._name = name

    def __await__(self) -> Generator[Any, None, bool]:
        return self._coroutine.__await__()

    def send(self, value: Any) -> Any:
        return self._coroutine.send(value)

    def throw(self, *args: Any) -> Any:
        return self._coroutine.throw(*args)

    def close(self) -> None:
        self._coroutine.close()

    def __bool__(self) -> bool:
        self._coroutine.close()
        raise TypeError(
            f"{self._name}() must be awaited: write 'if await machine.{self._name}():'; "
            "an unawaited call is a coroutine, not an answer"
        )


def _may_method(
    cls: type[MeteredMachine], trigger: str, dispatch: Dispatch
) -> Callable[..., Coroutine[Any, Any, bool]]:
    may = _engine.may
    name = f"may_{trigger}"

    def method(self: MeteredMachine, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, bool]:
        return _Maybe(may(self, dispatch, args, kwargs), name)

    method.__name__ = name
    method.__qualname__ = f"{cls.__qualname__}.{name}"
    method.__doc__ = (
        f"Whether {trigger!r} would run now (runs prepare and conditions only); await it."
    )
    setattr(method, _GENERATED, True)
    return method


def _is_method(cls: type[MeteredMachine], state: str, inside: frozenset[str]) -> Callable[..., Any]:
    def method(self: MeteredMachine, allow_substates: bool = False) -> bool:
        if allow_substates:
            return self._state in inside
        return self._state == state

    method.__name__ = f"is_{state}"
    method.__qualname__ = f"{cls.__qualname__}.is_{state}"
    method.__doc__ = (
        f"Whether the machine is in state {state!r} (with `allow_substates`, or in one of "
        "its nested states)."
    )
    setattr(method, _GENERATED, True)
    return method


# Names a trigger may not take: MeteredMachine's own attributes and methods.
_RESERVED = frozenset(dir(MeteredMachine))
