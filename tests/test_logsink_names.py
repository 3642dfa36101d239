"""Names for every span: the seed's A→B→C chain, recorded by three real Envoy sidecars whose logs say nothing
about who wrote them (no proxy names on the inputs, loopback pod IPs, no SANs), gets `service.name` A, B and C
— from the registry's Pods by IP, both live (a logsink running with the stack learns the Pods through the
registry's `mizzen.config.changed` events) and offline (`convert --config DIR`)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import orjson
import pytest
import yaml

from mizzen.services.cli.http import apply_objects
from mizzen.services.logsink.identity import Source
from mizzen.services.logsink.workloads import WorkloadIndex
from tests.logsink_data.helpers import CHAIN, by_end_time, chain_lines, run_lines
from tests.logsink_data.meshrig import PODS, MeshRig
from tests.logsink_data.receiver import Receiver
from tests.logsink_data.service import REPO
from tests.stack import Stack

CLIENT, SERVER = 3, 2


def pod(name: str, ip: str, pod_name: str, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": "default", "labels": labels or {"app": name}},
            "spec": {"containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running", "podIP": ip}}


def chain_pods() -> list[dict]:
    return [pod(name, ip, pod_name) for name, (ip, pod_name) in PODS.items()]


def check_named(spans, services=("a.default", "b.default", "c.default")) -> None:
    http = [s for s in spans if s.attributes.get("envoy.request_id")]
    assert http, "no HTTP spans"
    assert not [s for s in spans if s.service.startswith("unknown_service")], \
        sorted({s.service for s in spans})
    roles = {(s.service, s.kind) for s in http}
    assert {(services[0], CLIENT), (services[1], SERVER), (services[1], CLIENT), (services[2], SERVER)} <= roles
    for s in spans:
        if s.service in services:
            assert s.resource["k8s.namespace.name"] == "default"
            assert s.resource["k8s.pod.name"] == PODS[s.service.split(".")[0]][1]


def test_without_names_callers_are_unknown():
    """The baseline the issue describes: with no proxy names, A's client spans are `unknown_service:<ip>`."""
    spans, _ = run_lines(by_end_time(chain_lines(), {p: Source("file") for p in PODS}), window=0.5)
    assert any(s.service == "unknown_service:127.0.0.2" for s in spans)


def test_pipeline_with_workload_index():
    index = WorkloadIndex()
    index.set_objects(chain_pods())
    spans, _ = run_lines(by_end_time(chain_lines(), {p: Source("file") for p in PODS}), window=0.5,
                         workloads=index)
    check_named(spans)


def test_index_updates_and_deletes():
    index = WorkloadIndex()
    index.set_objects(chain_pods(), revision=1)
    key = f"Pod/default/{PODS['c'][1]}"
    renamed = pod("c", "127.0.0.9", PODS["c"][1], {"service.istio.io/canonical-name": "cee", "app": "c"})
    index.update({key: renamed}, revision=2)
    assert index.get("127.0.0.4") is None and index.get("127.0.0.9").service == "cee.default"
    index.update({key: None}, revision=3)
    assert index.get("127.0.0.9") is None and index.get("127.0.0.2").service == "a.default"
    we = {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
          "metadata": {"name": "vm-1", "namespace": "legacy"},
          "spec": {"address": "10.9.9.9", "labels": {"app": "billing"}}}
    hostnet = pod("h", "10.0.0.1", "h-1")
    hostnet["spec"]["hostNetwork"] = True
    index.update({"WorkloadEntry/legacy/vm-1": we, "Pod/default/h-1": hostnet}, revision=4)
    assert index.get("10.9.9.9").service == "billing.legacy" and index.get("10.0.0.1") is None


def test_convert_with_config(tmp_path):
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "pods.yaml").write_text(yaml.safe_dump_all(chain_pods()))
    out = tmp_path / "traces.json"
    files = [str(CHAIN / f"{p}.jsonl") for p in PODS]  # no PROXY= names
    r = subprocess.run([sys.executable, "-m", "mizzen.services.logsink", "convert", *files, "-o", str(out),
                        "--config", str(cfg)], cwd=REPO, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    doc = orjson.loads(out.read_bytes())
    services = set()
    for rs in doc["resourceSpans"]:
        attrs = {a["key"]: a["value"].get("stringValue") for a in rs["resource"]["attributes"]}
        services.add(attrs["service.name"])
        if attrs["service.name"] != "down.default":
            assert attrs["k8s.pod.name"] == PODS[attrs["service.name"].split(".")[0]][1]
    assert {"a.default", "b.default", "c.default"} <= services
    assert not [s for s in services if s.startswith("unknown_service")]
    # without --config the same files leave A unknown
    r = subprocess.run([sys.executable, "-m", "mizzen.services.logsink", "convert", *files, "-o", str(out)],
                       cwd=REPO, capture_output=True, timeout=120)
    assert b"unknown_service:127.0.0.2" in out.read_bytes()


def test_convert_config_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Pod\nmetadata: {namespace: default}\n")
    r = subprocess.run([sys.executable, "-m", "mizzen.services.logsink", "convert", str(CHAIN / "a.jsonl"),
                        "-o", str(tmp_path / "o.json"), "--config", str(bad)], cwd=REPO, capture_output=True,
                       timeout=120)
    assert r.returncode == 2 and str(bad) in r.stderr.decode() and "name" in r.stderr.decode()


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_live_stack_names_the_chain(tmp_path):
    recv = await Receiver().start()
    stack = Stack(tmp_path / "stack", otlp_endpoint="")
    rig = MeshRig(tmp_path / "mesh")
    try:
        stack.otlp_endpoint = recv.endpoint
        await asyncio.to_thread(stack.start, ("registry",))
        files = [x for p in PODS for x in ("--file", str(rig.log_path(p)))]  # no PROXY= names
        await asyncio.to_thread(stack.start_service, "logsink", True,
                                [*files, "--join-window", "0.5", "--poll-interval", "0.05"])
        # The Pods appear after the logsink started: it learns them from the registry's events.
        await asyncio.to_thread(apply_objects, stack.registry_url, chain_pods())
        await rig.start()
        rids = []
        for i, (method, path) in enumerate((("GET", "/ok"), ("GET", "/missing"))):
            rid = f"{i:08d}-1111-4222-8333-444455556666"
            await rig.call_b(method, path, None, headers={"x-request-id": rid})
            rids.append(rid)
        spans = await recv.wait_spans(8, timeout=60)
        check_named(spans)
        # kept current: a relabelled Pod renames the spans written after the change
        relabelled = pod("c", PODS["c"][0], PODS["c"][1], {"service.istio.io/canonical-name": "cee"})
        await asyncio.to_thread(apply_objects, stack.registry_url, [relabelled])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            await rig.call_b("GET", "/ok", None)
            await asyncio.sleep(1.0)
            if any(s.service == "cee.default" and s.kind == SERVER for s in recv.spans()):
                break
            assert loop.time() < deadline, sorted({s.service for s in recv.spans()})
    finally:
        await rig.stop()
        await asyncio.to_thread(stack.stop)
        await recv.stop()
