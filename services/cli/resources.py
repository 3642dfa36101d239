"""`mizzen apply`, `mizzen get`, `mizzen delete`: kubectl-style commands against the registry."""

from __future__ import annotations

import argparse
import calendar
import json
import sys
import time

import yaml

from ..mesh import kinds, locality, settings
from ..mesh.errors import DocumentError
from ..mesh.kinds import object_key
from ..mesh.yamlio import Document, load_paths
from .http import RegistryError, apply_objects, delete_keys, request


def _server_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", "-s", default=None, help="registry URL (default $MIZZEN_SERVER or http://127.0.0.1:15080)")


def _print_documents(label: str, details: list[dict]) -> None:
    """One stderr line per field of each document: `<label>: <file>, document N: Kind ns/name: field: message`
    (`field: [IST0109] message` for an analysis finding)."""
    for d in details:
        what = f"{d.get('kind') or '?'} {d['namespace'] + '/' if d.get('namespace') else ''}{d.get('name') or '?'}"
        for err in d.get("errors", []):
            field = f"{err['field']}: " if err.get("field") else ""
            code = f"[{err['code']}] " if err.get("code") else ""  # an analysis finding's message type
            print(f"{label}: {d['source']}, document {d['document']}: {what}: {field}{code}{err['message']}",
                  file=sys.stderr)


def _report_failure(e: RegistryError) -> int:
    body = e.body if isinstance(e.body, dict) else {"message": str(e.body)}
    details = body.get("details")
    if isinstance(details, list):
        _print_documents("error", details)
        print("error: nothing was applied", file=sys.stderr)
    else:
        print(f"error: {body.get('message', body)}", file=sys.stderr)
    return 1


def cmd_apply(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mizzen apply", description="Apply resources (all or nothing).")
    p.add_argument("-f", "--filename", action="append", required=True, help="file, directory or - for stdin")
    p.add_argument("-n", "--namespace", default="default", help="namespace for documents that name none")
    _server_arg(p)
    args = p.parse_args(argv)
    docs = load_paths(args.filename)
    payload = []
    for d in docs:
        if isinstance(d, DocumentError):
            for e in d.errors:
                print(f"error: {d.source}, document {d.index}: {e}", file=sys.stderr)
            print("error: nothing was applied", file=sys.stderr)
            return 1
        payload.append({"source": d.source, "index": d.index, "object": d.obj})
    server = settings.registry_url(args.server)
    try:
        result = request("POST", f"{server}/apply?namespace={args.namespace}", {"documents": payload})
    except RegistryError as e:
        return _report_failure(e)
    except ConnectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for r in result["results"]:
        k = kinds.BY_KIND[r["kind"]]
        group = f".{k.group}" if k.group else ""
        print(f"{k.kind.lower()}{group}/{r['name']} {r['action']}")
    _print_documents("warning", result.get("warnings", []))
    for s in result.get("skipped", []):
        group = s["apiVersion"].rpartition("/")[0]
        print(f"{s['kind'].lower()}{'.' + group if group else ''}/{s['name']} skipped ({s['reason']}; "
              f"{s['source']}, document {s['document']})")
    return 0


def _age(obj: dict) -> str:
    ts = obj.get("metadata", {}).get("creationTimestamp")
    if not ts:
        return "<unknown>"
    try:
        secs = int(time.time() - calendar.timegm(time.strptime(ts, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return "<unknown>"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{max(secs, 0)}s"


def _columns(kind: str, obj: dict) -> list[tuple[str, str]]:
    spec = obj.get("spec") or {}
    if kind == "Service":
        ports = ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in spec.get("ports", []))
        return [("TYPE", spec.get("type", "ClusterIP")), ("CLUSTER-IP", spec.get("clusterIP", "<none>")),
                ("PORT(S)", ports or "<none>")]
    if kind == "Pod":
        return [("IP", (obj.get("status") or {}).get("podIP", "<none>"))]
    if kind == "Node":  # kubectl's STATUS and VERSION are the kubelet's status, which is not kept
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return [("ROLES", kinds.node_roles(labels)), ("LOCALITY", locality.from_node_labels(labels) or "<none>")]
    if kind == "VirtualService":
        return [("GATEWAYS", json.dumps(spec.get("gateways", [])).replace(" ", "")),
                ("HOSTS", json.dumps(spec.get("hosts", [])).replace(" ", ""))]
    if kind == "DestinationRule":
        return [("HOST", spec.get("host", ""))]
    if kind == "ServiceEntry":
        return [("HOSTS", json.dumps(spec.get("hosts", [])).replace(" ", "")),
                ("LOCATION", spec.get("location", "")), ("RESOLUTION", spec.get("resolution", ""))]
    if kind == "PeerAuthentication":
        return [("MODE", (spec.get("mtls") or {}).get("mode", ""))]
    if kind == "AuthorizationPolicy":  # the CRD's printer column (.spec.action; empty means ALLOW)
        return [("ACTION", spec.get("action", ""))]
    if kind == "Secret":  # kubectl's columns: the values are never shown
        keys = set(obj.get("data") or {}) | set(obj.get("stringData") or {})
        return [("TYPE", obj.get("type") or "Opaque"), ("DATA", str(len(keys)))]
    return []


def print_table(kind: str, items: list[dict], all_namespaces: bool, out=sys.stdout) -> None:
    k = kinds.BY_KIND[kind]
    rows = []
    for o in items:
        row = []
        if all_namespaces and k.namespaced:
            row.append(("NAMESPACE", o["metadata"].get("namespace", "")))
        row.append(("NAME", o["metadata"]["name"]))
        row.extend(_columns(kind, o))
        row.append(("AGE", _age(o)))
        rows.append(row)
    if not rows:
        print("No resources found.", file=sys.stderr)
        return
    headers = [h for h, _ in rows[0]]
    widths = [max(len(h), *(len(r[i][1]) for r in rows)) for i, h in enumerate(headers)]
    print("   ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(), file=out)
    for r in rows:
        print("   ".join(v.ljust(w) for (_, v), w in zip(r, widths, strict=True)).rstrip(), file=out)


def cmd_get(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mizzen get", description="List or show resources.")
    p.add_argument("kind")
    p.add_argument("name", nargs="?")
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-o", "--output", choices=["yaml", "json", "wide", "name"], default=None)
    _server_arg(p)
    args = p.parse_args(argv)
    k = kinds.lookup(args.kind)
    if k is None:
        print(f'error: the server doesn\'t have a resource type "{args.kind}"', file=sys.stderr)
        return 1
    server = settings.registry_url(args.server)
    ns = None if (args.all_namespaces or not k.namespaced) else args.namespace
    try:
        if args.name:
            data = request("GET", server + k.path(ns, args.name))
            items = [data]
        else:
            data = request("GET", server + k.path(ns))
            items = data["items"]
    except RegistryError as e:
        print(f"Error from server (NotFound): {e.body.get('message') if isinstance(e.body, dict) else e.body}", file=sys.stderr)
        return 1
    except ConnectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(data, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(data, sort_keys=False), end="")
    elif args.output == "name":
        for o in items:
            print(f"{k.kind.lower()}/{o['metadata']['name']}")
    else:
        print_table(k.kind, items, args.all_namespaces)
    return 0


def cmd_delete(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mizzen delete", description="Delete resources by file or by kind and name.")
    p.add_argument("kind", nargs="?")
    p.add_argument("names", nargs="*")
    p.add_argument("-f", "--filename", action="append")
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument("--ignore-not-found", action="store_true")
    _server_arg(p)
    args = p.parse_args(argv)
    keys: list[str] = []
    if args.filename:
        for d in load_paths(args.filename):
            if isinstance(d, DocumentError):
                print(f"error: {d}", file=sys.stderr)
                return 1
            assert isinstance(d, Document)
            k = kinds.BY_KIND.get(d.obj.get("kind", ""))
            meta = d.obj.get("metadata") or {}
            if k is None or not meta.get("name"):
                print(f"error: {d.source}, document {d.index}: needs a known kind and metadata.name", file=sys.stderr)
                return 1
            ns = (meta.get("namespace") or args.namespace) if k.namespaced else None
            keys.append(object_key(k.kind, ns, meta["name"]))
    elif args.kind and args.names:
        k = kinds.lookup(args.kind)
        if k is None:
            print(f'error: the server doesn\'t have a resource type "{args.kind}"', file=sys.stderr)
            return 1
        keys = [object_key(k.kind, args.namespace if k.namespaced else None, n) for n in args.names]
    else:
        p.error("give -f FILE or KIND NAME")
    try:
        result = delete_keys(settings.registry_url(args.server), keys)
    except (RegistryError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for key in result["deleted"]:
        kind, _ns, name = kinds.split_key(key)
        k = kinds.BY_KIND[kind]
        print(f"{k.kind.lower()}{'.' + k.group if k.group else ''} \"{name}\" deleted")
    rc = 0
    for key in result["notFound"]:
        kind, _ns, name = kinds.split_key(key)
        if not args.ignore_not_found:
            print(f'Error from server (NotFound): {kinds.BY_KIND[kind].plural} "{name}" not found', file=sys.stderr)
            rc = 1
    return rc


def main(argv: list[str], command: str = "apply") -> int:
    return {"apply": cmd_apply, "get": cmd_get, "delete": cmd_delete}[command](argv)


__all__ = ["apply_objects", "main"]
