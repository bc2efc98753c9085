"""An Ollama-compatible HTTP server with pluggable generation backends.

The unchanged ``ChatOllama`` / ``ollama`` clients talk to it through ``base_url``.
Backends: :class:`confidence_router.testing.ScriptedBackend` (scripted answers, for tests)
and :class:`confidence_router.serving.llamacpp.LlamaCppBackend` (a real GGUF model).
"""

from confidence_router.serving.protocol import (
    BackendError,
    ChatBackend,
    ChatReply,
    ChatRequest,
    GeneratedToken,
)

__all__ = ["BackendError", "ChatBackend", "ChatReply", "ChatRequest", "GeneratedToken"]
