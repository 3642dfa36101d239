"""A small synchronous client for the registry API (the CLI needs nothing more)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


class RegistryError(Exception):
    def __init__(self, status: int, body: dict | str):
        self.status = status
        self.body = body
        msg = body.get("message", body) if isinstance(body, dict) else body
        super().__init__(f"registry answered {status}: {msg}")


def request(method: str, url: str, body: dict | list | None = None, timeout: float = 30.0,
            content_type: str = "application/json") -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            payload: dict | str = json.loads(raw)
        except ValueError:
            payload = raw.decode(errors="replace")
        raise RegistryError(e.code, payload) from None
    except urllib.error.URLError as e:
        raise ConnectionError(f"cannot reach the registry at {url}: {e.reason}") from None
    return json.loads(raw) if raw else {}


def apply_objects(server: str, objects: list[dict], source: str = "request") -> dict:
    """Apply objects through the registry (all or nothing); returns {revision, results}."""
    docs = [{"source": source, "index": i, "object": o} for i, o in enumerate(objects)]
    return request("POST", server.rstrip("/") + "/apply", {"documents": docs})


def delete_keys(server: str, keys: list[str]) -> dict:
    return request("POST", server.rstrip("/") + "/delete", {"keys": keys})
