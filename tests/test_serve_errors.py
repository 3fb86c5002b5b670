"""`vllm serve` on a broken checkpoint stops within 30 s, before an engine starts, and its last
lines are the one GlowQ message.

The real `vllm serve` process, as an operator runs it; the checkpoints are the ones
test_validate.py checks message by message. Before the front-end validator these took
130-200 s and ended with "Engine core initialization failed", the reason 120 lines up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_serve_e2e import free_port
from test_validate import BROKEN, MOE_BROKEN, make_broken
from vllm_helpers import engine_env

pytestmark = pytest.mark.slow

FAIL_WITHIN_S = 30
LAST_LINES = 5
SERVED = ["missing factor", "mis-shaped factor", "config rank", "config group size", "truncated file",
          "format version", "bits"]
MOE_SERVED = ["missing expert A", "shared B of the wrong shape", "shared B under another expert"]


def serve_until_exit(model: Path, *extra: str) -> tuple[int | None, float, list[str]]:
    """(exit status or None if still running at the limit, seconds, last lines of output)."""
    command = [str(Path(sys.executable).parent / "vllm"), "serve", str(model), "--host", "127.0.0.1",
               "--port", str(free_port()), *extra]
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=engine_env(1, in_process_engine=False), start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=FAIL_WITHIN_S)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        status = None
        kill_group(proc.pid)
        output, _ = proc.communicate()
    seconds = time.monotonic() - start
    kill_group(proc.pid)  # nothing of a failed start may outlive the test
    return status, seconds, output.strip().splitlines()[-LAST_LINES:]


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def assert_fails_fast(status: int | None, seconds: float, tail: list[str], expected: str) -> None:
    text = "\n".join(tail)
    assert status is not None, f"vllm serve still ran after {FAIL_WITHIN_S} s:\n{text}"
    assert status != 0, text
    assert tail[-1].startswith("vllm-glowq: error:") and expected in tail[-1], text
    assert seconds < FAIL_WITHIN_S


@pytest.mark.parametrize("case", SERVED)
def test_vllm_serve_refuses_a_broken_checkpoint_quickly(glowq_checkpoints, tmp_path, case):
    edit, expected = BROKEN[case]
    broken = make_broken(glowq_checkpoints.get("llama"), tmp_path / "broken", **edit)
    assert_fails_fast(*serve_until_exit(broken), expected)


@pytest.mark.parametrize("case", MOE_SERVED)
def test_vllm_serve_refuses_a_broken_moe_checkpoint_quickly(glowq_checkpoints, tmp_path, case):
    recipe, edit, expected = MOE_BROKEN[case]
    broken = make_broken(glowq_checkpoints.get(recipe), tmp_path / "broken", **edit)
    assert_fails_fast(*serve_until_exit(broken), expected)


def test_vllm_serve_refuses_the_flag_on_a_plain_model(glowq_checkpoints):
    status, seconds, tail = serve_until_exit(glowq_checkpoints.base("llama"), "--quantization", "glowq")
    assert_fails_fast(status, seconds, tail, "--quantization glowq was given, but the model's config.json has "
                                             "no quantization_config: it is not a GlowQ checkpoint")
