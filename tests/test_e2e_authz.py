"""Issue 10, security policies end to end: AuthorizationPolicy and RequestAuthentication change what a real
server sidecar lets through.

One mesh for the module (tests/test_e2e_support.py): the control plane as processes, pods in network
namespaces with `mizzen iptables` and real Envoys. `srv` runs the echo app (HTTP 8080, TCP 9000) behind its
sidecar; two client sidecars hold certificates of their own identities from tests/sds_fixture.py under the
mesh's root — `sleep` is spiffe://cluster.local/ns/default/sa/sleep, `other` spiffe://cluster.local/ns/other/sa/other —
and reach `srv` over auto mTLS, so the server sidecar sees each client's identity. `jwks` (no sidecar) serves a
JWKS document over plain HTTP for the `jwksUri` issuer; Envoy fetches it itself. Tokens are ES256, signed in the
test with `cryptography`.

Every policy goes in with `mizzen apply` and out with `mizzen delete`; a test waits until the server Envoy holds
the new config (and nothing drains) before it sends traffic.
"""

from __future__ import annotations

import base64
import http.client
import json
import sys
import time
import urllib.parse

import pytest
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from mizzen.services.demo.echo import tcp_call
from tests.conftest import NETNS_E2E
from tests.test_e2e_support import E2E, ECHO, TLS_MODE_LABEL, endpoints, eventually, mizzen, service

pytestmark = NETNS_E2E

SRV_IP, TCP_IP, JWKS_IP = "10.96.7.1", "10.96.7.2", "10.96.7.3"
SLEEP_ID = "spiffe://cluster.local/ns/default/sa/sleep"
OTHER_ID = "spiffe://cluster.local/ns/other/sa/other"
INLINE_ISS, REMOTE_ISS = "https://inline.example", "https://remote.example"
JWKS_URI = "http://jwks.default.svc.cluster.local/keys/jwks.json"


# --- tokens --------------------------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Signer:
    def __init__(self, kid: str):
        self.kid = kid
        self.key = ec.generate_private_key(ec.SECP256R1())

    def jwk(self) -> dict:
        n = self.key.public_key().public_numbers()
        return {"kty": "EC", "crv": "P-256", "kid": self.kid, "alg": "ES256", "use": "sig",
                "x": _b64(n.x.to_bytes(32, "big")), "y": _b64(n.y.to_bytes(32, "big"))}

    def token(self, iss: str, sub: str, expires_in: float = 3600, **claims: object) -> str:
        now = int(time.time())
        header = {"alg": "ES256", "typ": "JWT", "kid": self.kid}
        payload = {"iss": iss, "sub": sub, "iat": now - 5, "exp": int(now + expires_in), **claims}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


# --- traffic from inside a pod ---------------------------------------------------------------------------------
def _request(url: str, method: str, headers: dict[str, str], timeout: float) -> dict:
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        conn.request(method, u.path + (f"?{u.query}" if u.query else ""), headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            body: object = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        return {"status": resp.status, "body": body}
    except OSError as e:
        return {"status": None, "error": f"{type(e).__name__}: {e}"}
    finally:
        conn.close()


def _tcp(target: str, timeout: float) -> dict:
    try:
        return tcp_call(target, "hello", timeout)
    except OSError as e:
        return {"reply": None, "closed": f"{type(e).__name__}: {e}"}


def policy(name: str, spec: dict, annotations: dict | None = None) -> dict:
    meta: dict = {"name": name, "namespace": "default"}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": meta, "spec": spec}


SRV = {"selector": {"matchLabels": {"app": "srv"}}}


class Mesh:
    def __init__(self, env: E2E):
        self.env = env
        self.inline, self.remote, self.stranger = Signer("inline-1"), Signer("remote-1"), Signer("inline-1")
        env.register([service("srv", SRV_IP), service("srv-tcp", TCP_IP, port=90, target_port=9000, port_name="tcp",
                                                     app="srv"),
                      service("jwks", JWKS_IP, target_port=8080, app="jwks")])
        self.srv_pod = env.add_pod("srv", {"app": "srv", TLS_MODE_LABEL: "istio"})
        self.srv_pod.start_app([sys.executable, ECHO, "serve", "--http", "8080", "--tcp", "9000", "--name", "srv"],
                               uid=1000, wait_ports=[8080, 9000])
        jwks_pod = env.add_pod("jwks", {"app": "jwks"})
        keys_dir = jwks_pod.work_dir / "www" / "keys"
        keys_dir.mkdir(parents=True)
        (keys_dir / "jwks.json").write_text(json.dumps({"keys": [self.remote.jwk()]}))
        jwks_pod.start_app([sys.executable, "-m", "http.server", "8080", "--bind", "0.0.0.0",
                            "--directory", str(jwks_pod.work_dir / "www")], name="jwks", wait_ports=[8080])
        self.sleep_pod = env.add_pod("sleep", {"app": "sleep", TLS_MODE_LABEL: "istio"})
        self.other_pod = env.add_pod("other", {"app": "other", TLS_MODE_LABEL: "istio"})
        env.register([endpoints("srv", [self.srv_pod]),
                      endpoints("srv-tcp", [self.srv_pod], port=9000, port_name="tcp"),
                      endpoints("jwks", [jwks_pod])])
        self.srv = env.start_sidecar(self.srv_pod, extra_bootstrap=["--all-stats"])
        self.sleep = env.start_sidecar(self.sleep_pod, identity=SLEEP_ID)
        self.other = env.start_sidecar(self.other_pod, identity=OTHER_ID)
        for car in (self.srv, self.sleep, self.other):
            env.wait_ready(car)
        for car in (self.sleep, self.other):
            eventually(lambda c=car: c.cluster_hosts("outbound|80||srv.default.svc.cluster.local") == {
                f"{self.srv_pod.ip}:8080"} and c.cluster_hosts("outbound|90||srv-tcp.default.svc.cluster.local") == {
                f"{self.srv_pod.ip}:9000"}, 60, what=f"{car.pod_name} sees srv")

    # traffic
    def get(self, pod, path: str, method: str = "GET", headers: dict | None = None) -> dict:
        return pod.call(_request, f"http://{SRV_IP}{path}", method, headers or {}, 5.0, timeout=20)

    def tcp(self, pod) -> dict:
        return pod.call(_tcp, f"{TCP_IP}:90", 5.0, timeout=20)

    # config
    def _srv_listeners(self) -> str:
        return json.dumps(self.srv.section("ListenersConfigDump"))

    def apply(self, *objs: dict, expect: list[str]) -> None:
        """Apply through the CLI, then wait until the server Envoy's listeners hold every `expect` string."""
        self.env.apply(*objs)
        eventually(lambda: all(e in self._srv_listeners() for e in expect) and self.srv.settled(), 60,
                   what=f"srv listeners with {expect}")

    def delete(self, *objs: dict, gone: list[str]) -> None:
        self.env.delete(*objs)
        eventually(lambda: not any(g in self._srv_listeners() for g in gone) and self.srv.settled(), 60,
                   what=f"srv listeners without {gone}")

    def srv_log(self, **match: object) -> dict:
        return self.srv.wait_entry(timeout=15, **match)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    env = E2E(tmp_path_factory.mktemp("authz"))
    try:
        yield Mesh(env)
    finally:
        env.close()


def statuses(mesh: Mesh, calls: dict[str, tuple]) -> dict[str, int | None]:
    """name → status of one request per entry (pod, path[, method[, headers]])."""
    return {name: mesh.get(*args).get("status") for name, args in calls.items()}


def test_allow_admits_exactly_the_principal_path_and_method_it_names(mesh: Mesh):
    assert mesh.get(mesh.sleep_pod, "/before")["status"] == 200  # no policy: everything passes
    p = policy("allow-sleep-get", {**SRV, "rules": [{
        "from": [{"source": {"principals": ["cluster.local/ns/default/sa/sleep"]}}],
        "to": [{"operation": {"methods": ["GET"], "paths": ["/allowed*"]}}]}]})
    mesh.apply(p, expect=["ns[default]-policy[allow-sleep-get]-rule[0]"])
    try:
        assert statuses(mesh, {
            "sleep GET /allowed/x": (mesh.sleep_pod, "/allowed/x"),
            "sleep GET /denied": (mesh.sleep_pod, "/denied"),
            "sleep POST /allowed": (mesh.sleep_pod, "/allowed", "POST"),
            "other GET /allowed": (mesh.other_pod, "/allowed"),
        }) == {"sleep GET /allowed/x": 200, "sleep GET /denied": 403, "sleep POST /allowed": 403,
               "other GET /allowed": 403}
        ok = mesh.srv_log(path="/allowed/x", response_code=200)
        assert ok["downstream_peer_uri_san"] == SLEEP_ID
        denied = mesh.srv_log(path="/denied", response_code=403)
        # An ALLOW filter that matched nothing: Envoy names no policy
        assert denied["response_code_details"] == "rbac_access_denied_matched_policy[none]"
        assert denied["upstream_host"] is None  # the app never saw it
        assert mesh.srv_log(method="GET", path="/allowed", response_code=403)["downstream_peer_uri_san"] == OTHER_ID
    finally:
        mesh.delete(p, gone=["policy[allow-sleep-get]"])
    assert mesh.get(mesh.other_pod, "/allowed")["status"] == 200


def test_allow_by_namespace(mesh: Mesh):
    p = policy("allow-ns-other", {**SRV, "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]})
    mesh.apply(p, expect=["ns[default]-policy[allow-ns-other]-rule[0]"])
    try:
        assert statuses(mesh, {"other": (mesh.other_pod, "/ns"), "sleep": (mesh.sleep_pod, "/ns")}) == {
            "other": 200, "sleep": 403}
    finally:
        mesh.delete(p, gone=["policy[allow-ns-other]"])


def test_allow_by_ip_block_or_header_condition(mesh: Mesh):
    p = policy("allow-ip-or-header", {**SRV, "rules": [
        {"from": [{"source": {"ipBlocks": [f"{mesh.sleep_pod.ip}/32"]}}]},
        {"when": [{"key": "request.headers[x-pass]", "values": ["yes*"]}]}]})
    mesh.apply(p, expect=["ns[default]-policy[allow-ip-or-header]-rule[1]"])
    try:
        assert statuses(mesh, {
            "sleep by IP": (mesh.sleep_pod, "/ip"),
            "other": (mesh.other_pod, "/ip"),
            "other with header": (mesh.other_pod, "/ip", "GET", {"x-pass": "yes-please"}),
        }) == {"sleep by IP": 200, "other": 403, "other with header": 200}
    finally:
        mesh.delete(p, gone=["policy[allow-ip-or-header]"])


def test_deny_wins_over_allow_and_names_the_policy(mesh: Mesh):
    allow_all = policy("allow-all", {**SRV, "rules": [{}]})
    deny = policy("deny-admin", {**SRV, "action": "DENY", "rules": [
        {"to": [{"operation": {"paths": ["/admin*"]}}]},
        {"from": [{"source": {"notPrincipals": ["cluster.local/ns/default/sa/sleep"]}}],
         "to": [{"operation": {"methods": ["POST"]}}]}]})
    mesh.apply(allow_all, deny, expect=["policy[allow-all]-rule[0]", "policy[deny-admin]-rule[1]"])
    try:
        assert statuses(mesh, {
            "sleep /ok": (mesh.sleep_pod, "/ok"),
            "sleep /admin/users": (mesh.sleep_pod, "/admin/users"),
            "sleep POST": (mesh.sleep_pod, "/item", "POST"),
            "other POST": (mesh.other_pod, "/item", "POST"),
        }) == {"sleep /ok": 200, "sleep /admin/users": 403, "sleep POST": 200, "other POST": 403}
        entry = mesh.srv_log(path="/admin/users", response_code=403)
        assert entry["response_code_details"] == \
            "rbac_access_denied_matched_policy[ns[default]-policy[deny-admin]-rule[0]]"
        entry = mesh.srv_log(method="POST", path="/item", response_code=403)
        assert entry["response_code_details"] == \
            "rbac_access_denied_matched_policy[ns[default]-policy[deny-admin]-rule[1]]"
    finally:
        mesh.delete(allow_all, deny, gone=["policy[allow-all]", "policy[deny-admin]"])


def test_empty_allow_policy_denies_everything(mesh: Mesh):
    p = policy("allow-nothing", dict(SRV))
    mesh.apply(p, expect=["ns[default]-policy[allow-nothing]-rule[0]"])
    try:
        assert statuses(mesh, {"sleep": (mesh.sleep_pod, "/x"), "other": (mesh.other_pod, "/x")}) == {
            "sleep": 403, "other": 403}
        assert mesh.tcp(mesh.sleep_pod).get("reply") is None
    finally:
        mesh.delete(p, gone=["policy[allow-nothing]"])


def _rbac_counter(mesh: Mesh, suffix: str) -> int:
    return sum(v for k, v in mesh.srv.stats("").items() if k.endswith(suffix))


def test_audit_logs_and_allows(mesh: Mesh):
    p = policy("audit-get", {**SRV, "action": "AUDIT", "rules": [{"to": [{"operation": {"paths": ["/audited"]}}]}]})
    mesh.apply(p, expect=["ns[default]-policy[audit-get]-rule[0]"])
    try:
        assert mesh.get(mesh.other_pod, "/not-audited")["status"] == 200
        assert mesh.get(mesh.sleep_pod, "/audited")["status"] == 200
        # The RBAC filter's LOG action marks the audited request (Envoy's `envoy.common` access_log_hint) and lets
        # both through.
        entry = mesh.srv_log(path="/audited", response_code=200)
        assert entry["access_log_hint"] is True and entry["downstream_peer_uri_san"] == SLEEP_ID
        assert mesh.srv_log(path="/not-audited", response_code=200)["access_log_hint"] is False
    finally:
        mesh.delete(p, gone=["policy[audit-get]"])
    assert mesh.get(mesh.other_pod, "/after-audit")["status"] == 200
    assert mesh.srv_log(path="/after-audit")["access_log_hint"] is None  # no RBAC filter, no hint


def test_dry_run_policy_only_shadows(mesh: Mesh):
    p = policy("dry-deny", {**SRV, "action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/shadow"]}}]}]},
               annotations={"istio.io/dry-run": "true"})
    mesh.apply(p, expect=["ns[default]-policy[dry-deny]-rule[0]", "istio_dry_run_deny_"])
    try:
        before = _rbac_counter(mesh, "rbac.istio_dry_run_deny_.shadow_denied")
        assert mesh.get(mesh.sleep_pod, "/shadow")["status"] == 200
        eventually(lambda: _rbac_counter(mesh, "rbac.istio_dry_run_deny_.shadow_denied") == before + 1, 10,
                   what="the shadow DENY counted the request")
    finally:
        mesh.delete(p, gone=["policy[dry-deny]"])


def test_tcp_rules_close_the_connection(mesh: Mesh):
    assert mesh.tcp(mesh.other_pod)["reply"] is not None
    p = policy("tcp-sleep-only", {**SRV, "rules": [{"from": [{"source": {"principals": [
        "cluster.local/ns/default/sa/sleep"]}}], "to": [{"operation": {"ports": ["9000"]}}]}]})
    mesh.apply(p, expect=["ns[default]-policy[tcp-sleep-only]-rule[0]", "envoy.filters.network.rbac"])
    try:
        ok = mesh.tcp(mesh.sleep_pod)
        assert ok["reply"] is not None and ok["reply"]["name"] == "srv", ok
        refused = mesh.tcp(mesh.other_pod)
        assert refused["reply"] is None, refused
        entry = eventually(lambda: next((e for e in mesh.srv.log_entries()
                                         if (e.get("connection_termination_details") or "").startswith(
                                             "rbac_access_denied_matched_policy")), None), 15,
                           what="a TCP access-log line of the refused connection")
        assert entry["connection_termination_details"] == "rbac_access_denied_matched_policy[none]"
        # The HTTP port follows the same policy: port 9000 only, so HTTP on 8080 is refused to everyone.
        assert mesh.get(mesh.sleep_pod, "/http")["status"] == 403
    finally:
        mesh.delete(p, gone=["policy[tcp-sleep-only]"])


def test_deny_with_http_fields_denies_all_tcp(mesh: Mesh):
    """Istio's rule: on a TCP chain a DENY rule loses its HTTP-only fields, so it denies more."""
    p = policy("deny-post", {**SRV, "action": "DENY", "rules": [{"to": [{"operation": {"methods": ["POST"]}}]}]})
    mesh.apply(p, expect=["ns[default]-policy[deny-post]-rule[0]"])
    try:
        assert mesh.get(mesh.sleep_pod, "/g")["status"] == 200
        assert mesh.get(mesh.sleep_pod, "/p", "POST")["status"] == 403
        assert mesh.tcp(mesh.sleep_pod)["reply"] is None
    finally:
        mesh.delete(p, gone=["policy[deny-post]"])


def test_request_authentication_and_request_principals(mesh: Mesh):
    ra = {"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
          "metadata": {"name": "jwt", "namespace": "default"},
          "spec": {**SRV, "jwtRules": [
              {"issuer": INLINE_ISS, "jwks": json.dumps({"keys": [mesh.inline.jwk()]}),
               "outputPayloadToHeader": "x-jwt-payload"},
              {"issuer": REMOTE_ISS, "jwksUri": JWKS_URI, "fromParams": ["access_token"],
               "fromHeaders": [{"name": "x-remote-token", "prefix": "Token "}], "forwardOriginalToken": True}]}}
    ap = policy("require-jwt", {**SRV, "rules": [{"from": [{"source": {"requestPrincipals": [
        f"{INLINE_ISS}/alice", f"{REMOTE_ISS}/*"]}}]}]})
    mesh.apply(ra, ap, expect=["envoy.filters.http.jwt_authn", INLINE_ISS, "policy[require-jwt]-rule[0]"])
    try:
        def bearer(tok: str) -> dict:
            return {"authorization": f"Bearer {tok}"}

        alice = mesh.inline.token(INLINE_ISS, "alice", groups=["dev"])
        ok = eventually(lambda: (r := mesh.get(mesh.sleep_pod, "/jwt", headers=bearer(alice)))["status"] == 200
                        and r, 30, what="a valid token admitted")
        headers = ok["body"]["headers"]
        payload = json.loads(base64.urlsafe_b64decode(headers["x-jwt-payload"] + "=="))
        assert payload["sub"] == "alice" and payload["iss"] == INLINE_ISS  # outputPayloadToHeader
        assert "authorization" not in headers  # forwardOriginalToken false: the token stops at the sidecar

        expired = mesh.inline.token(INLINE_ISS, "alice", expires_in=-600)
        forged = mesh.stranger.token(INLINE_ISS, "alice")  # same kid, another key
        mallory = mesh.inline.token(INLINE_ISS, "mallory")
        assert statuses(mesh, {
            "expired": (mesh.sleep_pod, "/jwt", "GET", bearer(expired)),
            "forged": (mesh.sleep_pod, "/jwt", "GET", bearer(forged)),
            "no token": (mesh.sleep_pod, "/jwt"),
            "valid but not allowed": (mesh.sleep_pod, "/jwt", "GET", bearer(mallory)),
        }) == {"expired": 401, "forged": 401, "no token": 403, "valid but not allowed": 403}
        assert mesh.srv_log(response_code=401, response_code_details="jwt_authn_access_denied{Jwt_is_expired}")

        # The jwksUri issuer: Envoy fetches the keys from the `jwks` service; tokens come in a query parameter
        # or the custom header, and are forwarded to the app.
        bob = mesh.remote.token(REMOTE_ISS, "bob")
        via_param = eventually(lambda: (r := mesh.get(mesh.sleep_pod, f"/remote?access_token={bob}"))["status"]
                               == 200 and r, 30, what="the remote issuer's token admitted")
        assert via_param["body"]["query"]["access_token"] == bob
        via_header = mesh.get(mesh.sleep_pod, "/remote", headers={"x-remote-token": f"Token {bob}"})
        assert via_header["status"] == 200 and via_header["body"]["headers"]["x-remote-token"] == f"Token {bob}"
        assert mesh.get(mesh.sleep_pod, "/remote", headers=bearer(bob))["status"] == 401  # not its location
    finally:
        mesh.delete(ra, ap, gone=["envoy.filters.http.jwt_authn", "policy[require-jwt]"])


def test_proxy_config_listener_shows_the_rbac_filters(mesh: Mesh):
    p = policy("pc-deny", {**SRV, "action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/x"]}}]}]})
    mesh.apply(p, expect=["policy[pc-deny]"])
    try:
        out = mesh.srv.pc("listener", "--port", "15006", "-o", "json")
        assert "ns[default]-policy[pc-deny]-rule[0]" in out
        table = mesh.srv.pc("listener", "--port", "15006")
        # istioctl's `RBAC policies:` line (x describe), per inbound port; TCP port 9000 denies all too (a DENY
        # rule with only HTTP fields matches every connection there)
        assert "8080 RBAC policies: ns[default]-policy[pc-deny]-rule[0]\n" in table, table
        assert "9000 RBAC policies: ns[default]-policy[pc-deny]-rule[0]\n" in table, table
    finally:
        mesh.delete(p, gone=["policy[pc-deny]"])



def test_gateway_validates_jwt_and_authorizes(mesh: Mesh):
    """A router Envoy (`mizzen bootstrap --router`) in its own pod: RequestAuthentication + requestPrincipals
    at the ingress, called from a pod without a sidecar."""
    env = mesh.env
    gw_pod = env.add_pod("gw", {"istio": "ingressgateway"})
    gw = env.start_sidecar(gw_pod, iptables=False, extra_bootstrap=["--router"])
    gateway = {"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
               "metadata": {"name": "edge", "namespace": "default"},
               "spec": {"selector": {"istio": "ingressgateway"},
                        "servers": [{"port": {"number": 8080, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}]}}
    vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
          "metadata": {"name": "edge", "namespace": "default"},
          "spec": {"hosts": ["*"], "gateways": ["edge"], "http": [{"route": [{"destination": {
              "host": "srv.default.svc.cluster.local", "port": {"number": 80}}}]}]}}
    gw_sel = {"selector": {"matchLabels": {"istio": "ingressgateway"}}}
    ra = {"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
          "metadata": {"name": "edge-jwt", "namespace": "default"},
          "spec": {**gw_sel, "jwtRules": [{"issuer": INLINE_ISS,
                                           "jwks": json.dumps({"keys": [mesh.inline.jwk()]})}]}}
    ap = policy("edge-require-jwt", {**gw_sel, "rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]})
    env.apply(gateway, vs, ra, ap)
    try:
        gw.pod.wait_envoy_ready(15000, gw.proc, 60)
        eventually(lambda: "policy[edge-require-jwt]" in json.dumps(gw.section("ListenersConfigDump"))
                   and gw.cluster_hosts("outbound|80||srv.default.svc.cluster.local") == {f"{mesh.srv_pod.ip}:8080"}
                   and gw.settled(), 60, what="the gateway listening with the policies")
        jwks_pod = env.net.pods["jwks"]

        def via_gw(headers: dict) -> dict:
            return jwks_pod.call(_request, f"http://{gw_pod.ip}:8080/edge", "GET", headers, 5.0, timeout=20)

        alice = mesh.inline.token(INLINE_ISS, "alice")
        ok = eventually(lambda: (r := via_gw({"authorization": f"Bearer {alice}"}))["status"] == 200 and r, 30,
                        what="a valid token through the gateway")
        assert ok["body"]["name"] == "srv"
        expired = mesh.inline.token(INLINE_ISS, "alice", expires_in=-600)
        assert via_gw({"authorization": f"Bearer {expired}"})["status"] == 401
        assert via_gw({})["status"] == 403
        entry = gw.wait_entry(timeout=15, response_code=403)
        assert entry["response_code_details"] == "rbac_access_denied_matched_policy[none]"
    finally:
        env.delete(gateway, vs, ra, ap)


def test_bad_policy_is_refused_whole_naming_file_document_and_field(mesh: Mesh, tmp_path):
    f = tmp_path / "policies.yaml"
    good = policy("would-be-fine", {**SRV, "rules": [{}]})
    bad = policy("bad-cidr", {**SRV, "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]})
    f.write_text(yaml.safe_dump_all([good, bad]))
    r = mizzen("apply", "-f", str(f), "--server", mesh.env.server, check=False)
    assert r.returncode == 1
    assert f"{f}, document 1" in r.stderr and "AuthorizationPolicy default/bad-cidr" in r.stderr, r.stderr
    assert "spec.rules[0].from[0].source.ipBlocks[0]: bad CIDR range (10.0.0.0/33)" in r.stderr, r.stderr
    listed = mizzen("get", "authorizationpolicies", "-A", "--server", mesh.env.server, check=False)
    assert "would-be-fine" not in listed.stdout and "bad-cidr" not in listed.stdout


# --- CUSTOM: a real ext_authz HTTP server -------------------------------------------------------------------------
EXT_IP = "10.96.7.4"
EXT_HOST = "ext-authz.default.svc.cluster.local"
# The ext_authz server: allows a check that carries `x-ext-authz: allow` (and tells the upstream so through
# `x-ext-authz-check-result`), denies every other with 403; appends each check it sees to a JSON-lines file.
EXT_AUTHZ_SERVER = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOG = sys.argv[2]


class Check(BaseHTTPRequestHandler):
    def _check(self):
        allowed = self.headers.get("x-ext-authz") == "allow"
        with open(LOG, "a") as f:
            f.write(json.dumps({"method": self.command, "path": self.path,
                                "x-ext-authz": self.headers.get("x-ext-authz")}) + "\n")
        self.send_response(200 if allowed else 403)
        self.send_header("x-ext-authz-check-result", "allowed" if allowed else "denied")
        self.send_header("content-length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _check

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Check).serve_forever()
'''


# The gRPC one (envoy.service.auth.v3.Authorization): allows a connection whose peer is the `sleep` identity.
EXT_AUTHZ_GRPC_SERVER = r'''
import json, sys
from concurrent import futures

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as pb, external_auth_pb2_grpc as rpc

LOG, ALLOWED = sys.argv[2], sys.argv[3]


class Authz(rpc.AuthorizationServicer):
    def Check(self, request, context):
        principal = request.attributes.source.principal
        with open(LOG, "a") as f:
            f.write(json.dumps({"grpc": True, "principal": principal,
                                "port": request.attributes.destination.address.socket_address.port_value}) + "\n")
        return pb.CheckResponse(status={"code": 0 if principal == ALLOWED else 7})


server = grpc.server(futures.ThreadPoolExecutor(4))
rpc.add_AuthorizationServicer_to_server(Authz(), server)
server.add_insecure_port(f"0.0.0.0:{sys.argv[1]}")
server.start()
server.wait_for_termination()
'''
EXT_GRPC_IP = "10.96.7.5"
EXT_GRPC_HOST = "ext-authz-grpc.default.svc.cluster.local"


def _mesh_config(providers: list[dict]) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "istio", "namespace": "istio-system"},
            "data": {"mesh": yaml.safe_dump({"extensionProviders": providers})}}


class ExtAuthz:
    """The ext_authz server in a pod of its own (no sidecar), behind Service ext-authz:8000."""

    def __init__(self, mesh: Mesh):
        env = mesh.env
        env.register([service("ext-authz", EXT_IP, port=8000, target_port=8000, app="ext-authz")])
        self.pod = env.add_pod("ext-authz", {"app": "ext-authz"})
        script = self.pod.work_dir / "ext_authz.py"
        script.write_text(EXT_AUTHZ_SERVER)
        self.log = self.pod.work_dir / "checks.jsonl"
        self.log.touch()
        self.pod.start_app([sys.executable, str(script), "8000", str(self.log)], name="ext-authz", wait_ports=[8000])
        grpc_script = self.pod.work_dir / "ext_authz_grpc.py"
        grpc_script.write_text(EXT_AUTHZ_GRPC_SERVER)
        self.pod.start_app([sys.executable, str(grpc_script), "9191", str(self.log), SLEEP_ID],
                           name="ext-authz-grpc", wait_ports=[9191])
        env.register([service("ext-authz-grpc", EXT_GRPC_IP, port=9191, target_port=9191, port_name="grpc",
                              app="ext-authz"),
                      endpoints("ext-authz", [self.pod], port=8000),
                      endpoints("ext-authz-grpc", [self.pod], port=9191, port_name="grpc")])
        eventually(lambda: mesh.srv.cluster_hosts(f"outbound|8000||{EXT_HOST}") == {f"{self.pod.ip}:8000"}
                   and mesh.srv.cluster_hosts(f"outbound|9191||{EXT_GRPC_HOST}") == {f"{self.pod.ip}:9191"}, 60,
                   what="srv sees ext-authz and ext-authz-grpc")

    def seen(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def ext_authz(mesh: Mesh) -> ExtAuthz:
    return ExtAuthz(mesh)


def test_custom_action_sends_only_matching_requests_to_the_ext_authz_server(mesh: Mesh, ext_authz: ExtAuthz):
    config = _mesh_config([{"name": "ext-http", "envoyExtAuthzHttp": {
        "service": EXT_HOST, "port": 8000, "timeout": "5s",
        "includeRequestHeadersInCheck": ["x-ext-authz"],
        "headersToUpstreamOnAllow": ["x-ext-authz-check-result"],
        "headersToDownstreamOnDeny": ["x-ext-authz-check-result"]}}])
    custom = policy("ext", {**SRV, "action": "CUSTOM", "provider": {"name": "ext-http"},
                            "rules": [{"to": [{"operation": {"paths": ["/custom/*"]}}]}]})
    deny = policy("deny-secret", {**SRV, "action": "DENY",
                                  "rules": [{"to": [{"operation": {"paths": ["/custom/secret"]}}]}]})
    mesh.apply(config, custom, deny, expect=["envoy.filters.http.ext_authz",
                                             "istio-ext-authz-ext-http-ns[default]-policy[ext]-rule[0]",
                                             "policy[deny-secret]-rule[0]"])
    try:
        allow = {"x-ext-authz": "allow"}
        ok = mesh.get(mesh.sleep_pod, "/custom/a", headers=allow)
        assert ok["status"] == 200, ok
        # the provider's headersToUpstreamOnAllow reached the app
        assert ok["body"]["headers"].get("x-ext-authz-check-result") == "allowed"
        denied = mesh.get(mesh.sleep_pod, "/custom/b")
        assert denied["status"] == 403, denied
        assert mesh.get(mesh.sleep_pod, "/other", headers=allow)["status"] == 200
        assert mesh.get(mesh.sleep_pod, "/other")["status"] == 200  # not a CUSTOM path: never checked
        # CUSTOM allowed it, DENY still refuses it
        secret = mesh.get(mesh.sleep_pod, "/custom/secret", headers=allow)
        assert secret["status"] == 403 and secret["body"] == "RBAC: access denied", secret
        entry = mesh.srv_log(path="/custom/secret", response_code=403)
        assert entry["response_code_details"] == \
            "rbac_access_denied_matched_policy[ns[default]-policy[deny-secret]-rule[0]]"
        seen = [c for c in ext_authz.seen() if not c.get("grpc")]
        assert [(c["path"], c["x-ext-authz"]) for c in seen] == [
            ("/custom/a", "allow"), ("/custom/b", None), ("/custom/secret", "allow")]
        entry = mesh.srv_log(path="/custom/b", response_code=403)
        assert entry["response_code_details"] == "ext_authz_denied"
    finally:
        mesh.delete(custom, deny, gone=["envoy.filters.http.ext_authz", "policy[deny-secret]"])
        mesh.env.delete(config)


def test_custom_action_with_unknown_provider_denies_matching_requests(mesh: Mesh, ext_authz: ExtAuthz):
    custom = policy("ext-unknown", {**SRV, "action": "CUSTOM", "provider": {"name": "nobody"},
                                    "rules": [{"to": [{"operation": {"paths": ["/custom/*"]}}]}]})
    before = len(ext_authz.seen())
    mesh.apply(custom, expect=["istio-ext-authz-nobody-ns[default]-policy[ext-unknown]-rule[0]"
                               "-deny-due-to-bad-CUSTOM-action"])
    try:
        assert mesh.get(mesh.sleep_pod, "/custom/a", headers={"x-ext-authz": "allow"})["status"] == 403
        assert mesh.get(mesh.sleep_pod, "/other")["status"] == 200
        entry = mesh.srv_log(path="/custom/a", response_code=403)
        assert entry["response_code_details"] == ("rbac_access_denied_matched_policy[istio-ext-authz-nobody-"
                                                  "ns[default]-policy[ext-unknown]-rule[0]-deny-due-to-bad-CUSTOM-action]")
        assert len(ext_authz.seen()) == before
    finally:
        mesh.delete(custom, gone=["policy[ext-unknown]"])


def test_custom_grpc_provider_checks_tcp_connections(mesh: Mesh, ext_authz: ExtAuthz):
    """TCP chains: network ext_authz with a gRPC provider, only for connections the CUSTOM rule names (port 9000);
    the server allows the `sleep` identity it sees in the check."""
    config = _mesh_config([{"name": "ext-grpc", "envoyExtAuthzGrpc": {
        "service": f"default/{EXT_GRPC_HOST}", "port": 9191, "timeout": "5s"}}])
    custom = policy("ext-tcp", {**SRV, "action": "CUSTOM", "provider": {"name": "ext-grpc"},
                                "rules": [{"to": [{"operation": {"ports": ["9000"]}}]}]})
    mesh.apply(config, custom, expect=["envoy.filters.network.ext_authz",
                                       "istio-ext-authz-ext-grpc-ns[default]-policy[ext-tcp]-rule[0]"])
    try:
        ok = mesh.tcp(mesh.sleep_pod)
        assert ok["reply"] is not None and ok["reply"]["name"] == "srv", ok
        refused = mesh.tcp(mesh.other_pod)
        assert refused["reply"] is None, refused
        # HTTP on 8080 is not named by the rule: never checked, still served
        assert mesh.get(mesh.other_pod, "/http")["status"] == 200
        checks = [c for c in ext_authz.seen() if c.get("grpc")]
        assert [c["principal"] for c in checks] == [SLEEP_ID, OTHER_ID], checks
        assert {c["port"] for c in checks} == {9000}
    finally:
        mesh.delete(custom, gone=["envoy.filters.network.ext_authz"])
        mesh.env.delete(config)


def test_bad_mesh_config_is_refused_naming_file_document_and_field(mesh: Mesh, tmp_path):
    f = tmp_path / "mesh.yaml"
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mesh-config-test"}}
    bad = _mesh_config([{"name": "ext", "envoyExtAuthzHttp": {"service": EXT_HOST, "port": 99999}}])
    bad["data"]["mesh"] += "# secret-looking-value-42\n"
    f.write_text(yaml.safe_dump_all([ns, bad]))
    r = mizzen("apply", "-f", str(f), "--server", mesh.env.server, check=False)
    assert r.returncode == 1
    assert f"{f}, document 1" in r.stderr and "ConfigMap istio-system/istio" in r.stderr, r.stderr
    assert ("data[mesh].extensionProviders[0].envoyExtAuthzHttp.port: port must be in the range [1, 65535], "
            "found: 99999") in r.stderr, r.stderr
    assert "secret-looking-value-42" not in r.stderr + r.stdout  # the data is never echoed
    listed = mizzen("get", "namespaces", "--server", mesh.env.server, check=False)
    assert "mesh-config-test" not in listed.stdout  # nothing of that apply stored
    cms = mizzen("get", "cm", "-n", "istio-system", "--server", mesh.env.server, check=False)
    assert cms.returncode == 0 and "istio" not in cms.stdout, cms
