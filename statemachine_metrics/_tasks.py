"""Coroutines that drive machines: `Track` and state timeouts (`TaskMachine` builds on them).

`Track` (from ``machine.track(...)``) fires triggers around a coroutine: `enter`, then the
body, then `success`, `error` or `cancel` for the way the body ended. State timeouts fire a
trigger when a machine stays in a state too long; they run in one timer task per entered
machine (``async with machine:``), owned by a task group that `enter` opens and `exit`
closes, and woken by `_Timers.moved`, which the engine calls after every state change.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import sys
import time
import weakref
from collections.abc import Callable, Collection, Coroutine, Iterator, Mapping, Sequence
from numbers import Real
from typing import (
    TYPE_CHECKING,
    Any,
    NamedTuple,
    ParamSpec,
    Protocol,
    TypeVar,
)

import anyio

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

from . import _engine
from ._engine import Dispatch, _move
from ._engine import fire as _engine_fire

if TYPE_CHECKING:
    from types import TracebackType

    from anyio.abc import TaskGroup

    from ._machine import MeteredMachine

__all__ = ["Track", "check_timeouts", "enter", "exit"]

#: Where timeout triggers that raise, and cancel triggers that raise, are reported.
logger = logging.getLogger("statemachine_metrics")

P = ParamSpec("P")
T = TypeVar("T")

_NONE: frozenset[str] = frozenset()
_PLAN = "_statemachine_metrics_timeouts"


class _Decorator(Protocol):
    def __call__(
        self, func: Callable[P, Coroutine[Any, Any, T]], /
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...


#: A trigger resolved once: its compiled dispatch (``.name``, ``.fire``).
_Trigger = Dispatch


def _resolve(cls: type[MeteredMachine], name: object, where: str, role: str = "") -> _Trigger:
    for_role = f" for {role}" if role else ""
    if not isinstance(name, str):
        raise TypeError(f"{where}: expected a trigger name{for_role}, got {name!r}")
    dispatch = cls._triggers.get(name)
    if dispatch is None:
        known = ", ".join(cls._triggers) or "none"
        raise ValueError(f"{where}: unknown trigger {name!r}{for_role}; triggers are {known}")
    return dispatch


_NO_ARGS: tuple[Any, ...] = ()
_perf_counter = time.perf_counter


def _now(machine: MeteredMachine, trigger: _Trigger) -> bool:
    """Fire `trigger` synchronously when the engine would change the state without
    awaiting anything (its fast path): the turn is free, the machine is open, the trigger
    has no machine-level hooks and is not instrumented, and its one step from the current
    state has no callbacks. True if it fired; False, having done nothing, otherwise (the
    caller then takes the awaited path, which also raises what there is to raise).

    Nothing is awaited, so nothing can come between, and there is no cancellation point.
    """
    step = trigger.bare.get(machine._state)
    if (
        step is not None
        and machine._owner is None
        and machine._series is not None
        and trigger.fire is _engine_fire
    ):
        _move(machine, step, True)
        return True
    return False


#: Whether `TaskMachine.task` may create, start and close a task's machine in one locked
#: step each (its fused lifecycle); read when decorating. Off, it takes the engine's path.
_fuse = True


def _first_step(trigger: _Trigger, state: str) -> _engine.Step | None:
    """The step `_now` takes for `trigger` on a fresh machine (turn free, open) in `state`,
    or None when it would not take one; whether `trigger` is instrumented is asked at
    each call (``trigger.fire is _engine.fire``)."""
    if trigger.hooks is not None:
        return None
    steps = trigger.steps.get(state)
    if steps is None or not steps[0].bare:
        return None
    return steps[0]


async def _fire(machine: MeteredMachine, trigger: _Trigger, final: Collection[str] = ()) -> bool:
    """Fire `trigger` without arguments; with `final`, not if the machine is in one of
    those states when the trigger's turn comes (a timeout may have finished it)."""
    if final and machine._owner is None:
        if machine._state in final:
            return False
        return await trigger.fire(machine, trigger, _NO_ARGS, {})
    still = (lambda: machine._state not in final) if final else None
    return await trigger.fire(machine, trigger, _NO_ARGS, {}, still)


# -- the way out of a body -------------------------------------------------------------


async def _settle(
    machine: MeteredMachine,
    failure: BaseException | None,
    success: _Trigger | None,
    error: _Trigger | None,
    cancel: _Trigger | None,
    final: Collection[str],
) -> None:
    """Fire the trigger that records how a body ended (`failure` None: it returned).

    Returns when the caller should go on as the body ended (return, or re-raise
    `failure`); raises the outcome trigger's own error, chained from `failure`. Nothing
    fires when the machine is already in one of the `final` states.
    """
    cancelled = anyio.get_cancelled_exc_class()
    if isinstance(failure, BaseExceptionGroup):
        failure = _cause(failure, cancelled)
    if failure is None:
        outcome = success
    elif isinstance(failure, cancelled):
        await _cancelled(machine, cancel or error, final)
        return
    elif isinstance(failure, Exception):
        outcome = error
    else:
        # KeyboardInterrupt, SystemExit, GeneratorExit: the process or the coroutine is
        # going away, and a coroutine being closed must not await.
        return
    if outcome is None:
        return
    state = machine._state
    try:
        await _fire(machine, outcome, final)
    except cancelled:
        if machine._state == state:
            # Cancelled before the outcome moved the machine: the caller sees a
            # cancellation, so the machine records one.
            await _cancelled(machine, cancel or error, final)
        raise
    except Exception as trouble:
        if failure is None:
            raise
        raise trouble from failure


def _cause(group: BaseExceptionGroup[Any], cancelled: type[BaseException]) -> BaseException:
    """What a body that ended in an exception group ended in: a process-ending exception
    if it holds one, else an error if it holds one (a child task failed, even as an outer
    scope cancelled), else a cancellation."""
    leaves = list(_leaves(group))
    for leaf in leaves:
        if not isinstance(leaf, (Exception, cancelled)):
            return leaf  # KeyboardInterrupt, SystemExit
    for leaf in leaves:
        if isinstance(leaf, Exception):
            return group if isinstance(group, Exception) else leaf
    return leaves[0] if leaves else group


def _leaves(group: BaseExceptionGroup[Any]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


async def _cancelled(
    machine: MeteredMachine, trigger: _Trigger | None, final: Collection[str]
) -> None:
    """Fire `trigger` for a cancelled body, shielded; its errors are logged, not raised,
    so that the cancellation goes on (a cancel scope must see its own cancellation)."""
    if trigger is None:
        return
    with anyio.CancelScope(shield=True):
        try:
            await _fire(machine, trigger, final)
        except Exception:
            logger.exception(
                "%s: %r, fired because the body was cancelled, raised; the cancellation goes on",
                type(machine).__qualname__,
                trigger.name,
            )


class Track:
    """Triggers fired around a coroutine; made by `MeteredMachine.track`.

    As a decorator on a coroutine function, every call of the function is tracked; as
    ``async with machine.track(...):``, the block is. `enter` fires first (if it raises,
    the body does not run), then the body runs, then:

    - `success` fires when the body returns;
    - `error` fires when it raises an `Exception`, which then propagates;
    - `cancel` (else `error`) fires when it is cancelled, inside a shielded cancel scope,
      and the cancellation propagates.

    If `success` or `error` raises, its error propagates, chained from the body's exception
    (``raise ... from``). If the cancel trigger raises, the error is logged to the
    ``statemachine_metrics`` logger and the cancellation goes on. A cancellation that
    arrives while `success` or `error` waits for its turn, before the machine moved, fires
    the cancel trigger instead (the caller sees a cancellation). ``KeyboardInterrupt``,
    ``SystemExit`` and ``GeneratorExit`` pass through and fire nothing. A trigger stopped
    by a condition (it returns False) is not an error. Triggers get no arguments.

    A `Track` keeps no state between uses: one decorated function may run concurrently.

    Raises:
        ValueError: when made, for a trigger the machine's class does not have.
        TypeError: when made, for a trigger name that is not a string.
    """

    __slots__ = (
        "_cancel",
        "_enter",
        "_error",
        "_machine",
        "_success",
    )

    def __init__(
        self,
        machine: MeteredMachine,
        enter: str,
        success: str,
        error: str | None = None,
        cancel: str | None = None,
    ) -> None:
        cls = type(machine)
        where = f"{cls.__qualname__}.track()"
        self._machine = machine
        self._enter = _resolve(cls, enter, where, "enter")
        self._success = _resolve(cls, success, where, "success")
        self._error = None if error is None else _resolve(cls, error, where, "error")
        self._cancel = None if cancel is None else _resolve(cls, cancel, where, "cancel")

    async def __aenter__(self) -> None:
        machine = self._machine
        if _now(machine, self._enter):
            return
        state = machine._state
        try:
            await _fire(machine, self._enter)
        except BaseException as failure:
            if machine._state != state:
                # `enter` moved the machine, then raised or was cancelled in a callback:
                # the body will not run, so record how it ended now.
                await _settle(machine, failure, None, self._error, self._cancel, _NONE)
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None and _now(self._machine, self._success):
            return
        await _settle(self._machine, exc, self._success, self._error, self._cancel, _NONE)

    def __call__(
        self, func: Callable[P, Coroutine[Any, Any, T]]
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        """Track every call of the coroutine function `func` (name, docstring and
        signature are kept)."""
        if not inspect.iscoroutinefunction(func):
            raise TypeError(
                f"{type(self._machine).__qualname__}.track() decorates coroutine functions "
                f"(async def), not {func!r}; for other code use 'async with'"
            )

        machine, enter, success = self._machine, self._enter, self._success
        error, cancel = self._error, self._cancel

        # What ``async with self`` does, without its frames where the triggers can fire at
        # once (`_now`); anything else takes the awaited path of `__aenter__`/`_settle`.
        @functools.wraps(func)
        async def tracked(*args: P.args, **kwargs: P.kwargs) -> T:
            if not _now(machine, enter):
                await self.__aenter__()
            try:
                result = await func(*args, **kwargs)
            except BaseException as failure:
                await _settle(machine, failure, success, error, cancel, _NONE)
                raise
            if not _now(machine, success):
                await _settle(machine, None, success, error, cancel, _NONE)
            return result

        return tracked

    def __repr__(self) -> str:
        names = [
            f"{role}={trigger.name!r}"
            for role, trigger in (
                ("enter", self._enter),
                ("success", self._success),
                ("error", self._error),
                ("cancel", self._cancel),
            )
            if trigger is not None
        ]
        return f"<Track {self._machine!r} {' '.join(names)}>"


# -- state timeouts --------------------------------------------------------------------


class _Timeout(NamedTuple):
    """One compiled entry of a class's ``timeouts``."""

    state: str
    seconds: float
    trigger: _Trigger


def check_timeouts(cls: type[MeteredMachine]) -> None:
    """Validate and compile ``cls.timeouts`` (``{state: (seconds, trigger)}``).

    Raises:
        TypeError: ``timeouts`` is not a dict.
        ValueError: an unknown state or trigger, a trigger with no transition from its
            state, seconds that are not a positive finite number, or a malformed entry.
    """
    owner = cls.__qualname__
    raw = cls.timeouts
    if not isinstance(raw, Mapping):
        raise TypeError(
            f"{owner}.timeouts must be a dict of state -> (seconds, trigger), got {raw!r}"
        )
    plan: dict[str, _Timeout] = {}
    if raw:
        # Any state, compound ones too: a compound state's timeout runs while any of its
        # states is current.
        inside = _inside(cls)
        states = tuple(inside)
        table = cls.transition_table()
        for state, entry in raw.items():
            where = f"{owner}.timeouts[{state!r}]"
            if state not in inside:
                raise ValueError(
                    f"{where}: unknown state {state!r}; states are {', '.join(states)}"
                )
            if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence):
                raise ValueError(f"{where}: expected (seconds, trigger), got {entry!r}")
            if len(entry) != 2:
                raise ValueError(f"{where}: expected (seconds, trigger), got {entry!r}")
            seconds, name = entry
            if not isinstance(name, str):
                raise ValueError(f"{where}: expected (seconds, trigger), got {entry!r}")
            if (
                isinstance(seconds, bool)
                or not isinstance(seconds, Real)
                or not math.isfinite(seconds)
                or seconds <= 0
            ):
                raise ValueError(
                    f"{where}: seconds must be a positive finite number, got {seconds!r}"
                )
            trigger = _resolve(cls, name, where)
            sources = sorted({t.source for t in table if t.trigger == trigger.name})
            missing = sorted(inside[state].difference(sources))
            if missing:
                within = "" if missing == [state] else f" (within it: {', '.join(missing)})"
                raise ValueError(
                    f"{where}: trigger {trigger.name!r} has no transition from {state!r}"
                    f"{within}; it fires from {', '.join(sources) or 'no state'}"
                )
            plan[state] = _Timeout(state, float(seconds), trigger)
    setattr(cls, _PLAN, plan)


def _inside(cls: type[MeteredMachine]) -> Mapping[str, frozenset[str]]:
    """Every state, compound ones included, with the states a machine can be in within it."""
    definition = cls._definition
    substates: Mapping[str, frozenset[str]] | None = getattr(definition, "substates", None)
    return substates or {state: frozenset((state,)) for state in cls.state_names()}


def _plan(cls: type[MeteredMachine]) -> Mapping[str, _Timeout]:
    plan: Mapping[str, _Timeout] = getattr(cls, _PLAN, None) or {}
    return plan


class _Timers:
    """The timer task of one entered machine: one deadline, re-armed on every move.

    `moved` runs synchronously inside the engine's state change, so it only writes a
    deadline (into the sleeping task's cancel scope when there is one). Each timed state
    the machine is in (a compound state stays entered while the machine moves among its
    states) counts from when it was entered; the task wakes at the earliest deadline and
    fires that state's trigger in the machine's turn, unless the machine left the state
    in the meantime. A timeout fires at most once per stay.
    """

    __slots__ = ("active", "deadline", "group", "inside", "machine", "plan", "scope", "timeout")

    def __init__(
        self,
        machine: MeteredMachine,
        plan: Mapping[str, _Timeout],
        inside: Mapping[str, frozenset[str]],
    ) -> None:
        # Weak: the machine holds this object, which must not hold the machine back.
        self.machine = weakref.ref(machine)
        self.plan = plan
        self.inside = inside
        #: The timed states the machine is in: when each was entered (inf: fired already).
        self.active: dict[str, float] = {}
        self.timeout: tuple[_Timeout, float] | None = None
        self.deadline = math.inf
        self.scope: anyio.CancelScope | None = None
        self.group: TaskGroup | None = None

    def moved(self, dest: str, entered: Collection[str] | None = None) -> None:
        """The machine is now in `dest`, having entered the states `entered` (all of its
        states when None): timed states it left stop, those it (re-)entered start now."""
        now = anyio.current_time()
        active = self.active
        inside = self.inside
        for state in [
            s for s in active if dest not in inside[s] or entered is None or s in entered
        ]:
            del active[state]
        for state in self.plan:
            if state not in active and dest in inside[state]:
                active[state] = now
        self._arm()

    def _arm(self) -> None:
        best: tuple[_Timeout, float] | None = None
        deadline = math.inf
        for state, since in self.active.items():
            timeout = self.plan[state]
            due = since + timeout.seconds
            if due < deadline:
                deadline, best = due, (timeout, since)
        self.timeout = best
        if deadline != self.deadline:
            self.deadline = deadline
            scope = self.scope
            if scope is not None:
                scope.deadline = deadline

    async def run(self) -> None:
        # A turn held by the task that entered the machine is not this task's turn.
        _engine._held.set(())
        while True:
            with anyio.CancelScope(deadline=self.deadline) as scope:
                self.scope = scope
                try:
                    await anyio.sleep_forever()
                finally:
                    self.scope = None
            due = self.timeout
            if due is None or anyio.current_time() < self.deadline:
                continue  # re-armed after the old deadline had already woken us
            entry, since = due
            self.active[entry.state] = math.inf  # at most once per stay in the state
            self._arm()
            await self._fire(entry, since)

    async def _fire(self, entry: _Timeout, since: float) -> None:
        machine = self.machine()
        if machine is None:
            return
        active = self.active

        def still_due() -> bool:
            # Still the same stay: the state was not left (nor re-entered) meanwhile.
            return machine._series is not None and active.get(entry.state) == math.inf

        try:
            await entry.trigger.fire(machine, entry.trigger, (), {}, still_due)
        except Exception:
            logger.exception(
                "%s: the timeout of state %r fired %r, which raised; the machine's timeouts go on",
                type(machine).__qualname__,
                entry.state,
                entry.trigger.name,
            )

    async def close(self) -> None:
        group = self.group
        if group is None:
            return
        self.group = None
        scope = group.cancel_scope
        scope.cancel()
        # Closing is quick (the timer task only sleeps or waits for its turn): an outer
        # cancellation must not interrupt it and leave the task group half closed.
        scope.shield = True
        await group.__aexit__(None, None, None)


async def enter(machine: MeteredMachine) -> None:
    """Start the machine's state timeouts (``async with machine:``).

    A class without timeouts starts nothing. With timeouts, a task group is opened in the
    calling task (`exit` must be awaited by the same task, as ``async with`` does) and runs
    one timer task; the current state's timeout, if any, counts from now.

    Raises:
        RuntimeError: the machine is closed, or (with timeouts) already entered.
    """
    cls = type(machine)
    if machine._series is None:
        raise RuntimeError(f"{cls.__qualname__} machine is closed; it cannot be entered again")
    plan = _plan(cls)
    if not plan:
        return
    if machine._timers is not None:
        raise RuntimeError(
            f"{cls.__qualname__} machine is already entered; enter a machine once, with "
            "one 'async with'"
        )
    timers = _Timers(machine, plan, _inside(cls))
    group = anyio.create_task_group()
    await group.__aenter__()
    timers.group = group
    timers.moved(machine._state)
    machine._timers = timers
    group.start_soon(timers.run, name=f"{cls.__qualname__} timeouts")


async def exit(machine: MeteredMachine) -> None:
    """Stop the machine's state timeouts: cancel the timer task and close its task group."""
    timers = machine._timers
    if timers is None:
        return
    machine._timers = None
    await timers.close()
