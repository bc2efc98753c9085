"""The proxy's own settings (the router's come from :class:`~confidence_router.settings.RouterSettings`).

Pure stdlib: read from environment variables, so every uvicorn worker process builds the same
configuration.

=============================================== ===========================================
``CONFIDENCE_ROUTER_PROXY_API_KEYS``            comma-separated bearer keys (unset: no auth)
``CONFIDENCE_ROUTER_PROXY_MAX_BODY_BYTES``      request body limit (default 1 MiB)
``CONFIDENCE_ROUTER_PROXY_TIMEOUT_S``           whole-request time limit (default 120 s)
``CONFIDENCE_ROUTER_PROXY_MODEL``               the model id ``/v1/models`` lists
``CONFIDENCE_ROUTER_REDIS_URL``                 share budget/stats/calibration on this Redis
``CONFIDENCE_ROUTER_REDIS_PREFIX``              key prefix per deployment (default
                                                ``confidence-router``)
``CONFIDENCE_ROUTER_BUDGET_USD``                cloud budget per window (unset: no budget)
``CONFIDENCE_ROUTER_BUDGET_WINDOW_S``           the budget's rolling window (default 3600)
``CONFIDENCE_ROUTER_TARGET_RATE``               a rolling-quantile threshold aiming at this
                                                escalation rate (unset: fixed threshold)
``CONFIDENCE_ROUTER_CHROMA_URL``                learn from escalations into a Chroma
                                                server, e.g. ``http://127.0.0.1:8000``
``CONFIDENCE_ROUTER_EMBEDDING_MODEL``           the Ollama embedding model for it
=============================================== ===========================================
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlparse

from confidence_router.errors import RoutingConfigError
from confidence_router.settings import redact_url

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_TIMEOUT_S", "ProxyConfig"]

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_MODEL_ID = "confidence-router"
DEFAULT_REDIS_PREFIX = "confidence-router"
_ENV = "CONFIDENCE_ROUTER_"


@dataclass(frozen=True)
class ProxyConfig:
    """How the proxy serves (limits, keys) and where shared state lives.

    Args:
        api_keys: accepted bearer keys; empty means no authentication.
        max_body_bytes: larger request bodies get 413.
        timeout_s: a request taking longer gets 504 (a stream gets an error event).
        model_id: the model name the OpenAI front lists (any requested name is accepted).
        redis_url: when set, the cloud budget, the routing stats and the threshold calibrator
            live on this Redis, shared by every worker; otherwise they are per process.
        redis_prefix: prefix of every Redis key, one per deployment.
        budget_usd / budget_window_s: cloud spend cap per rolling window (``None``: no cap).
        target_rate: with a value, a rolling-quantile threshold aims at this escalation rate.
        chroma_url: a Chroma server for the knowledge store; every worker then learns from
            every escalation (``learn_from_escalations``). Needs ``embedding_model``.
        embedding_model: the Ollama embedding model (served by the settings' Ollama host).

    Example::

        >>> ProxyConfig.from_env({"CONFIDENCE_ROUTER_PROXY_API_KEYS": "k1,k2"}).api_keys
        ('k1', 'k2')
    """

    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S
    model_id: str = DEFAULT_MODEL_ID
    redis_url: str | None = None
    redis_prefix: str = DEFAULT_REDIS_PREFIX
    budget_usd: float | None = None
    budget_window_s: float = 3600.0
    target_rate: float | None = None
    chroma_url: str | None = None
    embedding_model: str | None = None

    def __post_init__(self) -> None:
        if any(not key or key != key.strip() for key in self.api_keys):
            raise RoutingConfigError("API keys must be non-empty and have no surrounding spaces")
        if isinstance(self.max_body_bytes, bool) or not isinstance(self.max_body_bytes, int):
            raise RoutingConfigError(f"max_body_bytes must be an int, got {self.max_body_bytes!r}")
        if self.max_body_bytes < 1:
            raise RoutingConfigError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        _positive("timeout_s", self.timeout_s)
        _positive("budget_window_s", self.budget_window_s)
        if self.budget_usd is not None:
            _positive("budget_usd", self.budget_usd, allow_zero=True)
        if self.target_rate is not None and not 0.0 < self.target_rate < 1.0:
            raise RoutingConfigError(f"target_rate must be in (0, 1), got {self.target_rate!r}")
        if not self.model_id.strip():
            raise RoutingConfigError("model_id must not be empty")
        if self.redis_url is not None and urlparse(self.redis_url).scheme not in (
            "redis", "rediss", "unix",
        ):  # fmt: skip
            raise RoutingConfigError(
                "redis_url must be a redis://, rediss:// or unix:// URL "
                f"(got a {urlparse(self.redis_url).scheme or 'scheme-less'} value)"
            )
        if not self.redis_prefix or any(c.isspace() for c in self.redis_prefix):
            raise RoutingConfigError(f"redis_prefix must be a non-empty word, got {self.redis_prefix!r}")
        if self.chroma_url is not None and urlparse(self.chroma_url).scheme not in ("http", "https"):
            raise RoutingConfigError(
                f"chroma_url must be an http(s) URL, got {redact_url(self.chroma_url)!r}"
            )
        if self.chroma_url is not None and not self.embedding_model:
            raise RoutingConfigError(
                "chroma_url needs an embedding_model (CONFIDENCE_ROUTER_EMBEDDING_MODEL)"
            )

    def __repr__(self) -> str:
        """The dataclass repr without secrets: API keys as ``***``, URL passwords masked."""
        shown: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["api_keys"] = ("***",) * len(self.api_keys)
        for name in ("redis_url", "chroma_url"):
            if shown[name] is not None:
                shown[name] = redact_url(shown[name])
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ProxyConfig:
        """The configuration from environment variables (see the module docstring).

        Raises:
            RoutingConfigError: a value is malformed (the message names the variable, never
                prints an API key).
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(_ENV + name)
            return value.strip() if value is not None and value.strip() else None

        values: dict[str, Any] = {}
        keys = get("PROXY_API_KEYS")
        if keys:
            values["api_keys"] = tuple(k.strip() for k in keys.split(",") if k.strip())
            if not values["api_keys"]:
                # Set, but only separators (e.g. an empty template substitution): serving
                # without authentication would be the silent result.
                raise RoutingConfigError(
                    f"{_ENV}PROXY_API_KEYS is set but holds no key (comma-separated keys); "
                    "unset it to serve without API keys"
                )
        if (raw := get("PROXY_MAX_BODY_BYTES")) is not None:
            values["max_body_bytes"] = _parse(int, "PROXY_MAX_BODY_BYTES", raw)
        for name, key in (
            ("PROXY_TIMEOUT_S", "timeout_s"),
            ("BUDGET_USD", "budget_usd"),
            ("BUDGET_WINDOW_S", "budget_window_s"),
            ("TARGET_RATE", "target_rate"),
        ):
            if (raw := get(name)) is not None:
                values[key] = _parse(float, name, raw)
        for name, key in (
            ("PROXY_MODEL", "model_id"),
            ("REDIS_URL", "redis_url"),
            ("REDIS_PREFIX", "redis_prefix"),
            ("CHROMA_URL", "chroma_url"),
            ("EMBEDDING_MODEL", "embedding_model"),
        ):
            if (raw := get(name)) is not None:
                values[key] = raw
        return cls(**values)


def _parse(kind: type, name: str, raw: str) -> Any:
    try:
        return kind(raw)
    except ValueError:
        raise RoutingConfigError(
            f"{_ENV}{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}"
        ) from None


def _positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RoutingConfigError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise RoutingConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
