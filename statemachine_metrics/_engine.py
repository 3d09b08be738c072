"""The engine: runs a machine's compiled transitions on anyio.

A trigger, top to bottom: `fire` takes the machine's turn (one transition at a time, in
arrival order), `run` tries the compiled steps for the current state as transitions'
`AsyncMachine` does (prepare, conditions, before, exit, state change, enter, after), and
`change_state` moves the state and every metric in one synchronous step, so that no
cancellation or exception can separate them.

A trigger whose turn is free and whose one step has no callbacks takes the fast path: the
state changes at once, with nothing awaited, so no other task can come between. A trigger
method called without arguments runs the steps' callbacks from a function compiled from
their plans (`_attempts`); `run_steps` interprets the same plans for every other call.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Sequence
from contextvars import ContextVar, Token
from inspect import isawaitable
from typing import TYPE_CHECKING, Any, Protocol, cast

import anyio
from prometheus_client.samples import Exemplar
from transitions import Machine, MachineError

from ._events import EventData, EventInfo, Listener, StateInfo, TransitionEvent, TransitionInfo
from ._family import Family, Series

if TYPE_CHECKING:
    from ._machine import MeteredMachine

__all__ = [
    "Callback",
    "Condition",
    "Dispatch",
    "Hooks",
    "Step",
    "fire",
    "fire_exclusive",
    "may",
    "trigger_method",
]

#: Where listeners that raise, and finalize_event callbacks that raise, are reported.
logger = logging.getLogger("statemachine_metrics")

_MISSING: Any = object()
_perf_counter = time.perf_counter


class Callback:
    """A compiled callback: a fixed callable, or the name of an attribute of the machine."""

    __slots__ = ("func", "name")

    def __init__(self, name: str, func: Callable[..., Any] | None) -> None:
        self.name = name
        self.func = func

    def call(self, machine: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Call it for `machine` with the trigger's arguments; its result.

        The engine calls `call` rather than the instance: a method call of a Python
        function runs in the interpreter's own frame, an instance's ``__call__`` does not.
        """
        func = self.func
        if func is None:
            # Resolved on the instance at each call, as transitions does with a model.
            func = getattr(machine, self.name, _MISSING)
            if func is _MISSING:
                func = self._imported(machine)
            elif not callable(func):
                return func  # a property or plain attribute: its value
        if kwargs:
            return func(*args, **kwargs)
        return func(*args) if args else func()

    __call__ = call

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


class Hooks:
    """A class's machine-level callbacks and modes; None on a class that has none.

    ``before_state_change``, ``after_state_change`` and ``on_final`` are compiled into the
    steps; these are the ones that wrap a whole trigger.
    """

    __slots__ = (
        "finalize_event",
        "on_exception",
        "prepare_event",
        "queued",
        "send_event",
        "states",
    )

    def __init__(
        self,
        prepare_event: tuple[Callback, ...],
        finalize_event: tuple[Callback, ...],
        on_exception: tuple[Callback, ...],
        send_event: bool,
        queued: bool,
        states: dict[str, StateInfo],
    ) -> None:
        self.prepare_event = prepare_event
        self.finalize_event = finalize_event
        self.on_exception = on_exception
        self.send_event = send_event
        self.queued = queued
        self.states = states


class Step:
    """One compiled transition of one trigger from one source state."""

    __slots__ = (
        "after",
        "attempt",
        "bare",
        "before",
        "conditions",
        "dest",
        "dst",
        "enter",
        "entered",
        "entering",
        "exit",
        "family",
        "info",
        "latency",
        "lead",
        "leaving",
        "listening",
        "plan",
        "prepare",
        "row",
        "slot",
        "source",
        "src",
        "tindex",
        "told",
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
        listening: list[Listener] | None = None,
        lead: tuple[Callback, ...] = (),
    ) -> None:
        index = family.index
        self.family = family
        self.trigger = trigger
        self.source = source
        self.dest = dest
        self.src = index[source]
        self.dst = index[dest if dest is not None else source]
        self.slot = slot
        self.tindex = family.trigger_names.index(trigger)
        # The family's rows the step writes, bound once (`Family.reset` zeroes them in
        # place): the machines in its source and destination states (token -> when they
        # entered), the source's time-in-state buckets, the trigger's latency buckets.
        self.leaving = family.stays[self.src]
        self.entering = family.stays[self.dst]
        self.row = family.hist[self.src]
        self.latency = family.trigger_hist[self.tindex]
        self.prepare = prepare
        self.conditions = conditions
        self.before = before
        self.exit = exit
        self.enter = enter
        self.after = after
        #: The class's listeners (a list shared with the class, changed in place).
        self.listening: list[Listener] = [] if listening is None else listening
        self.info = TransitionInfo(source, dest)
        #: The states the transition enters (a nested one may enter several); set by the
        #: compiler. A state timeout restarts for each.
        self.entered: frozenset[str] = frozenset(() if dest is None else (dest,))
        # True when this is the only step from its source, moves the machine and has no
        # callbacks: the trigger may take the fast path. Set by the compiler.
        self.bare = False
        #: The class's prepare_event callbacks, on the first step of each group of
        #: candidates tried together (one group; with nested states, one per level).
        self.lead = lead
        #: Everything the step does, in order, as `run_steps` runs it; `told`, the same
        #: with the event data told its transition and state (``send_event``).
        self.told: tuple[Op, ...] = (
            *((_CALL, callback, True) for callback in lead),
            (_INFO, _NO_CALLBACK, True),
            *((_CALL, callback, True) for callback in prepare),
            *((_COND, condition.callback, condition.target) for condition in conditions),
            *(((_CHECK, _NO_CALLBACK, True),) if conditions else ()),
            *((_CALL, callback, True) for callback in before),
            *(() if dest is None else ((_CALL, callback, True) for callback in exit)),
            (_MOVE, _NO_CALLBACK, True),
            *(() if dest is None else ((_ENTERED, _NO_CALLBACK, True),)),
            *(() if dest is None else ((_CALL, callback, True) for callback in enter)),
            *((_CALL, callback, True) for callback in after),
        )
        self.plan = tuple(op for op in self.told if op[0] is not _INFO and op[0] is not _ENTERED)
        #: The steps from this one's source, when this is the first, compiled into one
        #: function for a trigger called without arguments (`_attempts`); None until the
        #: first such call.
        self.attempt: Callable[[MeteredMachine], bool | _Run] | None = None


#: What a step does, one operation at a time (`Step.plan`): call a callback, check a
#: condition (its callback's result against the target), stop if a condition failed,
#: change the state, and tell the event data its transition or its state.
_CALL, _COND, _CHECK, _MOVE, _INFO, _ENTERED = range(6)
_NO_CALLBACK = Callback("", None)
Op = tuple[int, Callback, bool]


class Dispatch:
    """One trigger of one class, compiled: its steps for each source state."""

    __slots__ = ("bare", "family", "fire", "hooks", "index", "info", "name", "steps")

    def __init__(
        self,
        name: str,
        steps: dict[str, tuple[Step, ...]],
        family: Family | None,
        hooks: Hooks | None,
    ) -> None:
        self.name = name
        self.steps = steps
        self.family = cast(Family, family)  # None only on a template, which never fires
        self.hooks = hooks
        #: The bare steps (`Step.bare`) by source state, which a trigger without
        #: machine-level hooks takes at once when the turn is free (`_tasks._now`).
        self.bare: dict[str, Step] = {}
        if hooks is None:
            self.bare = {source: table[0] for source, table in steps.items() if table[0].bare}
        self.index = -1 if family is None else family.trigger_names.index(name)
        self.info = EventInfo(name)
        #: What every way of firing the trigger calls (instrumentation wraps it).
        self.fire: FireFunction = fire


class FireFunction(Protocol):
    def __call__(
        self,
        machine: MeteredMachine,
        dispatch: Dispatch,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        still: Callable[[], bool] | None = None,
    ) -> Coroutine[Any, Any, bool]: ...


class Turn:
    """The right to run transitions on one machine, held by one trigger at a time.

    `task` and `mark` say where the holder was when it first awaited a callback: a trigger
    from another task nests only if that task runs in a task group opened since then.
    """

    # Class-level defaults and no __init__: taking a turn allocates a bare object.
    task: object = None
    mark: object = None
    context: Token[tuple[Turn, ...]] | None = None
    queue: deque[tuple[Dispatch, tuple[Any, ...], dict[str, Any]]] | None = None


# The turns held by the current task and the tasks it started: a trigger awaited from one
# of a machine's own callbacks runs at once, nested, instead of waiting for itself.
_held: ContextVar[tuple[Turn, ...]] = ContextVar("statemachine_metrics_held", default=())


def _closed(machine: MeteredMachine) -> RuntimeError:
    return RuntimeError(f"{type(machine).__name__} machine is closed; triggers need a live one")


# -- callbacks -------------------------------------------------------------------------


def _calls(
    machine: MeteredMachine,
    callbacks: Sequence[Callback],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> _Run:
    """Run callbacks one after another, in list order; yield what is to be awaited."""
    for callback in callbacks:
        result = callback.call(machine, args, kwargs)
        if type(result) not in _PLAIN and isawaitable(result):
            yield result
    yield True


def _checks(
    machine: MeteredMachine,
    conditions: Sequence[Condition],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> _Run:
    """Evaluate every condition in order (no short cut, as AsyncMachine); True if all pass."""
    passed = True
    for condition in conditions:
        result = condition.callback.call(machine, args, kwargs)
        if type(result) not in _PLAIN and isawaitable(result):
            result = yield result
        if result != condition.target:
            passed = False
    yield passed


async def _complete(running: _Run, turn: Turn | None) -> bool:
    """Run a `_Run` to its outcome, awaiting only when it yields an awaitable."""
    pending = running.send(None)
    if pending is True or pending is False:
        next(running, None)
        return pending
    return await finish(running, pending, turn)


def _hold(turn: Turn) -> None:
    """Before the turn's holder first awaits a callback: note where it is, and let the
    callback's own triggers (and those of task groups it opens) nest in the turn."""
    turn.task, turn.mark = _whereabouts()
    turn.context = _held.set((*_held.get(), turn))


# -- the state change ------------------------------------------------------------------


def change_state(machine: MeteredMachine, step: Step, at_once: bool = False) -> None:
    """Move the machine to the step's destination, with every metric, in one step.

    An internal step (dest None) only counts. The state the machine leaves is the one it
    is in: a trigger nested in an earlier callback of this transition may have moved it.
    `at_once`: the trigger took its step at once, awaiting nothing and running no
    callback, and its latency is observed here, as zero (the time it takes is that of the
    state change itself, a fraction of a microsecond).
    """
    if machine._series is None or machine._state is not step.source or step.dest is None:
        _change_state(machine, step, at_once)
    else:
        _move(machine, step, at_once)


def _move(machine: MeteredMachine, step: Step, at_once: bool) -> None:
    """`change_state` for an open machine in the step's source state and a step that
    moves: the common case, in a body of its own (`_change_state` does the rest)."""
    family = step.family
    if family.mirror is not None or exemplar_source is not None:
        if exemplar_source is None:
            _move_mirrored(machine, step, at_once)
        else:
            _change_state(machine, step, at_once)
        return
    now = _perf_counter()
    token = machine._token
    src = step.src
    dst = step.dst
    lock = family.lock
    lock.acquire()  # with `release` in `finally`: cheaper than `with`
    try:
        if family.pending:
            family._drain()
        family.transitions[step.slot] += 1
        elapsed = now - step.leaving.pop(token)
        step.row[bisect_left(family.bounds, elapsed)] += 1
        family.hist_sum[src] += elapsed
        counts = family.counts
        counts[src] -= 1
        counts[dst] += 1
        step.entering[token] = now
        machine._series.child._value = dst  # type: ignore[union-attr]
        machine._state = step.dest  # type: ignore[assignment]
        if at_once:
            step.latency[family.quick] += 1  # observed as zero
    finally:
        lock.release()
    if machine._timers is not None or step.listening or machine._listeners is not None:
        _moved(machine, step, elapsed)


def _move_mirrored(machine: MeteredMachine, step: Step, at_once: bool) -> None:
    """`_move` in multiprocess mode: the same, and everything the other processes will
    read written by one `mirror.transition` call under the lock."""
    family = step.family
    mirror = family.mirror
    assert mirror is not None
    now = _perf_counter()
    token = machine._token
    src = step.src
    dst = step.dst
    series: Series = machine._series  # type: ignore[assignment]
    lock = family.lock
    lock.acquire()
    try:
        if family.pending:
            family._drain()
        family.transitions[step.slot] += 1
        leaving = step.leaving
        first = next(iter(leaving)) == token
        elapsed = now - leaving.pop(token)
        step.row[bisect_left(family.bounds, elapsed)] += 1
        family.hist_sum[src] += elapsed
        counts = family.counts
        counts[src] -= 1
        counts[dst] += 1
        entering = step.entering
        empty = not entering
        entering[token] = now
        series.child._value = dst
        machine._state = step.dest  # type: ignore[assignment]
        latency = None
        if at_once:
            latency = 0.0
            step.latency[family.quick] += 1
        mirror.transition(
            series.key, src, dst, step.slot, elapsed, now, first, empty, step.tindex, latency
        )
    finally:
        lock.release()
    if machine._timers is not None or step.listening or machine._listeners is not None:
        _moved(machine, step, elapsed)


def _moved(machine: MeteredMachine, step: Step, elapsed: float) -> None:
    """After `_move` or `_move_mirrored`, for a machine with timers or listeners: restart
    the state timeouts of the states entered, then tell the listeners."""
    if machine._timers is not None:
        machine._timers.moved(step.dest, step.entered)
    if step.listening or machine._listeners is not None:
        _notify(machine, step, step.source, elapsed)


def _change_state(machine: MeteredMachine, step: Step, at_once: bool) -> None:
    """`change_state` for every case: another source state, a closed machine, an internal
    step, multiprocess mode, exemplars."""
    family = step.family
    now = _perf_counter()
    token = machine._token
    dest = step.dest
    elapsed: float | None = None
    with family.lock:
        if family.pending:
            family._drain()
        state = machine._state
        if state is step.source or state == step.source:
            src = step.src
            slot = step.slot
        else:
            src = family.index[state]
            slot = family.slot(state, state if dest is None else dest, step.trigger)
        family.transitions[slot] += 1
        mirror = family.mirror
        series: Series | None = machine._series
        latency = 0.0 if at_once else None
        if dest is None:
            if mirror is not None:
                mirror.counted(slot)
        else:
            dst = step.dst
            stays = family.stays
            leaving = stays[src]
            first = mirror is not None and bool(leaving) and next(iter(leaving)) == token
            entered = leaving.pop(token, None)  # None: closed by one of its own callbacks
            if entered is not None:
                elapsed = now - entered
                bucket = bisect_left(family.bounds, elapsed)
                family.hist[src][bucket] += 1
                family.hist_sum[src] += elapsed
            if series is not None:
                counts = family.counts
                counts[src] -= 1
                counts[dst] += 1
                entering = stays[dst]
                empty = not entering
                entering[token] = now
                series.child._value = dst
                if mirror is not None:
                    key, tindex = series.key, step.tindex
                    mirror.transition(
                        key, src, dst, slot, elapsed or 0.0, now, first, empty, tindex, latency
                    )
                    mirror = None  # it wrote the trigger latency too
            elif mirror is not None:
                mirror.counted(slot)
                if elapsed is not None:
                    mirror.observed(src, elapsed)
            machine._state = dest
        if exemplar_source is not None:
            _exemplify(family, slot, src, elapsed)
        if latency is not None:
            tindex = step.tindex
            family.trigger_hist[tindex][bisect_left(family.trigger_bounds, latency)] += 1
            family.trigger_sum[tindex] += latency
            if mirror is not None:
                mirror.triggered(tindex, latency)
    if dest is not None:
        timers = machine._timers
        if timers is not None:
            timers.moved(dest, step.entered)
    if step.listening or machine._listeners is not None:
        _notify(machine, step, state, elapsed)


#: Returns the exemplar labels for the current transition (the current OpenTelemetry
#: span's trace id), or None; None itself when OpenTelemetry is not in use.
exemplar_source: Callable[[], dict[str, str] | None] | None = None


def use_opentelemetry_exemplars() -> None:
    """Tag transition samples with the current span's trace id, once OpenTelemetry's API
    is imported (by the application, before its machine classes are created, or by
    `statemachine_metrics.otel`). Costs nothing until then."""
    global exemplar_source
    if exemplar_source is not None or "opentelemetry.trace" not in sys.modules:
        return
    from opentelemetry.trace import get_current_span

    def current_trace() -> dict[str, str] | None:
        context = get_current_span().get_span_context()
        if not context.is_valid:
            return None
        return {"trace_id": format(context.trace_id, "032x")}

    exemplar_source = current_trace


def _exemplify(family: Family, slot: int, state: int, elapsed: float | None) -> None:
    """Store the current trace as the exemplar of the samples a transition updated."""
    assert exemplar_source is not None
    labels = exemplar_source()
    if labels is None:
        return
    now = time.time()
    family.transition_exemplars[slot] = Exemplar(labels, 1.0, now)
    if elapsed is not None:
        bucket = bisect_left(family.bounds, elapsed)
        family.hist_exemplars[state][bucket] = Exemplar(labels, elapsed, now)


def _notify(machine: MeteredMachine, step: Step, source: str, elapsed: float | None) -> None:
    dest = step.dest
    event = TransitionEvent(
        machine,
        step.trigger,
        source,
        source if dest is None else dest,
        dest is None,
        time.time(),
        elapsed,
    )
    listeners = step.listening
    own = machine._listeners
    for listener in (*listeners, *own) if own is not None else tuple(listeners):
        try:
            listener(event)
        except Exception:
            logger.exception(
                "%s: listener %r raised on %s; the transition stands",
                type(machine).__qualname__,
                listener,
                event,
            )


# -- a trigger -------------------------------------------------------------------------


#: A transition in progress: a generator that yields each awaitable its callbacks return
#: (and is sent its result), then yields its outcome, a bool. Sync callbacks never leave
#: it, so a transition without async callbacks costs one generator and no coroutine.
#: Resumed once more after its outcome (``next(running, None)``), it ends: cheaper than
#: leaving it suspended, which makes its deallocation throw GeneratorExit into it.
_Run = Generator[Any, Any, None]

_PLAIN = frozenset((type(None), bool))


def run_steps(
    machine: MeteredMachine,
    steps: Sequence[Step],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    event: EventData | None = None,
    i: int = 0,
    k: int = 0,
    passed: bool = True,
) -> _Run:
    """Try the steps in order; the first whose conditions pass runs. True if one ran.

    As transitions' `AsyncMachine`: prepare, conditions (all of them, no short cut),
    before, exit, the state change, enter, after (`Step.plan`). With `event`
    (``send_event``), callbacks get it alone instead of the trigger's arguments, and it
    follows the transition as it goes. `i`, `k` and `passed` start it part of the way
    through: at operation `k` of step `i`, with the conditions so far `passed` or not.
    """
    if event is not None:
        args, kwargs = (event,), {}
    while i < len(steps):
        step = steps[i]
        plan = step.plan if event is None else step.told
        for kind, callback, target in plan[k:] if k else plan:
            if kind is _CALL or kind is _COND:
                result = callback.call(machine, args, kwargs)
                if (
                    result is not None
                    and result is not True
                    and result is not False
                    and isawaitable(result)
                ):
                    result = yield result  # what it gave: a condition's answer
                if kind is _COND and result != target:
                    passed = False
            elif kind is _MOVE:
                if (
                    machine._series is None
                    or machine._state is not step.source
                    or step.dest is None
                ):
                    _change_state(machine, step, False)
                else:
                    _move(machine, step, False)
            elif kind is _CHECK:
                if not passed:
                    break
            elif kind is _INFO:  # before the step is the event's transition, as there
                event.transition = step.info  # type: ignore[union-attr]
            else:  # _ENTERED
                event.state = type(machine)._hooks.states[step.dest]  # type: ignore[index, union-attr]
        else:
            yield True
            return
        i += 1
        k = 0
        passed = True
    yield False


def resume_at(
    machine: MeteredMachine, steps: Sequence[Step], i: int, k: int, passed: bool, pending: Any
) -> _Run:
    """The rest of a transition begun without arguments by a compiled attempt
    (`_attempts`), whose operation `k` of step `i` returned the awaitable `pending`:
    started, it yields `pending` first."""
    result = yield pending
    kind, _, target = steps[i].plan[k]
    if kind is _COND and result != target:
        passed = False
    yield from run_steps(machine, steps, (), {}, None, i, k + 1, passed)


async def finish(running: _Run, pending: Any, turn: Turn | None) -> bool:
    """Await what the transition's callbacks return, resuming it each time, to its end."""
    if turn is not None and turn.context is None:
        _hold(turn)
    while True:
        try:
            value = await pending
        except BaseException as exc:
            pending = running.throw(exc)
        else:
            pending = running.send(value)
        if pending is True or pending is False:
            next(running, None)
            return pending


async def run(
    machine: MeteredMachine,
    steps: Sequence[Step],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    turn: Turn | None,
    event: EventData | None = None,
) -> bool:
    """`run_steps` to its end (for the paths that are awaited anyway)."""
    return await _complete(run_steps(machine, steps, args, kwargs, event), turn)


async def fire(
    machine: MeteredMachine,
    dispatch: Dispatch,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    still: Callable[[], bool] | None = None,
) -> bool:
    """Run a trigger on `machine` in its turn; see `MeteredMachine` for the semantics.

    `still`, if given, is asked once the turn is ours; False fires nothing and returns
    False (a timer whose state was left while it waited for the turn).
    """
    owner = machine._owner
    if owner is None:
        if machine._series is None:
            if still is not None and not still():
                return False  # a timer of a closed machine: no longer due
            raise _closed(machine)
        if still is None and dispatch.hooks is None:
            steps = dispatch.steps.get(machine._state)
            if steps is not None:
                step = steps[0]
                if step.bare:
                    change_state(machine, step, True)
                    return True
        turn = machine._owner = Turn()
    elif owner in _held.get() and _nests(owner):
        return await _nested(machine, owner, dispatch, args, kwargs, still)
    else:
        turn = await _wait_turn(machine)
        if machine._series is None:  # closed while this trigger waited
            _release(machine)
            if still is not None and not still():
                return False
            raise _closed(machine)
    started = _perf_counter()
    try:
        if still is not None and not still():
            return False
        if dispatch.hooks is not None:
            result = await _run_hooked(machine, dispatch, dispatch.hooks, args, kwargs, turn)
        else:
            try:
                steps = dispatch.steps.get(machine._state)
                if steps is None:
                    steps = _invalid_or_ignored(machine, dispatch)
                if steps is None:
                    result = False
                else:
                    running = run_steps(machine, steps, args, kwargs)
                    result = running.send(None)
                    if result is True or result is False:
                        next(running, None)
                    else:
                        result = await finish(running, result, turn)
            except Exception as exc:
                dispatch.family.error(dispatch.name, exc)
                raise
        if turn.queue:
            await _run_queue(machine, turn)
        return result
    finally:
        if turn.context is not None:
            _held.reset(turn.context)
        dispatch.family.triggered(dispatch.index, _perf_counter() - started)
        _release(machine)


def trigger_method(dispatch: Dispatch) -> Callable[..., Coroutine[Any, Any, bool]]:
    """The coroutine function behind ``machine.<trigger>()``.

    For a trigger without machine-level hooks, when the machine's turn is free, it runs
    the transition itself: a bare step at once (`_move`), and callbacks synchronously
    (without arguments, through the steps' compiled attempt) until one returns an
    awaitable, when it takes the turn and awaits the rest (`_resume`). Until then
    nothing is awaited, so no other task can come between, and holding the turn would
    change nothing. Anything else (a busy turn, a closed machine, an invalid trigger,
    instrumentation wrapping `Dispatch.fire`) goes through `dispatch.fire`.
    """
    if dispatch.hooks is not None:

        async def hooked(machine: MeteredMachine, *args: Any, **kwargs: Any) -> bool:
            return await dispatch.fire(machine, dispatch, args, kwargs)

        return hooked

    table = dispatch.steps
    family = dispatch.family
    index = dispatch.index

    async def method(machine: MeteredMachine, *args: Any, **kwargs: Any) -> bool:
        if machine._owner is None and dispatch.fire is fire and machine._series is not None:
            steps = table.get(machine._state)
            if steps is not None:
                step = steps[0]
                if step.bare:
                    _move(machine, step, True)
                    return True
                started = _perf_counter()
                try:
                    if args or kwargs:
                        running = run_steps(machine, steps, args, kwargs)
                        result = running.send(None)
                        if result is True or result is False:
                            next(running, None)
                    else:
                        attempt = step.attempt
                        if attempt is None:
                            from ._attempts import attempt_for

                            attempt = attempt_for(type(machine), steps)
                        result = attempt(machine)
                        if result is not True and result is not False:
                            running = result
                            result = running.send(None)  # the awaitable it stopped at
                except BaseException as exc:
                    if isinstance(exc, Exception):
                        family.error(dispatch.name, exc)
                    family.triggered(dispatch.index, _perf_counter() - started)
                    raise
                if result is True or result is False:
                    # `family.triggered`, written out for the common case.
                    elapsed = _perf_counter() - started
                    if family.mirror is not None:
                        family.triggered(index, elapsed)
                        return result
                    bounds = family.trigger_bounds
                    lock = family.lock
                    lock.acquire()
                    try:
                        step.latency[
                            0 if elapsed <= bounds[0] else bisect_left(bounds, elapsed)
                        ] += 1
                        family.trigger_sum[index] += elapsed
                    finally:
                        lock.release()
                    return result
                return await _resume(machine, dispatch, running, result, started)
        return await dispatch.fire(machine, dispatch, args, kwargs)

    return method


async def _resume(
    machine: MeteredMachine, dispatch: Dispatch, running: _Run, pending: Any, started: float
) -> bool:
    """The rest of a transition begun without the turn, from its first awaitable: the
    turn is taken now, before anything is awaited."""
    turn = machine._owner = Turn()
    try:
        try:
            return await finish(running, pending, turn)
        except Exception as exc:
            dispatch.family.error(dispatch.name, exc)
            raise
    finally:
        if turn.context is not None:
            _held.reset(turn.context)
        dispatch.family.triggered(dispatch.index, _perf_counter() - started)
        _release(machine)


async def _nested(
    machine: MeteredMachine,
    turn: Turn,
    dispatch: Dispatch,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    still: Callable[[], bool] | None,
) -> bool:
    """A trigger from inside the running transition: at once, or queued (``queued``)."""
    if machine._series is None:
        raise _closed(machine)
    hooks = dispatch.hooks
    if hooks is not None and hooks.queued:
        if turn.queue is None:
            turn.queue = deque()
        turn.queue.append((dispatch, args, kwargs))
        return True
    if still is not None and not still():
        return False
    started = _perf_counter()
    try:
        return await _run_checked(machine, dispatch, args, kwargs, turn)
    finally:
        dispatch.family.triggered(dispatch.index, _perf_counter() - started)


async def _run_queue(machine: MeteredMachine, turn: Turn) -> None:
    """Run the triggers that callbacks queued, in order, in the same turn (``queued``)."""
    queue = turn.queue
    assert queue is not None
    try:
        while queue:
            dispatch, args, kwargs = queue.popleft()
            if machine._series is None:
                raise _closed(machine)
            started = _perf_counter()
            try:
                await _run_checked(machine, dispatch, args, kwargs, turn)
            finally:
                dispatch.family.triggered(dispatch.index, _perf_counter() - started)
    except BaseException:
        queue.clear()  # as transitions: an error drops what was still queued
        raise


async def _run_checked(
    machine: MeteredMachine,
    dispatch: Dispatch,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    turn: Turn,
) -> bool:
    hooks = dispatch.hooks
    if hooks is not None:
        return await _run_hooked(machine, dispatch, hooks, args, kwargs, turn)
    try:
        steps = _steps(machine, dispatch)
        if steps is None:
            return False
        return await run(machine, steps, args, kwargs, turn)
    except Exception as exc:
        dispatch.family.error(dispatch.name, exc)
        raise


def _steps(machine: MeteredMachine, dispatch: Dispatch) -> tuple[Step, ...] | None:
    """The steps for the machine's state; None for an ignored invalid trigger."""
    steps = dispatch.steps.get(machine._state)
    return _invalid_or_ignored(machine, dispatch) if steps is None else steps


def _invalid_or_ignored(machine: MeteredMachine, dispatch: Dispatch) -> tuple[Step, ...] | None:
    """No transition from the machine's state: None if the state ignores invalid triggers,
    else raise transitions' `MachineError`."""
    if machine._state in type(machine)._ignore_invalid:
        return None
    raise _invalid(machine, dispatch)


def _invalid(machine: MeteredMachine, dispatch: Dispatch) -> MachineError:
    cls = type(machine)
    allowed = ", ".join(dispatch.steps) or "no state"
    labels = machine.labels
    shown = f" {labels}" if labels else ""
    return MachineError(
        f"{cls.__name__}{shown}: Can't trigger event {dispatch.name} from state "
        f"{machine._state}! It is allowed from {allowed}."
    )


async def _run_hooked(
    machine: MeteredMachine,
    dispatch: Dispatch,
    hooks: Hooks,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    turn: Turn,
) -> bool:
    """A trigger with machine-level callbacks, as `AsyncMachine` runs it: prepare_event,
    the transition, on_exception for an error, finalize_event whatever happened."""
    event = None
    cargs, ckwargs = args, kwargs
    if hooks.send_event:
        event = EventData(machine, dispatch.info, hooks.states[machine._state], args, kwargs)
        cargs, ckwargs = (event,), {}
    result = False
    try:
        steps = _steps(machine, dispatch)
        if steps is not None:
            result = await run(machine, steps, args, kwargs, turn, event)
            if event is not None:
                event.result = result
    except Exception as exc:
        dispatch.family.error(dispatch.name, exc)
        if event is not None:
            event.error = exc
        if not hooks.on_exception:
            raise
        await _complete(_calls(machine, hooks.on_exception, cargs, ckwargs), turn)
    finally:
        if hooks.finalize_event:
            try:
                await _complete(_calls(machine, hooks.finalize_event, cargs, ckwargs), turn)
            except Exception:
                logger.exception(
                    "%s: a finalize_event callback of %r raised; the trigger's outcome stands",
                    type(machine).__qualname__,
                    dispatch.name,
                )
    return result


# -- the turn --------------------------------------------------------------------------


async def fire_exclusive(machine: MeteredMachine, action: Callable[[], None]) -> None:
    """Run a synchronous `action` in the machine's turn, after any running transition."""
    owner = machine._owner
    if owner is not None and owner in _held.get() and _nests(owner):
        action()
        return
    if owner is None:
        machine._owner = Turn()
    else:
        await _wait_turn(machine)
    try:
        action()
    finally:
        _release(machine)


async def _wait_turn(machine: MeteredMachine) -> Turn:
    """Queue behind the running transition; return the turn once handed over."""
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
    turn = machine._owner
    assert turn is not None
    return turn


def _release(machine: MeteredMachine) -> None:
    waiters = machine._waiters
    if waiters:
        machine._owner = Turn()
        event = waiters.popleft()
        if not waiters:
            machine._waiters = None
        event.set()
    else:
        machine._owner = None


def _whereabouts() -> tuple[object, object]:
    """The current task, and a mark of what it has opened so far (see `_nests`)."""
    loop = asyncio._get_running_loop()
    if loop is not None:
        task = asyncio.current_task(loop)
        return task, _asyncio_scope(task)
    import trio

    current = trio.lowlevel.current_task()
    return current, len(current.child_nurseries)


def _nests(turn: Turn) -> bool:
    """Whether a trigger from the current task, whose context holds `turn`, runs nested.

    The holder's own triggers nest, and so do those of tasks in task groups the holder
    opened while the transition ran (it waits for them before going on). A task started
    in a task group opened before the transition (which copied the turn into its
    context) is independent: it waits for its turn. A task whose origin cannot be known
    (one asyncio started outside anyio's task groups) nests, as it always did.
    """
    if turn.task is None:
        return False  # the holder never awaited a callback: the turn is not this task's
    task, _ = _whereabouts()
    if task is turn.task:
        return True
    loop = asyncio._get_running_loop()
    if loop is not None:
        return _asyncio_inside(turn, task)
    return _trio_inside(turn, task)


def _trio_inside(turn: Turn, task: Any) -> bool:
    holder: Any = turn.task
    while True:
        nursery = task.parent_nursery
        if nursery is None:
            return False
        host = nursery.parent_task
        if host is holder:
            nurseries: list[object] = holder.child_nurseries
            return nursery in nurseries and nurseries.index(nursery) >= cast(int, turn.mark)
        task = host


def _asyncio_scope(task: object) -> object:
    states = _anyio_task_states()
    if states is None:
        return None
    state = states.get(task)
    return None if state is None else state.cancel_scope


def _asyncio_inside(turn: Turn, task: object) -> bool:
    states = _anyio_task_states()
    if states is None or turn.mark is None:
        return True
    while True:
        state = states.get(task)
        if state is None:
            return True  # not started by anyio: unknown origin
        scope = state.cancel_scope
        while scope is not None and scope._host_task is task:
            scope = scope._parent_scope
        if scope is None:
            return False
        host = scope._host_task
        if host is turn.task:
            # `scope` is the holder's task group: opened during the transition if the
            # holder's scope at the first callback lies above it.
            above = scope._parent_scope
            while above is not None and above._host_task is host:
                if above is turn.mark:
                    return True
                above = above._parent_scope
            return False
        task = host


_task_states: Any = _MISSING


def _anyio_task_states() -> Any:
    """anyio's record of the asyncio tasks it started (their cancel scopes), or None."""
    global _task_states
    if _task_states is _MISSING:
        try:
            from anyio._backends import _asyncio
        except ImportError:  # pragma: no cover - anyio always has it
            _task_states = None
        else:
            _task_states = getattr(_asyncio, "_task_states", None)
    return _task_states


async def may(
    machine: MeteredMachine,
    dispatch: Dispatch,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> bool:
    """Whether the trigger would run now, as `AsyncMachine`'s ``may_<trigger>`` tells:
    for each candidate transition, ``prepare_event``, its ``prepare`` and its conditions,
    nothing else (``on_exception`` takes what they raise, when set)."""
    if machine._series is None:
        raise _closed(machine)
    hooks = dispatch.hooks
    event = None
    cargs, ckwargs = args, kwargs
    if hooks is not None and hooks.send_event:
        event = EventData(machine, dispatch.info, hooks.states[machine._state], args, kwargs)
        cargs, ckwargs = (event,), {}
    for step in dispatch.steps.get(machine._state, ()):
        if event is not None:
            event.transition = step.info
        try:
            if hooks is not None and hooks.prepare_event:
                await _complete(_calls(machine, hooks.prepare_event, cargs, ckwargs), None)
            if step.prepare:
                await _complete(_calls(machine, step.prepare, cargs, ckwargs), None)
            if not step.conditions or await _complete(
                _checks(machine, step.conditions, cargs, ckwargs), None
            ):
                return True
        except Exception as exc:
            if hooks is None or not hooks.on_exception:
                raise
            if event is not None:
                event.error = exc
            await _complete(_calls(machine, hooks.on_exception, cargs, ckwargs), None)
    return False
