"""Text and OpenMetrics exposition of a registry, with machine families formatted here.

`prometheus_client` formats every sample on its own: it sorts and escapes the labels, runs
regular expressions over the names and formats the value, for each line. A machine family
knows its names, label names and states when its class is created, so everything but the
values and the machines' label values is computed once, at the first scrape, and a series
of the `Enum` is one `str.format` call. Every other collector goes through
`prometheus_client`, so the result is the bytes `prometheus_client` gives, byte for byte.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Sequence

from prometheus_client import exposition as text_exposition
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as om
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString
from prometheus_client.validation import _is_valid_legacy_metric_name

from ._collector import MachineCollector
from ._family import Family, Snapshot

__all__ = ["generate", "generate_latest"]

_UNDERSCORES = om.UNDERSCORES


def generate_latest(registry: Collector = REGISTRY, openmetrics: bool = False) -> bytes:
    """The registry's metrics in the Prometheus text format, or in OpenMetrics.

    Exactly the bytes of `prometheus_client.generate_latest(registry)` (with
    ``openmetrics=True``, of `prometheus_client.openmetrics.exposition.generate_latest`),
    in a fraction of the time for machine classes: their families are formatted here, from
    one consistent snapshot each; every other collector goes through `prometheus_client`.
    Safe to call from any thread while machines are created, transition and end.

        from statemachine_metrics import generate_latest

        body = generate_latest()  # the default registry, text format
    """
    return generate(registry, openmetrics)


def generate(
    registry: Collector,
    openmetrics: bool,
    escaping: str = _UNDERSCORES,
    version: str = "1.0.0",
) -> bytes:
    """`generate_latest` with the name escaping and OpenMetrics version of a negotiation."""
    target: Metric | None = None
    if isinstance(registry, MachineCollector):
        collectors: list[Collector] = [registry]
    elif isinstance(registry, CollectorRegistry) and (
        type(registry).collect is CollectorRegistry.collect
    ):
        # What CollectorRegistry.collect() walks, in its order.
        with registry._lock:
            collectors = list(registry._collector_to_names)
            if registry._target_info:
                target = registry._target_info_metric()
    else:
        # A restricted registry or another collector: prometheus_client formats it all.
        return _reference(registry.collect(), openmetrics, escaping, version)

    chunks: list[bytes] = []
    text: list[str] = []  # our lines since the last chunk
    others: list[Metric] = [] if target is None else [target]  # theirs, not yet formatted
    for collector in collectors:
        if type(collector) is MachineCollector:
            for family in collector._current():
                if others:
                    chunks.append(_reference(others, openmetrics, escaping, version, eof=False))
                    others = []
                _formatter(family).write(text, others, openmetrics, escaping)
                if others:  # the family needed prometheus_client after all
                    chunks.append("".join(text).encode())
                    text = []
                    chunks.append(_reference(others, openmetrics, escaping, version, eof=False))
                    others = []
            if text:
                chunks.append("".join(text).encode())
                text = []
        else:
            others.extend(collector.collect())
    if others:
        chunks.append(_reference(others, openmetrics, escaping, version, eof=False))
    if openmetrics:
        chunks.append(b"# EOF\n")
    return b"".join(chunks)


class _Metrics:
    """Metrics already collected, as a collector for prometheus_client's formatters."""

    __slots__ = ("metrics",)

    def __init__(self, metrics: Iterable[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics


def _reference(
    metrics: Iterable[Metric],
    openmetrics: bool,
    escaping: str,
    version: str,
    eof: bool = True,
) -> bytes:
    """prometheus_client's exposition of `metrics`; without the OpenMetrics ``# EOF``."""
    if not openmetrics:
        return text_exposition.generate_latest(_Metrics(metrics), escaping)
    output: bytes = om.generate_latest(_Metrics(metrics), escaping, version)
    return output if eof else output[: -len(b"# EOF\n")]


# -- values and labels ---------------------------------------------------------------------


def _gostr(value: float) -> str:
    """`floatToGoString`, without its work for the small integers counts are."""
    if type(value) is int and -(10**15) < value < 1_000_000:
        return f"{value}.0"
    return str(floatToGoString(value))


def _escape_value(value: str) -> str:
    """A label value as both formats write it."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _literal(text: str) -> str:
    """`text` inside a `str.format` template."""
    return text.replace("{", "{{").replace("}", "}}")


def _exemplar(exemplar: Exemplar) -> str:
    """An exemplar's suffix of an OpenMetrics sample line."""
    labels = ",".join(f'{k}="{_escape_value(v)}"' for k, v in sorted(exemplar.labels.items()))
    text = f" # {{{labels}}} {floatToGoString(exemplar.value)}"
    if exemplar.timestamp is not None:
        text += f" {exemplar.timestamp}"
    return text


class _Names:
    """Name escaping of one format and escaping scheme, as prometheus_client does it."""

    def __init__(self, openmetrics: bool, escaping: str) -> None:
        self.openmetrics = openmetrics
        self.escaping = escaping

    def help(self, name: str, documentation: str, kind: str) -> str:
        """The HELP and TYPE lines (``kind`` as the format names the type)."""
        metric = om.escape_metric_name(name, self.escaping)
        if self.openmetrics:
            text = om._escape(documentation, om.ALLOWUTF8, om._is_legacy_labelname_rune)
        else:
            text = documentation.replace("\\", r"\\").replace("\n", r"\n")
        return f"# HELP {metric} {text}\n# TYPE {metric} {kind}\n"

    def sample(self, name: str) -> str:
        if self.openmetrics:
            return om._escape(name, self.escaping, om._is_legacy_labelname_rune)
        return om.escape_metric_name(name, self.escaping)

    def label(self, name: str) -> str:
        return om.escape_label_name(name, self.escaping)

    def prefix(self, name: str, labels: dict[str, str]) -> str:
        """A sample line up to its value: ``name{labels} ``."""
        if not labels:
            return f"{self.sample(name)} "
        pairs = ",".join(f'{self.label(k)}="{_escape_value(v)}"' for k, v in sorted(labels.items()))
        return f"{self.sample(name)}{{{pairs}}} "


# -- one family ----------------------------------------------------------------------------


class _Histogram:
    """The static parts of one histogram series: bucket, count, sum and created prefixes."""

    __slots__ = ("buckets", "count", "created", "sum")

    def __init__(self, names: _Names, name: str, label: str, value: str, bounds: Sequence[str]):
        self.buckets = [names.prefix(f"{name}_bucket", {label: value, "le": b}) for b in bounds]
        self.count = names.prefix(f"{name}_count", {label: value})
        self.sum = names.prefix(f"{name}_sum", {label: value})
        self.created = names.prefix(f"{name}_created", {label: value})


class _Layout:
    """Everything of a family's exposition in one format that does not change."""

    def __init__(self, family: Family, openmetrics: bool, escaping: str) -> None:
        names = self.names = _Names(openmetrics, escaping)
        self.openmetrics = openmetrics
        name = family.name
        metric = family.metric
        if openmetrics:
            self.enum_help = names.help(name, metric._documentation, "stateset")
        else:
            self.enum_help = names.help(name, metric._documentation, "gauge")
        self.enum_templates = self._enum_templates(family, names)
        self.enum_single = [] if family.labelled else [t.format() for t in self.enum_templates]

        self.machines_help = names.help(family.machines_name, family.machines_help, "gauge")
        self.machines = [names.prefix(family.machines_name, {name: s}) for s in family.states]

        transitions = family.transitions_name[: -len("_total")]
        self.transitions_base = transitions
        self.transitions_help = self._counter_help(transitions, family.transitions_help)
        self.transitions_created_help = names.help(
            f"{transitions}_created", family.transitions_help, "gauge"
        )
        self.transitions: dict[tuple[str, str, str], tuple[str, str]] = {}

        duration = family.duration_name
        self.duration_help = names.help(duration, family.duration_help, "histogram")
        self.duration_created_help = names.help(
            f"{duration}_created", family.duration_help, "gauge"
        )
        self.duration = [
            _Histogram(names, duration, name, s, family.bucket_names) for s in family.states
        ]
        self.duration_summed = float(family.bucket_names[0]) >= 0

        errors = family.errors_name[: -len("_total")]
        self.errors_base = errors
        self.errors_help = self._counter_help(errors, family.errors_help)
        self.errors_created_help = names.help(f"{errors}_created", family.errors_help, "gauge")
        self.errors: dict[tuple[str, str], tuple[str, str]] = {}

        self.oldest_help = names.help(family.oldest_name, family.oldest_help, "gauge")
        self.oldest = [names.prefix(family.oldest_name, {name: s}) for s in family.states]

        latency = family.trigger_duration_name
        self.latency_help = names.help(latency, family.trigger_duration_help, "histogram")
        self.latency_created_help = names.help(
            f"{latency}_created", family.trigger_duration_help, "gauge"
        )
        self.latency = [
            _Histogram(names, latency, "trigger", t, family.trigger_bucket_names)
            for t in family.trigger_names
        ]
        self.latency_summed = float(family.trigger_bucket_names[0]) >= 0

    def _counter_help(self, base: str, documentation: str) -> str:
        if self.openmetrics:
            return self.names.help(base, documentation, "counter")
        return self.names.help(f"{base}_total", documentation, "counter")

    @staticmethod
    def _enum_templates(family: Family, names: _Names) -> list[str]:
        """Per current state, the series' lines as a format string of its label values."""
        name = family.name
        labelnames: Sequence[str] = family.metric._labelnames
        order = sorted([*labelnames, name])
        sample = _literal(names.sample(name))
        templates = []
        for current in range(len(family.states)):
            lines = []
            for i, state in enumerate(family.states):
                pairs = []
                for label in order:
                    if label == name:
                        value = _literal(_escape_value(state))
                    else:
                        value = "{" + str(labelnames.index(label)) + "}"
                    pairs.append(f'{_literal(names.label(label))}="{value}"')
                value = "1.0" if i == current else "0.0"
                lines.append(f"{sample}{{{{{','.join(pairs)}}}}} {value}\n")
            templates.append("".join(lines))
        return templates

    def transition(self, labels: tuple[str, str, str]) -> tuple[str, str]:
        prefixes = self.transitions.get(labels)
        if prefixes is None:
            values = dict(zip(("from", "to", "trigger"), labels))
            prefixes = self.transitions[labels] = (
                self.names.prefix(f"{self.transitions_base}_total", values),
                self.names.prefix(f"{self.transitions_base}_created", values),
            )
        return prefixes

    def error(self, key: tuple[str, str]) -> tuple[str, str]:
        prefixes = self.errors.get(key)
        if prefixes is None:
            values = dict(zip(("trigger", "error"), key))
            prefixes = self.errors[key] = (
                self.names.prefix(f"{self.errors_base}_total", values),
                self.names.prefix(f"{self.errors_base}_created", values),
            )
        return prefixes


class _FamilyFormat:
    """A family's layouts, one per format and escaping scheme, made at first use."""

    def __init__(self, family: Family) -> None:
        self.family = weakref.ref(family)
        self.layouts: dict[tuple[bool, str], _Layout | None] = {}

    def layout(self, family: Family, openmetrics: bool, escaping: str) -> _Layout | None:
        """None where prometheus_client writes names this module does not (quoted names)."""
        key = (openmetrics, escaping)
        try:
            return self.layouts[key]
        except KeyError:
            pass
        layout: _Layout | None = None
        if escaping != om.ALLOWUTF8 or all(
            _is_valid_legacy_metric_name(m.name) for m in family.describe()
        ):
            layout = _Layout(family, openmetrics, escaping)
        self.layouts[key] = layout
        return layout

    def write(self, out: list[str], others: list[Metric], openmetrics: bool, escaping: str) -> None:
        """Append the family's lines to `out`, or its metrics to `others` to format there."""
        family = self.family()
        assert family is not None
        layout = self.layout(family, openmetrics, escaping)
        if layout is None:
            others.extend(family.collect())
            return
        _write(out, layout, family, family.snapshot())


def _write(out: list[str], layout: _Layout, family: Family, snap: Snapshot) -> None:
    openmetrics = layout.openmetrics
    created = snap.created
    gostr = _gostr

    # The Enum: one format call per series.
    out.append(layout.enum_help)
    if family.labelled:
        templates = layout.enum_templates
        escape = _escape_value
        out.extend(
            [templates[current].format(*[escape(v) for v in key]) for key, current in snap.enum]
        )
    else:
        single = layout.enum_single
        out.extend([single[current] for _, current in snap.enum])

    out.append(layout.machines_help)
    out.extend([f"{p}{gostr(c)}\n" for p, c in zip(layout.machines, snap.counts)])

    # Transitions: a counter, its created samples inline in OpenMetrics, apart in text.
    out.append(layout.transitions_help)
    created_lines: list[str] = []
    transition = layout.transition
    for labels, value, exemplar in zip(
        family.transition_labels, snap.transitions, snap.transition_exemplars
    ):
        total, start = transition(labels)
        mark = _exemplar(exemplar) if openmetrics and exemplar is not None else ""
        out.append(f"{total}{gostr(value)}{mark}\n")
        if created is not None:
            line = f"{start}{gostr(created)}\n"
            (out if openmetrics else created_lines).append(line)
    if created_lines:
        out.append(layout.transitions_created_help)
        out.extend(created_lines)

    out.append(layout.duration_help)
    _histograms(
        out,
        layout.duration,
        snap.hist,
        snap.hist_sum,
        created,
        openmetrics,
        layout.duration_summed,
        layout.duration_created_help,
        snap.hist_exemplars,
    )

    out.append(layout.errors_help)
    created_lines = []
    for key, times, first in snap.errors:
        total, start = layout.error(key)
        out.append(f"{total}{gostr(times)}\n")
        if created:
            line = f"{start}{gostr(first)}\n"
            (out if openmetrics else created_lines).append(line)
    if created_lines:
        out.append(layout.errors_created_help)
        out.extend(created_lines)

    out.append(layout.oldest_help)
    out.extend([f"{p}{gostr(s)}\n" for p, s in zip(layout.oldest, snap.oldest)])

    out.append(layout.latency_help)
    _histograms(
        out,
        layout.latency,
        snap.trigger_hist,
        snap.trigger_sum,
        created,
        openmetrics,
        layout.latency_summed,
        layout.latency_created_help,
        None,
    )


def _histograms(
    out: list[str],
    series: list[_Histogram],
    rows: list[list[int]],
    sums: list[float],
    created: float | None,
    openmetrics: bool,
    summed: bool,
    created_help: str,
    exemplars: list[list[Exemplar | None]] | None,
) -> None:
    gostr = _gostr
    created_lines: list[str] = []
    for i, (prefixes, row, total) in enumerate(zip(series, rows, sums)):
        marks = exemplars[i] if openmetrics and exemplars is not None else None
        cumulative = 0
        for j, (prefix, count) in enumerate(zip(prefixes.buckets, row)):
            cumulative += count
            mark = marks[j] if marks is not None else None
            if mark is None:
                out.append(f"{prefix}{gostr(cumulative)}\n")
            else:
                out.append(f"{prefix}{gostr(cumulative)}{_exemplar(mark)}\n")
        if summed:
            out.append(f"{prefixes.count}{gostr(cumulative)}\n")
            out.append(f"{prefixes.sum}{gostr(total)}\n")
        if created is not None:
            line = f"{prefixes.created}{gostr(created)}\n"
            (out if openmetrics else created_lines).append(line)
    if created_lines:
        out.append(created_help)
        out.extend(created_lines)


_formats: weakref.WeakKeyDictionary[Family, _FamilyFormat] = weakref.WeakKeyDictionary()
_formats_lock = threading.Lock()


def _formatter(family: Family) -> _FamilyFormat:
    try:
        return _formats[family]
    except KeyError:
        with _formats_lock:
            made = _formats.get(family)
            if made is None:
                made = _formats[family] = _FamilyFormat(family)
            return made
