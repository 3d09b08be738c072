"""The command line: ``python -m statemachine_metrics list|diagram ...``.

    python -m statemachine_metrics list myapp.workers
    python -m statemachine_metrics diagram myapp.workers:Worker > worker.mmd

Modules are imported as ``python -m`` would import them, with the current directory
first on the module search path. Errors go to stderr with exit status 2, as for any
other wrong argument.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from ._machine import MeteredMachine

__all__ = ["main"]

_DESCRIPTION = "Inspect the MeteredMachine classes of a module."
_EPILOG = """\
examples:
  python -m statemachine_metrics list myapp.workers
  python -m statemachine_metrics diagram myapp.workers:Worker
  python -m statemachine_metrics diagram myapp.workers:Worker --counts

list exits with status 1 when the module defines no machine class.
"""


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="python -m statemachine_metrics",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    listing = commands.add_parser(
        "list",
        help="print each machine class a module defines: states, triggers, metric names",
        description="Print each machine class MODULE defines, with its states, triggers "
        "and metric names. Abstract classes (templates) are marked.",
    )
    listing.add_argument("module", metavar="MODULE", help="a module name, e.g. myapp.workers")
    diagram = commands.add_parser(
        "diagram",
        help="print a machine class as a Mermaid state diagram",
        description="Print CLASS.mermaid(): the machine as a Mermaid stateDiagram-v2.",
    )
    diagram.add_argument(
        "target", metavar="MODULE:CLASS", help="e.g. myapp.workers:Worker (CLASS may be dotted)"
    )
    diagram.add_argument(
        "--counts",
        action="store_true",
        help="show in each state how many live machines are in it (those the module's "
        "import created: in a fresh process, usually none)",
    )
    return parser, {"list": listing, "diagram": diagram}


def _import(parser: argparse.ArgumentParser, name: str) -> ModuleType:
    if not name or not all(part.isidentifier() for part in name.split(".")):
        parser.error(f"{name!r} is not a module name (expected something like myapp.workers)")
    # What `python -m` and `python -c` do: modules in the current directory come first.
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(f"{exc.name}.")):
            parser.error(f"no module named {exc.name!r} (importing {name!r})")
        parser.error(f"importing {name!r} failed: {type(exc).__name__}: {exc}")
    except SyntaxError as exc:
        parser.error(f"importing {name!r} failed: {exc.filename}:{exc.lineno}: {exc.msg}")
    except Exception as exc:
        parser.error(f"importing {name!r} failed: {type(exc).__name__}: {exc}")


def _machine_class(parser: argparse.ArgumentParser, target: str) -> type[MeteredMachine]:
    module_name, colon, class_path = target.partition(":")
    if not colon or not module_name or not class_path:
        parser.error(f"expected MODULE:CLASS, e.g. myapp.workers:Worker; got {target!r}")
    module = _import(parser, module_name)
    found: object = module
    for part in class_path.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            parser.error(f"module {module_name!r} has no attribute {class_path!r}")
    if not isinstance(found, type):
        kind = type(found).__name__
        parser.error(f"{target} is not a class but a {kind}; expected a MeteredMachine class")
    if not issubclass(found, MeteredMachine):
        parser.error(f"{target} is a class, but not a MeteredMachine subclass")
    if found._definition is None:
        parser.error(f"{target} declares no states: it has no machine to draw")
    return found


def _defined_in(module: ModuleType) -> list[type[MeteredMachine]]:
    """The machine classes with states that `module` itself defines, in definition order."""
    classes: dict[int, type[MeteredMachine]] = {}
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and issubclass(value, MeteredMachine)
            and value.__module__ == module.__name__
            and value._definition is not None
        ):
            classes.setdefault(id(value), value)
    return list(classes.values())


def _describe(cls: type[MeteredMachine]) -> list[str]:
    abstract = cls._family is None
    states = [
        f"{name} (initial)" if name == cls.initial_state() else name for name in cls.state_names()
    ]
    heading = f"{cls.__module__}:{cls.__qualname__}"
    lines = [f"{heading} (abstract)" if abstract else heading]
    lines.append(f"  states:   {', '.join(states)}")
    lines.append(f"  triggers: {', '.join(cls.trigger_names()) or '(none)'}")
    if abstract:
        lines.append("  metrics:  (none: each concrete subclass gets its own)")
    else:
        labelnames = cls.metric._labelnames
        names = list(cls.metric_names())
        if labelnames:
            names[0] += f" (labels: {', '.join(labelnames)})"
        lines.append(f"  metrics:  {names[0]}")
        lines.extend(f"            {name}" for name in names[1:])
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with `argv` (default: ``sys.argv[1:]``); return the exit status.

    Wrong arguments, a module that cannot be imported and a class that is not a machine
    class print a message to stderr and raise ``SystemExit(2)``, as argparse does.
    """
    parser, commands = _parser()
    args = parser.parse_args(argv)
    parser = commands[args.command]  # errors show the command's own usage
    if args.command == "list":
        module = _import(parser, args.module)
        classes = _defined_in(module)
        if not classes:
            print(f"{module.__name__} defines no machine class", file=sys.stderr)
            return 1
        blocks = ["\n".join(_describe(cls)) for cls in classes]
        print("\n\n".join(blocks))
        return 0
    cls = _machine_class(parser, args.target)
    try:
        print(cls.mermaid(counts=args.counts))
    except TypeError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
