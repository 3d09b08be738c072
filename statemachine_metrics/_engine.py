"""The engine: runs a machine's compiled transitions on anyio.

A trigger, top to bottom: `fire` takes the machine's turn (one transition at a time, in
arrival order), `run` tries the compiled steps for the current state as transitions'
`AsyncMachine` does (prepare, conditions, before, exit, state change, enter, after), and
`change_state` moves the state and every metric in one synchronous step, so that no
cancellation or exception can separate them.
"""

from __future__ import annotations

import inspect
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, cast

import anyio
from transitions import Machine, MachineError

from ._family import Family, Series

if TYPE_CHECKING:
    from ._machine import MeteredMachine

__all__ = ["Callback", "Condition", "Step", "fire", "fire_exclusive", "may"]

_MISSING: Any = object()

#: Called after every transition that ran, with (machine, trigger, source, dest); dest is
#: None for an internal transition. Empty unless something (a test recorder) listens.
watchers: list[Callable[[MeteredMachine, str, str, str | None], None]] = []

# The turns held by the current task and the tasks it started: a trigger awaited from one
# of a machine's own callbacks runs at once, nested, instead of waiting for itself.
_held: ContextVar[tuple[object, ...]] = ContextVar("statemachine_metrics_held", default=())


class Callback:
    """A compiled callback: a fixed callable, or the name of an attribute of the machine."""

    __slots__ = ("func", "name")

    def __init__(self, name: str, func: Callable[..., Any] | None) -> None:
        self.name = name
        self.func = func

    def __call__(self, machine: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        func = self.func
        if func is None:
            # Resolved on the instance at each call, as transitions does with a model.
            func = getattr(machine, self.name, _MISSING)
            if func is _MISSING:
                func = self._imported(machine)
            elif not callable(func):
                return func  # a property or plain attribute: its value
        return func(*args, **kwargs)

    def _imported(self, machine: object) -> Callable[..., Any]:
        # Not an attribute: a dotted path, imported once by transitions' own resolution.
        try:
            func = Machine.resolve_callable(self.name, cast(Any, _NoModel))
        except AttributeError:
            raise AttributeError(
                f"{type(machine).__qualname__}: callback {self.name!r} is neither an attribute "
                "of the machine nor an importable dotted path"
            ) from None
        self.func = func
        return func

    def __repr__(self) -> str:
        return self.name


class _NoModel:
    """Event data whose model has no attributes, for resolving import paths."""

    model = object()


class Condition:
    """A compiled condition: passes when the callback's result equals `target`."""

    __slots__ = ("callback", "target")

    def __init__(self, callback: Callback, target: bool) -> None:
        self.callback = callback
        self.target = target


class Step:
    """One compiled transition of one trigger from one source state."""

    __slots__ = (
        "after",
        "before",
        "conditions",
        "dest",
        "dst",
        "enter",
        "exit",
        "family",
        "prepare",
        "slot",
        "source",
        "src",
        "trigger",
    )

    def __init__(
        self,
        family: Family,
        trigger: str,
        source: str,
        dest: str | None,
        slot: int,
        prepare: tuple[Callback, ...],
        conditions: tuple[Condition, ...],
        before: tuple[Callback, ...],
        exit: tuple[Callback, ...],
        enter: tuple[Callback, ...],
        after: tuple[Callback, ...],
    ) -> None:
        index = {state: i for i, state in enumerate(family.states)}
        self.family = family
        self.trigger = trigger
        self.source = source
        self.dest = dest
        self.src = index[source]
        self.dst = index[dest if dest is not None else source]
        self.slot = slot
        self.prepare = prepare
        self.conditions = conditions
        self.before = before
        self.exit = exit
        self.enter = enter
        self.after = after


async def _callbacks(
    machine: object,
    callbacks: Sequence[Callback],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """Run callbacks one after another, in list order, awaiting what they return."""
    for callback in callbacks:
        result = callback(machine, args, kwargs)
        if result is not None and inspect.isawaitable(result):
            await result


async def _conditions(
    machine: object,
    conditions: Sequence[Condition],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> bool:
    """Evaluate every condition in order (no short cut, as AsyncMachine); True if all pass."""
    passed = True
    for condition in conditions:
        result = condition.callback(machine, args, kwargs)
        if result is not None and inspect.isawaitable(result):
            result = await result
        if result != condition.target:
            passed = False
    return passed


def change_state(machine: MeteredMachine, step: Step) -> None:
    """Move the machine to the step's destination, with every metric, in one step."""
    family = step.family
    now = time.perf_counter()
    with family.lock:
        if family.pending:
            family._drain()
        src, dst = step.src, step.dst
        elapsed = now - machine._entered
        family.hist[src][bisect_left(family.bounds, elapsed)] += 1
        family.hist_sum[src] += elapsed
        family.transitions[step.slot] += 1
        series: Series | None = machine._series
        if series is not None:  # None: closed by one of its own callbacks, and uncounted
            counts = family.counts
            counts[src] -= 1
            counts[dst] += 1
            series.child._value = dst
            if family.mirror is not None:
                family.mirror.moved(series.key, src, dst, step.slot, elapsed)
        elif family.mirror is not None:
            family.mirror.counted(step.slot)
            family.mirror.observed(src, elapsed)
        machine._state = step.dest  # type: ignore[assignment]
        machine._entered = now
    timers = machine._timers
    if timers is not None:
        timers.moved(step.dest)
    if watchers:
        for watcher in tuple(watchers):
            watcher(machine, step.trigger, step.source, step.dest)


def count_internal(machine: MeteredMachine, step: Step) -> None:
    """An internal transition runs its callbacks and is counted; the state stays."""
    family = step.family
    with family.lock:
        family.transitions[step.slot] += 1
        if family.mirror is not None:
            family.mirror.counted(step.slot)
    if watchers:
        for watcher in tuple(watchers):
            watcher(machine, step.trigger, step.source, None)


async def run(
    machine: MeteredMachine,
    steps: Sequence[Step],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> bool:
    """Try the steps in order; the first whose conditions pass runs. True if one ran."""
    for step in steps:
        if step.prepare:
            await _callbacks(machine, step.prepare, args, kwargs)
        if step.conditions and not await _conditions(machine, step.conditions, args, kwargs):
            continue
        if step.before:
            await _callbacks(machine, step.before, args, kwargs)
        if step.dest is None:
            count_internal(machine, step)
        else:
            if step.exit:
                await _callbacks(machine, step.exit, args, kwargs)
            change_state(machine, step)
            if step.enter:
                await _callbacks(machine, step.enter, args, kwargs)
        if step.after:
            await _callbacks(machine, step.after, args, kwargs)
        return True
    return False


async def fire(
    machine: MeteredMachine,
    trigger: str,
    table: dict[str, tuple[Step, ...]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    still: Callable[[], bool] | None = None,
) -> bool:
    """Run `trigger` on `machine` in its turn; see `MeteredMachine` for the semantics.

    `still`, if given, is asked once the turn is ours; False fires nothing and returns
    False (a timer whose state was left while it waited for the turn).
    """
    series = machine._series
    if series is None:
        raise RuntimeError(f"{type(machine).__name__} machine is closed; triggers need a live one")
    owner = machine._owner
    if owner is not None and owner in _held.get():
        if still is not None and not still():
            return False
        return await _run_checked(machine, trigger, table, args, kwargs)
    if owner is None:
        token = machine._owner = object()
    else:
        token = await _wait_turn(machine)
    held = _held.set((*_held.get(), token))
    try:
        if still is not None and not still():
            return False
        return await _run_checked(machine, trigger, table, args, kwargs)
    finally:
        _held.reset(held)
        _release(machine)


async def fire_exclusive(machine: MeteredMachine, action: Callable[[], None]) -> None:
    """Run a synchronous `action` in the machine's turn, after any running transition."""
    owner = machine._owner
    if owner is not None and owner in _held.get():
        action()
        return
    if owner is None:
        machine._owner = object()
    else:
        await _wait_turn(machine)
    try:
        action()
    finally:
        _release(machine)


async def _run_checked(
    machine: MeteredMachine,
    trigger: str,
    table: dict[str, tuple[Step, ...]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> bool:
    try:
        state = machine._state
        steps = table.get(state)
        if steps is None:
            if state in type(machine)._ignore_invalid:
                return False
            raise MachineError(
                f"{type(machine).__name__}: Can't trigger event {trigger} from state {state}!"
            )
        return await run(machine, steps, args, kwargs)
    except Exception as exc:
        family = type(machine)._family
        if family is not None:
            family.error(trigger, exc)
        raise


async def _wait_turn(machine: MeteredMachine) -> object:
    """Queue behind the running transition; return the turn's token once handed over."""
    waiters = machine._waiters
    if waiters is None:
        waiters = machine._waiters = deque()
    event = anyio.Event()
    waiters.append(event)
    try:
        await event.wait()
    except BaseException:
        if event.is_set():
            _release(machine)  # the turn was ours already: pass it on
        else:
            waiters.remove(event)
        raise
    return machine._owner


def _release(machine: MeteredMachine) -> None:
    waiters = machine._waiters
    if waiters:
        machine._owner = object()
        event = waiters.popleft()
        if not waiters:
            machine._waiters = None
        event.set()
    else:
        machine._owner = None


async def may(
    machine: MeteredMachine,
    table: dict[str, tuple[Step, ...]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> bool:
    """Whether the trigger would run now: `prepare` and the conditions, nothing else."""
    if machine._series is None:
        raise RuntimeError(f"{type(machine).__name__} machine is closed; triggers need a live one")
    for step in table.get(machine._state, ()):
        if step.prepare:
            await _callbacks(machine, step.prepare, args, kwargs)
        if not step.conditions or await _conditions(machine, step.conditions, args, kwargs):
            return True
    return False
