"""Mizzen's benchmarks (`python -m bench` / `mizzen bench`): figures are printed, never asserted."""
