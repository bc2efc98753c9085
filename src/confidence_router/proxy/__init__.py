"""A routing proxy: any application reaches the router by changing one base URL.

``confidence-router proxy`` serves an OpenAI-compatible API (``/v1/chat/completions``,
``/v1/models``) and an Ollama-compatible one (``/api/chat``, ``/api/tags``, ``/api/version``);
every request is routed by a router built from the same settings as
``ConfidenceRoutedLLM.from_settings()``. Needs the ``proxy`` extra (Starlette, uvicorn) and,
to share budget, stats and calibration between workers, the ``redis`` extra.

>>> from confidence_router.proxy import ProxyConfig
>>> ProxyConfig().max_body_bytes
1048576
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from confidence_router.proxy.config import ProxyConfig

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ["DEFAULT_PORT", "MAX_WORKERS", "ProxyConfig", "create_app", "serve"]

DEFAULT_PORT = 8080

#: The most worker processes :func:`serve` starts. Each one builds its own router (and loads
#: its clients), so a mistyped ``--workers 1000`` would exhaust memory before serving.
MAX_WORKERS = 64


def create_app(router: Any = None, **kwargs: Any) -> Starlette:
    """The proxy's ASGI app; see :func:`confidence_router.proxy.app.create_app`."""
    from confidence_router._extras import require_extra

    require_extra("proxy", "the routing proxy")
    from confidence_router.proxy.app import create_app as _create_app

    return _create_app(router, **kwargs)


def serve(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    workers: int = 1,
    settings_path: str | None = None,
    log_level: str = "info",
) -> None:
    """Run the proxy with uvicorn until interrupted.

    Every worker process builds its own router from the environment (and ``settings_path``,
    passed to the workers as ``$CONFIDENCE_ROUTER_CONFIG``); configure Redis
    (``$CONFIDENCE_ROUTER_REDIS_URL``) so that they share budget, stats and calibration.

    Raises:
        RoutingConfigError: invalid settings or proxy configuration, or ``workers`` outside
            1..:data:`MAX_WORKERS` (checked before serving).
        ImportError: the ``proxy`` extra is not installed.
    """
    from confidence_router._extras import require_extra

    require_extra("proxy", "the routing proxy")
    import uvicorn

    from confidence_router.errors import RoutingConfigError
    from confidence_router.settings import RouterSettings

    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise RoutingConfigError(f"workers must be an int from 1 to {MAX_WORKERS}, got {workers!r}")
    if settings_path is not None:
        settings_path = os.path.abspath(settings_path)
        os.environ["CONFIDENCE_ROUTER_CONFIG"] = settings_path
    ProxyConfig.from_env()  # fail here, once, rather than in every worker
    RouterSettings.load(settings_path)
    uvicorn.run(
        "confidence_router.proxy.app:create_app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        server_header=False,
    )
