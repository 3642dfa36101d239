"""Applications the test pods run."""
