"""certauth throughput: CSR signings per second per core over gRPC/TLS, the raw `cryptography` floor, and the
time for N agents to get their first certificate.

    PYTHONPATH=$PWD python3 bench/ca.py [--seconds 8] [--clients 2] [--concurrency 64] [--agents 1000]

What runs (all real processes on 127.0.0.1):
- floor: in this process, the CA core alone (CSR parse + signature check + leaf build + sign) and the leaf
  build + sign only, for a P-256 and an RSA-2048 CA.
- gRPC: one certauth process per CA key type; `--clients` load processes keep `--concurrency` calls in flight
  each on one TLS channel, with real CSRs and tokens (one token per load process: a renewing agent reuses its
  token, certauth caches verified tokens). Server CPU seconds come from /proc/<pid>/stat, so
  signings/s per core = signed / server CPU seconds, independent of the client processes sharing the machine.
- agents: `--agents` concurrent agents split over `--clients` processes, each with its own key (made inside the
  timed part), CSR, token and TLS connection, all released at once; time until the last has its certificate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mizzen.services.certauth import ca, csr, tokens  # noqa: E402
from mizzen.services.certauth.client import CertAuthClient  # noqa: E402
from mizzen.services.mesh import procs  # noqa: E402

ID = "spiffe://cluster.local/ns/bench/sa/load"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


# ---- the floor: the CA core in this process ------------------------------------------------------------------

def floor(key_type: str, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        ca.ensure_self_signed(d, key_type=key_type)
        a = ca.load_self_signed(d)
    pool = [csr.new_key_and_csr(ID).csr_pem for _ in range(64)]
    pub = [ca.parse_csr(p).public_key() for p in pool]
    out = {}
    for name, fn in (("sign_csr", lambda i: a.sign_csr(pool[i & 63], ID)),
                     ("leaf_only", lambda i: a.issue(pub[i & 63], uris=[ID], ttl=86400))):
        n, t0 = 0, time.perf_counter()
        c0 = time.process_time()
        while time.perf_counter() - t0 < seconds:
            for _ in range(50):
                fn(n)
                n += 1
        out[name] = n / (time.process_time() - c0)
    return out


# ---- workers (run as subprocesses) ----------------------------------------------------------------------------

async def load_worker(address: str, roots: str, token: str, seconds: float, concurrency: int) -> dict:
    pool = [csr.new_key_and_csr(ID).csr_pem for _ in range(256)]
    done = 0
    errors = 0
    async with CertAuthClient(address, root_certs_pem=roots) as c:
        await c.trust_bundle()  # connected before the clock starts
        end = time.perf_counter() + seconds

        async def loop(i: int) -> None:
            nonlocal done, errors
            while time.perf_counter() < end:
                try:
                    await c.create_certificate(csr_pem=pool[(done + i) & 255], token=token)
                    done += 1
                except Exception:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(loop(i) for i in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"signed": done, "errors": errors, "wall": wall}


async def agents_worker(address: str, roots: str, data_dir: str, n: int, start_at: float, offset: int) -> dict:
    key = tokens.ensure_key(data_dir)
    toks = [tokens.issue(key, "bench", f"agent-{offset + i}", 3600) for i in range(n)]
    clients = [CertAuthClient(address, root_certs_pem=roots) for _ in range(n)]
    times: list[float] = []
    errors: list[str] = []
    await asyncio.sleep(max(0.0, start_at - time.time()))
    t0 = time.time()

    async def agent(i: int) -> None:
        k = csr.new_key_and_csr(f"spiffe://cluster.local/ns/bench/sa/agent-{offset + i}")
        try:
            chain = await clients[i].create_certificate(csr_pem=k.csr_pem, token=toks[i], timeout=120)
            assert len(chain) == 2
            times.append(time.time() - start_at)
        except Exception as e:
            errors.append(repr(e)[:200])

    await asyncio.gather(*(agent(i) for i in range(n)))
    end = time.time()
    for c in clients:
        await c.close()
    return {"times": times, "errors": errors[:5], "n_errors": len(errors), "late_start": t0 - start_at,
            "end": end}


async def echo_server(data_dir: str, port: int) -> None:
    """The same RPC over the same TLS, answering a fixed chain without checking or signing anything: what
    grpc.aio itself costs per call (the floor under certauth's gRPC figure)."""
    import grpc
    from prometheus_client import CollectorRegistry

    from mizzen.services.certauth.proto_gen import ca_pb2
    from mizzen.services.certauth.server import CA_SERVICE, CertAuth, Options

    svc = CertAuth(Options(data_dir=Path(data_dir), port=port), CollectorRegistry())
    fixed = ca_pb2.IstioCertificateResponse(cert_chain=svc.authority.sign_csr(
        csr.new_key_and_csr(ID).csr_pem, ID))

    async def create(_request, _context):
        return fixed

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(CA_SERVICE, {
        "CreateCertificate": grpc.unary_unary_rpc_method_handler(
            create, request_deserializer=ca_pb2.IstioCertificateRequest.FromString,
            response_serializer=ca_pb2.IstioCertificateResponse.SerializeToString)})] + svc.handlers()[1:])
    server.add_secure_port(f"127.0.0.1:{port}", svc.credentials())
    await server.start()
    await server.wait_for_termination()


def worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("load", "agents", "echo"))
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--address")
    p.add_argument("--roots")
    p.add_argument("--data-dir")
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--start-at", type=float, default=0)
    a = p.parse_args(argv)
    if a.mode == "echo":
        asyncio.run(echo_server(a.data_dir, a.port))
        return
    roots = Path(a.roots).read_text()
    if a.mode == "load":
        token = tokens.issue(a.data_dir, "bench", "load", 3600)
        res = asyncio.run(load_worker(a.address, roots, token, a.seconds, a.concurrency))
    else:
        res = asyncio.run(agents_worker(a.address, roots, a.data_dir, a.n, a.start_at, a.offset))
    print(json.dumps(res), flush=True)


# ---- orchestration --------------------------------------------------------------------------------------------

def start_certauth(data_dir: Path, log_dir: Path, key_type: str) -> tuple[procs.Proc, str, int]:
    port, http_port = procs.free_port(), procs.free_port()
    p = procs.spawn(f"certauth-{key_type}", [sys.executable, "-m", "mizzen.services.certauth", "--data-dir",
                                             str(data_dir), "--port", str(port), "--http-port", str(http_port),
                                             "--root-key-type", key_type, "--log-level", "warning"], log_dir,
                    env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"))
    procs.wait_port("127.0.0.1", http_port, timeout=60, proc=p.popen)
    procs.wait_port("127.0.0.1", port, timeout=60, proc=p.popen)
    return p, f"127.0.0.1:{port}", http_port


def run_workers(args_list: list[list[str]], timeout: float) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ps = [subprocess.Popen([sys.executable, __file__, "--worker", *a], stdout=subprocess.PIPE, env=env, text=True)
          for a in args_list]
    out = []
    try:
        for p in ps:
            stdout, _ = p.communicate(timeout=timeout)
            out.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in ps:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def grpc_throughput(key_type: str, work: Path, args, echo: bool = False) -> dict:
    data = work / f"data-{key_type}"
    p, address, _http = start_certauth(data, work / "logs", key_type)
    if echo:  # the CA files exist now; the no-op server replaces certauth on the same data dir
        p.stop()
        port = procs.free_port()
        p = procs.spawn("echo", [sys.executable, __file__, "--worker", "echo", "--data-dir", str(data),
                                 "--port", str(port)], work / "logs", env=dict(os.environ, PYTHONPATH=str(ROOT)))
        procs.wait_port("127.0.0.1", port, timeout=60, proc=p.popen)
        address = f"127.0.0.1:{port}"
    try:
        roots = data / "ca" / "trust-bundle.pem"
        common = ["--address", address, "--roots", str(roots), "--data-dir", str(data)]
        # warm-up (connections, caches), then the measured run with server CPU read around it
        run_workers([["load", *common, "--seconds", "1", "--concurrency", str(args.concurrency)]], 120)
        c0, t0 = cpu_seconds(p.pid), time.perf_counter()
        res = run_workers([["load", *common, "--seconds", str(args.seconds), "--concurrency", str(args.concurrency)]
                           for _ in range(args.clients)], args.seconds + 120)
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(p.pid) - c0
        signed = sum(r["signed"] for r in res)
        errors = sum(r["errors"] for r in res)
        out = {"signed": signed, "errors": errors, "server_cpu": cpu, "per_core": signed / cpu if cpu else 0.0,
               "wall_rate": signed / max(r["wall"] for r in res), "wall": wall}
        if key_type == "ec" and args.agents and not echo:
            out["agents"] = agents(address, roots, data, args)
        return out
    finally:
        p.stop()


def agents(address: str, roots: Path, data: Path, args) -> dict:
    per = [args.agents // args.clients + (1 if i < args.agents % args.clients else 0) for i in range(args.clients)]
    # time for the workers to import, make tokens and open channels (a few agents need less)
    start_at = time.time() + (3.0 if args.agents <= 100 else 8.0)
    offsets = [sum(per[:i]) for i in range(len(per))]
    res = run_workers([["agents", "--address", address, "--roots", str(roots), "--data-dir", str(data),
                        "--n", str(n), "--offset", str(off), "--start-at", str(start_at)]
                       for n, off in zip(per, offsets, strict=True)], 300)
    times = sorted(t for r in res for t in r["times"])
    return {"n": len(times), "errors": sum(r["n_errors"] for r in res), "error_samples": [e for r in res
                                                                                          for e in r["errors"]],
            "all_done": max(times) if times else float("nan"),
            "p50": statistics.median(times) if times else float("nan"),
            "p99": times[int(len(times) * 0.99) - 1] if times else float("nan"),
            "late_start": max(r["late_start"] for r in res)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per gRPC run")
    p.add_argument("--floor-seconds", type=float, default=3.0)
    p.add_argument("--clients", type=int, default=2, help="client processes")
    p.add_argument("--concurrency", type=int, default=64, help="calls in flight per client process")
    p.add_argument("--agents", type=int, default=1000, help="agents for the first-certificate run (0: skip)")
    p.add_argument("--key-types", default="ec,rsa")
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} CPUs; cryptography {__import__('cryptography').__version__}; "
          f"grpcio {__import__('grpc').__version__}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mizzen-bench-ca-") as tmp:
        work = Path(tmp)
        for kt in args.key_types.split(","):
            f = floor(kt, args.floor_seconds)
            g = grpc_throughput(kt, work, args)
            rows.append((kt, f, g))
        noop = grpc_throughput("ec", work, args, echo=True)
    print()
    print(f"{'CA key':<12} {'floor: CSR check+sign /s':>24} {'floor: leaf sign /s':>20} "
          f"{'gRPC signings /s/core':>22} {'gRPC /s wall':>13} {'errors':>7}")
    for kt, f, g in rows:
        name = "ECDSA P-256" if kt == "ec" else "RSA 2048"
        print(f"{name:<12} {f['sign_csr']:>24,.0f} {f['leaf_only']:>20,.0f} {g['per_core']:>22,.0f} "
              f"{g['wall_rate']:>13,.0f} {g['errors']:>7}")
    print(f"{'gRPC no-op':<12} {'':>24} {'':>20} {noop['per_core']:>22,.0f} {noop['wall_rate']:>13,.0f} "
          f"{noop['errors']:>7}   (same RPC and TLS, fixed answer: grpc.aio's own cost)")
    for kt, _f, g in rows:
        if "agents" in g:
            a = g["agents"]
            print(f"\n{a['n']} agents (own key, CSR, token, TLS connection; {args.clients} client processes) got "
                  f"their first certificate in {a['all_done']:.2f} s (p50 {a['p50']:.2f} s, p99 {a['p99']:.2f} s), "
                  f"errors {a['errors']}{' ' + str(a['error_samples']) if a['error_samples'] else ''}")
        print(f"({kt}: {g['signed']} signed in {g['wall']:.1f} s using {g['server_cpu']:.2f} server CPU s)")


if __name__ == "__main__":
    main()
