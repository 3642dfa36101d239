"""DestinationRule rules, after Istio's `ValidateDestinationRule` and the traffic-policy checks it shares
(connection pool, outlier detection, load balancer with locality settings, client TLS)."""

from __future__ import annotations

from .common import (
    Errs,
    check_export_to,
    check_istio_labels,
    check_workload_selector,
    fqdn_error,
    ip_error,
    percent_error,
    port_error,
    wildcard_domain_error,
)
from .schema import child, duration_error, duration_nanos, index
from .virtualservice import subset_name_error

_TOPOLOGY_LABELS = ("topology.kubernetes.io/region", "topology.kubernetes.io/zone", "topology.istio.io/subzone")
_MAGLEV_MAX_TABLE = 5000011


def check_destination_rule(obj: dict, errs: Errs) -> None:
    spec = obj.get("spec", {})
    namespace = obj["metadata"]["namespace"]
    errs.add("spec.host", wildcard_domain_error(spec["host"]))
    if "trafficPolicy" in spec:
        check_traffic_policy(spec["trafficPolicy"], "spec.trafficPolicy", errs)
    seen: set[str] = set()
    for i, subset in enumerate(spec.get("subsets", [])):
        at = index("spec.subsets", i)
        name = subset.get("name", "")
        if name in seen:
            errs.add(child(at, "name"), f"duplicate subset names: {name}")
        seen.add(name)
        errs.add(child(at, "name"), subset_name_error(name))
        check_istio_labels(subset.get("labels", {}), child(at, "labels"), errs)
        if "trafficPolicy" in subset:
            check_traffic_policy(subset["trafficPolicy"], child(at, "trafficPolicy"), errs)
    selector = spec.get("workloadSelector")
    check_export_to(spec.get("exportTo", []), namespace, "spec.exportTo", errs, dr_with_selector=selector is not None)
    if selector is not None:
        check_workload_selector(selector.get("matchLabels", {}), "spec.workloadSelector.matchLabels", errs)


def _present(policy: dict, field: str) -> bool:
    # An empty list is an unset repeated field in protobuf; an empty object is a set message.
    value = policy.get(field)
    return value is not None and value != []


def check_traffic_policy(policy: dict, path: str, errs: Errs) -> None:
    if not any(_present(policy, f) for f in policy):
        errs.add(path, "traffic policy must have at least one field")
        return
    if "tunnel" in policy and "proxyProtocol" in policy:
        errs.add(path, "tunnel and proxyProtocol must not be set together")
        return
    _check_common_policy(policy, path, errs)
    for i, port_policy in enumerate(policy.get("portLevelSettings", [])):
        at = index(child(path, "portLevelSettings"), i)
        if "port" not in port_policy:
            errs.add(child(at, "port"), "portTrafficPolicy must have valid port")
        else:
            # Istio does not look at the number; a port outside 1..65535 can never match, so Mizzen rejects it.
            errs.add(child(at, "port.number"), port_error(port_policy["port"].get("number", 0)))
        if not any(f in port_policy for f in ("outlierDetection", "connectionPool", "loadBalancer", "tls")):
            errs.add(at, "port traffic policy must have at least one field")
        else:
            _check_common_policy(port_policy, at, errs)
    if "tunnel" in policy:
        _check_tunnel(policy["tunnel"], child(path, "tunnel"), errs)


def _check_common_policy(policy: dict, path: str, errs: Errs) -> None:
    if "outlierDetection" in policy:
        check_outlier_detection(policy["outlierDetection"], child(path, "outlierDetection"), errs)
    if "connectionPool" in policy:
        check_connection_pool(policy["connectionPool"], child(path, "connectionPool"), errs)
    if "loadBalancer" in policy:
        check_load_balancer(policy["loadBalancer"], policy.get("outlierDetection"), child(path, "loadBalancer"), errs)
    if "tls" in policy:
        check_client_tls(policy["tls"], child(path, "tls"), errs)


def check_outlier_detection(od: dict, path: str, errs: Errs) -> None:
    if not od.get("splitExternalLocalOriginErrors") and od.get("consecutiveLocalOriginFailures", 0) > 0:
        errs.add(child(path, "consecutiveLocalOriginFailures"),
                 "outlier detection consecutive local origin failures is specified, but split external local origin "
                 "errors is set to false")
    for field in ("maxEjectionPercent", "minHealthPercent"):
        if field in od:
            errs.add(child(path, field), percent_error(od[field]))


def check_connection_pool(pool: dict, path: str, errs: Errs) -> None:
    if "http" not in pool and "tcp" not in pool:
        errs.add(path, "connection pool must have at least one field")
        return
    http = pool.get("http")
    if http is not None:
        at = child(path, "http")
        for field, text in (
            ("http1MaxPendingRequests", "http1 max pending requests must be non-negative"),
            ("http2MaxRequests", "http2 max requests must be non-negative"),
            ("maxRequestsPerConnection", "max requests per connection must be non-negative"),
            ("maxRetries", "max retries must be non-negative"),
            ("maxConcurrentStreams", "max concurrent streams must be non-negative"),
        ):
            if http.get(field, 0) < 0:
                errs.add(child(at, field), text)
        if http.get("h2UpgradePolicy") == "UPGRADE" and http.get("useClientProtocol"):
            errs.add(child(at, "useClientProtocol"), "use client protocol must not be true when H2UpgradePolicy is UPGRADE")
        keepalive = http.get("http2KeepAlive")
        if keepalive is not None:
            for field in ("interval", "timeout"):
                if field not in keepalive:
                    errs.add(child(at, f"http2KeepAlive.{field}"), f"http2 keepalive {field} is required")
    tcp = pool.get("tcp")
    if tcp is not None:
        at = child(path, "tcp")
        if tcp.get("maxConnections", 0) < 0:
            errs.add(child(at, "maxConnections"), "max connections must be non-negative")
        if "idleTimeout" in tcp:
            # 0s disables the idle timeout; anything else must be a valid (≥1ms, ms precision) duration.
            nanos = duration_nanos(tcp["idleTimeout"])
            if nanos // 1_000_000 != 0:
                errs.add(child(at, "idleTimeout"), duration_error(nanos / 1e9))


def check_load_balancer(lb: dict, outlier: dict | None, path: str, errs: Errs) -> None:
    ch = lb.get("consistentHash")
    if ch is not None:
        at = child(path, "consistentHash")
        cookie = ch.get("httpCookie")
        if cookie is not None:
            if not cookie.get("name"):
                errs.add(child(at, "httpCookie.name"), "name required for HttpCookie")
            names: set[str] = set()
            for i, attr in enumerate(cookie.get("attributes", [])):
                ap = index(child(at, "httpCookie.attributes"), i)
                name = attr.get("name", "")
                if not name:
                    errs.add(child(ap, "name"), "cookie attribute name cannot be empty")
                elif name in names:
                    errs.add(child(ap, "name"), f"duplicate cookie attribute name: {name}")
                names.add(name)
        if ch.get("minimumRingSize", 0) != 0 and ("ringHash" in ch or "maglev" in ch):
            errs.add(at, "only one of MinimumRingSize or Maglev/Ringhash can be specified")
        maglev = ch.get("maglev")
        if maglev is not None:
            size = maglev.get("tableSize", 0)
            mp = child(at, "maglev.tableSize")
            if size == 0:
                errs.add(mp, "tableSize must be set for maglev")
            if size >= _MAGLEV_MAX_TABLE:
                errs.add(mp, f"tableSize must be less than {_MAGLEV_MAX_TABLE} for maglev")
            if not _is_prime(size):
                errs.add(mp, "tableSize must be a prime number for maglev")
    if "localityLbSetting" in lb and "zoneAwareLbSetting" in lb:
        errs.add(path, "only one of localityLbSetting and zoneAwareLbSetting can be set")
    if "localityLbSetting" in lb:
        check_locality_lb(lb["localityLbSetting"], child(path, "localityLbSetting"), errs)
    if "zoneAwareLbSetting" in lb:
        _check_zone_aware_lb(lb["zoneAwareLbSetting"], child(path, "zoneAwareLbSetting"), errs)
    warmup = lb.get("warmup")
    if warmup is not None and "aggression" in warmup and warmup["aggression"] <= 0:
        errs.add(child(path, "warmup.aggression"), "aggression should be greater than 0")


def _is_prime(x: int) -> bool:
    """Envoy's primality test for maglev table sizes."""
    if 0 < x < 4:
        return True
    if x % 2 == 0:
        return False
    f = 3
    while f * f <= x:
        if x % f == 0:
            return False
        f += 2
    return True


def check_locality_lb(lb: dict, path: str, errs: Errs) -> None:
    """Istio's `ValidateLocalityLbSetting`."""
    distribute, failover = lb.get("distribute", []), lb.get("failover", [])
    priority = lb.get("failoverPriority", [])
    if distribute and failover:
        errs.add(path, "can not simultaneously specify 'distribute' and 'failover'")
        return
    if failover and priority:
        for label in priority:
            if label in _TOPOLOGY_LABELS:
                errs.add(child(path, "failoverPriority"),
                         f"can not simultaneously set 'failover' and topology label '{label}' in 'failover_priority'")
                return
    for i, entry in enumerate(distribute):
        at = index(child(path, "distribute"), i)
        to = entry.get("to", {})
        if any(w <= 0 or w > 100 for w in to.values()):
            errs.add(child(at, "to"), "locality weight must be in range [1, 100]")
            return
        total = sum(to.values())
        if total != 100:
            errs.add(child(at, "to"), f"total locality weight {total} != 100")
            return
        errs.add(child(at, "to"), _localities_error(list(to)))
    errs.add(child(path, "distribute"), _localities_error([d.get("from", "") for d in distribute]))
    for i, fo in enumerate(failover):
        at = index(child(path, "failover"), i)
        src, dst = fo.get("from", ""), fo.get("to", "")
        if src == dst:
            errs.add(at, "locality lb failover settings must specify different regions")
        if "/" in src or "/" in dst:
            errs.add(at, "locality lb failover only specify region")
        if "*" in src or "*" in dst:
            errs.add(at, "locality lb failover region should not contain '*' wildcard")


def _check_zone_aware_lb(lb: dict, path: str, errs: Errs) -> None:
    for label in lb.get("failoverPriority", []):
        if label in _TOPOLOGY_LABELS:
            errs.add(child(path, "failoverPriority"),
                     f"'failover_priority' for zone aware lb must not use topology label '{label}'; region- and "
                     "zone-level routing are handled automatically")
    for i, fo in enumerate(lb.get("failover", [])):
        at = index(child(path, "failover"), i)
        src, dst = fo.get("from", ""), fo.get("to", "")
        if src == dst:
            errs.add(at, "zone aware lb failover settings must specify different regions")
        if "/" in src or "/" in dst:
            errs.add(at, "zone aware lb failover only specifies region; zone and subzone failover are handled "
                         "automatically")
        if "*" in src or "*" in dst:
            errs.add(at, "zone aware lb failover region should not contain '*' wildcard")


def _localities_error(localities: list[str]) -> str | None:
    """Istio's `validateLocalities`: `region[/zone[/subzone]]`, a trailing `*` at most, no overlaps."""
    tree: dict[str, dict[str, set[str]]] = {}
    for loc in localities:
        stars = loc.count("*")
        if stars and (stars > 1 or not loc.endswith("*")):
            return f"locality {loc} wildcard '*' number can not exceed 1 and must be in the end"
        overlap = f"locality {loc} overlap with previous specified ones"
        if "*" in tree:
            return overlap
        items = loc.split("/", 2)
        if any(item == "" for item in items):
            return f"locality {loc} must not contain empty region/zone/subzone info"
        region = items[0]
        if len(items) == 1:
            if region in tree:
                return overlap
            tree[region] = {"*": {"*"}}
        elif len(items) == 2:
            zones = tree.setdefault(region, {})
            if "*" in zones or items[1] in zones:
                return overlap
            zones[items[1]] = {"*"}
        else:
            zones = tree.setdefault(region, {})
            if "*" in zones:
                return overlap
            subzones = zones.setdefault(items[1], set())
            if "*" in subzones or items[2] in subzones:
                return overlap
            subzones.add(items[2])
    return None


def check_client_tls(tls: dict, path: str, errs: Errs) -> None:
    """Istio's `ValidateTLS` for a DestinationRule's ClientTLSSettings."""
    mode = tls.get("mode", "DISABLE")
    if tls.get("insecureSkipVerify"):
        if mode == "SIMPLE" and (tls.get("caCertificates") or tls.get("credentialName") or "subjectAltNames" in tls):
            errs.add(path, "cannot specify CaCertificates or CredentialName or SubjectAltNames when InsecureSkipVerify "
                           "is set true")
        if mode == "MUTUAL" and (tls.get("caCertificates") or "subjectAltNames" in tls):
            errs.add(path, "cannot specify CaCertificates or SubjectAltNames when InsecureSkipVerify is set true")
    if mode in ("SIMPLE", "MUTUAL") and tls.get("credentialName"):
        if any(tls.get(f) for f in ("clientCertificate", "caCertificates", "privateKey", "caCrl")):
            errs.add(path, "cannot specify client certificates or CA certificate or CA CRL If credentialName is set")
        return
    if mode == "MUTUAL":
        if not tls.get("clientCertificate"):
            errs.add(child(path, "clientCertificate"), "client certificate required for mutual tls")
        if not tls.get("privateKey"):
            errs.add(child(path, "privateKey"), "private key required for mutual tls")


def _check_tunnel(tunnel: dict, path: str, errs: Errs) -> None:
    protocol = tunnel.get("protocol", "")
    if protocol not in ("", "CONNECT", "POST"):
        errs.add(child(path, "protocol"), 'tunnel protocol must be "CONNECT" or "POST"')
    target = tunnel.get("targetHost", "")
    fqdn_err, ip_err = fqdn_error(target), ip_error(target)
    if fqdn_err and ip_err:
        errs.add(child(path, "targetHost"), f"tunnel target host must be valid FQDN or IP address: {fqdn_err}; {ip_err}")
    port_err = port_error(tunnel.get("targetPort", 0))
    if port_err:
        errs.add(child(path, "targetPort"), f"tunnel target port is invalid: {port_err}")
