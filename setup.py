"""Packages: `mizzen` and the `services/` folder installed as `mizzen.services` (no generic top-level name).
Metadata lives in pyproject.toml."""
from setuptools import find_packages, setup

SERVICES = find_packages(include=["services", "services.*"])
setup(
    packages=["mizzen", *(f"mizzen.{p}" for p in SERVICES)],
    package_dir={"mizzen": "mizzen", "mizzen.services": "services"},
)
