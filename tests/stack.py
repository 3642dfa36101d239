"""The control plane for tests: real NATS, Redis and Mizzen services as processes (see services/mesh/stack.py)."""

from mizzen.services.mesh.stack import Stack

__all__ = ["Stack"]
