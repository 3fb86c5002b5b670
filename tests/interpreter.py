"""Loading a Triton kernel module so that its kernels run in Triton's interpreter (on a CPU)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType


def load_interpreted(path: Path, name: str) -> ModuleType:
    """A fresh copy of the module in `path`, registered as `name`, whose @triton.jit kernels
    were decorated with TRITON_INTERPRET=1 (the module the plugin imports stays untouched)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return module
