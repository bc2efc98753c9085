"""The routing decision as trace metadata and tags (LangSmith and any LangChain tracer).

The routing record is on every message (``response_metadata["routing"]``), but trace viewers
filter runs by *metadata* and *tags*. :func:`routing_run_metadata` flattens a record into
filterable scalar metadata (``routing_decision``, ``routing_reason``, ``routing_confidence``,
costs, latencies ...) and :func:`routing_run_tags` gives tags (``routing:cloud``,
``routing:reason=low_confidence``, ...). :func:`annotate_run` writes both onto the router's
own run in every LangChain tracer attached to the call (``LangChainTracer`` for LangSmith,
or any ``BaseTracer``), before the run ends, so they are sent with it.

Pure functions on plain dicts; LangChain is imported only by :func:`annotate_run`.

Example (LangSmith UI filter: ``metadata_key = "routing_decision" and
metadata_value = "cloud"``, or ``has(tags, "routing:cloud")``)::

    >>> from confidence_router.telemetry import routing_run_metadata, routing_run_tags
    >>> record = {"decision": "cloud", "reason": "low_confidence", "confidence": 0.41,
    ...           "threshold": 0.7, "escalated": True, "latency_s": {"local": 0.2,
    ...           "cloud": 1.1, "total": 1.3}, "cost_usd": 0.0021}
    >>> meta = routing_run_metadata(record)
    >>> meta["routing_decision"], meta["routing_confidence"], meta["routing_cloud_latency_s"]
    ('cloud', 0.41, 1.1)
    >>> routing_run_tags(record)
    ['routing:cloud', 'routing:reason=low_confidence', 'routing:escalated']
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any
from uuid import UUID

from confidence_router.errors import InvalidTypeError

__all__ = ["METADATA_PREFIX", "annotate_run", "routing_run_metadata", "routing_run_tags"]

#: Prefix of every metadata key this module writes (one namespace, easy to filter on).
METADATA_PREFIX = "routing_"

# Record key -> metadata key suffix, for the scalar facts worth filtering or charting on.
_SCALARS: dict[str, str] = {
    "decision": "decision",
    "reason": "reason",
    "confidence": "confidence",
    "threshold": "threshold",
    "signal": "signal",
    "escalated": "escalated",
    "would_escalate": "would_escalate",
    "flagged": "flagged",
    "escalation_skipped": "escalation_skipped",
    "refusal": "refusal",
    "local_error_kind": "local_error_kind",
    "cloud_error_kind": "cloud_error_kind",
    "cloud_error_code": "cloud_error_code",
    "cloud_attempts": "cloud_attempts",
    "cost_usd": "cost_usd",
    "local_cost_usd": "local_cost_usd",
    "cloud_cost_usd": "cloud_cost_usd",
    "all_cloud_cost_usd": "all_cloud_cost_usd",
    "budget_reserved_usd": "budget_reserved_usd",
    "learned": "learned",
}


def _scalar(value: Any) -> bool:
    if isinstance(value, (bool, str, int)):
        return True
    return isinstance(value, float) and math.isfinite(value)


def routing_run_metadata(record: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten a routing record into run metadata: ``routing_<field>`` -> scalar.

    Only scalar (str, bool, int, finite float) facts are kept, and ``None`` values are
    omitted (an unknown confidence is simply absent, never a fake 0). Latencies become
    ``routing_<stage>_latency_s`` (``local``, ``cloud``, ``precheck``, ``total``); the
    pre-check probe adds ``routing_precheck_p_yes``. Prompts, answers and error messages are
    never included (error *kinds* are).

    Raises:
        TypeError: ``record`` is not a mapping.
    """
    if not isinstance(record, Mapping):
        raise InvalidTypeError(f"record must be a mapping, got {type(record).__name__}")
    metadata: dict[str, Any] = {}
    for key, suffix in _SCALARS.items():
        value = record.get(key)
        if value is not None and _scalar(value):
            metadata[METADATA_PREFIX + suffix] = value
    latencies = record.get("latency_s")
    if isinstance(latencies, Mapping):
        for stage, seconds in latencies.items():
            if _scalar(seconds) and not isinstance(seconds, (bool, str)):
                try:
                    value = float(seconds)
                except OverflowError:  # an int too large for a float is no latency
                    continue
                if math.isfinite(value):
                    metadata[f"{METADATA_PREFIX}{stage}_latency_s"] = value
    precheck = record.get("precheck")
    if isinstance(precheck, Mapping) and _scalar(precheck.get("p_yes")):
        metadata[METADATA_PREFIX + "precheck_p_yes"] = precheck["p_yes"]
    return metadata


def routing_run_tags(record: Mapping[str, Any]) -> list[str]:
    """Tags for the router's run: ``routing:<decision>``, ``routing:reason=<reason>``, and
    ``routing:escalated`` / ``routing:would-escalate`` / ``routing:flagged`` when they hold.

    Raises:
        TypeError: ``record`` is not a mapping.
    """
    if not isinstance(record, Mapping):
        raise InvalidTypeError(f"record must be a mapping, got {type(record).__name__}")
    tags = [f"routing:{record.get('decision') or 'unknown'}"]
    if record.get("reason"):
        tags.append(f"routing:reason={record['reason']}")
    if record.get("escalated"):
        tags.append("routing:escalated")
    elif record.get("would_escalate"):
        tags.append("routing:would-escalate")
    if record.get("flagged"):
        tags.append("routing:flagged")
    return tags


def annotate_run(handlers: Iterable[Any], run_id: UUID | None, record: Mapping[str, Any]) -> int:
    """Write the routing metadata and tags onto run ``run_id`` in every LangChain tracer among
    ``handlers`` (and the metadata onto the run as ``astream_events`` reports it, in its end
    event), with ``ls_model_name`` set to the model that answered; returns how many handlers
    held the run.

    Call it after the decision and before the run ends (the tracer sends metadata and tags
    when the run ends). Inside a chat model: ``annotate_run(run_manager.handlers,
    run_manager.run_id, routing)``. Handlers that are not tracers, and tracers that do not
    hold the run, are left alone; existing metadata and tags are kept.

    Example (a tracer collecting finished runs)::

        from langchain_core.tracers.base import BaseTracer

        class Collect(BaseTracer):
            def __init__(self):
                super().__init__()
                self.runs = []
            def _persist_run(self, run):
                self.runs.append(run)

        tracer = Collect()
        router.invoke("Capital of Kenya?", config={"callbacks": [tracer]})
        tracer.runs[0].extra["metadata"]["routing_decision"]   # "local" or "cloud"
    """
    if run_id is None:
        return 0
    from langchain_core.tracers.base import BaseTracer

    metadata = routing_run_metadata(record)
    models = record.get("models")
    decision = record.get("decision")
    answering = (
        models.get(decision) if isinstance(models, Mapping) and isinstance(decision, str) else None
    )
    if isinstance(answering, str) and answering:
        # Known only now: the model whose answer this run returns (not always the local).
        metadata["ls_model_name"] = answering
    tags = routing_run_tags(record)
    annotated = 0
    for handler in handlers:
        if not isinstance(handler, BaseTracer):
            annotated += _annotate_event_stream(handler, run_id, metadata)
            continue
        run = handler.run_map.get(str(run_id))
        if run is None:
            continue
        run.extra.setdefault("metadata", {}).update(metadata)
        run.tags = [*(run.tags or []), *(t for t in tags if t not in (run.tags or []))]
        annotated += 1
    return annotated


def _annotate_event_stream(handler: Any, run_id: UUID, metadata: Mapping[str, Any]) -> int:
    """The same metadata on the run as ``astream_events`` reports it: its handler (not a
    tracer) keeps each open run's metadata in ``run_map[run_id]["metadata"]`` and sends it
    with the run's end event. A new dict, so events already sent keep what they said."""
    run_map = getattr(handler, "run_map", None)
    info = run_map.get(run_id) if isinstance(run_map, dict) else None
    if not isinstance(info, dict) or not isinstance(info.get("metadata"), Mapping):
        return 0
    info["metadata"] = {**info["metadata"], **metadata}
    return 1
