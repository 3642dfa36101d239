"""`python -m mizzen …` runs the `mizzen` command (handy where the console script is not on PATH yet)."""
