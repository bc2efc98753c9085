"""Per-request routing knobs from a request body or headers, validated before any model call.

Pure: depends only on :mod:`confidence_router.policy`.

A knob can come from

* the body's top level (``{"threshold": 0.9, ...}``; what the ``openai`` client sends with
  ``extra_body={"threshold": 0.9}``),
* a ``confidence_router`` object in the body (``{"confidence_router": {"threshold": 0.9}}``),
* a header ``x-confidence-router-<knob>`` with ``-`` for ``_`` (``x-confidence-router-threshold: 0.9``).

>>> parse_knobs({"threshold": 0.9}, {"x-confidence-router-allow-escalation": "false"})
{'threshold': 0.9, 'allow_escalation': False}
>>> try:
...     parse_knobs({"confidence_router": {"treshold": 0.9}}, {})
... except KnobError as error:
...     error.param
'confidence_router.treshold'
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from confidence_router.errors import RoutingConfigError
from confidence_router.policy import RoutingPolicy

__all__ = ["BODY_KNOBS_FIELD", "HEADER_PREFIX", "KnobError", "parse_knobs"]

HEADER_PREFIX = "x-confidence-router-"
BODY_KNOBS_FIELD = "confidence_router"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class KnobError(RoutingConfigError):
    """A per-request knob is unknown or invalid; ``param`` names where it came from
    (``threshold``, ``confidence_router.threshold`` or ``x-confidence-router-threshold``)."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


def _known() -> tuple[str, ...]:
    return RoutingPolicy.knob_names()


def _kind(knob: str) -> type:
    """The knob's value type, read from the policy's defaults (so new knobs need no change
    here): ``float`` for numbers, ``bool`` or ``str``."""
    default = getattr(RoutingPolicy(), knob)
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)):
        return float
    return str


def _from_header(knob: str, raw: str, param: str) -> Any:
    text = raw.strip()
    if _kind(knob) is float:
        try:
            return float(text)
        except ValueError:
            raise KnobError(f"{param} must be a number, got {raw!r}", param=param) from None
    if _kind(knob) is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise KnobError(f"{param} must be true or false, got {raw!r}", param=param)
    return text


def _check(knob: str, value: Any, param: str) -> Any:
    """Type-check one knob, then let the policy validate its value."""
    kind = _kind(knob)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KnobError(f"{param} must be a number, got {value!r}", param=param)
        if not math.isfinite(value):
            raise KnobError(f"{param} must be finite, got {value!r}", param=param)
    elif kind is bool:
        if not isinstance(value, bool):
            raise KnobError(f"{param} must be true or false, got {value!r}", param=param)
    elif not isinstance(value, str):
        raise KnobError(f"{param} must be a string, got {value!r}", param=param)
    try:
        RoutingPolicy().with_overrides({knob: value})
    except RoutingConfigError as error:
        raise KnobError(f"{param}: {error}", param=param) from None
    return value


def _reject_misspelt_knobs(body: Mapping[str, Any]) -> None:
    """A top-level field that is nearly a knob's name (``threshhold``, ``allow_escalaton``)
    is a typo, not one of the API's other fields: ignoring it would route with the default
    the client meant to override."""
    import difflib

    for name in body:
        if not isinstance(name, str) or name in _known():
            continue
        close = difflib.get_close_matches(name.lower().replace("-", "_"), _known(), n=1,
                                          cutoff=0.8)
        if close:
            raise KnobError(f"unknown field {name!r} (did you mean the routing knob "
                            f"{close[0]!r}?)", param=name)


def parse_knobs(body: Mapping[str, Any], headers: Mapping[str, str]) -> dict[str, Any]:
    """The routing knobs of one request, validated (headers win over the body).

    Args:
        body: the parsed JSON body (other fields are ignored here).
        headers: the request headers (case-insensitive names are expected lower-case, as
            ASGI delivers them; other headers are ignored).

    Raises:
        KnobError: an unknown knob in the ``confidence_router`` object or in an
            ``x-confidence-router-*`` header, a top-level field that is a near miss of a
            knob's name (``threshhold``), or a knob with an invalid type or value.
    """
    knobs: dict[str, Any] = {}
    for knob in _known():
        if knob in body:
            knobs[knob] = _check(knob, body[knob], knob)
    _reject_misspelt_knobs(body)
    nested = body.get(BODY_KNOBS_FIELD)
    if nested is not None:
        if not isinstance(nested, Mapping):
            raise KnobError(f"{BODY_KNOBS_FIELD} must be an object", param=BODY_KNOBS_FIELD)
        for knob, value in nested.items():
            param = f"{BODY_KNOBS_FIELD}.{knob}"
            if knob not in _known():
                raise KnobError(
                    f"unknown routing knob {knob!r} in {BODY_KNOBS_FIELD}; known: {list(_known())}",
                    param=param,
                )
            knobs[knob] = _check(knob, value, param)
    for name, raw in headers.items():
        lowered = name.lower()
        if not lowered.startswith(HEADER_PREFIX):
            continue
        knob = lowered[len(HEADER_PREFIX):].replace("-", "_")
        if knob not in _known():
            raise KnobError(
                f"unknown routing knob header {lowered!r}; known: "
                f"{[HEADER_PREFIX + k.replace('_', '-') for k in _known()]}",
                param=lowered,
            )
        knobs[knob] = _check(knob, _from_header(knob, raw, lowered), lowered)
    return knobs
