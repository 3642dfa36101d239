"""Validators for the Istio kinds, after Istio's `pkg/config/validation`."""
