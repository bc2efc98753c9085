"""PriceTable: model-id matching, unknown models, overrides, usage parsing, routing costs."""

from __future__ import annotations

import pytest

from confidence_router.costs import (
    DEFAULT_PRICES,
    PRICES_AS_OF,
    Price,
    PriceTable,
    normalize_model_id,
    routing_costs,
    usage_tokens,
)

USAGE = {"input_tokens": 1000, "output_tokens": 200}


@pytest.mark.parametrize(
    ("model_id", "key"),
    [
        ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", "anthropic.claude-sonnet-4-5"),
        ("eu.anthropic.claude-sonnet-4-5-20250929-v1:0", "anthropic.claude-sonnet-4-5"),
        ("global.anthropic.claude-sonnet-4-5-20250929-v1:0", "anthropic.claude-sonnet-4-5"),
        ("apac.anthropic.claude-sonnet-4-5-20250929-v1:0", "anthropic.claude-sonnet-4-5"),
        ("anthropic.claude-sonnet-4-5-20250929-v1:0", "anthropic.claude-sonnet-4-5"),
        ("ANTHROPIC.CLAUDE-SONNET-4-5-20250929-V1:0", "anthropic.claude-sonnet-4-5"),
        ("claude-sonnet-4-5", "anthropic.claude-sonnet-4-5"),
        ("claude-sonnet-4-5-20250929", "anthropic.claude-sonnet-4-5"),
        ("claude-sonnet-4-5@20250929", "anthropic.claude-sonnet-4-5"),
        (
            (
                "arn:aws:bedrock:us-west-2:123456789012:inference-profile/"
                "us.anthropic.claude-opus-4-5-20251101-v1:0"
            ),
            "anthropic.claude-opus-4-5",
        ),
        ("us.anthropic.claude-haiku-4-5-20251001-v1:0", "anthropic.claude-haiku-4-5"),
        ("amazon.nova-micro-v1:0", "amazon.nova-micro"),
        ("us.amazon.nova-lite-v1:0", "amazon.nova-lite"),
        ("amazon.nova-pro-v1:0:300k", "amazon.nova-pro"),
    ],
)
def test_lookup_tolerates_prefixes_and_suffixes(model_id, key):
    found = PriceTable().lookup(model_id)
    assert found.key == key and found.price is DEFAULT_PRICES[key] and found.reason is None


def test_hand_computed_costs():
    table = PriceTable()
    sonnet = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
    assert table.cost_of(USAGE, sonnet) == pytest.approx(1000 * 3e-6 + 200 * 15e-6)  # 0.006
    assert table.cost_of(USAGE, "anthropic.claude-opus-4-5") == pytest.approx(0.005 + 0.005)
    assert table.cost_of(USAGE, "claude-haiku-4-5") == pytest.approx(0.001 + 0.001)
    nova = table.cost_of(
        {"input_tokens": 1_000_000, "output_tokens": 1_000_000}, "amazon.nova-micro"
    )
    assert nova == pytest.approx(0.035 + 0.14)
    assert table.cost_of({"input_tokens": 0, "output_tokens": 0}, sonnet) == 0.0


def test_paper_prices_are_marked_verified_and_recalled_ones_not():
    assert DEFAULT_PRICES["anthropic.claude-sonnet-4-5"].verified
    assert DEFAULT_PRICES["anthropic.claude-opus-4-5"].verified
    assert not DEFAULT_PRICES["amazon.nova-pro"].verified
    assert PRICES_AS_OF.startswith("2026-")


@pytest.mark.parametrize(
    "model_id",
    [
        "anthropic.claude-sonnet-4",  # a different model: no prefix matching
        "anthropic.claude-sonnet-4-5-extra",
        "qwen2.5:7b",
        "us.meta.llama3-70b-instruct-v1:0",
    ],
)
def test_unknown_model_is_none_with_reason(model_id):
    table = PriceTable()
    assert table.cost_of(USAGE, model_id) is None
    estimate = table.estimate(USAGE, model_id)
    assert estimate.usd is None and "no price for model" in estimate.reason
    assert model_id in estimate.reason


@pytest.mark.parametrize("model_id", [None, "", "   "])
def test_missing_model_id(model_id):
    estimate = PriceTable().estimate(USAGE, model_id)
    assert estimate.usd is None and "no model id" in estimate.reason


def test_ambiguous_bare_name():
    table = PriceTable({"vendor-a.chat-model": (1, 2), "vendor-b.chat-model": (3, 4)})
    found = table.lookup("chat-model")
    assert found.price is None and "ambiguous" in found.reason
    assert table.lookup("vendor-b.chat-model-v1:0").price == Price(3, 4)


def test_overrides_and_extensions():
    table = PriceTable(
        {
            "us.anthropic.claude-sonnet-4-5-20250929-v1:0": (2.7, 13.5),  # a negotiated price
            "my-finetune": {"input_per_mtok": 0.5, "output_per_mtok": 1.5, "source": "contract"},
        },
        as_of="2026-10-01",
    )
    assert table.as_of == "2026-10-01"
    assert table.price_for("global.anthropic.claude-sonnet-4-5") == Price(2.7, 13.5)
    assert table.price_for("my-finetune").source == "contract"
    assert table.price_for("amazon.nova-lite") == DEFAULT_PRICES["amazon.nova-lite"]
    bare = PriceTable({"x.model": (1, 1)}, include_defaults=False)
    assert bare.models() == {"x.model": Price(1, 1)}
    newer = bare.with_prices({"x.model-v2:0": (2, 2)}, as_of="2026-12-01")
    assert newer.price_for("x.model") == Price(2, 2) and newer.as_of == "2026-12-01"
    assert bare.price_for("x.model") == Price(1, 1)  # the original is unchanged


def test_from_mapping():
    table = PriceTable.from_mapping(
        {"as_of": "2026-11-01", "local": 0.02, "models": {"acme.big": [1.0, 2.0]}}
    )
    assert table.price_for("acme.big") == Price(1.0, 2.0)
    assert table.local_price == Price(0.02, 0.02, source="local")
    with pytest.raises(ValueError, match="unknown price-table keys"):
        PriceTable.from_mapping({"modles": {}})


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ((1.0,), TypeError),
        ("3/15", TypeError),
        ({"input_per_mtok": 1.0}, ValueError),
        ({"input_per_mtok": 1, "output_per_mtok": 2, "currency": "EUR"}, ValueError),
        ((-1.0, 2.0), ValueError),
        ((float("nan"), 2.0), ValueError),
        ((True, 2.0), TypeError),
    ],
)
def test_bad_prices(value, error):
    with pytest.raises(error):
        PriceTable({"m.x": value})


def test_local_cost():
    assert PriceTable().local_cost_of(USAGE) == 0.0
    assert PriceTable().local_cost_of(None) == 0.0  # free needs no usage
    priced = PriceTable(local=Price(0.1, 0.2))
    assert priced.local_cost_of(USAGE) == pytest.approx(1000 * 0.1e-6 + 200 * 0.2e-6)
    assert priced.local_cost_of(None) is None
    assert "no usage" in priced.local_estimate(None).reason
    assert PriceTable().with_local(1.0).local_cost_of(USAGE) == pytest.approx(1200e-6)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}, (3, 4)),
        ({"inputTokens": 3, "outputTokens": 4}, (3, 4)),  # Bedrock's raw usage
        (None, "no usage reported"),
        ({"input_tokens": 3}, "usage lacks output_tokens"),
        ({"input_tokens": -1, "output_tokens": 4}, "not a non-negative integer"),
        ({"input_tokens": True, "output_tokens": 4}, "not a non-negative integer"),
        ({"input_tokens": 1.5, "output_tokens": 4}, "not a non-negative integer"),
        ("3 tokens", "not a mapping"),
    ],
)
def test_usage_tokens(usage, expected):
    result = usage_tokens(usage)
    if isinstance(expected, tuple):
        assert result == expected
    else:
        assert expected in result


def test_normalize_keeps_ollama_tags():
    assert normalize_model_id("qwen2.5:7b") == "qwen2.5:7b"
    assert normalize_model_id("  US.Amazon.Nova-Micro-v1:0 ") == "amazon.nova-micro"


# -- routing_costs ---------------------------------------------------------------------------

SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
LOCAL = {"input_tokens": 100, "output_tokens": 20}
CLOUD = {"input_tokens": 120, "output_tokens": 40}


def test_costs_kept_local():
    c = routing_costs(
        {"escalated": False, "signals": {}, "usage": {"local": LOCAL}}, PriceTable(), SONNET
    )
    assert c["cost_usd"] == 0.0 and c["cloud_cost_usd"] == 0.0
    assert c["all_cloud_cost_usd"] == pytest.approx(100 * 3e-6 + 20 * 15e-6)
    assert c["all_cloud_estimated"] is True and c["cost_unknown_reason"] is None


def test_costs_escalated_and_answered():
    record = {"escalated": True, "signals": {}, "usage": {"local": LOCAL, "cloud": CLOUD}}
    c = routing_costs(record, PriceTable(local=Price(1.0, 1.0)), SONNET)
    cloud = 120 * 3e-6 + 40 * 15e-6
    assert c["cloud_cost_usd"] == pytest.approx(cloud)
    assert c["local_cost_usd"] == pytest.approx(120e-6)
    assert c["cost_usd"] == pytest.approx(cloud + 120e-6)
    assert c["all_cloud_cost_usd"] == pytest.approx(cloud) and not c["all_cloud_estimated"]


def test_costs_precheck_escalation_has_no_local_cost():
    record = {"escalated": True, "signals": None, "usage": {"cloud": CLOUD}}
    c = routing_costs(record, PriceTable(local=Price(1.0, 1.0)), SONNET)
    assert c["local_cost_usd"] == 0.0 and c["cost_usd"] == c["cloud_cost_usd"]


def test_costs_cloud_failed_then_local_fallback():
    record = {
        "escalated": True, "decision": "local", "signals": {}, "usage": {"local": LOCAL},
        "cloud_error": "ThrottlingException: slow down",
    }  # fmt: skip
    c = routing_costs(record, PriceTable(), SONNET)
    assert c["cloud_cost_usd"] == 0.0 and c["cost_usd"] == 0.0
    assert c["all_cloud_estimated"] and c["all_cloud_cost_usd"] == pytest.approx(0.0006)


def test_costs_unknown_cloud_model_is_none_not_zero():
    record = {"escalated": True, "signals": {}, "usage": {"local": LOCAL, "cloud": CLOUD}}
    c = routing_costs(record, PriceTable(), "acme.mystery-model")
    assert c["cost_usd"] is None and c["cloud_cost_usd"] is None
    assert c["all_cloud_cost_usd"] is None
    assert "no price for model 'acme.mystery-model'" in c["cost_unknown_reason"]


def test_costs_escalated_without_cloud_usage():
    record = {"escalated": True, "signals": {}, "usage": {"local": LOCAL, "cloud": None}}
    c = routing_costs(record, PriceTable(), SONNET)
    assert c["cloud_cost_usd"] is None and "no usage reported" in c["cost_unknown_reason"]
    assert c["all_cloud_estimated"]  # falls back to the local-usage estimate
