"""What callbacks and listeners are given: `EventData` and `TransitionEvent`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._machine import MeteredMachine

__all__ = ["EventData", "EventInfo", "Listener", "StateInfo", "TransitionEvent", "TransitionInfo"]


@dataclass(frozen=True, slots=True)
class TransitionEvent:
    """One transition that ran, as listeners and recorders see it.

    An internal transition (declared with dest ``None``) runs its callbacks but leaves the
    state as it is: it has ``dest == source`` and ``internal=True``, as the
    ``_transitions_total`` counter labels it. A reflexive transition (dest equal to its
    source, or ``"="``) leaves and re-enters the state: ``internal`` is False.
    """

    #: The machine itself.
    machine: MeteredMachine
    trigger: str
    source: str
    dest: str
    internal: bool
    #: `time.time()` when the state changed.
    time: float
    #: Seconds the machine spent in `source`; None for an internal transition, which does
    #: not leave it (or for a machine closed by its own callback).
    elapsed: float | None = None

    def __str__(self) -> str:
        internal = " (internal)" if self.internal else ""
        return f"{self.trigger}: {self.source} -> {self.dest}{internal}"


#: A listener: called with each `TransitionEvent`, synchronously, after the transition.
Listener = Callable[[TransitionEvent], object]


class EventInfo:
    """The trigger an `EventData` is about (``event_data.event.name``)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<Event {self.name!r}>"


class StateInfo:
    """A state an `EventData` is about (``event_data.state.name``)."""

    __slots__ = ("final", "name")

    def __init__(self, name: str, final: bool = False) -> None:
        self.name = name
        self.final = final

    def __repr__(self) -> str:
        return f"<State {self.name!r}>"


class TransitionInfo:
    """The transition an `EventData` is about: ``.source`` and ``.dest`` (None: internal)."""

    __slots__ = ("dest", "source")

    def __init__(self, source: str, dest: str | None) -> None:
        self.source = source
        self.dest = dest

    def __repr__(self) -> str:
        return f"<Transition {self.source!r} -> {self.dest!r}>"


class EventData:
    """What every callback gets, alone, when the class says ``send_event = True``.

    The same fields as transitions' ``EventData``: ``machine`` (also ``model``: here the
    machine is its own model), ``event`` (``.event.name`` is the trigger), ``transition``
    (``.source``, ``.dest``; None until a transition is tried), ``state`` (``.state.name``:
    the source state, then the destination once the state changed), ``args`` and
    ``kwargs`` (the trigger's arguments), ``error`` (the exception, for ``on_exception``
    and ``finalize_event``) and ``result`` (True once a transition ran).
    """

    __slots__ = ("args", "error", "event", "kwargs", "machine", "result", "state", "transition")

    def __init__(
        self,
        machine: MeteredMachine,
        event: EventInfo,
        state: StateInfo,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.machine = machine
        self.event = event
        self.state = state
        self.transition: TransitionInfo | None = None
        self.args = args
        self.kwargs = kwargs
        self.error: BaseException | None = None
        self.result = False

    @property
    def model(self) -> MeteredMachine:
        """The machine (transitions' name for the object that holds the state)."""
        return self.machine

    def __repr__(self) -> str:
        return (
            f"<EventData {self.event.name!r} state={self.state.name!r} "
            f"result={self.result!r} error={self.error!r}>"
        )
