"""Which int4 GEMM a layer gets (vllm_glowq/kernel_choice.py), for every VLLM_GLOWQ_KERNEL setting."""

from __future__ import annotations

import pytest

from vllm_glowq import kernel_choice
from vllm_glowq.format import GlowQFormatError

MACHETE = "MacheteLinearKernel"
NO_VLLM = "no kernel for this shape"
NO_GLOWQ = "the GlowQ int4 kernel runs on CUDA GPUs only"


@pytest.mark.parametrize(
    "mode, vllm_kernel, glowq_refusal, expected",
    [
        ("auto", MACHETE, None, "vllm"),  # measured faster where it exists (docs/benchmarks.md)
        ("auto", None, None, "glowq"),  # vLLM has nothing for the layer: the project's kernel, not dense
        ("auto", None, NO_GLOWQ, "dense"),  # neither (this CPU)
        ("vllm", MACHETE, None, "vllm"),
        ("vllm", None, None, "dense"),  # the plugin as it was before the project's kernel
        ("glowq", MACHETE, None, "glowq"),
        ("dense", MACHETE, None, "dense"),
    ],
)
def test_choice_per_mode(mode, vllm_kernel, glowq_refusal, expected):
    choice = kernel_choice.choose(mode, vllm_kernel, NO_VLLM, glowq_refusal)
    assert choice.kind == expected
    if expected == "dense" and mode == "auto":
        assert NO_VLLM in choice.why and NO_GLOWQ in choice.why  # the log says why both were refused


def test_forcing_the_glowq_kernel_where_it_cannot_run_is_an_error():
    with pytest.raises(GlowQFormatError, match="VLLM_GLOWQ_KERNEL=glowq, but the GlowQ int4 kernel runs on CUDA"):
        kernel_choice.choose("glowq", MACHETE, NO_VLLM, NO_GLOWQ)


def test_bad_setting_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setenv(kernel_choice.ENV_KERNEL, "fastest")
    with pytest.raises(GlowQFormatError, match="VLLM_GLOWQ_KERNEL='fastest' is not one of auto, glowq, vllm, dense"):
        kernel_choice.kernel_mode()
    monkeypatch.setenv(kernel_choice.ENV_KERNEL, " GlowQ ")
    assert kernel_choice.kernel_mode() == "glowq"
