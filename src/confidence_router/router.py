"""``ConfidenceRoutedLLM``: a LangChain chat model that answers locally and escalates to the cloud
when the local answer's zero-shot confidence is below a threshold.

This is the LangChain layer. The decision logic is pure and lives in
:mod:`confidence_router.policy` (rules) and :mod:`confidence_router.signals` (scores); the
flow of one call is written once in ``_flow`` as a generator of effects; ``_record`` keeps the
routing record; :mod:`confidence_router.tier_clients` configures the tiers' clients. Here, two
small drivers (sync and async) run the flow's effects against the tiers, for invoke and
stream alike.
"""

from __future__ import annotations

import asyncio
import functools
import math
import operator
import os
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from typing import TYPE_CHECKING, Any, Literal, cast

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    RemoveMessage,
    SystemMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, ensure_config
from langchain_core.runnables.base import RunnableBindingBase
from langchain_core.runnables.fallbacks import RunnableWithFallbacks
from langchain_core.tools import BaseTool
from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from confidence_router import _aio, _sync_tiers, _tiers, tier_clients
from confidence_router._flow import (
    Announce,
    Answer,
    Generate,
    Learn,
    PartialStreamError,
    Probe,
    Sleep,
    messages_of,
    route,
)
from confidence_router._record import Collaborators, RoutingTrace
from confidence_router._tiers import STREAM_CHILDREN, ChildManager
from confidence_router.early_exit import ExitTracker
from confidence_router.errors import (
    InvalidArgumentError,
    InvalidInputError,
    InvalidTypeError,
    RoutingConfigError,
    TierTimeoutError,
)
from confidence_router.extraction import token_logprobs
from confidence_router.policy import DEFAULT_POLICY, RoutingPolicy, unknown_names_message
from confidence_router.retry import ErrorKind, RetryPolicy
from confidence_router.signals import is_blank
from confidence_router.tier_clients import model_name

if TYPE_CHECKING:
    from confidence_router.costs import PriceTable
    from confidence_router.settings import RouterSettings

ChatRunnable = Runnable[LanguageModelInput, BaseMessage]

#: Guard signature: return a reason (str) to keep the query local, or None to allow escalation.
EscalationGuard = Callable[[Sequence[BaseMessage]], "str | None"]

_POLICY_CACHE = "_cached_policy"
_COLLAB_CACHE = "_cached_collaborators"
_PARAMS_CACHE = "_cached_identifying_params"
#: The answer check a binding adds (forced tool call, structured output), in ``__dict__``.
_BINDING_CHECK = "_binding_answer_check"
#: Knobs set with ``router.bind(...)``, applied to every call like per-call kwargs.
_BOUND_KNOBS = "_bound_knobs"
#: The fields the call's collaborators are built from (rebuilt when any is replaced).
_COLLAB_FIELDS = operator.itemgetter(
    "local", "cloud", "stats", "calibrator", "budget", "escalation_guard", "cloud_retry",
    "prices", "confidence_calibration", "answer_check",
)

#: Fields whose assignment re-runs the tiers' set-up (:meth:`ConfidenceRoutedLLM._configure_tiers`).
_TIER_SETTINGS = frozenset(
    {"local", "cloud", "precheck", "local_timeout", "cloud_timeout", "escalation_guard", "budget"}
)

#: The knob values of a router's ``__dict__``, as a tuple in RoutingPolicy's order.
_KNOB_VALUES = operator.itemgetter(*RoutingPolicy.knob_names())

#: Default seconds a local call may go without progress (connect, or the next token).
DEFAULT_LOCAL_TIMEOUT = 60.0

#: Call kwargs that are not knobs but legitimately go to the tiers (set by ``bind_tools``,
#: ``with_structured_output`` and LangChain itself). Anything else is an error.
TIER_KWARGS = frozenset(
    {
        "tools",
        "format",
        "response_format",
        "ls_structured_output_format",
        "stream_usage",
    }
)


@functools.cache
def _default_prices() -> PriceTable:
    from confidence_router.costs import PriceTable

    return PriceTable()


def _default_cloud_retry() -> RetryPolicy:
    # Throttling and transient service errors only: each is a request the service refused
    # (not billed). A timed-out request may have run and been billed, so it is not retried by
    # default; add ErrorKind.TIMEOUT to retry_on to retry it (each retry reserves budget).
    return RetryPolicy(
        max_attempts=3,
        base_delay=0.5,
        max_delay=4.0,
        retry_on=frozenset({ErrorKind.THROTTLED, ErrorKind.TRANSIENT}),
    )


class ConfidenceRoutedLLM(BaseChatModel):
    """A chat model that answers with a local model and escalates to a cloud model only when
    the local answer is probably wrong.

    After the local model answers, the mean of its per-token log-probabilities is mapped to a
    confidence ``sigmoid(2*mean + 3)`` (no training data needed); below ``threshold`` the query
    is sent to ``cloud``. The decision and its evidence are in
    ``message.response_metadata["routing"]`` (see :class:`~confidence_router.record.RoutingRecord`).

    Example:
        .. code-block:: python

            from langchain_aws import ChatBedrockConverse
            from langchain_ollama import ChatOllama
            from confidence_router import ConfidenceRoutedLLM

            router = ConfidenceRoutedLLM(
                local=ChatOllama(model="qwen2.5:7b"),
                cloud=ChatBedrockConverse(model="us.anthropic.claude-sonnet-4-5-20250929-v1:0"),
                threshold=0.7,
            )
            msg = router.invoke("What is the capital of Australia?")
            msg.response_metadata["routing"]["decision"]  # "local" or "cloud"
            router.invoke("...", threshold=0.9)  # per-call override

    Per call, any policy knob (``threshold``, ``signal``, ``on_unknown``, ``on_cloud_error``,
    ``precheck_threshold``, ``allow_escalation``, ``on_budget_exceeded``, ``early_exit``) can be
    passed as an invoke/bind kwarg, or made configurable with ``configurable_fields``. An
    unknown kwarg or constructor field raises
    :class:`~confidence_router.errors.RoutingConfigError` before any request.
    """

    local: ChatRunnable
    """The local chat model (default choice: ``ChatOllama``). It is asked for logprobs."""

    cloud: ChatRunnable | None = None
    """The cloud chat model (``ChatBedrockConverse`` or ``ChatBedrock``). ``None``: escalations
    are only reported (``would_escalate``) and the local answer is returned, flagged."""

    # -- the policy knobs (defaults: RoutingPolicy, declared once) -------------------------

    threshold: float = DEFAULT_POLICY.threshold
    """Keep the local answer iff its confidence >= threshold."""

    signal: str = DEFAULT_POLICY.signal
    """The zero-shot score to route on (a name in ``confidence_router.signals.SIGNAL_SCORERS``)."""

    on_unknown: str = DEFAULT_POLICY.on_unknown
    """When the confidence is unknown (no logprobs, empty answer): ``escalate`` or keep
    ``local`` (flagged)."""

    on_cloud_error: str = DEFAULT_POLICY.on_cloud_error
    """When the cloud fails: ``raise`` CloudEscalationError, or return the ``local`` answer."""

    precheck_threshold: float = DEFAULT_POLICY.precheck_threshold
    """With a pre-generation probe: escalate at once iff P(YES) < precheck_threshold."""

    allow_escalation: bool = DEFAULT_POLICY.allow_escalation
    """``False`` keeps every query local (e.g. for private data)."""

    on_budget_exceeded: str = DEFAULT_POLICY.on_budget_exceeded
    """When ``budget`` cannot cover an escalation: serve the ``local`` answer flagged, or
    ``raise`` BudgetExceededError."""

    early_exit: bool = DEFAULT_POLICY.early_exit
    """Stop the local generation as soon as it can no longer be kept, and escalate."""

    # -- construction-only collaborators ---------------------------------------------------

    precheck: Runnable[Any, Any] | None = None
    """Optional pre-generation stage, normally a
    :class:`~confidence_router.probe.SelfAssessmentProbe` (GSA v3): when its P(YES) is below
    ``precheck_threshold`` the query goes to the cloud without local generation."""

    knowledge_store: Any = None
    """A :class:`~confidence_router.knowledge.KnowledgeStore` for learning from escalations."""

    learn_from_escalations: bool = False
    """Opt-in: store each escalated question with the cloud's answer in ``knowledge_store``,
    so later self-assessments can retrieve it."""

    escalation_guard: EscalationGuard | None = None
    """Called with the messages before any escalation; a returned reason keeps the query
    local (e.g. :class:`~confidence_router.guards.PIIGuard`). A guard that raises keeps it
    local too (fails closed). For Bedrock tiers, a guard with a ``check_request(strings,
    unreadable)`` method (``PIIGuard`` has one) also judges the request body exactly as
    botocore serialised it, just before it is sent."""

    answer_check: Callable[[BaseMessage], str | None] | None = None
    """Called with a local answer the confidence would keep; a returned reason means the answer
    cannot be used (e.g. it must be valid JSON), so the query escalates like a low-confidence
    one (reason ``unusable_answer``, the text in ``routing["unusable_answer"]``). A check that
    raises rejects the answer. ``bind_tools(..., tool_choice=<forced>)`` and
    ``with_structured_output`` add checks of their own (the forced call was made, the answer
    parses), on top of this one.

    Example: ``ConfidenceRoutedLLM(..., answer_check=lambda m: None if m.text.strip().startswith("{") else "not JSON")``"""

    calibrator: Any = None
    """A :class:`~confidence_router.calibration.RollingQuantileThreshold`: the threshold then
    follows a rolling quantile of recent confidences so the cloud-call rate tracks a target
    (a per-call ``threshold`` still wins)."""

    confidence_calibration: Any = None
    """A fitted :class:`~confidence_router.correctness.ConfidenceCalibration` (from
    ``confidence-router calibrate --fit RUN``; ``ConfidenceCalibration.load(path)``): adds
    ``p_correct``, the estimated probability that the local answer is right, to the routing
    record. With ``target_accuracy`` it also sets the threshold."""

    target_accuracy: float | None = Field(default=None, gt=0.0, le=1.0)
    """With ``confidence_calibration``: keep local answers whose estimated P(correct) reaches
    this, i.e. route on the calibration's signal at the threshold where P(correct) >= target
    (replaces ``threshold`` and ``signal``)."""

    prices: Any = None
    """A :class:`~confidence_router.costs.PriceTable` (default: the built-in Bedrock prices)."""

    stats: Any = None
    """A :class:`~confidence_router.stats.RoutingStats` (or any ``StatsSink``) fed every record."""

    budget: Any = None
    """A :class:`~confidence_router.budget.CloudBudget`: maximum cloud spend per time window.
    Needs the cloud model's ``max_tokens`` (the reservation must be an upper bound)."""

    cloud_retry: RetryPolicy | None = Field(default_factory=_default_cloud_retry)
    """Retries of the cloud call on throttling and transient service errors, with backoff
    (``None``: no retries). The router is the only layer that retries: botocore's own retries
    are switched off on the cloud tier, and ``routing["cloud_attempts"]`` counts every request."""

    local_timeout: float | None = Field(default=DEFAULT_LOCAL_TIMEOUT, gt=0, allow_inf_nan=False)
    """Seconds the local model may take to connect or to produce its next token (``ChatOllama``:
    the httpx timeout; async calls and streams: also the whole answer's deadline). On timeout
    the request is cancelled and the query escalates. ``None`` waits forever."""

    cloud_timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Seconds per cloud attempt (Bedrock: botocore ``read_timeout``; async calls and streams:
    also the attempt's deadline). ``None``: the client's default (botocore: 60 s per read)."""

    stop: list[str] | None = None
    """Default stop sequences for both tiers (a call's ``stop`` wins)."""

    streaming: bool = False
    """LangChain convention: ``True`` makes ``invoke`` go through the stream path."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")


    @field_validator("local_timeout", "cloud_timeout", mode="before")
    @classmethod
    def _finite_timeout(cls, value: Any) -> Any:
        return _checked_timeout(value)

    @model_validator(mode="before")
    @classmethod
    def _strict_knobs(cls, data: Any) -> Any:
        """The knobs as given (before pydantic would coerce ``"0.5"`` or ``1``) pass the same
        checks as per-call knobs: a wrong type is an error, never converted."""
        if isinstance(data, dict):
            given = {k: data[k] for k in RoutingPolicy.knob_names() if k in data}
            if given:
                RoutingPolicy(**given)
        return data

    def __init__(self, **kwargs: Any) -> None:
        # Unknown fields and invalid values are RoutingConfigError (a ValueError) naming the
        # problem, raised here, before any request — never silently ignored.
        known = set(type(self).model_fields)
        unknown = set(kwargs) - known
        if unknown:
            raise RoutingConfigError(
                unknown_names_message(unknown, sorted(known), what="ConfidenceRoutedLLM field")
            )
        try:
            super().__init__(**kwargs)
        except ValidationError as error:
            raise RoutingConfigError(f"invalid ConfidenceRoutedLLM: {error}") from error

    @model_validator(mode="before")
    @classmethod
    def _threshold_from_target_accuracy(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("target_accuracy") is None:
            return data
        calibration = data.get("confidence_calibration")
        if calibration is None:
            raise RoutingConfigError("target_accuracy needs a confidence_calibration")
        threshold = calibration.threshold_for_accuracy(data["target_accuracy"])
        if threshold is None:
            raise RoutingConfigError(
                f"target_accuracy={data['target_accuracy']} is not reachable with this "
                "calibration (no score reaches it)"
            )
        return {**data, "threshold": threshold, "signal": calibration.signal}

    @model_validator(mode="after")
    def _setup(self) -> ConfidenceRoutedLLM:
        self._base_policy()  # validate the knobs once, at construction
        from confidence_router.stats import as_sink

        object.__setattr__(self, "stats", as_sink(self.stats))  # a list: every sink is fed
        if self.learn_from_escalations and self.knowledge_store is None:
            raise RoutingConfigError("learn_from_escalations=True needs a knowledge_store")
        self._configure_tiers()
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in _TIER_SETTINGS:
            super().__setattr__(name, value)
            return
        # A tier (or its timeout, guard, budget) assigned after construction is set up like
        # one given to the constructor: timeouts, retries off, the wire check. A combination
        # that cannot work raises and leaves the router as it was.
        if name in ("local_timeout", "cloud_timeout"):
            # Assignment skips the field validators: the same check as at construction.
            try:
                value = _checked_timeout(value)
            except InvalidArgumentError as error:
                raise RoutingConfigError(f"{name} {error}") from None
        before = {key: self.__dict__[key] for key in _TIER_SETTINGS}
        super().__setattr__(name, value)
        try:
            self._configure_tiers()
        except Exception as error:
            self.__dict__.update(before)
            if isinstance(error, ValidationError):  # a tier client refused the new value
                raise RoutingConfigError(f"cannot set {name}={value!r}: {error}") from error
            raise

    def __repr__(self) -> str:
        # The repr is also the "serialized" form of the router's own LangChain/LangSmith run:
        # never a password from a tier's URL.
        from confidence_router.settings import redact_urls

        return redact_urls(super().__repr__())

    def __str__(self) -> str:
        from confidence_router.settings import redact_urls

        return redact_urls(super().__str__())

    def _configure_tiers(self) -> None:
        """Set the tiers (and the pre-check probe's model) up as the router uses them."""
        object.__setattr__(
            self, "local", tier_clients.configure_local(self.local, self.local_timeout)
        )
        if self.precheck is not None:
            object.__setattr__(
                self, "precheck", tier_clients.configure_probe(self.precheck, self.local_timeout)
            )
        if self.knowledge_store is not None:
            # Learning embeds each escalated question: a hung embedding server must not hold
            # an answer the cloud already gave.
            object.__setattr__(
                self, "knowledge_store",
                tier_clients.configure_store(self.knowledge_store, self.local_timeout),
            )
        if self.cloud is not None:
            configured = tier_clients.configure_cloud(
                tier_clients.without_retries(self.cloud), self.cloud_timeout, self._wire_guard()
            )
            object.__setattr__(self, "cloud", configured)
            self._check_cloud_timeout(configured)
            if self.budget is not None:
                attempts = tier_clients.client_attempts(configured)
                if attempts != 1:
                    raise RoutingConfigError(
                        "a budget needs one HTTP request per reservation, but the cloud model "
                        "is built on your own boto3 client, whose retries resend requests "
                        "(each may be billed): give it "
                        "Config(retries={'total_max_attempts': 1}) (the router retries "
                        "itself, within the budget), or build the model from settings"
                    )
        if self.budget is not None and self.cloud is not None:
            self._reservation_bound()  # fails here when no upper bound exists

    def _check_cloud_timeout(self, cloud: Any) -> None:
        """A ``cloud_timeout`` the cloud's own boto3 client would outlast is an error: the
        router bounds each request through the client (a thread it abandoned would keep the
        request running, and a blocked read cannot be interrupted from outside)."""
        if self.cloud_timeout is None:
            return
        connect, read = tier_clients.client_timeouts(cloud)
        longer = {name: value for name, value in (("connect_timeout", connect),
                                                   ("read_timeout", read))
                  if isinstance(value, (int, float)) and value > self.cloud_timeout}
        if longer:
            settings = ", ".join(f"{name}={value:g}" for name, value in longer.items())
            raise RoutingConfigError(
                f"cloud_timeout={self.cloud_timeout:g} cannot bound the requests of your own "
                f"boto3 client ({settings} s): give it Config(read_timeout=..., "
                "connect_timeout=...) no longer than cloud_timeout, or build the model from "
                "settings (the router then sets them)"
            )

    def _wire_guard(self) -> Callable[[list[str], list[str]], str | None] | None:
        if self.escalation_guard is None:
            return None
        from confidence_router.guards import request_check

        return request_check(self.escalation_guard)  # type: ignore[no-any-return]

    def price_table(self) -> PriceTable:
        """The price table in use (``prices`` or the built-in one)."""
        if self.prices is not None:
            return self.prices
        return _default_prices()

    def _reservation_bound(self) -> Callable[..., float]:
        """The function giving an upper bound on one cloud request's cost."""
        from confidence_router.budget import upper_bound_request_cost

        cloud_name = model_name(self.cloud)
        price = self.price_table().price_for(cloud_name)
        if price is None:
            raise RoutingConfigError(
                f"a budget needs a price for the cloud model {cloud_name!r}: "
                "add it with prices=PriceTable({...})"
            )
        if _drops_max_tokens(self.cloud):
            raise RoutingConfigError(
                "a budget needs the cloud model's max_tokens in every request, but with "
                "reasoningConfig maxReasoningEffort='high' ChatBedrockConverse leaves "
                "max_tokens out: one answer's cost has no upper bound, so the cap could not be "
                "guaranteed (use a lower effort, or no budget)"
            )
        max_tokens = _max_output_tokens(self.cloud)
        if max_tokens is None:
            raise RoutingConfigError(
                "a budget needs the cloud model's max_tokens (e.g. ChatBedrockConverse(..., "
                "max_tokens=1024)): without it one answer's cost has no upper bound, so the "
                "cap could not be guaranteed"
            )
        return functools.partial(
            upper_bound_request_cost, max_output_tokens=max_tokens, price=price
        )

    def _collaborators(self) -> Collaborators:
        values = self.__dict__
        sources = (*_COLLAB_FIELDS(values), values.get(_BINDING_CHECK))
        cached = values.get(_COLLAB_CACHE)
        if cached is not None and all(map(operator.is_, cached[0], sources)):
            return cached[1]
        collab = Collaborators(
            local_model=model_name(self.local),
            cloud_model=model_name(self.cloud) if self.cloud is not None else None,
            prices=self.price_table(),
            stats=self.stats,
            calibrator=self.calibrator,
            budget=self.budget if self.cloud is not None else None,
            guard=self.escalation_guard,
            cloud_refusal=(
                tier_clients.conversation_check(self.cloud) if self.cloud is not None else None
            ),
            cloud_retry=self.cloud_retry,
            reserve_usd=(
                self._reservation_bound()
                if self.budget is not None and self.cloud is not None
                else None
            ),
            confidence_calibration=self.confidence_calibration,
            cloud_extras=(
                tier_clients.request_extras(self.cloud) if self.cloud is not None else ()
            ),
            answer_checks=tuple(
                check for check in (self.answer_check, values.get(_BINDING_CHECK)) if check
            ),
        )
        # Plain attributes in __dict__ (not pydantic private ones, whose lookup is slow on
        # the hot path); model_copy() carries them along, which is what we want.
        object.__setattr__(self, _COLLAB_CACHE, (sources, collab))
        return collab

    # -- construction from plain settings -----------------------------------------------------

    @classmethod
    def from_settings(
        cls,
        settings: RouterSettings | str | os.PathLike[str] | None = None,
        *,
        environ: dict[str, str] | None = None,
        **overrides: Any,
    ) -> ConfidenceRoutedLLM:
        """Build a router from :class:`~confidence_router.settings.RouterSettings`, a settings
        file and/or environment variables.

        ``ChatOllama`` is the local tier and ``ChatBedrockConverse`` the cloud tier; see
        :class:`confidence_router.settings.RouterSettings` for every setting. Invalid settings
        raise :class:`~confidence_router.errors.RoutingConfigError` here, not at first call.

        ``overrides`` win over the settings: a setting's name (``local_model``,
        ``ollama_host``, ``cloud_model``, ``threshold``, ...) replaces that setting and is
        validated like one; any other router field (``precheck``, ``budget``, ``local`` or
        ``cloud`` for your own tier models, ...) is passed to the router.

        Example: ``ConfidenceRoutedLLM.from_settings("router.toml", threshold=0.8)``
        """
        import dataclasses

        from confidence_router.settings import RouterSettings

        if not isinstance(settings, RouterSettings):
            settings = RouterSettings.load(settings, environ)
        router_fields = settings.router_fields()
        # Settings that describe the tiers (not router fields) are replaced in the settings,
        # which validate them; everything else goes to the router, which validates it.
        tier_settings = {f.name for f in dataclasses.fields(RouterSettings)} - set(router_fields)
        changed = {k: v for k, v in overrides.items() if k in tier_settings}
        if changed:
            settings = dataclasses.replace(settings, **changed)
        local, cloud = settings.tier_models()
        router_kwargs = {k: v for k, v in overrides.items() if k not in tier_settings}
        return cls(**{"local": local, "cloud": cloud, **router_fields, **router_kwargs})

    def to_settings(self) -> RouterSettings:
        """This router's configuration as plain :class:`RouterSettings` (no credentials).

        Round trip: ``ConfidenceRoutedLLM.from_settings(path)`` after
        ``router.to_settings().save(path)``. Only ``ChatOllama`` local and
        ``ChatBedrockConverse`` cloud tiers (the settings' own) can be expressed.
        """
        from confidence_router.settings import RouterSettings

        local, cloud = tier_clients.unwrap(self.local), tier_clients.unwrap(self.cloud)
        if type(local).__name__ != "ChatOllama":
            raise RoutingConfigError(
                f"to_settings needs a ChatOllama local tier, not {type(local).__name__}"
            )
        values: dict[str, Any] = {
            "local_model": local.model,
            "ollama_host": local.base_url or "http://127.0.0.1:11434",
            "cloud_model": None,
            "local_timeout": self.local_timeout,
            "cloud_timeout": self.cloud_timeout,
            **self._base_policy().as_dict(),
        }
        if cloud is not None:
            if type(cloud).__name__ != "ChatBedrockConverse":
                raise RoutingConfigError(
                    f"to_settings needs a ChatBedrockConverse cloud tier, not {type(cloud).__name__}"
                )
            values.update(
                cloud_model=cloud.model_id,
                aws_region=cloud.region_name or "us-west-2",
                bedrock_endpoint=cloud.endpoint_url,
                cloud_max_tokens=cloud.max_tokens,
            )
        return RouterSettings.from_mapping(values)

    # -- LangChain plumbing -------------------------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return "confidence-routed"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        # Read on every call (LangChain's invocation params): rebuilt only when the policy or
        # the collaborators (both cached objects) changed.
        collab, policy = self._collaborators(), self._base_policy()
        cached = self.__dict__.get(_PARAMS_CACHE)
        if cached is None or cached[0] is not collab or cached[1] is not policy:
            params = {"local": collab.local_model, "cloud": collab.cloud_model,
                      **policy.as_dict()}
            cached = (collab, policy, params)
            object.__setattr__(self, _PARAMS_CACHE, cached)
        return dict(cached[2])

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        # Which model answers is decided during the call; the tiers' child runs carry the
        # real model names, sampling settings and token usage. Built here rather than by the
        # base class, whose probing of attributes the router lacks (temperature, max_tokens)
        # costs more than the rest of the routing record on every call.
        params = LangSmithParams(
            ls_provider="confidence-router",
            ls_model_type="chat",
            ls_model_name=kwargs.get("model") or "confidence-router",
        )
        if stop:
            params["ls_stop"] = stop
        return params

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools to both tiers (each formats them for its own provider).

        ``tool_choice`` forcing a call (a tool's name, ``"any"``, ``"required"``, ``True`` with
        one tool) is honoured by the cloud; a tool or choice a tier cannot send is a
        ``RoutingConfigError`` here, before any request (see
        :func:`confidence_router.tier_clients.checked_tool_choice`). Ollama cannot force a
        call, so a local answer without the call escalates (reason ``unusable_answer``).
        ``strict`` goes to the cloud's ``bind_tools`` (Ollama has no strict tool mode). Other
        kwargs are bound to the router's calls.

        Example: ``router.bind_tools([get_weather]).invoke("Weather in Paris?").tool_calls``
        """
        tool_choice = tier_clients.checked_tool_choice(self.cloud, tools, tool_choice)
        tier_kwargs: dict[str, Any] = {} if tool_choice is None else {"tool_choice": tool_choice}
        update: dict[str, Any] = {"local": tier_clients.bind_tools(self.local, tools, tier_kwargs)}
        if self.cloud is not None:
            if strict is not None:
                tier_kwargs = {**tier_kwargs, "strict": strict}
            update["cloud"] = tier_clients.bind_tools(self.cloud, tools, tier_kwargs)
        # A forced tool call is a requirement: Ollama cannot force one, so a local answer that
        # does not make it escalates (the cloud honours tool_choice).
        bound = self.with_bound_tiers(update, tier_clients.forced_tool_check(tool_choice))
        # Always a RunnableBinding, as LangChain's bind_tools contract expects.
        return bound.bind(**kwargs)

    def bind(self, **kwargs: Any) -> Any:  # the base class's binding type, a private name
        """Bind call kwargs; routing knobs among them become this copy's own per-call settings.

        ``router.bind(allow_escalation=False)`` is a router that never escalates, also after
        ``.bind_tools(...)`` or ``.with_structured_output(...)`` (a plain ``RunnableBinding``
        would hand those to the unbound router and drop the knob). Knobs are validated here;
        they act like per-call kwargs (a per-call value still wins; a bound ``threshold`` wins
        over the calibrator's).

        Example: ``private = router.bind(allow_escalation=False).bind_tools([lookup])``
        """
        names = RoutingPolicy.knob_names()
        knobs = {k: v for k, v in kwargs.items() if k in names}
        if not knobs:
            return super().bind(**kwargs)
        bound_knobs = {**(self.__dict__.get(_BOUND_KNOBS) or {}), **knobs}
        self._base_policy().with_overrides(bound_knobs)  # a typed error now, not at the call
        copy = self.model_copy()
        object.__setattr__(copy, _BOUND_KNOBS, bound_knobs)
        return super(ConfidenceRoutedLLM, copy).bind(
            **{k: v for k, v in kwargs.items() if k not in names}
        )

    def configurable_fields(self, **kwargs: Any) -> Any:
        """LangChain's ``configurable_fields``, with a misspelt field name a
        :class:`~confidence_router.errors.RoutingConfigError` naming the closest field.

        Example: ``router.configurable_fields(threshold=ConfigurableField(id="threshold"))``
        """
        unknown = set(kwargs) - set(type(self).model_fields)
        if unknown:
            raise RoutingConfigError(
                unknown_names_message(unknown, type(self).model_fields, what="configurable field")
            )
        return _configurable_router_class()(default=self, fields=kwargs)

    def with_bound_tiers(
        self,
        tiers: dict[str, Any],
        requirement: Callable[[BaseMessage], str | None] | None = None,
    ) -> ConfidenceRoutedLLM:
        """A copy whose tiers are replaced by bound versions (``{"local": ..., "cloud": ...}``)
        and whose local answers must meet ``requirement`` (a check returning why an answer
        cannot be used, or ``None``; one that fails escalates, reason ``unusable_answer``).

        For integrations that bind both tiers, as :meth:`bind_tools` (a forced tool call) and
        :meth:`with_structured_output` (an answer that parses) do. The requirement replaces
        the previous binding's, as the new bindings replace its tools; ``answer_check`` stays.

        Example: ``router.with_bound_tiers({"local": local.bind(format="json")}, is_json)``
        """
        unknown = set(tiers) - {"local", "cloud"}
        if unknown:
            raise RoutingConfigError(f"unknown tiers {sorted(unknown)}: expected local, cloud")
        bound = self.model_copy(update=tiers)
        object.__setattr__(bound, _BINDING_CHECK, requirement)
        return bound

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        include_raw: bool = False,
        method: Literal["function_calling", "json_mode", "json_schema"] = "function_calling",
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """Structured output through both tiers, each with its own mechanism for ``method``
        (``function_calling``, ``json_schema``, ``json_mode``); routing is decided on the raw
        answer as usual (see :func:`confidence_router.structured.structured_router`).

        Example: ``router.with_structured_output(Capital, method="json_schema").invoke(q)``
        """
        from confidence_router.structured import structured_router

        return structured_router(self, schema, method=method, include_raw=include_raw, **kwargs)

    # -- policy -------------------------------------------------------------------------------

    def _base_policy(self) -> RoutingPolicy:
        values = self.__dict__
        policy = values.get(_POLICY_CACHE)
        knobs = _KNOB_VALUES(values)
        # Cached, but rebuilt if a knob was assigned after construction.
        if policy is None or policy._as_tuple != knobs:
            policy = RoutingPolicy(**dict(zip(RoutingPolicy.knob_names(), knobs)))
            object.__setattr__(self, _POLICY_CACHE, policy)
        return policy

    def _begin(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        kwargs: dict[str, Any],
        run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None,
        *,
        streaming: bool,
    ) -> _Call:
        """Validate the input and the call's kwargs (before any request) and open its record."""
        messages = normalise_input(messages)
        if stop is not None and (
            not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop)
        ):
            raise RoutingConfigError(f"stop must be a list of strings, got {stop!r}")
        knobs = RoutingPolicy.knob_names()
        overrides: dict[str, Any] = {}
        tier_kwargs: dict[str, Any] = {}
        if kwargs:
            check_call_kwargs(kwargs)
            overrides = {k: kwargs[k] for k in knobs if k in kwargs}
            tier_kwargs = {k: v for k, v in kwargs.items() if k not in knobs}
        bound_knobs = self.__dict__.get(_BOUND_KNOBS)
        if bound_knobs:
            overrides = {**bound_knobs, **overrides}
        if self.calibrator is not None and "threshold" not in overrides:
            overrides["threshold"] = self.calibrator.threshold
        policy = self._base_policy().with_overrides(overrides)
        children = _tiers.child_manager(run_manager)
        # The guard and the budget see everything the cloud request carries: stop sequences too.
        stop = stop if stop is not None else self.stop
        sent_kwargs = tier_kwargs if not stop else {**tier_kwargs, "stop": stop}
        trace = RoutingTrace(policy, messages, self._collaborators(), sent_kwargs)
        # The router's own run gets the decision as metadata and tags (filterable in LangSmith).
        if run_manager is not None and run_manager.handlers:
            trace.run = (run_manager.handlers, run_manager.run_id)
        elif run_manager is None and children is not None and children.handlers:
            trace.run = (children.handlers, children.parent_run_id)
        call = _Call(messages, stop, trace, children,
                     tier_kwargs, streaming)
        top_kwargs = tier_clients.top_logprobs_kwargs(self.local, policy.signal)
        if top_kwargs:
            call.local_kwargs = {**tier_kwargs, **top_kwargs}
        return call

    def _flow(self, call: _Call) -> Generator[Any, Any, Answer]:
        precheck_query = None
        if self.precheck is not None:
            precheck_query = _tiers.last_user_text(call.messages) or None
        learn = self.knowledge_store is not None and self.learn_from_escalations
        return route(call.trace, precheck_query=precheck_query, stream=call.streaming,
                     learn=learn)

    def _tier(self, tier: str) -> tuple[Any, float | None]:
        """The model and timeout of ``tier`` (``"local"`` or ``"cloud"``)."""
        if tier == "local":
            return self.local, self.local_timeout
        return self.cloud, self.cloud_timeout

    def _learn(self, trace: RoutingTrace, cloud_message: BaseMessage) -> None:
        """Store the cloud answer to an escalated query as knowledge (opt-in)."""
        question = _tiers.last_user_text(trace.messages)
        answer = cloud_message.text.strip()
        if not question or not answer:
            return
        try:
            self.knowledge_store.add(
                question,
                answer,
                source="cloud_escalation",
                provenance={
                    "model": model_name(self.cloud),
                    "reason": trace.record["reason"],
                    "confidence": trace.record["confidence"],
                },
            )
            trace.record["learned"] = True
        except Exception as error:  # noqa: BLE001 - never lose the answer over a storage error
            trace.record["learned"] = False
            trace.record["learn_error"] = f"{type(error).__name__}: {error}"

    # -- the sync driver ------------------------------------------------------------------------

    def _drive(self, call: _Call) -> Generator[ChatGenerationChunk, None, Answer]:
        """Run the flow's effects; yields cloud chunks as they stream (stream mode)."""
        flow = self._flow(call)
        result: Any = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    effect = flow.send(result) if error is None else flow.throw(error)
                except StopIteration as stop:
                    return stop.value
                result, error = None, None
                try:
                    if isinstance(effect, Generate):
                        result = yield from self._answer(effect, call)
                    elif isinstance(effect, Probe):
                        result = self._probe(effect, call)
                    elif isinstance(effect, Sleep):
                        time.sleep(effect.seconds)
                    elif isinstance(effect, Announce):
                        _emit(call.children, call.trace)
                    elif isinstance(effect, Learn):
                        self._learn(call.trace, effect.message)
                except Exception as raised:  # noqa: BLE001 - handed to the flow, which decides
                    error = raised
        finally:
            flow.close()
            call.trace.finish()  # no-op when the flow finished it; else settles (cancelled)

    def _probe(self, effect: Probe, call: _Call) -> Any:
        started = time.perf_counter()
        try:
            config = _tiers.child_config(call.children, "precheck")
            return self.precheck.invoke(effect.query, config)  # type: ignore[union-attr]
        finally:
            call.trace.timed("precheck", started)

    def _answer(self, effect: Generate, call: _Call) -> Generator[ChatGenerationChunk, None, Answer]:
        model, timeout = self._tier(effect.tier)
        config = _tiers.child_config(call.children, effect.tier)
        kwargs = call.local_kwargs if effect.tier == "local" else call.kwargs
        started = time.perf_counter()
        watch = _watch(effect, call, model)
        try:
            if not call.streaming and watch is None and not _streams_on_invoke(model):
                # The client's own timeout (httpx / botocore) bounds the call and cancels it.
                message = tier_clients.invoke_directly(
                    model, _sent(effect, call), config, call.stop, kwargs)
                tier_clients.require_final_chunk(model, message)
                return Answer(message)
            # Streamed: the stream is closed on every exit, so the server stops generating.
            deadline = None if timeout is None else started + timeout
            chunks: list[AIMessageChunk] = []
            shown = 0  # chunks of answer the caller has seen (not empty start/stop chunks)
            stream = iter(model.stream(_sent(effect, call), config, stop=call.stop, **kwargs))
            try:
                for raw in stream:
                    chunk = _tiers.as_chunk(raw)
                    chunks.append(chunk)
                    if effect.emit:
                        yield ChatGenerationChunk(message=_tiers.without_usage(chunk))
                        shown += _tiers.carries_output(chunk)
                    if deadline is not None and time.perf_counter() > deadline:
                        raise _timeout(effect.tier, timeout)
                    if watch is not None and watch.stop_after(chunk):
                        break
                else:  # read to the end (an answer stopped early has no final chunk)
                    tier_clients.require_final_chunk(model, chunks)
            except Exception as error:
                if shown:  # part of this answer is out: no retry, no fall-back
                    raise PartialStreamError(error, shown) from error
                if watch is not None:  # the tokens seen before the failure
                    call.trace.record["early_exit"] = watch.report()
                raise
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
            return Answer(messages_of(chunks), chunks, emitted=effect.emit,
                          early_exit=watch.report() if watch is not None else None)
        finally:
            call.trace.timed(effect.tier, started)

    # -- the async driver -----------------------------------------------------------------------

    async def _adrive(
        self, call: _Call, out: list[Answer]
    ) -> AsyncGenerator[ChatGenerationChunk, None]:
        """Async :meth:`_drive`; the answer is appended to ``out``."""
        flow = self._flow(call)
        result: Any = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    effect = flow.send(result) if error is None else flow.throw(error)
                except StopIteration as stop:
                    out.append(stop.value)
                    return
                result, error = None, None
                try:
                    if isinstance(effect, Generate):
                        answers: list[Answer] = []
                        tier_stream = self._aanswer(effect, call, answers)
                        try:
                            async for chunk in tier_stream:
                                yield chunk
                        finally:
                            await tier_stream.aclose()
                        result = answers[0]
                    elif isinstance(effect, Probe):
                        result = await self._aprobe(effect, call)
                    elif isinstance(effect, Sleep):
                        await asyncio.sleep(effect.seconds)
                    elif isinstance(effect, Announce):
                        await _aemit(call.children, call.trace)
                    elif isinstance(effect, Learn):
                        # Chroma's client is synchronous: keep it off the event loop.
                        await asyncio.to_thread(self._learn, call.trace, effect.message)
                except Exception as raised:  # noqa: BLE001 - handed to the flow, which decides
                    error = raised
        finally:
            flow.close()
            call.trace.finish()

    async def _aprobe(self, effect: Probe, call: _Call) -> Any:
        started = time.perf_counter()
        try:
            config = _tiers.child_config(call.children, "precheck")
            return await _within(
                self.precheck.ainvoke(effect.query, config),  # type: ignore[union-attr]
                self.local_timeout, "precheck",
            )
        finally:
            call.trace.timed("precheck", started)

    async def _aanswer(
        self, effect: Generate, call: _Call, out: list[Answer]
    ) -> AsyncGenerator[ChatGenerationChunk, None]:
        model, timeout = self._tier(effect.tier)
        model = tier_clients.per_loop(model)
        # A synchronous client (Bedrock) gets a thread of its own, not a turn in the loop's
        # small shared executor, where its timeout could run out before it was sent.
        ainvoke, astream = _sync_tiers.async_calls(model)
        config = _tiers.child_config(call.children, effect.tier)
        kwargs = call.local_kwargs if effect.tier == "local" else call.kwargs
        started = time.perf_counter()
        watch = _watch(effect, call, model)
        try:
            if not call.streaming and watch is None and not _streams_on_invoke(model):
                invoke = tier_clients.ainvoke_directly(
                    model, ainvoke, _sent(effect, call), config, call.stop, kwargs)
                message = await _within(invoke, timeout, effect.tier)
                tier_clients.require_final_chunk(model, message)
                out.append(Answer(message))
                return
            deadline = None if timeout is None else started + timeout
            chunks: list[AIMessageChunk] = []
            shown = 0  # chunks of answer the caller has seen (not empty start/stop chunks)
            stream = aiter(astream(_sent(effect, call), config, stop=call.stop, **kwargs))
            try:
                while True:
                    remaining = None if deadline is None else deadline - time.perf_counter()
                    try:
                        raw = await _within(anext(stream), remaining, effect.tier, timeout)
                    except StopAsyncIteration:
                        # Read to the end (an answer stopped early has no final chunk).
                        tier_clients.require_final_chunk(model, chunks)
                        break
                    chunk = _tiers.as_chunk(raw)
                    chunks.append(chunk)
                    if effect.emit:
                        yield ChatGenerationChunk(message=_tiers.without_usage(chunk))
                        shown += _tiers.carries_output(chunk)
                    if watch is not None and watch.stop_after(chunk):
                        break
            except Exception as error:
                if shown:  # part of this answer is out: no retry, no fall-back
                    raise PartialStreamError(error, shown) from error
                if watch is not None:  # the tokens seen before the failure
                    call.trace.record["early_exit"] = watch.report()
                raise
            finally:
                await _aclose(stream)
            out.append(Answer(messages_of(chunks), chunks, emitted=effect.emit,
                              early_exit=watch.report() if watch is not None else None))
        finally:
            call.trace.timed(effect.tier, started)

    # -- BaseChatModel entry points -------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call = self._begin(messages, stop, kwargs, run_manager, streaming=False)
        driver = self._drive(call)
        while True:
            try:
                next(driver)
            except StopIteration as stop_:
                answer: Answer = stop_.value
                break
        return _result(answer, call.trace, listened=_listened(run_manager))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call = self._begin(messages, stop, kwargs, run_manager, streaming=False)
        out: list[Answer] = []
        async for _ in self._adrive(call, out):
            pass
        return _result(out[0], call.trace, listened=_listened(run_manager))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # The local answer is buffered until the decision: output of two models is never mixed.
        call = self._begin(messages, stop, kwargs, run_manager, streaming=True)
        answer = yield from self._drive(call)
        yield from _replay(answer, call.trace)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        call = self._begin(messages, stop, kwargs, run_manager, streaming=True)
        out: list[Answer] = []
        driver = self._adrive(call, out)
        open_drivers = _tiers.OPEN_DRIVERS.get()
        if open_drivers is not None:
            open_drivers.append(driver)
        try:
            async for chunk in driver:
                yield chunk
        finally:
            await driver.aclose()
        for chunk in _replay(out[0], call.trace):
            yield chunk

    # -- public entry points: the answering tier's usage back on what the caller gets --------

    def _convert_input(self, model_input: LanguageModelInput) -> Any:
        try:
            return super()._convert_input(model_input)
        except (ValueError, TypeError, NotImplementedError) as error:
            raise InvalidTypeError(
                f"cannot read the input as chat messages ({type(model_input).__name__}): {error}"
            ) from error

    def invoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        return _with_answer_usage(super().invoke(input, config, stop=stop, **kwargs))

    async def ainvoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        return _with_answer_usage(await super().ainvoke(input, config, stop=stop, **kwargs))

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        # langchain-core's stream path does not pass a run manager to ``_stream``; the child-run
        # manager goes through a context variable, read before the first chunk.
        config = ensure_config(config)
        run_id = config.get("run_id") or uuid.uuid4()
        token = STREAM_CHILDREN.set(_tiers.stream_children(config, run_id, CallbackManager))
        try:
            # A generator (closed below), typed as an iterator by the base class.
            chunks = cast(
                Generator[AIMessageChunk, None, None],
                super().stream(input, {**config, "run_id": run_id}, stop=stop, **kwargs),
            )
            first = next(chunks, None)
        finally:
            STREAM_CHILDREN.reset(token)
        if first is None:
            return
        try:
            yield _with_answer_usage(first)
            for chunk in chunks:
                yield _with_answer_usage(chunk)
        finally:
            chunks.close()

    async def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        config = ensure_config(config)
        run_id = config.get("run_id") or uuid.uuid4()
        token = STREAM_CHILDREN.set(_tiers.stream_children(config, run_id, AsyncCallbackManager))
        drivers: list[Any] = []
        drivers_token = _tiers.OPEN_DRIVERS.set(drivers)
        try:
            chunks = cast(
                AsyncGenerator[AIMessageChunk, None],
                super().astream(input, {**config, "run_id": run_id}, stop=stop, **kwargs),
            )
            first = await anext(chunks, None)
        finally:
            STREAM_CHILDREN.reset(token)
            _tiers.OPEN_DRIVERS.reset(drivers_token)
        if first is None:
            return
        try:
            yield _with_answer_usage(first)
            async for chunk in chunks:
                yield _with_answer_usage(chunk)
        finally:
            # Closed early (or failed): close the routing flow too, so the tier's stream is
            # closed and a cloud reservation settled now, not when the GC gets to it.
            for driver in drivers:
                await driver.aclose()
            await chunks.aclose()


#: The LangChain-style name of the same class (chat models are named ``Chat*``).
ChatConfidenceRouter = ConfidenceRoutedLLM


@functools.cache
def _configurable_router_class() -> type:
    """LangChain's ``RunnableConfigurableFields`` for the router, built on first use."""
    import difflib

    from langchain_core.runnables.configurable import RunnableConfigurableFields
    from langchain_core.runnables.utils import ConfigurableField

    class ConfigurableRouter(RunnableConfigurableFields):
        """Knobs chosen through ``with_config(configurable=...)`` act like per-call kwargs
        (bound with :meth:`ConfidenceRoutedLLM.bind`): a configured ``threshold`` wins over
        the calibrator's, as the README promises for a per-call threshold. ``bind_tools`` and
        ``with_structured_output`` keep it configurable: they are applied to the router each
        call configures (LangChain's version applied them to the default router only)."""

        then: tuple[tuple[str, tuple[Any, ...], dict[str, Any]], ...] = ()
        """Methods applied, in order, to the configured router: ``(name, args, kwargs)``."""

        def _prepare(self, config: RunnableConfig | None = None) -> Any:
            chosen = ensure_config(config).get("configurable", {})
            configured = [(key, spec) for key, spec in self.fields.items() if spec.id in chosen]
            if all(
                isinstance(spec, ConfigurableField) and key in RoutingPolicy.knob_names()
                for key, spec in configured
            ):
                # Only knobs: bound below on the default router. LangChain would build a new
                # router, with new HTTP clients (new connections), on every call.
                runnable: Any = self.default
            else:
                runnable, config = super()._prepare(config)
            declared = [s.id for s in self.fields.values() if isinstance(s, ConfigurableField)]
            misspelt = [
                key for key in chosen
                if key not in declared and difflib.get_close_matches(key, declared, n=1, cutoff=0.8)
            ]
            if misspelt:
                # A near miss of a declared id is a typo (ignored, it would silently drop a
                # knob such as allow_escalation); other keys belong to the rest of the chain.
                raise RoutingConfigError(
                    unknown_names_message(misspelt, declared, what="configurable id")
                )
            knobs = {
                key: chosen[spec.id]
                for key, spec in self.fields.items()
                if isinstance(spec, ConfigurableField) and key in RoutingPolicy.knob_names()
                and spec.id in chosen
            }
            if knobs:
                runnable = runnable.bind(**knobs)
            for name, args, kwargs in self.then:
                runnable = getattr(runnable, name)(*args, **kwargs)
            return runnable, config

        def _then(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            # Applied once now, so bad tools or schemas fail here rather than at each call.
            getattr(self._prepare(None)[0], name)(*args, **kwargs)
            return type(self)(default=self.default, fields=self.fields,
                              then=(*self.then, (name, args, kwargs)))

        def bind_tools(self, *args: Any, **kwargs: Any) -> Any:
            return self._then("bind_tools", args, kwargs)

        def with_structured_output(self, *args: Any, **kwargs: Any) -> Any:
            return self._then("with_structured_output", args, kwargs)

    return ConfigurableRouter


class _Call:
    """The arguments every stage of one call needs."""

    __slots__ = ("children", "kwargs", "local_kwargs", "messages", "stop", "streaming", "trace")

    def __init__(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        trace: RoutingTrace,
        children: ChildManager | None,
        kwargs: dict[str, Any],
        streaming: bool,
    ) -> None:
        self.messages = messages
        self.stop = stop
        self.trace = trace
        self.children = children
        self.kwargs = kwargs
        self.local_kwargs = kwargs
        self.streaming = streaming


class _Watch:
    """Follows a local answer's tokens for early exit (at a constant cost per token)."""

    __slots__ = ("exited", "has_content", "trace", "tracker")

    def __init__(self, trace: RoutingTrace, tracker: ExitTracker) -> None:
        self.trace = trace
        self.tracker = tracker
        self.exited = False
        self.has_content = False
        """Something visible arrived (text that is not blank, a tool call)."""

    def stop_after(self, chunk: AIMessageChunk) -> bool:
        cannot_be_kept = self.tracker.add(token_logprobs(chunk.response_metadata) or ())
        if not self.has_content:
            self.has_content = bool(chunk.tool_call_chunks) or not is_blank(chunk.text)
        self.exited = self.trace.should_stop_early(cannot_be_kept, has_content=self.has_content)
        return self.exited

    def report(self) -> dict[str, Any]:
        return {"exited": self.exited, "tokens": self.tracker.count}


def _streams_on_invoke(model: Any) -> bool:
    """A tier model built with ``streaming=True`` streams inside its own ``invoke``, where no
    deadline of ours applies and nothing closes the stream: such a tier is streamed by the
    router instead (the attempt's deadline holds, the stream is closed on every exit)."""
    # Read from the field values (a missing attribute costs pydantic ~3 us: every call pays it).
    return getattr(tier_clients.unwrap(model), "__dict__", {}).get("streaming") is True


def _sent(effect: Generate, call: _Call) -> list[BaseMessage]:
    """The messages sent to the effect's tier: the local one gets earlier turns without the
    reasoning blocks of another model, which it cannot read (ChatOllama refuses them)."""
    if effect.tier == "local":
        return _tiers.without_reasoning(call.messages)
    return call.messages


def _watch(effect: Generate, call: _Call, model: Any) -> _Watch | None:
    """A token watcher when this generation may stop early (local, early_exit on)."""
    policy = call.trace.policy
    if effect.tier != "local" or effect.complete or not policy.early_exit:
        return None
    tracker = ExitTracker(policy.signal, call.trace.threshold_in_effect(),
                          max_tokens=_answer_cap(model, call.local_kwargs))
    return _Watch(call.trace, tracker)


def _answer_cap(local: Any, kwargs: dict[str, Any]) -> int | None:
    """The most tokens the local answer can have, as its request will carry it (mean-type
    early exits bound the rest of the answer with it); ``None`` when not known for sure.

    Ollama's ``options`` given per call or bound replace the model's own (``num_predict``
    among them); a ``with_fallbacks()`` model may answer with another cap.
    """
    if _has_fallbacks(local):
        return None
    given = {**tier_clients.bound_kwargs(local), **kwargs}
    inner = tier_clients.unwrap(local)
    if "options" in given and tier_clients.is_ollama(inner):
        options = given["options"]
        cap = options.get("num_predict") if isinstance(options, Mapping) else None
    elif "max_tokens" in given:
        cap = given["max_tokens"]
    else:
        cap = getattr(inner, "num_predict", None) or getattr(inner, "max_tokens", None)
    return cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else None


def _has_fallbacks(model: Any) -> bool:
    while isinstance(model, RunnableBindingBase):
        model = model.bound
    return isinstance(model, RunnableWithFallbacks)


def check_call_kwargs(names: Any, also: frozenset[str] = frozenset()) -> None:
    """Raise :class:`~confidence_router.errors.RoutingConfigError` naming any call kwarg that
    is neither a knob, a tier kwarg (:data:`TIER_KWARGS`) nor one of ``also`` (with a hint for
    a near miss such as ``allow_escalaton``), before any request."""
    knobs = RoutingPolicy.knob_names()
    unknown = set(names) - set(knobs) - TIER_KWARGS - also
    tool_kwargs = sorted(unknown & tier_clients.TOOL_KWARGS)
    if tool_kwargs:
        # Each tier takes these in its own form, through its bind_tools; raw, they would
        # break the local call (and so buy a cloud call) or be ignored.
        raise RoutingConfigError(
            f"{', '.join(tool_kwargs)} cannot be passed per call: bind them with "
            "router.bind_tools(tools, tool_choice=...), which gives each tier its own form "
            "(parallel_tool_calls: neither ChatOllama nor Bedrock takes it)"
        )
    if unknown:
        raise RoutingConfigError(unknown_names_message(
            unknown, sorted({*knobs, *TIER_KWARGS, *also}), what="call kwarg"
        ))


#: ``ChatMessage`` roles every tier can send, as the message class that carries them.
_CHAT_ROLES: dict[str, type[BaseMessage]] = {
    "user": HumanMessage, "human": HumanMessage,
    "assistant": AIMessage, "ai": AIMessage,
    "system": SystemMessage,
}


def normalise_input(messages: list[BaseMessage]) -> list[BaseMessage]:
    """The call's messages as every tier can send them, checked before any request.

    A ``ChatMessage`` with a standard role (``user``, ``assistant``, ``system``) becomes the
    message class of that role (the Bedrock clients refuse ``ChatMessage``); any other role,
    and a ``RemoveMessage`` (a LangGraph state instruction, not content), is an
    :class:`~confidence_router.errors.InvalidInputError`. Then :func:`check_input`.
    """
    out: list[BaseMessage] | None = None
    for index, message in enumerate(messages):
        if isinstance(message, RemoveMessage):
            raise InvalidInputError(
                "a RemoveMessage is a LangGraph state instruction, not content: apply it to "
                "the state before calling the model"
            )
        if isinstance(message, ChatMessage):
            kind = _CHAT_ROLES.get(str(message.role).lower())
            if kind is None:
                raise InvalidInputError(
                    f"ChatMessage role {message.role!r} is none of {sorted(_CHAT_ROLES)}: "
                    "neither tier can send it"
                )
            out = list(messages) if out is None else out
            out[index] = kind(content=message.content, id=message.id, name=message.name,
                              additional_kwargs=message.additional_kwargs)
    checked = messages if out is None else out
    check_input(checked)
    return checked


def check_input(messages: Sequence[BaseMessage]) -> None:
    """Nothing to answer is an error before any request (and never a cloud call): raises
    :class:`~confidence_router.errors.InvalidInputError` (also used by the LlamaIndex LLM)."""
    if not messages:
        raise InvalidInputError("no messages: there is nothing to answer")
    for message in messages:
        if not is_blank(message.text) or getattr(message, "tool_calls", None):
            return
        content = message.content
        if isinstance(content, list) and any(map(_has_content, content)):
            return  # an image, a document, a tool result, Bedrock-native text ...
    raise InvalidInputError("every message is empty or whitespace: there is nothing to answer")


def _checked_timeout(value: Any) -> Any:
    """A tier timeout as given (``None``: none), or :class:`InvalidArgumentError`."""
    if value is None:
        return value
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or value <= 0:
        # Strict: "5" or True is a mistake, not 5.0 or 1.0 seconds.
        raise InvalidArgumentError(f"must be a finite number of seconds > 0, got {value!r}")
    return value


def _has_content(block: Any) -> bool:
    """A content block other than blank text (a block without a ``type`` is provider-native:
    Bedrock's ``{"text": ...}`` is text, anything else is content)."""
    if not isinstance(block, dict):
        return isinstance(block, str) and not is_blank(block)
    kind = block.get("type")
    if kind not in (None, "text"):
        return True
    text = block.get("text")
    return not is_blank(text) if isinstance(text, str) else kind is None


async def _aclose(stream: Any) -> None:
    """Close a tier's async stream (the server stops generating)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except RuntimeError as error:
        # At event-loop shutdown, shutdown_asyncgens may be closing this same stream (an
        # abandoned async chain): it is being closed, which is all this wanted; reporting it
        # would record a cloud error for a call nobody waits for.
        if "already running" not in str(error):
            raise


def _timeout(tier: str, timeout: float | None) -> TierTimeoutError:
    return TierTimeoutError(f"{tier} tier timed out after {timeout:g} s")


async def _within(awaitable: Any, seconds: float | None, tier: str,
                  timeout: float | None = None) -> Any:
    """``await awaitable``, cancelled after ``seconds`` (the request is cancelled with it).

    Not ``asyncio.wait_for``: before Python 3.12 it drops a cancellation that lands as a
    chunk arrives, and a cancelled stream ran on to the end of the answer (:mod:`._aio`).
    """
    if seconds is None:
        return await awaitable
    try:
        return await _aio.within(awaitable, seconds)
    except asyncio.TimeoutError:
        raise _timeout(tier, timeout if timeout is not None else seconds) from None


def _emit(children: ChildManager | None, trace: RoutingTrace) -> None:
    if isinstance(children, CallbackManager):
        children.on_custom_event(
            "routing_decision", trace.decision_event(), run_id=children.parent_run_id
        )


async def _aemit(children: ChildManager | None, trace: RoutingTrace) -> None:
    if isinstance(children, AsyncCallbackManager):
        await children.on_custom_event(
            "routing_decision", trace.decision_event(), run_id=children.parent_run_id
        )


def _max_output_tokens(model: Any) -> int | None:
    inner = tier_clients.unwrap(model)
    value = getattr(inner, "max_tokens", None)
    if value is None:
        value = (getattr(inner, "model_kwargs", None) or {}).get("max_tokens")
    value = tier_clients.bound_kwargs(model).get("max_tokens", value)
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def _drops_max_tokens(model: Any) -> bool:
    """ChatBedrockConverse leaves ``maxTokens`` out of the request with high-effort reasoning
    (``reasoningConfig`` enabled, ``maxReasoningEffort="high"``), set on the model or bound
    with ``.bind()``: no limit reaches the wire."""
    for fields in (
        getattr(tier_clients.unwrap(model), "additional_model_request_fields", None),
        tier_clients.bound_kwargs(model).get("additional_model_request_fields"),
    ):
        config = fields.get("reasoningConfig") if isinstance(fields, dict) else None
        if (
            isinstance(config, dict)
            and config.get("type") == "enabled"
            and config.get("maxReasoningEffort") == "high"
        ):
            return True
    return False


def _result(answer: Answer, trace: RoutingTrace, *, listened: bool = True) -> ChatResult:
    routing = trace.finish()
    message = _tiers.attach(answer.message, routing, keep_usage=not listened)
    return ChatResult(generations=[ChatGeneration(message=message)], llm_output={"routing": routing})


def _listened(run_manager: Any) -> bool:
    """Whether callbacks watch the router's run (then its children report the usage)."""
    return run_manager is None or bool(run_manager.handlers)


def _routing_chunk(trace: RoutingTrace) -> ChatGenerationChunk:
    return ChatGenerationChunk(
        message=AIMessageChunk(
            content="", response_metadata={"routing": trace.finish()}, chunk_position="last"
        )
    )


def _replay(answer: Answer, trace: RoutingTrace) -> Iterator[ChatGenerationChunk]:
    """The buffered local chunks (unless already streamed), then the routing record.

    BaseChatModel.stream() reports each chunk to the callbacks itself.
    """
    if not answer.emitted:
        chunks = answer.chunks or [_tiers.as_chunk(answer.message)]
        for chunk in chunks:
            yield ChatGenerationChunk(message=_tiers.without_usage(chunk))
    yield _routing_chunk(trace)


def _with_answer_usage(message: Any) -> Any:
    """Put the answering tier's token usage on what the caller receives (the record keeps
    both tiers' usage apart: ``routing["usage"]["local"]`` / ``["cloud"]``)."""
    routing = getattr(message, "response_metadata", {}).get("routing")
    if not isinstance(routing, dict):
        return message
    usage = (routing.get("usage") or {}).get(routing.get("decision"))
    if not usage or message.usage_metadata == usage:
        return message
    return message.model_copy(update={"usage_metadata": usage})
