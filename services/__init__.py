"""Mizzen: an Istio-compatible service-mesh control plane."""
