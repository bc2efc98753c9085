import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from confidence_router.guards import PIIGuard, json_strings, normalise


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("mail jane.doe@example.com please", "email address"),
        ("card 4111 1111 1111 1111 expires soon", "credit card number"),
        ("IBAN DE89 3704 0044 0532 0130 00", "IBAN"),
        ("my ssn is 123-45-6789", "US SSN"),
        ("call +44 20 7946 0958 now", "phone number"),
    ],
)
def test_detects(text, kind):
    assert PIIGuard().find(text) == kind


@pytest.mark.parametrize(
    "text",
    [
        "What is the capital of France?",
        "WWII lasted 1939-1945",
        "card 4111 1111 1111 1112",  # fails the Luhn check
        "population 67,000,000",
        "In which year did the Treaty of Westphalia end the Thirty Years' War?",
    ],
)
def test_ignores(text):
    assert PIIGuard().find(text) is None


def test_looks_at_every_message():
    guard = PIIGuard()
    history = [SystemMessage("be brief"), HumanMessage("my email is a@b.io"),
               AIMessage("noted"), HumanMessage("what's the weather?")]
    assert guard(history) == "email address"
    assert guard([HumanMessage("hi")]) is None


def test_kinds_and_extra_patterns():
    guard = PIIGuard(kinds=["US SSN"], extra={"employee id": r"\bEMP-\d{6}\b"})
    assert guard.find("jane.doe@example.com") is None
    assert guard.find("ticket for EMP-123456") == "employee id"
    with pytest.raises(ValueError, match="unknown PII kinds"):
        PIIGuard(kinds=["passport"])


# -- obfuscation: judged as a reader (or a model) sees the text --------------------------------


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("write to jane.doe\u200b@example.com", "email address"),  # zero-width space
        ("write to jane\u2060.doe@exam\u00adple.com", "email address"),  # word joiner, soft hyphen
        ("write to jane.doe\uff20example.com", "email address"),  # fullwidth at sign
        ("write to jane.doe\ufe6bexample.com", "email address"),  # small at sign
        ("write to jane.doe&#64;example.com", "email address"),  # HTML character reference
        ("write to jane.doe@\nexample.com", "email address"),  # two user turns merged
        ("".join(chr(0xE0000 + ord(c)) for c in "jane.doe@example.com"), "email address"),
        ("card 4111\u200d1111\u200d1111\u200d1111", "credit card number"),
        ("card \uff14\uff11\uff11\uff11 \uff11\uff11\uff11\uff11 1111 1111", "credit card number"),
        ("card 4111\n1111\n1111\n1111 thanks", "credit card number"),
        ("card 4111-1111-1111-1111", "credit card number"),
        ("card 4111 1111 1111 1111 5 items", "credit card number"),
        ("amex 3782 822463 10005", "credit card number"),
        ("pay DE89\u00ad3704\u00ad0044\u00ad0532\u00ad0130\u00ad00", "IBAN"),
        ("DE89\n3704\t0044\n0532\n0130\n00", "IBAN"),
        ("pay de89 3704 0044 0532 0130 00", "IBAN"),
        ("pay FR14 2004 1010 0505 0001 3M02 606", "IBAN"),
        ("call me on +44.20.7946.0958", "phone number"),
        ("+447946095800", "phone number"),
        ("reach me at (202) 555-0123", "phone number"),
        ("reach me at 202.555.0123", "phone number"),
        ("mon numéro: 06 12 34 56 78", "phone number"),
        ("my phone: 2025550123", "phone number"),
        ("llámame al 612 345 678", "phone number"),
        # Scripts whose letters carry combining vowel signs (not ``\w``).
        ("लिखें मेल@उदाहरण.भारत पर", "email address"),
        ("ส่งไปที่ สมชาย@ตัวอย่าง.ไทย", "email address"),
        ("راسلني على مُحمَّد@مثال.شبكة", "email address"),
        ("card 4111 - 1111 - 1111 - 1111", "credit card number"),
        ("card 5555 . 5555 . 5555 . 4444", "credit card number"),
        ("pay DE89-3704-0044-0532-0130-00 today", "IBAN"),
        ("iban gb82-west-1234-5698-7654-32.", "IBAN"),
    ],
)
def test_obfuscated_and_reformatted(text, kind):
    assert PIIGuard().find(text) == kind


# -- no false positives on ordinary text -------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Upgrade from version 2.3.14 to 3.0.1 on 2024-05-17 at 14:30.",
        "Order #12345 shipped on 12/05/2024 and arrives 2024-05-20.",
        "Run `pip install numpy==1.26.4 pandas==2.2.2` then `git checkout 4f3a2b1c`.",
        "The p-value was 0.0312 (n = 1024, CI 0.12-0.34).",
        "Python 3.11.9, CUDA 12.1, driver 535.104.05",
        "The population grew from 1,234,567 to 2,345,678 between 1990 and 2020.",
        "It costs 1 234 567 890 euros in total.",
        "ISBN 978-3-16-148410-0",
        "Use the decorator\n@app.route('/users')\ndef users(): ...",
        "for i in range(10):\n    total += values[i] * 1000\n",
        "IPv4 192.168.100.254 and port 8080; also 10.0.0.1 192.168.1.20",
        "Timestamps 1700000000 1700000060 1700000120",
        "Meeting on 2024-05-17 10:00-11:30, room 4.21",
        "Released 10.05.2024 12:00 UTC",
        "shop v3.11.2, build 2024.05.17-1432, paid on 17/05/2024 12:30",
        "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "UUID 123e4567-e89b-12d3-a456-426614174000",
        "Matrix:\n1 0 0\n0 1 0\n0 0 1",
        "Windows version 10.0.19045.3693",
        "Coordinates 48.8566, 2.3522",
        "The wars: 1914 1918 1939 1945",
        "Pi is 3.14159265358979",
        "DE is Germany, FR is France, and GB82 is not a full IBAN",
        "Café — naïve façade, 東京 2024年5月17日",
        "Tom &amp; Jerry &lt;3",
        "Part AB12-CDEF-3456-GHIJ ships with SKU XY98-7654-3210-ABCD.",  # dashed, bad check digits
        "नमस्ते, मेरा नाम राम है। @राम ने कहा",  # a mention, not an address
        "4111 - 1111 - 1111 - 1112 is not a valid card",  # Luhn fails
    ],
)
def test_ordinary_text_is_not_personal_data(text):
    assert PIIGuard().find(text) is None


def test_request_walk_joins_adjacent_text_blocks_not_lists_of_values():
    guard = PIIGuard()
    split = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "card 4111 1111"}, {"type": "text", "text": " 1111 1111"}]}]}
    assert guard.check_request(*json_strings(split)) == "credit card number"
    # A list of plain values (an enum, tool arguments) is not one text.
    values = {"enum": ["4111", "1111", "1111", "1111"], "ids": ["2025", "5501", "23"]}
    assert guard.check_request(*json_strings(values)) is None


def test_messages_split_across_turns_are_judged_joined():
    guard = PIIGuard()
    assert guard([HumanMessage("write to jane.doe@"), HumanMessage("example.com")]) \
        == "email address"
    assert guard([HumanMessage("card 4111 1111"), HumanMessage("1111 1111 please")]) \
        == "credit card number"
    assert guard([HumanMessage("I was born in 1984"), AIMessage("1984 is a novel too")]) is None


@pytest.mark.parametrize(
    "block",
    [
        {"type": "redacted_thinking", "data": "ZW5jcnlwdGVk"},
        {"reasoningContent": {"redactedContent": "ZW5jcnlwdGVk"}},  # Converse, as serialised
        {"type": "text-plain", "mime_type": "text/plain", "base64": "amFuZUBleC5jb20="},
        {"image": {"format": "png", "source": {"bytes": "aGVsbG8="}}},
    ],
)
def test_opaque_content_fails_closed(block):
    reason = PIIGuard().check_request(*json_strings({"content": [block]}))
    assert reason is not None and reason.startswith("unreadable content")


def test_normalise_leaves_plain_text_alone():
    text = "What is the capital of France? 2 + 2 = 4"
    assert normalise(text) is text
    assert normalise("\uff21\uff22\u200b\uff23") == "ABC"


@pytest.mark.parametrize("run", ["a" * 200_000, "1" * 200_000, "ab1-" * 50_000, "a." * 100_000])
def test_long_runs_without_personal_data_are_answered(run):
    """A long token without an "@" (base64, minified JSON) used to cost the email pattern
    quadratic time (minutes for 200 kB, holding the request); see
    benchmarks/guard_scaling.py for the measured ratio."""
    assert PIIGuard().find(run) is None


@pytest.mark.parametrize(
    "text",
    [
        "Pay to DE88 3704 0044 0532 0130 00 please",  # wrong check digits (a typo)
        "iban: de88370400440532013000.",
        "GB00 WEST 1234 5698 7654 32",  # invented
        "DE89370400440532013000",  # valid
        "sig/DE89370400440532013000=",  # valid, even inside base64
    ],
)
def test_ibans_as_people_write_them_are_caught_with_or_without_valid_check_digits(text):
    assert PIIGuard().find(text) == "IBAN"


@pytest.mark.parametrize(
    "token",
    [
        "EqQBCkgIARABGAIiQNr/AB12CDEF3456GHIJ/xyz+Zq",  # IBAN-shaped base64 segments
        "sig+Kx42Lm9Qp0rStUvWx/end",
        "sig/DE88370400440532013000=",  # wrong check digits, between base64 characters
    ],
)
def test_iban_shaped_tokens_are_not_ibans(token):
    """About one extended-thinking signature in nine used to be read as an IBAN (a base64
    segment such as "AB12CDEF3456GHIJ"), keeping whole conversations local; between base64
    characters an IBAN-shaped token now needs valid check digits."""
    assert PIIGuard().find(token) is None
    thinking = AIMessage(content=[{"type": "thinking", "thinking": "fine", "signature": token},
                                  {"type": "text", "text": "hi"}])
    assert PIIGuard()([HumanMessage("hello"), thinking, HumanMessage("and?")]) is None
