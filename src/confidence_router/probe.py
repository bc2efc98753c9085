"""The GSA self-assessment probe as a LangChain Runnable.

:class:`SelfAssessmentProbe` asks a chat model, before any answer is generated, whether it is
confident it can answer a query ("Respond with exactly one token: YES or NO.") and returns a
:class:`~confidence_router.gsa.GsaScore` whose ``p_yes`` is the confidence (higher = the local
answer is more likely correct). With a :class:`~confidence_router.knowledge.KnowledgeStore` and
the default ``gsa-v3-retrieval-conditional`` version, strong hits (cosine ``>= tau``) are shown
to the model; otherwise the prompt is byte-identical to the bare ``gsa-v2-confidence`` prompt.

Usage::

    from langchain_ollama import ChatOllama
    from confidence_router.probe import SelfAssessmentProbe

    local = ChatOllama(model="qwen2.5:7b")            # your answering model, untouched
    probe = SelfAssessmentProbe(model=local, store=store)   # store: KnowledgeStore or None
    score = probe.invoke("What is the capital of France?")
    score.p_yes, score.extraction_mode, score.had_retrieval, score.latency_s

    # pre-computed hits (e.g. the same top-5 used for knowledge similarity): no second search
    probe.invoke({"query": "What is the capital of France?", "hits": hits})

Model handling:

* A ``ChatOllama`` is **copied** with ``temperature=0, num_predict=1, logprobs=True,
  top_logprobs=5``. Per-call kwargs cannot be used for this: ChatOllama forwards unknown invoke
  kwargs to the ``ollama`` client (``num_predict`` raises ``TypeError``; ``options={...}``
  replaces all options), and the caller's answering instance must keep its own settings.
* Any other chat model (or Runnable returning a message or a string) is invoked as given;
  configure it for a short, deterministic answer yourself (e.g. ``temperature=0,
  max_tokens=1`` on Bedrock). Without logprobs (Bedrock has none) the ``text_hard`` tier
  reads YES/NO from the text.

The probe sends one user message and no system prompt (docs/how-it-works.md §2.3).
"""

from __future__ import annotations

import math
import numbers
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForChainRun, CallbackManagerForChainRun
from langchain_core.messages import HumanMessage
from langchain_core.runnables import (
    Runnable,
    RunnableBinding,
    RunnableConfig,
    RunnableSerializable,
)
from langchain_core.runnables.config import patch_config
from pydantic import ConfigDict, PrivateAttr, ValidationError, field_validator

from confidence_router.errors import InvalidArgumentError, InvalidTypeError, RoutingConfigError
from confidence_router.extraction import message_text
from confidence_router.gsa import (
    DEFAULT_GSA_VERSION,
    DEFAULT_TAU,
    GSA_VERSIONS,
    MAX_HITS_USED,
    RETRIEVAL_CONDITIONAL_VERSIONS,
    GsaPrompt,
    GsaScore,
    Hit,
    build_gsa_prompt,
    check_query,
    check_tau,
    extract_p_yes,
)
from confidence_router.knowledge import KnowledgeStore
from confidence_router.tier_clients import per_loop

__all__ = [
    "PROBE_TOP_LOGPROBS",
    "ProbeInput",
    "SelfAssessmentProbe",
    "first_position_top_logprobs",
    "message_text",
    "prepare_probe_model",
]

#: ``top_logprobs`` requested for the probe's single generated token.
PROBE_TOP_LOGPROBS = 5

ProbeInput = str | Mapping[str, Any]


def prepare_probe_model(model: Runnable[Any, Any]) -> Runnable[Any, Any]:
    """Return the instance the probe should call.

    A ``ChatOllama`` becomes a copy with the probe settings (T = 0, one token, top-5
    logprobs, no thinking, no output ``format``); a ``bind()``/``bind_tools()`` wrapper around
    one is dropped (the probe sends one user message: no tools, which a model could answer
    with a tool call instead of YES/NO). Anything else is returned unchanged.
    """
    # Only a model whose class was already imported can be a ChatOllama, so look it up in
    # sys.modules instead of importing langchain_ollama (~1.4 s) for every probe.
    module = sys.modules.get("langchain_ollama")
    chat_ollama = getattr(module, "ChatOllama", None) if module is not None else None
    inner = model
    while isinstance(inner, RunnableBinding):
        inner = inner.bound
    if chat_ollama is not None and isinstance(inner, chat_ollama):
        update: dict[str, Any] = {
            "temperature": 0.0,
            "num_predict": 1,
            "logprobs": True,
            "top_logprobs": PROBE_TOP_LOGPROBS,
        }
        # A one-token probe cannot think first: with thinking on, its single token would be
        # a thinking token and the answer empty (an unreadable, "neutral" probe).
        if getattr(inner, "reasoning", None):
            update["reasoning"] = False
        # A JSON format/schema forces "{" as the first token instead of YES/NO.
        if getattr(inner, "format", None) is not None:
            update["format"] = None
        # model_copy(update=...) skips validation; both logprob fields are set so the
        # "top_logprobs without logprobs" warning/validation path is irrelevant.
        copied: Runnable[Any, Any] = inner.model_copy(update=update)
        return copied
    return model


def _field(item: Any, name: str) -> Any:
    if isinstance(item, Mapping):
        return item.get(name)
    return getattr(item, name, None)


def first_position_top_logprobs(message: Any) -> list[Any] | None:
    """The top-logprob alternatives of the first generated token, or ``None``.

    Looks in ``message.response_metadata["logprobs"]``:

    * Ollama / ChatOllama: a list with one item per generated token, each with
      ``top_logprobs`` (items are ``ollama`` pydantic objects or dicts);
    * OpenAI style: ``{"content": [{"token", "logprob", "top_logprobs": [...]}, ...]}``.
    """
    metadata = getattr(message, "response_metadata", None)
    if not isinstance(metadata, Mapping):
        return None
    logprobs = metadata.get("logprobs")
    first: Any = None
    if isinstance(logprobs, Mapping):
        content = logprobs.get("content")
        if isinstance(content, Sequence) and not isinstance(content, str) and content:
            first = content[0]
    elif isinstance(logprobs, Sequence) and not isinstance(logprobs, str) and logprobs:
        first = logprobs[0]
    if first is None:
        return None
    top = _field(first, "top_logprobs")
    if top is None or isinstance(top, str):
        return None
    top_list = list(top)
    return top_list or None


def _parse_hit(index: int, item: Any) -> Hit:
    """One given hit: a :class:`Hit`, or a mapping with ``content``/``score``/``question``."""
    if isinstance(item, Hit):
        return item
    if not isinstance(item, Mapping):
        raise InvalidTypeError(f"hits[{index}]: unsupported hit type {type(item).__name__}")
    content = item.get("content")
    # str(None) once injected the text "None" as knowledge: a hit's content must be text.
    if not isinstance(content, str):
        raise InvalidTypeError(
            f"hits[{index}]['content'] must be a str, got {type(content).__name__}"
        )
    score = item.get("score")
    if score is not None and (
        isinstance(score, bool) or not isinstance(score, numbers.Real) or math.isnan(score)
    ):
        # A score of "0.9" (a string) or NaN would silently count as "no score" (never strong).
        raise InvalidTypeError(f"hits[{index}]['score'] must be a number or None, got {score!r}")
    question = item.get("question")
    if question is not None and not isinstance(question, str):
        raise InvalidTypeError(
            f"hits[{index}]['question'] must be a str or None, got {type(question).__name__}"
        )
    return Hit(
        content=content,
        score=None if score is None else float(score),
        question=question,
        id=item.get("id"),
        metadata=item.get("metadata"),
    )


class SelfAssessmentProbe(RunnableSerializable[ProbeInput, GsaScore]):
    """Pre-generation YES/NO self-assessment (GSA v3 by default) as a Runnable.

    Input: a query string, or a mapping with ``"query"`` and optionally ``"hits"`` (a
    sequence of :class:`~confidence_router.gsa.Hit` or mappings with ``content``/``score``/
    ``question``) to reuse an earlier search instead of querying ``store``.

    Output: :class:`~confidence_router.gsa.GsaScore`.

    Attributes:
        model: The chat model to probe (normally the local answering model; it is not
            modified, see :func:`prepare_probe_model`).
        store: Optional knowledge store searched (top-``k``) for v3.
        tau: Strong-hit threshold, inclusive. Embedder-specific (0.70 for bge-large-en-v1.5).
        version: ``"gsa-v3-retrieval-conditional"`` (default), ``"gsa-v2-confidence"``, or
            their question-last forms ``"gsa-v3-question-last"`` / ``"gsa-v2-question-last"``
            (same sentences, question at the end: cheaper behind a prompt-prefix cache).
        k: Number of hits retrieved (the paper: 5, no similarity floor).
        quote_hits: Opt-in non-paper quoting of injected knowledge (see
            :mod:`confidence_router.gsa`).
        configure_model: Apply the ChatOllama probe settings (default ``True``). Set ``False``
            if you pass an already configured probe model.
        message_template: For base models without a chat template only: the user message is
            this text with ``{prompt}`` replaced by the GSA prompt (e.g. few-shot YES/NO
            demonstrations, see :data:`confidence_router.serving.llamacpp.YES_NO_TEMPLATE`;
            such a template is the whole prompt, so serve it raw, e.g. the embedded model's
            ``gemma3:270m-raw``). The GSA prompt inside keeps its exact bytes, so
            v3-without-strong-hits still equals v2 (for the question-last versions, use
            the matching template, :func:`confidence_router.serving.llamacpp.yes_no_template`). Default ``None``: the GSA prompt is the
            whole message (chat models).

    Errors: a bad field or an unknown one raises :class:`~confidence_router.errors.
    RoutingConfigError` at construction; a bad input (not a string, blank, not valid UTF-8,
    malformed hits) raises ``InvalidTypeError``/``InvalidArgumentError`` before any search or
    request. A failing store raises :class:`~confidence_router.knowledge.KnowledgeStoreError`
    (or ``EmbeddingDimensionError``/``InvalidArgumentError`` for a bad query vector) before
    the model is asked, so no prompt is sent on a failed search; model errors propagate as
    the model's client raises them. An unreadable answer does not raise but yields
    ``extraction_mode="neutral"`` (p = 0.5) with a warning.
    """

    model: Runnable[Any, Any]
    store: KnowledgeStore | None = None
    tau: float = DEFAULT_TAU
    version: str = DEFAULT_GSA_VERSION
    k: int = MAX_HITS_USED
    quote_hits: bool = False
    configure_model: bool = True
    message_template: str | None = None

    model_config = ConfigDict(arbitrary_types_allowed=True)

    _probe_model: Runnable[Any, Any] | None = PrivateAttr(default=None)

    @field_validator("version")
    @classmethod
    def _check_version(cls, value: str) -> str:
        if value not in GSA_VERSIONS:
            raise InvalidArgumentError(f"unknown GSA version {value!r}; expected one of {GSA_VERSIONS}")
        return value

    @field_validator("message_template")
    @classmethod
    def _check_template(cls, value: str | None) -> str | None:
        if value is not None and "{prompt}" not in value:
            raise InvalidArgumentError("message_template must contain the placeholder {prompt}")
        return value

    @field_validator("k", mode="before")
    @classmethod
    def _check_k(cls, value: Any) -> int:
        # mode="before": pydantic would otherwise accept 2.0 or "5" as k.
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise InvalidArgumentError(f"k must be a positive integer, got {value!r}")
        return int(value)

    @field_validator("tau", mode="before")
    @classmethod
    def _check_tau(cls, value: Any) -> float:
        # Checked here, not at the first probe: a NaN τ used to pass construction and fail
        # every probe after its knowledge search had already run.
        return check_tau(value)

    def __init__(self, **kwargs: Any) -> None:
        # Unknown fields (a misspelt ``tua=``) were silently ignored, and invalid values raised
        # pydantic's ValidationError: both are now RoutingConfigError (a ValueError) naming the
        # problem, as for ConfidenceRoutedLLM.
        known = set(type(self).model_fields)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise RoutingConfigError(
                f"unknown SelfAssessmentProbe field(s) {unknown}; expected some of {sorted(known)}"
            )
        try:
            super().__init__(**kwargs)
        except ValidationError as error:
            raise RoutingConfigError(f"invalid SelfAssessmentProbe: {error}") from error

    def model_post_init(self, context: Any, /) -> None:
        """Build the probe's own model instance once (construction makes no HTTP call)."""
        self._probe_model = prepare_probe_model(self.model) if self.configure_model else self.model

    @property
    def probe_model(self) -> Runnable[Any, Any]:
        """The model instance actually invoked (a configured copy for ChatOllama)."""
        if self._probe_model is None:  # pragma: no cover - set in model_post_init
            self._probe_model = prepare_probe_model(self.model)
        return self._probe_model

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _parse_input(value: ProbeInput) -> tuple[str, list[Hit] | None]:
        """The query (checked, before any search or request) and the given hits, if any.

        Raises:
            InvalidTypeError: not a str or mapping, no ``query`` string, or hits of the wrong
                shape (content not a string, a score that is not a number, ...).
            InvalidArgumentError: an empty/whitespace query, or one that is not valid UTF-8.
        """
        if isinstance(value, str):
            check_query(value)
            return value, None
        if isinstance(value, Mapping):
            query = value.get("query")
            if not isinstance(query, str):
                raise InvalidTypeError("probe input mapping needs a 'query' string")
            check_query(query)
            raw_hits = value.get("hits")
            if raw_hits is None:
                return query, None
            if isinstance(raw_hits, (str, bytes, Mapping)) or not isinstance(raw_hits, Sequence):
                raise InvalidTypeError(
                    f"probe input 'hits' must be a list of hits, got {type(raw_hits).__name__}"
                )
            return query, [_parse_hit(i, item) for i, item in enumerate(raw_hits)]
        raise InvalidTypeError(
            f"probe input must be a str or a mapping, got {type(value).__name__}"
        )

    def _message(self, prompt: GsaPrompt) -> HumanMessage:
        if self.message_template is None:
            return HumanMessage(content=prompt.text)
        # str.replace, not format(): the prompt may contain braces.
        return HumanMessage(content=self.message_template.replace("{prompt}", prompt.text))

    def _needs_search(self, hits: list[Hit] | None) -> bool:
        return hits is None and self.store is not None and self.version in RETRIEVAL_CONDITIONAL_VERSIONS

    def _prompt(self, query: str, hits: Sequence[Hit]) -> GsaPrompt:
        return build_gsa_prompt(
            query, hits, version=self.version, tau=self.tau, quote_hits=self.quote_hits
        )

    def _score(
        self,
        prompt: GsaPrompt,
        response: Any,
        latency_s: float,
        retrieval_latency_s: float | None,
        n_hits: int,
    ) -> GsaScore:
        text = message_text(response)
        extraction = extract_p_yes(first_position_top_logprobs(response), text)
        return GsaScore.from_parts(
            prompt,
            extraction,
            raw_text=text,
            latency_s=latency_s,
            tau=self.tau,
            retrieval_latency_s=retrieval_latency_s,
            n_hits_retrieved=n_hits,
        )

    # ------------------------------------------------------------------ sync

    def _run(
        self,
        value: ProbeInput,
        run_manager: CallbackManagerForChainRun,
        config: RunnableConfig,
    ) -> GsaScore:
        query, hits = self._parse_input(value)
        retrieval_latency: float | None = None
        if self._needs_search(hits):
            assert self.store is not None
            start = time.perf_counter()
            hits = self.store.search(query, k=self.k)
            retrieval_latency = time.perf_counter() - start
        hits = hits or []
        prompt = self._prompt(query, hits)
        child = patch_config(config, callbacks=run_manager.get_child())
        start = time.perf_counter()
        response = self.probe_model.invoke([self._message(prompt)], config=child)
        latency = time.perf_counter() - start
        return self._score(prompt, response, latency, retrieval_latency, len(hits))

    def invoke(
        self, input: ProbeInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> GsaScore:
        """Probe one query; see the class docstring for the input forms."""
        return self._call_with_config(self._run, input, config, run_type="chain")

    # ------------------------------------------------------------------ async

    async def _arun(
        self,
        value: ProbeInput,
        run_manager: AsyncCallbackManagerForChainRun,
        config: RunnableConfig,
    ) -> GsaScore:
        query, hits = self._parse_input(value)
        retrieval_latency: float | None = None
        if self._needs_search(hits):
            assert self.store is not None
            start = time.perf_counter()
            hits = await self.store.asearch(query, k=self.k)
            retrieval_latency = time.perf_counter() - start
        hits = hits or []
        prompt = self._prompt(query, hits)
        child = patch_config(config, callbacks=run_manager.get_child())
        # A ChatOllama's httpx AsyncClient is bound to the loop it first ran on: a second
        # asyncio.run() failed every probe with "Event loop is closed". Use a copy per loop.
        model = per_loop(self.probe_model)
        start = time.perf_counter()
        response = await model.ainvoke([self._message(prompt)], config=child)
        latency = time.perf_counter() - start
        return self._score(prompt, response, latency, retrieval_latency, len(hits))

    async def ainvoke(
        self, input: ProbeInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> GsaScore:
        """Async :meth:`invoke` (awaits the model's real ``ainvoke``)."""
        return await self._acall_with_config(self._arun, input, config, run_type="chain")
