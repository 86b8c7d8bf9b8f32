"""The fleet's /metrics: every replica server's own exposition, re-labelled with `replica`, plus fleet families.

Each replica reports its server's /metrics text (actors/fleet/deployments.py); this module parses each with
prometheus_client's parser, adds a `replica` label to every sample and exposes the union through one
collector, so a single scrape of the ingress shows every replica side by side (families keep their names,
types and help; a family missing on one replica is simply absent there).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

FLEET_PREFIX = "lorafleet:fleet_"


def relabel(texts: dict[str, str]) -> list[Metric]:
    """Families of every replica's exposition (replica id -> text), each sample with `replica=<id>` added.
    A text that does not parse is skipped (counted by `fleet_metrics_errors` in `FleetMetrics`)."""
    merged: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            out = merged.get(family.name)
            if out is None:
                out = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                out.add_sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)
    return list(merged.values())


class FleetMetrics(Collector):
    """Collector over the latest replica reports: `reports` is replica id -> {"metrics": text, "healthy": bool,
    "requests": int}; `expected` the configured replica count; `counters` the ingress's own counters."""

    def __init__(self) -> None:
        self.reports: dict[str, dict] = {}
        self.expected = 0
        self.counters: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        texts, errors = {}, 0
        for replica, report in self.reports.items():
            text = report.get("metrics") or ""
            try:
                list(text_string_to_metric_families(text))
            except ValueError:
                errors += 1
                continue
            texts[replica] = text
        yield from relabel(texts)
        healthy = sum(1 for r in self.reports.values() if r.get("healthy"))
        replicas = GaugeMetricFamily(FLEET_PREFIX + "replicas", "Fleet replicas by state (expected = configured).",
                                     labels=["state"])
        for state, value in (("expected", self.expected), ("reporting", len(self.reports)), ("healthy", healthy)):
            replicas.add_metric([state], value)
        yield replicas
        yield from _counters(self.counters)
        yield CounterMetricFamily(FLEET_PREFIX + "metrics_errors", "Replica expositions that did not parse.",
                                  value=errors)


def _counters(counters: dict[str, int]) -> Iterable[Metric]:
    family = CounterMetricFamily(FLEET_PREFIX + "events", "Ingress events (retries, replica failures, routes).",
                                 labels=["event"])
    for name, value in sorted(counters.items()):
        family.add_metric([name], value)
    yield family


def render(collector: FleetMetrics) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)
