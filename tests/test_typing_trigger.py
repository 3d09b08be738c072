"""`Trigger` declarations and ``name: Trigger`` annotations, at run time."""

from __future__ import annotations

import re
import types
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statemachine_metrics import MachineError, MeteredMachine, Trigger
from statemachine_metrics.testing import record

STATES = ["shut", "open", "broken"]


class Door(MeteredMachine, registry=None):
    states = STATES
    transitions = [["fix", "broken", "shut"]]
    push = Trigger("shut", "open", unless="is_locked")
    pull = Trigger("open", "shut", after="note")
    kick = Trigger("shut", "broken", conditions="hard") | Trigger("open", "broken")
    knock = Trigger("*", None, before="note")
    slam = Trigger(["open", "shut"], "=")
    fix: Trigger

    def __init__(self, *, locked: bool = False) -> None:
        super().__init__()
        self.locked = locked
        self.notes: list[str] = []

    def is_locked(self) -> bool:
        return self.locked

    def hard(self, force: int = 0) -> bool:
        return force > 5

    def note(self, *args: object, **kwargs: object) -> None:
        self.notes.append(self.state)


def define(body: dict[str, Any], *, name: str = "Bad", bases: tuple[type, ...] = ()) -> type:
    """Create a machine class as a ``class`` statement would, exported nowhere."""
    keywords = {"registry": None}
    return types.new_class(name, bases or (MeteredMachine,), keywords, lambda ns: ns.update(body))


@pytest.mark.anyio
async def test_declared_triggers_run_with_their_callbacks(anyio_backend: str) -> None:
    door = Door()
    assert await door.push() is True
    assert door.is_open()
    assert await door.may_pull() is True
    assert await door.pull() is True
    assert door.notes == ["shut"]  # `after` runs once the state has changed
    assert await Door(locked=True).push() is False


@pytest.mark.anyio
async def test_combined_declarations_are_tried_in_order(anyio_backend: str) -> None:
    door = Door()
    assert await door.kick(force=1) is False  # from shut, the first declaration's condition
    assert door.state == "shut"
    assert await door.kick(force=9) is True
    assert door.state == "broken"
    assert await door.fix() is True  # declared by the table, typed by the annotation
    await door.push()
    assert await door.kick() is True  # from open, the second declaration
    assert door.is_broken()


@pytest.mark.anyio
async def test_internal_reflexive_and_wildcard_sources(anyio_backend: str) -> None:
    door = Door()
    with record(door) as recorder:
        assert await door.knock() is True
        assert await door.slam() is True
    assert [(r.trigger, r.source, r.dest) for r in recorder.transitions] == [
        ("knock", "shut", "shut"),
        ("slam", "shut", "shut"),
    ]
    assert door.notes == ["shut"]  # the internal one ran its `before`, and no exit or enter
    await door.kick(force=9)
    with pytest.raises(MachineError):
        await door.slam()


def test_declarations_follow_the_table_in_class_body_order() -> None:
    table = [(t.trigger, t.source, t.dest) for t in Door.transition_table()]
    assert table[0] == ("fix", "broken", "shut")
    assert [trigger for trigger, _, _ in table] == [
        "fix",
        "push",
        "pull",
        "kick",
        "kick",
        *["knock"] * 3,
        "slam",
        "slam",
    ]
    assert ("kick", "shut", "broken") in table
    assert Door.trigger_names() == ("fix", "push", "pull", "kick", "knock", "slam")


def test_a_trigger_and_a_table_entry_share_a_name() -> None:
    cls = define(
        {
            "states": STATES,
            "transitions": [["kick", "shut", "broken"]],
            "kick": Trigger("open", "broken"),
        }
    )
    assert [(t.source, t.dest) for t in cls.transition_table()] == [
        ("shut", "broken"),
        ("open", "broken"),
    ]


def test_the_declaration_becomes_the_generated_method() -> None:
    method = vars(Door)["push"]
    assert not isinstance(method, Trigger)
    assert method.__qualname__ == "Door.push"
    assert "shut -> open" in (method.__doc__ or "")


def test_a_subclass_without_states_reuses_the_declared_triggers() -> None:
    sub = define({"extra": 1}, name="Sub", bases=(Door,))
    assert sub.trigger_names() == Door.trigger_names()


# -- mistakes fail at class creation, naming the class ------------------------------------


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        pytest.param(
            {"states": STATES, "push": Trigger("shut", "opn")},
            ValueError,
            "Bad.push: unknown dest state 'opn'; states are shut, open, broken",
            id="unknown-dest",
        ),
        pytest.param(
            {
                "states": STATES,
                "kick": Trigger("shut", "broken") | Trigger(["open", "ajar"], "shut"),
            },
            ValueError,
            "Bad.kick[1]: unknown source state 'ajar'; states are shut, open, broken",
            id="unknown-source-in-a-combination",
        ),
        pytest.param(
            {"states": STATES, "state": Trigger("shut", "open")},
            ValueError,
            "Bad.state: trigger 'state' clashes with the attribute MeteredMachine.state",
            id="reserved-name",
        ),
        pytest.param(
            {
                "states": STATES,
                "transitions": [["push", "shut", "open"]],
                "__annotations__": {"push": "Trigger", "pull": "statemachine_metrics.Trigger"},
            },
            ValueError,
            "Bad: Bad.pull: Trigger names no trigger of Bad; its triggers are push",
            id="annotation-without-transition",
        ),
        pytest.param(
            {"states": STATES, "__annotations__": {"push": Trigger}},
            ValueError,
            "Bad: Bad.push: Trigger names no trigger of Bad; its triggers are none",
            id="annotation-as-a-class",
        ),
    ],
)
def test_bad_declarations_fail(body: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        define(body)


def test_other_annotations_are_not_checked() -> None:
    cls = define({"states": STATES, "__annotations__": {"retries": "int", "door": "Triggered"}})
    assert cls.trigger_names() == ()


def test_a_trigger_in_a_subclass_without_states_fails() -> None:
    with pytest.raises(TypeError, match=re.escape("Sub: Sub.bang is a Trigger, but Sub declares")):
        define({"bang": Trigger("shut", "broken")}, name="Sub", bases=(Door,))


def test_a_trigger_in_a_mixin_fails() -> None:
    mixin = type("Mixin", (), {"bang": Trigger("shut", "broken")})
    with pytest.raises(TypeError, match=re.escape("Bad: Mixin.bang is a Trigger, but Mixin")):
        define({"states": STATES}, bases=(mixin, MeteredMachine))


def test_an_annotation_in_a_subclass_is_checked() -> None:
    with pytest.raises(ValueError, match=re.escape("Sub: Sub.fixx: Trigger names no trigger")):
        define({"__annotations__": {"fixx": "Trigger"}}, name="Sub", bases=(Door,))


def test_a_subclass_with_its_own_states_keeps_its_parents_typed_triggers() -> None:
    # Type checkers see Door's push and fix on the subclass, so the subclass must have them.
    with pytest.raises(
        ValueError, match=re.escape("Sub: Door.push = Trigger(...) names no trigger of Sub")
    ):
        define({"states": ["a"], "transitions": []}, name="Sub", bases=(Door,))
    declared = {name: Trigger("shut", "open") for name in ("push", "pull", "kick", "knock", "slam")}
    with pytest.raises(ValueError, match=re.escape("Sub: Door.fix: Trigger names no trigger")):
        define({"states": STATES, "transitions": [], **declared}, name="Sub", bases=(Door,))


# -- the declaration object itself ---------------------------------------------------------


def test_a_declaration_outside_a_machine_cannot_fire() -> None:
    class Plain:
        push = Trigger("shut", "open")

    assert isinstance(Plain.push, Trigger)
    with pytest.raises(TypeError, match="is a declaration, not a trigger"):
        Plain().push()


def test_repr_shows_the_declaration() -> None:
    declared = Trigger("a", None, conditions=["ok"]) | Trigger("*", "=")
    assert repr(declared) == "Trigger('a', None, conditions=['ok']) | Trigger('*', '=')"


def test_only_triggers_combine() -> None:
    with pytest.raises(TypeError):
        Trigger("a", "b") | "c"  # type: ignore[operator]


_names = st.sampled_from(["go", "stop", "wait", "jump"])
_source = st.one_of(
    st.sampled_from([*STATES, "*"]), st.lists(st.sampled_from(STATES), min_size=1, max_size=3)
)
_dest = st.sampled_from([*STATES, "=", None])
_entries = st.lists(st.tuples(_names, _source, _dest), max_size=8)


@settings(max_examples=40, deadline=None)
@given(table=_entries, declared=_entries)
def test_declarations_mean_what_the_same_table_entries_mean(
    table: list[tuple[str, Any, Any]], declared: list[tuple[str, Any, Any]]
) -> None:
    by_name: dict[str, Trigger] = {}
    for name, source, dest in declared:
        one = Trigger(source, dest)
        by_name[name] = by_name[name] | one if name in by_name else one
    typed = define({"states": STATES, "transitions": [list(e) for e in table], **by_name})
    grouped = [e for name in by_name for e in declared if e[0] == name]
    plain = define({"states": STATES, "transitions": [list(e) for e in table + grouped]})
    assert typed.transition_table() == plain.transition_table()
    assert typed.trigger_names() == plain.trigger_names()
