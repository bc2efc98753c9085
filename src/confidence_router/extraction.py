"""Read per-token log-probabilities out of chat-model response metadata.

Pure Python: works on plain dicts and on objects with attributes, so it needs no framework
import. Two layouts are understood:

* Ollama (``ChatOllama``): ``response_metadata["logprobs"]`` is a list with one item per
  generated token, each ``{token, logprob, top_logprobs: [{token, logprob}, ...]}``; the items
  are ``ollama`` pydantic objects on invoke and are concatenated across stream chunks.
* OpenAI style (``ChatOpenAI`` against vLLM, llama.cpp server, LM Studio):
  ``response_metadata["logprobs"] == {"content": [{token, logprob, top_logprobs}, ...]}``.

>>> from confidence_router.extraction import token_logprobs
>>> meta = {"logprobs": [{"token": "Rome", "logprob": -0.2, "top_logprobs": []}]}
>>> [t.logprob for t in token_logprobs(meta)]
[-0.2]
>>> token_logprobs({}) is None
True
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confidence_router.errors import InvalidArgumentError


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token, its logprob and its top alternatives ``(token, logprob)``."""

    token: str
    logprob: float
    top_logprobs: tuple[tuple[str, float], ...] = ()


# Whether a type is a Mapping, per type: the ABC check of isinstance(item, Mapping) is slow,
# and this runs for every token of every answer.
_IS_MAPPING: dict[type, bool] = {dict: True}


def _is_mapping(item: Any) -> bool:
    kind = type(item)
    is_mapping = _IS_MAPPING.get(kind)
    if is_mapping is None:
        is_mapping = _IS_MAPPING[kind] = isinstance(item, Mapping)
    return is_mapping


def _field(item: Any, name: str) -> Any:
    return item.get(name) if _is_mapping(item) else getattr(item, name, None)


def _parse_item(item: Any) -> TokenLogprob | None:
    if _is_mapping(item):
        logprob, token, raw_tops = item.get("logprob"), item.get("token"), item.get("top_logprobs")
    else:
        logprob = getattr(item, "logprob", None)
        token = getattr(item, "token", None)
        raw_tops = getattr(item, "top_logprobs", None)
    if logprob is None:
        return None
    if not raw_tops:  # the common case on the routing path: no alternatives were asked for
        return TokenLogprob(str(token or ""), float(logprob))
    tops = []
    for top in raw_tops:
        top_lp = _field(top, "logprob")
        if top_lp is not None:
            tops.append((str(_field(top, "token") or ""), float(top_lp)))
    return TokenLogprob(str(token or ""), float(logprob), tuple(tops))


def _items(response_metadata: Mapping[str, Any] | None) -> Sequence[Any] | None:
    """The per-token entries of either layout, ``None`` when there are no logprobs."""
    if not response_metadata:
        return None
    raw = response_metadata.get("logprobs")
    if raw is None:
        return None
    if isinstance(raw, Mapping) or (not isinstance(raw, (list, tuple)) and hasattr(raw, "content")):
        # OpenAI layout: {"content": [...]} (may be absent when the answer is a refusal).
        content = _field(raw, "content")
        return list(content) if content is not None else None
    if isinstance(raw, (list, tuple)):
        return raw
    return None


def token_logprobs(response_metadata: Mapping[str, Any] | None) -> list[TokenLogprob] | None:
    """The generated tokens' logprobs from a message's ``response_metadata``.

    Returns ``None`` when the metadata carries no logprobs at all (an older Ollama, a model or
    endpoint without logprobs, a cloud model): the caller must treat confidence as unknown.
    Returns an empty list when the layout is present but holds no tokens.
    """
    items = _items(response_metadata)
    if items is None:
        return None
    parsed = []
    for item in items:
        if item is not None:
            token = _parse_item(item)
            if token is not None:
                parsed.append(token)
    return parsed


def chosen_logprobs(response_metadata: Mapping[str, Any] | None) -> list[float] | None:
    """Only the chosen tokens' logprobs, when no token carries top alternatives.

    The routing hot path: the signals of such an answer need nothing else, and building a
    :class:`TokenLogprob` per token costs more than the signals. Returns ``None`` when the
    metadata has no logprobs **or** any token has alternatives: call :func:`token_logprobs`
    then. Tokens without a logprob are skipped, as there.

    >>> chosen_logprobs({"logprobs": [{"token": "Rome", "logprob": -0.2}]})
    [-0.2]
    >>> chosen_logprobs({"logprobs": [{"token": "Rome", "logprob": -0.2,
    ...                               "top_logprobs": [{"token": "Rome", "logprob": -0.2}]}]})
    """
    items = _items(response_metadata)
    if items is None:
        return None
    values = []
    for item in items:
        if item is None:
            continue
        if type(item) is dict or _is_mapping(item):
            logprob, tops = item.get("logprob"), item.get("top_logprobs")
        else:
            logprob, tops = getattr(item, "logprob", None), getattr(item, "top_logprobs", None)
        if logprob is None:
            continue
        if tops:
            return None
        values.append(float(logprob))
    return values


def message_token_logprobs(message: Any) -> list[TokenLogprob] | None:
    """:func:`token_logprobs` of a LangChain message (anything with ``response_metadata``)."""
    return token_logprobs(getattr(message, "response_metadata", None))


def message_text(message: Any) -> str:
    """Plain text of a chat message: string content, or the text blocks of a content list
    (Bedrock streams lists of blocks), or the string itself.

    >>> from types import SimpleNamespace
    >>> message_text(SimpleNamespace(content=[{"type": "text", "text": "Par"}, "is"]))
    'Paris'
    """
    if isinstance(message, str):
        return message
    content = getattr(message, "content", None)
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, Mapping) and block.get("type") == "text":
                parts.append(str(block.get("text", "")))
        return "".join(parts)
    return "" if content is None else str(content)


_TOKENS_FORMAT = 1


def encode_tokens(tokens: Sequence[TokenLogprob] | None) -> bytes | None:
    """Compact, exact storage of an answer's tokens: zlib-compressed JSON (evaluation runs).

    Layout (format 1): ``{"v": 1, "t": [text, ...], "lp": [logprob, ...], "top": [[[alt,
    logprob], ...], ...]}``. Floats are written with ``repr`` precision, so decoding gives
    back the identical values and any signal recomputed from them equals the live one.
    ``None`` (no token data) stays ``None``.

    >>> toks = (TokenLogprob(" Rome", -0.25, ((" Rome", -0.25), (" Milan", -2.0))),)
    >>> decode_tokens(encode_tokens(toks)) == toks
    True
    """
    if tokens is None:
        return None
    payload = {
        "v": _TOKENS_FORMAT,
        "t": [t.token for t in tokens],
        "lp": [t.logprob for t in tokens],
        "top": [[[alt, lp] for alt, lp in t.top_logprobs] for t in tokens],
    }
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return zlib.compress(text.encode("utf-8"), 9)


def decode_tokens(blob: bytes | None) -> tuple[TokenLogprob, ...] | None:
    """Inverse of :func:`encode_tokens` (``None`` for rows without token data).

    Raises ``ValueError`` for a blob in an unknown format.
    """
    if blob is None:
        return None
    payload = json.loads(zlib.decompress(bytes(blob)).decode("utf-8"))
    if not isinstance(payload, dict) or payload.get("v") != _TOKENS_FORMAT:
        version = payload.get("v") if isinstance(payload, dict) else None
        raise InvalidArgumentError(f"unknown token storage format {version!r}")
    return tuple(
        TokenLogprob(str(text), float(lp), tuple((str(a), float(b)) for a, b in top))
        for text, lp, top in zip(payload["t"], payload["lp"], payload["top"], strict=True)
    )
