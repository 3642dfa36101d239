"""A small Kubernetes API server for tests: list + watch with the API's semantics (one resourceVersion
counter, watch from a resourceVersion, bookmarks, and `410 Gone` once history is compacted)."""

from __future__ import annotations

import asyncio
import copy
import datetime
import ipaddress
import ssl
from pathlib import Path

import orjson
from aiohttp import web

from mizzen.services.mesh.kinds import BY_PLURAL


class FakeKubeAPI:
    def __init__(self, token: str | None = None) -> None:
        self.token = token  # when set, every request must carry `Authorization: Bearer <token>`
        self.seen_auth: list[str] = []
        self.status_patches: list[tuple[str, str, dict]] = []  # (kind, name, patch) written to /status
        self.rv = 100
        self.objects: dict[tuple[str, str, str], dict] = {}  # (kind, ns, name) → object
        self.history: list[tuple[int, str, dict]] = []  # (rv, type, object)
        self.compacted_below = 0
        self.changed = asyncio.Condition()
        self.runner: web.AppRunner | None = None
        self.port = 0

    # ---- test controls ----
    async def put(self, obj: dict) -> None:
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        key = (obj["kind"], meta.get("namespace", ""), meta["name"])
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        typ = "MODIFIED" if key in self.objects else "ADDED"
        self.objects[key] = obj
        await self._record(typ, obj)

    async def delete(self, kind: str, ns: str, name: str) -> None:
        obj = self.objects.pop((kind, ns, name))
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        await self._record("DELETED", obj)

    async def compact(self) -> None:
        """Forget all history: watches from an older resourceVersion now get 410 Gone."""
        self.compacted_below = self.rv + 1
        self.history.clear()
        async with self.changed:
            self.changed.notify_all()

    async def _record(self, typ: str, obj: dict) -> None:
        self.history.append((self.rv, typ, obj))
        async with self.changed:
            self.changed.notify_all()

    # ---- the API ----
    @web.middleware
    async def auth(self, req: web.Request, handler):
        got = req.headers.get("Authorization", "")
        self.seen_auth.append(got)
        if self.token is not None and got != f"Bearer {self.token}":
            return web.json_response({"kind": "Status", "code": 401, "reason": "Unauthorized"}, status=401)
        return await handler(req)

    async def handle_status(self, req: web.Request) -> web.Response:
        """PATCH …/{name}/status (JSON merge patch of `status`), as a CRD's status subresource."""
        kind = BY_PLURAL[req.match_info["plural"]].kind
        key = (kind, req.match_info.get("namespace", ""), req.match_info["name"])
        if key not in self.objects:
            return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
        patch = orjson.loads(await req.read())
        self.status_patches.append((kind, key[2], patch))
        obj = copy.deepcopy(self.objects[key])
        status = dict(obj.get("status") or {})
        for k, v in (patch.get("status") or {}).items():
            if v is None:
                status.pop(k, None)
            else:
                status[k] = v
        obj["status"] = status
        await self.put(obj)
        return web.json_response(self.objects[key], dumps=lambda d: orjson.dumps(d).decode())

    async def handle(self, req: web.Request) -> web.StreamResponse:
        kind = BY_PLURAL[req.match_info["plural"]].kind
        if req.query.get("watch") in ("1", "true"):
            return await self._watch(req, kind)
        items = [o for (k, _ns, _n), o in sorted(self.objects.items()) if k == kind]
        return web.json_response({"kind": f"{kind}List", "metadata": {"resourceVersion": str(self.rv)}, "items": items},
                                 dumps=lambda d: orjson.dumps(d).decode())

    async def _watch(self, req: web.Request, kind: str) -> web.StreamResponse:
        since = int(req.query.get("resourceVersion") or self.rv)
        if since < self.compacted_below - 1:
            return web.json_response({"kind": "Status", "code": 410, "reason": "Expired",
                                      "message": f"too old resource version: {since}"}, status=410)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(req)
        try:
            return await self._stream(resp, kind, since)
        except (ConnectionResetError, asyncio.CancelledError):
            return resp  # the client went away

    async def _stream(self, resp: web.StreamResponse, kind: str, since: int) -> web.StreamResponse:
        sent = since
        while True:
            if sent < self.compacted_below - 1:
                await resp.write(orjson.dumps({"type": "ERROR", "object": {"kind": "Status", "code": 410,
                                                                           "reason": "Expired"}}) + b"\n")
                return resp
            for rv, typ, obj in list(self.history):
                if rv > sent:
                    sent = rv
                    if obj["kind"] == kind:
                        await resp.write(orjson.dumps({"type": typ, "object": obj}) + b"\n")
            async with self.changed:
                try:
                    await asyncio.wait_for(self.changed.wait(), timeout=1.0)
                except TimeoutError:
                    await resp.write(orjson.dumps({"type": "BOOKMARK", "object": {
                        "kind": kind, "metadata": {"resourceVersion": str(sent)}}}) + b"\n")

    async def start(self, tls_dir: Path | None = None, client_certs: bool = False) -> str:
        """Serve plain HTTP, or HTTPS with a certificate for 127.0.0.1 signed by `tls_dir/ca.crt` (made here);
        with `client_certs`, clients must present a certificate of that CA (`client.crt`/`client.key`)."""
        ctx = None
        if tls_dir is not None:
            make_tls(tls_dir)
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(tls_dir / "server.crt", tls_dir / "server.key")
            if client_certs:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(tls_dir / "ca.crt")
        app = web.Application(middlewares=[self.auth])
        app.router.add_get("/api/{version}/{plural}", self.handle)
        app.router.add_get("/apis/{group}/{version}/{plural}", self.handle)
        app.router.add_patch("/apis/{group}/{version}/namespaces/{namespace}/{plural}/{name}/status", self.handle_status)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return f"{'https' if ctx else 'http'}://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.runner:
            await self.runner.shutdown()
            await self.runner.cleanup()


def make_tls(d: Path) -> None:
    """A CA (`ca.crt`), a server certificate for IP 127.0.0.1 (`server.crt`, `server.key`) and a client
    certificate (`client.crt`, `client.key`) in `d`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-kube-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "system:serviceaccount:mizzen")]))
              .issuer_name(ca_name).public_key(client_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
              .sign(ca_key, hashes.SHA256()))
    (d / "client.crt").write_bytes(client.public_bytes(serialization.Encoding.PEM))
    (d / "client.key").write_bytes(client_key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.TraditionalOpenSSL,
                                                            serialization.NoEncryption()))
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
