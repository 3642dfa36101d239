"""Validators for the Kubernetes kinds (Service, Endpoints, EndpointSlice, Pod, Namespace)."""
