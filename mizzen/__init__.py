"""Mizzen, an Istio-compatible service-mesh control plane. The services live in `mizzen.services`.

An installed distribution holds them in `mizzen/services/`. In a source checkout they stay in the
top-level `services/` folder beside this package (the repository's layout); then `mizzen.services`
is found there, so `python -m mizzen` and the tests run from a checkout without installing.
"""
import os as _os

_here = _os.path.dirname(_os.path.abspath(__file__))
_checkout = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "services")) and _os.path.isfile(
        _os.path.join(_checkout, "services", "__init__.py")):
    __path__.append(_checkout)  # type: ignore[name-defined]  # noqa: F821
