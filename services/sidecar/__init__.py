"""What runs beside a workload: the Envoy sidecar's bootstrap, and (from other modules) its traffic interception."""
