"""Shared helpers for the translator tests: load YAML meshes, build proxies and snapshots, read protos."""

from __future__ import annotations

from pathlib import Path

import yaml
from google.protobuf import json_format

from mizzen.services.mesh.xds_types import CLUSTER, ENDPOINT, LISTENER, ROUTE
from mizzen.services.translator.proxy import Proxy
from mizzen.services.translator.push_context import MeshConfig, PushContext
from mizzen.services.translator.snapshot import build_snapshot

HERE = Path(__file__).parent
SEED_MESH = HERE / "fixtures" / "seed-mesh"
FEATURES = HERE / "translator_data" / "features.yaml"
SEED_PROXY = "sidecar~10.200.0.135~webserverv1-84596579c6-xxvhd.default~default.svc.cluster.local"

__all__ = ["CLUSTER", "ENDPOINT", "LISTENER", "ROUTE", "load", "push_of", "snapshot_of", "as_dict", "unpack",
           "MeshConfig", "Proxy", "PushContext", "SEED_PROXY"]


def load(*paths: Path) -> list[dict]:
    objs: list[dict] = []
    for p in paths:
        files = sorted(p.glob("*.yaml")) if p.is_dir() else [p]
        for f in files:
            objs += [o for o in yaml.safe_load_all(f.read_text()) if o]
    return objs


def yaml_objects(text: str) -> list[dict]:
    return [o for o in yaml.safe_load_all(text) if o]


def push_of(objs: list[dict] | str, mesh: MeshConfig | None = None) -> PushContext:
    if isinstance(objs, str):
        objs = yaml_objects(objs)
    return PushContext.from_resources(objs, mesh)


def snapshot_of(push: PushContext, node_id: str) -> dict[str, dict[str, object]]:
    return build_snapshot(push, Proxy.from_node_id(node_id, push)).merged()


def as_dict(msg) -> dict:
    return json_format.MessageToDict(msg)


def unpack(any_msg, cls):
    out = cls()
    assert any_msg.Unpack(out), f"{any_msg.type_url} is not {cls.DESCRIPTOR.full_name}"
    return out
