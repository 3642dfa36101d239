"""logsink: Envoy JSON access logs (and Envoy's gRPC Access Log Service) → OpenTelemetry traces over OTLP."""
