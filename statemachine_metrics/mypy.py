"""A mypy plugin that teaches mypy the methods a machine class generates.

Enable it in the mypy configuration::

    [tool.mypy]
    plugins = ["statemachine_metrics.mypy"]

For each `MeteredMachine` subclass whose ``states`` and ``transitions`` are literals (lists
or tuples of strings, lists and dicts, directly or through a module-level constant), it
adds every trigger as ``async def <trigger>(self, *args: Any, **kwargs: Any) -> bool``,
``async def may_<trigger>(...) -> bool`` and ``def is_<state>(self, allow_substates:
bool = False) -> bool``, so that a misspelled trigger is an error. Triggers declared with
`Trigger` are typed by the declaration itself; the plugin adds their ``may_<trigger>``. A
subclass without ``states`` inherits what was added to its parent. Where the definition
is not a literal the plugin cannot read it, and the class answers any unknown attribute
with ``Any`` instead of reporting false errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from mypy.nodes import (
    ARG_OPT,
    ARG_POS,
    ARG_STAR,
    ARG_STAR2,
    ArgKind,
    Argument,
    AssignmentStmt,
    CallExpr,
    ClassDef,
    DictExpr,
    Expression,
    ListExpr,
    NameExpr,
    OpExpr,
    RefExpr,
    StrExpr,
    TempNode,
    TupleExpr,
    TypeInfo,
    Var,
)
from mypy.plugin import ClassDefContext, Plugin
from mypy.plugins.common import add_method_to_class
from mypy.types import AnyType, Instance, Type, TypeOfAny, UnboundType

__all__ = ["MeteredMachinePlugin", "plugin"]

MACHINE = "statemachine_metrics._machine.MeteredMachine"
TRIGGER_NAMES = frozenset(("statemachine_metrics._trigger.Trigger", "statemachine_metrics.Trigger"))
METADATA = "statemachine_metrics"
# transitions' default trigger name for add_ordered_transitions().
ORDERED_TRIGGER = "next_state"
_BOOLEANS = {"builtins.True": True, "builtins.False": False}


class _NotLiteral(Exception):
    """Raised while reading a definition that only running the program could tell."""


class _Unbound(Exception):
    """Raised while reading a name that semantic analysis has not bound yet."""


class MeteredMachinePlugin(Plugin):
    """Adds the generated trigger, ``may_<trigger>`` and ``is_<state>`` methods."""

    def get_base_class_hook(self, fullname: str) -> Callable[[ClassDefContext], None] | None:
        symbol = self.lookup_fully_qualified(fullname)
        if symbol is not None and isinstance(symbol.node, TypeInfo):
            info = symbol.node
            if info.fullname == MACHINE or info.has_base(MACHINE):
                return _add_generated_methods
        return None


def plugin(version: str) -> type[Plugin]:
    """mypy's entry point."""
    return MeteredMachinePlugin


# -- reading the class body ---------------------------------------------------------------


def _class_assignments(cls: ClassDef) -> dict[str, AssignmentStmt]:
    found: dict[str, AssignmentStmt] = {}
    for stmt in cls.defs.body:
        if isinstance(stmt, AssignmentStmt) and len(stmt.lvalues) == 1:
            target = stmt.lvalues[0]
            if isinstance(target, NameExpr):
                found[target.name] = stmt
    return found


def _resolve(expr: Expression, ctx: ClassDefContext) -> Expression:
    """Follow a name to the literal a module assigns it once (``states = STATES``)."""
    if not isinstance(expr, RefExpr):
        return expr
    if not expr.fullname:
        raise _Unbound
    if not isinstance(expr.node, Var) or expr.fullname in _BOOLEANS:
        return expr
    module_name, _, name = expr.fullname.rpartition(".")
    module = ctx.api.modules.get(module_name)
    if module is None:
        return expr
    assigned = [
        stmt.rvalue
        for stmt in module.defs
        if isinstance(stmt, AssignmentStmt)
        and any(isinstance(t, NameExpr) and t.name == name for t in stmt.lvalues)
    ]
    if len(assigned) != 1:
        raise _NotLiteral
    return assigned[0]


def _items(expr: Expression, ctx: ClassDefContext) -> list[Expression]:
    expr = _resolve(expr, ctx)
    if isinstance(expr, (ListExpr, TupleExpr)):
        return list(expr.items)
    raise _NotLiteral


def _string(expr: Expression, ctx: ClassDefContext) -> str:
    expr = _resolve(expr, ctx)
    if isinstance(expr, StrExpr):
        return expr.value
    raise _NotLiteral


def _dict(expr: Expression, ctx: ClassDefContext) -> dict[str, Expression]:
    expr = _resolve(expr, ctx)
    if not isinstance(expr, DictExpr):
        raise _NotLiteral
    entries: dict[str, Expression] = {}
    for key, value in expr.items:
        if key is None:  # **spread
            raise _NotLiteral
        entries[_string(key, ctx)] = value
    return entries


def _state_names(expr: Expression, ctx: ClassDefContext, prefix: str = "") -> Iterator[str]:
    """Every state's full name (nested ones joined with ``_``), compound states included."""
    resolved = _resolve(expr, ctx)
    if isinstance(resolved, RefExpr) and isinstance(resolved.node, TypeInfo):
        if resolved.node.is_enum:  # states given as an enum class
            yield from (prefix + member for member in resolved.node.enum_members)
            return
        raise _NotLiteral
    for entry in _items(resolved, ctx):
        if isinstance(_resolve(entry, ctx), DictExpr):
            config = _dict(entry, ctx)
            if "parallel" in config or "name" not in config:
                raise _NotLiteral
            name = prefix + _string(config["name"], ctx)
            yield name
            children = config.get("children", config.get("states"))
            if children is not None:
                yield from _state_names(children, ctx, name + "_")
        else:
            yield prefix + _string(entry, ctx)


def _state_triggers(expr: Expression, ctx: ClassDefContext) -> Iterator[str]:
    """Triggers that nested state dicts declare in their own ``transitions``."""
    resolved = _resolve(expr, ctx)
    if isinstance(resolved, RefExpr):
        return  # an enum class: no nested transitions
    for entry in _items(resolved, ctx):
        if isinstance(_resolve(entry, ctx), DictExpr):
            config = _dict(entry, ctx)
            if "transitions" in config:
                yield from _table_triggers(config["transitions"], ctx)
            children = config.get("children", config.get("states"))
            if children is not None:
                yield from _state_triggers(children, ctx)


def _table_triggers(expr: Expression, ctx: ClassDefContext) -> Iterator[str]:
    for entry in _items(expr, ctx):
        resolved = _resolve(entry, ctx)
        if isinstance(resolved, DictExpr):
            config = _dict(resolved, ctx)
            if "trigger" not in config:
                raise _NotLiteral
            yield _string(config["trigger"], ctx)
        else:
            fields = _items(resolved, ctx)
            if not fields:
                raise _NotLiteral
            yield _string(fields[0], ctx)


def _ordered_trigger(expr: Expression, ctx: ClassDefContext) -> str | None:
    resolved = _resolve(expr, ctx)
    if isinstance(resolved, NameExpr) and resolved.fullname in _BOOLEANS:
        return ORDERED_TRIGGER if _BOOLEANS[resolved.fullname] else None
    options = _dict(resolved, ctx)
    return _string(options["trigger"], ctx) if "trigger" in options else ORDERED_TRIGGER


def _flag(expr: Expression, ctx: ClassDefContext) -> bool:
    resolved = _resolve(expr, ctx)
    if isinstance(resolved, NameExpr) and resolved.fullname in _BOOLEANS:
        return _BOOLEANS[resolved.fullname]
    raise _NotLiteral


def _is_trigger_declaration(expr: Expression) -> bool:
    """``Trigger(...)``, or declarations combined with ``|``."""
    if isinstance(expr, OpExpr) and expr.op == "|":
        return _is_trigger_declaration(expr.left) and _is_trigger_declaration(expr.right)
    if isinstance(expr, CallExpr) and isinstance(expr.callee, RefExpr):
        return _names_trigger(expr.callee)
    return False


def _names_trigger(ref: RefExpr) -> bool:
    if ref.fullname:
        return ref.fullname in TRIGGER_NAMES
    return isinstance(ref, NameExpr) and ref.name == "Trigger"  # not bound yet


def _is_trigger_annotation(stmt: AssignmentStmt) -> bool:
    annotation = stmt.type if stmt.type is not None else stmt.unanalyzed_type
    if isinstance(annotation, Instance):
        return annotation.type.fullname in TRIGGER_NAMES
    if isinstance(annotation, UnboundType):
        return annotation.name.rsplit(".", 1)[-1] == "Trigger"
    return False


def _inherited_table(info: TypeInfo) -> list[str] | None:
    """The triggers of the table the class inherits (None: not a literal)."""
    for base in info.mro[1:]:
        data = base.metadata.get(METADATA)
        if data is not None:
            table = data["table"]
            return list(table) if isinstance(table, list) else None
    return []


# -- adding the methods -------------------------------------------------------------------


def _add_generated_methods(ctx: ClassDefContext) -> None:
    info = ctx.cls.info
    body = _class_assignments(ctx.cls)
    if "states" not in body:
        return  # reuses its parent's definition, and the methods added to it
    declared = [
        name
        for name, stmt in body.items()
        if not isinstance(stmt.rvalue, TempNode) and _is_trigger_declaration(stmt.rvalue)
    ]
    typed = [
        name
        for name, stmt in body.items()
        if isinstance(stmt.rvalue, TempNode) and _is_trigger_annotation(stmt)
    ]
    literal = True
    states: list[str] = []
    triggers: list[str] = []
    table: list[str] | None = []
    try:
        states_expr = body["states"].rvalue
        states = list(_state_names(states_expr, ctx))
        triggers += _state_triggers(states_expr, ctx)
        if "transitions" in body:
            table = list(_table_triggers(body["transitions"].rvalue, ctx))
        else:
            table = _inherited_table(info)
        if table is None:
            raise _NotLiteral
        triggers += table
        if "auto_transitions" in body and _flag(body["auto_transitions"].rvalue, ctx):
            triggers += [f"to_{state}" for state in states]
        if "ordered_transitions" in body:
            ordered = _ordered_trigger(body["ordered_transitions"].rvalue, ctx)
            if ordered is not None:
                triggers.append(ordered)
    except _Unbound:
        if not ctx.api.final_iteration:
            ctx.api.defer()
            return
        literal = False
        table = None
    except (_NotLiteral, KeyError):
        literal = False
        table = None
    triggers += declared
    info.metadata[METADATA] = {"table": table, "literal": literal}

    coroutine = _coroutine_of_bool(ctx)
    rest = [_argument("args", ARG_STAR), _argument("kwargs", ARG_STAR2)]
    for trigger in dict.fromkeys(triggers):
        if trigger not in declared and trigger not in typed:
            _add(ctx, trigger, rest, coroutine)
        _add(ctx, f"may_{trigger}", rest, coroutine)
    for trigger in typed:
        _add(ctx, f"may_{trigger}", rest, coroutine)
    allow = Argument(
        Var("allow_substates", ctx.api.named_type("builtins.bool")),
        ctx.api.named_type("builtins.bool"),
        None,
        ARG_OPT,
    )
    for state in dict.fromkeys(states):
        _add(ctx, f"is_{state}", [allow], ctx.api.named_type("builtins.bool"))
    fallback = info.names.get("__getattr__")
    if literal and fallback is not None and fallback.plugin_generated:
        del info.names["__getattr__"]  # added by an earlier pass that could not tell
        body_stmts = ctx.cls.defs.body
        node: object = fallback.node
        body_stmts[:] = [stmt for stmt in body_stmts if stmt is not node]
    elif not literal and info.get("__getattr__") is None:
        name = _argument("name", ARG_POS, ctx.api.named_type("builtins.str"))
        _add(ctx, "__getattr__", [name], AnyType(TypeOfAny.special_form))


def _coroutine_of_bool(ctx: ClassDefContext) -> Type:
    anything = AnyType(TypeOfAny.special_form)
    return ctx.api.named_type(
        "typing.Coroutine", [anything, anything, ctx.api.named_type("builtins.bool")]
    )


def _argument(name: str, kind: ArgKind, type_: Type | None = None) -> Argument:
    annotation = type_ if type_ is not None else AnyType(TypeOfAny.explicit)
    return Argument(Var(name, annotation), annotation, None, kind)


def _add(ctx: ClassDefContext, name: str, args: list[Argument], returns: Type) -> None:
    existing = ctx.cls.info.names.get(name)
    if existing is not None and not existing.plugin_generated:
        return  # the class's own attribute (at run time, a clash reported at class creation)
    add_method_to_class(ctx.api, ctx.cls, name, args, returns)
