"""Shared pytest fixtures."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

# ----- vLLM plugin fixtures (test_plugin_*.py, test_serve_e2e.py) ------------------------------
# Engine starts dominate the suite's runtime (~45 s each on 2 cores), so checkpoints are built
# once per session and every engine result is cached by its job.


@pytest.fixture(scope="session")
def glowq_checkpoints(tmp_path_factory):
    from vllm_helpers import CheckpointFactory

    return CheckpointFactory(tmp_path_factory.mktemp("glowq-checkpoints"))


@pytest.fixture(scope="session")
def engine_results() -> Callable[[dict[str, Any]], dict[str, Any]]:
    from vllm_helpers import run_engine

    cache: dict[str, dict[str, Any]] = {}

    def run(job: dict[str, Any]) -> dict[str, Any]:
        key = json.dumps(job, sort_keys=True)
        if key not in cache:
            cache[key] = run_engine(job)
        result = cache[key]
        if "error" in result:
            pytest.fail(f"engine failed: {result['error']}\n{result['log'][-3000:]}")
        return result

    return run
