"""Test pods on one machine: each pod is a Linux network namespace joined to a bridge by a veth pair.

Used by the tests and by `mizzen up --demo --netns`. Nothing is added to the machine's own network
namespace: the bridge lives in a private "hub" namespace, the pods get addresses from a private subnet
(default 10.244.1.0/24) that exists only inside these namespaces, and a route for the mesh's service CIDR
(default 10.96.0.0/16) via the bridge; there is no default route out. Processes (the app, Envoy as uid
1337) run inside a pod through `ip netns exec` (+ `setpriv` for another uid) and are tracked by pid.

    with PodNetwork() as net:
        a = net.add_pod("a", labels={"app": "a"}, register=lambda objs: apply_objects(url, objs))
        a.start_app([sys.executable, ECHO, "serve", "--http", "8080"])
        a.apply_iptables()                 # `mizzen iptables` with the seed's flags, in a's namespace
        a.start_envoy(bootstrap_dict)      # as uid 1337
        a.run([...])                       # a short command inside a

Everything a PodNetwork created (processes, namespaces and the links in them, its work directory) is
removed by `close()` / leaving the `with` block, also when the body raised. Names carry the creating pid
and a random tag, so parallel runs never collide.

Reaching the control plane: a pod cannot see the machine's 127.0.0.1. `Pod.forward_to_host()` starts a
relay that listens on 127.0.0.1:<port> inside the pod and connects to 127.0.0.1:<port> outside (for Envoy's
xDS); `Pod.forward_from_host()` does the reverse (e.g. to read Envoy's admin API from a test).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..mesh import procs, settings
from . import iptables as ipt

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
REPO_ROOT = Path(__file__).resolve().parents[2]

# `istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020` (the seed).
SEED_IPTABLES_FLAGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
                       "-b", "*", "-d", "15090,15021,15020"]

Register = Callable[[list[dict]], Any]


class NetnsError(RuntimeError):
    pass


def is_root() -> bool:
    return os.geteuid() == 0


def unavailable_reason() -> str | None:
    """Why pods cannot be made here (None when they can): tests skip with this reason."""
    if not is_root():
        return "needs root (network namespaces, veth, iptables)"
    for tool in ("ip", "iptables-restore", "iptables-save", "setpriv"):
        try:
            procs.find_binary(tool)
        except FileNotFoundError:
            return f"{tool} is not installed"
    return None


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0, input: str | None = None,
         env: dict | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input, env=env)
    if check and res.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({res.returncode}): {(res.stderr or res.stdout).strip()}")
    return res


# --- entering a namespace from Python (one thread at a time) ----------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def entered(netns: str | None):
    """Switch the calling thread into a named network namespace (None: stay) and back afterwards.
    Sockets keep the namespace they were created in, so a socket made inside stays inside."""
    if netns is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(NETNS_DIR / netns, os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def call_in(netns: str, fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> Any:
    """Run fn(*args) on a fresh thread inside the namespace; return its result or raise its exception."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            with entered(netns):
                box["result"] = fn(*args)
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=body, name=f"netns-{netns}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"call in {netns} did not finish within {timeout}s")
    if "error" in box:
        raise box["error"]
    return box.get("result")


def wait_port_in(netns: str | None, host: str, port: int, timeout: float = 15.0,
                 proc: procs.Proc | None = None) -> None:
    def probe() -> bool:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        return False

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise NetnsError(f"{proc.name} exited ({proc.popen.returncode}) before {host}:{port} opened:\n"
                             f"{proc.log_text()[-2000:]}")
        if call_in(netns, probe) if netns else probe():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} in {netns or 'the host namespace'} did not open within {timeout}s")


# --- namespaces --------------------------------------------------------------------------------------------


class NetNS:
    """A named network namespace with its loopback up; `close()` stops what runs in it and deletes it."""

    def __init__(self, name: str, log_dir: Path):
        self.name = name
        self.log_dir = log_dir
        self.procs: list[procs.Proc] = []
        _run(["ip", "netns", "add", name])
        try:
            self.ip("link", "set", "lo", "up")
        except Exception:
            _run(["ip", "netns", "del", name], check=False)
            raise

    @property
    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["ip", "-n", self.name, *args], check=check)

    def argv(self, argv: Sequence[str], uid: int | None = None, gid: int | None = None) -> list[str]:
        """argv wrapped to run inside the namespace, as uid/gid when given (setpriv drops root)."""
        wrapped = list(self.exec_prefix)
        if uid is not None:
            g = uid if gid is None else gid
            wrapped += ["setpriv", f"--reuid={uid}", f"--regid={g}", "--clear-groups", "--"]
        return wrapped + list(argv)

    def run(self, argv: Sequence[str], *, uid: int | None = None, gid: int | None = None, check: bool = True,
            timeout: float = 30.0, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        return _run(self.argv(argv, uid, gid), check=check, timeout=timeout, input=input, env=env)

    def spawn(self, name: str, argv: Sequence[str], *, uid: int | None = None, gid: int | None = None,
              env: dict | None = None, cwd: Path | None = None) -> procs.Proc:
        if uid is not None:
            # The program may reopen its stdout by name (Envoy's `/dev/stdout` access log): let it.
            log_file = self.log_dir / f"{self.name}.{name}.log"
            log_file.touch()
            os.chown(log_file, uid, uid if gid is None else gid)
        # `ip netns exec` and setpriv both exec, so the pid is the program's own.
        p = procs.spawn(f"{self.name}.{name}", self.argv(argv, uid, gid), self.log_dir, env=env, cwd=cwd)
        self.procs.append(p)
        return p

    def pids(self) -> list[int]:
        res = _run(["ip", "netns", "pids", self.name], check=False)
        return [int(x) for x in res.stdout.split()] if res.returncode == 0 else []

    def close(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                p.stop(timeout=5)
        self.procs.clear()
        # Anything still inside was started in this private namespace by us (e.g. a child of an app).
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _run(["ip", "netns", "del", self.name], check=False)


@dataclass
class Pod:
    """A pod: its namespace, address, labels and work directory (writable by Envoy's uid)."""

    name: str
    namespace: str
    ip: str
    labels: dict[str, str]
    netns: NetNS
    network: PodNetwork
    work_dir: Path
    service_account: str = "default"
    container_ports: list[int] = field(default_factory=list)

    @property
    def netns_name(self) -> str:
        return self.netns.name

    # processes
    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        return self.netns.run(argv, **kw)

    def spawn(self, name: str, argv: Sequence[str], **kw: Any) -> procs.Proc:
        return self.netns.spawn(name, argv, **kw)

    def start_app(self, argv: Sequence[str], name: str = "app", uid: int | None = None,
                  wait_ports: Iterable[int] = (), timeout: float = 15.0) -> procs.Proc:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO_ROOT))
        p = self.spawn(name, argv, uid=uid, env=env, cwd=REPO_ROOT)
        for port in wait_ports:
            self.wait_port(port, proc=p, timeout=timeout)
        return p

    def start_envoy(self, config: dict | Path, uid: int = settings.PROXY_UID, admin_port: int = settings.PROXY_ADMIN_PORT,
                    extra_args: Sequence[str] = (), wait: bool = True, timeout: float = 30.0,
                    name: str = "envoy") -> procs.Proc:
        """Envoy as the proxy uid, from a bootstrap dict (written as JSON) or file; waits for /ready when asked."""
        if isinstance(config, dict):
            path = self.work_dir / f"{name}.json"
            path.write_text(json.dumps(config, indent=1))
            os.chmod(path, 0o644)
        else:
            path = Path(config)
        argv = [procs.envoy_binary(), "-c", str(path), "--disable-hot-restart", "--concurrency", "1",
                "--log-level", "info", *extra_args]
        p = self.spawn(name, argv, uid=uid, cwd=self.work_dir)
        if wait:
            self.wait_envoy_ready(admin_port, p, timeout)
        return p

    def wait_envoy_ready(self, admin_port: int, proc: procs.Proc | None = None, timeout: float = 30.0) -> None:
        def ready() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", admin_port), timeout=1) as s:
                s.sendall(b"GET /ready HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
                reply = b""
                while chunk := s.recv(4096):  # Envoy refuses HTTP/1.0; with close it ends the stream
                    reply += chunk
                return reply.startswith(b"HTTP/1.1 200") and b"LIVE" in reply
            return False

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and not proc.alive():
                raise NetnsError(f"envoy in {self.name} exited ({proc.popen.returncode}):\n{proc.log_text()[-3000:]}")
            if call_in(self.netns_name, ready):
                return
            time.sleep(0.1)
        raise TimeoutError(f"envoy in {self.name} not ready within {timeout}s")

    def wait_port(self, port: int, host: str = "127.0.0.1", timeout: float = 15.0,
                  proc: procs.Proc | None = None) -> None:
        wait_port_in(self.netns_name, host, port, timeout, proc)

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> Any:
        """fn(*args) with sockets created inside this pod (runs on its own thread)."""
        return call_in(self.netns_name, fn, *args, timeout=timeout)

    # traffic capture
    def apply_iptables(self, flags: Sequence[str] = SEED_IPTABLES_FLAGS, cleanup: bool = False) -> str:
        """Run `mizzen iptables` inside the pod (flags as istio-iptables'); returns its stdout."""
        argv = [sys.executable, "-m", "mizzen.services.cli.main", "iptables", *flags, *(["--cleanup"] if cleanup else [])]
        env = {k: v for k, v in os.environ.items() if k not in _IPTABLES_ENV}
        env["PYTHONPATH"] = str(REPO_ROOT)
        return self.run(argv, env=env).stdout

    def iptables_save(self) -> str:
        return self.run(["iptables-save"]).stdout

    # bridges to the host namespace
    def forward_to_host(self, host_port: int, pod_port: int | None = None, host: str = "127.0.0.1") -> procs.Proc:
        """Relay 127.0.0.1:<pod_port> inside the pod to <host>:<host_port> in the host namespace."""
        return self.network.relay(listen_ns=self.netns_name, listen=("127.0.0.1", pod_port or host_port),
                                  connect_ns=None, connect=(host, host_port), name=f"to-host-{host_port}")

    def forward_from_host(self, pod_port: int, host_port: int | None = None, pod_host: str = "127.0.0.1") -> int:
        """Relay 127.0.0.1:<host_port> (a free port by default) in the host namespace to <pod_host>:<pod_port>
        inside the pod; returns the host port."""
        host_port = host_port or procs.free_port()
        self.network.relay(listen_ns=None, listen=("127.0.0.1", host_port), connect_ns=self.netns_name,
                           connect=(pod_host, pod_port), name=f"{self.name}-from-host-{pod_port}")
        return host_port

    # what the registry sees
    def k8s_object(self) -> dict:
        ports = [{"containerPort": p, "protocol": "TCP"} for p in self.container_ports]
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": dict(self.labels)},
            "spec": {"serviceAccountName": self.service_account,
                     "containers": [{"name": "app", "image": "mizzen/test-echo:latest",
                                     **({"ports": ports} if ports else {})}]},
            "status": {"phase": "Running", "podIP": self.ip, "podIPs": [{"ip": self.ip}]},
        }


# The pod's `mizzen iptables` sees only its flags, not istio-iptables variables set for the test run.
_IPTABLES_ENV = {env for _s, _l, env, _d in ipt.FLAGS} | {ipt.ENVOY_USER_ENV, ipt.DNS_CAPTURE_ENV, "DRY_RUN"}


def endpoints_object(service: str, namespace: str, pods: Iterable[Pod], ports: Sequence[dict]) -> dict:
    """The Endpoints of a Service: every pod's address (with a targetRef to it) and the given ports
    (`{"name": "http", "port": 8080, "protocol": "TCP"}` items)."""
    addresses = [{"ip": p.ip, "targetRef": {"kind": "Pod", "name": p.name, "namespace": p.namespace}} for p in pods]
    subsets = [{"addresses": addresses, "ports": [dict(port) for port in ports]}] if addresses else []
    return {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": service, "namespace": namespace},
            "subsets": subsets}


class PodNetwork:
    """A private L2 segment (bridge in its own namespace) and the pods on it."""

    def __init__(self, subnet: str = "10.244.1.0/24", service_cidr: str = "10.96.0.0/16",
                 keep_dir: Path | None = None, tag: str | None = None):
        reason = unavailable_reason()
        if reason:
            raise NetnsError(reason)
        self.subnet = ipaddress.ip_network(subnet)
        self.service_cidr = str(ipaddress.ip_network(service_cidr))
        self.tag = tag or f"{os.getpid()}-{secrets.token_hex(3)}"
        self.keep_dir = keep_dir
        self.work_dir = Path(tempfile.mkdtemp(prefix=f"mizzen-pods-{self.tag}-"))
        os.chmod(self.work_dir, 0o755)  # Envoy (uid 1337) reads its bootstrap and writes logs below
        self.log_dir = self.work_dir / "logs"
        self.log_dir.mkdir()
        self.pods: dict[str, Pod] = {}
        self._relays: list[procs.Proc] = []
        self._hosts = self.subnet.hosts()
        self.gateway = str(next(self._hosts))
        self._closed = False
        self.hub: NetNS | None = None
        try:
            self.hub = NetNS(f"mz-{self.tag}-hub", self.log_dir)
            self.hub.ip("link", "add", "br0", "type", "bridge")
            self.hub.ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", "br0")
            self.hub.ip("link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> PodNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_pod(self, name: str, namespace: str = "default", labels: dict[str, str] | None = None,
                ip: str | None = None, register: Register | None = None, service_account: str = "default",
                container_ports: Sequence[int] = ()) -> Pod:
        """A namespace `mz-<tag>-<name>` with eth0 on the bridge, lo up, the service CIDR routed via the
        bridge and no default route. `register([pod_object])` is called when given."""
        if name in self.pods:
            raise ValueError(f"pod {name} exists")
        assert self.hub is not None
        address = ip or str(next(self._hosts))
        netns = NetNS(f"mz-{self.tag}-{name}", self.log_dir)
        work_dir = self.work_dir / name
        pod = Pod(name, namespace, address, dict(labels or {}), netns, self, work_dir, service_account,
                  list(container_ports))
        self.pods[name] = pod  # from here on close() removes it
        work_dir.mkdir()
        os.chown(work_dir, settings.PROXY_UID, settings.PROXY_UID)
        os.chmod(work_dir, 0o755)
        hub_end = f"v{len(self.pods)}"
        self.hub.ip("link", "add", hub_end, "type", "veth", "peer", "name", "eth0", "netns", netns.name)
        self.hub.ip("link", "set", hub_end, "master", "br0", "up")
        netns.ip("addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        netns.ip("link", "set", "eth0", "up")
        netns.ip("route", "add", self.service_cidr, "via", self.gateway, "dev", "eth0")
        if register is not None:
            register([pod.k8s_object()])
        return pod

    def register_endpoints(self, register: Register, service: str, pods: Iterable[Pod], ports: Sequence[dict],
                           namespace: str = "default") -> dict:
        obj = endpoints_object(service, namespace, pods, ports)
        register([obj])
        return obj

    def relay(self, *, listen_ns: str | None, listen: tuple[str, int], connect_ns: str | None,
              connect: tuple[str, int], name: str, timeout: float = 15.0) -> procs.Proc:
        """A relay process (`python -m mizzen.services.sidecar.netns relay …`) tracked and stopped by close()."""
        argv = [sys.executable, "-m", "mizzen.services.sidecar.netns", "relay",
                "--listen-netns", listen_ns or "", "--listen", f"{listen[0]}:{listen[1]}",
                "--connect-netns", connect_ns or "", "--connect", f"{connect[0]}:{connect[1]}"]
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
        p = procs.spawn(f"relay-{name}", argv, self.log_dir, env=env, cwd=REPO_ROOT)
        self._relays.append(p)
        wait_port_in(listen_ns, listen[0], listen[1], timeout, p)
        return p

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for p in self._relays:
            with contextlib.suppress(Exception):
                p.stop(timeout=5)
        for pod in reversed(list(self.pods.values())):
            with contextlib.suppress(Exception):
                pod.netns.close()
        if self.hub is not None:
            with contextlib.suppress(Exception):
                self.hub.close()
        if self.keep_dir is not None:
            with contextlib.suppress(Exception):
                shutil.copytree(self.work_dir, Path(self.keep_dir) / f"pods-{self.tag}", dirs_exist_ok=True)
        shutil.rmtree(self.work_dir, ignore_errors=True)


# --- the relay process ---------------------------------------------------------------------------------------


def _hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _relay_main(listen_ns: str | None, listen: tuple[str, int], connect_ns: str | None,
                      connect: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    with entered(listen_ns):
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(listen)
        lsock.listen(128)
    lsock.setblocking(False)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with entered(connect_ns):  # the outgoing socket belongs to the other namespace
            out = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        out.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(out, connect), 10)
        except (OSError, TimeoutError):
            out.close()
            writer.close()
            return
        r2, w2 = await asyncio.open_connection(sock=out)
        await asyncio.gather(_pipe(reader, w2), _pipe(r2, writer))
        for w in (writer, w2):
            w.close()

    server = await asyncio.start_server(handle, sock=lsock)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m mizzen.services.sidecar.netns")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("relay", help="relay TCP from a listener in one namespace to a target in another")
    r.add_argument("--listen-netns", default="", help="named namespace to listen in (empty: this one)")
    r.add_argument("--listen", required=True, help="HOST:PORT")
    r.add_argument("--connect-netns", default="", help="named namespace to connect from (empty: this one)")
    r.add_argument("--connect", required=True, help="HOST:PORT")
    args = p.parse_args(argv)
    asyncio.run(_relay_main(args.listen_netns or None, _hostport(args.listen), args.connect_netns or None,
                            _hostport(args.connect)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
