"""Which int4 GEMM a layer gets (vllm_glowq/kernel_choice.py), for every VLLM_GLOWQ_KERNEL setting."""

from __future__ import annotations

import pytest

from vllm_glowq import kernel_choice
from vllm_glowq.format import GlowQFormatError

MACHETE = "MacheteLinearKernel"
NO_VLLM = "no kernel for this shape"
NO_GLOWQ = "the GlowQ int4 kernel runs on CUDA GPUs only"


@pytest.mark.parametrize(
    "mode, vllm_kernel, glowq_refusal, glowq_faster, expected",
    [
        ("auto", MACHETE, None, True, "glowq"),  # a corrected layer on Hopper (docs/benchmarks.md)
        ("auto", MACHETE, None, False, "vllm"),  # plain int4 layers, other GPUs
        ("auto", None, None, False, "glowq"),  # vLLM has nothing for the layer: the project's kernel, not dense
        ("auto", None, NO_GLOWQ, False, "dense"),  # neither (this CPU)
        ("vllm", MACHETE, None, True, "vllm"),
        ("vllm", None, None, False, "dense"),  # the plugin as it was before the project's kernel
        ("glowq", MACHETE, None, False, "glowq"),
        ("dense", MACHETE, None, True, "dense"),
    ],
)
def test_choice_per_mode(mode, vllm_kernel, glowq_refusal, glowq_faster, expected):
    choice = kernel_choice.choose(mode, vllm_kernel, NO_VLLM, glowq_refusal, glowq_faster)
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


def test_moe_factor_setting_is_checked_and_followed(monkeypatch):
    """VLLM_GLOWQ_MOE_FACTORS: a bad value names the choices; auto follows moe_marlin.FACTORS_INT8."""
    from vllm_glowq import moe_marlin

    monkeypatch.setenv(kernel_choice.ENV_MOE_FACTORS, "fp4")
    with pytest.raises(GlowQFormatError, match="VLLM_GLOWQ_MOE_FACTORS='fp4' is not one of auto, int8, full"):
        kernel_choice.moe_factor_mode()
    for setting, shipped, expected in (("int8", False, True), ("full", True, False), ("", True, True),
                                       ("auto", False, False)):
        monkeypatch.setenv(kernel_choice.ENV_MOE_FACTORS, setting)
        monkeypatch.setattr(moe_marlin, "FACTORS_INT8", shipped)
        assert moe_marlin.factors_in_int8() is expected, setting
