"""The gateway's Prometheus metrics (one registry per process, served on /metrics)."""

from __future__ import annotations

from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from mizzen.services.mesh.xds_types import SHORT


def short(type_url: str) -> str:
    return SHORT.get(type_url, type_url.rsplit(".", 1)[-1])


class Tally:
    """A labelled Prometheus counter kept as plain numbers and read at scrape time. A push counts several
    things per response; prometheus_client's Counter takes a lock and resolves its labels on every inc()."""

    def __init__(self, name: str, documentation: str, labels: list[str], registry: CollectorRegistry):
        self.name, self.documentation, self.labels = name, documentation, labels
        self.values: defaultdict[tuple[str, ...], float] = defaultdict(float)
        registry.register(self)

    def collect(self):
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, value in list(self.values.items()):
            family.add_metric(list(key), value)
        yield family

    def describe(self):
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labels)]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # key: (type, api)
        self.pushes = Tally("mizzen_xds_pushes", "xDS responses sent", ["type", "api"], registry=r)
        # key: (type,)
        self.resources_sent = Tally("mizzen_xds_resources_sent", "resources carried by xDS responses",
                                    ["type"], registry=r)
        self.push_bytes = Tally("mizzen_xds_push_bytes", "bytes of xDS responses sent", ["type"], registry=r)
        self.push_latency = Histogram(
            "mizzen_xds_push_latency_seconds",
            "time from the gateway seeing a new snapshot (or a request) to the proxy's ACK",
            ["type"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.nacks = Counter("mizzen_xds_nacks", "NACKs received from proxies", ["type"], registry=r)
        self.acks = Tally("mizzen_xds_acks", "ACKs received from proxies", ["type"], registry=r)
        self.unauthenticated = Counter("mizzen_xds_unauthenticated",
                                       "streams on the TLS port refused for a missing or bad token", registry=r)
        self.stale_nonces = Counter("mizzen_xds_stale_nonces", "requests ignored for a stale nonce", registry=r)
        self.streams = Counter("mizzen_xds_streams", "ADS streams the gateway took (each reconnect is one more)",
                               ["api"], registry=r)
        self.connected = Gauge("mizzen_xds_connected_proxies", "streams open on this replica", ["api"], registry=r)
        self.queue_depth = Gauge("mizzen_xds_queue_depth",
                                 "proxies whose snapshot must be re-read plus streams with a push pending",
                                 registry=r)
        self.in_flight = Gauge("mizzen_xds_pushes_in_flight", "pushes holding one of the capped slots", registry=r)
        self.push_seconds = Histogram("mizzen_xds_push_seconds",
                                      "time a stream spends on one push (waiting for a slot, building, writing)",
                                      registry=r, buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.snapshot_events = Counter("mizzen_xds_snapshot_events", "snapshot events received from NATS",
                                       registry=r)
        self._children: dict[tuple, object] = {}  # see child()

    def child(self, metric, *labels: str):
        """metric.labels(*labels), remembered: labels() takes a lock and builds a key on every call, and a push
        asks for the same few children thousands of times."""
        key = (metric, labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c
