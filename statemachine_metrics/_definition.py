"""Machine definitions: what a class declares, checked before anything is built.

`transitions` builds the definition (states, transitions, wildcards, source lists,
reflexive and internal transitions, conditions); `Definition` first checks what
`transitions` accepts silently or reports without naming the class, and `metric_for`
checks the names the class's metrics will have.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Container, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from transitions import Machine

from . import _nesting
from ._enum import Enum

if TYPE_CHECKING:
    from ._machine import MeteredMachine

__all__ = ["Definition", "TransitionSpec", "metric_for"]

# Strict (pre-UTF-8) Prometheus names, so that every exposition passes promtool; the state
# label is the metric's own name, so a metric name must be a valid label name too.
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# The order of transitions' add_transition() arguments, for transitions given as lists.
_TRANSITION_FIELDS = (
    "trigger",
    "source",
    "dest",
    "conditions",
    "unless",
    "before",
    "after",
    "prepare",
)
_TRANSITION_KEYS = frozenset(_TRANSITION_FIELDS)
_STATE_KEYS = frozenset(("name", "on_enter", "on_exit", "ignore_invalid_triggers"))


def _snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _listify(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


class TransitionSpec(NamedTuple):
    """One allowed transition of a machine class."""

    trigger: str
    source: str
    dest: str | None


class Definition:
    """A validated machine definition, built with `transitions` (shared with subclasses)."""

    def __init__(self, cls: type[MeteredMachine], abstract: bool, reserved: Container[str]) -> None:
        owner = cls.__qualname__
        self.owner = owner
        self.abstract = abstract
        raw_states = cls.__dict__["states"]
        if isinstance(raw_states, (str, bytes)) or not isinstance(raw_states, Sequence):
            raise TypeError(f"{owner}.states must be a list of state names or dicts")
        if not raw_states:
            raise ValueError(f"{owner}.states is empty; a machine needs at least one state")
        # Every state -> the states that count as in it (itself, and any nested in it).
        self.substates: dict[str, frozenset[str]]
        self.tree: _nesting.Tree | None = None
        if _nesting.is_nested(raw_states):
            _nesting.define(self, cls, reserved, self._transition)
            return
        states: list[str] = []
        configs: list[str | dict[str, Any]] = []
        for i, entry in enumerate(raw_states):
            where = f"{owner}.states[{i}]"
            if isinstance(entry, Mapping):
                unknown = sorted(set(entry) - _STATE_KEYS)
                if unknown:
                    raise ValueError(
                        f"{where}: unknown key(s) {', '.join(unknown)}; "
                        f"a state dict takes {', '.join(sorted(_STATE_KEYS))}"
                    )
                name = entry.get("name")
                configs.append(copy.copy(dict(entry)))
            else:
                name = entry
                configs.append(entry)
            if not isinstance(name, str) or not name:
                raise TypeError(f"{where}: a state name must be a non-empty string, got {name!r}")
            if name in states:
                raise ValueError(f"{where}: duplicate state {name!r}")
            states.append(name)
        self.states = tuple(states)
        listing = ", ".join(states)

        initial = getattr(cls, "initial", None)
        if initial is None:
            initial = states[0]
        elif initial not in states:
            raise ValueError(f"{owner}.initial: unknown state {initial!r}; states are {listing}")
        self.initial: str = initial

        raw_transitions = getattr(cls, "transitions", ())
        if isinstance(raw_transitions, (str, bytes)) or not isinstance(raw_transitions, Sequence):
            raise TypeError(f"{owner}.transitions must be a list of lists or dicts")
        transitions: list[dict[str, Any]] = []
        for i, entry in enumerate(raw_transitions):
            where = f"{owner}.transitions[{i}]"
            spec = self._transition(where, entry, reserved)
            for field in ("source", "dest"):
                values = _listify(spec[field]) if field == "source" else [spec[field]]
                for value in values:
                    if value in states or (field == "source" and spec["source"] == "*"):
                        continue
                    if field == "dest" and value in ("=", None):
                        continue
                    raise ValueError(
                        f"{where}: unknown {field} state {value!r}; states are {listing}"
                    )
            transitions.append(spec)

        auto_transitions = bool(getattr(cls, "auto_transitions", False))
        ignore = getattr(cls, "ignore_invalid_triggers", None)
        try:
            self.machine = Machine(
                model=None,
                states=configs,
                initial=initial,
                transitions=transitions,
                auto_transitions=auto_transitions,
                ignore_invalid_triggers=ignore,
                name=owner,
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise type(exc)(f"{owner}: {exc}") from None
        machine_states = self.machine.states
        self.ignore_invalid = frozenset(
            name for name in states if machine_states[name].ignore_invalid_triggers
        )
        self.ignore_unknown = bool(ignore)
        labels: dict[tuple[str, str, str], None] = {}
        for trigger, event in self.machine.events.items():
            for source, candidates in event.transitions.items():
                for transition in candidates:
                    dest = transition.dest if transition.dest is not None else source
                    labels[(source, dest, trigger)] = None
        self.transition_labels = tuple(labels)
        self.substates = {state: frozenset((state,)) for state in states}

    @staticmethod
    def _transition(where: str, entry: Any, reserved: Container[str]) -> dict[str, Any]:
        if isinstance(entry, Mapping):
            unknown = sorted(set(entry) - _TRANSITION_KEYS)
            if unknown:
                raise ValueError(
                    f"{where}: unknown key(s) {', '.join(unknown)}; "
                    f"a transition takes {', '.join(_TRANSITION_FIELDS)}"
                )
            missing = [key for key in ("trigger", "source", "dest") if key not in entry]
            if missing:
                raise ValueError(f"{where}: missing {', '.join(missing)}")
            spec = dict(entry)
        elif isinstance(entry, (list, tuple)) and 3 <= len(entry) <= len(_TRANSITION_FIELDS):
            spec = dict(zip(_TRANSITION_FIELDS, entry))
        else:
            raise TypeError(
                f"{where}: expected [trigger, source, dest] or a dict with trigger, source "
                f"and dest, got {entry!r}"
            )
        trigger = spec["trigger"]
        if not isinstance(trigger, str) or not trigger.isidentifier():
            raise ValueError(f"{where}: trigger must be a Python identifier, got {trigger!r}")
        if trigger in reserved:
            raise ValueError(
                f"{where}: trigger {trigger!r} clashes with the attribute MeteredMachine.{trigger}"
            )
        return {key: copy.copy(value) for key, value in spec.items()}


def metric_for(cls: type[MeteredMachine], options: Mapping[str, Any], labelnames: Any) -> Enum:
    owner = cls.__qualname__
    unit = options.get("unit", "")
    if unit:
        raise ValueError(f"{owner}: unit={unit!r} is not allowed; a state metric has no unit")
    name = options.get("name")
    if name is None:
        name = f"{_snake_case(cls.__name__)}_state"
    elif not isinstance(name, str) or not name:
        raise ValueError(f"{owner}: name must be a non-empty string, got {name!r}")
    documentation = options.get("documentation")
    if documentation is None:
        doc = cls.__dict__.get("__doc__")
        lines = inspect.cleandoc(doc).splitlines() if doc else []
        documentation = lines[0] if lines and lines[0] else f"State of {cls.__name__}"
    namespace = options.get("namespace", "")
    subsystem = options.get("subsystem", "")
    full = "_".join(part for part in (namespace, subsystem, name) if part)
    if not _LABEL_NAME.match(full):
        raise ValueError(
            f"{owner}: invalid metric name {full!r}; use letters, digits and underscores, "
            "not starting with a digit"
        )
    if isinstance(labelnames, str):
        raise TypeError(f"{owner}: labelnames must be a sequence of names, not a string")
    labelnames = tuple(labelnames)
    for label in labelnames:
        if not isinstance(label, str) or not _LABEL_NAME.match(label) or label.startswith("__"):
            raise ValueError(f"{owner}: invalid label name {label!r}")
        if label in (full, name):
            raise ValueError(
                f"{owner}: label name {label!r} is the state label (the metric's own name)"
            )
    if len(set(labelnames)) != len(labelnames):
        raise ValueError(f"{owner}: duplicate label names in {labelnames!r}")
    states = cls._definition.states  # type: ignore[union-attr]
    return Enum(
        name,
        documentation,
        labelnames=labelnames,
        namespace=namespace,
        subsystem=subsystem,
        registry=None,
        states=states,
    )
