"""The operator's own Prometheus metrics (`kubetune_operator_*`), on its own registry."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from kubetune_api.crd import Phase

PREFIX = "kubetune_operator"


class _JobsByPhase(Collector):
    """kubetune_operator_jobs{phase}: counted at scrape time from the operator's index."""

    def __init__(self, phases: Callable[[], Iterable[str | None]]) -> None:
        self._phases = phases

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(f"{PREFIX}_jobs", "FineTuneJobs by phase.", labels=["phase"])
        tally = Tally(phase or "Unknown" for phase in self._phases())
        for phase in [p.value for p in Phase] + ["Unknown"]:
            family.add_metric([phase], tally.get(phase, 0))
        yield family


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        reg = self.registry
        ProcessCollector(registry=reg)
        self.created = Counter(f"{PREFIX}_jobs_created", "FineTuneJobs started (first attempt "
                               "created).", registry=reg)
        self.succeeded = Counter(f"{PREFIX}_jobs_succeeded", "FineTuneJobs that succeeded.",
                                 registry=reg)
        self.failed = Counter(f"{PREFIX}_jobs_failed", "FineTuneJobs that failed, by reason.",
                              ["reason"], registry=reg)
        self.restarted = Counter(f"{PREFIX}_jobs_restarted", "Gang restarts, by reason.",
                                 ["reason"], registry=reg)
        self.reconcile_errors = Counter(f"{PREFIX}_reconcile_errors", "Reconciles that raised.",
                                        registry=reg)
        self.reconcile_duration = Histogram(
            f"{PREFIX}_reconcile_duration_seconds", "Time of one reconcile of a FineTuneJob.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=reg)
        self.time_to_running = Histogram(
            f"{PREFIX}_time_to_running_seconds", "From creation to all ranks running.",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200), registry=reg)

    def track_phases(self, phases: Callable[[], Iterable[str | None]]) -> None:
        self.registry.register(_JobsByPhase(phases))

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, registry=self.registry)
