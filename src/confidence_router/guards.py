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

import functools
import html
import math
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

from confidence_router.errors import InvalidArgumentError

# Unicode-aware (``\w`` matches any letter): internationalised addresses such as
# ``josé@exemplo.com.br`` or ``用户@例子.公司`` are emails too. A line break right after the
# ``@`` still reads as one address (Converse joins consecutive user messages with one).
# The look-behind starts a match only where a run of address characters starts: without it a
# long run with no "@" (base64, minified JSON) costs quadratic time.
_EMAIL = re.compile(r"(?<![\w.%+'-])[\w.%+'-]+@(?:\r?\n)?(?:[\w-]+\.)+[\w-]{2,}")
# Card numbers as people write them: compact (13-19 digits), or in groups of four (16 or 19
# digits) or 4-6-5 / 4-6-4 (Amex, Diners), separated by up to three spaces, dots, dashes or
# line breaks ("4111 - 1111 - ..."); never a piece of a longer alphanumeric token ("IPv4
# 192...", hashes) or of a longer number ("1.4111 ..."), but right after an abbreviation
# ("Card no.4111 ...").
_CARD_SEP = r"[\s.\-]{1,3}"
_CARD = re.compile(
    r"(?<![\w\-])(?<!\d\.)(?:\d{13,19}"
    rf"|\d{{4}}(?:{_CARD_SEP}\d{{4}}){{3}}(?:{_CARD_SEP}\d{{3}})?"
    rf"|\d{{4}}{_CARD_SEP}\d{{6}}{_CARD_SEP}\d{{4,5}})(?!\d)"
)
_YEAR = re.compile(r"(?:1[89]|20)\d\d")
# Case-insensitive, compact or grouped by one or two spaces or line breaks:
# "de89370400440532013000", "de89  3704  0044 ..." and "DE89\n3704..." are IBANs.
_IBAN = re.compile(
    r"(?<![\w])[A-Z]{2}\d{2}(?:\s{0,2}[A-Z0-9]{4}){2,7}(?:\s{0,2}[A-Z0-9]{1,4})?(?![\w])",
    re.IGNORECASE,
)
# Grouped by dashes ("DE89-3704-0044-..."): only with valid check digits, as product codes and
# UUIDs have that shape too.
_IBAN_DASHED = re.compile(
    r"(?<![\w-])[A-Z]{2}\d{2}(?:-[A-Z0-9]{4}){2,7}(?:-[A-Z0-9]{1,4})?(?![\w-])", re.IGNORECASE
)
_US_SSN = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
# Phone numbers: international ("+44 20 7946 0958", "+447946095800"); national ones grouped
# ("(202) 555-0123", "020 7946 0958", "06 12 34 56 78"); or any 9-15 digit number right after
# a word such as "phone" or "call". Not versions, dates and times, IP addresses, decimals or
# pieces of longer numbers ("2024-05-17 10:00", "10.0.19045", "3.14159265").
_PHONE_INTERNATIONAL = re.compile(r"(?<![\w+])\+\d[\d\s().\-]{6,}\d(?!\d)")
_PHONE_GROUPED = re.compile(
    r"(?<![\w.,:/+\-])(?<!\d )(?:\(\d{2,5}\)|\d{2,5})(?:[ .\-]{1,2}\d{2,5}){1,5}"
    r"(?![\w.,:/\-]?\d)"
)
_PHONE_AFTER_WORD = re.compile(
    r"\b(?:phone|telephone|tel|mobile|cell|fax|whatsapp|call|sms)\b\W{0,5}(\d{9,15})(?!\d)",
    re.IGNORECASE,
)
# Keys that say their value is a phone number ("phone", "mobilePhone", "cell_no", "tel"),
# not words that merely contain such letters ("hotel", "telemetry", "cancelled").
_PHONE_KEY = re.compile(
    r"phone|mobile|fax|whatsapp|(?<![a-z])(?:tel|cell|sms)(?![a-z])", re.IGNORECASE
)
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_DATE = re.compile(r"(?<!\d)(?:\d{4}([-./])\d{2}\1\d{2}|\d{2}([-./])\d{2}\2\d{4})(?!\d)")

# Invisible characters a reader (or a model) skips but a pattern does not: zero-width spaces
# and joiners, soft hyphens, direction marks, BOMs, ... (Unicode category Cf) are dropped;
# Unicode "tag" characters, which spell ASCII invisibly, become that ASCII.
_FORMAT_CHARS = (
    [0x00AD, 0x061C, 0x180E, 0xFEFF, 0x034F]
    + list(range(0x200B, 0x2010))
    + list(range(0x202A, 0x202F))
    + list(range(0x2060, 0x2070))
    + list(range(0xFE00, 0xFE10))
    + list(range(0xFFF9, 0xFFFC))
)
_UNHIDE: dict[int, int | None] = {code: None for code in _FORMAT_CHARS}
_UNHIDE.update({0xE0000 + code: code for code in range(0x20, 0x7F)})
_UNHIDE.update({code: None for code in (0xE0001, 0xE007F)})
_NEEDS_NORMALISING = re.compile(r"[^\x00-\x7f]|&")


def normalise(text: str) -> str:
    """``text`` as a reader sees it: invisible characters removed, Unicode compatibility forms
    folded (fullwidth ``＠`` and digits become ``@`` and ASCII digits), HTML character
    references decoded (``&#64;`` is ``@``). Plain ASCII text without ``&`` is returned as is.

    >>> normalise("jane\u200b.doe\uff20example.com")
    'jane.doe@example.com'
    """
    if not _NEEDS_NORMALISING.search(text):
        return text
    text = unicodedata.normalize("NFKC", text.translate(_UNHIDE))
    if "&" in text:
        text = html.unescape(text)
    return text


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


def _without_marks(text: str) -> str:
    """``text`` without combining marks (Unicode categories Mn, Mc, Me), for the email check."""
    return text.translate(_mark_table())


@functools.cache
def _mark_table() -> dict[int, None]:
    # The Basic Multilingual Plane's combining marks (~1,300; built once, ~12 ms, on the first
    # non-ASCII text with an "@"): every script's letters with vowel signs are in it.
    return {
        code: None
        for code in range(0x300, 0x10000)
        if unicodedata.category(chr(code)) in ("Mn", "Mc", "Me")
    }


def _is_card(candidate: str) -> bool:
    groups = re.split(r"[\s.\-]+", candidate)
    if len(groups) > 1 and all(_YEAR.fullmatch(g) for g in groups):
        return False  # a list of years ("1914 1918 1939 1945")
    return _luhn_ok(candidate)


def _iban_checksum_ok(compact: str) -> bool:
    """ISO 13616 check digits: the number with its first four characters moved to the end and
    letters as 10..35 is 1 modulo 97."""
    rearranged = compact[4:] + compact[:4]
    try:
        return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1
    except ValueError:
        return False


def _is_iban(match: re.Match[str]) -> bool:
    """An IBAN as people write it, or any token with valid check digits.

    A compact IBAN-shaped token between base64 characters (``/``, ``+``, ``=``), such as
    "Ab12..." in a reasoning signature, counts only with valid check digits: one random
    signature in nine holds such a token. Anywhere else the shape is enough, so that an IBAN
    with a typo (or an invented one) is still kept from the cloud. A word run on after the
    number may have been taken as its last group, so that group is also tried without.
    """
    candidate, text = match.group(), match.string
    groups = candidate.split()
    compact = "".join(groups).upper()
    if _iban_checksum_ok(compact):
        return True
    if len(groups) > 2 and _iban_checksum_ok("".join(groups[:-1]).upper()):
        return True
    before = text[match.start() - 1] if match.start() > 0 else ""
    after = text[match.end()] if match.end() < len(text) else ""
    return before not in _BASE64_ONLY and after not in _BASE64_ONLY


# Characters that appear next to an alphanumeric run inside base64 but rarely in prose.
_BASE64_ONLY = frozenset("/+=")


def _is_phone(candidate: str) -> bool:
    digits = sum(c.isdigit() for c in candidate)
    if not 9 <= digits <= 15:
        return False
    return not (_IPV4.fullmatch(candidate) or _DATE.search(candidate))


#: Content block types whose payload is binary, remote or encrypted: a text guard cannot read
#: them (redacted reasoning is the provider's encrypted text: nobody here can judge it).
UNREADABLE_BLOCK_TYPES = frozenset(
    {"image", "image_url", "input_image", "document", "file", "audio", "input_audio", "video",
     "text-plain", "redacted_thinking", "redacted_reasoning"}
)
# Keys of binary payloads in provider-native blocks (Bedrock ``{"image": {"source":
# {"bytes": ...}}}``): their values are not text.
_BINARY_KEYS = frozenset({"bytes", "image", "document", "video", "audio"})
# Keys whose value is opaque even when it is a string: serialised ``bytes`` (base64 on the
# wire) and Bedrock's encrypted ``redactedContent`` reasoning.
_OPAQUE_KEYS = frozenset({"bytes", "redactedContent", "redacted_content"})
# Message fields that never reach a provider (our own metadata, LangChain bookkeeping).
_NOT_SENT = frozenset({"response_metadata", "usage_metadata", "id", "type", "artifact"})


def outgoing_texts(messages: Sequence[Any]) -> tuple[list[str], list[str]]:
    """Every string a chat client could send for ``messages``, and what it cannot read.

    Walks each message completely, not just its text: string content, content blocks of every
    type (``text``, ``reasoning``/``thinking``, tool use and results, provider-native blocks
    without a ``type`` such as Bedrock's ``{"text": ...}``), tool calls and their arguments,
    invalid tool calls, ``additional_kwargs`` (e.g. ``reasoning_content``), names and tool call
    ids, dictionary keys included; numbers as the digits the client sends (a card number in
    tool-call arguments is often a JSON number). Adjacent text blocks, and the texts of consecutive
    messages, are also given joined, as the model reads them. Returns ``(strings,
    unreadable)``; ``unreadable`` names binary, remote or encrypted content (images,
    documents, audio, video, redacted reasoning) that a text guard cannot judge.

    >>> from langchain_core.messages import AIMessage, HumanMessage
    >>> msg = AIMessage(content=[{"text": "hi"}], tool_calls=[
    ...     {"name": "send", "args": {"to": "a@b.io"}, "id": "c1"}])
    >>> strings, unreadable = outgoing_texts([msg])
    >>> "a@b.io" in strings, unreadable
    (True, [])
    >>> split = HumanMessage(content=[{"type": "text", "text": "jane@"}, {"text": "ex.com"}])
    >>> "jane@ex.com" in outgoing_texts([split])[0]
    True
    """
    strings: list[str] = []
    unreadable: list[str] = []
    texts: list[str] = []
    for message in messages:
        if isinstance(message, str):
            strings.append(message)
            texts.append(message)
            continue
        fields = _message_fields(message)
        for name, value in fields.items():
            if name not in _NOT_SENT:
                _walk(value, strings, unreadable)
        texts.append(_content_text(fields.get("content")))
    if len(texts) > 1:
        # Clients merge consecutive messages (Converse joins user turns with a line break):
        # personal data split across two messages is whole in the request.
        strings.append("\n".join(texts))
    return strings, unreadable


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(t for t in map(_block_text, content) if t is not None)
    return ""


def _block_text(block: Any) -> str | None:
    """The text of a text block (a string, ``{"type": "text", "text": ...}`` or Bedrock's
    ``{"text": ...}``), else ``None``."""
    if isinstance(block, str):
        return block
    if isinstance(block, dict) and block.get("type", "text") == "text":
        text = block.get("text")
        if isinstance(text, str):
            return text
    return None


def _message_fields(message: Any) -> dict[str, Any]:
    if isinstance(message, dict):
        return dict(message)
    dump = getattr(message, "model_dump", None)
    if callable(dump):
        return dict(dump())
    return {"content": getattr(message, "content", message)}


def request_check(guard: Any) -> Any:
    """``check(strings, unreadable) -> verdict``: how ``guard`` judges the strings of a request
    besides its messages (request fields, the serialised body on the wire).

    A guard with ``check_request`` (as :class:`PIIGuard`) judges them itself; a plain
    function ``guard(messages)`` is shown them as one more message, and any unreadable
    (binary) part fails closed.

    >>> check = request_check(lambda messages: "secret" if "pw" in messages[0].content else None)
    >>> check(["user pw"], []), check(["hello"], []), check([], ["bytes"])
    ('secret', None, 'unreadable content (bytes)')
    """
    check = getattr(guard, "check_request", None)
    if callable(check):
        return check

    def check_as_message(strings: list[str], unreadable: list[str]) -> str | None:
        from langchain_core.messages import HumanMessage

        if unreadable:
            return f"unreadable content ({unreadable[0]})"
        return guard([HumanMessage("\n".join(strings))]) if strings else None

    return check_as_message


def json_strings(payload: Any) -> tuple[list[str], list[str]]:
    """Every string in a JSON-like payload (keys included, so tool-argument names count) and
    the binary parts it holds: used on request bodies as the cloud client serialised them."""
    strings: list[str] = []
    unreadable: list[str] = []
    _walk(payload, strings, unreadable)
    return strings, unreadable


def _walk(value: Any, strings: list[str], unreadable: list[str]) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        # Sent as the JSON number it is ({"card": 4111111111111111}): judged, and counted by
        # the budget's bound, as the digits on the wire.
        text = _number_text(value)
        if text:
            strings.append(text)
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
            if key in _OPAQUE_KEYS or (key in _BINARY_KEYS and not isinstance(item, str)):
                unreadable.append(f"{key} block")
                continue
            if isinstance(key, str) and key != "type":
                strings.append(key)
                if _PHONE_KEY.search(key) and isinstance(item, (str, int)):
                    # {"mobilePhone": "4155550123"} reads as "phone 4155550123" on the wire.
                    strings.append(f"phone {item}")
            elif isinstance(key, (int, float)) and not isinstance(key, bool):
                strings.append(_number_text(key))  # JSON makes it a string key
            _walk(item, strings, unreadable)
        return
    if isinstance(value, (list, tuple, set, frozenset)):
        run: list[str] = []
        for item in value:
            _walk(item, strings, unreadable)
            # Text blocks only: a list of plain strings (enum values, arguments) is not prose.
            block_text = _block_text(item) if isinstance(item, dict) else None
            if block_text is not None:
                run.append(block_text)
                continue
            if len(run) > 1:
                strings.append("".join(run))
            run = []
        if len(run) > 1:
            # Adjacent text blocks read as one text: "jane.doe@" + "example.com" is an email.
            strings.append("".join(run))
        return
    strings.append(str(value))


def _number_text(value: float) -> str:
    """A number as JSON writes it (``""`` for the non-finite floats JSON cannot carry)."""
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return ""
    return str(int(value)) if value.is_integer() and abs(value) < 1e19 else repr(value)


class PIIGuard:
    """Keep queries that contain personal data local.

    Detects, in every message of the conversation: email addresses, credit-card numbers
    (Luhn-checked), IBANs, US social security numbers and phone numbers. Choose a subset with
    ``kinds``; add your own patterns with ``extra`` (name -> regex).

    Text is judged as a reader sees it: invisible characters (zero-width spaces and joiners,
    soft hyphens, Unicode tag characters), fullwidth forms and HTML character references hide
    nothing, nor do line breaks inside a number or data split across adjacent text blocks or
    consecutive messages. Numbers in tool data are judged as the digits the client sends
    (``{"card": 4111111111111111}``), and a value under a phone-like key
    (``{"mobilePhone": "4155550123"}``) as a phone number. Content it cannot read keeps the
    query local: images, documents, files, audio, video and redacted (encrypted) reasoning. Text is not decoded further: data
    you base64-encode yourself inside a text block is not recognised.

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
        """The first kind of personal data found in ``text``, or ``None``.

        ``text`` is judged as a reader sees it (:func:`normalise`): zero-width characters,
        fullwidth forms and HTML character references do not hide anything.
        """
        text = normalise(text)
        kinds = self.kinds
        # The ideographic full stop separates domain labels too (IDNA): "用户@例子。公司".
        mail = text.replace("\u3002", ".") if "@" in text and "\u3002" in text else text
        if "email address" in kinds and (
            _EMAIL.search(mail)
            # Letters with combining marks (Devanagari, Thai, Arabic vowel signs) are not
            # ``\w``: "मेल@उदाहरण.भारत" is an address too.
            or ("@" in mail and not mail.isascii() and _EMAIL.search(_without_marks(mail)))
        ):
            return "email address"
        if "credit card number" in kinds and any(
            _is_card(m.group()) for m in _CARD.finditer(text)
        ):
            return "credit card number"
        if "IBAN" in kinds and (
            any(_is_iban(m) for m in _IBAN.finditer(text))
            or any(
                _iban_checksum_ok(m.group().replace("-", "").upper())
                for m in _IBAN_DASHED.finditer(text)
            )
        ):
            return "IBAN"
        if "US SSN" in kinds and _US_SSN.search(text):
            return "US SSN"
        if "phone number" in kinds and (
            any(
                8 <= sum(c.isdigit() for c in m.group()) <= 15
                for m in _PHONE_INTERNATIONAL.finditer(text)
            )
            or any(_is_phone(m.group()) for m in _PHONE_GROUPED.finditer(text))
            or _PHONE_AFTER_WORD.search(text)
        ):
            return "phone number"
        for name, pattern in self.extra.items():
            if pattern.search(text):
                return name
        return None
