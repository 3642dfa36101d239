"""Validators for the Kubernetes kinds (Namespace, Node, Service, Endpoints, EndpointSlice, Pod, Secret).

The fields the mesh reads are checked the way the Kubernetes API server checks them (`pkg/apis/core/validation`,
`pkg/apis/discovery/validation`, with their error wording); parts of a Pod the mesh never reads (volumes, probes,
resources, …) are accepted as they are, but their field names are still checked so typos surface.
Deliberate differences, because Mizzen describes workloads but never runs them: endpoint addresses may be
loopback (see `common.k8s_endpoint_ip_errors`), and a Pod needs neither containers nor images (a Pod may be just
a name, labels, a service account and an IP); whatever a Pod does declare is checked as Kubernetes would.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable

from .. import meshconfig, settings
from ..errors import FieldError
from . import register
from .common import (
    K8S_IP_HINT,
    Errs,
    check_export_to,
    check_k8s_labels,
    iana_port_name_errors,
    invalid,
    ip_subnet_error,
    is_ip,
    k8s_dns1035_errors,
    k8s_endpoint_ip_errors,
    k8s_ip_errors,
    k8s_label_errors,
    k8s_port_error,
    k8s_subdomain_errors,
    label_value_errors,
    qualified_name_errors,
)
from .destinationrule import check_locality_lb
from .istio_schema import LOCALITY_LB_SETTING
from .schema import Bool, Int32, IntOrStr, List, Map, Obj, Opaque, Str, check, child, index, key

PROTOCOLS = ("SCTP", "TCP", "UDP")
EXPORT_TO_ANNOTATION = "networking.istio.io/exportTo"

OBJECT_REFERENCE = Obj({
    "kind": Str(), "namespace": Str(), "name": Str(), "uid": Str(), "apiVersion": Str(), "resourceVersion": Str(),
    "fieldPath": Str(),
})

# ---- schemas ---------------------------------------------------------------------------------------------------

NAMESPACE = Obj({
    "apiVersion": Str(), "kind": Str(), "metadata": Opaque(),
    "spec": Obj({"finalizers": List(Str())}),
    "status": Opaque(),
})

TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
NODE = Obj({
    "apiVersion": Str(), "kind": Str(), "metadata": Opaque(),
    "spec": Obj({
        "podCIDR": Str(), "podCIDRs": List(Str()), "providerID": Str(), "unschedulable": Bool(),
        "taints": List(Obj({"key": Str(), "value": Str(), "effect": Str(enum=TAINT_EFFECTS), "timeAdded": Str()})),
        "configSource": Opaque(), "externalID": Str(),
    }),
    "status": Opaque(),  # the kubelet's; the mesh reads only a Node's labels
})

SERVICE_PORT = Obj({
    "name": Str(), "protocol": Str(enum=PROTOCOLS), "appProtocol": Str(), "port": Int32(),
    "targetPort": IntOrStr(), "nodePort": Int32(),
})

SERVICE = Obj({
    "apiVersion": Str(), "kind": Str(), "metadata": Opaque(),
    "spec": Obj({
        "ports": List(SERVICE_PORT),
        "selector": Map(Str()),
        "clusterIP": Str(),
        "clusterIPs": List(Str(), max_items=2),
        "type": Str(enum=("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")),
        "externalIPs": List(Str()),
        "sessionAffinity": Str(enum=("None", "ClientIP")),
        "loadBalancerIP": Str(),
        "loadBalancerSourceRanges": List(Str()),
        "externalName": Str(),
        "externalTrafficPolicy": Str(enum=("Cluster", "Local")),
        "healthCheckNodePort": Int32(),
        "publishNotReadyAddresses": Bool(),
        "sessionAffinityConfig": Obj({"clientIP": Obj({"timeoutSeconds": Int32()})}),
        "ipFamilies": List(Str(enum=("IPv4", "IPv6")), max_items=2),
        "ipFamilyPolicy": Str(enum=("SingleStack", "PreferDualStack", "RequireDualStack")),
        "allocateLoadBalancerNodePorts": Bool(),
        "loadBalancerClass": Str(),
        "internalTrafficPolicy": Str(enum=("Cluster", "Local")),
        "trafficDistribution": Str(),
    }),
    "status": Opaque(),
})

ENDPOINT_ADDRESS = Obj({"ip": Str(), "hostname": Str(), "nodeName": Str(), "targetRef": OBJECT_REFERENCE},
                       required=("ip",))
ENDPOINT_PORT = Obj({"name": Str(), "port": Int32(), "protocol": Str(enum=PROTOCOLS), "appProtocol": Str()})

ENDPOINTS = Obj({
    "apiVersion": Str(), "kind": Str(), "metadata": Opaque(),
    "subsets": List(Obj({
        "addresses": List(ENDPOINT_ADDRESS),
        "notReadyAddresses": List(ENDPOINT_ADDRESS),
        "ports": List(ENDPOINT_PORT),
    })),
})

SLICE_ENDPOINT = Obj(
    {
        "addresses": List(Str()),
        "conditions": Obj({"ready": Bool(), "serving": Bool(), "terminating": Bool()}),
        "hostname": Str(),
        "targetRef": OBJECT_REFERENCE,
        "nodeName": Str(),
        "zone": Str(),
        "hints": Obj({"forZones": List(Obj({"name": Str()})), "forNodes": List(Obj({"name": Str()}))}),
        "deprecatedTopology": Map(Str()),
    },
    required={"addresses": "Required value: must contain at least 1 address"},
)

ENDPOINT_SLICE = Obj(
    {
        "apiVersion": Str(), "kind": Str(), "metadata": Opaque(),
        "addressType": Str(enum=("IPv4", "IPv6", "FQDN")),
        "endpoints": List(SLICE_ENDPOINT, max_items=1000),
        "ports": List(ENDPOINT_PORT, max_items=20000),
    },
    required=("addressType",),
)

CONTAINER_PORT = Obj({
    "name": Str(), "hostPort": Int32(), "containerPort": Int32(), "protocol": Str(enum=PROTOCOLS), "hostIP": Str(),
})

# Container and PodSpec fields the mesh does not read are kept opaque; listing them still catches typos.
_CONTAINER_OPAQUE = (
    "command", "args", "workingDir", "envFrom", "env", "resources", "resizePolicy", "restartPolicy",
    "restartPolicyRules", "volumeMounts", "volumeDevices", "livenessProbe", "readinessProbe", "startupProbe",
    "lifecycle", "terminationMessagePath", "terminationMessagePolicy", "imagePullPolicy", "securityContext", "stdin",
    "stdinOnce", "tty", "targetContainerName",
)
CONTAINER = Obj({"name": Str(), "image": Str(), "ports": List(CONTAINER_PORT),
                 **{f: Opaque() for f in _CONTAINER_OPAQUE}})

_POD_SPEC_OPAQUE = (
    "volumes", "ephemeralContainers", "restartPolicy", "terminationGracePeriodSeconds", "activeDeadlineSeconds",
    "dnsPolicy", "nodeSelector", "automountServiceAccountToken", "hostPID", "hostIPC", "shareProcessNamespace",
    "securityContext", "imagePullSecrets", "affinity", "schedulerName", "tolerations", "hostAliases",
    "priorityClassName", "priority", "dnsConfig", "readinessGates", "runtimeClassName", "enableServiceLinks",
    "preemptionPolicy", "overhead", "topologySpreadConstraints", "setHostnameAsFQDN", "os", "hostUsers",
    "schedulingGates", "resourceClaims", "resources", "hostnameOverride",
)
POD_SPEC = Obj({
    "containers": List(CONTAINER),
    "initContainers": List(CONTAINER),
    "serviceAccountName": Str(),
    "serviceAccount": Str(),
    "nodeName": Str(),
    "hostNetwork": Bool(),
    "hostname": Str(),
    "subdomain": Str(),
    **{f: Opaque() for f in _POD_SPEC_OPAQUE},
})
_POD_IP = Obj({"ip": Str()}, required=("ip",))
POD_STATUS = Obj(
    {"podIP": Str(), "podIPs": List(_POD_IP), "hostIP": Str(), "hostIPs": List(_POD_IP),
     "phase": Str(enum=("Pending", "Running", "Succeeded", "Failed", "Unknown"))},
    open=True,  # the rest of a Pod's status is the kubelet's business
)
POD = Obj({"apiVersion": Str(), "kind": Str(), "metadata": Opaque(), "spec": POD_SPEC, "status": POD_STATUS})


# ---- rules -----------------------------------------------------------------------------------------------------


def _invalid_all(errs: Errs, path: str, value: object, messages: list[str]) -> None:
    for m in messages:
        errs.add(path, invalid(value, m))


def check_namespace(obj: dict, errs: Errs) -> None:
    name = obj["metadata"]["name"]
    _invalid_all(errs, "metadata.name", name, k8s_label_errors(name))


def check_node(obj: dict, errs: Errs) -> None:
    """Kubernetes' ValidateNode for the fields a Node spec may carry (the name is a DNS subdomain, checked
    with the metadata). Its labels (the topology ones give its pods' locality) are checked with the metadata."""
    spec = obj.get("spec", {})
    cidrs = spec.get("podCIDRs", [])
    for i, cidr in enumerate(cidrs):
        if "/" not in cidr or ip_subnet_error(cidr):
            errs.add(index("spec.podCIDRs", i), invalid(cidr, "must be a valid CIDR"))
    if len(cidrs) > 2:
        errs.add("spec.podCIDRs", invalid(cidrs, "may specify no more than one CIDR for each IP family"))
    pod_cidr = spec.get("podCIDR", "")
    if pod_cidr and ("/" not in pod_cidr or ip_subnet_error(pod_cidr)):
        errs.add("spec.podCIDR", invalid(pod_cidr, "must be a valid CIDR"))
    if pod_cidr and cidrs and cidrs[0] != pod_cidr:
        errs.add("spec.podCIDRs[0]", invalid(cidrs[0], "must be the same as spec.podCIDR"))
    seen: set[tuple[str, str]] = set()
    for i, taint in enumerate(spec.get("taints", [])):
        at = index("spec.taints", i)
        name = taint.get("key", "")
        if not name:
            errs.add(child(at, "key"), "Required value")
        else:
            _invalid_all(errs, child(at, "key"), name, qualified_name_errors(name))
        if taint.get("value"):
            _invalid_all(errs, child(at, "value"), taint["value"], label_value_errors(taint["value"]))
        effect = taint.get("effect", "")
        if not effect:
            errs.add(child(at, "effect"), "Required value")
        elif (name, effect) in seen:
            errs.add(at, f'Duplicate value: "{name}:{effect}": taints must be unique by key and effect pair')
        seen.add((name, effect))


def check_service(obj: dict, errs: Errs) -> None:
    meta = obj["metadata"]
    _invalid_all(errs, "metadata.name", meta["name"], k8s_dns1035_errors(meta["name"]))
    spec = obj.get("spec", {})
    svc_type = spec.get("type", "ClusterIP")
    cluster_ip = spec.get("clusterIP", "")
    ports = spec.get("ports", [])
    if not ports and cluster_ip != "None" and svc_type != "ExternalName":
        errs.add("spec.ports", "Required value")

    names: set[str] = set()
    pairs: set[tuple[int, str]] = set()
    for i, port in enumerate(ports):
        at = index("spec.ports", i)
        name = port.get("name", "")
        if not name:
            if len(ports) > 1:
                errs.add(child(at, "name"), "Required value")
        else:
            _invalid_all(errs, child(at, "name"), name, k8s_label_errors(name))
            if name in names:
                errs.add(child(at, "name"), f'Duplicate value: "{name}"')
            names.add(name)
        number = port.get("port", 0)
        errs.add(child(at, "port"), k8s_port_error(number))
        _check_target_port(port.get("targetPort"), child(at, "targetPort"), errs)
        node_port = port.get("nodePort", 0)
        if node_port:
            if svc_type not in ("NodePort", "LoadBalancer"):
                errs.add(child(at, "nodePort"), f"Forbidden: may not be used when `type` is '{svc_type}'")
            else:
                errs.add(child(at, "nodePort"), k8s_port_error(node_port))
        if "appProtocol" in port:
            _invalid_all(errs, child(at, "appProtocol"), port["appProtocol"], qualified_name_errors(port["appProtocol"]))
        pair = (number, port.get("protocol", "TCP"))
        if pair in pairs:
            errs.add(at, f'Duplicate value: "{pair[0]}/{pair[1]}"')
        pairs.add(pair)

    if svc_type == "ExternalName":
        if cluster_ip or spec.get("clusterIPs"):
            errs.add("spec.clusterIP", "Forbidden: may not be set for ExternalName services")
        external = spec.get("externalName", "")
        if not external:
            errs.add("spec.externalName", "Required value")
        else:
            _invalid_all(errs, "spec.externalName", external, k8s_subdomain_errors(external.removesuffix(".")))
    elif cluster_ip and cluster_ip != "None":
        _invalid_all(errs, "spec.clusterIP", cluster_ip, [K8S_IP_HINT] if not is_ip(cluster_ip) else [])
    cluster_ips = spec.get("clusterIPs", [])
    for i, ip in enumerate(cluster_ips):
        if ip != "None":
            errs.add_all(index("spec.clusterIPs", i), k8s_ip_errors(ip))
    if cluster_ips and cluster_ip and cluster_ips[0] != cluster_ip:
        errs.add("spec.clusterIPs[0]", invalid(cluster_ips[0], "must be the same as spec.clusterIP"))

    check_k8s_labels(spec.get("selector", {}), "spec.selector", errs)
    for i, ip in enumerate(spec.get("externalIPs", [])):
        errs.add_all(index("spec.externalIPs", i), k8s_ip_errors(ip))
    if spec.get("loadBalancerIP"):
        errs.add_all("spec.loadBalancerIP", k8s_ip_errors(spec["loadBalancerIP"]))
    for i, cidr in enumerate(spec.get("loadBalancerSourceRanges", [])):
        if ip_subnet_error(cidr) or "/" not in cidr:
            errs.add(index("spec.loadBalancerSourceRanges", i), invalid(cidr, "must be a valid CIDR, (e.g. 10.9.8.0/24)"))
    if ("externalTrafficPolicy" in spec and svc_type not in ("NodePort", "LoadBalancer")
            and not spec.get("externalIPs")):
        errs.add("spec.externalTrafficPolicy",
                 invalid(spec["externalTrafficPolicy"], "may only be set for externally-accessible services"))

    export_to = meta.get("annotations", {}).get(EXPORT_TO_ANNOTATION)
    if export_to is not None:
        at = key("metadata.annotations", EXPORT_TO_ANNOTATION)
        entries = [e.strip() for e in export_to.split(",")]
        sub = Errs()
        check_export_to(entries, meta["namespace"], "", sub, service_entry=True)
        for e in sub.items:
            errs.add(at, e.message)


def _check_target_port(target: object, path: str, errs: Errs) -> None:
    # 0 and "" mean "same as port" (Kubernetes fills the default in).
    if isinstance(target, int) and target != 0:
        errs.add(path, k8s_port_error(target))
    elif isinstance(target, str) and target:
        _invalid_all(errs, path, target, iana_port_name_errors(target))


def check_target_ref(ref: dict, path: str, errs: Errs) -> None:
    """The mesh finds an endpoint's Pod (and so its labels) through targetRef: it must name one."""
    name = ref.get("name", "")
    if not name:
        errs.add(child(path, "name"), "Required value")
    else:
        _invalid_all(errs, child(path, "name"), name, k8s_subdomain_errors(name))
    if ref.get("namespace"):
        _invalid_all(errs, child(path, "namespace"), ref["namespace"], k8s_label_errors(ref["namespace"]))


def _check_endpoint_ports(ports: list[dict], path: str, errs: Errs, name_required: bool) -> None:
    names: set[str] = set()
    for i, port in enumerate(ports):
        at = index(path, i)
        name = port.get("name", "")
        if name:
            _invalid_all(errs, child(at, "name"), name, k8s_label_errors(name))
        elif name_required and len(ports) > 1:
            errs.add(child(at, "name"), "Required value")
        # Endpoints report a missing name (above); a slice may have one unnamed port, not two.
        if name in names and (name or not name_required):
            errs.add(child(at, "name"), f'Duplicate value: "{name}"')
        names.add(name)
        if "port" in port or name_required:
            errs.add(child(at, "port"), k8s_port_error(port.get("port", 0)))
        if "appProtocol" in port:
            _invalid_all(errs, child(at, "appProtocol"), port["appProtocol"], qualified_name_errors(port["appProtocol"]))


def check_endpoints(obj: dict, errs: Errs) -> None:
    for i, subset in enumerate(obj.get("subsets", [])):
        at = index("subsets", i)
        if not subset.get("addresses") and not subset.get("notReadyAddresses"):
            errs.add(at, "Required value: must specify `addresses` or `notReadyAddresses`")
        for field in ("addresses", "notReadyAddresses"):
            for j, addr in enumerate(subset.get(field, [])):
                ap = index(child(at, field), j)
                errs.add_all(child(ap, "ip"), k8s_endpoint_ip_errors(addr["ip"]))
                if addr.get("hostname"):
                    _invalid_all(errs, child(ap, "hostname"), addr["hostname"], k8s_label_errors(addr["hostname"]))
                if addr.get("nodeName"):
                    _invalid_all(errs, child(ap, "nodeName"), addr["nodeName"], k8s_subdomain_errors(addr["nodeName"]))
                if "targetRef" in addr:
                    check_target_ref(addr["targetRef"], child(ap, "targetRef"), errs)
        _check_endpoint_ports(subset.get("ports", []), child(at, "ports"), errs, name_required=True)


def check_endpoint_slice(obj: dict, errs: Errs) -> None:
    address_type = obj["addressType"]
    for i, ep in enumerate(obj.get("endpoints", [])):
        at = index("endpoints", i)
        addresses = ep["addresses"]
        if not addresses:
            errs.add(child(at, "addresses"), "Required value: must contain at least 1 address")
        elif len(addresses) > 100:
            errs.add(child(at, "addresses"), f"Too many: {len(addresses)}: must have at most 100 items")
        for j, addr in enumerate(addresses):
            errs.add_all(index(child(at, "addresses"), j), _slice_address_errors(addr, address_type))
        if ep.get("hostname"):
            _invalid_all(errs, child(at, "hostname"), ep["hostname"], k8s_label_errors(ep["hostname"]))
        if ep.get("nodeName"):
            _invalid_all(errs, child(at, "nodeName"), ep["nodeName"], k8s_subdomain_errors(ep["nodeName"]))
        if "targetRef" in ep:
            check_target_ref(ep["targetRef"], child(at, "targetRef"), errs)
    _check_endpoint_ports(obj.get("ports", []), "ports", errs, name_required=False)


def _slice_address_errors(addr: str, address_type: str) -> list[str]:
    if address_type == "FQDN":
        errs = k8s_subdomain_errors(addr.removesuffix("."))
        if not errs and "." not in addr.removesuffix("."):
            errs = ["should be a domain with at least two segments separated by dots"]
        return [invalid(addr, e) for e in errs]
    version = 4 if address_type == "IPv4" else 6
    if not is_ip(addr) or (":" in addr) != (version == 6):
        return [invalid(addr, f"must be a valid IPv{version} address")]
    return k8s_endpoint_ip_errors(addr)


def check_pod(obj: dict, errs: Errs) -> None:
    spec = obj.get("spec", {})
    names: set[str] = set()
    for field in ("initContainers", "containers"):
        for i, container in enumerate(spec.get(field, [])):
            _check_container(container, index(child("spec", field), i), names, errs)
    for field in ("serviceAccountName", "serviceAccount", "nodeName"):
        if spec.get(field):
            _invalid_all(errs, child("spec", field), spec[field], k8s_subdomain_errors(spec[field]))
    for field in ("hostname", "subdomain"):
        if spec.get(field):
            _invalid_all(errs, child("spec", field), spec[field], k8s_label_errors(spec[field]))

    status = obj.get("status", {})
    pod_ip = status.get("podIP", "")
    if pod_ip:
        errs.add_all("status.podIP", k8s_ip_errors(pod_ip))
    seen: set[str] = set()
    for i, entry in enumerate(status.get("podIPs", [])):
        at = child(index("status.podIPs", i), "ip")
        errs.add_all(at, k8s_ip_errors(entry["ip"]))
        if entry["ip"] in seen:
            errs.add(at, f'Duplicate value: "{entry["ip"]}"')
        seen.add(entry["ip"])
    if pod_ip and status.get("podIPs") and status["podIPs"][0]["ip"] != pod_ip:
        errs.add("status.podIPs[0].ip", invalid(status["podIPs"][0]["ip"], "must be the same as status.podIP"))
    if status.get("hostIP"):
        errs.add_all("status.hostIP", k8s_ip_errors(status["hostIP"]))
    for i, entry in enumerate(status.get("hostIPs", [])):
        errs.add_all(child(index("status.hostIPs", i), "ip"), k8s_ip_errors(entry["ip"]))


def _check_container(container: dict, path: str, names: set[str], errs: Errs) -> None:
    name = container.get("name", "")
    if not name:
        errs.add(child(path, "name"), "Required value")
    else:
        _invalid_all(errs, child(path, "name"), name, k8s_label_errors(name))
        if name in names:
            errs.add(child(path, "name"), f'Duplicate value: "{name}"')
        names.add(name)
    image = container.get("image", "")
    if image != image.strip():
        errs.add(child(path, "image"), invalid(image, "must not have leading or trailing whitespace"))
    port_names: set[str] = set()
    for i, port in enumerate(container.get("ports", [])):
        at = index(child(path, "ports"), i)
        number = port.get("containerPort", 0)
        if number == 0:
            errs.add(child(at, "containerPort"), "Required value")
        else:
            errs.add(child(at, "containerPort"), k8s_port_error(number))
        if port.get("hostPort", 0) != 0:
            errs.add(child(at, "hostPort"), k8s_port_error(port["hostPort"]))
        pname = port.get("name", "")
        if pname:
            _invalid_all(errs, child(at, "name"), pname, iana_port_name_errors(pname))
            if pname in port_names:
                errs.add(child(at, "name"), f'Duplicate value: "{pname}"')
            port_names.add(pname)
        if port.get("hostIP"):
            errs.add_all(child(at, "hostIP"), k8s_ip_errors(port["hostIP"]))


SECRET = Obj({
    "apiVersion": Str(), "kind": Str(), "metadata": Opaque(),
    "type": Str(), "data": Map(Str()), "stringData": Map(Str()), "immutable": Bool(),
})
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+")
# Kubernetes' required keys per built-in Secret type (pkg/apis/core/validation ValidateSecret).
_SECRET_TYPE_KEYS = {"kubernetes.io/tls": ("tls.crt", "tls.key"), "kubernetes.io/basic-auth": (),
                     "kubernetes.io/ssh-auth": ("ssh-privatekey",)}


def check_secret(obj: dict, errs: Errs) -> None:
    """Kubernetes' Secret rules: key names, base64 `data`, the keys a built-in type requires, 1 MiB in all."""
    data = obj.get("data") or {}
    size = 0
    for fld in ("data", "stringData"):
        for k, v in (obj.get(fld) or {}).items():
            at = key(fld, k)
            if len(k) > 253 or not _SECRET_KEY.fullmatch(k):
                errs.add(at, invalid(k, "a valid config key must consist of alphanumeric characters, '-', '_' or '.'"))
            if fld == "data":
                try:
                    size += len(base64.b64decode(v, validate=True))
                except (binascii.Error, ValueError):
                    errs.add(at, "illegal base64 data (data values must be base64; use stringData for plain text)")
            else:
                size += len(v.encode())
    if size > 1 << 20:
        errs.add("data", "Too long: must have at most 1048576 bytes")
    present = set(data) | set(obj.get("stringData") or {})
    for required in _SECRET_TYPE_KEYS.get(obj.get("type") or "Opaque", ()):
        if required not in present:
            errs.add(key("data", required), "Required value")


CONFIG_MAP = Obj({
    "apiVersion": Str(), "kind": Str(), "metadata": Opaque(),
    "data": Map(Str()), "binaryData": Map(Str()), "immutable": Bool(),
})


def check_config_map(obj: dict, errs: Errs) -> None:
    """Kubernetes' ValidateConfigMap (key names, a key in both maps, 1 MiB in all); for the root namespace's
    `istio` ConfigMap, the `mesh` key as MeshConfig YAML (istiod's mesh config input)."""
    data = obj.get("data") or {}
    binary = obj.get("binaryData") or {}
    size = 0
    for fld, values in (("data", data), ("binaryData", binary)):
        for k, v in values.items():
            at = key(fld, k)
            if len(k) > 253 or not _SECRET_KEY.fullmatch(k):
                errs.add(at, invalid(k, "a valid config key must consist of alphanumeric characters, '-', '_' or '.'"))
            if fld == "binaryData":
                if k in data:
                    errs.add(at, invalid(k, "duplicate of key present in data"))
                try:
                    size += len(base64.b64decode(v, validate=True))
                except (binascii.Error, ValueError):
                    errs.add(at, "illegal base64 data")
            else:
                size += len(k) + len(v.encode())
    if size > 1 << 20:
        errs.add("data", "Too long: must have at most 1048576 bytes")
    meta = obj.get("metadata") or {}
    if (meta.get("name") == meshconfig.MESH_CONFIGMAP and meta.get("namespace") == settings.ROOT_NAMESPACE
            and meshconfig.MESH_KEY in data):
        doc, mesh_errs = meshconfig.load(data[meshconfig.MESH_KEY])
        errs.items.extend(mesh_errs)
        if not mesh_errs and "localityLbSetting" in doc:
            _check_mesh_locality(doc["localityLbSetting"], errs)


def _check_mesh_locality(lb: object, errs: Errs) -> None:
    """ValidateMeshConfig's ValidateLocalityLbSetting: the mesh-wide default obeys a DestinationRule's rules."""
    at = f"{meshconfig.ROOT}.localityLbSetting"
    shape = check(lb, LOCALITY_LB_SETTING, at)
    if shape:
        errs.items.extend(shape)
        return
    check_locality_lb(lb, at, errs)


def _make_validator(schema: Obj, rules: Callable[[dict, Errs], None]) -> Callable[[dict], list[FieldError]]:
    def validate(obj: dict) -> list[FieldError]:
        structural = check(obj, schema)
        if structural:
            return structural
        errs = Errs()
        rules(obj, errs)
        return errs.items

    validate.schema = schema  # type: ignore[attr-defined] - published as the registry's OpenAPI (schema_for)
    return validate


register("Namespace")(_make_validator(NAMESPACE, check_namespace))
register("Node")(_make_validator(NODE, check_node))
register("Service")(_make_validator(SERVICE, check_service))
register("Endpoints")(_make_validator(ENDPOINTS, check_endpoints))
register("EndpointSlice")(_make_validator(ENDPOINT_SLICE, check_endpoint_slice))
register("Pod")(_make_validator(POD, check_pod))
register("Secret")(_make_validator(SECRET, check_secret))
register("ConfigMap")(_make_validator(CONFIG_MAP, check_config_map))
