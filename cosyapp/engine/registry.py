"""Backend registry: names -> loaders, model-directory verification and tiny-model makers.

Imports are lazy so that `cosyapp --help` and the service start without importing every model stack.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from cosyapp.engine.types import Backend

# name -> module that provides `load(model_dir, device, dtype) -> Backend`, `verify(model_dir) -> list[str]`
# and `make_tiny(out_dir, size) -> None`.
BACKEND_MODULES = {
    "cosyvoice2": "cosyapp.backends.cosyvoice2.backend",
    "cosyvoice3": "cosyapp.backends.cosyvoice3.backend",
    "fish": "cosyapp.backends.fish.backend",
}


def backend_names() -> list[str]:
    return sorted(BACKEND_MODULES)


def _module(name: str):
    try:
        module_name = BACKEND_MODULES[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(backend_names())}") from None
    return importlib.import_module(module_name)


def load_backend(name: str, model_dir: str | Path, device: str = "auto", dtype: str = "auto",
                 max_streams: int = 8, **options: Any) -> Backend:
    """Load a backend from a model directory in its official layout, sized for `max_streams` concurrent
    streams; `options` are the backend's own (its config section). Raises ModelFileError naming a bad file."""
    return _module(name).load(Path(model_dir), device=device, dtype=dtype, max_streams=max_streams, **options)


def verify_model_dir(name: str, model_dir: str | Path) -> list[str]:
    """Check the layout and that every file loads; returns human-readable report lines."""
    return _module(name).verify(Path(model_dir))


def make_tiny(name: str, out_dir: str | Path, size: str = "tiny") -> None:
    """Write a random-weight model in the official layout (`size`: tiny for tests, full for benchmarks)."""
    _module(name).make_tiny(Path(out_dir), size=size)
