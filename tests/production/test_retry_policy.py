"""Error classification, retry with backoff (fake sleeps only), refusal detection."""

from __future__ import annotations

import sys

import pytest

from confidence_router.retry import (
    PAPER_BEDROCK_RETRY,
    ErrorKind,
    RetryEvent,
    RetryPolicy,
    classify_error,
    error_code,
    is_refusal,
    refusal_reason,
)


class FakeClientError(Exception):
    """Shaped like botocore's ClientError: only ``.response`` matters."""

    def __init__(self, code: str, status: int | None = None) -> None:
        super().__init__(f"An error occurred ({code})")
        self.response = {"Error": {"Code": code, "Message": "..."}}
        if status is not None:
            self.response["ResponseMetadata"] = {"HTTPStatusCode": status}


class StatusError(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__(f"status {status_code}")
        self.status_code = status_code


# -- classification ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("ThrottlingException", ErrorKind.THROTTLED),
        ("TooManyRequestsException", ErrorKind.THROTTLED),
        ("ServiceUnavailableException", ErrorKind.TRANSIENT),
        ("ModelErrorException", ErrorKind.TRANSIENT),
        ("InternalServerException", ErrorKind.TRANSIENT),
        ("ModelNotReadyException", ErrorKind.TRANSIENT),
        ("ModelTimeoutException", ErrorKind.TIMEOUT),
        ("AccessDeniedException", ErrorKind.PERMANENT),
        ("UnauthorizedException", ErrorKind.PERMANENT),
        ("ValidationException", ErrorKind.PERMANENT),
        ("ResourceNotFoundException", ErrorKind.PERMANENT),
        ("ServiceQuotaExceededException", ErrorKind.PERMANENT),
    ],
)
def test_bedrock_codes(code, kind):
    assert classify_error(FakeClientError(code)) is kind
    assert error_code(FakeClientError(code)) == code


def test_method_md_retry_sets():
    retried = ["ThrottlingException", "TooManyRequestsException", "ServiceUnavailableException",
               "ModelErrorException", "InternalServerException"]  # fmt: skip
    never = ["AccessDeniedException", "UnauthorizedException", "ValidationException"]
    assert all(classify_error(FakeClientError(c)).retryable for c in retried)
    assert not any(classify_error(FakeClientError(c)).retryable for c in never)


@pytest.mark.parametrize(
    ("status", "kind"),
    [(429, "throttled"), (503, "transient"), (500, "transient"), (408, "timeout"),
     (400, "permanent"), (404, "permanent"), (501, "permanent"), (None, "unknown")],
)  # fmt: skip
def test_unlisted_code_falls_back_to_http_status(status, kind):
    assert classify_error(FakeClientError("SomethingNewException", status)) == kind


@pytest.mark.parametrize(
    ("status", "kind"),
    [(429, ErrorKind.THROTTLED), (500, ErrorKind.TRANSIENT), (502, ErrorKind.TRANSIENT),
     (404, ErrorKind.PERMANENT), (400, ErrorKind.PERMANENT), (-1, ErrorKind.UNKNOWN)],
)  # fmt: skip
def test_status_code_attribute(status, kind):
    assert classify_error(StatusError(status)) is kind


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (TimeoutError("read"), ErrorKind.TIMEOUT),
        (ConnectionRefusedError("refused"), ErrorKind.TRANSIENT),
        (ConnectionResetError("reset"), ErrorKind.DISCONNECTED),  # lost after sending
        (BrokenPipeError(), ErrorKind.DISCONNECTED),
        (ValueError("bug"), ErrorKind.UNKNOWN),
        (KeyError("bug"), ErrorKind.UNKNOWN),
    ],
)
def test_builtins(exc, kind):
    assert classify_error(exc) is kind


def _named(name: str, *bases: type) -> type:
    return type(name, bases or (Exception,), {})


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("TimeoutException", ErrorKind.TIMEOUT),
        ("ReadTimeout", ErrorKind.TIMEOUT),
        ("ConnectTimeoutError", ErrorKind.TIMEOUT),
        ("ConnectError", ErrorKind.TRANSIENT),
        ("RemoteProtocolError", ErrorKind.DISCONNECTED),
        ("ConnectionClosedError", ErrorKind.DISCONNECTED),
        ("EndpointConnectionError", ErrorKind.TRANSIENT),
        ("RateLimitError", ErrorKind.THROTTLED),
        ("NoCredentialsError", ErrorKind.PERMANENT),
    ],
)
def test_class_names_anywhere_in_the_mro(name, kind):
    base = _named(name)
    sub = _named("LibrarySpecificError", base)
    assert classify_error(base()) is kind and classify_error(sub()) is kind


def test_walks_cause_and_context():
    try:
        try:
            raise FakeClientError("ThrottlingException")
        except FakeClientError as inner:
            raise RuntimeError("wrapper") from inner
    except RuntimeError as outer:
        assert classify_error(outer) is ErrorKind.THROTTLED
        assert error_code(outer) == "ThrottlingException"
    try:
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError:
            raise ValueError("while handling")  # implicit __context__
    except ValueError as outer:
        assert classify_error(outer) is ErrorKind.DISCONNECTED
    try:
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError:
            raise ValueError("unrelated") from None
    except ValueError as outer:
        assert classify_error(outer) is ErrorKind.UNKNOWN  # suppressed context is skipped


def test_outermost_recognised_error_wins_and_cycles_terminate():
    outer = TimeoutError("deadline")
    outer.__cause__ = FakeClientError("ValidationException")
    assert classify_error(outer) is ErrorKind.TIMEOUT
    a, b = ValueError("a"), KeyError("b")
    a.__cause__, b.__cause__ = b, a
    assert classify_error(a) is ErrorKind.UNKNOWN


def test_real_library_exceptions():
    botocore_exceptions = pytest.importorskip("botocore.exceptions")
    httpx = pytest.importorskip("httpx")
    ollama = pytest.importorskip("ollama")
    throttled = botocore_exceptions.ClientError(
        {"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"},
         "ResponseMetadata": {"HTTPStatusCode": 429}}, "Converse",
    )  # fmt: skip
    assert classify_error(throttled) is ErrorKind.THROTTLED
    assert classify_error(botocore_exceptions.ReadTimeoutError(endpoint_url="u")) == "timeout"
    assert classify_error(botocore_exceptions.EndpointConnectionError(endpoint_url="u")) == (
        "transient"
    )
    assert classify_error(botocore_exceptions.NoCredentialsError()) is ErrorKind.PERMANENT
    closed = botocore_exceptions.ConnectionClosedError(endpoint_url="u")
    assert classify_error(closed) is ErrorKind.DISCONNECTED
    request = httpx.Request("POST", "http://127.0.0.1:11434/api/chat")
    assert classify_error(httpx.ConnectError("refused", request=request)) is ErrorKind.TRANSIENT
    assert classify_error(httpx.ReadTimeout("slow", request=request)) is ErrorKind.TIMEOUT
    dropped = httpx.RemoteProtocolError("Server disconnected", request=request)
    assert classify_error(dropped) is ErrorKind.DISCONNECTED
    status = httpx.HTTPStatusError(
        "503", request=request, response=httpx.Response(503, request=request)
    )
    assert classify_error(status) is ErrorKind.TRANSIENT and error_code(status) == "HTTP 503"
    assert classify_error(ollama.ResponseError("model not found", 404)) is ErrorKind.PERMANENT
    assert classify_error(ollama.ResponseError("runner crashed", 500)) is ErrorKind.TRANSIENT


def test_error_code_fallbacks():
    assert error_code(StatusError(429)) == "HTTP 429"
    assert error_code(ValueError("x")) == "ValueError"
    assert error_code(ConnectionResetError()) == "ConnectionResetError"


def test_error_kind_is_a_str():
    assert ErrorKind.THROTTLED == "throttled" and ErrorKind("timeout") is ErrorKind.TIMEOUT


# -- backoff -------------------------------------------------------------------------------


def test_delays_without_jitter():
    assert RetryPolicy(jitter=False).delays() == [0.5, 1.0]
    assert RetryPolicy(max_attempts=7, base_delay=1, max_delay=8, jitter=False).delays() == [
        1, 2, 4, 8, 8, 8,
    ]  # fmt: skip
    assert RetryPolicy(max_attempts=1).delays() == []
    assert PAPER_BEDROCK_RETRY.delays() == [1, 2, 4, 8, 16]
    assert RetryPolicy(max_attempts=2000, jitter=False).delays()[-1] == 8.0  # no overflow


def test_jitter_bounds_and_seed():
    policy = RetryPolicy(max_attempts=6, base_delay=1, max_delay=10, seed=42)
    delays = policy.delays()
    nominal = [1, 2, 4, 8, 10]
    assert all(n / 2 <= d <= n for d, n in zip(delays, nominal))
    assert policy.delays() == delays  # reproducible with a seed
    assert RetryPolicy(max_attempts=6, base_delay=1, max_delay=10, seed=43).delays() != delays


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"max_attempts": 0}, ValueError), ({"max_attempts": 2.0}, TypeError),
     ({"base_delay": -1}, ValueError), ({"max_delay": float("inf")}, ValueError),
     ({"base_delay": "1"}, TypeError), ({"retry_on": {"sometimes"}}, ValueError)],
)  # fmt: skip
def test_policy_validation(kwargs, error):
    with pytest.raises(error):
        RetryPolicy(**kwargs)


def test_retry_on_accepts_strings():
    assert RetryPolicy(retry_on={"throttled"}).retry_on == frozenset({ErrorKind.THROTTLED})


# -- call / acall --------------------------------------------------------------------------


class Flaky:
    """Fails with the given exceptions in order, then returns ``"ok"``."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_throttled_twice_then_success_with_expected_delays():
    fn = Flaky(FakeClientError("ThrottlingException"), FakeClientError("ThrottlingException"))
    slept: list[float] = []
    events: list[RetryEvent] = []
    policy = RetryPolicy(max_attempts=3, base_delay=0.5, max_delay=8.0, jitter=False)
    assert policy.call(fn, sleep=slept.append, on_retry=events.append) == "ok"
    assert fn.calls == 3 and slept == [0.5, 1.0]
    assert [(e.attempt, e.kind, e.delay) for e in events] == [
        (1, ErrorKind.THROTTLED, 0.5),
        (2, ErrorKind.THROTTLED, 1.0),
    ]


def test_permanent_error_is_not_retried():
    error = FakeClientError("ValidationException")
    fn = Flaky(error)
    slept: list[float] = []
    with pytest.raises(FakeClientError) as info:
        RetryPolicy(jitter=False).call(fn, sleep=slept.append)
    assert info.value is error and fn.calls == 1 and slept == []
    assert error.retry_attempts == 1 and error.retry_kind is ErrorKind.PERMANENT
    if sys.version_info >= (3, 11):
        assert error.__notes__ == ["confidence-router retry: not retried: permanent error"]


def test_unknown_error_is_not_retried():
    fn = Flaky(KeyError("bug"))
    with pytest.raises(KeyError):
        RetryPolicy().call(fn, sleep=lambda d: None)
    assert fn.calls == 1


def test_gives_up_after_max_attempts_and_reraises_the_last_error():
    errors = [
        TimeoutError("t1"),
        ConnectionResetError("c2"),
        FakeClientError("ModelErrorException"),
    ]
    fn = Flaky(*errors, TimeoutError("never reached"))
    slept: list[float] = []
    with pytest.raises(FakeClientError) as info:
        RetryPolicy(max_attempts=3, jitter=False).call(fn, sleep=slept.append)
    assert info.value is errors[-1] and fn.calls == 3 and slept == [0.5, 1.0]
    assert info.value.retry_attempts == 3 and info.value.retry_kind is ErrorKind.TRANSIENT
    if sys.version_info >= (3, 11):
        assert "gave up after 3 attempts (transient)" in info.value.__notes__[0]


def test_keyboard_interrupt_propagates_immediately():
    fn = Flaky(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        RetryPolicy().call(fn, sleep=lambda d: None)
    assert fn.calls == 1


def test_custom_retry_on_and_classifier():
    fn = Flaky(FakeClientError("ThrottlingException"))
    with pytest.raises(FakeClientError):
        RetryPolicy(retry_on={ErrorKind.TIMEOUT}).call(fn, sleep=lambda d: None)
    fn = Flaky(ValueError("flaky parser"))
    policy = RetryPolicy(jitter=False)
    assert policy.call(fn, sleep=lambda d: None, classify=lambda e: ErrorKind.TRANSIENT) == "ok"


def test_exception_without_dict_is_still_reraised():
    class Slotted(Exception):
        __slots__ = ()

    fn = Flaky(Slotted())
    with pytest.raises(Slotted):
        RetryPolicy().call(fn, sleep=lambda d: None)


async def test_acall_retries_with_fake_async_sleep():
    fn = Flaky(FakeClientError("ServiceUnavailableException"), TimeoutError())
    slept: list[float] = []

    async def fake_sleep(delay: float) -> None:
        slept.append(delay)

    async def call() -> str:
        return fn()

    policy = RetryPolicy(max_attempts=4, base_delay=0.25, jitter=False)
    assert await policy.acall(call, sleep=fake_sleep) == "ok"
    assert slept == [0.25, 0.5] and fn.calls == 3


async def test_acall_permanent_not_retried():
    async def call() -> str:
        raise FakeClientError("AccessDeniedException")

    async def fake_sleep(delay: float) -> None:
        raise AssertionError("must not sleep")

    with pytest.raises(FakeClientError) as info:
        await RetryPolicy().acall(call, sleep=fake_sleep)
    assert info.value.retry_attempts == 1


# -- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ({"stopReason": "content_filtered"}, "content_filtered"),
        ({"stopReason": "guardrail_intervened", "metrics": {}}, "guardrail_intervened"),
        ({"stop_reason": "refusal"}, "refusal"),
        ({"finish_reason": "content_filter"}, "content_filter"),
        ({"stopReason": "end_turn"}, None),
        ({"stopReason": "max_tokens"}, None),
        ({"done_reason": "stop"}, None),  # Ollama: never a refusal
        ({}, None),
        (None, None),
        ({"stopReason": None}, None),
    ],
)
def test_refusals(metadata, reason):
    assert refusal_reason(metadata) == reason
    assert is_refusal(metadata) is (reason is not None)
