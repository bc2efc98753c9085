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
from collections.abc import Iterable, Sequence
from typing import Any

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_PHONE = re.compile(r"(?<!\w)\+?\d[\d\s().-]{7,}\d(?!\w)")
_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:\s?[A-Z0-9]{4}){2,7}(?:\s?[A-Z0-9]{1,4})?\b")
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


def _texts(messages: Sequence[Any]) -> Iterable[str]:
    for message in messages:
        if isinstance(message, str):
            yield message
            continue
        text = getattr(message, "text", None)  # LangChain messages: str-like property
        yield str(text) if isinstance(text, str) else str(getattr(message, "content", ""))


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
            raise ValueError(f"unknown PII kinds {sorted(unknown)}; known: {list(self.KINDS)}")
        self.kinds = tuple(kinds)
        self.extra = {name: re.compile(p) if isinstance(p, str) else p
                      for name, p in (extra or {}).items()}

    def __call__(self, messages: Sequence[Any]) -> str | None:
        for text in _texts(messages):
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
