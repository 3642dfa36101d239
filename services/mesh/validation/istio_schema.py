"""The shape of every Istio resource Mizzen accepts, field by field (istio/api `networking/v1alpha3`,
`security/v1beta1`; all served versions share one schema). Field names are the protobuf JSON names users write.
"""

from __future__ import annotations

from .schema import (
    Bool,
    Duration,
    Int,
    Int32,
    List,
    Map,
    Num,
    Obj,
    Opaque,
    Str,
    UInt32,
)

UINT64 = Int(0, 2**64 - 1)

STRING_MATCH = Obj({"exact": Str(), "prefix": Str(), "regex": Str()}, oneof=(("exact", "prefix", "regex"),))
PORT_SELECTOR = Obj({"number": UInt32()})
DESTINATION = Obj({"host": Str(), "subset": Str(), "port": PORT_SELECTOR}, required=("host",))
PERCENT = Obj({"value": Num()})
HEADER_OPERATIONS = Obj({"set": Map(Str()), "add": Map(Str()), "remove": List(Str())})
HEADERS = Obj({"request": HEADER_OPERATIONS, "response": HEADER_OPERATIONS})
LABELS = Map(Str())

# ---- VirtualService --------------------------------------------------------------------------------------------

HTTP_MATCH = Obj({
    "name": Str(),
    "uri": STRING_MATCH,
    "scheme": STRING_MATCH,
    "method": STRING_MATCH,
    "authority": STRING_MATCH,
    "headers": Map(STRING_MATCH),
    "port": UInt32(),
    "sourceLabels": LABELS,
    "gateways": List(Str()),
    "queryParams": Map(STRING_MATCH),
    "ignoreUriCase": Bool(),
    "withoutHeaders": Map(STRING_MATCH),
    "sourceNamespace": Str(),
    "statPrefix": Str(),
})

HTTP_ROUTE_DESTINATION = Obj(
    {"destination": DESTINATION, "weight": Int32(), "headers": HEADERS},
    required={"destination": "destination is required"},
)

HTTP_REDIRECT = Obj(
    {
        "uri": Str(),
        "authority": Str(),
        "port": UInt32(),
        "derivePort": Str(enum=("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT")),
        "scheme": Str(),
        "redirectCode": UInt32(),
        "prefixRewrite": Str(),
    },
    oneof=(("port", "derivePort"),),
)

HTTP_DIRECT_RESPONSE = Obj(
    {"status": UInt32(), "body": Obj({"string": Str(), "bytes": Str()}, oneof=(("string", "bytes"),))},
    required=("status",),
)

HTTP_REWRITE = Obj({
    "uri": Str(),
    "authority": Str(),
    "uriRegexRewrite": Obj({"match": Str(), "rewrite": Str()}),
})

HTTP_RETRY = Obj({
    "attempts": Int32(),
    "perTryTimeout": Duration(),
    "retryOn": Str(),
    "retryRemoteLocalities": Bool(),
    "retryIgnorePreviousHosts": Bool(),
    "backoff": Duration(),
})

HTTP_FAULT = Obj({
    "delay": Obj(
        {"fixedDelay": Duration(), "exponentialDelay": Duration(), "percent": Int32(), "percentage": PERCENT},
        oneof=(("fixedDelay", "exponentialDelay"),),
    ),
    "abort": Obj(
        {"httpStatus": Int32(), "grpcStatus": Str(), "http2Error": Str(), "percentage": PERCENT},
        oneof=(("httpStatus", "grpcStatus", "http2Error"),),
    ),
})

CORS_POLICY = Obj({
    "allowOrigin": List(Str()),
    "allowOrigins": List(STRING_MATCH),
    "allowMethods": List(Str()),
    "allowHeaders": List(Str()),
    "exposeHeaders": List(Str()),
    "maxAge": Duration(),
    "allowCredentials": Bool(),
    "unmatchedPreflights": Str(enum=("UNSPECIFIED", "FORWARD", "IGNORE")),
})

HTTP_MIRROR_POLICY = Obj({"destination": DESTINATION, "percentage": PERCENT},
                         required={"destination": "destination is required for mirrors"})

HTTP_ROUTE = Obj({
    "name": Str(),
    "match": List(HTTP_MATCH),
    "route": List(HTTP_ROUTE_DESTINATION),
    "redirect": HTTP_REDIRECT,
    "directResponse": HTTP_DIRECT_RESPONSE,
    "delegate": Obj({"name": Str(), "namespace": Str()}),
    "rewrite": HTTP_REWRITE,
    "timeout": Duration(),
    "retries": HTTP_RETRY,
    "fault": HTTP_FAULT,
    "mirror": DESTINATION,
    "mirrors": List(HTTP_MIRROR_POLICY),
    "mirrorPercent": UInt32(),
    "mirror_percent": UInt32(),  # the deprecated field's JSON name, as the CRD lists it
    "mirrorPercentage": PERCENT,
    "corsPolicy": CORS_POLICY,
    "headers": HEADERS,
})

TLS_MATCH = Obj(
    {
        "sniHosts": List(Str()),
        "destinationSubnets": List(Str()),
        "port": UInt32(),
        "sourceLabels": LABELS,
        "gateways": List(Str()),
        "sourceNamespace": Str(),
    },
    required={"sniHosts": "TLS match must have at least one SNI host"},
)

L4_MATCH = Obj({
    "destinationSubnets": List(Str()),
    "port": UInt32(),
    "sourceSubnet": Str(),
    "sourceLabels": LABELS,
    "gateways": List(Str()),
    "sourceNamespace": Str(),
})

ROUTE_DESTINATION = Obj({"destination": DESTINATION, "weight": Int32()},
                        required={"destination": "destination is required"})

TLS_ROUTE = Obj({"match": List(TLS_MATCH), "route": List(ROUTE_DESTINATION)},
                required={"match": "TLS route must have at least one match condition"})
TCP_ROUTE = Obj({"match": List(L4_MATCH), "route": List(ROUTE_DESTINATION)})

VIRTUAL_SERVICE = Obj({
    "hosts": List(Str()),
    "gateways": List(Str()),
    "http": List(HTTP_ROUTE),
    "tls": List(TLS_ROUTE),
    "tcp": List(TCP_ROUTE),
    "exportTo": List(Str()),
})

# ---- DestinationRule -------------------------------------------------------------------------------------------

CLIENT_TLS = Obj({
    "mode": Str(enum=("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")),
    "clientCertificate": Str(),
    "privateKey": Str(),
    "caCertificates": Str(),
    "credentialName": Str(),
    "subjectAltNames": List(Str()),
    "sni": Str(),
    "insecureSkipVerify": Bool(),
    "caCrl": Str(),
})

CONNECTION_POOL = Obj({
    "tcp": Obj({
        "maxConnections": Int32(),
        "connectTimeout": Duration(),
        "tcpKeepalive": Obj({"probes": UInt32(), "time": Duration(), "interval": Duration()}),
        "maxConnectionDuration": Duration(),
        "idleTimeout": Duration(strict=False),
    }),
    "http": Obj({
        "http1MaxPendingRequests": Int32(),
        "http2MaxRequests": Int32(),
        "maxRequestsPerConnection": Int32(),
        "maxRetries": Int32(),
        "idleTimeout": Duration(),
        "h2UpgradePolicy": Str(enum=("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE")),
        "useClientProtocol": Bool(),
        "maxConcurrentStreams": Int32(),
        "http2KeepAlive": Obj({"interval": Duration(), "timeout": Duration()}),
    }),
})

OUTLIER_DETECTION = Obj({
    "consecutiveErrors": Int32(),
    "splitExternalLocalOriginErrors": Bool(),
    "consecutiveLocalOriginFailures": UInt32(),
    "consecutiveGatewayErrors": UInt32(),
    "consecutive5xxErrors": UInt32(),
    "interval": Duration(),
    "baseEjectionTime": Duration(),
    "maxEjectionPercent": Int32(),
    "minHealthPercent": Int32(),
    "outlierDetectionHttpErrorCodes": List(Int(100, 599)),
})

_FAILOVER = List(Obj({"from": Str(), "to": Str()}))

# also MeshConfig.localityLbSetting (the mesh-wide default), validated by the same rules
LOCALITY_LB_SETTING = Obj({
    "distribute": List(Obj({"from": Str(), "to": Map(UInt32())})),
    "failover": _FAILOVER,
    "failoverPriority": List(Str()),
    "enabled": Bool(),
})

LOAD_BALANCER = Obj(
    {
        "simple": Str(enum=("UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST")),
        "consistentHash": Obj(
            {
                "httpHeaderName": Str(),
                "httpCookie": Obj(
                    {
                        "name": Str(),
                        "path": Str(),
                        "ttl": Duration(strict=False),
                        "attributes": List(Obj({"name": Str(), "value": Str()}, required=("name",))),
                    },
                    required={"name": "name required for HttpCookie"},
                ),
                "useSourceIp": Bool(),
                "httpQueryParameterName": Str(),
                "ringHash": Obj({"minimumRingSize": UINT64}),
                "maglev": Obj({"tableSize": UINT64}),
                "minimumRingSize": UINT64,
            },
            oneof=(("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName"), ("ringHash", "maglev")),
        ),
        "localityLbSetting": LOCALITY_LB_SETTING,
        "zoneAwareLbSetting": Obj({
            "enabled": Bool(),
            "failover": _FAILOVER,
            "failoverPriority": List(Str()),
            "minClusterSize": Int(1, 2**64 - 1),
        }),
        "warmupDurationSecs": Duration(),
        "warmup": Obj(
            {"duration": Duration(), "minimumPercent": Num(0, 100), "aggression": Num(0)},
            required=("duration",),
        ),
    },
    oneof=(("simple", "consistentHash"),),
)

PORT_TRAFFIC_POLICY = Obj({
    "port": PORT_SELECTOR,
    "loadBalancer": LOAD_BALANCER,
    "connectionPool": CONNECTION_POOL,
    "outlierDetection": OUTLIER_DETECTION,
    "tls": CLIENT_TLS,
})

TRAFFIC_POLICY = Obj({
    "loadBalancer": LOAD_BALANCER,
    "connectionPool": CONNECTION_POOL,
    "outlierDetection": OUTLIER_DETECTION,
    "tls": CLIENT_TLS,
    "portLevelSettings": List(PORT_TRAFFIC_POLICY, max_items=4096),
    "tunnel": Obj({"protocol": Str(), "targetHost": Str(), "targetPort": UInt32()},
                  required=("targetHost", "targetPort")),
    "proxyProtocol": Obj({"version": Str(enum=("V1", "V2"))}),
    "retryBudget": Obj({"percent": Num(0, 100), "minRetryConcurrency": UInt32(),
                        "budgetInterval": Duration(strict=False)}),
})

SUBSET = Obj({"name": Str(), "labels": LABELS, "trafficPolicy": TRAFFIC_POLICY},
             required={"name": "subset name cannot be empty"})

POLICY_SELECTOR = Obj({"matchLabels": Map(Str(), max_props=4096)})

DESTINATION_RULE = Obj(
    {
        "host": Str(),
        "trafficPolicy": TRAFFIC_POLICY,
        "subsets": List(SUBSET),
        "exportTo": List(Str()),
        "workloadSelector": POLICY_SELECTOR,
    },
    required=("host",),
)

# ---- Gateway and Sidecar ---------------------------------------------------------------------------------------

TLS_VERSIONS = ("TLS_AUTO", "TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3")

SERVER_TLS = Obj({
    "httpsRedirect": Bool(),
    "mode": Str(enum=("PASSTHROUGH", "SIMPLE", "MUTUAL", "AUTO_PASSTHROUGH", "ISTIO_MUTUAL", "OPTIONAL_MUTUAL")),
    "serverCertificate": Str(),
    "privateKey": Str(),
    "caCertificates": Str(),
    "caCrl": Str(),
    "credentialName": Str(),
    "credentialNames": List(Str(), min_items=1, max_items=2),
    "caCertCredentialName": Str(),
    "tlsCertificates": List(
        Obj({"serverCertificate": Str(), "privateKey": Str(), "caCertificates": Str()}), min_items=1, max_items=2),
    "subjectAltNames": List(Str()),
    "verifyCertificateSpki": List(Str()),
    "verifyCertificateHash": List(Str()),
    "minProtocolVersion": Str(enum=TLS_VERSIONS),
    "maxProtocolVersion": Str(enum=TLS_VERSIONS),
    "cipherSuites": List(Str()),
    "insecureSkipVerify": Bool(),
})

_PORT_FIELDS = {"number": UInt32(), "protocol": Str(), "name": Str(), "targetPort": UInt32()}
GATEWAY_PORT = Obj(_PORT_FIELDS, required=("number", "protocol", "name"))

SERVER = Obj(
    {
        "port": GATEWAY_PORT,
        "bind": Str(),
        "hosts": List(Str()),
        "tls": SERVER_TLS,
        "defaultEndpoint": Str(),
        "name": Str(),
    },
    required={"port": "port is required", "hosts": "server config must contain at least one host"},
)

GATEWAY = Obj({"servers": List(SERVER), "selector": LABELS})

SIDECAR_PORT = Obj(_PORT_FIELDS)
CAPTURE_MODES = ("DEFAULT", "IPTABLES", "NONE")

SIDECAR = Obj({
    "workloadSelector": Obj({"labels": Map(Str(), max_props=256)}),
    "ingress": List(Obj(
        {
            "port": SIDECAR_PORT,
            "bind": Str(),
            "captureMode": Str(enum=CAPTURE_MODES),
            "defaultEndpoint": Str(),
            "tls": SERVER_TLS,
            "connectionPool": CONNECTION_POOL,
        },
        required={"port": "sidecar: port is required for ingress listeners"},
    )),
    "egress": List(Obj(
        {"port": SIDECAR_PORT, "bind": Str(), "captureMode": Str(enum=CAPTURE_MODES), "hosts": List(Str())},
        required={"hosts": "sidecar: egress listener must contain at least one host"},
    )),
    "inboundConnectionPool": CONNECTION_POOL,
    "outboundTrafficPolicy": Obj({"mode": Str(enum=("REGISTRY_ONLY", "ALLOW_ANY")), "egressProxy": DESTINATION}),
})

# ---- ServiceEntry and WorkloadEntry ----------------------------------------------------------------------------

WORKLOAD_ENTRY = Obj({
    "address": Str(max_len=256),
    "ports": Map(UInt32(), max_props=128),
    "labels": Map(Str(), max_props=256),
    "network": Str(max_len=2048),
    "locality": Str(max_len=2048),
    "weight": UInt32(),
    "serviceAccount": Str(max_len=253),
})

SERVICE_ENTRY_PORT = Obj(
    {"number": UInt32(), "protocol": Str(max_len=256), "name": Str(max_len=256), "targetPort": UInt32()},
    required=("number", "name"),
)

SERVICE_ENTRY = Obj(
    {
        "hosts": List(Str(), max_items=256),
        "addresses": List(Str(max_len=64), max_items=256),
        "ports": List(SERVICE_ENTRY_PORT, max_items=256),
        "location": Str(enum=("MESH_EXTERNAL", "MESH_INTERNAL")),
        "resolution": Str(enum=("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN", "DYNAMIC_DNS")),
        "endpoints": List(WORKLOAD_ENTRY, max_items=4096),
        "workloadSelector": Obj({"labels": Map(Str(), max_props=256)}),
        "exportTo": List(Str()),
        "subjectAltNames": List(Str()),
    },
    required={"hosts": "service entry must have at least one host"},
)

# ---- PeerAuthentication ----------------------------------------------------------------------------------------

MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")

PEER_AUTHENTICATION = Obj({
    "selector": POLICY_SELECTOR,
    "mtls": Obj({"mode": Str(enum=MTLS_MODES)}),
    "portLevelMtls": Map(Obj({"mode": Str(enum=MTLS_MODES)}), int_keys=True),
})

# ---- AuthorizationPolicy / RequestAuthentication (istio/api security/v1beta1, served as v1 and v1beta1) ------

POLICY_TARGET_REFERENCE = Obj(
    {"group": Str(max_len=253), "kind": Str(max_len=63), "name": Str(max_len=253), "namespace": Str()},
    required=("kind", "name"),
)
_STRINGS = List(Str())

AUTHZ_SOURCE = Obj({
    "principals": _STRINGS, "notPrincipals": _STRINGS,
    "requestPrincipals": _STRINGS, "notRequestPrincipals": _STRINGS,
    "namespaces": _STRINGS, "notNamespaces": _STRINGS,
    "serviceAccounts": List(Str(max_len=320), max_items=16), "notServiceAccounts": List(Str(max_len=320), max_items=16),
    "trustDomains": _STRINGS, "notTrustDomains": _STRINGS,
    "ipBlocks": _STRINGS, "notIpBlocks": _STRINGS,
    "remoteIpBlocks": _STRINGS, "notRemoteIpBlocks": _STRINGS,
})

AUTHZ_OPERATION = Obj({
    "hosts": _STRINGS, "notHosts": _STRINGS, "ports": _STRINGS, "notPorts": _STRINGS,
    "methods": _STRINGS, "notMethods": _STRINGS, "paths": _STRINGS, "notPaths": _STRINGS,
})

AUTHZ_RULE = Obj({
    "from": List(Obj({"source": AUTHZ_SOURCE}), max_items=512),
    "to": List(Obj({"operation": AUTHZ_OPERATION})),
    "when": List(Obj({"key": Str(), "values": _STRINGS, "notValues": _STRINGS}, required=("key",))),
})

AUTHORIZATION_POLICY = Obj({
    "selector": POLICY_SELECTOR,
    "targetRef": POLICY_TARGET_REFERENCE,
    "targetRefs": List(POLICY_TARGET_REFERENCE, max_items=16),
    "rules": List(AUTHZ_RULE, max_items=512),
    "action": Str(enum=("ALLOW", "DENY", "AUDIT", "CUSTOM")),
    "provider": Obj({"name": Str()}),
})

JWT_RULE = Obj(
    {
        "issuer": Str(),
        "audiences": _STRINGS,
        "jwksUri": Str(max_len=2048),
        "jwks_uri": Str(max_len=2048),
        "jwks": Str(),
        "fromHeaders": List(Obj({"name": Str(), "prefix": Str()}, required=("name",))),
        "fromParams": _STRINGS,
        "fromCookies": _STRINGS,
        "outputPayloadToHeader": Str(),
        "forwardOriginalToken": Bool(),
        "outputClaimToHeaders": List(Obj({"header": Str(), "claim": Str()}, required=("header", "claim"))),
        "spaceDelimitedClaims": List(Str(), max_items=64),
        "timeout": Duration(),
        "presence": Str(enum=("OPTIONAL", "REQUIRED")),
    },
    oneof=(("jwksUri", "jwks_uri", "jwks"),),
)

REQUEST_AUTHENTICATION = Obj({
    "selector": POLICY_SELECTOR,
    "targetRef": POLICY_TARGET_REFERENCE,
    "targetRefs": List(POLICY_TARGET_REFERENCE, max_items=16),
    "jwtRules": List(JWT_RULE, max_items=4096),
})

# ---- EnvoyFilter ------------------------------------------------------------------------------------------------

EF_APPLY_TO = ("INVALID", "LISTENER", "FILTER_CHAIN", "NETWORK_FILTER", "HTTP_FILTER", "ROUTE_CONFIGURATION",
               "VIRTUAL_HOST", "HTTP_ROUTE", "CLUSTER", "EXTENSION_CONFIG", "BOOTSTRAP", "LISTENER_FILTER")
EF_CONTEXTS = ("ANY", "SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "GATEWAY", "WAYPOINT")
EF_OPERATIONS = ("INVALID", "MERGE", "ADD", "REMOVE", "INSERT_BEFORE", "INSERT_AFTER", "INSERT_FIRST", "REPLACE")
ENVOY_FILTER = Obj({
    "workloadSelector": Obj({"labels": Map(Str(), max_props=256)}),
    "targetRefs": List(POLICY_TARGET_REFERENCE, max_items=16),
    "configPatches": List(Obj({
        "applyTo": Str(enum=EF_APPLY_TO),
        "match": Obj({
            "context": Str(enum=EF_CONTEXTS),
            "proxy": Obj({"proxyVersion": Str(), "metadata": Map(Str())}),
            "listener": Obj({
                "portNumber": UInt32(),
                "portName": Str(),
                "filterChain": Obj({
                    "name": Str(), "sni": Str(), "transportProtocol": Str(), "applicationProtocols": Str(),
                    "filter": Obj({"name": Str(), "subFilter": Obj({"name": Str()})}),
                    "destinationPort": UInt32(),
                }),
                "listenerFilter": Str(),
                "name": Str(),
            }),
            "routeConfiguration": Obj({
                "portNumber": UInt32(), "portName": Str(), "gateway": Str(), "name": Str(),
                "vhost": Obj({"name": Str(), "domainName": Str(),
                              "route": Obj({"name": Str(), "action": Str(enum=("ANY", "ROUTE", "REDIRECT",
                                                                               "DIRECT_RESPONSE"))})}),
            }),
            "cluster": Obj({"portNumber": UInt32(), "service": Str(), "subset": Str(), "name": Str()}),
        }, oneof=(("listener", "routeConfiguration", "cluster"),)),
        "patch": Obj({"operation": Str(enum=EF_OPERATIONS), "value": Opaque(),
                      "filterClass": Str(enum=("UNSPECIFIED", "AUTHN", "AUTHZ", "STATS"))}),
    })),
    "priority": Int32(),
})

SPECS: dict[str, Obj] = {
    "VirtualService": VIRTUAL_SERVICE,
    "DestinationRule": DESTINATION_RULE,
    "Gateway": GATEWAY,
    "Sidecar": SIDECAR,
    "ServiceEntry": SERVICE_ENTRY,
    "WorkloadEntry": WORKLOAD_ENTRY,
    "PeerAuthentication": PEER_AUTHENTICATION,
    "AuthorizationPolicy": AUTHORIZATION_POLICY,
    "RequestAuthentication": REQUEST_AUTHENTICATION,
    "EnvoyFilter": ENVOY_FILTER,
}

# Kinds whose CRD requires `spec` (the others validate an absent spec as an empty one).
SPEC_REQUIRED = {"ServiceEntry", "WorkloadEntry"}


def top_level(kind: str) -> Obj:
    """The whole object: apiVersion/kind/metadata are checked by `check_documents`; status is server-owned."""
    fields = {"apiVersion": Str(), "kind": Str(), "metadata": Opaque(), "spec": SPECS[kind], "status": Opaque()}
    return Obj(fields, required=("spec",) if kind in SPEC_REQUIRED else ())
