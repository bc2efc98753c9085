import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from confidence_router.guards import PIIGuard


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
