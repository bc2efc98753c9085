"""Escalation guards: keep a query local when it must not leave the machine.

A guard is any callable ``guard(messages) -> str | None``: it returns a reason to keep the
query local, or ``None`` to allow escalation. Pass it as ``ConfidenceRoutedLLM(...,
escalation_guard=guard)``; the router then never sends a guarded query to the cloud (it is
answered locally and flagged, ``escalation_skipped="escalation guard: <reason>"``), whatever
its confidence. A guard that raises also keeps the query local (fails closed).

>>> from langchain_core.messages import HumanMessage
>>> guard = PIIGuard()
>>> guard([HumanMessage("Mail jane.doe@example.com the invoice")])
'email address'
>>> guard([HumanMessage("What is the capital of France?")]) is None
True

Pure Python: regular expressions only, no framework import. A regex guard is a first line of
defence, not a PII classifier; plug a real detector in the same way when you need one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from confidence_router.errors import InvalidArgumentError

# Unicode-aware (``\w`` matches any letter): internationalised addresses such as
# ``josé@exemplo.com.br`` or ``用户@例子.公司`` are emails too.
_EMAIL = re.compile(r"[\w.%+'-]+@(?:[\w-]+\.)+[\w-]{2,}")
_PHONE = re.compile(r"(?<!\w)\+?\d[\d\s().-]{7,}\d(?!\w)")
# 13-19 digits, any run of up to two separators (space, dot, dash, no-break space) between
# them: "4111.1111.1111.1111" and "4111  1111 1111 1111" are cards too (Luhn-checked below).
_CARD = re.compile(r"(?<!\d)(?:\d[ .\-\u00a0]{0,2}){12,18}\d(?!\d)")
# Case-insensitive, compact or grouped by spaces: "de89370400440532013000" is an IBAN.
_IBAN = re.compile(
    r"(?<![\w])[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?(?![\w])", re.IGNORECASE
)
_US_SSN = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")


def _luhn_ok(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    checksum = 0
    for i, digit in enumerate(reversed(digits)):
        if i % 2 == 1:
            digit *= 2
            if digit > 9:
                digit -= 9
        checksum += digit
    return checksum % 10 == 0


#: Content block types whose payload is binary or remote: a text guard cannot read them.
UNREADABLE_BLOCK_TYPES = frozenset(
    {"image", "image_url", "input_image", "document", "file", "audio", "input_audio", "video"}
)
# Keys of binary payloads in provider-native blocks (Bedrock ``{"image": {"source":
# {"bytes": ...}}}``): their values are not text.
_BINARY_KEYS = frozenset({"bytes", "image", "document", "video", "audio"})
# Message fields that never reach a provider (our own metadata, LangChain bookkeeping).
_NOT_SENT = frozenset({"response_metadata", "usage_metadata", "id", "type", "artifact"})


def outgoing_texts(messages: Sequence[Any]) -> tuple[list[str], list[str]]:
    """Every string a chat client could send for ``messages``, and what it cannot read.

    Walks each message completely, not just its text: string content, content blocks of every
    type (``text``, ``reasoning``/``thinking``, tool use and results, provider-native blocks
    without a ``type`` such as Bedrock's ``{"text": ...}``), tool calls and their arguments,
    invalid tool calls, ``additional_kwargs`` (e.g. ``reasoning_content``), names and tool call
    ids. Returns ``(strings, unreadable)``; ``unreadable`` names binary or remote content
    (images, documents, audio, video) that a text guard cannot judge.

    >>> from langchain_core.messages import AIMessage
    >>> msg = AIMessage(content=[{"text": "hi"}], tool_calls=[
    ...     {"name": "send", "args": {"to": "a@b.io"}, "id": "c1"}])
    >>> sorted(outgoing_texts([msg])[0])
    ['a@b.io', 'c1', 'hi', 'send', 'to']
    """
    strings: list[str] = []
    unreadable: list[str] = []
    for message in messages:
        if isinstance(message, str):
            strings.append(message)
            continue
        for name, value in _message_fields(message).items():
            if name not in _NOT_SENT:
                _walk(value, strings, unreadable)
    return strings, unreadable


def _message_fields(message: Any) -> dict[str, Any]:
    if isinstance(message, dict):
        return dict(message)
    dump = getattr(message, "model_dump", None)
    if callable(dump):
        return dict(dump())
    return {"content": getattr(message, "content", message)}


def json_strings(payload: Any) -> tuple[list[str], list[str]]:
    """Every string in a JSON-like payload (keys included, so tool-argument names count) and
    the binary parts it holds: used on request bodies as the cloud client serialised them."""
    strings: list[str] = []
    unreadable: list[str] = []
    _walk(payload, strings, unreadable)
    return strings, unreadable


def _walk(value: Any, strings: list[str], unreadable: list[str]) -> None:
    if value is None or isinstance(value, (bool, int, float)):
        return
    if isinstance(value, str):
        if value:
            strings.append(value)
        return
    if isinstance(value, (bytes, bytearray, memoryview)):
        unreadable.append("binary data")
        return
    if isinstance(value, dict):
        block_type = value.get("type")
        if isinstance(block_type, str) and block_type in UNREADABLE_BLOCK_TYPES:
            unreadable.append(f"{block_type} block")
            return
        for key, item in value.items():
            if key in _BINARY_KEYS and not isinstance(item, str):
                unreadable.append(f"{key} block")
                continue
            if key == "bytes":
                unreadable.append("bytes block")
                continue
            if isinstance(key, str) and key != "type":
                strings.append(key)
            _walk(item, strings, unreadable)
        return
    if isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            _walk(item, strings, unreadable)
        return
    strings.append(str(value))


class PIIGuard:
    """Keep queries that contain personal data local.

    Detects, in every message of the conversation: email addresses, credit-card numbers
    (Luhn-checked), IBANs, US social security numbers and phone numbers. Choose a subset with
    ``kinds``; add your own patterns with ``extra`` (name -> regex).

    Example:
        .. code-block:: python

            router = ConfidenceRoutedLLM(local=..., cloud=..., escalation_guard=PIIGuard())
    """

    KINDS = ("email address", "credit card number", "IBAN", "US SSN", "phone number")

    def __init__(
        self,
        kinds: Sequence[str] = KINDS,
        extra: dict[str, str | re.Pattern[str]] | None = None,
    ) -> None:
        unknown = set(kinds) - set(self.KINDS)
        if unknown:
            raise InvalidArgumentError(f"unknown PII kinds {sorted(unknown)}; known: {list(self.KINDS)}")
        self.kinds = tuple(kinds)
        self.extra = {name: re.compile(p) if isinstance(p, str) else p
                      for name, p in (extra or {}).items()}

    def __call__(self, messages: Sequence[Any]) -> str | None:
        strings, unreadable = outgoing_texts(messages)
        return self.check_request(strings, unreadable)

    def check_request(self, strings: Sequence[str], unreadable: Sequence[str]) -> str | None:
        """The verdict on the strings of a request (and its unreadable parts): content it
        cannot read keeps the query local (fails closed)."""
        if unreadable:
            return f"unreadable content ({unreadable[0]})"
        for text in strings:
            found = self.find(text)
            if found is not None:
                return found
        return None

    def find(self, text: str) -> str | None:
        """The first kind of personal data found in ``text``, or ``None``."""
        if "email address" in self.kinds and _EMAIL.search(text):
            return "email address"
        if "credit card number" in self.kinds and any(
            _luhn_ok(m.group()) for m in _CARD.finditer(text)
        ):
            return "credit card number"
        if "IBAN" in self.kinds and _IBAN.search(text):
            return "IBAN"
        if "US SSN" in self.kinds and _US_SSN.search(text):
            return "US SSN"
        if "phone number" in self.kinds and any(
            # 9-15 digits: phone-length, unlike years ("1939-1945") or short numbers.
            9 <= sum(c.isdigit() for c in m.group()) <= 15 for m in _PHONE.finditer(text)
        ):
            return "phone number"
        for name, pattern in self.extra.items():
            if pattern.search(text):
                return name
        return None
