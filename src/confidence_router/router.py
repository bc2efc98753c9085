"""``ConfidenceRoutedLLM``: a LangChain chat model that answers locally and escalates to the cloud
when the local answer's zero-shot confidence is below a threshold.

This is the LangChain layer. The decision itself lives in :mod:`confidence_router.policy`, the
signals in :mod:`confidence_router.signals`, the per-call record in ``_record`` and the tier
plumbing (tracing, timeouts) in ``_tiers``; this module strings the stages together for the
four entry points (invoke, ainvoke, stream, astream).
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, ensure_config
from langchain_core.tools import BaseTool
from pydantic import ConfigDict, Field, model_validator

from confidence_router import _tiers
from confidence_router._record import RoutingTrace
from confidence_router._tiers import STREAM_CHILDREN, ChildManager, model_name
from confidence_router.errors import RoutingConfigError
from confidence_router.policy import RoutingPolicy
from confidence_router.retry import RetryPolicy

if TYPE_CHECKING:
    from confidence_router.costs import PriceTable
    from confidence_router.settings import RouterSettings

ChatRunnable = Runnable[LanguageModelInput, BaseMessage]

#: Guard signature: return a reason (str) to keep the query local, or None to allow escalation.
EscalationGuard = Callable[[Sequence[BaseMessage]], "str | None"]


@functools.cache
def _default_prices() -> PriceTable:
    from confidence_router.costs import PriceTable

    return PriceTable()


def _default_cloud_retry() -> RetryPolicy:
    # Throttling and transient errors only (never validation or access errors); see retry.py.
    return RetryPolicy(max_attempts=3, base_delay=0.5, max_delay=4.0)


class ConfidenceRoutedLLM(BaseChatModel):
    """A chat model that answers with a local model and escalates to a cloud model only when
    the local answer is probably wrong.

    After the local model answers, the mean of its per-token log-probabilities is mapped to a
    confidence ``sigmoid(2*mean + 3)`` (no training data needed); below ``threshold`` the query
    is sent to ``cloud``. The decision and its evidence are in
    ``message.response_metadata["routing"]``.

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
    ``precheck_threshold``, ``allow_escalation``, ``on_budget_exceeded``) can be passed as an
    invoke/bind kwarg, or made configurable with ``configurable_fields``.
    """

    local: ChatRunnable
    """The local chat model (default choice: ``ChatOllama``). It is asked for logprobs."""

    cloud: ChatRunnable | None = None
    """The cloud chat model (default choice: ``ChatBedrockConverse``). ``None``: escalations are
    only reported (``would_escalate``) and the local answer is returned, flagged."""

    threshold: float = Field(default=0.7, ge=0.0, le=1.0)
    """Keep the local answer iff its confidence >= threshold."""

    signal: str = "mean_logprob"
    """The zero-shot score to route on: ``mean_logprob`` (paper) or ``min_logprob``."""

    on_unknown: str = "escalate"
    """When the confidence is unknown (no logprobs): ``escalate`` or keep ``local`` (flagged)."""

    on_cloud_error: str = "raise"
    """When the cloud fails: ``raise`` CloudEscalationError, or return the ``local`` answer."""

    precheck_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    """With a pre-generation probe: escalate at once iff P(YES) < precheck_threshold."""

    allow_escalation: bool = True
    """``False`` keeps every query local (e.g. for private data)."""

    on_budget_exceeded: str = "local"
    """When ``budget`` cannot cover an escalation: serve the ``local`` answer flagged, or
    ``raise`` BudgetExceededError."""

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
    local too (fails closed)."""

    calibrator: Any = None
    """A :class:`~confidence_router.calibration.RollingQuantileThreshold`: the threshold then
    follows a rolling quantile of recent confidences so the cloud-call rate tracks a target
    (a per-call ``threshold`` still wins)."""

    prices: Any = None
    """A :class:`~confidence_router.costs.PriceTable` (default: the built-in Bedrock prices)."""

    stats: Any = None
    """A :class:`~confidence_router.stats.RoutingStats` (or any ``StatsSink``) fed every record."""

    budget: Any = None
    """A :class:`~confidence_router.budget.CloudBudget`: maximum cloud spend per time window."""

    cloud_retry: RetryPolicy | None = Field(default_factory=_default_cloud_retry)
    """Retries of the cloud call on throttling, transient errors and timeouts, with backoff
    (``None``: no retries). Permanent errors (validation, access denied) are never retried."""

    local_timeout: float | None = Field(default=None, gt=0)
    """Seconds for the local answer (streams: per chunk); on timeout the query escalates."""

    cloud_timeout: float | None = Field(default=None, gt=0)
    """Seconds per cloud attempt (streams: per chunk)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    @model_validator(mode="after")
    def _setup(self) -> ConfidenceRoutedLLM:
        self._base_policy()  # validate the knobs once, at construction
        object.__setattr__(self, "local", _tiers.with_logprobs(self.local))
        if self.learn_from_escalations and self.knowledge_store is None:
            raise ValueError("learn_from_escalations=True needs a knowledge_store")
        if (
            self.budget is not None
            and self.cloud is not None
            and self.price_table().price_for(model_name(self.cloud)) is None
        ):
            raise ValueError(
                f"a budget needs a price for the cloud model {model_name(self.cloud)!r}: "
                "add it with prices=PriceTable({...})"
            )
        return self

    def price_table(self) -> PriceTable:
        """The price table in use (``prices`` or the built-in one)."""
        if self.prices is not None:
            return self.prices
        return _default_prices()

    # -- construction from plain settings -----------------------------------------------------

    @classmethod
    def from_settings(
        cls, path: str | None = None, *, environ: dict[str, str] | None = None, **overrides: Any
    ) -> ConfidenceRoutedLLM:
        """Build a router from a settings file and/or environment variables.

        ``ChatOllama`` is the local tier and ``ChatBedrockConverse`` the cloud tier; see
        :class:`confidence_router.settings.RouterSettings` for every setting. Invalid settings
        raise :class:`~confidence_router.errors.RoutingConfigError` here, not at first call.

        Example: ``ConfidenceRoutedLLM.from_settings("router.toml", threshold=0.8)``
        """
        from confidence_router.settings import RouterSettings

        return RouterSettings.load(path, environ).build(**overrides)

    def to_settings(self) -> RouterSettings:
        """This router's configuration as plain :class:`RouterSettings` (no credentials).

        Round trip: ``ConfidenceRoutedLLM.from_settings(path)`` after
        ``router.to_settings().save(path)``. Only ``ChatOllama`` local and
        ``ChatBedrockConverse`` cloud tiers (the settings' own) can be expressed.
        """
        from confidence_router.settings import RouterSettings

        local, cloud = _tiers.unwrap(self.local), _tiers.unwrap(self.cloud)
        if type(local).__name__ != "ChatOllama":
            raise RoutingConfigError(
                f"to_settings needs a ChatOllama local tier, not {type(local).__name__}"
            )
        values: dict[str, Any] = {
            "local_model": local.model,
            "ollama_host": local.base_url or "http://127.0.0.1:11434",
            "cloud_model": None,
            **self._base_policy().__dict__,
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
            )
        return RouterSettings.from_mapping(values)

    # -- LangChain plumbing -------------------------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return "confidence-routed"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "local": model_name(self.local),
            "cloud": model_name(self.cloud) if self.cloud is not None else None,
            **self._base_policy().__dict__,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "confidence-router"
        params["ls_model_name"] = kwargs.get("model") or model_name(self.local)
        return params

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools to both tiers (each formats them for its own provider).

        Example: ``router.bind_tools([get_weather]).invoke("Weather in Paris?").tool_calls``
        """
        tier_kwargs: dict[str, Any] = {} if tool_choice is None else {"tool_choice": tool_choice}
        update: dict[str, Any] = {"local": _tiers.bind_tools(self.local, tools, tier_kwargs)}
        if self.cloud is not None:
            update["cloud"] = _tiers.bind_tools(self.cloud, tools, tier_kwargs)
        # Always a RunnableBinding, as LangChain's bind_tools contract expects.
        return self.model_copy(update=update).bind(**kwargs)

    # -- policy -------------------------------------------------------------------------------

    def _base_policy(self) -> RoutingPolicy:
        return RoutingPolicy(**{knob: getattr(self, knob) for knob in RoutingPolicy.knob_names()})

    def _begin(
        self,
        messages: list[BaseMessage],
        kwargs: dict[str, Any],
        run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None,
    ) -> tuple[RoutingTrace, dict[str, Any], ChildManager | None]:
        """Split the router's knobs from the tier kwargs and open the call's record."""
        knobs = RoutingPolicy.knob_names()
        overrides = {k: kwargs[k] for k in knobs if k in kwargs}
        tier_kwargs = {k: v for k, v in kwargs.items() if k not in knobs}
        if self.calibrator is not None and "threshold" not in overrides:
            overrides["threshold"] = self.calibrator.threshold
        policy = self._base_policy().with_overrides(overrides)
        trace = RoutingTrace(policy, self, messages)
        return trace, tier_kwargs, _tiers.child_manager(run_manager)

    def _precheck_query(self, trace: RoutingTrace) -> str | None:
        return (trace.question() or None) if self.precheck is not None else None

    def _learn(self, trace: RoutingTrace, cloud_message: BaseMessage) -> None:
        """Store the cloud answer to an escalated query as knowledge (opt-in)."""
        if self.knowledge_store is None or not self.learn_from_escalations:
            return
        question, answer = trace.question(), cloud_message.text.strip()
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

    def _tier(self, tier: str) -> tuple[Any, float | None]:
        """The model and timeout of ``tier`` (``"local"`` or ``"cloud"``)."""
        if tier == "local":
            return self.local, self.local_timeout
        return self.cloud, self.cloud_timeout

    # -- sync stages ----------------------------------------------------------------------------

    def _run_precheck(self, trace: RoutingTrace, children: ChildManager | None) -> bool:
        query = self._precheck_query(trace)
        if query is None:
            return False
        started = time.perf_counter()
        try:
            score = self.precheck.invoke(query, _tiers.child_config(children, "precheck"))  # type: ignore[union-attr]
        except Exception as error:  # noqa: BLE001 - a failed probe never blocks the query
            return trace.precheck_failed(error)
        finally:
            trace.timed("precheck", started)
        return trace.precheck_done(score)

    def _invoke_tier(self, tier: str, call: _Call) -> BaseMessage:
        model, timeout = self._tier(tier)
        config = _tiers.child_config(call.children, tier)

        def attempt() -> BaseMessage:
            return _tiers.call_with_timeout(
                lambda: model.invoke(call.messages, config, stop=call.stop, **call.kwargs),  # type: ignore[union-attr]
                timeout,
                tier,
            )

        started = time.perf_counter()
        try:
            if tier == "cloud" and self.cloud_retry is not None:
                return self.cloud_retry.call(attempt)
            return attempt()
        finally:
            call.trace.timed(tier, started)

    def _stream_tier(self, tier: str, call: _Call) -> Iterator[AIMessageChunk]:
        model, timeout = self._tier(tier)
        config = _tiers.child_config(call.children, tier)

        def open_stream() -> tuple[Iterator[Any], Any]:
            chunks = _tiers.iterate_with_timeout(
                iter(model.stream(call.messages, config, stop=call.stop, **call.kwargs)),  # type: ignore[union-attr]
                timeout,
                tier,
            )
            return chunks, next(chunks, None)

        started = time.perf_counter()
        try:
            # Retries happen only before the first chunk: nothing has been emitted yet.
            if tier == "cloud" and self.cloud_retry is not None:
                chunks, first = self.cloud_retry.call(open_stream)
            else:
                chunks, first = open_stream()
            if first is None:
                return
            yield _tiers.as_chunk(first)
            for chunk in chunks:
                yield _tiers.as_chunk(chunk)
        finally:
            call.trace.timed(tier, started)

    # -- sync entry points --------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        trace, tier_kwargs, children = self._begin(messages, kwargs, run_manager)
        call = _Call(messages, stop, trace, children, tier_kwargs)
        local_message: BaseMessage | None = None
        if not self._run_precheck(trace, children):
            try:
                local_message = self._invoke_tier("local", call)
            except Exception as error:  # noqa: BLE001 - any local failure escalates
                trace.local_failed(error)
            if not trace.after_local(local_message):
                self._emit(children, trace)
                return _result(local_message, trace)  # type: ignore[arg-type]
        trace.escalating(local_message)
        if not trace.reserve_budget(local_message):
            if trace.local_fallback_needed(local_message):
                local_message = self._invoke_tier("local", call)
            self._emit(children, trace)
            return _result(_require(local_message, trace), trace)
        self._emit(children, trace)
        try:
            cloud_message = self._invoke_tier("cloud", call)
        except Exception as error:  # noqa: BLE001 - on_cloud_error decides
            if trace.retry_locally_after_cloud_failure(local_message):
                local_message = self._invoke_tier("local", call)
            return _result(trace.cloud_fallback(error, local_message), trace)
        trace.cloud_done(cloud_message)
        self._learn(trace, cloud_message)
        return _result(cloud_message, trace)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # The local answer is buffered until the decision: output of two models is never mixed.
        trace, tier_kwargs, children = self._begin(messages, kwargs, run_manager)
        call = _Call(messages, stop, trace, children, tier_kwargs)
        buffered: list[AIMessageChunk] = []
        local_message: BaseMessage | None = None
        if not self._run_precheck(trace, children):
            try:
                buffered = list(self._stream_tier("local", call))
                local_message = _tiers.aggregate(buffered)
            except Exception as error:  # noqa: BLE001 - any local failure escalates
                trace.local_failed(error)
            if not trace.after_local(local_message):
                self._emit(children, trace)
                yield from _replay(buffered, trace)
                return
        trace.escalating(local_message)
        if not trace.reserve_budget(local_message):
            if trace.local_fallback_needed(local_message):
                buffered = list(self._stream_tier("local", call))
                local_message = _tiers.aggregate(buffered)
            _require(local_message, trace)
            self._emit(children, trace)
            yield from _replay(buffered, trace)
            return
        self._emit(children, trace)
        cloud_chunks: list[AIMessageChunk] = []
        try:
            for chunk in self._stream_tier("cloud", call):
                cloud_chunks.append(chunk)
                yield ChatGenerationChunk(message=chunk)
        except Exception as error:
            if cloud_chunks:
                raise trace.partial_cloud_failure(
                    error, len(cloud_chunks), local_message
                ) from error
            if trace.retry_locally_after_cloud_failure(local_message):
                buffered = list(self._stream_tier("local", call))
                local_message = _tiers.aggregate(buffered)
            trace.cloud_fallback(error, local_message)  # returns only to fall back to local
            yield from _replay(buffered, trace)
            return
        cloud_message = _tiers.aggregate(cloud_chunks)
        trace.cloud_done(cloud_message)
        self._learn(trace, cloud_message)
        yield _routing_chunk(trace)

    # -- async stages -------------------------------------------------------------------------

    async def _arun_precheck(self, trace: RoutingTrace, children: ChildManager | None) -> bool:
        query = self._precheck_query(trace)
        if query is None:
            return False
        started = time.perf_counter()
        try:
            score = await self.precheck.ainvoke(query, _tiers.child_config(children, "precheck"))  # type: ignore[union-attr]
        except Exception as error:  # noqa: BLE001 - a failed probe never blocks the query
            return trace.precheck_failed(error)
        finally:
            trace.timed("precheck", started)
        return trace.precheck_done(score)

    async def _ainvoke_tier(self, tier: str, call: _Call) -> BaseMessage:
        model, timeout = self._tier(tier)
        config = _tiers.child_config(call.children, tier)

        async def attempt() -> BaseMessage:
            return await _tiers.acall_with_timeout(
                lambda: model.ainvoke(call.messages, config, stop=call.stop, **call.kwargs),  # type: ignore[union-attr]
                timeout,
                tier,
            )

        started = time.perf_counter()
        try:
            if tier == "cloud" and self.cloud_retry is not None:
                return await self.cloud_retry.acall(attempt)
            return await attempt()
        finally:
            call.trace.timed(tier, started)

    async def _astream_tier(self, tier: str, call: _Call) -> AsyncIterator[AIMessageChunk]:
        model, timeout = self._tier(tier)
        config = _tiers.child_config(call.children, tier)

        async def open_stream() -> tuple[AsyncIterator[Any], Any]:
            chunks = _tiers.aiterate_with_timeout(
                aiter(model.astream(call.messages, config, stop=call.stop, **call.kwargs)),  # type: ignore[union-attr]
                timeout,
                tier,
            )
            return chunks, await anext(chunks, None)

        started = time.perf_counter()
        try:
            if tier == "cloud" and self.cloud_retry is not None:
                chunks, first = await self.cloud_retry.acall(open_stream)
            else:
                chunks, first = await open_stream()
            if first is None:
                return
            yield _tiers.as_chunk(first)
            async for chunk in chunks:
                yield _tiers.as_chunk(chunk)
        finally:
            call.trace.timed(tier, started)

    async def _abuffer(self, call: _Call) -> list[AIMessageChunk]:
        return [chunk async for chunk in self._astream_tier("local", call)]

    # -- async entry points -------------------------------------------------------------------

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        trace, tier_kwargs, children = self._begin(messages, kwargs, run_manager)
        call = _Call(messages, stop, trace, children, tier_kwargs)
        local_message: BaseMessage | None = None
        if not await self._arun_precheck(trace, children):
            try:
                local_message = await self._ainvoke_tier("local", call)
            except Exception as error:  # noqa: BLE001 - any local failure escalates
                trace.local_failed(error)
            if not trace.after_local(local_message):
                await self._aemit(children, trace)
                return _result(local_message, trace)  # type: ignore[arg-type]
        trace.escalating(local_message)
        if not trace.reserve_budget(local_message):
            if trace.local_fallback_needed(local_message):
                local_message = await self._ainvoke_tier("local", call)
            await self._aemit(children, trace)
            return _result(_require(local_message, trace), trace)
        await self._aemit(children, trace)
        try:
            cloud_message = await self._ainvoke_tier("cloud", call)
        except Exception as error:  # noqa: BLE001 - on_cloud_error decides
            if trace.retry_locally_after_cloud_failure(local_message):
                local_message = await self._ainvoke_tier("local", call)
            return _result(trace.cloud_fallback(error, local_message), trace)
        trace.cloud_done(cloud_message)
        await self._alearn(trace, cloud_message)
        return _result(cloud_message, trace)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        trace, tier_kwargs, children = self._begin(messages, kwargs, run_manager)
        call = _Call(messages, stop, trace, children, tier_kwargs)
        buffered: list[AIMessageChunk] = []
        local_message: BaseMessage | None = None
        if not await self._arun_precheck(trace, children):
            try:
                buffered = await self._abuffer(call)
                local_message = _tiers.aggregate(buffered)
            except Exception as error:  # noqa: BLE001 - any local failure escalates
                trace.local_failed(error)
            if not trace.after_local(local_message):
                await self._aemit(children, trace)
                for generation in _replay(buffered, trace):
                    yield generation
                return
        trace.escalating(local_message)
        if not trace.reserve_budget(local_message):
            if trace.local_fallback_needed(local_message):
                buffered = await self._abuffer(call)
                local_message = _tiers.aggregate(buffered)
            _require(local_message, trace)
            await self._aemit(children, trace)
            for generation in _replay(buffered, trace):
                yield generation
            return
        await self._aemit(children, trace)
        cloud_chunks: list[AIMessageChunk] = []
        try:
            async for chunk in self._astream_tier("cloud", call):
                cloud_chunks.append(chunk)
                yield ChatGenerationChunk(message=chunk)
        except Exception as error:
            if cloud_chunks:
                raise trace.partial_cloud_failure(
                    error, len(cloud_chunks), local_message
                ) from error
            if trace.retry_locally_after_cloud_failure(local_message):
                buffered = await self._abuffer(call)
                local_message = _tiers.aggregate(buffered)
            trace.cloud_fallback(error, local_message)  # returns only to fall back to local
            for generation in _replay(buffered, trace):
                yield generation
            return
        cloud_message = _tiers.aggregate(cloud_chunks)
        trace.cloud_done(cloud_message)
        await self._alearn(trace, cloud_message)
        yield _routing_chunk(trace)

    async def _alearn(self, trace: RoutingTrace, cloud_message: BaseMessage) -> None:
        # Chroma's client is synchronous: keep it off the event loop.
        if self.knowledge_store is not None and self.learn_from_escalations:
            await asyncio.to_thread(self._learn, trace, cloud_message)

    # -- tracing ------------------------------------------------------------------------------

    @staticmethod
    def _emit(children: ChildManager | None, trace: RoutingTrace) -> None:
        if isinstance(children, CallbackManager):
            children.on_custom_event(
                "routing_decision", trace.decision_event(), run_id=children.parent_run_id
            )

    @staticmethod
    async def _aemit(children: ChildManager | None, trace: RoutingTrace) -> None:
        if isinstance(children, AsyncCallbackManager):
            await children.on_custom_event(
                "routing_decision", trace.decision_event(), run_id=children.parent_run_id
            )

    # -- streaming entry points (to trace children in the stream path) -----------------------

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        config = ensure_config(config)
        run_id = config.get("run_id") or uuid.uuid4()
        token = STREAM_CHILDREN.set(_tiers.stream_children(config, run_id, CallbackManager))
        try:
            # _stream reads the context variable before its first chunk; reset right after so
            # nothing leaks into the caller's context between chunks.
            chunks = super().stream(input, {**config, "run_id": run_id}, stop=stop, **kwargs)
            first = next(chunks, None)
        finally:
            STREAM_CHILDREN.reset(token)
        if first is not None:
            yield first
            yield from chunks

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
        try:
            chunks = super().astream(input, {**config, "run_id": run_id}, stop=stop, **kwargs)
            first = await anext(chunks, None)
        finally:
            STREAM_CHILDREN.reset(token)
        if first is not None:
            yield first
            async for chunk in chunks:
                yield chunk


class _Call:
    """The arguments every stage of one call needs."""

    __slots__ = ("children", "kwargs", "messages", "stop", "trace")

    def __init__(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        trace: RoutingTrace,
        children: ChildManager | None,
        kwargs: dict[str, Any],
    ) -> None:
        self.messages = messages
        self.stop = stop
        self.trace = trace
        self.children = children
        self.kwargs = kwargs


def _require(message: BaseMessage | None, trace: RoutingTrace) -> BaseMessage:
    """The local answer to serve when escalation was refused; fails if there is none."""
    if message is None:
        from confidence_router.errors import LocalModelError

        raise LocalModelError(
            f"local model failed ({trace.record.get('local_error')}) and "
            f"{trace.record.get('escalation_skipped', 'escalation was refused')}"
        ) from trace.local_error
    return message


def _result(message: BaseMessage, trace: RoutingTrace) -> ChatResult:
    routing = trace.finish()
    return ChatResult(
        generations=[ChatGeneration(message=_tiers.attach(message, routing))],
        llm_output={"routing": routing},
    )


def _routing_chunk(trace: RoutingTrace) -> ChatGenerationChunk:
    return ChatGenerationChunk(
        message=AIMessageChunk(
            content="", response_metadata={"routing": trace.finish()}, chunk_position="last"
        )
    )


def _replay(chunks: Sequence[AIMessageChunk], trace: RoutingTrace) -> Iterator[ChatGenerationChunk]:
    """The buffered local chunks, then the routing record.

    BaseChatModel.stream() reports each chunk to the callbacks itself.
    """
    for chunk in chunks:
        yield ChatGenerationChunk(message=chunk)
    yield _routing_chunk(trace)
