"""Model-based tests of machine classes with Hypothesis: `testing.rule_based`.

The generated `RuleBasedStateMachine` has one rule per trigger, enabled in the states the
transition table allows it from, and one ``invalid`` rule that fires a trigger the current
state does not allow. Each example makes a machine with the factory and runs it on an event
loop in another thread (anyio's blocking portal), since Hypothesis calls rules
synchronously. After the machine is made and after every step, `_check` compares the
machine with its metrics and runs the user's invariants; a failure lists every step of the
example, so the shrunk example reads as the path that breaks the machine.

Imported by `testing.rule_based` only: Hypothesis is needed for this module alone.
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, ClassVar, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis.stateful import RuleBasedStateMachine, rule
from hypothesis.strategies import SearchStrategy
from transitions import MachineError

from ._events import TransitionEvent
from ._family import Family
from ._machine import MeteredMachine

__all__ = ["MachineRules", "rule_based"]

M = TypeVar("M", bound=MeteredMachine)

Invariant = Callable[[Any], object]


class MachineRules(RuleBasedStateMachine):
    """The rules `rule_based` generates, over one machine per example.

    ``self.machine`` is the machine under test and ``self.portal`` the blocking portal its
    event loop runs behind; a subclass may add rules of its own that use them.
    """

    machine_class: ClassVar[type[MeteredMachine]]
    _factory: ClassVar[Callable[[], Any]]
    _invariants: ClassVar[tuple[Invariant, ...]]
    _backend: ClassVar[str]
    _backend_options: ClassVar[dict[str, Any] | None]
    _family: ClassVar[Family]
    _sources: ClassVar[dict[str, tuple[str, ...]]]
    _allowed: ClassVar[dict[str, frozenset[str]]]

    machine: MeteredMachine
    portal: BlockingPortal

    def __init__(self) -> None:
        super().__init__()
        cls = type(self)
        self.steps: list[str] = []
        self._events: list[TransitionEvent] = []
        self._stack = ExitStack()
        try:
            self.portal = self._stack.enter_context(
                start_blocking_portal(cls._backend, cls._backend_options)
            )
            with _collection_paused():
                before = cls._family.live_counts()
                machine = self.portal.call(self._make)
                self.machine = machine
                self._stack.callback(self.portal.call, machine.aclose)
                machine.add_listener(self._events.append)
                self._stack.callback(machine.remove_listener, self._events.append)
                self._check(before, None, self.portal.call(self._invariants_failing))
        except BaseException:
            self._stack.close()
            raise

    async def _make(self) -> MeteredMachine:
        cls = type(self)
        made = cls._factory()
        if inspect.isawaitable(made):
            made = await made
        if not isinstance(made, cls.machine_class):
            raise TypeError(
                f"rule_based({cls.machine_class.__qualname__}): the factory returned "
                f"{made!r}, not a {cls.machine_class.__qualname__} machine"
            )
        return made

    def teardown(self) -> None:
        self._stack.close()

    # -- what the rules ask --------------------------------------------------------------

    def allowed(self) -> frozenset[str]:
        """The triggers the transition table allows from the machine's state (from the
        state itself, or, for a nested state, from a state that contains it)."""
        cls = type(self)
        state = self.machine.state
        allowed = cls._allowed.get(state)
        if allowed is None:
            machine = self.machine
            allowed = frozenset(
                trigger
                for trigger, sources in cls._sources.items()
                if any(_inside(machine, source) for source in sources)
            )
            cls._allowed[state] = allowed
        return allowed

    def _may(self, trigger: str) -> bool:
        return trigger in self.allowed()

    # -- a step --------------------------------------------------------------------------

    def fire(self, trigger: str, arguments: object = None, *, valid: bool = True) -> None:
        """Fire `trigger` (with `arguments`: a tuple of positional ones or a mapping of
        keyword ones) and check the machine afterwards; with `valid` False, the trigger
        must be refused."""
        with _collection_paused():
            self._fire(trigger, arguments, valid)

    def _fire(self, trigger: str, arguments: object, valid: bool) -> None:
        cls = type(self)
        machine = self.machine
        args, kwargs = _split(arguments)
        call = _call(trigger, args, kwargs)
        source = machine.state
        before = cls._family.live_counts()
        seen = len(self._events)
        was_closed = machine.closed
        result, error, failed = self.portal.call(self._step, trigger, args, kwargs)
        ran = self._events[seen:]
        if isinstance(error, MachineError):
            if valid:
                self.steps.append(f"{call}: raised MachineError: {error}")
                self._fail(f"{call} raised MachineError in state {source!r}, which allows it")
            self.steps.append(f"{call}: refused in {source} (MachineError)")
            if ran or machine.state != source:
                self._fail(f"{call} was refused, yet the machine moved")
        elif error is not None:
            self.steps.append(f"{call}: raised {type(error).__name__}: {error}")
            _note(error, self._report(f"{call} raised {type(error).__name__}"))
            raise error
        else:
            self.steps.append(f"{call}: {_moves(trigger, source, ran, result)}")
            if not valid:
                ignores = source in getattr(cls.machine_class, "_ignore_invalid", ())
                if ran:
                    self._fail(
                        f"{call} ran in state {source!r}, which the transition table of "
                        f"{cls.machine_class.__qualname__} does not allow it from"
                    )
                if result is not False or not (
                    ignores or cls.machine_class.ignore_invalid_triggers
                ):
                    self._fail(
                        f"{call} in state {source!r} returned {result!r} instead of raising "
                        "MachineError"
                    )
            elif not isinstance(result, bool):
                self._fail(f"{call} returned {result!r}, not True or False")
        self._check(before, source if not was_closed else None, failed)

    async def _step(
        self, trigger: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[object, Exception | None, tuple[str, str] | None]:
        """On the event loop: fire the trigger, then run the invariants (one trip there)."""
        result: object = None
        error: Exception | None = None
        try:
            result = await self.machine.trigger(trigger, *args, **kwargs)
        except Exception as exc:
            error = exc
        return result, error, await self._invariants_failing()

    # -- the checks ----------------------------------------------------------------------

    def _check(self, before: list[int], source: str | None, failed: tuple[str, str] | None) -> None:
        """The machine's state agrees with its Enum series and with ``_machines`` (changed
        by this machine's move alone), and every invariant holds."""
        cls = type(self)
        machine = self.machine
        family = cls._family
        state = machine.state
        counts = family.live_counts()
        expected = list(before)
        index = {name: i for i, name in enumerate(family.states)}
        if source is not None:
            expected[index[source]] -= 1
        if not machine.closed:
            expected[index[state]] += 1
            shown = _enum_state(family, machine.labels)
            if shown != state:
                self._fail(
                    f"the Enum series {machine.labels or '(no labels)'} shows {shown!r}, "
                    f"the machine is in {state!r}"
                )
        if counts != expected:
            differ = [
                f"{name}: {counts[i]} (expected {expected[i]})"
                for i, name in enumerate(family.states)
                if counts[i] != expected[i]
            ]
            self._fail(f"_machines disagrees with the machine's move: {', '.join(differ)}")
        if failed is not None:
            self._fail(*failed)

    async def _invariants_failing(self) -> tuple[str, str] | None:
        """The first invariant that does not hold: what failed, and its own message."""
        machine = self.machine
        for check in type(self)._invariants:
            name = getattr(check, "__name__", repr(check))
            try:
                result = check(machine)
                if inspect.isawaitable(result):
                    result = await result
            except AssertionError as error:
                return f"the invariant {name} failed", str(error)
            if result is False:
                return f"the invariant {name} returned False", ""
        return None

    def _report(self, what: str, detail: str = "") -> str:
        """`what` went wrong, and the steps that led there: the example, readably."""
        owner = type(self).machine_class.__qualname__
        if self.steps:
            lines = [f"{owner}: {what}, after these steps:"]
            lines.extend(f"  {n}. {step}" for n, step in enumerate(self.steps, start=1))
        else:
            lines = [f"{owner}: {what}, on the new machine:"]
        lines.append(f"machine: {self.machine!r}")
        if detail:
            lines.append(detail)
        return "\n".join(lines)

    def _fail(self, what: str, detail: str = "") -> None:
        __tracebackhide__ = True
        raise AssertionError(self._report(what, detail))


def rule_based(
    cls: type[M],
    *,
    factory: Callable[[], M | Awaitable[M]] | None = None,
    invariants: Iterable[Callable[[M], object]] = (),
    arguments: Mapping[str, SearchStrategy[Any]] | None = None,
    backend: str = "asyncio",
    backend_options: Mapping[str, Any] | None = None,
) -> type[MachineRules]:
    """See `statemachine_metrics.testing.rule_based`."""
    if not (isinstance(cls, type) and issubclass(cls, MeteredMachine)):
        raise TypeError(f"rule_based() takes a MeteredMachine class, not {cls!r}")
    owner = cls.__qualname__
    family = cls._family
    if family is None:
        raise TypeError(f"rule_based(): {owner} is abstract and has no metrics")
    sources: dict[str, list[str]] = {}
    for trigger, source, _dest in cls.transition_table():
        sources.setdefault(trigger, []).append(source)
    if not sources:
        raise ValueError(f"rule_based(): {owner} declares no transitions to fire")
    strategies = dict(arguments or {})
    for trigger, strategy in strategies.items():
        if trigger not in sources:
            raise ValueError(
                f"rule_based(): arguments for {trigger!r}, which is not a trigger of {owner}; "
                f"its triggers are {', '.join(sources)}"
            )
        if not isinstance(strategy, SearchStrategy):
            raise TypeError(
                f"rule_based(): arguments[{trigger!r}] must be a Hypothesis strategy of a "
                f"tuple (positional arguments) or a dict (keyword arguments), not {strategy!r}"
            )
    checks = tuple(invariants)
    for check in checks:
        if not callable(check):
            raise TypeError(f"rule_based(): an invariant must be callable, not {check!r}")
    if factory is not None and not callable(factory):
        raise TypeError(f"rule_based(): factory must be callable, not {factory!r}")

    namespace: dict[str, Any] = {
        "__module__": cls.__module__,
        "__qualname__": f"{owner}Rules",
        "__doc__": f"Model-based tests of {owner}: random triggers, checked at every step.",
        "machine_class": cls,
        "_factory": staticmethod(cls if factory is None else factory),
        "_invariants": checks,
        "_backend": backend,
        "_backend_options": None if backend_options is None else dict(backend_options),
        "_family": family,
        "_sources": {trigger: tuple(found) for trigger, found in sources.items()},
        "_allowed": {},
    }
    for trigger in sources:
        namespace[f"_rule_{trigger}"] = _trigger_rule(owner, trigger, strategies.get(trigger))
    rules: type[MachineRules] = type(f"{cls.__name__}Rules", (MachineRules,), namespace)
    return rules


def _trigger_rule(owner: str, trigger: str, strategy: SearchStrategy[Any] | None) -> Any:
    """A rule named after `trigger` (as the falsifying example prints it), enabled where
    the transition table allows the trigger."""
    step: Callable[..., None]
    if strategy is None:

        def step(self: MachineRules) -> None:
            self.fire(trigger, valid=self._may(trigger))

    else:

        def step(self: MachineRules, args: Any) -> None:
            self.fire(trigger, args, valid=self._may(trigger))

    step.__name__ = trigger
    step.__qualname__ = f"{owner}Rules.{trigger}"
    if strategy is None:
        return rule()(step)
    return rule(args=strategy)(step)


@contextmanager
def _collection_paused() -> Iterator[None]:
    """No garbage collection while a step is counted: other machines of the class that are
    garbage (kept by reference cycles of earlier tests) would leave ``_machines`` then,
    and the count would not move by this machine's move alone."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _inside(machine: MeteredMachine, source: str) -> bool:
    if machine.state == source:
        return True
    is_source = getattr(machine, f"is_{source}", None)
    return bool(is_source is not None and is_source(allow_substates=True))


def _enum_state(family: Family, labels: Mapping[str, str]) -> str | None:
    """The state the class's Enum shows for the series of `labels`, as it exports it."""
    for metric in family.metric.collect():
        for sample in metric.samples:
            if sample.value and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.labels[family.name]
    return None


def _split(arguments: object) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if arguments is None:
        return (), {}
    if isinstance(arguments, tuple):
        return arguments, {}
    if isinstance(arguments, Mapping):
        return (), dict(arguments)
    raise TypeError(
        f"rule_based(): a trigger's arguments strategy drew {arguments!r}; it must draw a "
        "tuple (positional arguments) or a dict (keyword arguments)"
    )


def _call(trigger: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    shown = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{trigger}({', '.join(shown)})"


def _moves(trigger: str, source: str, ran: Sequence[TransitionEvent], result: object) -> str:
    if not ran:
        if result is False:
            return f"stopped by a condition, stays {source}"
        return f"returned {result!r} and ran no transition, stays {source}"
    parts = []
    for number, event in enumerate(ran):
        move = f"{event.source} (internal)" if event.internal else f"{event.source} -> {event.dest}"
        if number == 0 and event.trigger == trigger:
            parts.append(move)
        else:
            parts.append(f"then {event.trigger}: {move}")
    return "; ".join(parts)


def _note(error: BaseException, text: str) -> None:
    add_note = getattr(error, "add_note", None)
    if add_note is not None:
        add_note(text)
