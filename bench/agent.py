"""The agent's costs: time to a first certificate, and a renewal's time until Envoy holds it.

    PYTHONPATH=$PWD python3 bench/agent.py [--issues 50] [--renewals 30]

All real, on 127.0.0.1: a certauth process (P-256 root), `AgentCore` with `CertauthSource` (the code `mizzen
agent` runs), the agent's SDS server on a unix socket, and one Envoy subscribed to `default` and `ROOTCA` (one
run over SotW `StreamSecrets`, one over delta `DeltaSecrets`). Printed:

- issue: key + CSR in the agent, `CreateCertificate` over TLS with a token, chain parsed, `default` stored
  (median / p90 / max over --issues, after one warm-up that opens the TLS channel);
- push→ACK: `AgentCore.issue()` (a full renewal) until Envoy ACKs the new `default` version on its open stream
  (median / p90 / max over --renewals), and whether the SDS stream was ever reopened.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mizzen.services.certauth import tokens  # noqa: E402
from mizzen.services.mesh import procs  # noqa: E402
from mizzen.services.sidecar import sds  # noqa: E402
from mizzen.services.sidecar.agent import AgentCore, CertauthSource, split_pem  # noqa: E402

IDENTITY = "spiffe://cluster.local/ns/bench/sa/agent"


def envoy_config(socket: Path, admin: int, delta: bool) -> dict:
    def ref(name: str) -> dict:
        return {"name": name, "sds_config": {"resource_api_version": "V3", "initial_fetch_timeout": "0s",
                                             "api_config_source": {
                                                 "api_type": "DELTA_GRPC" if delta else "GRPC",
                                                 "transport_api_version": "V3",
                                                 "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]}}}

    tls = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
    return {
        "node": {"id": "sidecar~127.0.0.1~bench.bench~bench.svc.cluster.local", "cluster": "bench.bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"clusters": [
            {"name": "sds-grpc", "type": "STATIC", "connect_timeout": "1s",
             "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                 "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                 "explicit_http_config": {"http2_protocol_options": {}}}},
             "load_assignment": {"cluster_name": "sds-grpc", "endpoints": [{"lb_endpoints": [
                 {"endpoint": {"address": {"pipe": {"path": str(socket)}}}}]}]}},
            {"name": "mtls", "type": "STATIC", "connect_timeout": "1s",
             "load_assignment": {"cluster_name": "mtls", "endpoints": [{"lb_endpoints": [
                 {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9}}}}]}]},
             "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                 "@type": tls, "common_tls_context": {
                     "tls_certificate_sds_secret_configs": [ref("default")],
                     "combined_validation_context": {"default_validation_context": {},
                                                     "validation_context_sds_secret_config": ref("ROOTCA")}}}}},
        ]},
    }


def stats(xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(0.9 * len(xs)))]
    return f"median {statistics.median(xs) * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms, max {xs[-1] * 1000:.1f} ms"


async def run(address: str, data_dir: Path, work: Path, issues: int, renewals: int) -> None:
    token = tokens.issue(data_dir, "bench", "agent")
    roots = split_pem((data_dir / "ca" / "trust-bundle.pem").read_text())
    core = AgentCore(CertauthSource(address, lambda: token, roots), IDENTITY)
    stop = asyncio.Event()
    await core.start(stop)  # warm-up: trust bundle, TLS channel, first certificate
    times = []
    for _ in range(issues):
        t0 = time.perf_counter()
        await core.issue()
        times.append(time.perf_counter() - t0)
    print(f"issue (key + CSR + CreateCertificate over TLS + push into the store), {issues}x: {stats(times)}",
          flush=True)

    for delta in (False, True):
        sock = work / f"sds-{int(delta)}.sock"
        server, servicer = await sds.serve(core.store, sock)
        admin = procs.free_port()
        cfg = work / f"envoy-{int(delta)}.json"
        cfg.write_text(json.dumps(envoy_config(sock, admin, delta)))
        envoy = procs.spawn(f"envoy-{int(delta)}", [procs.envoy_binary(), "-c", str(cfg), "--disable-hot-restart",
                                                    "--concurrency", "1", "-l", "warning",
                                                    "--base-id", str(admin)], work)
        try:
            await servicer.wait_acked("default", "ROOTCA", timeout=60)
            streams = servicer.streams
            lat = []
            for _ in range(renewals):
                t0 = time.perf_counter()
                await core.issue()
                await servicer.wait_acked("default", timeout=30)
                lat.append(time.perf_counter() - t0)
            name = "delta DeltaSecrets" if delta else "SotW StreamSecrets"
            print(f"renewal → Envoy ACK ({name}), {renewals}x: {stats(lat)}; SDS streams reopened: "
                  f"{servicer.streams - streams}", flush=True)
        finally:
            envoy.stop()
            await server.stop(0)
    from mizzen.services.certauth import client

    await client.close_all()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--issues", type=int, default=50)
    p.add_argument("--renewals", type=int, default=30)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="mizzen-bench-agent-") as tmp:
        work = Path(tmp)
        data = work / "data"
        port, http_port = procs.free_port(), procs.free_port()
        ca = procs.spawn("certauth", [sys.executable, "-m", "mizzen.services.certauth", "--data-dir", str(data),
                                      "--port", str(port), "--http-port", str(http_port), "--log-level", "warning"],
                         work, env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"))
        try:
            procs.wait_port("127.0.0.1", port, timeout=60, proc=ca.popen)
            deadline = time.monotonic() + 30
            while not (data / "ca" / "trust-bundle.pem").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            asyncio.run(run(f"127.0.0.1:{port}", data, work, args.issues, args.renewals))
        finally:
            ca.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
