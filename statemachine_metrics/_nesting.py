"""Nested states: a hierarchical definition compiled to the flat form the engine runs.

A state dict with ``children`` (or ``states``) is a compound state, and its children's full
names join the path with ``_`` (``running_fetching``), as in transitions'
`HierarchicalMachine`. The engine never walks the hierarchy: here, once per class, every
state a machine can be in (a leaf, or a compound state without an ``initial`` child) gets,
per trigger, the candidate transitions that `HierarchicalAsyncMachine` would try from it,
in its order (those declared on the state itself, then on its parent, and so on up), each
resolved to the full state it ends in and the states it leaves and enters, in callback
order. Dispatch stays one dict lookup per (trigger, current state), at any depth.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from transitions import Machine

from . import _trigger

if TYPE_CHECKING:
    from ._definition import Definition
    from ._machine import MeteredMachine

__all__ = ["SEPARATOR", "Tree", "define", "is_nested"]

#: What joins a parent's name and a child's into the child's full name.
SEPARATOR = "_"

_NESTED_KEYS = frozenset(
    ("name", "children", "states", "initial", "on_enter", "on_exit", "ignore_invalid_triggers")
)

ParseTransition = Callable[[str, Any, Container[str]], dict[str, Any]]


def is_nested(raw_states: Sequence[Any]) -> bool:
    """Whether a ``states`` list declares a compound (or parallel) state."""
    return any(
        isinstance(entry, Mapping)
        and ("children" in entry or "states" in entry or "parallel" in entry)
        for entry in raw_states
    )


@dataclass
class Node:
    """One state of a nested definition."""

    name: str  #: the full name, ``running_fetching``
    local: str  #: the name within its parent, ``fetching``
    parent: Node | None
    initial: str | None = None  #: the full name of the initial child
    children: list[Node] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> tuple[str, ...]:
        """Full names from the outermost ancestor down to this state."""
        up: list[str] = []
        node: Node | None = self
        while node is not None:
            up.append(node.name)
            node = node.parent
        return tuple(reversed(up))

    @property
    def current(self) -> bool:
        """Whether a machine can be in this state (entering it enters no child)."""
        return self.initial is None


@dataclass
class Tree:
    """The hierarchy of a nested definition, for diagrams and listings."""

    roots: list[Node]
    initial: str  #: the initial state as declared (a compound state enters its initial child)
    nodes: dict[str, Node]  #: every state by full name, outermost first, in declaration order
    #: The transitions as declared (full names; ``*`` sources stay as given): (trigger,
    #: source, dest), dest None for an internal transition.
    declared: list[tuple[str, str, str | None]]


def _parse(owner: str, raw_states: Sequence[Any]) -> Tree:
    roots: list[Node] = []
    nodes: dict[str, Node] = {}

    def add(entry: Any, where: str, parent: Node | None, siblings: list[Node]) -> None:
        config: dict[str, Any] = {}
        children: Any = ()
        initial: Any = None
        if isinstance(entry, Mapping):
            if "parallel" in entry:
                raise ValueError(
                    f"{where}: parallel states are not supported; a machine is in one state at "
                    "a time (declare the regions as separate machines)"
                )
            unknown = sorted(set(entry) - _NESTED_KEYS)
            if unknown:
                raise ValueError(
                    f"{where}: unknown key(s) {', '.join(unknown)}; a nested state dict takes "
                    f"{', '.join(sorted(_NESTED_KEYS))} (transitions are declared in the "
                    "class's transitions, with full names)"
                )
            if "children" in entry and "states" in entry:
                raise ValueError(f"{where}: give children or states, not both")
            local = entry.get("name")
            children = entry.get("children", entry.get("states", ()))
            initial = entry.get("initial")
            config = {k: copy.copy(v) for k, v in entry.items() if k in _STATE_CONFIG}
        else:
            local = entry
        if not isinstance(local, str) or not local:
            raise TypeError(f"{where}: a state name must be a non-empty string, got {local!r}")
        if SEPARATOR in local:
            raise ValueError(
                f"{where}: state name {local!r} contains {SEPARATOR!r}, which joins nested "
                f"names ({local.replace(SEPARATOR, ' ')!r} would read as nested states); "
                "rename it, or declare the nesting with children"
            )
        name = local if parent is None else f"{parent.name}{SEPARATOR}{local}"
        if name in nodes:
            raise ValueError(f"{where}: duplicate state {name!r}")
        node = Node(name, local, parent, config=config)
        nodes[name] = node
        siblings.append(node)
        if isinstance(children, (str, bytes)) or not isinstance(children, Sequence):
            raise TypeError(f"{where}: children must be a list of state names or dicts")
        for i, child in enumerate(children):
            add(child, f"{where}.children[{i}]", node, node.children)
        if initial is not None:
            locals_ = [child.local for child in node.children]
            if not locals_:
                raise ValueError(
                    f"{where}: initial {initial!r} given, but state {name!r} has no children"
                )
            if not isinstance(initial, str) or initial not in locals_:
                raise ValueError(
                    f"{where}: unknown initial child {initial!r}; children of {name!r} are "
                    f"{', '.join(locals_)}"
                )
            node.initial = f"{name}{SEPARATOR}{initial}"

    for i, entry in enumerate(raw_states):
        add(entry, f"{owner}.states[{i}]", None, roots)
    return Tree(roots, roots[0].name, nodes, [])


_STATE_CONFIG = frozenset(("on_enter", "on_exit", "ignore_invalid_triggers"))


def _entry(tree: Tree, name: str) -> list[str]:
    """Entering `name`: it, then its initial child, and so on down."""
    entered = [name]
    node = tree.nodes[name]
    while node.initial is not None:
        entered.append(node.initial)
        node = tree.nodes[node.initial]
    return entered


def _paths(tree: Tree, current: str, dest: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The states left (innermost first) and entered (outermost first) going from
    `current` to `dest`, as `NestedTransition` resolves them: what both share stays,
    unless `dest` is `current` or one of its ancestors, which is left and entered again."""
    here = tree.nodes[current].path
    there = tree.nodes[dest].path
    shared = 0
    while shared < len(there) and shared < len(here) and here[shared] == there[shared]:
        shared += 1
    if shared == len(there):
        shared -= 1
    exits = tuple(reversed(here[shared:]))
    enters = (*there[shared:-1], *_entry(tree, dest))
    return exits, enters


def define(
    definition: Definition,
    cls: type[MeteredMachine],
    reserved: Container[str],
    parse_transition: ParseTransition,
) -> None:
    """Fill `definition` for a class whose ``states`` nest.

    Sets what a flat definition has (``states``: every state a machine can be in,
    ``initial``, ``machine``: a flat `transitions.Machine` whose per-source candidate
    lists are those the engine tries, ``ignore_invalid``, ``ignore_unknown``,
    ``transition_labels``) plus ``substates`` and ``tree``.
    """
    owner = definition.owner
    tree = _parse(owner, cls.__dict__["states"])
    everything = list(tree.nodes)
    listing = ", ".join(everything)
    top = [node.name for node in tree.roots]

    initial = getattr(cls, "initial", None)
    if initial is None:
        initial = top[0]
    elif initial not in tree.nodes:
        raise ValueError(f"{owner}.initial: unknown state {initial!r}; states are {listing}")
    tree.initial = initial

    raw_transitions = getattr(cls, "transitions", ())
    if isinstance(raw_transitions, (str, bytes)) or not isinstance(raw_transitions, Sequence):
        raise TypeError(f"{owner}.transitions must be a list of lists or dicts")
    specs: list[dict[str, Any]] = []
    if getattr(cls, "auto_transitions", False):
        # HierarchicalMachine: to_<state> for every state, from every state.
        specs.extend({"trigger": f"to_{name}", "source": top, "dest": name} for name in everything)
    table = [(f"{owner}.transitions[{i}]", entry) for i, entry in enumerate(raw_transitions)]
    for where, entry in table + _trigger.declarations(cls):  # Trigger attributes come last
        spec = parse_transition(where, entry, reserved)
        source, dest = spec["source"], spec["dest"]
        sources = [source] if isinstance(source, str) else list(source or ())
        if source != "*":
            for value in sources:
                if value not in tree.nodes:
                    raise ValueError(
                        f"{where}: unknown source state {value!r}; states are {listing}"
                    )
        if dest not in tree.nodes and dest not in ("=", None):
            raise ValueError(f"{where}: unknown dest state {dest!r}; states are {listing}")
        for value in top if source == "*" else sources:
            tree.declared.append((spec["trigger"], value, value if dest == "=" else dest))
        if source == "*":
            # A wildcard means every top-level state (and so every state within them);
            # reflexive, it means every state itself, as HierarchicalMachine has it.
            spec["source"] = everything if dest == "=" else top
        specs.append(spec)

    ignore = getattr(cls, "ignore_invalid_triggers", None)
    configs = [{"name": node.name, **node.config} for node in tree.nodes.values()]
    try:
        machine = Machine(
            model=None,
            states=configs,
            initial=initial,
            transitions=specs,
            auto_transitions=False,
            ignore_invalid_triggers=ignore,
            name=owner,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise type(exc)(f"{owner}: {exc}") from None

    current = [name for name, node in tree.nodes.items() if node.current]
    labels: dict[tuple[str, str, str], None] = {}
    for trigger, event in machine.events.items():
        declared = event.transitions
        flat: defaultdict[str, list[Any]] = defaultdict(list)
        for state in current:
            for holder in reversed(tree.nodes[state].path):  # innermost first
                for transition in declared.get(holder, ()):
                    resolved: Any = copy.copy(transition)
                    resolved.source = state
                    resolved.level = holder  # HSM runs prepare_event once per level it tries
                    if transition.dest is not None:
                        exits, enters = _paths(tree, state, transition.dest)
                        resolved.dest = enters[-1]
                        resolved.exit_path = exits
                        resolved.enter_path = enters
                    flat[state].append(resolved)
                    dest_label = resolved.dest if resolved.dest is not None else state
                    labels[(state, dest_label, trigger)] = None
        event.transitions = flat

    definition.states = tuple(current)
    definition.initial = _entry(tree, initial)[-1]
    definition.machine = machine
    definition.ignore_invalid = frozenset(
        name for name in current if machine.states[name].ignore_invalid_triggers
    )
    definition.ignore_unknown = bool(ignore)
    definition.transition_labels = tuple(labels)
    definition.substates = {
        name: frozenset(state for state in current if name in tree.nodes[state].path)
        for name in everything
    }
    definition.tree = tree
