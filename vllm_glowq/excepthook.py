"""End a process on an uncaught GlowQ error with one line, not a traceback.

`vllm serve` builds its configuration inside pydantic, which wraps the plugin's
`GlowQFormatError` (a bad checkpoint, found in the front end before an engine starts) in a
`ValidationError` and prints 40 lines of vLLM's own frames above it. The message already names
the tensor or key and the fix, so when such an error reaches the top of a process this hook
prints `vllm-glowq: error: MESSAGE` as the last line and the process exits with status 1.
Every other exception goes to the previous hook unchanged.
"""

from __future__ import annotations

import sys
from types import TracebackType

from .format import GlowQFormatError

PREFIX = "vllm-glowq: error:"


def install() -> None:
    """Chain the hook in front of the current one (once per process)."""
    if getattr(sys.excepthook, "glowq_hook", False):
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
        found = glowq_error_in(error)
        if found is None:
            previous(kind, error, trace)
        else:
            print(f"{PREFIX} {found}", file=sys.stderr, flush=True)

    hook.glowq_hook = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def glowq_error_in(error: BaseException | None) -> GlowQFormatError | None:
    """The GlowQ error behind `error`: itself, one pydantic wrapped, or one in its chain."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, GlowQFormatError):
            return error
        for wrapped in _pydantic_wrapped(error):
            if isinstance(wrapped, GlowQFormatError):
                return wrapped
        error = error.__cause__ or error.__context__
    return None


def _pydantic_wrapped(error: BaseException) -> list[BaseException]:
    """The exceptions a pydantic ValidationError carries in each error's `ctx["error"]`
    (its documented `errors()` API; other exception types have no such method)."""
    errors = getattr(error, "errors", None)
    if not callable(errors) or type(error).__name__ != "ValidationError":
        return []
    return [e["ctx"]["error"] for e in errors() if isinstance(e.get("ctx", {}).get("error"), BaseException)]
