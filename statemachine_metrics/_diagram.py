"""Mermaid diagrams of machine classes.

transitions ships a Mermaid backend (`transitions.extensions.diagrams_mermaid`), but it
needs a `GraphMachine`, adds a title block and styling classes, merges the triggers of one
edge into a single label and uses state names as ids unchecked; the diagram below is small
enough to write directly from the class's compiled transition table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._machine import MeteredMachine
    from ._nesting import Node, Tree

__all__ = ["mermaid", "state_ids"]

_PLAIN_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)

# Words that Mermaid's state diagram lexer (case-insensitive) reads as keywords where an id
# would be (state, note, class, classdef, scale, acctitle, accdescr), and words kept out for
# safety: flowchart keywords such as end, and directions. An id starting with "default" or
# containing "direction" is refused too, as some Mermaid versions match those inside words.
_KEYWORDS = frozenset(
    {
        *("accdescr", "acctitle", "class", "classdef", "note", "scale", "state"),
        *("statediagram", "as", "choice", "click", "concurrent", "default", "direction"),
        *("end", "flowchart", "fork", "graph", "hide", "join", "left", "right", "of"),
        *("style", "subgraph", "tb", "td", "bt", "lr", "rl"),
    }
)
# Mermaid reads "...direction", whitespace (newlines included), then one of these, as a
# `direction` statement, wherever it starts on a line.
_DIRECTIONS = ("tb", "bt", "rl", "lr")
_SPECIAL = frozenset('#"%<>&')


def _label(text: str) -> str:
    """`text` as a quoted Mermaid label.

    Characters that would end or corrupt the label or the line become Mermaid entity codes,
    ``#<number>;``, which Mermaid turns back into the characters when it renders: quotes,
    markup, ``#`` and ``%``, line breaks and other unprintables, and the characters Mermaid
    would otherwise drop or misread (spaces at either end, a leading colon, the space
    after "direction").
    """
    last = len(text) - 1
    out = []
    for i, c in enumerate(text):
        escape = (
            c in _SPECIAL
            or not c.isprintable()
            or (c == " " and (i in (0, last) or text[:i].lower().endswith("direction")))
            or (c == ":" and i == 0)
        )
        out.append(f"#{ord(c)};" if escape else c)
    return "".join(out)


def _plain(name: str, after_direction: bool) -> bool:
    """Whether Mermaid can take `name` as a state id as it is; `after_direction` when the
    id may start a line that follows one ending in "direction"."""
    if not _PLAIN_ID.fullmatch(name):
        return False
    lowered = name.lower()
    return (
        lowered not in _KEYWORDS
        and not lowered.startswith("default")
        and "direction" not in lowered
        and not (after_direction and lowered.startswith(_DIRECTIONS))
    )


def state_ids(states: Sequence[str], triggers: Iterable[str] = ()) -> dict[str, str]:
    """The Mermaid id of each state: its name when Mermaid can take it, otherwise ``s_``
    and the name's letters, digits and underscores (or ``s<index>``), made unique with a
    ``_2``, ``_3``... suffix. Depends only on the states and the trigger names (a trigger
    ending in "direction" rules out ids starting with tb, bt, rl or lr), so it is
    deterministic."""
    after = any(trigger.lower().endswith("direction") for trigger in triggers)
    ids: dict[str, str] = {}
    taken = {name for name in states if _plain(name, after)}
    for index, name in enumerate(states):
        if _plain(name, after):
            ids[name] = name
            continue
        letters = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")
        base = f"s_{letters}" if letters and _plain(f"s_{letters}", after) else f"s{index}"
        candidate, n = base, 2
        while candidate in taken:
            candidate, n = f"{base}_{n}", n + 1
        taken.add(candidate)
        ids[name] = candidate
    return ids


def _live_counts(cls: type[MeteredMachine]) -> list[int]:
    family = cls._family
    if family is None:
        raise TypeError(
            f"{cls.__qualname__} is abstract (a template) and has no machines to count; "
            "call mermaid(counts=True) on a concrete subclass"
        )
    return family.live_counts()


def mermaid(cls: type[MeteredMachine], *, counts: bool = False) -> str:
    """The machine class as a Mermaid ``stateDiagram-v2`` text.

    The first line is ``stateDiagram-v2``, then ``[*] --> <initial>``, then one
    ``<source> --> <dest> : <trigger>`` line per allowed transition, in declaration order,
    with wildcards and source lists expanded. An internal transition (``dest`` None) is
    drawn as a self-loop, like a reflexive one; several conditional transitions with the
    same source, dest and trigger make one line.

    A state whose name Mermaid cannot take as an id (spaces, dashes, non-ASCII letters,
    keywords such as ``end`` or ``state``) is given an id (see `state_ids`) and declared
    after the transitions with ``state "<name>" as <id>``. A state that no transition
    reaches or leaves is listed on a line of its own, so that every state is drawn.

    A nested definition draws each compound state as a composite state, ``state running
    {`` ... ``}``, with ``[*] --> <child>`` for its initial child; a child's id is its full
    name and its label its own name. Transitions are drawn as declared: one declared on a
    compound state starts at its box, and a ``"*"`` source starts at every top-level state.

    With `counts`, every state is declared with a label that also shows how many live
    machines are in it, ``state "running (3)" as running``: the machines of this process,
    of the class and of the subclasses that share its metrics, counted when this is called.

    Raises:
        TypeError: the class declares no states, or `counts` is asked of a template.
    """
    live = _live_counts(cls) if counts else None
    definition = cls._require_definition()
    if definition.tree is not None:
        return _nested(cls, definition.tree, definition.substates, live)
    states = cls.state_names()
    table = cls.transition_table()
    ids = state_ids(states, cls.trigger_names())

    initial = cls.initial_state()
    lines = ["stateDiagram-v2", f"[*] --> {ids[initial]}"]
    drawn = {initial}
    edges: dict[tuple[str, str, str], None] = {}
    for trigger, source, dest in table:
        edges[(source, source if dest is None else dest, trigger)] = None
    for source, dest, trigger in edges:
        drawn.update((source, dest))
        lines.append(f"{ids[source]} --> {ids[dest]} : {trigger}")
    for index, name in enumerate(states):
        if live is not None or ids[name] != name:
            label = name if live is None else f"{name} ({live[index]})"
            lines.append(f'state "{_label(label)}" as {ids[name]}')
        elif name not in drawn:
            lines.append(name)  # a state no transition reaches or leaves
    return "\n".join(lines)


def _nested(
    cls: type[MeteredMachine],
    tree: Tree,
    substates: Mapping[str, frozenset[str]],
    live: list[int] | None,
) -> str:
    """`mermaid` for a nested definition: composite states, transitions as declared."""
    names = list(tree.nodes)
    ids = state_ids(names, cls.trigger_names())
    index = {state: i for i, state in enumerate(cls.state_names())}
    lines = ["stateDiagram-v2", f"[*] --> {ids[tree.initial]}"]

    def declare(node: Node, indent: str) -> None:
        label = node.local
        if live is not None:
            label = f"{label} ({sum(live[index[s]] for s in substates[node.name])})"
        if live is not None or ids[node.name] != node.local:
            lines.append(f'{indent}state "{_label(label)}" as {ids[node.name]}')
        if node.children:
            lines.append(f"{indent}state {ids[node.name]} {{")
            if node.initial is not None:
                lines.append(f"{indent}    [*] --> {ids[node.initial]}")
            for child in node.children:
                declare(child, indent + "    ")
            lines.append(f"{indent}}}")
        elif live is None and ids[node.name] == node.local:
            lines.append(f"{indent}{ids[node.name]}")

    for root in tree.roots:
        declare(root, "")
    edges = dict.fromkeys(
        (source, source if dest is None else dest, trigger)
        for trigger, source, dest in tree.declared
    )
    lines.extend(f"{ids[source]} --> {ids[dest]} : {trigger}" for source, dest, trigger in edges)
    return "\n".join(lines)
