"""Compiled attempts: a trigger's steps from one state, as one function of the machine.

`run_steps` interprets a step's plan, one operation at a time, for any arguments. A
trigger called without arguments, the usual way (``await machine.start()``), runs a
function compiled from the same plans instead, with each operation written out:

    def attempt(m):
        passed = True
        try:
            r = m.ready()
        except (TypeError, AttributeError):
            r = rescue(m, c0_1)
            if r is AGAIN:
                raise
        if r is not None and r is not True and r is not False and isawaitable(r):
            return resume_at(m, steps, 0, 1, passed, r)
        if r != True:
            passed = False
        if passed:
            ...
            return True
        return False

It calls what `run_steps` would call, in the same order, with the same results:

- a callback named after a method of the class is called as ``m.<name>()``, looked up on
  the machine at each call, as transitions does; if that raises TypeError or
  AttributeError because the name is not a method of this machine after all (a plain
  value, an attribute set since, none), `rescue` gives what `Callback.call` would;
- any other callback (a function given as such, a dotted path, a property) goes through
  `Callback.call`; (a method replaced by a property on the class after the attempt was
  compiled has its getter run twice a call: once by ``m.<name>()``, once by `rescue`);
- a callback result that is awaitable hands the rest of the transition, from that
  operation on, to `resume_at`, a `run_steps` started where the attempt stopped.

Functions of the same shape (the same callback names and operations) share one code
object, compiled on the first trigger that needs it; their source is in `linecache`, so
tracebacks show the line that ran.
"""

from __future__ import annotations

import inspect
import keyword
import linecache
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._engine import (
    _CALL,
    _CHECK,
    _COND,
    _MISSING,
    _MOVE,
    Callback,
    Step,
    _change_state,
    _move,
    _Run,
    resume_at,
)

if TYPE_CHECKING:
    from ._machine import MeteredMachine

__all__ = ["attempt_for"]

Attempt = Callable[["MeteredMachine"], "bool | _Run"]

#: What `rescue` returns when the exception came from the callback itself.
AGAIN: Any = object()

#: A factory per source text: ``make(*values) -> attempt``.
_factories: dict[str, Callable[..., Attempt]] = {}


def rescue(machine: object, callback: Callback) -> Any:
    """``m.<name>()`` raised TypeError or AttributeError (being handled): `AGAIN` if the
    name is a callable attribute of the machine, which raised it; otherwise what
    `Callback.call` gives, a plain attribute's value or the import path's result."""
    found = getattr(machine, callback.name, _MISSING)
    if found is _MISSING:
        return callback.call(machine, (), {})
    if callable(found):
        return AGAIN
    return found


def attempt_for(cls: type, steps: Sequence[Step]) -> Attempt:
    """The attempt for `steps` (those of one trigger from one state), kept on the first."""
    source, values = _source(cls, steps)
    make = _factories.get(source)
    if make is None:
        filename = f"<statemachine_metrics attempt {len(_factories)}>"
        namespace: dict[str, Any] = {}
        exec(compile(source, filename, "exec"), namespace)
        make = namespace["make"]
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        _factories[source] = make
    attempt = make(*values.values())
    steps[0].attempt = attempt
    return attempt


def _source(cls: type, steps: Sequence[Step]) -> tuple[str, dict[str, Any]]:
    """The factory's source, and the values of its parameters, in order."""
    values: dict[str, Any] = {
        "rescue": rescue,
        "AGAIN": AGAIN,
        "isawaitable": inspect.isawaitable,
        "resume_at": resume_at,
        "move": _move,
        "change_state": _change_state,
        "steps": steps,
    }
    body: list[str] = []
    for i, step in enumerate(steps):
        values[f"s{i}"] = step
        values[f"src{i}"] = step.source
        indent = "    "
        checked = any(kind is _COND for kind, _, _ in step.plan)
        if checked:
            body.append(f"{indent}passed = True")
        for k, (kind, callback, target) in enumerate(step.plan):
            if kind is _CALL or kind is _COND:
                body += _call(cls, callback, f"c{i}_{k}", values, indent)
                passed = "passed" if checked else "True"
                body.append(
                    f"{indent}if r is not None and r is not True and r is not False"
                    " and isawaitable(r):"
                )
                body.append(f"{indent}    return resume_at(m, steps, {i}, {k}, {passed}, r)")
                if kind is _COND:
                    body.append(f"{indent}if r != {target!r}:")
                    body.append(f"{indent}    passed = False")
            elif kind is _CHECK:
                body.append(f"{indent}if passed:")
                indent += "    "
            elif kind is _MOVE:
                if step.dest is None:
                    body.append(f"{indent}change_state(m, s{i}, False)")
                else:
                    body.append(f"{indent}if m._state is src{i} and m._series is not None:")
                    body.append(f"{indent}    move(m, s{i}, False)")
                    body.append(f"{indent}else:")
                    body.append(f"{indent}    change_state(m, s{i}, False)")
            # _INFO and _ENTERED tell the event data, which a trigger without
            # arguments on a class without machine-level hooks does not have.
        body.append(f"{indent}return True")
        if not checked:
            break  # the step always runs: those after it never do
    else:
        body.append("    return False")
    lines = [
        f"def make({', '.join(values)}):",
        "    def attempt(m):",
        *("    " + line for line in body),
        "    return attempt",
    ]
    return "\n".join(lines) + "\n", values


def _call(
    cls: type, callback: Callback, name: str, values: dict[str, Any], indent: str
) -> list[str]:
    """Lines that call `callback` into ``r``."""
    if callback.func is not None:
        values[name] = callback.func
        return [f"{indent}r = {name}()"]
    values[name] = callback
    if _is_method(cls, callback.name):
        return [
            f"{indent}try:",
            f"{indent}    r = m.{callback.name}()",
            f"{indent}except (TypeError, AttributeError):",
            f"{indent}    r = rescue(m, {name})",
            f"{indent}    if r is AGAIN:",
            f"{indent}        raise",
        ]
    return [f"{indent}r = {name}.call(m, (), {{}})"]


def _is_method(cls: type, name: str) -> bool:
    """Whether ``machine.<name>()`` calls what the class defines under `name`: a plain
    identifier naming a function, classmethod or staticmethod of the class."""
    if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("__"):
        return False
    for klass in cls.__mro__:
        if name in vars(klass):
            raw = vars(klass)[name]
            return inspect.isfunction(raw) or isinstance(raw, (classmethod, staticmethod))
    return False
