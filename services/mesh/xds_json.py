"""Envoy objects written as JSON/YAML by users (EnvoyFilter patch values) → protobuf messages.

A patch value is Envoy's own JSON form of the object its `applyTo` names (a Listener, a FilterChain, an
HttpFilter, a Cluster, …), where `typed_config` fields carry an `@type` naming any Envoy extension. Both the
validation (reject a value Envoy's schema does not accept, naming the field) and the translator (apply it) use
this one conversion.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from google.protobuf import json_format
from google.protobuf.message import Message


class XdsValueError(ValueError):
    """A patch value that is not the Envoy object it claims to be."""


def _message_classes() -> dict[str, type[Message]]:
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
    from envoy.config.route.v3 import route_components_pb2, route_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

    return {
        "LISTENER": listener_pb2.Listener,
        "FILTER_CHAIN": listener_components_pb2.FilterChain,
        "NETWORK_FILTER": listener_components_pb2.Filter,
        "LISTENER_FILTER": listener_components_pb2.ListenerFilter,
        "HTTP_FILTER": hcm.HttpFilter,
        "ROUTE_CONFIGURATION": route_pb2.RouteConfiguration,
        "VIRTUAL_HOST": route_components_pb2.VirtualHost,
        "HTTP_ROUTE": route_components_pb2.Route,
        "CLUSTER": cluster_pb2.Cluster,
    }


@functools.cache
def message_class(apply_to: str) -> type[Message]:
    cls = _message_classes().get(apply_to)
    if cls is None:
        raise XdsValueError(f"applyTo {apply_to} is not supported")
    return cls


@functools.cache
def _load_package(package: str) -> bool:
    """Import every generated module of a proto package so its types can be named in an `@type`."""
    try:
        pkg = importlib.import_module(package)
    except ImportError:
        return False
    for mod in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
        if mod.name.endswith("_pb2"):
            importlib.import_module(f"{package}.{mod.name}")
    return True


def _load_types(value: object) -> None:
    if isinstance(value, dict):
        t = value.get("@type")
        if isinstance(t, str):
            _load_package(t.rpartition("/")[2].rpartition(".")[0])
        for v in value.values():
            _load_types(v)
    elif isinstance(value, list):
        for v in value:
            _load_types(v)


def parse(apply_to: str, value: object) -> Message:
    """The message `value` describes for `applyTo`; XdsValueError says what Envoy's schema does not accept."""
    if not isinstance(value, dict):
        raise XdsValueError("must be an object")
    _load_types(value)
    msg = message_class(apply_to)()
    try:
        json_format.ParseDict(value, msg)
    except json_format.ParseError as e:
        text = str(e)
        if "Can not find message descriptor" in text or "Invalid Any type" in text:
            text = f"referenced type unknown: {text}"
        raise XdsValueError(text) from None
    return msg
