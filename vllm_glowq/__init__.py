"""vllm-glowq: the `glowq` quantization method for vLLM.

vLLM calls `register()` in every process (engine, workers, registry subprocess) through the
`vllm.general_plugins` entry point, so it is idempotent and imports vLLM only when called.
Importing this package never imports vLLM or initialises CUDA.
"""

from __future__ import annotations

__version__ = "0.1.0"


def register() -> None:
    """Register the `glowq` QuantizationConfig with vLLM (safe to call more than once), and
    make an uncaught GlowQ error end the process with its one-line message."""
    from . import excepthook
    from .config import register_glowq
    from .loading import quiet_zero_point_dtype_notices

    register_glowq()
    excepthook.install()
    quiet_zero_point_dtype_notices()
