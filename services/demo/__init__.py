"""Mizzen's demo workload (`echo`) and the demo mesh that `mizzen up --demo` applies (`mesh`)."""
