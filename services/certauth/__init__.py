"""certauth: the mesh CA (Istio's CSR API over gRPC/TLS, SPIFFE workload certificates, root rotation)."""
