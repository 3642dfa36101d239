"""TLS contexts: upstream (DestinationRule tls / auto mTLS) and downstream (PeerAuthentication inbound mTLS).

Istio certificates come over SDS from the bootstrap's `sds-grpc` cluster under the names `default` (the
workload's key and certificate) and `ROOTCA` (the mesh root). File certificates named in a DestinationRule
are SDS resources too (`file-cert:<cert>~<key>`, `file-root:<ca>`), as istiod 1.7 sends them. Gateway
credentials (`credentialName`) are `kubernetes://<name>` and `kubernetes://<name>-cacert`, served over ADS
(secrets.py builds them), as istiod ≥ 1.8 does.
"""

from __future__ import annotations

from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2

from mizzen.services.mesh.protowire import VARINT, ld, varint

from . import pb

SDS_DEFAULT = "default"
SDS_ROOT = "ROOTCA"

ALPN_IN_MESH = ["istio-peer-exchange", "istio"]
ALPN_IN_MESH_H2 = ["istio-peer-exchange", "istio", "h2"]
ALPN_H2_ONLY = ["h2"]
ALPN_DOWNSTREAM_HTTP = ["h2", "http/1.1"]
ALPN_DOWNSTREAM_TCP = ["istio-peer-exchange", "h2", "http/1.1"]

# Istio's default inbound cipher suites.
INBOUND_CIPHERS = ["ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256",
                   "ECDHE-RSA-AES128-GCM-SHA256", "AES256-GCM-SHA384", "AES128-GCM-SHA256"]


_SDS_CACHE: dict[str, secret_pb2.SdsSecretConfig] = {}


def _sds(name: str) -> secret_pb2.SdsSecretConfig:
    """An SDS reference (built once per name; repeated fields copy it on append): the workload's own certificates
    over `sds-grpc` (the pod agent), gateway credentials (`kubernetes://…`) over ADS from the control plane."""
    cfg = _SDS_CACHE.get(name)
    if cfg is None:
        source = pb.ads_sds_config_source() if name.startswith("kubernetes://") else pb.sds_config_source()
        cfg = _SDS_CACHE[name] = secret_pb2.SdsSecretConfig(name=name, sds_config=source)
    return cfg


_SANS = pb.tag(common_pb2.CertificateValidationContext, "match_typed_subject_alt_names")
_SAN_TYPE = pb.tag(common_pb2.SubjectAltNameMatcher, "san_type", VARINT)
_SAN_MATCHER = pb.tag(common_pb2.SubjectAltNameMatcher, "matcher")
_EXACT = pb.tag(string_pb2.StringMatcher, "exact")
_PREFIX = pb.tag(string_pb2.StringMatcher, "prefix")


def _san_matchers_wire(sans: list[str], prefix: bool = False) -> bytes:
    """CertificateValidationContext.match_typed_subject_alt_names serialised: URI matchers for SPIFFE ids, DNS
    otherwise (a cluster per service account in a cold build: cheaper than building the messages)."""
    out = []
    for san in sans:
        san_type = common_pb2.SubjectAltNameMatcher.URI if san.startswith("spiffe://") else \
            common_pb2.SubjectAltNameMatcher.DNS
        matcher = ld(_PREFIX if prefix else _EXACT, san.encode())
        out.append(ld(_SANS, _SAN_TYPE + varint(san_type) + ld(_SAN_MATCHER, matcher)))
    return b"".join(out)


def _san_matchers(vc: common_pb2.CertificateValidationContext, sans: list[str], prefix: bool = False) -> None:
    if sans:
        vc.MergeFromString(_san_matchers_wire(sans, prefix))


_ISTIO_MUTUAL_BASE: dict[bool, tls_pb2.UpstreamTlsContext] = {}


def istio_mutual_upstream(sni: str, sans: list[str], h2: bool) -> tls_pb2.UpstreamTlsContext:
    """ISTIO_MUTUAL: workload cert `default` and root `ROOTCA` over SDS, SANs of the destination's accounts."""
    base = _ISTIO_MUTUAL_BASE.get(h2)
    if base is None:
        base = tls_pb2.UpstreamTlsContext()
        c = base.common_tls_context
        c.tls_certificate_sds_secret_configs.append(_sds(SDS_DEFAULT))
        cvc = c.combined_validation_context
        cvc.default_validation_context.SetInParent()
        cvc.validation_context_sds_secret_config.CopyFrom(_sds(SDS_ROOT))
        c.alpn_protocols.extend(ALPN_IN_MESH_H2 if h2 else ALPN_IN_MESH)
        _ISTIO_MUTUAL_BASE[h2] = base
    ctx = tls_pb2.UpstreamTlsContext()
    ctx.CopyFrom(base)
    ctx.sni = sni
    _san_matchers(ctx.common_tls_context.combined_validation_context.default_validation_context, sans)
    return ctx


# Serialised UpstreamTlsContext minus its SNI, per (SANs, h2): every ISTIO_MUTUAL cluster of a service shares
# it. Fully determined by its key, so it never goes stale; cleared if a huge mesh makes it grow.
_ISTIO_MUTUAL_BYTES: dict[tuple[tuple[str, ...], bool], bytes] = {}
_UPSTREAM_TLS_URL = "type.googleapis.com/" + tls_pb2.UpstreamTlsContext.DESCRIPTOR.full_name
_SNI_FIELD = pb.tag(tls_pb2.UpstreamTlsContext, "sni")


# istio_mutual_upstream("", [], h2) serialised in two parts per h2: its common_tls_context without the
# combined validation context (alpn 4, certificate 6), and that context's root SDS reference (field 2).
_ISTIO_MUTUAL_PARTS: dict[bool, tuple[bytes, bytes]] = {}
_COMMON = pb.tag(tls_pb2.UpstreamTlsContext, "common_tls_context")
_COMBINED = pb.tag(tls_pb2.CommonTlsContext, "combined_validation_context")
_DEFAULT_VALIDATION = pb.tag(tls_pb2.CommonTlsContext.CombinedCertificateValidationContext,
                             "default_validation_context")


def _istio_mutual_head(sans: list[str], h2: bool) -> bytes:
    """istio_mutual_upstream("", sans, h2) serialised: the SAN-less parts (serialised once) around the SANs, in
    field-number order as serialisation writes them (the combined context last in the common one, the default
    validation context first in the combined one); tests compare it with the built context."""
    parts = _ISTIO_MUTUAL_PARTS.get(h2)
    if parts is None:
        common = istio_mutual_upstream("", [], h2).common_tls_context
        root = tls_pb2.CommonTlsContext.CombinedCertificateValidationContext()
        root.CopyFrom(common.combined_validation_context)
        root.ClearField("default_validation_context")
        common.ClearField("combined_validation_context")
        parts = _ISTIO_MUTUAL_PARTS[h2] = (common.SerializeToString(deterministic=True),
                                           root.SerializeToString(deterministic=True))
    common, root = parts
    combined = ld(_DEFAULT_VALIDATION, _san_matchers_wire(sans)) + root
    return ld(_COMMON, common + ld(_COMBINED, combined))


def preset_istio_mutual_socket(ts: pb.base_pb2.TransportSocket) -> None:
    """The parts of tls_socket(istio_mutual_upstream(...)) every cluster shares (its name and type URL): a
    cluster skeleton holds them, so each copy only sets the value (istio_mutual_socket_value), without building
    and packing a context per cluster."""
    ts.name = pb.TLS_SOCKET
    ts.typed_config.type_url = _UPSTREAM_TLS_URL


def istio_mutual_socket_value(sni: str, sans: list[str], h2: bool) -> bytes:
    """The serialised context of an ISTIO_MUTUAL socket: the SNI-less one's bytes followed by the SNI field
    (`sni` has the highest set field number, and serialisation is in field-number order, so appending it gives
    the same bytes)."""
    key = (tuple(sans), h2)
    head = _ISTIO_MUTUAL_BYTES.get(key)
    if head is None:
        if len(_ISTIO_MUTUAL_BYTES) > 10_000:
            _ISTIO_MUTUAL_BYTES.clear()
        head = _ISTIO_MUTUAL_BYTES[key] = _istio_mutual_head(sans, h2)
    if not sni:
        return head
    return head + ld(_SNI_FIELD, sni.encode())


def user_upstream(tls: dict, h2: bool, is_sidecar: bool) -> tls_pb2.UpstreamTlsContext | None:
    """DestinationRule `tls` mode SIMPLE or MUTUAL (ISTIO_MUTUAL and DISABLE are handled by the caller)."""
    mode = tls.get("mode")
    if tls.get("credentialName"):
        if is_sidecar:
            return None  # sidecars cannot fetch Kubernetes secrets; istiod 1.7 drops the context
        ctx = tls_pb2.UpstreamTlsContext(sni=tls.get("sni") or "")
        c = ctx.common_tls_context
        name = tls["credentialName"]
        if mode == "MUTUAL":
            c.tls_certificate_sds_secret_configs.append(_sds(f"kubernetes://{name}"))
        cvc = c.combined_validation_context
        cvc.default_validation_context.SetInParent()
        _san_matchers(cvc.default_validation_context, list(tls.get("subjectAltNames") or []))
        cvc.validation_context_sds_secret_config.CopyFrom(_sds(f"kubernetes://{name}-cacert"))
        if h2:
            c.alpn_protocols.extend(ALPN_H2_ONLY)
        return ctx
    ctx = tls_pb2.UpstreamTlsContext(sni=tls.get("sni") or "")
    c = ctx.common_tls_context
    if mode == "MUTUAL":
        cert, key = tls.get("clientCertificate") or "", tls.get("privateKey") or ""
        if not cert or not key:
            return None
        c.tls_certificate_sds_secret_configs.append(_sds(f"file-cert:{cert}~{key}"))
    ca = tls.get("caCertificates") or ""
    if ca:
        cvc = c.combined_validation_context
        cvc.default_validation_context.SetInParent()
        _san_matchers(cvc.default_validation_context, list(tls.get("subjectAltNames") or []))
        cvc.validation_context_sds_secret_config.CopyFrom(_sds(f"file-root:{ca}"))
    else:
        c.validation_context.SetInParent()
    if h2:
        c.alpn_protocols.extend(ALPN_H2_ONLY)
    return ctx


def inbound_mtls(http: bool, trust_domain: str, drop_mxc: bool = False) -> tls_pb2.DownstreamTlsContext:
    """The server side of Istio mTLS: require a client certificate signed by the mesh root."""
    ctx = tls_pb2.DownstreamTlsContext()
    ctx.require_client_certificate.value = True
    c = ctx.common_tls_context
    if http:
        c.alpn_protocols.extend(ALPN_DOWNSTREAM_HTTP)
    else:
        c.alpn_protocols.extend(a for a in ALPN_DOWNSTREAM_TCP if not (drop_mxc and a == "istio-peer-exchange"))
    c.tls_params.tls_minimum_protocol_version = common_pb2.TlsParameters.TLSv1_2
    c.tls_params.tls_maximum_protocol_version = common_pb2.TlsParameters.TLSv1_3
    c.tls_params.cipher_suites.extend(INBOUND_CIPHERS)
    c.tls_certificate_sds_secret_configs.append(_sds(SDS_DEFAULT))
    cvc = c.combined_validation_context
    cvc.default_validation_context.SetInParent()
    _san_matchers(cvc.default_validation_context, [f"spiffe://{trust_domain}/"], prefix=True)
    cvc.validation_context_sds_secret_config.CopyFrom(_sds(SDS_ROOT))
    return ctx


def tls_socket(ctx) -> pb.base_pb2.TransportSocket:
    return pb.base_pb2.TransportSocket(name=pb.TLS_SOCKET, typed_config=pb.pack(ctx))


def server_tls(server_tls: dict, trust_domain: str) -> tls_pb2.DownstreamTlsContext | None:
    """A Gateway server's `tls` (SIMPLE, MUTUAL, OPTIONAL_MUTUAL, ISTIO_MUTUAL); None for PASSTHROUGH modes."""
    mode = server_tls.get("mode") or "SIMPLE"
    if mode in ("PASSTHROUGH", "AUTO_PASSTHROUGH"):
        return None
    ctx = tls_pb2.DownstreamTlsContext()
    c = ctx.common_tls_context
    c.alpn_protocols.extend(ALPN_DOWNSTREAM_HTTP)
    versions = {"TLS_AUTO": 0, "TLSV1_0": 1, "TLSV1_1": 2, "TLSV1_2": 3, "TLSV1_3": 4}
    if server_tls.get("minProtocolVersion"):
        c.tls_params.tls_minimum_protocol_version = versions.get(server_tls["minProtocolVersion"], 0)
    if server_tls.get("maxProtocolVersion"):
        c.tls_params.tls_maximum_protocol_version = versions.get(server_tls["maxProtocolVersion"], 0)
    if server_tls.get("cipherSuites"):
        c.tls_params.cipher_suites.extend(server_tls["cipherSuites"])
    if mode == "ISTIO_MUTUAL":
        c.tls_certificate_sds_secret_configs.append(_sds(SDS_DEFAULT))
        cvc = c.combined_validation_context
        cvc.default_validation_context.SetInParent()
        _san_matchers(cvc.default_validation_context, list(server_tls.get("subjectAltNames") or []))
        cvc.validation_context_sds_secret_config.CopyFrom(_sds(SDS_ROOT))
        ctx.require_client_certificate.value = True
        return ctx
    cred = server_tls.get("credentialName")
    if cred:
        c.tls_certificate_sds_secret_configs.append(_sds(f"kubernetes://{cred}"))
        root = f"kubernetes://{cred}-cacert"
    else:
        c.tls_certificate_sds_secret_configs.append(
            _sds(f"file-cert:{server_tls.get('serverCertificate', '')}~{server_tls.get('privateKey', '')}"))
        root = f"file-root:{server_tls['caCertificates']}" if server_tls.get("caCertificates") else ""
    if mode in ("MUTUAL", "OPTIONAL_MUTUAL"):
        ctx.require_client_certificate.value = mode == "MUTUAL"
        cvc = c.combined_validation_context
        cvc.default_validation_context.SetInParent()
        _san_matchers(cvc.default_validation_context, list(server_tls.get("subjectAltNames") or []))
        cvc.validation_context_sds_secret_config.CopyFrom(_sds(root or f"kubernetes://{cred}-cacert"))
    return ctx
