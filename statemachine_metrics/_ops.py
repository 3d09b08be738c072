"""Operations files generated from machine classes: Prometheus rules and Grafana dashboards.

A machine class knows its states, triggers, timeouts and metric names, so the files that
watch it in production can be generated rather than written by hand, in the spirit of
the Prometheus monitoring mixins:

- `check_stuck_after` validates the ``stuck_after = {state: seconds}`` class attribute
  when a class is created;
- `rule_groups` and `rules_yaml` give a Prometheus rule file: one group per machine
  class, with recording rules aggregated over instances and alerts for stuck machines,
  timers that did not fire and triggers that raise;
- `dashboard` gives a Grafana dashboard (built with ``grafana-foundation-sdk``, the
  ``grafana`` extra).

The command line (``python -m statemachine_metrics rules|dashboard``) prints them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._machine import MeteredMachine

__all__ = [
    "GRAFANA_INSTALL_HINT",
    "RuleOptions",
    "check_stuck_after",
    "dashboard",
    "dashboard_json",
    "machine_metrics",
    "rule_groups",
    "rules_yaml",
]


# -- stuck_after ---------------------------------------------------------------------------


def check_stuck_after(cls: type[MeteredMachine]) -> None:
    """Validate ``cls.stuck_after`` (``{state: seconds}``) when the class is created.

    Raises:
        TypeError: ``stuck_after`` is not a dict.
        ValueError: an unknown state, or seconds that are not a positive finite number.
    """
    owner = cls.__qualname__
    raw: object = cls.stuck_after
    if not isinstance(raw, Mapping):
        raise TypeError(f"{owner}.stuck_after must be a dict of state -> seconds, got {raw!r}")
    if not raw:
        return
    states = cls.state_names()
    for state, seconds in raw.items():
        where = f"{owner}.stuck_after[{state!r}]"
        if state not in states:
            raise ValueError(f"{where}: unknown state {state!r}; states are {', '.join(states)}")
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, Real)
            or not math.isfinite(seconds)
            or seconds <= 0
        ):
            raise ValueError(f"{where}: seconds must be a positive finite number, got {seconds!r}")


# -- what a class exports --------------------------------------------------------------------


@dataclass(frozen=True)
class MachineMetrics:
    """The metric names of one machine class, for the queries that read them."""

    owner: str  # module:qualname
    cls_name: str
    name: str  # the Enum's full name, also the state label's name
    stuck_after: Mapping[str, float]
    timeouts: Mapping[str, tuple[float, str]]

    @property
    def machines(self) -> str:
        return f"{self.name}_machines"

    @property
    def transitions(self) -> str:
        return f"{self.name}_transitions_total"

    @property
    def duration(self) -> str:
        return f"{self.name}_duration_seconds"

    @property
    def errors(self) -> str:
        return f"{self.name}_errors_total"

    @property
    def oldest(self) -> str:
        return f"{self.name}_oldest_seconds"

    @property
    def trigger_duration(self) -> str:
        return f"{self.name}_trigger_duration_seconds"

    def stay(self, selector: str, multiprocess: bool) -> str:
        """How long the longest-staying machine has been in a state: the oldest-stay gauge,
        or in multiprocess mode the age of the oldest entry timestamp."""
        if multiprocess:
            return f"(time() - {self.name}_oldest_timestamp_seconds{selector})"
        return f"{self.oldest}{selector}"

    def in_state(self, state: str) -> str:
        """A label matcher selecting one state: ``{myapp_worker_state="error"}``."""
        return f"{{{self.name}={_promql_string(state)}}}"


def machine_metrics(classes: Iterable[type[MeteredMachine]]) -> list[MachineMetrics]:
    """The metric names of each concrete class, one entry per metric family.

    Subclasses that share their parent's metrics (they declare no states) are one family:
    the first class given names it. Classes without metrics (templates, classes without
    states) are left out.
    """
    found: dict[str, MachineMetrics] = {}
    for cls in classes:
        names = cls.metric_names()
        if not names or names[0] in found:
            continue
        found[names[0]] = MachineMetrics(
            owner=f"{cls.__module__}:{cls.__qualname__}",
            cls_name=cls.__name__,
            name=names[0],
            stuck_after={state: float(s) for state, s in cls.stuck_after.items()},
            timeouts={state: (float(s), t) for state, (s, t) in cls.timeouts.items()},
        )
    return list(found.values())


# -- Prometheus rules ------------------------------------------------------------------------

_DURATION = re.compile(r"(?:[0-9]+(?:ms|[smhdwy]))+")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
#: Labels the generated alerts set themselves.
_OWN_LABELS = frozenset(("state", "trigger"))


@dataclass(frozen=True)
class RuleOptions:
    """How `rule_groups` writes its rules.

    Attributes:
        window: the range of ``rate()`` in recording rules and error alerts (a Prometheus
            duration such as ``5m``).
        for_: the ``for:`` of every alert; None (the default) sets none: each alert's
            condition already waits (the stuck limit, the timeout plus `timer_grace`, the
            rate window).
        labels: extra labels on every alert, such as ``{"severity": "page"}``.
        error_ratio: the share of a trigger's calls that raise above which
            ``<Class>Errors`` fires.
        timer_grace: seconds past a state's timeout after which ``<Class>TimeoutNotFired``
            fires.
        multiprocess: the machines run in prometheus_client's multiprocess mode, which
            exports ``<name>_oldest_timestamp_seconds`` (when the longest-staying machine
            entered each state) instead of ``<name>_oldest_seconds``: stay ages are
            computed from it with ``time()``.
    """

    window: str = "5m"
    for_: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    error_ratio: float = 0.05
    timer_grace: float = 60.0
    multiprocess: bool = False

    def __post_init__(self) -> None:
        for what, value in (("window", self.window), ("for", self.for_)):
            if value is not None and not _is_duration(value):
                raise ValueError(
                    f"{what} {value!r} is not a Prometheus duration; use a number and a "
                    "unit (ms, s, m, h, d, w, y), e.g. 5m or 1h30m"
                )
        for name, value in self.labels.items():
            if not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
                raise ValueError(
                    f"label {name!r} is not a valid label name (letters, digits and _, "
                    "not starting with a digit or __)"
                )
            if name in _OWN_LABELS:
                raise ValueError(
                    f"label {name!r} is set by the alerts themselves; "
                    f"choose a name other than {', '.join(sorted(_OWN_LABELS))}"
                )
            if not isinstance(value, str):
                raise ValueError(f"label {name!r}: expected a string value, got {value!r}")
        if not (0 < self.error_ratio <= 1):
            raise ValueError(f"error ratio must be in (0, 1], got {self.error_ratio!r}")
        if not (math.isfinite(self.timer_grace) and self.timer_grace >= 0):
            raise ValueError(f"timer grace must be a finite number >= 0, got {self.timer_grace}")


def _is_duration(value: str) -> bool:
    return bool(_DURATION.fullmatch(value)) and any(c != "0" for c in value if c.isdigit())


def _number(value: float) -> str:
    """A number as PromQL and YAML read it back exactly: 600, 1.5, 1e+16."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _human(seconds: float) -> str:
    """Seconds as a short duration for people: 90 -> 1m30s, 0.5 -> 500ms."""
    if seconds < 1:
        return f"{_number(round(seconds * 1000, 3))}ms"
    parts = []
    rest = seconds
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if rest >= size:
            count = int(rest // size)
            parts.append(f"{count}{unit}")
            rest -= count * size
    if rest or not parts:
        parts.append(f"{_number(round(rest, 3))}s")
    return "".join(parts)


def _promql_string(value: str) -> str:
    """A PromQL string literal (Go's escapes, which JSON's are a subset of)."""
    return json.dumps(value, ensure_ascii=False)


def _recording_rules(
    m: MachineMetrics, window: str, multiprocess: bool = False
) -> list[dict[str, Any]]:
    """Rates and gauges aggregated over instances: what dashboards and a federating
    Prometheus read, named level:metric:operations as Prometheus' conventions say."""
    w = window  # a duration is valid in a rule name as it is: rate5m, rate1h30m

    def summed(op: str, expr: str) -> str:
        return f"{op} without (instance) ({expr})"

    return [
        {
            "record": f"job:{m.name}_transitions:rate{w}",
            "expr": summed("sum", f"rate({m.transitions}[{window}])"),
        },
        {
            "record": f"job:{m.name}_errors:rate{w}",
            "expr": summed("sum", f"rate({m.errors}[{window}])"),
        },
        {
            "record": f"job:{m.name}_triggers:rate{w}",
            "expr": summed("sum", f"rate({m.trigger_duration}_count[{window}])"),
        },
        {"record": f"job:{m.machines}:sum", "expr": summed("sum", m.machines)},
        {"record": f"job:{m.oldest}:max", "expr": summed("max", m.stay("", multiprocess))},
        {
            "record": f"job:{m.duration}_bucket:rate{w}",
            "expr": summed("sum", f"rate({m.duration}_bucket[{window}])"),
        },
        {
            "record": f"job:{m.trigger_duration}_bucket:rate{w}",
            "expr": summed("sum", f"rate({m.trigger_duration}_bucket[{window}])"),
        },
    ]


def _alert(
    name: str,
    expr: str,
    labels: Mapping[str, str],
    summary: str,
    description: str,
    options: RuleOptions,
) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if options.for_ is not None:
        rule["for"] = options.for_
    merged = {**labels, **options.labels}
    if merged:
        rule["labels"] = merged
    rule["annotations"] = {"summary": summary, "description": description}
    return rule


def _text(value: str) -> str:
    """`value` as literal text of an annotation, which Prometheus reads as a Go template.

    The alert's own labels are not in the template's ``$labels`` (those are the series'),
    so states and triggers are written in; a ``{{`` in them must not open an action.
    """
    return value.replace("{{", '{{ "{{" }}')


def _alerts(m: MachineMetrics, options: RuleOptions) -> list[dict[str, Any]]:
    cls, where = m.cls_name, "{{ $labels.instance }}"
    alerts = []
    for state, limit in m.stuck_after.items():
        alerts.append(
            _alert(
                f"{cls}Stuck",
                f"{m.stay(m.in_state(state), options.multiprocess)} > {_number(limit)}",
                {"state": state},
                f"A {cls} machine is stuck in state {_text(state)}",
                f"A {cls} machine on {where} has been in state {_text(state)} for "
                f"{{{{ $value | humanizeDuration }}}}, longer than its limit of "
                f"{_human(limit)} ({cls}.stuck_after).",
                options,
            )
        )
    for state, (seconds, trigger) in m.timeouts.items():
        limit = seconds + options.timer_grace
        alerts.append(
            _alert(
                f"{cls}TimeoutNotFired",
                f"{m.stay(m.in_state(state), options.multiprocess)} > {_number(limit)}",
                {"state": state, "trigger": trigger},
                f"A {cls} timeout did not move a machine out of state {_text(state)}",
                f"A {cls} machine on {where} has been in state {_text(state)} for "
                f"{{{{ $value | humanizeDuration }}}}, though its timeout fires "
                f"{trigger} after {_human(seconds)}. Timers run only while the machine is "
                "entered (async with), and a trigger that raises or whose condition fails "
                "leaves the machine where it is.",
                options,
            )
        )
    window = options.window
    alerts.append(
        _alert(
            f"{cls}Errors",
            f"sum without (instance, error) (rate({m.errors}[{window}]))\n"
            f"  / sum without (instance) (rate({m.trigger_duration}_count[{window}]))\n"
            f"  > {_number(options.error_ratio)}",
            {},
            f"{cls} trigger {{{{ $labels.trigger }}}} raises",
            f"{{{{ $value | humanizePercentage }}}} of the calls of {cls} trigger "
            f"{{{{ $labels.trigger }}}} in job {{{{ $labels.job }}}} raised over the last "
            f"{window} (the limit is {_number(options.error_ratio * 100)}%); "
            f"{m.errors} has the exception classes.",
            options,
        )
    )
    return alerts


def rule_groups(
    classes: Iterable[type[MeteredMachine]], options: RuleOptions | None = None
) -> list[dict[str, Any]]:
    """Prometheus rule groups for machine classes: one group per metric family.

    Each group has recording rules aggregated over instances (``job:<metric>:rate5m``
    and the like), a ``<Class>Stuck`` alert per `stuck_after` entry, a
    ``<Class>TimeoutNotFired`` alert per state with a timeout, and a ``<Class>Errors``
    alert on the share of trigger calls that raise.
    """
    options = options or RuleOptions()
    return [
        {
            "name": m.owner,
            "rules": [
                *_recording_rules(m, options.window, options.multiprocess),
                *_alerts(m, options),
            ],
        }
        for m in machine_metrics(classes)
    ]


def rules_yaml(
    classes: Iterable[type[MeteredMachine]],
    options: RuleOptions | None = None,
    *,
    header: str = "",
) -> str:
    """`rule_groups` as a Prometheus rule file (YAML), with `header` as a comment."""
    lines = [f"# {_printable(line)}".rstrip() for line in header.splitlines()]
    lines.extend(_yaml({"groups": rule_groups(classes, options)}, 0))
    return "\n".join(lines) + "\n"


def _printable(text: str) -> str:
    """`text` with characters a YAML comment cannot hold written as Python escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


# A plain YAML scalar must not look like another type to a YAML 1.1 or 1.2 reader (Go's
# yaml.v2 and v3, PyYAML), nor hold YAML's indicators where they mean something. Anything
# starting with a digit, a sign or a dot may be a number (0x1F, 1:30, .5) and is quoted.
_YAML_WORDS = re.compile(r"y|n|yes|no|true|false|on|off|null|~", re.I)
_YAML_PLAIN = re.compile(r"[A-Za-z_($/][\x20-\x7e]*")


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return _number(value)
    if not isinstance(value, str):
        raise TypeError(f"cannot write {value!r} as YAML")
    if (
        _YAML_PLAIN.fullmatch(value)
        and not _YAML_WORDS.fullmatch(value)
        and ": " not in value
        and " #" not in value
        and not value.endswith((":", " "))
    ):
        return value
    return '"' + "".join(map(_yaml_char, value)) + '"'


_YAML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t"}


def _yaml_char(char: str) -> str:
    """One character of a double-quoted YAML scalar: as is when YAML prints it, else an
    escape (control characters, and the line breaks of YAML 1.1 such as U+2028)."""
    escaped = _YAML_ESCAPES.get(char)
    if escaped is not None:
        return escaped
    code = ord(char)
    if 0x20 <= code <= 0x7E or (0xA0 <= code <= 0xFFFD and code not in (0x2028, 0x2029, 0xFEFF)):
        return char
    if code >= 0x10000:
        return char
    return f"\\u{code:04x}"


def _yaml(value: object, indent: int) -> list[str]:
    """Block-style YAML for dicts, lists and scalars; multi-line strings as ``|-``."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            head = f"{pad}{_scalar(key)}:"
            lines.extend(_entry(head, item, indent))
    elif isinstance(value, Sequence) and not isinstance(value, str):
        for item in value:
            if isinstance(item, Mapping) and item:
                first, *rest = _yaml(item, indent + 2)
                lines.append(f"{pad}- {first[indent + 2 :]}")
                lines.extend(rest)
            else:
                lines.extend(_entry(f"{pad}-", item, indent))
    else:
        lines.append(f"{pad}{_scalar(value)}")
    return lines


def _entry(head: str, item: object, indent: int) -> list[str]:
    if isinstance(item, str) and "\n" in item and _block_safe(item):
        return [f"{head} |-", *(f"{' ' * (indent + 2)}{line}" for line in item.split("\n"))]
    if isinstance(item, (Mapping, list, tuple)) and item:
        return [head, *_yaml(item, indent + 2)]
    if isinstance(item, (Mapping, list, tuple)):
        return [f"{head} {'{}' if isinstance(item, Mapping) else '[]'}"]
    return [f"{head} {_scalar(item)}"]


def _block_safe(text: str) -> bool:
    """Whether a literal block keeps `text` exactly: printable lines, none blank or
    starting with a space (the block's indentation is taken from its first line)."""
    return all(
        line and not line[0].isspace() and line.isprintable() for line in text.split("\n")[:1]
    ) and all(line.isprintable() and line.strip() for line in text.split("\n"))


# -- Grafana dashboards ----------------------------------------------------------------------

GRAFANA_INSTALL_HINT = (
    "dashboards are built with grafana-foundation-sdk, from the grafana extra: "
    "pip install 'statemachine-metrics[grafana]' (Python 3.11 or later)"
)

#: Dashboard variables the queries use, which Grafana fills in before running them.
RATE_INTERVAL = "$__rate_interval"
INSTANCE = "$instance"
_QUANTILES = (0.5, 0.95, 0.99)


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra brings it."""


def dashboard_queries(m: MachineMetrics) -> list[tuple[str, str, str, list[tuple[str, str]]]]:
    """The panels of a class's row: (title, description, unit, [(PromQL, legend)])."""
    state = f"{{{{{m.name}}}}}"  # the legend shows the state label
    where = f'{{instance=~"{INSTANCE}"}}'

    def rate(metric: str) -> str:
        return f"rate({metric}{where}[{RATE_INTERVAL}])"

    def quantiles(metric: str, by: str, legend: str) -> list[tuple[str, str]]:
        return [
            (
                f"histogram_quantile({q}, sum by (le, {by}) ({rate(metric + '_bucket')}))",
                f"{legend} p{round(q * 100)}",
            )
            for q in _QUANTILES
        ]

    limits = ", ".join(f"{s} {_human(v)}" for s, v in m.stuck_after.items())
    return [
        (
            "Machines per state",
            f"Live machines in each state, stacked ({m.machines}).",
            "short",
            [(f"sum by ({m.name}) ({m.machines}{where})", state)],
        ),
        (
            "Transitions per second by trigger",
            f"Transitions that ran, per trigger ({m.transitions}).",
            "ops",
            [(f"sum by (trigger) ({rate(m.transitions)})", "{{trigger}}")],
        ),
        (
            "Time in state (p50, p95, p99)",
            f"Time spent in a state, observed when a machine leaves it ({m.duration}).",
            "s",
            quantiles(m.duration, m.name, state),
        ),
        (
            "Longest stay per state",
            f"How long the longest-staying live machine has been in each state ({m.oldest}). "
            "A line that only climbs is a machine that never leaves."
            + (f" Red lines mark stuck_after: {limits}." if limits else ""),
            "s",
            [(f"max by ({m.name}) ({m.oldest}{where})", state)],
        ),
        (
            "Errors per second by exception",
            f"Triggers that raised, by exception class and trigger ({m.errors}).",
            "ops",
            [(f"sum by (error, trigger) ({rate(m.errors)})", "{{error}} in {{trigger}}")],
        ),
        (
            "Trigger latency (p50, p95, p99)",
            "From a trigger's turn starting to its return, callbacks included "
            f"({m.trigger_duration}).",
            "s",
            quantiles(m.trigger_duration, "trigger", "{{trigger}}"),
        ),
    ]


def dashboard(classes: Sequence[type[MeteredMachine]], *, title: str) -> Any:
    """A Grafana dashboard for machine classes: a row of panels per metric family.

    Panels: machines per state (stacked), transitions per second by trigger, time in state
    (p50, p95, p99), the longest stay per state (with the `stuck_after` limits drawn as
    threshold lines), errors per second by exception class and trigger latency (p50, p95,
    p99). Variables: the Prometheus data source, and the instances to show.

    Returns the ``grafana-foundation-sdk`` dashboard model; `dashboard_json` gives JSON.

    Raises:
        MissingExtraError: ``grafana-foundation-sdk`` is not installed.
        ValueError: none of `classes` has metrics.
    """
    try:
        from grafana_foundation_sdk.builders import common as common_builders
        from grafana_foundation_sdk.builders import dashboard as dash
        from grafana_foundation_sdk.builders import prometheus, timeseries
        from grafana_foundation_sdk.models import common
        from grafana_foundation_sdk.models.dashboard import (
            DataSourceRef,
            DynamicConfigValue,
            VariableRefresh,
            VariableSort,
        )
    except ImportError as exc:
        raise MissingExtraError(GRAFANA_INSTALL_HINT) from exc

    families = machine_metrics(classes)
    if not families:
        raise ValueError("no machine class with metrics to show (templates have none)")
    source = DataSourceRef(type_val="prometheus", uid="${datasource}")

    # The SDK's builders return typing.Self, which a type checker of Python 3.10 code
    # reads as Any: the annotated names keep the types.
    def panel(
        title: str, description: str, unit: str, queries: list[tuple[str, str]]
    ) -> timeseries.Panel:
        built: timeseries.Panel = (
            timeseries.Panel()
            .title(title)
            .description(description)
            .datasource(source)
            .unit(unit)
            .height(8)
            .span(12)
            .legend(
                common_builders.VizLegendOptions()
                .display_mode(common.LegendDisplayMode("list"))
                .placement(common.LegendPlacement("bottom"))
                .show_legend(True)
            )
        )
        for expr, legend in queries:
            built = built.with_target(
                prometheus.Dataquery().expr(expr).legend_format(legend).range()
            )
        return built

    def threshold(limit: float) -> list[DynamicConfigValue]:
        steps = [{"color": "green", "value": None}, {"color": "red", "value": limit}]
        return [
            DynamicConfigValue(id_val="custom.thresholdsStyle", value={"mode": "line"}),
            DynamicConfigValue(id_val="thresholds", value={"mode": "absolute", "steps": steps}),
        ]

    machines = "|".join(m.machines for m in families)
    board: dash.Dashboard = (
        dash.Dashboard(title)
        .uid("sm-" + hashlib.sha256(title.encode()).hexdigest()[:16])
        .tags(["statemachine_metrics"])
        .description("Generated by python -m statemachine_metrics dashboard")
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .editable()
        .with_variable(
            dash.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(
            dash.QueryVariable("instance")
            .label("Instance")
            .datasource(source)
            .query(f'label_values({{__name__=~"{machines}"}}, instance)')
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
    )
    for m in families:
        row: dash.Row = dash.Row(f"{m.cls_name} ({m.name})")
        for title_, description, unit, queries in dashboard_queries(m):
            built = panel(title_, description, unit, queries)
            if title_ == "Machines per state":
                built = (
                    built.stacking(
                        common_builders.StackingConfig().mode(common.StackingMode("normal"))
                    )
                    .fill_opacity(40)
                    .decimals(0)
                )
            elif title_ == "Longest stay per state":
                for state, limit in m.stuck_after.items():
                    built = built.override_by_name(state, threshold(limit))
            row = row.with_panel(built)
        board = board.with_row(row)
    return board.build()


def dashboard_json(classes: Sequence[type[MeteredMachine]], *, title: str) -> str:
    """`dashboard` as the JSON that Grafana imports."""
    board = dashboard(classes, title=title)  # first: it says when the extra is missing
    from grafana_foundation_sdk.cog.encoder import JSONEncoder

    return json.dumps(board, cls=JSONEncoder, indent=2)
