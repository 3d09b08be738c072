"""`TaskMachine`: every call of a decorated coroutine function runs in a fresh machine."""

from __future__ import annotations

import functools
import inspect
from bisect import bisect_left
from collections.abc import Callable, Coroutine, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ClassVar, overload

import anyio

from . import _engine, _tasks
from ._engine import change_state
from ._family import Family, Series
from ._machine import MeteredMachine, _label_key, _tokens
from ._tasks import (
    P,
    T,
    _Decorator,
    _fire,
    _first_step,
    _now,
    _perf_counter,
    _plan,
    _settle,
    enter,
    exit,
)

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["TaskMachine"]

_TASK_TRIGGERS = ("start", "succeed", "fail", "cancel")

# The task machines of the calls running in this context, innermost first: a chain of
# (machine, outer chain) pairs, which a call extends without copying.
_Chain = tuple["TaskMachine", "_Chain"] | tuple[()]
_running: ContextVar[_Chain] = ContextVar("statemachine_metrics_tasks", default=())


class TaskMachine(MeteredMachine, abstract=True):
    """State of a task: pending, running, succeeded, failed or cancelled.

    A template: subclass it (``class Fetch(TaskMachine, namespace="myapp"): pass`` is
    enough; each subclass gets its own metrics, here ``myapp_fetch_state``), then decorate
    coroutine functions with `task`: every call runs in a fresh machine that goes
    ``pending -> running -> succeeded | failed | cancelled`` and is closed when the call
    ends. Inside a call, `current` returns that machine.

    Triggers: ``start`` (pending -> running), ``succeed`` (running -> succeeded), ``fail``
    (pending or running -> failed: a task may fail before it starts, when ``start``
    raises or when it is refused while queued), ``cancel`` (pending or running ->
    cancelled).

    A subclass may declare more states and transitions (extend ``TaskMachine.states`` and
    ``TaskMachine.transitions``). It must keep the four triggers, with ``start`` allowed
    from the initial state; this is checked when the class is created. A state no
    transition leaves is *final*: when the body moved the machine into one itself,
    `task` fires no outcome trigger.
    """

    __slots__ = ()

    states = ["pending", "running", "succeeded", "failed", "cancelled"]
    transitions = [
        ["start", "pending", "running"],
        ["succeed", "running", "succeeded"],
        ["fail", ["pending", "running"], "failed"],
        ["cancel", ["pending", "running"], "cancelled"],
    ]

    #: States no transition leaves for another state; computed for each subclass.
    final_states: ClassVar[frozenset[str]] = frozenset(("succeeded", "failed", "cancelled"))

    if TYPE_CHECKING:
        # Generated when the class is created; declared for type checkers.
        async def start(self, *args: Any, **kwargs: Any) -> bool: ...
        async def succeed(self, *args: Any, **kwargs: Any) -> bool: ...
        async def fail(self, *args: Any, **kwargs: Any) -> bool: ...
        async def cancel(self, *args: Any, **kwargs: Any) -> bool: ...

    def __init_subclass__(cls, **options: Any) -> None:
        super().__init_subclass__(**options)
        owner = cls.__qualname__
        missing = [name for name in _TASK_TRIGGERS if name not in cls._triggers]
        if missing:
            raise ValueError(
                f"{owner}: a TaskMachine needs the triggers start, succeed, fail and cancel; "
                f"missing {', '.join(missing)}"
            )
        table = cls.transition_table()
        initial = cls.initial_state()
        if not any(t.trigger == "start" and t.source == initial for t in table):
            raise ValueError(f"{owner}: 'start' must be allowed from the initial state {initial!r}")
        leaving = {t.source for t in table if t.dest is not None and t.dest != t.source}
        cls.final_states = frozenset(s for s in cls.state_names() if s not in leaving)

    @classmethod
    def _moved_in(
        cls, labels: Mapping[str, object] | None, step: _engine.Step, idle: int, quick: int
    ) -> Self:
        """A new machine that took `step` from the initial state at once: what
        ``cls(labels=labels)`` then the step's trigger do, counted in one locked step
        (`_attach_moved`). For a caller that checked the step could be taken so
        (see `_fused`); `MeteredMachine.__init__` must not be overridden."""
        family = cls._family
        assert family is not None
        key = None if labels is None and not family.labelled else _label_key(cls, family, labels)
        self = object.__new__(cls)
        # Every slot `MeteredMachine.__init__` sets.
        self._state = step.dest  # type: ignore[assignment]
        self._owner = None
        self._waiters = None
        self._timers = None
        self._listeners = None
        self._token = token = next(_tokens)
        self._series = _attach_moved(family, key, token, step, idle, quick)
        return self

    @classmethod
    def current(cls) -> Self:
        """The machine of the innermost call of a `task` of this class running here.

        Child tasks started inside the call see it too. Use it to fire the triggers of
        your own states from the body: ``await Fetch.current().retry()``.

        Raises:
            LookupError: no call of a `task` of this class (or a subclass) is running in
                this context.
        """
        chain = _running.get()
        while chain:
            machine, chain = chain
            if isinstance(machine, cls):
                return machine
        raise LookupError(
            f"{cls.__qualname__}.current(): no {cls.__qualname__} task is running here; "
            f"call it inside a coroutine function decorated with @{cls.__qualname__}.task"
        )

    @overload
    @classmethod
    def task(
        cls, func: Callable[P, Coroutine[Any, Any, T]], /
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    @classmethod
    def task(cls, *, labels: Callable[..., Mapping[str, object]] | None = None) -> _Decorator: ...

    @classmethod
    def task(
        cls,
        func: Callable[..., Coroutine[Any, Any, Any]] | None = None,
        *,
        labels: Callable[..., Mapping[str, object]] | None = None,
    ) -> Any:
        """Run every call of a coroutine function in a fresh machine of this class.

        ``@Fetch.task`` or, for a class with ``labelnames``,
        ``@Fetch.task(labels=lambda url: {"host": urlsplit(url).hostname})``: `labels` gets
        the call's arguments and returns the machine's label values.

        Each call: a new machine (pending), ``start``, the body, then ``succeed`` when it
        returns, ``fail`` when it (or ``start``) raises, ``cancel`` (shielded) when it is
        cancelled; the call's result or exception is unchanged. No outcome fires when
        the body has moved the machine to a final state itself. Then the machine is
        closed. The machine is entered for the call, so the class's ``timeouts`` apply.

        Raises:
            TypeError: at decoration, for an abstract class, something other than a
                coroutine function, or `labels` missing (or given) for a class with (or
                without) ``labelnames``.
        """
        if func is None:
            return functools.partial(cls._decorate, labels=labels)
        return cls._decorate(func, labels)

    @classmethod
    def _decorate(
        cls,
        func: Callable[P, Coroutine[Any, Any, T]],
        labels: Callable[P, Mapping[str, object]] | None,
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        owner = cls.__qualname__
        family = cls._family
        if family is None:
            raise TypeError(
                f"{owner} is a template without metrics; decorate with a subclass of it, "
                f"e.g. class Jobs({owner}): pass"
            )
        if not inspect.iscoroutinefunction(func):
            raise TypeError(f"@{owner}.task decorates coroutine functions, not {func!r}")
        labelnames = family.metric._labelnames
        if labels is None and labelnames:
            raise TypeError(
                f"@{owner}.task: {owner} has labelnames ({', '.join(labelnames)}); pass "
                "labels=, a function of the call's arguments returning their values"
            )
        if labels is not None and not labelnames:
            raise TypeError(f"@{owner}.task: labels= given, but {owner} has no labelnames")
        if labels is not None and not callable(labels):
            raise TypeError(f"@{owner}.task: labels must be a function, got {labels!r}")
        start, succeed, fail, cancel = (cls._triggers[n] for n in _TASK_TRIGGERS)
        final = cls.final_states
        # Only a class with timeouts has timers to start: the others skip enter and exit.
        timed = bool(_plan(cls))
        # `start` on the fresh machine: its turn is free and it is open, so `_now`'s
        # checks that remain are the step's (done here, once) and instrumentation.
        first = _first_step(start, cls.initial_state())

        # Each trigger fires at once when the engine would (`_now`: its turn is free, the
        # step has no callbacks), and the machine closes at once when its turn is free;
        # otherwise, the awaited path (`_fire`, `_settle`, `aclose`) keeps every guarantee.
        @functools.wraps(func)
        async def call(*args: P.args, **kwargs: P.kwargs) -> T:
            machine = cls(labels=None if labels is None else labels(*args, **kwargs))
            running = _running.set((machine, _running.get()))
            try:
                if timed:
                    await enter(machine)
                try:
                    if first is not None and start.fire is _engine.fire:
                        change_state(machine, first, True)
                    else:
                        await _fire(machine, start)
                    result = await func(*args, **kwargs)
                except BaseException as failure:
                    await _settle(machine, failure, succeed, fail, cancel, final)
                    raise
                else:
                    # No outcome when the body moved the machine to a final state itself.
                    if machine._owner is not None or (
                        machine._state not in final and not _now(machine, succeed)
                    ):
                        await _settle(machine, None, succeed, fail, cancel, final)
                    return result
                finally:
                    if timed:
                        await exit(machine)
                    if machine._owner is None:
                        machine._end()  # what `aclose` does when it need not wait
                    else:
                        with anyio.CancelScope(shield=True):
                            await machine.aclose()
            finally:
                _running.reset(running)

        if (
            not _tasks._fuse
            or first is None
            or first.dest is None
            or timed
            or family.mirror is not None  # multiprocess mode
            or not _plain_init(cls)
        ):
            return call
        return _fused(cls, func, labels, call, first, final)


def _plain_init(cls: type[TaskMachine]) -> bool:
    """Whether creating a machine of `cls` runs `MeteredMachine`'s own construction."""
    return cls.__init__ is MeteredMachine.__init__ and cls.__new__ is object.__new__


async def _close(machine: TaskMachine) -> None:
    """End a call's machine: at once when its turn is free (what `aclose` does when it
    need not wait), else shielded, after the transition that holds the turn."""
    if machine._owner is None:
        machine._end()
    else:
        with anyio.CancelScope(shield=True):
            await machine.aclose()


def _fused(
    cls: type[TaskMachine],
    func: Callable[P, Coroutine[Any, Any, T]],
    labels: Callable[P, Mapping[str, object]] | None,
    slow: Callable[P, Coroutine[Any, Any, T]],
    first: _engine.Step,
    final: frozenset[str],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """`call` of `TaskMachine._decorate` with the task's lifecycle fused: the machine is
    made already moved by ``start`` (`TaskMachine._moved_in`), and when the body
    returns, ``succeed`` and the close are one locked step (`_detach_moved`).

    Every metric is what the separate steps count (the time in the initial state and
    the triggers' latencies are observed as zero). A call takes `slow`, the separate steps,
    when anything but the metrics could see the difference: a listener, instrumentation
    wrapping `Dispatch.fire`, exemplars (multiprocess mode, timeouts and an own
    ``__init__`` are ruled out when decorating). The close falls back to them
    too when the body left the turn taken, closed the machine, or moved it to a state
    without a bare ``succeed``.
    """
    family = cls._family
    assert family is not None
    start, succeed, fail, cancel = (cls._triggers[n] for n in _TASK_TRIGGERS)
    fire = _engine.fire
    # The buckets of the zero durations the fused steps observe.
    idle = bisect_left(family.bounds, 0.0)
    quick = family.quick
    # `succeed`'s step from each state it may leave in the fused close.
    closing = (
        {}
        if succeed.hooks is not None
        else {
            state: steps[0]
            for state, steps in succeed.steps.items()
            if steps[0].bare and steps[0].dest is not None and state not in final
        }
    )

    moved_in = cls._moved_in

    @functools.wraps(func)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        if first.listening or start.fire is not fire or _engine.exemplar_source is not None:
            return await slow(*args, **kwargs)
        machine = moved_in(None if labels is None else labels(*args, **kwargs), first, idle, quick)
        running = _running.set((machine, _running.get()))
        try:
            try:
                result = await func(*args, **kwargs)
            except BaseException as failure:
                try:
                    await _settle(machine, failure, succeed, fail, cancel, final)
                finally:
                    await _close(machine)
                raise
            series = machine._series
            step = closing.get(machine._state)
            if (
                step is not None
                and series is not None
                and machine._owner is None
                and not step.listening
                and machine._listeners is None
                and succeed.fire is fire
                and _engine.exemplar_source is None
            ):
                machine._series = None
                machine._state = step.dest  # type: ignore[assignment]
                _detach_moved(family, series, machine._token, step, quick)
                return result
            try:
                # No outcome when the body moved the machine to a final state itself.
                if machine._owner is not None or (
                    machine._state not in final and not _now(machine, succeed)
                ):
                    await _settle(machine, None, succeed, fail, cancel, final)
            finally:
                await _close(machine)
            return result
        finally:
            _running.reset(running)

    return call


def _attach_moved(
    family: Family,
    key: tuple[str, ...] | None,
    token: int,
    step: _engine.Step,
    idle: int,
    quick: int,
) -> Series:
    """`Family.attach` of a machine in the step's source state, then the step at once, in
    one locked step: every metric as if the machine had been created and the step's
    trigger had fired, the time in the source state (bucket `idle`) and the trigger's
    latency (bucket `quick`) observed as zero. Not in multiprocess mode."""
    now = _perf_counter()
    dst = step.dst
    lock = family.lock
    lock.acquire()  # cheaper than `with`, on the path of every call of a task
    try:
        if family.pending:
            family._drain()
        if key is None:
            series = family.single
            assert series is not None
        else:
            series = family.series.get(key)
            metric = family.metric
            if series is None:
                series = family.series[key] = Series(metric._child(key), key)
            elif metric._metrics.get(key) is not series.child:
                # Removed from the Enum while machines were bound to it: back, as attach.
                series.child = metric._child(key)
        series.live += 1
        series.child._value = dst
        family.counts[dst] += 1
        step.entering[token] = now
        family.transitions[step.slot] += 1
        step.row[idle] += 1
        step.latency[quick] += 1
        return series
    finally:
        lock.release()


def _detach_moved(
    family: Family, series: Series, token: int, step: _engine.Step, quick: int
) -> None:
    """The step at once for a live machine in its source state, then `Family.detach` in
    its destination, in one locked step: every metric as if the step's trigger had
    fired (its latency observed as zero, in bucket `quick`) and the machine had then
    been closed. Not in multiprocess mode."""
    now = _perf_counter()
    src = step.src
    dst = step.dst
    lock = family.lock
    lock.acquire()
    try:
        if family.pending:
            family._drain()
        family.transitions[step.slot] += 1
        elapsed = now - step.leaving.pop(token)
        step.row[bisect_left(family.bounds, elapsed)] += 1
        family.hist_sum[src] += elapsed
        step.latency[quick] += 1
        series.child._value = dst
        if series.key is None or series.live > 1:
            # The label set stays: the machine only leaves the counts.
            family.counts[src] -= 1
            series.live -= 1
            return
        counts = family.counts
        counts[src] -= 1
        counts[dst] += 1
        if not family._detach(series, dst, token):
            # The Enum's lock is taken: detached later, by the lock's next holder.
            step.entering[token] = now
            family.pending.append((series, dst, token))
    finally:
        lock.release()
