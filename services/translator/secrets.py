"""Secret (SDS) resources: gateway credentials named by `credentialName`, served over ADS as istiod does.

A Gateway server's (or an egress DestinationRule's) `credentialName: NAME` becomes the SDS resources
`kubernetes://NAME` (certificate chain and key) and `kubernetes://NAME-cacert` (the CA that verifies clients,
from NAME's `ca.crt`/`cacert` or else from a Secret named `NAME-cacert`), read from the Secrets in the gateway
workload's own namespace (Istio's rule: a gateway only reads credentials beside it).
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

from mizzen.services.mesh.secrets import credential

from .push_context import ProxyView, PushContext

PREFIX = "kubernetes://"
CA_SUFFIX = "-cacert"


def credential_names(view: ProxyView, push: PushContext) -> list[str]:
    """Every credentialName the proxy's gateways and the DestinationRules it sees refer to, in order."""
    names: dict[str, None] = {}
    for gw in view.gateways:
        for server in gw.spec.get("servers") or []:
            name = (server.get("tls") or {}).get("credentialName")
            if name:
                names[name] = None
    for rules in push.destination_rules.values():
        for dr in rules.values():
            for policy in _policies(dr.spec):
                name = (policy.get("tls") or {}).get("credentialName")
                if name:
                    names[name] = None
    return list(names)


def _policies(spec: dict):
    for tp in [spec.get("trafficPolicy") or {}, *((s.get("trafficPolicy") or {}) for s in spec.get("subsets") or [])]:
        yield tp
        yield from tp.get("portLevelSettings") or []


def gateway_secrets(push: PushContext, view: ProxyView) -> list[secret_pb2.Secret]:
    out: list[secret_pb2.Secret] = []
    for name in credential_names(view, push):
        obj = push.secrets.get((view.namespace, name))
        cred = credential(obj) if obj is not None else None
        if cred is not None and cred.cert and cred.key:
            s = secret_pb2.Secret(name=PREFIX + name)
            s.tls_certificate.certificate_chain.CopyFrom(base_pb2.DataSource(inline_bytes=cred.cert))
            s.tls_certificate.private_key.CopyFrom(base_pb2.DataSource(inline_bytes=cred.key))
            out.append(s)
        ca = cred.ca if cred is not None else b""
        if not ca and (extra := push.secrets.get((view.namespace, name + CA_SUFFIX))) is not None:
            ca = credential(extra).ca
        if ca:
            out.append(secret_pb2.Secret(name=PREFIX + name + CA_SUFFIX, validation_context=common_pb2.
                                         CertificateValidationContext(trusted_ca=base_pb2.DataSource(inline_bytes=ca))))
    return out
