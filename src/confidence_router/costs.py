"""Dollar cost of a query: a price table keyed by model id, and the cost fields of a routing record.

Bedrock reports tokens, never dollars, so the router prices the usage itself. An unknown model
costs ``None`` with a reason, never a silent 0 (a 0 would make every saving look free).

>>> table = PriceTable()
>>> table.cost_of({"input_tokens": 1000, "output_tokens": 200},
...               "us.anthropic.claude-sonnet-4-5-20250929-v1:0")   # 1000*3/1e6 + 200*15/1e6
0.006
>>> table.cost_of({"input_tokens": 1000, "output_tokens": 200}, "my-private-model") is None
True
>>> table.estimate({"input_tokens": 1, "output_tokens": 1}, "my-private-model").reason
"no price for model 'my-private-model' (normalised: 'my-private-model'); add it with PriceTable(prices={...})"

Model ids are matched after normalisation: lower-cased, an ARN reduced to its last path part,
a cross-region prefix (``us.``, ``eu.``, ``apac.``, ``global.``, ...) and the version / date
suffixes (``-20250929``, ``-v1:0``, ``@20250929``) removed, so
``global.anthropic.claude-sonnet-4-5-20250929-v1:0`` and ``claude-sonnet-4-5`` both find
``anthropic.claude-sonnet-4-5``. Different models never collide: ``claude-sonnet-4`` does not
match ``claude-sonnet-4-5`` (exact match after normalisation, no prefix matching).

Pure stdlib.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confidence_router.errors import InvalidArgumentError, InvalidTypeError

__all__ = [
    "DEFAULT_PRICES",
    "PRICES_AS_OF",
    "CostEstimate",
    "Price",
    "PriceLookup",
    "PriceTable",
    "normalize_model_id",
    "routing_costs",
    "usage_tokens",
]

PRICES_AS_OF = "2026-11-28"
"""Date this default table was written. Each :class:`Price` says where its numbers come from;
the ones marked ``verified=False`` are list prices recalled without network access: check the
provider's pricing page, and override with ``PriceTable(prices=...)`` where they differ."""

_PER_MTOK = 1_000_000


@dataclass(frozen=True)
class Price:
    """USD per million tokens, input and output.

    Attributes:
        input_per_mtok: USD per 1M input (prompt) tokens.
        output_per_mtok: USD per 1M output (generated) tokens.
        source: where the numbers come from.
        verified: ``False`` for prices recalled from the provider's list without checking it
            (no network when this table was written).

    Example::

        >>> Price(3.0, 15.0).cost(1_000, 200)
        0.006
    """

    input_per_mtok: float
    output_per_mtok: float
    source: str = "user"
    verified: bool = True

    def __post_init__(self) -> None:
        for name in ("input_per_mtok", "output_per_mtok"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidTypeError(f"Price.{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise InvalidArgumentError(f"Price.{name} must be finite and >= 0, got {value!r}")

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """Cost in USD of ``input_tokens`` in and ``output_tokens`` out."""
        # One division at the end keeps e.g. 1000*3/1e6 + 200*15/1e6 == 0.006 exactly.
        total = input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok
        return total / _PER_MTOK


_ANTHROPIC = "Anthropic list price; Bedrock on-demand is the same"
_METHOD = "docs/how-it-works.md §3 (the paper's run)"
_NOVA = "AWS Bedrock on-demand list price, us-east-1"

DEFAULT_PRICES: Mapping[str, Price] = {
    "anthropic.claude-sonnet-4-5": Price(3.0, 15.0, _METHOD),
    "anthropic.claude-opus-4-5": Price(5.0, 25.0, _METHOD),
    "anthropic.claude-haiku-4-5": Price(1.0, 5.0, _ANTHROPIC, verified=False),
    "amazon.nova-micro": Price(0.035, 0.14, _NOVA, verified=False),
    "amazon.nova-lite": Price(0.06, 0.24, _NOVA, verified=False),
    "amazon.nova-pro": Price(0.80, 3.20, _NOVA, verified=False),
}
"""Built-in prices (USD per 1M tokens, standard on-demand, prompts under 200k tokens). Not
modelled: prompt-caching discounts (``input_tokens`` from LangChain include cache reads, so
cached prompts are over-estimated), batch discounts, long-context tiers, and any regional
surcharge of geographic cross-region profiles (``us.``/``eu.``) over ``global.``."""

# Cross-region inference prefixes of Bedrock model ids ("us.anthropic...").
_REGION_PREFIXES = frozenset({"us", "eu", "apac", "ap", "global", "us-gov", "jp", "au", "ca"})
# Version / date suffixes: "-20250929", "-v1:0", "-v1", ":0", ":300k", "@20250929".
_SUFFIX = re.compile(r"(?:@[\w.-]+)?(?:-v\d+)?(?::\d+k?)*$")
_DATE = re.compile(r"-\d{8}$")


def normalize_model_id(model_id: str) -> str:
    """The key a model id is looked up under.

    Example::

        >>> normalize_model_id("arn:aws:bedrock:us-west-2:123456789012:inference-profile/"
        ...                    "us.anthropic.claude-sonnet-4-5-20250929-v1:0")
        'anthropic.claude-sonnet-4-5'
        >>> normalize_model_id("amazon.nova-micro-v1:0")
        'amazon.nova-micro'
    """
    key = model_id.strip().lower()
    key = key.rsplit("/", 1)[-1]  # ARN: ...:inference-profile/<id> or foundation-model/<id>
    head, dot, rest = key.partition(".")
    if dot and rest and head in _REGION_PREFIXES:
        key = rest
    key = _SUFFIX.sub("", key)
    return _DATE.sub("", key)


def _without_provider(key: str) -> str:
    return key.partition(".")[2] or key


def _as_price(value: Any, model: str) -> Price:
    if isinstance(value, Price):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"input_per_mtok", "output_per_mtok", "source", "verified"}
        if unknown:
            raise InvalidArgumentError(f"price of {model!r}: unknown keys {sorted(unknown)}")
        try:
            return Price(**value)
        except TypeError as error:
            raise InvalidArgumentError(f"price of {model!r}: {error}") from None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return Price(value[0], value[1])
    raise InvalidTypeError(
        f"price of {model!r} must be a Price, (input_per_mtok, output_per_mtok) or a mapping "
        f"with those keys; got {value!r}"
    )


@dataclass(frozen=True)
class PriceLookup:
    """Result of :meth:`PriceTable.lookup`: the price and the key it was found under, or the
    reason there is none."""

    price: Price | None
    key: str | None
    reason: str | None

    @functools.cached_property
    def unpriced(self) -> CostEstimate:
        """The :class:`CostEstimate` of any usage when there is no price (``usd=None``)."""
        return CostEstimate(None, self.reason)


@dataclass(frozen=True)
class CostEstimate:
    """A cost in USD, or ``None`` with the reason it is unknown."""

    usd: float | None
    reason: str | None = None
    model_key: str | None = None


_FREE = CostEstimate(0.0)
_FREE_LOCAL = CostEstimate(0.0, None, "local")
#: At most this many model ids are memoised per price table (a router uses one or two).
_LOOKUP_MEMO_SIZE = 64


def usage_tokens(usage: Mapping[str, Any] | None) -> tuple[int, int] | str:
    """``(input_tokens, output_tokens)`` from a usage mapping, or the reason they are unknown.

    Accepts LangChain's ``usage_metadata`` keys (``input_tokens`` / ``output_tokens``) and
    Bedrock's raw ``inputTokens`` / ``outputTokens``.

    Example::

        >>> usage_tokens({"input_tokens": 12, "output_tokens": 7, "total_tokens": 19})
        (12, 7)
        >>> usage_tokens(None)
        'no usage reported'
    """
    if usage is None:
        return "no usage reported"
    if not isinstance(usage, Mapping):
        return f"usage is not a mapping: {type(usage).__name__}"
    counts = []
    for snake, camel in (("input_tokens", "inputTokens"), ("output_tokens", "outputTokens")):
        value = usage.get(snake, usage.get(camel))
        if value is None:
            return f"usage lacks {snake}"
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"usage {snake} is not a non-negative integer: {value!r}"
        counts.append(value)
    return counts[0], counts[1]


class PriceTable:
    """Prices by model id, plus the local model's price (default free).

    Args:
        prices: extra or overriding prices by model id; values are :class:`Price`,
            ``(input_per_mtok, output_per_mtok)`` or a mapping with those keys. Ids are
            normalised like the looked-up ones (see :func:`normalize_model_id`).
        as_of: the date of the prices (defaults to :data:`PRICES_AS_OF`; set it when you
            supply your own).
        include_defaults: start from :data:`DEFAULT_PRICES` (default) or from nothing.
        local: the local model's price: a :class:`Price`, or one number used for input and
            output (e.g. amortised hardware/energy per 1M tokens). Default 0.

    Example::

        >>> t = PriceTable({"my-finetune": (0.5, 1.5)}, local=0.01)
        >>> t.cost_of({"input_tokens": 2_000_000, "output_tokens": 0}, "us.my-finetune-v1:0")
        1.0
        >>> t.local_cost_of({"input_tokens": 1_000_000, "output_tokens": 1_000_000})
        0.02
    """

    def __init__(
        self,
        prices: Mapping[str, Price | tuple[float, float] | Mapping[str, Any]] | None = None,
        *,
        as_of: str = PRICES_AS_OF,
        include_defaults: bool = True,
        local: Price | float = 0.0,
    ) -> None:
        table: dict[str, Price] = dict(DEFAULT_PRICES) if include_defaults else {}
        for model, value in (prices or {}).items():
            if not isinstance(model, str) or not normalize_model_id(model):
                raise InvalidArgumentError(f"model ids must be non-empty strings, got {model!r}")
            table[normalize_model_id(model)] = _as_price(value, model)
        self._prices = table
        self._as_of = as_of
        if isinstance(local, Price):
            self._local = local
        else:
            self._local = Price(local, local, source="local")
        self._local_free = self._local.input_per_mtok == 0 and self._local.output_per_mtok == 0
        # Lookups by model id, memoised: the table never changes, and every routed call
        # prices its record (normalising an id costs two regex passes).
        self._lookups: dict[str | None, PriceLookup] = {}

    @property
    def as_of(self) -> str:
        """The date of the prices."""
        return self._as_of

    @property
    def local_price(self) -> Price:
        """The local model's price (free by default)."""
        return self._local

    def models(self) -> dict[str, Price]:
        """Every priced model, by normalised key."""
        return dict(self._prices)

    def with_prices(
        self,
        prices: Mapping[str, Price | tuple[float, float] | Mapping[str, Any]],
        *,
        as_of: str | None = None,
    ) -> PriceTable:
        """A copy with some prices added or replaced (the local price is kept)."""
        merged = {**self._prices, **prices}
        return PriceTable(
            merged, as_of=as_of or self._as_of, include_defaults=False, local=self._local
        )

    def with_local(self, local: Price | float) -> PriceTable:
        """A copy with another local price."""
        return PriceTable(self._prices, as_of=self._as_of, include_defaults=False, local=local)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PriceTable:
        """Build from plain settings, e.g. a TOML ``[prices]`` table::

            as_of = "2026-11-01"
            local = 0.0
            [prices.models]
            "anthropic.claude-sonnet-4-5" = [3.0, 15.0]

        Keys: ``models`` (required), ``as_of``, ``local``, ``include_defaults``.
        """
        unknown = set(data) - {"models", "as_of", "local", "include_defaults"}
        if unknown:
            raise InvalidArgumentError(f"unknown price-table keys {sorted(unknown)}")
        return cls(
            data.get("models", {}),
            as_of=data.get("as_of", PRICES_AS_OF),
            include_defaults=data.get("include_defaults", True),
            local=data.get("local", 0.0),
        )

    def lookup(self, model_id: str | None) -> PriceLookup:
        """The price of ``model_id``, the key it matched, or why there is none."""
        if model_id is None or type(model_id) is str:
            found = self._lookups.get(model_id)
            if found is None:
                found = self._find(model_id)
                if len(self._lookups) < _LOOKUP_MEMO_SIZE:
                    self._lookups[model_id] = found
            return found
        return self._find(model_id)

    def _find(self, model_id: str | None) -> PriceLookup:
        if not isinstance(model_id, str) or not model_id.strip():
            return PriceLookup(None, None, f"no model id ({model_id!r})")
        key = normalize_model_id(model_id)
        if key in self._prices:
            return PriceLookup(self._prices[key], key, None)
        # "claude-sonnet-4-5" (Anthropic API / Vertex naming) -> "anthropic.claude-sonnet-4-5";
        # only when exactly one priced model has that name under some provider.
        bare = _without_provider(key)
        matches = [k for k in self._prices if _without_provider(k) == bare]
        if len(matches) == 1:
            return PriceLookup(self._prices[matches[0]], matches[0], None)
        if len(matches) > 1:
            return PriceLookup(
                None, None, f"model {model_id!r} is ambiguous: matches {sorted(matches)}"
            )
        return PriceLookup(
            None,
            None,
            f"no price for model {model_id!r} (normalised: {key!r}); add it with "
            "PriceTable(prices={...})",
        )

    def price_for(self, model_id: str | None) -> Price | None:
        """The price of ``model_id`` or ``None`` (see :meth:`lookup` for the reason)."""
        return self.lookup(model_id).price

    def estimate(self, usage: Mapping[str, Any] | None, model_id: str | None) -> CostEstimate:
        """Cost of ``usage`` on ``model_id``, or ``None`` with the reason."""
        found = self.lookup(model_id)
        if found.price is None:
            return found.unpriced
        tokens = usage_tokens(usage)
        if isinstance(tokens, str):
            return CostEstimate(None, tokens, found.key)
        return CostEstimate(found.price.cost(*tokens), None, found.key)

    def cost_of(self, usage: Mapping[str, Any] | None, model_id: str | None) -> float | None:
        """Cost in USD of ``usage`` on ``model_id``; ``None`` for an unknown model or usage."""
        return self.estimate(usage, model_id).usd

    def local_estimate(self, usage: Mapping[str, Any] | None) -> CostEstimate:
        """Cost of a local call. A free local model costs 0 even without usage counts."""
        if self._local_free:
            return _FREE_LOCAL
        tokens = usage_tokens(usage)
        if isinstance(tokens, str):
            return CostEstimate(None, f"local: {tokens}", "local")
        return CostEstimate(self._local.cost(*tokens), None, "local")

    def local_cost_of(self, usage: Mapping[str, Any] | None) -> float | None:
        """Cost in USD of a local call (``None`` when priced and the usage is unknown)."""
        return self.local_estimate(usage).usd

    def __repr__(self) -> str:
        return f"PriceTable({len(self._prices)} models, as_of={self._as_of!r}, local={self._local})"


def routing_costs(
    routing: Mapping[str, Any], prices: PriceTable, cloud_model: str | None
) -> dict[str, Any]:
    """The cost fields of one routing record (merge them into the record).

    Returns a dict with:

    * ``local_cost_usd`` - the local generation (0 when it did not run, e.g. a pre-check
      escalation or a local failure).
    * ``cloud_cost_usd`` - the cloud call: priced from ``usage["cloud"]`` when the query was
      escalated; 0 when it was not; 0 when the cloud call **failed** without reporting usage
      (Bedrock does not bill failed requests); ``None`` when escalated, successful and
      unpriceable.
    * ``cost_usd`` - ``local_cost_usd + cloud_cost_usd`` (``None`` if either is unknown).
    * ``all_cloud_cost_usd`` - what the query would have cost with every query sent to the
      cloud. Escalated and answered: the actual cloud cost. Otherwise an **estimate** from the
      local usage: the same prompt and an answer as long as the local one, priced at the cloud
      model's rates (token counts differ between tokenizers, typically by 10-30%; the cloud
      might also answer at a different length). ``None`` without local usage or cloud price.
    * ``all_cloud_estimated`` - whether ``all_cloud_cost_usd`` is such an estimate.
    * ``cost_unknown_reason`` - why a field is ``None`` (``None`` when everything is known).

    Args:
        routing: the router's ``response_metadata["routing"]`` record (``escalated``,
            ``usage`` {``local``, ``cloud``}, ``signals``, ``cloud_error``, ...).
        prices: the price table.
        cloud_model: the cloud model id (e.g. ``us.anthropic.claude-sonnet-4-5-20250929-v1:0``).

    Example::

        >>> r = {"escalated": False, "signals": {}, "usage": {"local": {"input_tokens": 100,
        ...      "output_tokens": 20}}}
        >>> c = routing_costs(r, PriceTable(), "anthropic.claude-sonnet-4-5")
        >>> c["cost_usd"], c["all_cloud_cost_usd"], c["all_cloud_estimated"]
        (0.0, 0.0006, True)
    """
    usage = routing.get("usage") or {}
    local_usage = usage.get("local")
    cloud_usage = usage.get("cloud")
    escalated = bool(routing.get("escalated"))
    reasons: list[str] = []

    # The local model ran iff it reported usage or its answer was scored.
    local_ran = local_usage is not None or routing.get("signals") is not None
    local = prices.local_estimate(local_usage) if local_ran else _FREE
    if local.usd is None:
        reasons.append(local.reason or "local cost unknown")

    if not escalated:
        cloud = _FREE
    elif cloud_usage is None and routing.get("cloud_error"):
        cloud = _FREE  # failed request: not billed
    else:
        cloud = prices.estimate(cloud_usage, cloud_model)
        if cloud.usd is None:
            reasons.append(f"cloud: {cloud.reason}")

    cloud_answered = escalated and cloud_usage is not None
    if cloud_answered:
        all_cloud, estimated = cloud.usd, False
    else:
        estimate = prices.estimate(local_usage, cloud_model)
        all_cloud, estimated = estimate.usd, True
        if estimate.usd is None:
            reasons.append(f"all-cloud estimate: {estimate.reason}")

    total = None if local.usd is None or cloud.usd is None else local.usd + cloud.usd
    return {
        "cost_usd": total,
        "local_cost_usd": local.usd,
        "cloud_cost_usd": cloud.usd,
        "all_cloud_cost_usd": all_cloud,
        "all_cloud_estimated": estimated,
        "cost_unknown_reason": "; ".join(reasons) or None,
    }
