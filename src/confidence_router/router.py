"""``ConfidenceRoutedLLM``: a LangChain chat model that answers locally and escalates to the cloud
when the local answer's zero-shot confidence is below a threshold.

This is the LangChain layer. The decision itself lives in :mod:`confidence_router.policy` and the
signals in :mod:`confidence_router.signals`; this module only calls the two tiers, times them,
and records the decision in ``response_metadata["routing"]``.
"""

from __future__ import annotations

import contextvars
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
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig, ensure_config
from langchain_core.tools import BaseTool
from pydantic import ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from confidence_router.settings import RouterSettings

from confidence_router.errors import CloudEscalationError, LocalModelError, RoutingConfigError
from confidence_router.extraction import message_token_logprobs
from confidence_router.policy import (
    REASON_LOCAL_ERROR,
    REASON_PRECHECK,
    Decision,
    RoutingPolicy,
    decide_after_generation,
    decide_precheck,
)
from confidence_router.signals import UNKNOWN_EMPTY_ANSWER, compute_signals, unknown_signals

ChatRunnable = Runnable[LanguageModelInput, BaseMessage]

#: Reason recorded when the cloud failed and the local answer was returned (flagged).
REASON_CLOUD_ERROR = "cloud_error"


def _with_logprobs(model: Any) -> Any:
    """Return ``model`` set up to report per-token logprobs.

    ``ChatOllama`` and ``ChatOpenAI`` both expose a ``logprobs`` field; when it is unset we take
    a cheap copy with it switched on (``model_copy`` shares the HTTP clients). A ``bind()`` /
    ``bind_tools()`` wrapper is unwrapped and rewrapped. Other models are returned unchanged:
    their confidence is then unknown, and the ``on_unknown`` policy applies.
    """
    if isinstance(model, RunnableBinding):
        inner = _with_logprobs(model.bound)
        return model if inner is model.bound else model.model_copy(update={"bound": inner})
    model_fields = getattr(type(model), "model_fields", {})
    if "logprobs" in model_fields and not getattr(model, "logprobs", None):
        return model.model_copy(update={"logprobs": True})
    return model


def _usage(message: BaseMessage | None) -> dict[str, Any] | None:
    usage = getattr(message, "usage_metadata", None)
    return dict(usage) if usage else None


ChildManager = CallbackManager | AsyncCallbackManager

# The stream path of BaseChatModel (langchain-core 1.x) does not pass ``run_manager`` to
# ``_stream``; ``stream()``/``astream()`` below put the child-run manager here instead.
_STREAM_CHILDREN: contextvars.ContextVar[ChildManager | None] = contextvars.ContextVar(
    "confidence_router_stream_children", default=None
)


def _child_manager(
    run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None,
) -> ChildManager | None:
    """A callback manager whose runs are children of the router's run (for tracing).

    ``CallbackManagerForLLMRun`` has no ``get_child()``; we build the child manager by hand from
    the run's inheritable handlers, tags and metadata.
    """
    if run_manager is None:
        return _STREAM_CHILDREN.get()
    manager_cls = (
        AsyncCallbackManager
        if isinstance(run_manager, AsyncCallbackManagerForLLMRun)
        else CallbackManager
    )
    manager = manager_cls(handlers=[], parent_run_id=run_manager.run_id)
    manager.set_handlers(list(run_manager.inheritable_handlers), inherit=True)
    manager.add_tags(list(run_manager.inheritable_tags), inherit=True)
    manager.add_metadata(dict(run_manager.inheritable_metadata), inherit=True)
    return manager


def _stream_children(
    config: RunnableConfig, run_id: uuid.UUID, manager_cls: type[ChildManager]
) -> ChildManager:
    """The child-run manager for a streamed call whose run id is fixed in advance."""
    manager = manager_cls.configure(
        config.get("callbacks"), None, False, config.get("tags"), None, config.get("metadata")
    )
    manager.parent_run_id = run_id
    return manager


def _child_config(children: ChildManager | None, *, name: str, tag: str) -> RunnableConfig:
    """Config for one tier's call: a named, tagged child run of the router's run."""
    config: RunnableConfig = {"run_name": name, "tags": [tag]}
    if children is not None:
        config["callbacks"] = children
    return config


class _Trace:
    """Accumulates the routing record of one call (what ends up in ``routing`` metadata)."""

    def __init__(self, policy: RoutingPolicy, has_cloud: bool) -> None:
        self.policy = policy
        self.has_cloud = has_cloud
        self.started = time.perf_counter()
        self.local_error: BaseException | None = None
        self.record: dict[str, Any] = {
            "decision": "local",
            "reason": None,
            "confidence": None,
            "threshold": policy.threshold,
            "signal": policy.signal,
            "policy": dict(policy.__dict__),
            "signals": None,
            "latency_s": {},
            "usage": {},
            "escalated": False,
            "would_escalate": False,
            "flagged": False,
        }

    def timed(self, stage: str, started: float) -> None:
        self.record["latency_s"][stage] = time.perf_counter() - started

    def local_done(self, message: BaseMessage) -> Decision:
        tokens = message_token_logprobs(message)
        if tokens == [] and not message.text.strip():
            # An empty answer has no tokens to score; say so rather than "no logprobs".
            signals = unknown_signals(UNKNOWN_EMPTY_ANSWER)
        else:
            signals = compute_signals(None if tokens is None else [t.logprob for t in tokens])
        decision = decide_after_generation(self.policy, signals)
        self.record["signals"] = signals.as_dict()
        self.record["confidence"] = decision.score
        self.record["reason"] = decision.reason
        self.record["usage"]["local"] = _usage(message)
        return decision

    def local_failed(self, error: BaseException) -> None:
        self.record["reason"] = REASON_LOCAL_ERROR
        self.record["local_error"] = f"{type(error).__name__}: {error}"
        self.local_error = error

    def after_local(self, message: BaseMessage | None) -> bool:
        """Decide after local generation; True means escalate to the cloud."""
        escalate = message is None or self.local_done(message).escalate
        if escalate and self.escalation_blocked():
            if message is None:
                raise LocalModelError(_local_failure_text(self)) from self.local_error
            return False
        return escalate

    def precheck_done(self, score: Any) -> bool:
        """Record the probe's score; True means escalate without generating locally."""
        p_yes = float(score.p_yes)
        decision = decide_precheck(self.policy, p_yes)
        self.record["precheck"] = {
            "p_yes": p_yes,
            "threshold": self.policy.precheck_threshold,
            "escalate": decision.escalate,
            "extraction_mode": getattr(score, "extraction_mode", None),
            "had_retrieval": getattr(score, "had_retrieval", None),
            "n_hits_used": getattr(score, "n_hits_used", None),
            "prompt_version": getattr(score, "prompt_version", None),
        }
        if not decision.escalate or self.escalation_blocked():
            return False
        self.record["reason"] = REASON_PRECHECK
        return True

    def precheck_failed(self, error: BaseException) -> bool:
        self.record["precheck"] = {"error": f"{type(error).__name__}: {error}"}
        return False

    def retry_locally_after(self, error: BaseException, local_message: BaseMessage | None) -> bool:
        """After a cloud failure: generate locally now? Only when the pre-check skipped local
        generation and the policy accepts a local answer (the request is never lost)."""
        return (
            local_message is None
            and self.record["reason"] == REASON_PRECHECK
            and self.policy.on_cloud_error == "local"
        )

    def escalation_blocked(self) -> bool:
        """True when the decision says escalate but the query must stay local."""
        self.record["would_escalate"] = True
        if self.policy.allow_escalation and self.has_cloud:
            return False
        self.record["flagged"] = True
        self.record["escalation_skipped"] = (
            "allow_escalation=False" if not self.policy.allow_escalation else "no cloud configured"
        )
        return True

    def escalating(self, local_message: BaseMessage | None) -> None:
        self.record["decision"] = "cloud"
        self.record["escalated"] = True
        if local_message is not None:
            self.record["local_answer"] = local_message.text

    def cloud_done(self, message: BaseMessage) -> None:
        self.record["usage"]["cloud"] = _usage(message)

    def cloud_failed(self, error: BaseException) -> None:
        self.record["cloud_error"] = f"{type(error).__name__}: {error}"

    def finish(self) -> dict[str, Any]:
        self.record["latency_s"]["total"] = time.perf_counter() - self.started
        return self.record


def _attach(message: BaseMessage, routing: dict[str, Any]) -> AIMessage:
    """The chosen tier's message with the routing record added to its response metadata."""
    metadata = {**message.response_metadata, "routing": routing}
    if isinstance(message, AIMessage):
        return message.model_copy(update={"response_metadata": metadata})
    return AIMessage(content=message.content, response_metadata=metadata)


def _as_chunk(message: BaseMessage) -> AIMessageChunk:
    if isinstance(message, AIMessageChunk):
        return message
    if isinstance(message, AIMessage):
        return AIMessageChunk(
            content=message.content,
            id=message.id,
            response_metadata=message.response_metadata,
            usage_metadata=message.usage_metadata,
            tool_call_chunks=[
                {"name": tc["name"], "args": _json(tc["args"]), "id": tc["id"], "index": i}
                for i, tc in enumerate(message.tool_calls)
            ],
        )
    return AIMessageChunk(content=message.content)


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


def _aggregate(chunks: Sequence[AIMessageChunk]) -> AIMessageChunk:
    if not chunks:
        return AIMessageChunk(content="")
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


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
    ``precheck_threshold``, ``allow_escalation``) can be passed as an invoke/bind kwarg, or made
    configurable with ``configurable_fields``.
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

    precheck: Runnable[Any, Any] | None = None
    """Optional pre-generation stage, normally a
    :class:`~confidence_router.probe.SelfAssessmentProbe` (GSA v3): when its P(YES) is below
    ``precheck_threshold`` the query goes to the cloud without local generation."""

    knowledge_store: Any = None
    """A :class:`~confidence_router.knowledge.KnowledgeStore` for learning from escalations."""

    learn_from_escalations: bool = False
    """Opt-in: store each escalated question with the cloud's answer in ``knowledge_store``,
    so later self-assessments can retrieve it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    @model_validator(mode="after")
    def _setup(self) -> ConfidenceRoutedLLM:
        self._base_policy()  # validate the knobs once, at construction
        object.__setattr__(self, "local", _with_logprobs(self.local))
        return self

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

        local = self.local.bound if isinstance(self.local, RunnableBinding) else self.local
        cloud = self.cloud.bound if isinstance(self.cloud, RunnableBinding) else self.cloud
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
            "local": _model_name(self.local),
            "cloud": _model_name(self.cloud) if self.cloud is not None else None,
            **self._base_policy().__dict__,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "confidence-router"
        params["ls_model_name"] = kwargs.get("model") or _model_name(self.local)
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
        update: dict[str, Any] = {"local": _bind_tools(self.local, tools, tier_kwargs)}
        if self.cloud is not None:
            update["cloud"] = _bind_tools(self.cloud, tools, tier_kwargs)
        # Always a RunnableBinding, as LangChain's bind_tools contract expects.
        return self.model_copy(update=update).bind(**kwargs)

    # -- policy -------------------------------------------------------------------------------

    def _base_policy(self) -> RoutingPolicy:
        return RoutingPolicy(
            threshold=self.threshold,
            signal=self.signal,
            on_unknown=self.on_unknown,
            on_cloud_error=self.on_cloud_error,
            precheck_threshold=self.precheck_threshold,
            allow_escalation=self.allow_escalation,
        )

    def _split_kwargs(self, kwargs: dict[str, Any]) -> tuple[RoutingPolicy, dict[str, Any]]:
        """Pop the router's own knobs from call kwargs; the rest goes to both tiers."""
        knobs = RoutingPolicy.knob_names()
        overrides = {k: kwargs[k] for k in knobs if k in kwargs}
        rest = {k: v for k, v in kwargs.items() if k not in knobs}
        return self._base_policy().with_overrides(overrides), rest

    # -- stages shared by the four entry points ------------------------------------------------

    def _begin(
        self,
        kwargs: dict[str, Any],
        run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None,
    ) -> tuple[_Trace, dict[str, Any], ChildManager | None]:
        policy, tier_kwargs = self._split_kwargs(kwargs)
        return _Trace(policy, self.cloud is not None), tier_kwargs, _child_manager(run_manager)

    def _precheck_input(self, messages: list[BaseMessage], trace: _Trace) -> str | None:
        """The query for the pre-generation probe, or ``None`` when there is no probe."""
        if self.precheck is None:
            return None
        return _last_user_text(messages) or None

    def _learn(self, messages: list[BaseMessage], trace: _Trace, cloud_message: BaseMessage) -> None:
        """Store the cloud answer to an escalated query as knowledge (opt-in)."""
        if self.knowledge_store is None or not self.learn_from_escalations:
            return
        question, answer = _last_user_text(messages), cloud_message.text.strip()
        if not question or not answer:
            return
        try:
            self.knowledge_store.add(
                question,
                answer,
                source="cloud_escalation",
                provenance={
                    "model": _model_name(self.cloud),
                    "reason": trace.record["reason"],
                    "confidence": trace.record["confidence"],
                },
            )
            trace.record["learned"] = True
        except Exception as error:  # noqa: BLE001 - never lose the answer over a storage error
            trace.record["learned"] = False
            trace.record["learn_error"] = f"{type(error).__name__}: {error}"

    # -- sync ---------------------------------------------------------------------------------

    def _run_precheck(self, query: str | None, trace: _Trace, children: ChildManager | None) -> bool:
        if query is None:
            return False
        started = time.perf_counter()
        try:
            score = self.precheck.invoke(  # type: ignore[union-attr]
                query, _child_config(children, name="precheck", tag="route:precheck")
            )
        except Exception as error:  # noqa: BLE001 - a failed probe never blocks the query
            trace.timed("precheck", started)
            return trace.precheck_failed(error)
        trace.timed("precheck", started)
        return trace.precheck_done(score)

    def _invoke_tier(
        self,
        tier: str,
        messages: list[BaseMessage],
        stop: list[str] | None,
        trace: _Trace,
        children: ChildManager | None,
        tier_kwargs: dict[str, Any],
    ) -> BaseMessage:
        model = self.local if tier == "local" else self.cloud
        started = time.perf_counter()
        try:
            return model.invoke(  # type: ignore[union-attr]
                messages, _child_config(children, **_TIER_RUNS[tier]), stop=stop, **tier_kwargs
            )
        finally:
            trace.timed(tier, started)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        trace, tier_kwargs, children = self._begin(kwargs, run_manager)
        call = (messages, stop, trace, children, tier_kwargs)
        local_message: BaseMessage | None = None
        if not self._run_precheck(self._precheck_input(messages, trace), trace, children):
            try:
                local_message = self._invoke_tier("local", *call)
            except Exception as error:  # noqa: BLE001 - any local failure escalates
                trace.local_failed(error)
            if not trace.after_local(local_message):
                self._emit(children, trace)
                return _result(local_message, trace)  # type: ignore[arg-type]
        trace.escalating(local_message)
        self._emit(children, trace)
        try:
            cloud_message = self._invoke_tier("cloud", *call)
        except Exception as error:  # noqa: BLE001 - on_cloud_error decides
            if trace.retry_locally_after(error, local_message):
                local_message = self._invoke_tier("local", *call)
            return _result(_cloud_failure(trace, error, local_message), trace)
        trace.cloud_done(cloud_message)
        self._learn(messages, trace, cloud_message)
        return _result(cloud_message, trace)

    def _stream_tier(
        self,
        tier: str,
        messages: list[BaseMessage],
        stop: list[str] | None,
        trace: _Trace,
        children: ChildManager | None,
        tier_kwargs: dict[str, Any],
    ) -> Iterator[AIMessageChunk]:
        model = self.local if tier == "local" else self.cloud
        started = time.perf_counter()
        try:
            for chunk in model.stream(  # type: ignore[union-attr]
                messages, _child_config(children, **_TIER_RUNS[tier]), stop=stop, **tier_kwargs
            ):
                yield _as_chunk(chunk)
        finally:
            trace.timed(tier, started)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # The local answer is buffered until the decision: output of two models is never mixed.
        trace, tier_kwargs, children = self._begin(kwargs, run_manager)
        call = (messages, stop, trace, children, tier_kwargs)
        buffered: list[AIMessageChunk] = []
        local_message: BaseMessage | None = None
        if not self._run_precheck(self._precheck_input(messages, trace), trace, children):
            try:
                buffered = list(self._stream_tier("local", *call))
                local_message = _aggregate(buffered)
            except Exception as error:  # noqa: BLE001 - any local failure escalates
                trace.local_failed(error)
            if not trace.after_local(local_message):
                self._emit(children, trace)
                yield from _replay(buffered)
                yield _routing_chunk(trace)
                return
        trace.escalating(local_message)
        self._emit(children, trace)
        cloud_chunks: list[AIMessageChunk] = []
        try:
            for chunk in self._stream_tier("cloud", *call):
                cloud_chunks.append(chunk)
                yield ChatGenerationChunk(message=chunk)
        except Exception as error:  # noqa: BLE001 - on_cloud_error decides
            _raise_if_partial(trace, error, cloud_chunks, local_message)
            if trace.retry_locally_after(error, local_message):
                buffered = list(self._stream_tier("local", *call))
                local_message = _aggregate(buffered)
            # Returns only when the policy falls back to the (buffered) local answer.
            _cloud_failure(trace, error, local_message)
            yield from _replay(buffered)
            yield _routing_chunk(trace)
            return
        cloud_message = _aggregate(cloud_chunks)
        trace.cloud_done(cloud_message)
        self._learn(messages, trace, cloud_message)
        yield _routing_chunk(trace)

    # -- async --------------------------------------------------------------------------------

    async def _arun_precheck(
        self, query: str | None, trace: _Trace, children: ChildManager | None
    ) -> bool:
        if query is None:
            return False
        started = time.perf_counter()
        try:
            score = await self.precheck.ainvoke(  # type: ignore[union-attr]
                query, _child_config(children, name="precheck", tag="route:precheck")
            )
        except Exception as error:  # noqa: BLE001 - a failed probe never blocks the query
            trace.timed("precheck", started)
            return trace.precheck_failed(error)
        trace.timed("precheck", started)
        return trace.precheck_done(score)

    async def _ainvoke_tier(
        self,
        tier: str,
        messages: list[BaseMessage],
        stop: list[str] | None,
        trace: _Trace,
        children: ChildManager | None,
        tier_kwargs: dict[str, Any],
    ) -> BaseMessage:
        model = self.local if tier == "local" else self.cloud
        started = time.perf_counter()
        try:
            return await model.ainvoke(  # type: ignore[union-attr]
                messages, _child_config(children, **_TIER_RUNS[tier]), stop=stop, **tier_kwargs
            )
        finally:
            trace.timed(tier, started)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        trace, tier_kwargs, children = self._begin(kwargs, run_manager)
        call = (messages, stop, trace, children, tier_kwargs)
        local_message: BaseMessage | None = None
        if not await self._arun_precheck(self._precheck_input(messages, trace), trace, children):
            try:
                local_message = await self._ainvoke_tier("local", *call)
            except Exception as error:  # noqa: BLE001 - any local failure escalates
                trace.local_failed(error)
            if not trace.after_local(local_message):
                await self._aemit(children, trace)
                return _result(local_message, trace)  # type: ignore[arg-type]
        trace.escalating(local_message)
        await self._aemit(children, trace)
        try:
            cloud_message = await self._ainvoke_tier("cloud", *call)
        except Exception as error:  # noqa: BLE001 - on_cloud_error decides
            if trace.retry_locally_after(error, local_message):
                local_message = await self._ainvoke_tier("local", *call)
            return _result(_cloud_failure(trace, error, local_message), trace)
        trace.cloud_done(cloud_message)
        await _to_thread_if_store(self, messages, trace, cloud_message)
        return _result(cloud_message, trace)

    async def _astream_tier(
        self,
        tier: str,
        messages: list[BaseMessage],
        stop: list[str] | None,
        trace: _Trace,
        children: ChildManager | None,
        tier_kwargs: dict[str, Any],
    ) -> AsyncIterator[AIMessageChunk]:
        model = self.local if tier == "local" else self.cloud
        started = time.perf_counter()
        try:
            async for chunk in model.astream(  # type: ignore[union-attr]
                messages, _child_config(children, **_TIER_RUNS[tier]), stop=stop, **tier_kwargs
            ):
                yield _as_chunk(chunk)
        finally:
            trace.timed(tier, started)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        trace, tier_kwargs, children = self._begin(kwargs, run_manager)
        call = (messages, stop, trace, children, tier_kwargs)
        buffered: list[AIMessageChunk] = []
        local_message: BaseMessage | None = None
        if not await self._arun_precheck(self._precheck_input(messages, trace), trace, children):
            try:
                buffered = [chunk async for chunk in self._astream_tier("local", *call)]
                local_message = _aggregate(buffered)
            except Exception as error:  # noqa: BLE001 - any local failure escalates
                trace.local_failed(error)
            if not trace.after_local(local_message):
                await self._aemit(children, trace)
                for generation in _replay(buffered):
                    yield generation
                yield _routing_chunk(trace)
                return
        trace.escalating(local_message)
        await self._aemit(children, trace)
        cloud_chunks: list[AIMessageChunk] = []
        try:
            async for chunk in self._astream_tier("cloud", *call):
                cloud_chunks.append(chunk)
                yield ChatGenerationChunk(message=chunk)
        except Exception as error:  # noqa: BLE001 - on_cloud_error decides
            _raise_if_partial(trace, error, cloud_chunks, local_message)
            if trace.retry_locally_after(error, local_message):
                buffered = [chunk async for chunk in self._astream_tier("local", *call)]
                local_message = _aggregate(buffered)
            _cloud_failure(trace, error, local_message)
            for generation in _replay(buffered):
                yield generation
            yield _routing_chunk(trace)
            return
        cloud_message = _aggregate(cloud_chunks)
        trace.cloud_done(cloud_message)
        await _to_thread_if_store(self, messages, trace, cloud_message)
        yield _routing_chunk(trace)

    # -- tracing ------------------------------------------------------------------------------

    @staticmethod
    def _emit(children: ChildManager | None, trace: _Trace) -> None:
        if isinstance(children, CallbackManager):
            children.on_custom_event(
                "routing_decision", _decision_event(trace), run_id=children.parent_run_id
            )

    @staticmethod
    async def _aemit(children: ChildManager | None, trace: _Trace) -> None:
        if isinstance(children, AsyncCallbackManager):
            await children.on_custom_event(
                "routing_decision", _decision_event(trace), run_id=children.parent_run_id
            )

    # -- streaming entry points ---------------------------------------------------------------

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
        token = _STREAM_CHILDREN.set(_stream_children(config, run_id, CallbackManager))
        try:
            # _stream reads the context variable before its first chunk; reset right after so
            # nothing leaks into the caller's context between chunks.
            chunks = super().stream(input, {**config, "run_id": run_id}, stop=stop, **kwargs)
            first = next(chunks, None)
        finally:
            _STREAM_CHILDREN.reset(token)
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
        token = _STREAM_CHILDREN.set(_stream_children(config, run_id, AsyncCallbackManager))
        try:
            chunks = super().astream(input, {**config, "run_id": run_id}, stop=stop, **kwargs)
            first = await anext(chunks, None)
        finally:
            _STREAM_CHILDREN.reset(token)
        if first is not None:
            yield first
            async for chunk in chunks:
                yield chunk


def _decision_event(trace: _Trace) -> dict[str, Any]:
    keys = ("decision", "reason", "confidence", "threshold", "signal", "would_escalate")
    return {k: trace.record.get(k) for k in keys}


def _model_name(model: Any) -> str:
    if isinstance(model, RunnableBinding):
        return _model_name(model.bound)
    for attr in ("model", "model_id", "model_name"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    return type(model).__name__


def _bind_tools(model: Any, tools: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    target = model.bound if isinstance(model, RunnableBinding) else model
    if not hasattr(target, "bind_tools"):
        raise TypeError(f"{type(target).__name__} does not support bind_tools")
    bound = target.bind_tools(tools, **kwargs)
    if isinstance(model, RunnableBinding) and model.kwargs:
        bound = bound.bind(**model.kwargs)
    return bound


def _local_failure_text(trace: _Trace) -> str:
    why = trace.record.get("escalation_skipped", "escalation not possible")
    return f"local model failed ({trace.record.get('local_error')}) and {why}"


def _cloud_failure(
    trace: _Trace,
    error: Exception,
    local_message: BaseMessage | None,
) -> BaseMessage:
    """Apply ``on_cloud_error``: raise, or fall back to the local answer (flagged)."""
    trace.cloud_failed(error)
    if trace.policy.on_cloud_error == "local" and local_message is not None:
        trace.record.update(decision="local", reason=REASON_CLOUD_ERROR, flagged=True)
        return local_message
    routing = trace.finish()
    if local_message is None:
        message = f"local model failed ({routing.get('local_error')}) and cloud failed: {error}"
    else:
        message = f"cloud model failed on an escalated query ({routing['reason']}): {error}"
    raise CloudEscalationError(message, routing=routing, local_message=local_message) from error


def _result(message: BaseMessage, trace: _Trace) -> ChatResult:
    routing = trace.finish()
    return ChatResult(
        generations=[ChatGeneration(message=_attach(message, routing))],
        llm_output={"routing": routing},
    )


def _routing_chunk(trace: _Trace) -> ChatGenerationChunk:
    return ChatGenerationChunk(
        message=AIMessageChunk(
            content="", response_metadata={"routing": trace.finish()}, chunk_position="last"
        )
    )


def _replay(chunks: Sequence[AIMessageChunk]) -> Iterator[ChatGenerationChunk]:
    # BaseChatModel.stream() reports each chunk to the callbacks itself.
    for chunk in chunks:
        yield ChatGenerationChunk(message=chunk)


#: Run name and tag of each tier's child run (what a trace viewer shows).
_TIER_RUNS: dict[str, dict[str, str]] = {
    "local": {"name": "local", "tag": "route:local-attempt"},
    "cloud": {"name": "cloud", "tag": "route:escalated"},
}


def _last_user_text(messages: Sequence[BaseMessage]) -> str:
    for message in reversed(messages):
        if message.type == "human":
            return message.text.strip()
    return ""


def _raise_if_partial(
    trace: _Trace,
    error: Exception,
    cloud_chunks: Sequence[AIMessageChunk],
    local_message: BaseMessage | None,
) -> None:
    """Part of the cloud answer is already out: falling back to the local one would mix two
    models' text, so this is always an error."""
    if not cloud_chunks:
        return
    trace.cloud_failed(error)
    raise CloudEscalationError(
        f"cloud stream failed after {len(cloud_chunks)} chunks: {error}",
        routing=trace.finish(),
        local_message=local_message,
    ) from error


async def _to_thread_if_store(
    router: ConfidenceRoutedLLM,
    messages: list[BaseMessage],
    trace: _Trace,
    cloud_message: BaseMessage,
) -> None:
    # Chroma's client is synchronous: keep it off the event loop.
    if router.knowledge_store is not None and router.learn_from_escalations:
        import asyncio

        await asyncio.to_thread(router._learn, messages, trace, cloud_message)
