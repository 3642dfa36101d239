"""The agent's SDS serves `file-cert:` / `file-root:` secrets from files (issue 10), seen by a real gRPC client.

The agent's own SDS server (`sds.serve`) with its `FileSecrets` resolver polling every 0.1 s, on a unix socket;
the client is grpcio speaking `envoy.service.secret.v3.SecretDiscoveryService` as Envoy does: it gets the
files' contents as `tls_certificate` / `validation_context`, a missing or bad file is not served and its error
names the file (FetchSecrets returns it; nothing crashes) until the file is fixed, and a rewritten file is
pushed on the stream that is already open — state of the world and delta — with a new version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from mizzen.services.sidecar import filesecrets, sds
from tests.filecert_support import atomic_write, authority, leaf

POLL = 0.1


class Files:
    """A CA bundle and a client certificate + key on disk, and the SDS names for them."""

    def __init__(self, d: Path):
        self.ca_path, self.cert_path, self.key_path = d / "ca.pem", d / "client.pem", d / "client-key.pem"
        self.ca = authority("files-ca")
        self.client = leaf(self.ca, "client", client=True)
        atomic_write(self.ca_path, self.ca.pem)
        self.client.write(self.cert_path, self.key_path)
        self.root_name = f"file-root:{self.ca_path}"
        self.cert_name = f"file-cert:{self.cert_path}~{self.key_path}"


@contextlib.asynccontextmanager
async def agent_sds(tmp_path: Path) -> AsyncIterator[tuple[sds_pb2_grpc.SecretDiscoveryServiceStub, sds.SdsServicer,
                                                          filesecrets.FileSecrets]]:
    """The agent's SDS server with file secrets (polling), and a client stub on its socket."""
    store = sds.SecretStore()
    files = filesecrets.FileSecrets(store, POLL)
    sock = tmp_path / "sds.sock"
    server, servicer = await sds.serve(store, sock, resolver=files)
    stop = asyncio.Event()
    poller = asyncio.create_task(files.run(stop))
    channel = grpc.aio.insecure_channel(f"unix:{sock}")
    try:
        yield sds_pb2_grpc.SecretDiscoveryServiceStub(channel), servicer, files
    finally:
        stop.set()
        await poller
        await channel.close()
        await server.stop(0)


def unpack(resp) -> dict[str, secret_pb2.Secret]:
    out = {}
    for any_ in resp.resources:
        res = any_.resource if hasattr(any_, "resource") else any_
        s = secret_pb2.Secret()
        assert res.Unpack(s)
        out[s.name] = s
    return out


class Stream:
    """One SDS stream: responses read in the background (cancelling a grpc.aio read cancels the call)."""

    def __init__(self, call) -> None:
        self.call = call
        self.responses: asyncio.Queue = asyncio.Queue()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while (resp := await self.call.read()) is not grpc.aio.EOF:
            await self.responses.put(resp)

    async def write(self, req) -> None:
        await self.call.write(req)

    async def read(self, timeout: float = 5.0):
        return await asyncio.wait_for(self.responses.get(), timeout)

    async def nothing_within(self, seconds: float) -> None:
        """No response arrives for `seconds`; the stream stays open."""
        with contextlib.suppress(TimeoutError):
            resp = await asyncio.wait_for(self.responses.get(), seconds)
            raise AssertionError(f"unexpected response: {resp}")
        assert not self._reader.done(), "the stream ended"

    def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()


def sotw_request(names: list[str], nonce: str = "", version: str = "") -> discovery_pb2.DiscoveryRequest:
    return discovery_pb2.DiscoveryRequest(type_url=sds.SECRET_TYPE, resource_names=names, response_nonce=nonce,
                                          version_info=version)


def test_file_secrets_are_served_as_envoy_expects(tmp_path: Path) -> None:
    f = Files(tmp_path)

    async def main() -> None:
        async with agent_sds(tmp_path) as (stub, _servicer, files):
            call = Stream(stub.StreamSecrets())
            await call.write(sotw_request([f.root_name, f.cert_name, "default"]))
            got = unpack(await call.read())
            # `default` is not held by this store: only the file secrets are answered
            assert set(got) == {f.root_name, f.cert_name}
            root = got[f.root_name]
            assert root.WhichOneof("type") == "validation_context"
            assert root.validation_context.trusted_ca.inline_bytes == f.ca.pem
            cert = got[f.cert_name]
            assert cert.WhichOneof("type") == "tls_certificate"
            assert cert.tls_certificate.certificate_chain.inline_bytes == f.client.cert
            assert cert.tls_certificate.private_key.inline_bytes == f.client.key
            assert files.errors == {}
            call.close()
            # FetchSecrets answers them too
            resp = await stub.FetchSecrets(sotw_request([f.root_name]))
            assert unpack(resp)[f.root_name].validation_context.trusted_ca.inline_bytes == f.ca.pem

            # a bundle with text and a stray key: only the certificates are served
            other = authority("files-ca-2")
            version = files.store.version(f.root_name)
            atomic_write(f.ca_path, b"# our CAs\n" + f.ca.pem + f.client.key + b"\n" + other.pem)
            for _ in range(50):  # the next poll
                if files.store.version(f.root_name) != version:
                    break
                await asyncio.sleep(POLL / 2)
            resp = await stub.FetchSecrets(sotw_request([f.root_name]))
            assert unpack(resp)[f.root_name].validation_context.trusted_ca.inline_bytes == f.ca.pem + other.pem

    asyncio.run(main())


@pytest.mark.parametrize(("name", "why"), [
    ("file-root:{d}/absent.pem", "cannot read CA certificates file {d}/absent.pem: No such file or directory"),
    ("file-root:{d}/garbage.pem", "CA certificates file {d}/garbage.pem holds no PEM certificate"),
    ("file-cert:{d}/client.pem~{d}/absent-key.pem", "cannot read private key file {d}/absent-key.pem"),
    ("file-cert:{d}/client.pem~{d}/other-key.pem",
     "private key file {d}/other-key.pem does not match the first certificate of {d}/client.pem"),
    ("file-cert:{d}/client.pem~{d}/ca.pem", "private key file {d}/ca.pem holds no valid unencrypted PEM private key"),
    ("file-cert:{d}/client.pem", "want file-cert:<certificate file>~<key file>"),
    ("file-root:{d}/ca.pem~{d}/more.pem", "want file-root:<CA certificates file>"),
], ids=["missing-ca", "not-pem", "missing-key", "key-mismatch", "not-a-key", "one-path", "two-roots"])
def test_bad_files_are_not_served_and_the_error_names_the_file(tmp_path: Path, name: str, why: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    f = Files(tmp_path)
    (tmp_path / "garbage.pem").write_text("this is not a certificate\n")
    atomic_write(tmp_path / "other-key.pem", leaf(f.ca, "other").key)
    name, why = name.format(d=tmp_path), why.format(d=tmp_path)
    caplog.set_level(logging.DEBUG)

    async def main() -> None:
        async with agent_sds(tmp_path) as (stub, servicer, files):
            call = Stream(stub.StreamSecrets())
            await call.write(sotw_request([name, f.root_name]))
            got = unpack(await call.read())
            assert set(got) == {f.root_name}, "the good secret is served, the bad one is not"
            assert why in files.errors[name]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.FetchSecrets(sotw_request([name]))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert why in err.value.details() and repr(name) in err.value.details()
            await call.nothing_within(5 * POLL)  # polling does not resend or crash
            assert servicer.open_streams == 1
            call.close()

    asyncio.run(main())
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len([e for e in errors if why in e]) == 1, f"logged once per distinct error: {errors}"
    # never key material in a log line
    key_line = f.client.key.decode().splitlines()[1]
    assert key_line not in caplog.text


def test_a_missing_file_is_served_once_it_appears_on_the_same_stream(tmp_path: Path) -> None:
    f = Files(tmp_path)
    later = tmp_path / "later.pem"
    name = f"file-root:{later}"

    async def main() -> None:
        async with agent_sds(tmp_path) as (stub, servicer, files):
            call = Stream(stub.StreamSecrets())
            await call.write(sotw_request([name]))
            await call.nothing_within(3 * POLL)
            assert str(later) in files.errors[name]
            atomic_write(later, f.ca.pem)
            got = unpack(await call.read())
            assert got[name].validation_context.trusted_ca.inline_bytes == f.ca.pem
            assert name not in files.errors and servicer.streams == 1
            call.close()

    asyncio.run(main())


def test_rotation_is_pushed_on_the_open_sotw_stream(tmp_path: Path) -> None:
    f = Files(tmp_path)

    async def main() -> None:
        async with agent_sds(tmp_path) as (stub, servicer, _files):
            call = Stream(stub.StreamSecrets())
            await call.write(sotw_request([f.root_name, f.cert_name]))
            first = await call.read()
            await call.write(sotw_request([f.root_name, f.cert_name], first.nonce, first.version_info))
            v_root, v_cert = servicer.store.version(f.root_name), servicer.store.version(f.cert_name)

            # the CA bundle gains a second root
            ca2 = authority("files-ca-2")
            atomic_write(f.ca_path, f.ca.pem + ca2.pem)
            resp = await call.read()
            got = unpack(resp)
            assert got[f.root_name].validation_context.trusted_ca.inline_bytes == f.ca.pem + ca2.pem
            assert servicer.store.version(f.root_name) != v_root
            assert servicer.store.version(f.cert_name) == v_cert, "the unchanged secret keeps its version"
            await call.write(sotw_request([f.root_name, f.cert_name], resp.nonce, resp.version_info))

            # a new client certificate and key
            new = leaf(ca2, "client-2", client=True)
            new.write(f.cert_path, f.key_path)
            resp = await call.read()
            got = unpack(resp)
            assert got[f.cert_name].tls_certificate.certificate_chain.inline_bytes == new.cert
            assert got[f.cert_name].tls_certificate.private_key.inline_bytes == new.key
            assert servicer.streams == 1, "pushed on the open stream, no reconnect"
            call.close()

    asyncio.run(main())


def test_rotation_is_pushed_on_the_open_delta_stream(tmp_path: Path) -> None:
    f = Files(tmp_path)

    async def main() -> None:
        async with agent_sds(tmp_path) as (stub, servicer, files):
            call = Stream(stub.DeltaSecrets())
            await call.write(discovery_pb2.DeltaDiscoveryRequest(
                type_url=sds.SECRET_TYPE, resource_names_subscribe=[f.root_name, f.cert_name]))
            first = await call.read()
            assert {r.name for r in first.resources} == {f.root_name, f.cert_name}
            await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=sds.SECRET_TYPE,
                                                                 response_nonce=first.nonce))

            # a rotation caught half-way (new certificate, old key) is refused; the old pair stays served
            new = leaf(f.ca, "client-2", client=True)
            atomic_write(f.cert_path, new.cert)
            await call.nothing_within(4 * POLL)
            assert "does not match" in files.errors[f.cert_name]
            assert "still serving the previous version" in files.errors[f.cert_name]
            atomic_write(f.key_path, new.key)
            resp = await call.read()
            assert [r.name for r in resp.resources] == [f.cert_name], "only the secret that moved"
            got = unpack(resp)[f.cert_name]
            assert got.tls_certificate.certificate_chain.inline_bytes == new.cert
            assert resp.resources[0].version == servicer.store.version(f.cert_name)
            assert f.cert_name not in files.errors
            assert servicer.streams == 1
            call.close()

    asyncio.run(main())


def test_agent_refuses_a_non_positive_file_poll(capsys: pytest.CaptureFixture) -> None:
    from mizzen.services.sidecar import agent

    with pytest.raises(SystemExit) as e:
        agent.main(["--pod", "p", "-n", "default", "--ip", "127.0.0.1", "--file-poll", "0"])
    assert e.value.code == 2
    assert "--file-poll: want a positive number of seconds, not 0.0" in capsys.readouterr().err


async def test_socket_under_a_deep_work_dir_is_served(tmp_path, monkeypatch):
    """A socket path longer than a socket address holds (107 bytes; a deep `--work-dir`, or pytest-xdist's
    tmp paths) is still served; the client connects by the relative path, as Envoy's bootstrap names it."""
    deep = tmp_path / ("w" * 60) / "etc/istio/proxy"
    files = Files(tmp_path)
    store = sds.SecretStore()
    server, _ = await sds.serve(store, deep / "SDS", resolver=filesecrets.FileSecrets(store, POLL))
    assert len(str(deep / "SDS")) > sds.UNIX_PATH_MAX and (deep / "SDS").is_socket()
    monkeypatch.chdir(deep.parents[2])
    channel = grpc.aio.insecure_channel("unix:./etc/istio/proxy/SDS")
    try:
        resp = await sds_pb2_grpc.SecretDiscoveryServiceStub(channel).FetchSecrets(
            discovery_pb2.DiscoveryRequest(resource_names=[files.root_name]), timeout=10)
        assert unpack(resp)[files.root_name].validation_context.trusted_ca.inline_bytes == files.ca.pem
    finally:
        await channel.close()
        await server.stop(0)
