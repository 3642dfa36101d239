"""xds_gateway: Envoy's Aggregated Discovery Service (SotW and delta) over snapshots stored in Redis."""
