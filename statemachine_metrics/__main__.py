"""The command line: ``python -m statemachine_metrics list|diagram|rules|dashboard ...``.

    python -m statemachine_metrics list myapp.workers
    python -m statemachine_metrics diagram myapp.workers:Worker > worker.mmd
    python -m statemachine_metrics rules myapp.workers --label severity=page > rules.yml
    python -m statemachine_metrics dashboard myapp.workers > dashboard.json

Modules are imported as ``python -m`` would import them, with the current directory
first on the module search path. Errors go to stderr with exit status 2, as for any
other wrong argument.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from collections.abc import Sequence
from types import ModuleType

from . import _ops
from ._machine import MeteredMachine

__all__ = ["main"]

_DESCRIPTION = (
    "Inspect the MeteredMachine classes of a module; generate Prometheus rules and "
    "Grafana dashboards for them."
)
_EPILOG = """\
examples:
  python -m statemachine_metrics list myapp.workers
  python -m statemachine_metrics diagram myapp.workers:Worker
  python -m statemachine_metrics diagram myapp.workers:Worker --counts
  python -m statemachine_metrics rules myapp.workers --label severity=page > rules.yml
  python -m statemachine_metrics dashboard myapp.workers:Worker > worker.json

list, rules and dashboard exit with status 1 when the module defines no machine class.
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
    rules = commands.add_parser(
        "rules",
        help="print a Prometheus rule file for the machine classes of a module (or one)",
        description="Print a Prometheus rule file (YAML) with one group per machine class: "
        "recording rules aggregated over instances, a <Class>Stuck alert per stuck_after "
        "entry, a <Class>TimeoutNotFired alert per state timeout and a <Class>Errors alert "
        "on the share of trigger calls that raise.",
    )
    _target_argument(rules)
    rules.add_argument(
        "--for",
        dest="for_",
        metavar="DURATION",
        help="the for: of every alert, e.g. 5m (default: none; each alert's condition "
        "already waits)",
    )
    rules.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a label for every alert, e.g. severity=page (repeat for more)",
    )
    rules.add_argument(
        "--window",
        default="5m",
        metavar="DURATION",
        help="the range of rate() in recording rules and error alerts (default: 5m)",
    )
    rules.add_argument(
        "--error-ratio",
        type=float,
        default=0.05,
        metavar="RATIO",
        help="the share of a trigger's calls that may raise before <Class>Errors fires "
        "(default: 0.05)",
    )
    rules.add_argument(
        "--multiprocess",
        action="store_true",
        help="the machines run in prometheus_client's multiprocess mode: stay ages come "
        "from <name>_oldest_timestamp_seconds",
    )
    rules.add_argument(
        "--timer-grace",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="seconds past a state's timeout before <Class>TimeoutNotFired fires (default: 60)",
    )
    dashboard = commands.add_parser(
        "dashboard",
        help="print a Grafana dashboard (JSON) for the machine classes of a module (or one)",
        description="Print a Grafana dashboard (JSON, to import into Grafana) with a row "
        "of panels per machine class: machines per state, transitions per second, time in "
        "state, the longest stay per state, errors and trigger latency. Needs the grafana "
        "extra: pip install 'statemachine-metrics[grafana]'.",
    )
    _target_argument(dashboard)
    dashboard.add_argument(
        "--title", help="the dashboard's title (default: the module or class name)"
    )
    return parser, {"list": listing, "diagram": diagram, "rules": rules, "dashboard": dashboard}


def _target_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        metavar="MODULE[:CLASS]",
        help="a module, for all its machine classes (e.g. myapp.workers), or one class "
        "(e.g. myapp.workers:Worker)",
    )


def _suggestion(name: str) -> str | None:
    """The module name a file name or path most likely means: worker.py -> worker."""
    stem = name.removesuffix(".py")
    parts = [p for p in stem.replace("\\", "/").split("/") if p not in ("", ".")]
    guess = ".".join(parts)
    if guess and guess != name and all(part.isidentifier() for part in parts):
        return guess
    return None


def _import(parser: argparse.ArgumentParser, name: str) -> ModuleType:
    if name.endswith(".py") or "/" in name or "\\" in name:
        guess = _suggestion(name)
        hint = f"; did you mean {guess!r}?" if guess else " (give a module name, not a file)"
        parser.error(f"no module named {name!r}{hint}")
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
            names = [cls.__qualname__ for cls in _defined_in(module)]
            known = (
                f"its machine classes are {', '.join(names)}"
                if names
                else "it defines no machine class"
            )
            parser.error(f"module {module_name!r} has no attribute {class_path!r}; {known}")
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


def _targets(
    parser: argparse.ArgumentParser, target: str
) -> tuple[str, list[type[MeteredMachine]]] | None:
    """The name and the machine classes with metrics that MODULE[:CLASS] means; None
    (after a message on stderr) for a module that defines none."""
    if ":" in target:
        cls = _machine_class(parser, target)
        if cls._family is None:
            parser.error(
                f"{target} is abstract (a template): it has no metrics of its own; "
                "name a concrete subclass"
            )
        return target, [cls]
    module = _import(parser, target)
    classes = [cls for cls in _defined_in(module) if cls._family is not None]
    if not classes:
        print(f"{module.__name__} defines no machine class with metrics", file=sys.stderr)
        return None
    return module.__name__, classes


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


def _rule_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> _ops.RuleOptions:
    labels: dict[str, str] = {}
    for given in args.label:
        name, equals, value = given.partition("=")
        if not equals or not name:
            parser.error(f"--label expects NAME=VALUE, e.g. severity=page; got {given!r}")
        labels[name] = value
    try:
        return _ops.RuleOptions(
            window=args.window,
            for_=args.for_,
            labels=labels,
            error_ratio=args.error_ratio,
            timer_grace=args.timer_grace,
            multiprocess=args.multiprocess,
        )
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with `argv` (default: ``sys.argv[1:]``); return the exit status.

    Wrong arguments, a module that cannot be imported and a class that is not a machine
    class print a message to stderr and raise ``SystemExit(2)``, as argparse does.
    """
    parser, commands = _parser()
    given = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(given)
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
    if args.command == "diagram":
        cls = _machine_class(parser, args.target)
        try:
            print(cls.mermaid(counts=args.counts))
        except TypeError as exc:
            parser.error(str(exc))
        return 0
    if args.command == "rules":
        options = _rule_options(parser, args)
        found = _targets(parser, args.target)
        if found is None:
            return 1
        name, classes = found
        header = (
            f"Prometheus rules for the machine classes of {name}, generated by\n"
            f"python -m statemachine_metrics {shlex.join(given)}"
        )
        print(_ops.rules_yaml(classes, options, header=header), end="")
        return 0
    found = _targets(parser, args.target)
    if found is None:
        return 1
    name, classes = found
    try:
        print(_ops.dashboard_json(classes, title=args.title or f"{name} machines"))
    except _ops.MissingExtraError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
