"""`TaskMachine`: every call of a decorated coroutine function runs in a fresh machine."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ClassVar, overload

import anyio

from . import _engine
from ._engine import change_state
from ._machine import MeteredMachine
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
                        change_state(machine, first, _perf_counter())
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

        return call
