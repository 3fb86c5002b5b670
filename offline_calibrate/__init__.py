"""offline_calibrate: turn a Hugging Face causal LM into a GlowQ checkpoint that vLLM serves.

    from offline_calibrate import calibrate, CalibrationOptions
    calibrate("path/to/hf-model", "path/to/ckpt", CalibrationOptions(rank=64, group_size=128))
    calibrate("path/to/model.Q8_0.gguf", "path/to/ckpt")   # a GGUF file, dequantized by transformers
"""

from __future__ import annotations

from .calibrate import calibrate
from .options import CalibrationOptions

__all__ = ["calibrate", "CalibrationOptions"]
