"""Machine definitions: what a class declares, checked before anything is built.

`transitions` builds the definition (states, transitions, wildcards, source lists,
reflexive and internal transitions, conditions); `Definition` first checks what
`transitions` accepts silently or reports without naming the class, and `metric_for`
checks the names the class's metrics will have.
"""

from __future__ import annotations

import copy
import difflib
import enum
import importlib
import inspect
import re
from collections.abc import Container, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from transitions import Machine

from . import _nesting, _trigger
from ._enum import Enum
from ._multiprocess import check_labelnames

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
_STATE_KEYS = frozenset(
    ("name", "on_enter", "on_exit", "ignore_invalid_triggers", "final", "on_final")
)
#: Machine-level callbacks, under the names transitions' `Machine` takes them.
MACHINE_CALLBACKS = (
    "prepare_event",
    "before_state_change",
    "after_state_change",
    "finalize_event",
    "on_exception",
    "on_final",
)
# The keyword arguments of transitions' Machine.add_ordered_transitions().
_ORDERED_KEYS = (
    "states",
    "trigger",
    "loop",
    "loop_includes_initial",
    "conditions",
    "unless",
    "before",
    "after",
    "prepare",
)
_FLAGS = ("send_event", "queued", "strict")
# Every class attribute a definition reads, with the kinds of value it takes: a class
# attribute of such a kind whose name is a near miss of one of these is a misspelling.
_DATA = (list, tuple, enum.EnumMeta)
_CALLBACK_VALUES = (str, list, tuple)
_ATTRIBUTE_KINDS: dict[str, tuple[type, ...]] = {
    "states": _DATA,
    "transitions": (list, tuple),
    "initial": (str, enum.Enum),
    "auto_transitions": (bool,),
    "ignore_invalid_triggers": (bool,),
    "ordered_transitions": (bool, dict),
    "duration_buckets": (list, tuple),
    "timeouts": (dict,),
    "stuck_after": (dict,),
    **dict.fromkeys(_FLAGS, (bool,)),
    **dict.fromkeys(MACHINE_CALLBACKS, _CALLBACK_VALUES),
}


def _snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _listify(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _enum_states(definition: Definition, raw: Any) -> Any:
    """States given as an `enum.Enum` class or as its members: their names, noting the class.

    Anything else comes back unchanged. The metric and ``.state`` strings use the members'
    names, as transitions' state names do.
    """
    if isinstance(raw, enum.EnumMeta):
        entries: list[Any] = list(raw)
        if not entries:
            return entries
    elif isinstance(raw, (list, tuple)):
        entries = list(raw)
    else:
        return raw
    names = [entry.get("name") if isinstance(entry, Mapping) else entry for entry in entries]
    members = [name for name in names if isinstance(name, enum.Enum)]
    if not members:
        return raw
    classes = {type(member) for member in members}
    if len(classes) > 1 or len(members) != len(names):
        given = ", ".join(repr(name) for name in names)
        raise TypeError(
            f"{definition.owner}.states: give every state as a member of one enum.Enum class, "
            f"or every state as a name, not a mix; got {given}"
        )
    (definition.enum_states,) = classes
    definition.enum_members = {member.name: member for member in members}
    return [
        {**entry, "name": entry["name"].name} if isinstance(entry, Mapping) else entry.name
        for entry in entries
    ]


def _flag(cls: type[MeteredMachine], name: str) -> bool:
    value = getattr(cls, name, False)
    if name == "queued" and value == "model":
        return True  # transitions' queue per model: here every machine has its own anyway
    if not isinstance(value, bool):
        raise TypeError(f"{cls.__qualname__}.{name} must be True or False, got {value!r}")
    return value


def _machine_callbacks(cls: type[MeteredMachine], name: str) -> tuple[object, ...]:
    """A machine-level callback attribute as references: method names and callables."""
    for klass in cls.__mro__:
        if name in vars(klass):
            raw = vars(klass)[name]
            break
    else:
        return ()
    if raw is None:
        return ()
    if isinstance(raw, staticmethod):
        return (raw.__func__,)
    if isinstance(raw, classmethod):
        return (getattr(cls, name),)
    if inspect.isfunction(raw) and raw.__qualname__.startswith(f"{klass.__qualname__}."):
        # A method of the class: called bound, and a subclass may override it.
        return (name,)
    references = tuple(raw) if isinstance(raw, (list, tuple)) else (raw,)
    for reference in references:
        if not isinstance(reference, str) and not callable(reference):
            raise TypeError(
                f"{cls.__qualname__}.{name}: {reference!r} is neither a method name nor a "
                "callable; give a name, a callable or a list of them"
            )
    return references


def _annotations(klass: type) -> Container[str]:
    try:
        return inspect.get_annotations(klass)
    except Exception:  # an annotation that fails to evaluate still names an attribute
        annotations: Container[str] = vars(klass).get("__annotations__", {})
        return annotations


def _importable(path: str) -> bool:
    """Whether transitions would import `path` (``package.module.function``)."""
    module_name, _, attribute = path.rpartition(".")
    if not module_name:
        return False
    try:
        module = importlib.import_module(module_name)
    except Exception:
        return False
    if getattr(getattr(module, "__spec__", None), "_initializing", False):
        return True  # still being imported (the module defining the class): trust it
    return hasattr(module, attribute)


class TransitionSpec(NamedTuple):
    """One allowed transition of a machine class.

    Attributes:
        trigger: The trigger that runs it.
        source: The state it leaves (one state: wildcards and source lists are expanded).
        dest: The state it enters; None for an internal transition, which changes no state.
    """

    trigger: str
    source: str
    dest: str | None


class Definition:
    """A validated machine definition, built with `transitions` (shared with subclasses)."""

    # States given as an enum.Enum class (or its members): the class, and name -> member.
    enum_states: type[enum.Enum] | None = None
    enum_members: dict[str, enum.Enum] = {}
    #: The states entered as final ({"final": True}), and the states' own on_final callbacks.
    final_states: frozenset[str] = frozenset()
    state_on_final: dict[str, tuple[object, ...]] = {}
    #: Machine-level callbacks (MACHINE_CALLBACKS), as the class gives them: names, callables.
    machine_callbacks: dict[str, tuple[object, ...]] = dict.fromkeys(MACHINE_CALLBACKS, ())
    send_event: bool = False
    queued: bool = False

    def __init__(self, cls: type[MeteredMachine], abstract: bool, reserved: Container[str]) -> None:
        owner = cls.__qualname__
        self.owner = owner
        self.abstract = abstract
        raw_states = _enum_states(self, cls.__dict__["states"])
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
        state_on_final: dict[str, tuple[object, ...]] = {}
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
                config = dict(entry)
                # transitions' flat State takes no on_final: the engine runs it.
                on_final = tuple(_listify(config.pop("on_final", None)))
                if on_final:
                    if not config.get("final"):
                        raise ValueError(
                            f"{where}: on_final runs when a final state is entered, and "
                            f'state {name!r} is not final; add "final": True'
                        )
                    state_on_final[str(name)] = on_final
                configs.append(config)
            else:
                name = entry
                configs.append(entry)
            if not isinstance(name, str) or not name:
                raise TypeError(f"{where}: a state name must be a non-empty string, got {name!r}")
            if name in states:
                raise ValueError(f"{where}: duplicate state {name!r}")
            states.append(name)
        self.states = tuple(states)
        self.state_on_final = state_on_final
        listing = ", ".join(states)

        initial = getattr(cls, "initial", None)
        if isinstance(initial, enum.Enum):
            initial = initial.name
        if initial is None:
            initial = states[0]
        elif initial not in states:
            raise ValueError(f"{owner}.initial: unknown state {initial!r}; states are {listing}")
        self.initial: str = initial

        raw_transitions = getattr(cls, "transitions", ())
        if isinstance(raw_transitions, (str, bytes)) or not isinstance(raw_transitions, Sequence):
            raise TypeError(f"{owner}.transitions must be a list of lists or dicts")
        transitions: list[dict[str, Any]] = []
        # Trigger attributes declare transitions too, after the table's.
        table = [(f"{owner}.transitions[{i}]", entry) for i, entry in enumerate(raw_transitions)]
        for where, entry in table + _trigger.declarations(cls):
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
        ordered = getattr(cls, "ordered_transitions", False)
        if ordered is not False:
            self._add_ordered(ordered, reserved)
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
        for field in ("source", "dest"):
            value = spec[field]
            if isinstance(value, enum.Enum):
                spec[field] = value.name
            elif isinstance(value, (list, tuple)):
                spec[field] = [v.name if isinstance(v, enum.Enum) else v for v in value]
        # Lists are copied so that transitions never shares the class's own; callables
        # are kept as given (a copy of a mock or of a stateful object is another object).
        return {k: list(v) if isinstance(v, list) else v for k, v in spec.items()}

    def _add_ordered(self, ordered: object, reserved: Container[str]) -> None:
        """transitions' add_ordered_transitions(), from ``ordered_transitions``."""
        where = f"{self.owner}.ordered_transitions"
        if ordered is True:
            options: dict[str, Any] = {}
        elif isinstance(ordered, Mapping):
            options = dict(ordered)
            unknown = sorted(set(options) - set(_ORDERED_KEYS))
            if unknown:
                raise ValueError(
                    f"{where}: unknown key(s) {', '.join(unknown)}; it takes the arguments of "
                    f"transitions' add_ordered_transitions: {', '.join(_ORDERED_KEYS)}"
                )
        else:
            raise TypeError(
                f"{where} must be True or a dict of add_ordered_transitions arguments "
                f"({', '.join(_ORDERED_KEYS)}), got {ordered!r}"
            )
        trigger = options.get("trigger", "next_state")
        if not isinstance(trigger, str) or not trigger.isidentifier():
            raise ValueError(f"{where}: trigger must be a Python identifier, got {trigger!r}")
        if trigger in reserved:
            raise ValueError(
                f"{where}: trigger {trigger!r} clashes with the attribute MeteredMachine.{trigger}"
            )
        if "states" in options:
            names = [s.name if isinstance(s, enum.Enum) else s for s in _listify(options["states"])]
            unknown = [repr(name) for name in names if name not in self.states]
            if unknown:
                raise ValueError(
                    f"{where}: unknown state(s) {', '.join(unknown)}; "
                    f"states are {', '.join(self.states)}"
                )
            options["states"] = names
        for key in ("conditions", "unless", "before", "after", "prepare"):
            if isinstance(options.get(key), list):
                options[key] = list(options[key])
        try:
            self.machine.add_ordered_transitions(**options)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{where}: {exc}") from None

    def for_class(self, cls: type[MeteredMachine], abstract: bool) -> Definition:
        """The definition `cls` runs: this one (its own, or its parent's), or a copy.

        The machine-level callbacks, ``send_event`` and ``queued`` are read from `cls`, so a
        subclass that reuses its parent's states may set its own (then it gets a copy).
        Checks what transitions lets through: callback names that name nothing,
        ``on_enter_<state>``/``on_exit_<state>`` methods for states that do not exist,
        misspelled definition attributes, and, with ``strict = True``, states that no
        transition reaches or leaves.

        Raises:
            ValueError, TypeError: naming the class and the entry.
        """
        owner = cls.__qualname__
        declares = "states" in cls.__dict__
        if not declares:
            redefined = [a for a in ("ordered_transitions", "strict") if a in cls.__dict__]
            if redefined:
                raise TypeError(
                    f"{owner} declares {', '.join(redefined)} but no states: a subclass "
                    "either reuses its parent's definition whole or declares its own states"
                )
        callbacks = {name: _machine_callbacks(cls, name) for name in MACHINE_CALLBACKS}
        send_event, queued, strict = (_flag(cls, name) for name in _FLAGS)
        definition = self
        if not declares and (abstract, callbacks, send_event, queued) != (
            self.abstract,
            self.machine_callbacks,
            self.send_event,
            self.queued,
        ):
            definition = copy.copy(self)
        definition.abstract = abstract
        definition.machine_callbacks = callbacks
        definition.send_event = send_event
        definition.queued = queued
        if declares:
            if getattr(cls, "ordered_transitions", False) and self.tree is not None:
                raise ValueError(
                    f"{owner}.ordered_transitions: not supported with nested states; "
                    "declare the transitions instead"
                )
            self.final_states = frozenset(
                name for name, state in self.machine.states.items() if state.final
            )
            if strict:
                self._check_strict()
        definition._check_class(cls)
        return definition

    def _check_strict(self) -> None:
        touched: set[str] = set()
        for event in self.machine.events.values():
            for source, candidates in event.transitions.items():
                for transition in candidates:
                    if transition.dest is not None:
                        touched.update((source, transition.dest))
        isolated = [state for state in self.states if state not in touched]
        if isolated:
            listed = ", ".join(map(repr, isolated))
            raise ValueError(
                f"{self.owner}: strict = True, and no transition reaches or leaves {listed}; "
                "add transitions for it or remove it from states"
            )

    def _check_class(self, cls: type[MeteredMachine]) -> None:
        owner = cls.__qualname__
        for name, value in vars(cls).items():
            if name.startswith("_") or name in _ATTRIBUTE_KINDS:
                continue
            close = difflib.get_close_matches(name, _ATTRIBUTE_KINDS, n=1, cutoff=0.85)
            if close and isinstance(value, _ATTRIBUTE_KINDS[close[0]]):
                raise ValueError(
                    f"{owner}.{name} is not a definition attribute; did you mean {close[0]!r}?"
                )
        states = self.machine.states
        for klass in cls.__mro__[:-1]:
            for name in vars(klass):
                for prefix in ("on_enter_", "on_exit_"):
                    state = name[len(prefix) :]
                    if name.startswith(prefix) and state not in states:
                        close = difflib.get_close_matches(state, states, n=1)
                        hint = f"; did you mean {prefix}{close[0]}?" if close else ""
                        raise ValueError(
                            f"{owner}: {klass.__qualname__}.{name} is for state {state!r}, "
                            f"which {owner} does not have; states are "
                            f"{', '.join(states)}{hint}"
                        )
        generated = {*self.machine.events, *(f"may_{t}" for t in self.machine.events)}
        generated.update(f"is_{state}" for state in states)
        for where, reference in self._references(owner):
            if not isinstance(reference, str) or reference in generated:
                continue
            if hasattr(cls, reference) or _importable(reference):
                continue
            if any(reference in _annotations(klass) for klass in cls.__mro__):
                continue
            names = [name for name in dir(cls) if not name.startswith("_")]
            close = difflib.get_close_matches(reference, [*names, *generated], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"{where}: {reference!r} is no method, property, class attribute or "
                f"annotation of {owner}, nor an importable dotted path{hint}"
            )

    def _references(self, owner: str) -> Any:
        """Every callback reference of the definition, with where it comes from."""
        for name, references in self.machine_callbacks.items():
            for reference in references:
                yield f"{owner}.{name}", reference
        for state, config in self.machine.states.items():
            for kind in ("on_enter", "on_exit"):
                for reference in getattr(config, kind):
                    yield f"{owner}: state {state!r} {kind}", reference
            for reference in self.state_on_final.get(state, ()):
                yield f"{owner}: state {state!r} on_final", reference
        for trigger, event in self.machine.events.items():
            for source, candidates in event.transitions.items():
                for t in candidates:
                    where = f"{owner}: transition {trigger!r} from {source!r}"
                    for kind in ("prepare", "before", "after"):
                        for reference in getattr(t, kind):
                            yield f"{where}, {kind}", reference
                    for condition in t.conditions:
                        kind = "conditions" if condition.target else "unless"
                        yield f"{where}, {kind}", condition.func


# Labels of the derived metrics: the metric's full name is their state label, so it may not
# be one of these (a histogram's `le` would replace it, and so on).
_DERIVED_LABELS = frozenset(("le", "from", "to", "trigger", "error", "quantile"))


def _keyword(owner: str, options: Mapping[str, Any], keyword: str, default: str) -> str:
    value = options.get(keyword, default)
    if not isinstance(value, str):
        raise TypeError(f"{owner}: {keyword}= must be a string, got {value!r}")
    return value


def metric_for(cls: type[MeteredMachine], options: Mapping[str, Any], labelnames: Any) -> Enum:
    owner = cls.__qualname__
    unit = _keyword(owner, options, "unit", "")
    if unit:
        raise ValueError(f"{owner}: unit={unit!r} is not allowed; a state metric has no unit")
    name = options.get("name")
    if name is None:
        name = f"{_snake_case(cls.__name__)}_state"
    elif not isinstance(name, str) or not name:
        raise ValueError(f"{owner}: name= must be a non-empty string, got {name!r}")
    documentation = options.get("documentation")
    if documentation is None:
        doc = cls.__dict__.get("__doc__")
        if doc is not None and not isinstance(doc, str):
            raise TypeError(
                f"{owner}: its docstring must be a string (it is the metric's help text), "
                f"got {doc!r}; or pass documentation="
            )
        lines = inspect.cleandoc(doc).splitlines() if doc else []
        documentation = lines[0] if lines and lines[0] else f"State of {cls.__name__}"
    elif not isinstance(documentation, str):
        raise TypeError(f"{owner}: documentation= must be a string, got {documentation!r}")
    namespace = _keyword(owner, options, "namespace", "")
    subsystem = _keyword(owner, options, "subsystem", "")
    full = "_".join(part for part in (namespace, subsystem, name) if part)
    if not _LABEL_NAME.match(full):
        raise ValueError(
            f"{owner}: invalid metric name {full!r}; use letters, digits and underscores, "
            "not starting with a digit"
        )
    if full in _DERIVED_LABELS:
        raise ValueError(
            f"{owner}: metric name {full!r} clashes with a label of its derived metrics "
            f"({', '.join(sorted(_DERIVED_LABELS))}), where the metric's name labels the "
            "state; choose another name="
        )
    if isinstance(labelnames, (str, bytes)) or not isinstance(labelnames, Iterable):
        raise TypeError(
            f"{owner}: labelnames= must be a sequence of label names, got {labelnames!r}"
        )
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
    check_labelnames(owner, labelnames)
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
