"""Translation benchmark: time and peak memory to translate generated meshes of 100 / 1,000 / 5,000 services.

Each service has 2 ports (`http` 8080 and `tcp-data` 9000), 3 endpoints (Pods with version labels), and a third
of them have a DestinationRule (2 subsets, connection pool, outlier detection) and a VirtualService (a header
match to one subset, weighted split otherwise). Services spread over 3 namespaces.

For each size it measures, in one run:
  * one proxy: PushContext from the resource dicts + one sidecar snapshot;
  * full rebuild: PushContext + snapshots for 10 proxies in the 3 namespaces (shared layers built once),
    plus serialising every distinct layer once (what the translator service stores);
  * every pod: the same for a sidecar on every generated Pod (3 per service), as the translator service does;
and the memory of each: the resident-set growth of a fresh child process doing just that step and holding
its results (push context, snapshots, serialised layers); RSS, because Envoy protos live in upb's C arenas,
which tracemalloc cannot see.

`--policies` adds security policies: a mesh-wide DENY and a RequestAuthentication in the root namespace, an
ALLOW per namespace, and for every third service an ALLOW selecting its pods (principals, paths, methods, a
`when` header), so each of those workloads gets its own RBAC filters.

    python bench/translate.py [--sizes 100,1000,5000] [--no-memory] [--policies]

The collector runs as in the translator service (mesh.service.relax_gc: start-up objects frozen, young
collections every 50,000 allocations); with Python's defaults one proxy of 1,000 services spends ~20% of its
CPU in the collector.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mizzen.services.mesh.service import relax_gc  # noqa: E402
from mizzen.services.translator.proxy import Proxy  # noqa: E402
from mizzen.services.translator.push_context import PushContext  # noqa: E402
from mizzen.services.translator.snapshot import build_snapshot  # noqa: E402

NAMESPACES = ("bench-a", "bench-b", "bench-c")


def _policies(n: int) -> list[dict]:
    def ap(name: str, ns: str, spec: dict) -> dict:
        return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": name, "namespace": ns}, "spec": spec}

    out = [ap("deny-debug", "istio-system", {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/debug*"]}}]}]}),
           {"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
            "metadata": {"name": "jwt", "namespace": "istio-system"},
            "spec": {"jwtRules": [{"issuer": "https://issuer.example", "jwks": '{"keys":[]}'}]}}]
    out += [ap("same-ns", ns, {"rules": [{"from": [{"source": {"namespaces": [ns]}}]}]}) for ns in NAMESPACES]
    for i in range(0, n, 3):
        ns = NAMESPACES[i % len(NAMESPACES)]
        out.append(ap(f"svc-{i}", ns, {"selector": {"matchLabels": {"app": f"svc-{i}"}}, "rules": [{
            "from": [{"source": {"principals": [f"cluster.local/ns/{ns}/sa/svc-{i + 1}"]}}],
            "to": [{"operation": {"methods": ["GET", "POST"], "paths": ["/api/*"]}}],
            "when": [{"key": "request.headers[x-tenant]", "values": ["a", "b"]}]}]}))
    return out


def generate(n: int, policies: bool = False) -> list[dict]:
    objs: list[dict] = _policies(n) if policies else []
    for ns in NAMESPACES:
        objs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    for i in range(n):
        ns = NAMESPACES[i % len(NAMESPACES)]
        name = f"svc-{i}"
        ts = f"2024-01-01T{(i // 3600) % 24:02d}:{(i // 60) % 60:02d}:{i % 60:02d}Z"
        vip = f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"
        objs.append({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": name, "namespace": ns, "creationTimestamp": ts},
                     "spec": {"clusterIP": vip, "selector": {"app": name},
                              "ports": [{"name": "http", "port": 8080, "targetPort": 8080},
                                        {"name": "tcp-data", "port": 9000, "targetPort": 9000}]}})
        addresses = []
        for j in range(3):
            pod = f"{name}-{j}"
            ip = f"172.{16 + (i * 3 + j) // 65536}.{((i * 3 + j) // 256) % 256}.{(i * 3 + j) % 256}"
            objs.append({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": pod, "namespace": ns,
                                      "labels": {"app": name, "version": f"v{j + 1}",
                                                 "security.istio.io/tlsMode": "istio"}},
                         "spec": {"serviceAccountName": name}, "status": {"podIP": ip}})
            addresses.append({"ip": ip, "targetRef": {"kind": "Pod", "name": pod, "namespace": ns}})
        objs.append({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": name, "namespace": ns},
                     "subsets": [{"addresses": addresses,
                                  "ports": [{"name": "http", "port": 8080}, {"name": "tcp-data", "port": 9000}]}]})
        if i % 3 == 0:
            objs.append({"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule",
                         "metadata": {"name": name, "namespace": ns, "creationTimestamp": ts},
                         "spec": {"host": name,
                                  "trafficPolicy": {"connectionPool": {"http": {"http2MaxRequests": 100}},
                                                    "outlierDetection": {"consecutive5xxErrors": 5,
                                                                         "interval": "10s"}},
                                  "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                              {"name": "v2", "labels": {"version": "v2"}}]}})
            objs.append({"apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService",
                         "metadata": {"name": name, "namespace": ns, "creationTimestamp": ts},
                         "spec": {"hosts": [name], "http": [
                             {"match": [{"headers": {"x-canary": {"exact": "1"}}}],
                              "route": [{"destination": {"host": name, "subset": "v2"}}]},
                             {"route": [{"destination": {"host": name, "subset": "v1"}, "weight": 90},
                                        {"destination": {"host": name, "subset": "v2"}, "weight": 10}],
                              "timeout": "5s", "retries": {"attempts": 3, "perTryTimeout": "1s"}}]}})
    return objs


def proxies_for(n: int, count: int) -> list[str]:
    out = []
    for k in range(count):
        i = k % max(n, 1)
        ns = NAMESPACES[i % len(NAMESPACES)]
        j = k // max(n, 1) % 3
        ip = f"172.{16 + (i * 3 + j) // 65536}.{((i * 3 + j) // 256) % 256}.{(i * 3 + j) % 256}"
        out.append(f"sidecar~{ip}~svc-{i}-{j}.{ns}~{ns}.svc.cluster.local")
    return out


def one_proxy(objs: list[dict], node_id: str):
    push = PushContext.from_resources(objs)
    snap = build_snapshot(push, Proxy.from_node_id(node_id, push))
    return push, snap


def full_rebuild(objs: list[dict], node_ids: list[str], keep: list | None = None) -> tuple[int, int]:
    push = PushContext.from_resources(objs)
    seen: dict[int, dict] = {}
    resources = 0
    for node_id in node_ids:
        snap = build_snapshot(push, Proxy.from_node_id(node_id, push))
        for layer in snap.layers:
            if id(layer) not in seen:
                seen[id(layer)] = {t: {n: m.SerializeToString(deterministic=True) for n, m in res.items()}
                                   for t, res in layer.items()}
                resources += sum(len(r) for r in layer.values())
    if keep is not None:
        keep.extend([push, seen])
    return len(seen), resources


def all_pod_ids(n: int) -> list[str]:
    return proxies_for(n, 3 * n)  # a sidecar on every Pod


def timed(fn, *args):
    """(CPU seconds, result): CPU time, so other load on a shared machine does not skew the figure."""
    gc.collect()
    t0 = time.process_time()
    out = fn(*args)
    return time.process_time() - t0, out


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(n: int, mode: str, proxies: int, policies: bool = False) -> None:
    """Run one step in this (fresh) process and print the RSS growth it caused."""
    relax_gc()
    objs = generate(n, policies)
    node_ids = proxies_for(n, proxies)
    gc.collect()
    before = _rss_mib()
    keep: list = []
    if mode == "one":
        keep.append(one_proxy(objs, node_ids[0]))
    else:
        full_rebuild(objs, node_ids, keep)
    print(f"{_rss_mib() - before:.1f}")


def peak_mib(n: int, mode: str, proxies: int, policies: bool = False) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", f"{n}:{mode}", "--proxies", str(proxies),
                          *(["--policies"] if policies else [])],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1000,5000")
    ap.add_argument("--proxies", type=int, default=10)
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    ap.add_argument("--policies", action="store_true", help="add AuthorizationPolicies and a RequestAuthentication")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        n, mode = args.child.split(":")
        _child(int(n), mode, args.proxies, args.policies)
        return 0
    relax_gc()  # as the translator service runs
    sizes = [int(s) for s in args.sizes.split(",") if s]
    print(f"{'services':>8} {'resources in':>12} {'1 proxy s':>10} {'full s':>8} {'layers':>6} {'resources':>9}"
          f" {'1 proxy MiB':>11} {'full MiB':>9} {'every pod s':>11} {'pods':>6} {'layers':>6}")
    for n in sizes:
        objs = generate(n, args.policies)
        node_ids = proxies_for(n, args.proxies)
        t1, (push, snap) = timed(one_proxy, objs, node_ids[0])
        del push, snap
        tf, (layers, resources) = timed(full_rebuild, objs, node_ids)
        pods = all_pod_ids(n)
        tp, (pod_layers, _) = timed(full_rebuild, objs, pods)
        m1 = mf = float("nan")
        if not args.no_memory:
            m1 = peak_mib(n, "one", args.proxies, args.policies)
            mf = peak_mib(n, "full", args.proxies, args.policies)
        print(f"{n:>8} {len(objs):>12} {t1:>10.3f} {tf:>8.3f} {layers:>6} {resources:>9} {m1:>11.1f} {mf:>9.1f}"
              f" {tp:>11.3f} {len(pods):>6} {pod_layers:>6}", flush=True)
    print(f"(seconds are CPU time; one proxy = PushContext + 1 snapshot; full = PushContext + {args.proxies} snapshots in "
          f"{len(NAMESPACES)} namespaces + serialising each distinct layer once; MiB = RSS growth holding the results; "
          f"python {sys.version.split()[0]}, one core)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
