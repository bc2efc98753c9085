"""Structured output through the router, honouring LangChain's three ``method`` values.

:func:`structured_router` binds **each tier with its own provider's mechanism** for the
requested method, routes on the tier's raw answer exactly like any other call, then parses
the answer that was kept:

======================  ========================  =================================
``method``              local ``ChatOllama``      cloud ``ChatBedrockConverse``
======================  ========================  =================================
``function_calling``    a forced tool call        a forced tool call (``toolConfig``)
``json_schema``         ``format=<JSON schema>``  ``outputConfig`` JSON schema
``json_mode``           ``format="json"``         ``outputConfig`` JSON schema (no
                                                  schema-less JSON mode on Bedrock)
======================  ========================  =================================

The binding comes from each model's own public ``with_structured_output(...)`` (so provider
details such as Bedrock's ``additionalProperties: false`` are theirs), and the routing,
confidence and escalation are the router's: the local answer's logprobs decide, as always.
A local model without tool support therefore works with ``json_schema`` / ``json_mode``.

Example::

    from pydantic import BaseModel
    from confidence_router.structured import structured_router

    class Capital(BaseModel):
        country: str
        capital: str

    chain = structured_router(router, Capital, method="json_schema", include_raw=True)
    out = chain.invoke("Capital of Kenya?")
    out["parsed"]                                       # Capital(country='Kenya', ...)
    out["raw"].response_metadata["routing"]["decision"] # "local" or "cloud"

``ConfidenceRoutedLLM.with_structured_output(schema, method=..., include_raw=...)`` is the
same call.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.exceptions import OutputParserException
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import (
    JsonOutputKeyToolsParser,
    PydanticToolsParser,
)
from langchain_core.runnables import (
    Runnable,
    RunnableBinding,
    RunnableConfig,
    RunnableMap,
    RunnableSequence,
)
from langchain_core.runnables.utils import AddableDict
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from typing_extensions import is_typeddict

from confidence_router.errors import RoutingConfigError
from confidence_router.tier_clients import keep_bound_kwargs, unwrap

if TYPE_CHECKING:
    from confidence_router.router import ConfidenceRoutedLLM

__all__ = ["METHODS", "StructuredMethod", "structured_router"]

StructuredMethod = Literal["function_calling", "json_schema", "json_mode"]
#: The structured-output methods LangChain defines, all supported.
METHODS: tuple[str, ...] = ("function_calling", "json_schema", "json_mode")

#: Kwargs that decide the shape of a tier's answer (tools, tool choice, formats): a structured
#: output binding sets its own and replaces any bound earlier (``bind_tools(...)``).
_OUTPUT_SHAPING_KWARGS = frozenset(
    {
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "format",
        "response_format",
        "ls_structured_output_format",
        "tool_config",
        "output_config",
    }
)


def structured_router(
    router: ConfidenceRoutedLLM,
    schema: dict[str, Any] | type | None = None,
    *,
    method: StructuredMethod = "function_calling",
    include_raw: bool = False,
    strict: bool | None = None,
    **kwargs: Any,
) -> Runnable[Any, Any]:
    """A runnable that answers with ``schema``-shaped output through ``router``.

    Args:
        router: the :class:`~confidence_router.router.ConfidenceRoutedLLM` to route with.
        schema: a pydantic model class (output: an instance), a ``TypedDict`` class or a JSON
            schema / OpenAI function dict (output: a ``dict``); ``None`` only with
            ``method="json_mode"`` (output: whatever JSON object the model wrote).
        method: ``"function_calling"`` (a forced tool call on each tier), ``"json_schema"``
            (each tier's native JSON-schema output), or ``"json_mode"`` (JSON output; the
            prompt must describe the shape). See the module docstring for each tier.
        include_raw: return ``{"raw": AIMessage, "parsed": ..., "parsing_error": ...}``; the
            raw message carries ``response_metadata["routing"]``. Parsing errors are then
            returned, not raised. A served answer that does not parse (a local one that could
            not escalate, a cloud one) is such an error on every entry point: with
            ``function_calling`` an answer without the schema's tool call too (LangChain's
            parsers return ``None`` for it), and a stream raises it at its end.
        strict: passed to tiers whose ``with_structured_output`` takes it (function calling).
        kwargs: none are accepted (a typo must not be silently ignored).

    Returns:
        ``Runnable`` from chat input to the parsed output (or the ``include_raw`` dict).

    Raises:
        RoutingConfigError: unknown ``method``, missing or unusable ``schema``, unexpected
            kwargs, or a tier whose model has no mechanism for ``method``.

    Example:
        ``structured_router(router, Capital, method="json_mode").invoke("Capital of Peru? JSON")``
    """
    if kwargs:
        raise RoutingConfigError(f"unsupported with_structured_output arguments: {sorted(kwargs)}")
    if method not in METHODS:
        raise RoutingConfigError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if not isinstance(include_raw, bool):
        raise RoutingConfigError(f"include_raw must be a bool, got {include_raw!r}")
    if schema is None and method != "json_mode":
        raise RoutingConfigError(f"method={method!r} needs a schema (only json_mode works without)")
    is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
    if schema is not None and not (is_pydantic or is_typeddict(schema) or isinstance(schema, dict)):
        raise RoutingConfigError(
            f"schema must be a pydantic model class, a TypedDict class or a dict, got {schema!r}"
        )
    tool_name = _tool_name(schema) if schema is not None else ""

    update = {"local": _bind_tier(router.local, "local", schema, method, strict)}
    if router.cloud is not None:
        update["cloud"] = _bind_tier(router.cloud, "cloud", schema, method, strict)

    parser: Runnable[Any, Any]
    if method == "function_calling":
        if is_pydantic:
            tools = [schema]
            parser = PydanticToolsParser(tools=tools, first_tool_only=True)  # type: ignore[arg-type]
        else:
            parser = JsonOutputKeyToolsParser(key_name=tool_name, first_tool_only=True)
    elif is_pydantic:
        parser = PydanticOutputParser(pydantic_object=schema)  # type: ignore[arg-type]
    else:
        parser = JsonOutputParser()
    # A confident local answer that does not parse is still unusable: it escalates.
    routed = router.with_bound_tiers(update, _parses(parser, tool_name or "JSON"))
    served = _ServedParser(parser, tool_name if method == "function_calling" else None)

    if include_raw:
        return RunnableMap(raw=routed) | _RawAndParsed(served)
    return routed | served


_NOTHING = object()


class _Transforming(Runnable[Any, Any]):
    """A runnable whose streams are its ``transform`` / ``atransform`` of the one input."""

    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        yield from self.transform(iter([input]), config)

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        async def single() -> AsyncIterator[Any]:
            yield input

        async for output in self.atransform(single(), config):
            yield output


class _RawAndParsed(_Transforming):
    """``include_raw``: ``{"raw", "parsed", "parsing_error"}`` with the parsing error returned,
    never raised, on every entry point.

    (LangChain's ``parser.with_fallbacks(..., exception_key="parsing_error")`` cannot catch an
    error a stream raises after its raw chunks went out: such a stream raised.) Streams pass
    each ``{"raw": chunk}`` on as it comes, then ``{"parsed": ..., "parsing_error": ...}``.
    """

    def __init__(self, served: Runnable[Any, Any]) -> None:
        self.served = served

    @staticmethod
    def _outcome(parse: Any, raw: Any) -> dict[str, Any]:
        try:
            return {"parsed": parse(raw), "parsing_error": None}
        except Exception as error:  # noqa: BLE001 - returned, as include_raw promises
            return {"parsed": None, "parsing_error": error}

    def invoke(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        raw = input["raw"]
        return {"raw": raw, **self._outcome(lambda m: self.served.invoke(m, config), raw)}

    async def ainvoke(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        raw = input["raw"]
        try:
            parsed = await self.served.ainvoke(raw, config)
        except Exception as error:  # noqa: BLE001 - returned, as include_raw promises
            return {"raw": raw, "parsed": None, "parsing_error": error}
        return {"raw": raw, "parsed": parsed, "parsing_error": None}

    def transform(
        self, input: Iterator[Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[dict[str, Any]]:
        raw = None
        for chunk in input:
            piece = chunk.get("raw")
            if piece is not None:
                raw = piece if raw is None else raw + piece
                yield AddableDict(raw=piece)
        if raw is not None:
            yield AddableDict(self._outcome(lambda m: self.served.invoke(m, config), raw))

    async def atransform(
        self, input: AsyncIterator[Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[dict[str, Any]]:
        raw = None
        async for chunk in input:
            piece = chunk.get("raw")
            if piece is not None:
                raw = piece if raw is None else raw + piece
                yield AddableDict(raw=piece)
        if raw is not None:
            outcome = await self.ainvoke({"raw": raw}, config)
            yield AddableDict(parsed=outcome["parsed"], parsing_error=outcome["parsing_error"])


class _ServedParser(_Transforming):
    """``parser`` for the answer served: one it cannot read is an error on every entry point.

    LangChain's tool parsers return ``None`` for an answer without the tool's call, and their
    streams end without output or error when the answer never parses; the README promises a
    served answer that does not parse comes "with the parsing error". ``invoke`` raises
    :class:`OutputParserException` for a missing call (``tool`` names it; ``None`` for the JSON
    methods), and a stream yields the parser's partial outputs, then parses the whole answer
    and raises what ``invoke`` would.
    """

    def __init__(self, parser: Runnable[Any, Any], tool: str | None) -> None:
        self.parser = parser
        self.tool = tool

    @property
    def OutputType(self) -> Any:
        return self.parser.OutputType

    def _checked(self, parsed: Any, message: Any) -> Any:
        if parsed is None and self.tool is not None:
            raise OutputParserException(
                f"no call of the tool {self.tool!r} in the answer",
                llm_output=str(getattr(message, "content", message))[:300],
            )
        return parsed

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._checked(self.parser.invoke(input, config), input)

    async def ainvoke(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Any:
        return self._checked(await self.parser.ainvoke(input, config), input)

    def transform(
        self, input: Iterator[Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        answer: list[Any] = []

        def kept() -> Iterator[Any]:
            for chunk in input:
                answer[:] = [chunk if not answer else answer[0] + chunk]
                yield chunk

        last = _NOTHING
        for last in self.parser.transform(kept(), config):
            yield last
        if not answer:
            return
        final = self.invoke(answer[0], config)
        if last is _NOTHING or final != last:
            yield final

    async def atransform(
        self, input: AsyncIterator[Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        answer: list[Any] = []

        async def kept() -> AsyncIterator[Any]:
            async for chunk in input:
                answer[:] = [chunk if not answer else answer[0] + chunk]
                yield chunk

        last = _NOTHING
        async for last in self.parser.atransform(kept(), config):
            yield last
        if not answer:
            return
        final = await self.ainvoke(answer[0], config)
        if last is _NOTHING or final != last:
            yield final


def _parses(parser: Runnable[Any, Any], what: str) -> Any:
    """The answer check of a structured call: why ``parser`` cannot read an answer, or ``None``."""

    def check(message: Any) -> str | None:
        try:
            parsed = parser.invoke(message)
        except Exception as error:  # noqa: BLE001 - any parse failure makes the answer unusable
            return f"the answer does not parse as {what}: {str(error)[:300]}"
        return None if parsed is not None else f"no call of the tool {what!r}"

    return check


# -- per-tier binding ----------------------------------------------------------------------------


def _tool_name(schema: Any) -> str:
    try:
        return str(convert_to_openai_tool(schema)["function"]["name"])
    except Exception as error:  # any conversion failure means the schema is unusable
        raise RoutingConfigError(f"unusable schema {schema!r}: {error}") from error


def _json_schema(schema: Any) -> dict[str, Any]:
    """A TypedDict as a JSON schema dict, every key required (as ChatOllama does)."""
    converted = convert_to_json_schema(schema)
    if "required" not in converted:
        converted["required"] = list(converted.get("properties", {}))
    return converted


def _supported_methods(model: Any) -> set[str]:
    """The methods ``model.with_structured_output`` declares in its ``method`` Literal; a
    model without a ``method`` parameter only does function calling (LangChain's default)."""
    signature = inspect.signature(type(model).with_structured_output)
    parameter = signature.parameters.get("method")
    if parameter is None:
        return {"function_calling"}
    annotation = parameter.annotation
    text = annotation if isinstance(annotation, str) else repr(annotation)
    declared = {name for name in METHODS if name in text}
    # An unannotated ``method`` (or a plain ``str``): trust the model with any method.
    return declared or set(METHODS)


def _bind_tier(
    model: Any, tier: str, schema: Any, method: str, strict: bool | None
) -> Runnable[Any, Any]:
    """``model`` bound for ``method`` by its own ``with_structured_output``, without its parser.

    ``with_structured_output`` returns ``bound_model | parser``; the router needs the bound
    model (a ``RunnableBinding`` of the same model, so costs and budgets still see the model)
    and parses the routed answer itself.
    """
    target = unwrap(model)
    if not hasattr(target, "with_structured_output"):
        raise RoutingConfigError(
            f"the {tier} tier ({type(target).__name__}) has no structured output"
        )
    supported = _supported_methods(target)
    tier_method = method
    if method == "json_mode" and "json_mode" not in supported:
        # Bedrock has no schema-less JSON mode; its native JSON-schema output is the JSON mode.
        if schema is None or "json_schema" not in supported:
            raise RoutingConfigError(
                f"the {tier} tier ({type(target).__name__}) has no JSON mode; pass a schema "
                "(its JSON-schema output is then used) or use method='function_calling'"
            )
        tier_method = "json_schema"
    if tier_method not in supported:
        raise RoutingConfigError(
            f"the {tier} tier ({type(target).__name__}) does not support method={method!r}; "
            f"it supports {sorted(supported)}"
        )
    tier_schema = schema
    if schema is not None and is_typeddict(schema) and tier_method != "function_calling":
        tier_schema = _json_schema(schema)
    options: dict[str, Any] = {"include_raw": False}
    if "method" in inspect.signature(type(target).with_structured_output).parameters:
        options["method"] = tier_method
    if strict is not None and tier_method == "function_calling":
        options["strict"] = strict
    try:
        structured = target.with_structured_output(tier_schema, **options)
    except RoutingConfigError:
        raise
    except Exception as error:  # the provider's own validation of the schema
        raise RoutingConfigError(
            f"the {tier} tier ({type(target).__name__}) rejected {method}: {error}"
        ) from error
    bound = structured.first if isinstance(structured, RunnableSequence) else None
    if not isinstance(bound, RunnableBinding) or unwrap(bound) is not target:
        raise RoutingConfigError(
            f"the {tier} tier ({type(target).__name__}) builds structured output in a way the "
            f"router cannot route on (expected 'bound model | parser'); use another method"
        )
    # Never the tier's earlier tools or formats: the parser would wait for a tool nobody was
    # offered. ChatOllama and the Bedrock models drop earlier tools the same way.
    return keep_bound_kwargs(bound, model, _OUTPUT_SHAPING_KWARGS)
