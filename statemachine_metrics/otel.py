"""OpenTelemetry for machine classes: a span per trigger, and three metric instruments.

    from statemachine_metrics import otel

    instrumentation = otel.instrument(Worker)  # or otel.instrument(): every machine class
    ...
    instrumentation.uninstrument()

Needs the ``otel`` extra, which brings ``opentelemetry-api`` only: the SDK, its exporters
and the providers are the application's choice. Without providers given, the global ones
(``opentelemetry.trace.set_tracer_provider``, ``opentelemetry.metrics.set_meter_provider``)
are used, including ones set after `instrument` was called.

Spans: every call of a trigger (its method, ``machine.trigger(name)``, ``track()``,
``@task``, a state timeout) is a span ``"<Class> <trigger>"``, a child of the span current
where it was called, even when it waits for its turn behind another trigger. Attributes:
``statemachine.class``, ``statemachine.trigger``, ``statemachine.source`` (the state the
transition left or, when none ran, the state the machine was in), ``statemachine.dest``
(when a transition ran; an internal one stays where it is) and ``statemachine.result``
(what the trigger returned). A trigger that raises sets the status to error with
``error.type`` (the exception's class name) and records the exception; a cancelled one
only ends its span. Triggers awaited by a trigger's callbacks are child spans.

Metrics, through the meter ``statemachine_metrics``, mirror the Prometheus ones:
``statemachine.machines`` (``<name>_machines``), ``statemachine.transitions``
(``<name>_transitions_total``) and ``statemachine.state.duration`` (seconds,
``<name>_duration_seconds``). Their ``statemachine.class`` is the class that owns the
Prometheus metric: a subclass that declares no states counts with its parent.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.trace import Status, StatusCode, TracerProvider

from . import __version__, _collector, _engine, _machine
from ._events import TransitionEvent
from ._family import DEFAULT_BUCKETS, Family
from ._machine import MeteredMachine

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._engine import Dispatch, FireFunction

__all__ = ["SCOPE", "Instrumentation", "instrument"]

#: The name of the tracer and of the meter.
SCOPE = "statemachine_metrics"

_lock = threading.Lock()
# The instrumentations in force, oldest first.
_active: list[Instrumentation] = []
# Each instrumented class (held weakly), with the instrumentation that wraps its triggers.
_owners: weakref.WeakKeyDictionary[type[MeteredMachine], Instrumentation] = (
    weakref.WeakKeyDictionary()
)


class _Call:
    """One instrumented trigger call in progress: what its listener learnt."""

    __slots__ = ("dest", "machine", "source", "trigger")

    def __init__(self, machine: MeteredMachine, trigger: str) -> None:
        self.machine = machine
        self.trigger = trigger
        self.source: str | None = None
        self.dest: str | None = None


# Importing this module means OpenTelemetry is in use: transition samples get exemplars.
_engine.use_opentelemetry_exemplars()

# The innermost instrumented trigger call of the current task: a listener runs in the task
# (and context) of the trigger that ran the transition, so it finds the call here.
_current: ContextVar[_Call | None] = ContextVar("statemachine_metrics_otel_call", default=None)


def instrument(
    *classes: type[MeteredMachine],
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> Instrumentation:
    """Trace every trigger of `classes` and report their metrics to OpenTelemetry.

    Covers the classes and their subclasses, including subclasses created later; with no
    classes, every machine class, including those created later. Returns an
    `Instrumentation`, whose `Instrumentation.uninstrument` undoes all of it (it is also
    a context manager that does so at the end of its block).

    Args:
        classes: machine classes (`MeteredMachine` subclasses).
        tracer_provider: where spans go; default the global tracer provider.
        meter_provider: where metrics go; default the global meter provider.

    Raises:
        TypeError: an argument is not a `MeteredMachine` subclass.
        ValueError: one of the classes (or a subclass) is instrumented already; a class is
            instrumented once at a time, so uninstrument the earlier one first.
    """
    for i, cls in enumerate(classes):
        if not (isinstance(cls, type) and issubclass(cls, MeteredMachine)):
            raise TypeError(f"instrument() takes MeteredMachine classes; argument {i} is {cls!r}")
    # A class given with one of its bases is covered by that base.
    roots = tuple(
        cls
        for cls in dict.fromkeys(classes)
        if not any(other is not cls and issubclass(cls, other) for other in classes)
    )
    _engine.use_opentelemetry_exemplars()
    with _lock:
        _refuse_overlap(roots)
        instrumentation = Instrumentation(roots, tracer_provider, meter_provider, every=not roots)
        _active.append(instrumentation)
        if len(_active) == 1:
            _machine.class_hooks.append(_class_created)
        for cls in _family_tree(roots or (MeteredMachine,)):
            instrumentation._wrap(cls)
    for cls in roots or (MeteredMachine,):
        cls.add_listener(instrumentation._listener)
    return instrumentation


def _refuse_overlap(roots: tuple[type[MeteredMachine], ...]) -> None:
    for active in _active:
        if active._every or not roots:
            taken = "every machine class is" if active._every else "machine classes are"
            raise ValueError(
                f"instrument(): {taken} instrumented already "
                f"({active!r}); call its uninstrument() first"
            )
    for cls in _family_tree(roots):
        owner = _owners.get(cls)
        if owner is not None:
            raise ValueError(
                f"instrument(): {cls.__qualname__} is instrumented already ({owner!r}); "
                "call its uninstrument() first"
            )


def _family_tree(roots: Iterable[type[MeteredMachine]]) -> Iterator[type[MeteredMachine]]:
    """The classes and all their subclasses, each once."""
    seen: set[type[MeteredMachine]] = set()
    pending = list(roots)
    while pending:
        cls = pending.pop()
        if cls in seen:
            continue
        seen.add(cls)
        yield cls
        pending.extend(cls.__subclasses__())


def _class_created(cls: type[MeteredMachine]) -> None:
    """A machine class was created: the instrumentation that covers it wraps it."""
    with _lock:
        if cls in _owners:
            return
        for instrumentation in _active:
            if instrumentation._covers(cls):
                instrumentation._wrap(cls)
                return


class Instrumentation:
    """What `instrument` returns (made by it, not directly): `uninstrument` removes every
    span, listener and report."""

    def __init__(
        self,
        roots: tuple[type[MeteredMachine], ...],
        tracer_provider: TracerProvider | None,
        meter_provider: MeterProvider | None,
        every: bool,
    ) -> None:
        self._roots: weakref.WeakSet[type[MeteredMachine]] = weakref.WeakSet(roots)
        self._names = ", ".join(cls.__qualname__ for cls in roots) or "every machine class"
        self._every = every
        self._active = True
        # Every class covered so far, and per class each wrapped trigger with the function
        # it replaced.
        self._classes: weakref.WeakSet[type[MeteredMachine]] = weakref.WeakSet()
        self._wrapped: weakref.WeakKeyDictionary[
            type[MeteredMachine], list[tuple[Dispatch, FireFunction, FireFunction]]
        ] = weakref.WeakKeyDictionary()
        self._tracer = trace.get_tracer(SCOPE, __version__, tracer_provider)
        meter = metrics.get_meter(SCOPE, __version__, meter_provider)
        self._meter = meter
        # A meter keeps the first callback given for an instrument name: every callback
        # made for one meter reports the same thing (the machines of every instrumentation
        # in force on that meter), so whichever it keeps is right.
        meter.create_observable_up_down_counter(
            "statemachine.machines",
            callbacks=[_machines_callback(meter)],
            unit="{machine}",
            description="Live machines in each state",
        )
        self._transitions = meter.create_counter(
            "statemachine.transitions",
            unit="{transition}",
            description="Transitions that ran",
        )
        self._durations = meter.create_histogram(
            "statemachine.state.duration",
            unit="s",
            description="Time a machine spent in a state, recorded when it left it",
            explicit_bucket_boundaries_advisory=DEFAULT_BUCKETS[:-1],
        )
        # Attribute dicts, made once per class, state and transition.
        self._transition_attributes: dict[tuple[str, str, str, str], dict[str, str]] = {}
        self._state_attributes: dict[tuple[str, str], dict[str, str]] = {}
        self._listener = self._listen

    def __repr__(self) -> str:
        state = "" if self._active else ", uninstrumented"
        return f"<otel.Instrumentation of {self._names}{state}>"

    def __enter__(self) -> Instrumentation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.uninstrument()

    @property
    def active(self) -> bool:
        """True until `uninstrument` is called."""
        return self._active

    def uninstrument(self) -> None:
        """Undo `instrument`: no more spans or metrics; the observable instrument reports
        nothing more. Calling it twice is harmless."""
        with _lock:
            if not self._active:
                return
            self._active = False
            _active.remove(self)
            if not _active:
                _machine.class_hooks.remove(_class_created)
            for entries in list(self._wrapped.values()):
                for dispatch, original, wrapper in entries:
                    if dispatch.fire is wrapper:
                        dispatch.fire = original
            for cls in list(self._classes):
                if _owners.get(cls) is self:
                    del _owners[cls]
            self._wrapped.clear()
            self._classes.clear()
        for cls in (MeteredMachine,) if self._every else list(self._roots):
            cls.remove_listener(self._listener)

    # -- coverage ------------------------------------------------------------------------

    def _covers(self, cls: type[MeteredMachine]) -> bool:
        return self._every or any(issubclass(cls, root) for root in self._roots)

    def _families(self) -> list[Family]:
        if self._every:
            return _collector.all_families()
        return [cls._family for cls in _family_tree(self._roots) if cls._family is not None]

    # -- spans ---------------------------------------------------------------------------

    def _wrap(self, cls: type[MeteredMachine]) -> None:
        """Trace the triggers the class compiled for itself (lock held)."""
        _owners[cls] = self
        self._classes.add(cls)
        triggers: dict[str, Dispatch] | None = vars(cls).get("_triggers")
        if triggers is None or cls._family is None:
            return  # abstract, or a template: its triggers never fire
        entries = []
        for name, dispatch in triggers.items():
            original = dispatch.fire
            wrapper = self._traced(cls.__name__, name, original)
            dispatch.fire = wrapper
            entries.append((dispatch, original, wrapper))
        self._wrapped[cls] = entries

    def _traced(self, class_name: str, trigger: str, original: FireFunction) -> FireFunction:
        tracer = self._tracer
        span_name = f"{class_name} {trigger}"
        attributes = {"statemachine.class": class_name, "statemachine.trigger": trigger}

        async def fire(
            machine: MeteredMachine,
            dispatch: Dispatch,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            still: Callable[[], bool] | None = None,
        ) -> bool:
            span = tracer.start_span(span_name, attributes=attributes)
            call = _Call(machine, trigger)
            attached = otel_context.attach(trace.set_span_in_context(span))
            entered = _current.set(call)
            try:
                result = await original(machine, dispatch, args, kwargs, still)
            except Exception as exc:
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                span.set_attribute("error.type", type(exc).__name__)
                span.record_exception(exc)
                raise
            else:
                span.set_attribute("statemachine.result", result)
                return result
            finally:
                _current.reset(entered)
                otel_context.detach(attached)
                if call.source is not None:
                    span.set_attribute("statemachine.source", call.source)
                    span.set_attribute("statemachine.dest", call.dest or call.source)
                else:  # no transition ran: where the machine stayed
                    span.set_attribute("statemachine.source", machine._state)
                span.end()

        return fire

    # -- metrics -------------------------------------------------------------------------

    def _listen(self, event: TransitionEvent) -> None:
        call = _current.get()
        if (
            call is not None
            and call.source is None
            and call.machine is event.machine
            and call.trigger == event.trigger
        ):
            call.source = event.source
            call.dest = event.dest
        family = type(event.machine)._family
        owner = family.owner if family is not None else type(event.machine).__name__
        key = (owner, event.source, event.dest, event.trigger)
        attributes = self._transition_attributes.get(key)
        if attributes is None:
            attributes = self._transition_attributes[key] = {
                "statemachine.class": owner,
                "statemachine.source": event.source,
                "statemachine.dest": event.dest,
                "statemachine.trigger": event.trigger,
            }
        self._transitions.add(1, attributes)
        if event.elapsed is not None:
            where = (owner, event.source)
            state = self._state_attributes.get(where)
            if state is None:
                state = self._state_attributes[where] = {
                    "statemachine.class": owner,
                    "statemachine.state": event.source,
                }
            self._durations.record(event.elapsed, state)


def _machines_callback(
    meter: metrics.Meter,
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        with _lock:
            instrumentations = [i for i in _active if i._meter is meter]
        seen: set[int] = set()
        observations = []
        for instrumentation in instrumentations:
            for family in instrumentation._families():
                if id(family) in seen:
                    continue
                seen.add(id(family))
                for state, count in zip(family.states, family.live_counts()):
                    observations.append(
                        Observation(
                            count,
                            {"statemachine.class": family.owner, "statemachine.state": state},
                        )
                    )
        return observations

    return observe
