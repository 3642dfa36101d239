"""Istio → Envoy translation: a pure core (push context, per-xDS-type builders, snapshot layers)."""
