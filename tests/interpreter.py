"""Loading a Triton kernel module so that its kernels run in Triton's interpreter (on a CPU)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType


def load_interpreted(path: Path, name: str, helpers: tuple[str, ...] = ()) -> ModuleType:
    """A fresh copy of the module in `path`, registered as `name`, whose @triton.jit kernels
    were decorated with TRITON_INTERPRET=1 (the module the plugin imports stays untouched).

    `helpers`: dotted names of kernel modules whose @triton.jit functions this one calls (an
    interpreted kernel cannot call a compiled helper). Interpreted copies of them stand in for
    the real ones while the module is imported, so it binds to those; afterwards the real
    modules are back in place for everyone else."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        copies = {helper: _exec_fresh(_file_of(helper), f"{name}__{helper.rpartition('.')[2]}") for helper in helpers}
        with _standing_in(copies):
            return _exec_fresh(path, name)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def _file_of(module_name: str) -> Path:
    return Path(importlib.util.find_spec(module_name).origin)


def _exec_fresh(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class _standing_in:
    """`sys.modules` and the parent packages' attributes point at `copies` inside the block."""

    def __init__(self, copies: dict[str, ModuleType]) -> None:
        self.copies, self.saved = copies, {}

    def __enter__(self) -> None:
        for dotted, copy in self.copies.items():
            parent_name, _, child = dotted.rpartition(".")
            parent = importlib.import_module(parent_name)
            self.saved[dotted] = (sys.modules.get(dotted), parent, child, getattr(parent, child, None))
            sys.modules[dotted] = copy
            setattr(parent, child, copy)

    def __exit__(self, *exc) -> None:
        for dotted, (module, parent, child, attribute) in self.saved.items():
            if module is None:
                sys.modules.pop(dotted, None)
            else:
                sys.modules[dotted] = module
            if attribute is None:
                delattr(parent, child)
            else:
                setattr(parent, child, attribute)
