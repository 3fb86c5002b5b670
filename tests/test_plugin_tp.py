"""Tensor parallelism on the CPU: two ranks give the same greedy tokens as one.

At TP=2 the tiny Llama's qkv_proj/gate_up_proj replicate B and shard A with the output rows,
and o_proj/down_proj shard B along the input and rely on the layer's all-reduce (notes §5);
every one of those layers carries factors, so each sharding path is exercised.
"""

from __future__ import annotations

import pytest
from vllm_helpers import compare_with_reference, standard_job

pytestmark = pytest.mark.slow

FP32_TOLERANCE = 2e-3


def test_tp2_matches_tp1(glowq_checkpoints, engine_results):
    checkpoint = glowq_checkpoints.get("llama")
    single = engine_results(standard_job(checkpoint))
    split = engine_results(standard_job(checkpoint, tensor_parallel_size=2))
    assert [o["token_ids"] for o in split["outputs"]] == [o["token_ids"] for o in single["outputs"]]
    assert split["layers"].keys() == single["layers"].keys()
    comparison = compare_with_reference(checkpoint, split["outputs"])
    assert comparison["max_abs_diff"] < FP32_TOLERANCE, comparison
