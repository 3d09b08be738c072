"""`Trigger`: a transition declared in a class body, typed for type checkers.

`MeteredMachine` generates a coroutine method per trigger when a class is created, which
no type checker can see. ``push = Trigger("shut", "open")`` declares the transition and,
through `Trigger.__get__`'s overloads, tells mypy and pyright what ``door.push`` is: a
coroutine method returning `bool`. ``start: Trigger`` (an annotation alone) does the same
for a trigger the `transitions` table declares. At class creation the definition reads
the `Trigger` attributes (`declarations`) and the machine class replaces each with the
generated method, after `check` has made sure that every typed name is a real trigger.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, overload

__all__ = ["Trigger", "check", "declarations"]

if TYPE_CHECKING:
    from typing import TypeAlias

    StateRef: TypeAlias = "str | enum.Enum"
    Sources: TypeAlias = "StateRef | Sequence[StateRef]"
    Options: TypeAlias = "dict[str, Any]"

_OPTIONS = ("conditions", "unless", "before", "after", "prepare")
# Names of the Trigger attributes a class with states declared, kept on the class (the
# attributes themselves become trigger methods) so that a subclass with its own states is
# held to them too.
_TYPED = "__statemachine_metrics_typed__"


class Trigger:
    """Declares a transition of the trigger named by the attribute, typed for checkers.

    Arguments are those of one `transitions` entry, in its vocabulary: `source` is a
    state, a list of states or ``"*"`` (any state); `dest` is a state, ``"="`` (back to
    the source) or ``None`` (an internal transition: no exit, no enter); the callback
    options take method names, callables or lists of them:

        class Door(MeteredMachine):
            states = ["shut", "open", "broken"]
            push = Trigger("shut", "open", conditions="unlocked")
            pull = Trigger("open", "shut", after="note")
            kick = Trigger(["shut", "open"], "broken")

    On an instance, ``door.push`` is the generated trigger method, typed as a coroutine
    method returning `bool`. Declarations come after the `transitions` table's entries, in
    the order of the class body. Several transitions of one trigger combine with ``|``,
    tried in that order, as repeated table entries are:

        kick = Trigger("shut", "broken", conditions="hard") | Trigger("open", "broken")

    An annotation alone, ``start: Trigger``, types a trigger the table declares; naming a
    trigger that no transition declares fails at class creation.
    """

    __slots__ = ("_transitions",)

    _transitions: tuple[tuple[Sources, StateRef | None, Options], ...]

    def __init__(
        self,
        source: str | enum.Enum | Sequence[str | enum.Enum],
        dest: str | enum.Enum | None,
        *,
        conditions: str
        | Callable[..., object]
        | Sequence[str | Callable[..., object]]
        | None = None,
        unless: str | Callable[..., object] | Sequence[str | Callable[..., object]] | None = None,
        before: str | Callable[..., object] | Sequence[str | Callable[..., object]] | None = None,
        after: str | Callable[..., object] | Sequence[str | Callable[..., object]] | None = None,
        prepare: str | Callable[..., object] | Sequence[str | Callable[..., object]] | None = None,
    ) -> None:
        given = zip(_OPTIONS, (conditions, unless, before, after, prepare))
        self._transitions = ((source, dest, {key: value for key, value in given if value}),)

    def __or__(self, other: Trigger) -> Trigger:
        """The transitions of both declarations, this one's first."""
        if not isinstance(other, Trigger):
            return NotImplemented
        combined = Trigger.__new__(Trigger)
        combined._transitions = self._transitions + other._transitions
        return combined

    @overload
    def __get__(self, instance: None, owner: type[object]) -> Trigger: ...

    @overload
    def __get__(
        self, instance: object, owner: type[object] | None = None
    ) -> Callable[..., Coroutine[Any, Any, bool]]: ...

    def __get__(self, instance: object, owner: type[object] | None = None) -> Trigger:
        # Only reached where no machine class replaced the declaration (see __call__).
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, bool]:
        """What calling the trigger gives: a coroutine of `bool` (for ``name: Trigger``)."""
        raise TypeError(
            f"{self!r} is a declaration, not a trigger: it becomes a trigger method only in "
            "the body of a MeteredMachine subclass that declares states"
        )

    def __repr__(self) -> str:
        parts = []
        for source, dest, options in self._transitions:
            shown = [repr(source), repr(dest), *(f"{k}={v!r}" for k, v in options.items())]
            parts.append(f"Trigger({', '.join(shown)})")
        return " | ".join(parts)


def declarations(cls: type) -> list[tuple[str, dict[str, Any]]]:
    """The transitions that `cls`'s own body declares with `Trigger`, as table entries,
    each with where it comes from (``Door.push``, or ``Door.kick[1]`` in a combination)."""
    owner = cls.__qualname__
    entries: list[tuple[str, dict[str, Any]]] = []
    for name, value in vars(cls).items():
        if not isinstance(value, Trigger):
            continue
        several = len(value._transitions) > 1
        for i, (source, dest, options) in enumerate(value._transitions):
            where = f"{owner}.{name}[{i}]" if several else f"{owner}.{name}"
            entries.append((where, {"trigger": name, "source": source, "dest": dest, **options}))
    return entries


def check(cls: type, triggers: Collection[str]) -> None:
    """Fail unless every trigger that `cls` or a base types is one of `triggers`.

    Raises:
        TypeError: a `Trigger` attribute sits in a class without states (a subclass that
            reuses its parent's definition, or a mixin), where nothing would read it.
        ValueError: a ``name: Trigger`` annotation, or a parent's ``name = Trigger(...)``,
            names no trigger of the class.
    """
    owner = cls.__qualname__
    declares = "states" in vars(cls)
    typed: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        where = klass.__qualname__
        for name, value in vars(klass).items():
            if isinstance(value, Trigger) and not (klass is cls and declares):
                raise TypeError(
                    f"{owner}: {where}.{name} is a Trigger, but {where} declares no states; "
                    "declare transitions in the body of the class that declares the states "
                    "(a subclass without states reuses its parent's definition whole)"
                )
        for name in vars(klass).get(_TYPED, ()):
            typed[name] = f"{where}.{name} = Trigger(...)"
        for name, annotation in _annotations(klass).items():
            if _names_trigger(annotation):
                typed[name] = f"{where}.{name}: Trigger"
    own = [name for name, value in vars(cls).items() if isinstance(value, Trigger)]
    for name, declaration in typed.items():
        if name not in triggers:
            listing = ", ".join(triggers) or "none"
            raise ValueError(
                f"{owner}: {declaration} names no trigger of {owner}; its triggers are {listing}"
            )
    if own:
        setattr(cls, _TYPED, tuple(own))


def _annotations(klass: type) -> Mapping[str, object]:
    if sys.version_info >= (3, 14):
        import annotationlib

        return annotationlib.get_annotations(klass, format=annotationlib.Format.FORWARDREF)
    annotations: Mapping[str, object] = vars(klass).get("__annotations__", {})
    return annotations


def _names_trigger(annotation: object) -> bool:
    """Whether an annotation is `Trigger`: the class, or its name as a string (postponed
    evaluation), qualified or not."""
    if annotation is Trigger:
        return True
    text = getattr(annotation, "__forward_arg__", annotation)
    return isinstance(text, str) and text.rsplit(".", 1)[-1].strip() == "Trigger"
