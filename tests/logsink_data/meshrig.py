"""A three-pod mesh on loopback addresses with real Envoy sidecars writing Istio's default JSON access log.

Pods: A (127.0.0.2, the client: the test itself acts as A's application), B (127.0.0.3) and C (127.0.0.4).
Each pod has its own Envoy with Istio's naming: an outbound HTTP listener on <ip>:15001 routing to
`outbound|80||<svc>.default.svc.cluster.local`, and an inbound listener on <ip>:15006 routing to
`inbound|8080||` (the app, reached from Istio's inbound bind address 127.0.0.6). Without iptables the
outbound cluster's endpoint is the peer's inbound listener itself. B's app serves a request by calling C
through B's sidecar and forwards `x-request-id` (as Istio asks applications to do), so A→B→C is one chain.
C also has a TCP port (9000, an echo server) that A reaches through a tcp_proxy listener on 127.0.0.2:15002.

Used by `record_chain.py` (which recorded `chain/*.log`) and by the live Envoy tests.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web

from mizzen.services.mesh import procs

# Istio's default JSON access-log format (pilot/pkg/model/telemetry_logging.go, EnvoyJSONLogFormatIstio).
ISTIO_JSON_FORMAT = {
    "start_time": "%START_TIME%",
    "route_name": "%ROUTE_NAME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "connection_termination_details": "%CONNECTION_TERMINATION_DETAILS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration": "%DURATION%",
    "upstream_service_time": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "x_forwarded_for": "%REQ(X-FORWARDED-FOR)%",
    "user_agent": "%REQ(USER-AGENT)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "authority": "%REQ(:AUTHORITY)%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_cluster": "%UPSTREAM_CLUSTER_RAW%",
    "upstream_local_address": "%UPSTREAM_LOCAL_ADDRESS%",
    "downstream_local_address": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "requested_server_name": "%REQUESTED_SERVER_NAME%",
    "upstream_transport_failure_reason": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
}

A_IP, B_IP, C_IP = "127.0.0.2", "127.0.0.3", "127.0.0.4"
INBOUND_BIND = "127.0.0.6"
APP_PORT, TCP_APP_PORT = 8080, 9000
OUTBOUND_PORT, INBOUND_PORT, TCP_OUT_PORT, TCP_IN_PORT = 15001, 15006, 15002, 15016


def node_id(ip: str, pod: str) -> str:
    return f"sidecar~{ip}~{pod}.default~default.svc.cluster.local"


PODS = {
    "a": (A_IP, "a-7d9c6b8f5d-x2k4p"),
    "b": (B_IP, "b-5f6d8c9b7c-q9w8z"),
    "c": (C_IP, "c-6c8d9f7b5d-m2n4b"),
}


def _access_log(path: Path, extra_format: dict | None = None) -> list[dict]:
    fmt = dict(ISTIO_JSON_FORMAT)
    fmt.update(extra_format or {})
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(path),
                "log_format": {"json_format": fmt},
            },
        }
    ]


def _cluster(name: str, ip: str, port: int, bind: str) -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}}}]}],
        },
        "upstream_bind_config": {"source_address": {"address": bind, "port_value": 0}},
    }


def _http_listener(name: str, ip: str, port: int, route_config_name: str, routes: list[dict], log: list[dict]) -> dict:
    return {
        "name": name,
        "address": {"socket_address": {"address": ip, "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": name,
                            "preserve_external_request_id": True,
                            "access_log": log,
                            "route_config": {
                                "name": route_config_name,
                                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
                            },
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                                }
                            ],
                        },
                    }
                ]
            }
        ],
    }


def _tcp_listener(name: str, ip: str, port: int, cluster: str, log: list[dict]) -> dict:
    return {
        "name": name,
        "address": {"socket_address": {"address": ip, "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                            "stat_prefix": name,
                            "cluster": cluster,
                            "access_log": log,
                        },
                    }
                ]
            }
        ],
    }


def _route(cluster: str, host_prefix: str, retries: bool = False) -> dict:
    r: dict = {"cluster": cluster, "timeout": "5s"}
    if retries:
        # Istio's default retry policy for sidecar routes.
        r["retry_policy"] = {"retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
                             "num_retries": 2}
    return {"name": "default", "match": {"prefix": "/", "headers": [
        {"name": ":authority", "string_match": {"prefix": host_prefix}}]}, "route": r}


async def _wait_live(admin_port: int, proc: procs.Proc, timeout: float = 30.0) -> None:
    """Until Envoy's admin /ready answers 200 (server state LIVE)."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with ClientSession(timeout=ClientTimeout(total=1)) as s:
        while True:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode} before it was ready")
            with suppress(OSError, ClientError, asyncio.TimeoutError):
                async with s.get(f"http://127.0.0.1:{admin_port}/ready") as r:
                    if r.status == 200:
                        return
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{proc.name} was not LIVE within {timeout}s")
            await asyncio.sleep(0.05)


def sidecar_config(pod: str, log_path: Path, admin_port: int, als: str | None = None) -> dict:
    """The Envoy bootstrap of one pod's sidecar. With `als` (HOST:PORT) it also streams its access logs to
    the gRPC Access Log Service there, as Istio's `envoy.access_loggers.http_grpc` does."""
    ip = PODS[pod][0]
    log = _access_log(log_path)
    tcp_log = _access_log(log_path)
    if als:
        grpc_common = {
            "log_name": "mizzen",
            "transport_api_version": "V3",
            "grpc_service": {"envoy_grpc": {"cluster_name": "als"}},
            "buffer_flush_interval": "0.05s",
        }
        log.append({"name": "envoy.access_loggers.http_grpc", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": grpc_common,
            "additional_request_headers_to_log": ["traceparent"],
            "additional_response_headers_to_log": ["x-envoy-upstream-service-time"],
        }})
        tcp_log.append({"name": "envoy.access_loggers.tcp_grpc", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.TcpGrpcAccessLogConfig",
            "common_config": grpc_common,
        }})
    listeners = []
    clusters = []
    out_routes = []
    for svc, (peer_ip, _pod) in PODS.items():
        if svc == pod or svc == "a":
            continue
        name = f"outbound|80||{svc}.default.svc.cluster.local"
        clusters.append(_cluster(name, peer_ip, INBOUND_PORT, ip))
        out_routes.append(_route(name, svc))
    down = "outbound|80||down.default.svc.cluster.local"
    clusters.append(_cluster(down, "127.0.0.9", 1, ip))  # nothing listens there: connect failures
    out_routes.append(_route(down, "down", retries=True))
    listeners.append(_http_listener("0.0.0.0_80", ip, OUTBOUND_PORT, "80", out_routes, log))
    if pod != "a":
        inbound = f"inbound|{APP_PORT}||"
        clusters.append(_cluster(inbound, ip, APP_PORT, INBOUND_BIND))
        listeners.append(_http_listener("virtualInbound", ip, INBOUND_PORT, f"inbound|{APP_PORT}||",
                                        [{"name": "default", "match": {"prefix": "/"},
                                          "route": {"cluster": inbound, "timeout": "5s"}}], log))
    if pod == "a":
        tcp = "outbound|9000||c.default.svc.cluster.local"
        clusters.append(_cluster(tcp, C_IP, TCP_IN_PORT, ip))
        listeners.append(_tcp_listener("10.96.0.30_9000", ip, TCP_OUT_PORT, tcp, tcp_log))
    if pod == "c":
        tcp_in = f"inbound|{TCP_APP_PORT}||"
        clusters.append(_cluster(tcp_in, ip, TCP_APP_PORT, INBOUND_BIND))
        listeners.append(_tcp_listener("virtualInboundTcp", ip, TCP_IN_PORT, tcp_in, tcp_log))
    if als:
        host, port = als.rsplit(":", 1)
        clusters.append({
            "name": "als", "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": "als", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": host, "port_value": int(port)}}}}]}]},
        })
    return {
        "node": {"id": node_id(ip, PODS[pod][1]), "cluster": f"{pod}.default"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


@dataclass
class MeshRig:
    workdir: Path
    als: str | None = None
    envoys: dict[str, procs.Proc] = field(default_factory=dict)
    runners: list[web.AppRunner] = field(default_factory=list)
    tcp_servers: list[asyncio.base_events.Server] = field(default_factory=list)

    def log_path(self, pod: str) -> Path:
        return self.workdir / f"{pod}.log"

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        await self._start_apps()
        admins: dict[str, int] = {}
        try:
            for pod in PODS:
                admin = admins[pod] = procs.free_port()
                cfg = self.workdir / f"envoy-{pod}.json"
                cfg.write_text(json.dumps(sidecar_config(pod, self.log_path(pod), admin, self.als)))
                self.envoys[pod] = procs.spawn(
                    f"envoy-{pod}",
                    [procs.envoy_binary(), "-c", str(cfg), "--concurrency", "1", "--use-dynamic-base-id",
                     "-l", "warning", "--file-flush-interval-msec", "50"],
                    self.workdir,
                )
            for pod, proc in self.envoys.items():
                ip = PODS[pod][0]
                await asyncio.to_thread(procs.wait_port, ip, OUTBOUND_PORT, 30.0, proc.popen)
                if pod != "a":
                    await asyncio.to_thread(procs.wait_port, ip, INBOUND_PORT, 30.0, proc.popen)
                # A bound port is not a serving Envoy: its listen sockets exist before its workers run, and a
                # request in between was once closed unanswered. /ready answers 200 once the server is LIVE.
                await _wait_live(admins[pod], proc)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for proc in self.envoys.values():
            await asyncio.to_thread(proc.stop)
        self.envoys.clear()
        for r in self.runners:
            await r.cleanup()
        self.runners.clear()
        for s in self.tcp_servers:
            s.close()
            with suppress(Exception):
                await s.wait_closed()
        self.tcp_servers.clear()

    async def _start_apps(self) -> None:
        async def c_app(req: web.Request) -> web.Response:
            await req.read()
            if req.path == "/missing":
                return web.Response(status=404, text="no such thing\n")
            if req.path == "/fail":
                return web.Response(status=503, text="c is unhappy\n")
            return web.Response(text="hello from c\n")

        async def b_app(req: web.Request) -> web.Response:
            body = await req.read()
            headers = {"x-request-id": req.headers.get("x-request-id", ""), "host": "c.default.svc.cluster.local"}
            if "traceparent" in req.headers:
                headers["traceparent"] = req.headers["traceparent"]
            conn = TCPConnector(local_addr=(B_IP, 0), force_close=True)
            async with ClientSession(connector=conn, timeout=ClientTimeout(total=10)) as s, s.request(
                req.method, f"http://{B_IP}:{OUTBOUND_PORT}{req.path_qs}", data=body or None, headers=headers
            ) as r:
                text = await r.text()
            return web.Response(status=r.status, text=f"b got: {text}")

        for ip, handler in ((B_IP, b_app), (C_IP, c_app)):
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handler)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, ip, APP_PORT).start()
            self.runners.append(runner)

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with suppress(Exception):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        self.tcp_servers.append(await asyncio.start_server(echo, C_IP, TCP_APP_PORT))

    async def call_b(self, method: str, path: str, body: bytes | None = None,
                     headers: dict | None = None) -> tuple[int, str]:
        """A's application calling service b through A's sidecar."""
        h = {"host": "b.default.svc.cluster.local", "user-agent": "mizzen-test/1.0"}
        h.update(headers or {})
        conn = TCPConnector(local_addr=(A_IP, 0), force_close=True)
        async with ClientSession(connector=conn, timeout=ClientTimeout(total=10)) as s, s.request(
            method, f"http://{A_IP}:{OUTBOUND_PORT}{path}", data=body, headers=h
        ) as r:
            return r.status, await r.text()

    async def call_down(self) -> int:
        conn = TCPConnector(local_addr=(A_IP, 0), force_close=True)
        async with ClientSession(connector=conn, timeout=ClientTimeout(total=10)) as s, s.get(
            f"http://{A_IP}:{OUTBOUND_PORT}/", headers={"host": "down.default.svc.cluster.local",
                                                          "user-agent": "mizzen-test/1.0"}
        ) as r:
            return r.status

    async def tcp_echo(self, payload: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(A_IP, TCP_OUT_PORT, local_addr=(A_IP, 0))
        writer.write(payload)
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(len(payload)), 5)
        writer.close()
        await writer.wait_closed()
        return got

    async def wait_lines(self, pod: str, count: int, timeout: float = 10.0) -> list[bytes]:
        """Wait until the pod's access log holds at least `count` complete lines."""
        path = self.log_path(pod)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            lines = path.read_bytes().splitlines() if path.exists() else []
            if len(lines) >= count:
                return lines
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{path} has {len(lines)} lines, wanted {count}")
            await asyncio.sleep(0.05)
