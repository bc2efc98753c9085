"""Settings from environment and files, from_settings, and the secret-free round trip."""

from __future__ import annotations

import json

import pytest
from langchain_aws import ChatBedrockConverse
from langchain_ollama import ChatOllama

from confidence_router import ConfidenceRoutedLLM, RouterSettings, RoutingConfigError

SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"


def test_defaults_and_env():
    s = RouterSettings.from_env({})
    assert (s.local_model, s.ollama_host, s.cloud_model, s.threshold) == (
        "qwen2.5:7b", "http://127.0.0.1:11434", SONNET, 0.7)
    s = RouterSettings.from_env({
        "OLLAMA_HOST": "0.0.0.0:11434",  # Ollama's own form, without a scheme
        "AWS_DEFAULT_REGION": "eu-west-1",
        "CONFIDENCE_ROUTER_THRESHOLD": "0.85",
        "CONFIDENCE_ROUTER_ALLOW_ESCALATION": "false",
        "CONFIDENCE_ROUTER_CLOUD_MODEL": "none",
        "CONFIDENCE_ROUTER_SIGNAL": "min_logprob",
    })
    assert s.ollama_host == "http://0.0.0.0:11434"
    assert s.aws_region == "eu-west-1"
    assert s.threshold == 0.85 and s.allow_escalation is False
    assert s.cloud_model is None and s.signal == "min_logprob"


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"CONFIDENCE_ROUTER_THRESHOLD": "high"}, "threshold must be a number"),
        ({"CONFIDENCE_ROUTER_THRESHOLD": "1.5"}, "threshold must be in"),
        ({"CONFIDENCE_ROUTER_ALLOW_ESCALATION": "perhaps"}, "allow_escalation must be true or false"),
        ({"CONFIDENCE_ROUTER_ON_UNKNOWN": "shrug"}, "on_unknown"),
        ({"OLLAMA_HOST": "ftp://x"}, "ollama_host must be an http"),
        ({"CONFIDENCE_ROUTER_LOCAL_MODEL": " "}, "local_model"),
    ],
)
def test_invalid_env_is_a_clear_error(env, match):
    with pytest.raises(RoutingConfigError, match=match):
        RouterSettings.from_env(env)


def test_file_then_env_override(tmp_path):
    toml = tmp_path / "router.toml"
    toml.write_text('[confidence_router]\nlocal_model = "llama3.1:8b"\nthreshold = 0.6\n')
    s = RouterSettings.load(toml, environ={"CONFIDENCE_ROUTER_THRESHOLD": "0.9"})
    assert s.local_model == "llama3.1:8b" and s.threshold == 0.9
    s = RouterSettings.load(environ={"CONFIDENCE_ROUTER_CONFIG": str(toml)})
    assert s.threshold == 0.6


def test_bad_files(tmp_path):
    with pytest.raises(RoutingConfigError, match="not found"):
        RouterSettings.from_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("threshold = = 1")
    with pytest.raises(RoutingConfigError, match="cannot parse"):
        RouterSettings.from_file(bad)
    unknown = tmp_path / "u.json"
    unknown.write_text(json.dumps({"treshold": 0.5}))
    with pytest.raises(RoutingConfigError, match="unknown setting"):
        RouterSettings.from_file(unknown)


def test_from_settings_builds_both_tiers(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"local_model": "m1", "ollama_host": "http://127.0.0.1:1",
                                "cloud_model": SONNET, "aws_region": "us-east-1",
                                "threshold": 0.8}))
    router = ConfidenceRoutedLLM.from_settings(str(path), environ={}, on_cloud_error="local")
    assert isinstance(router.local, ChatOllama) and router.local.model == "m1"
    assert router.local.logprobs is True
    assert isinstance(router.cloud, ChatBedrockConverse) and router.cloud.model_id == SONNET
    assert router.threshold == 0.8 and router.on_cloud_error == "local"


def test_round_trip_without_secrets(tmp_path):
    router = ConfidenceRoutedLLM(
        local=ChatOllama(model="qwen2.5:7b", base_url="http://127.0.0.1:11434"),
        cloud=ChatBedrockConverse(model=SONNET, region_name="eu-central-1",
                                  aws_access_key_id="AKIAVERYSECRET",
                                  aws_secret_access_key="very-secret-key"),
        threshold=0.82, signal="min_logprob", on_cloud_error="local",
    )
    path = tmp_path / "router.json"
    router.to_settings().save(path)
    text = path.read_text()
    assert "SECRET" not in text.upper().replace("SECRET_ACCESS", "")  # no key material
    assert "very-secret-key" not in text and "AKIAVERYSECRET" not in text
    again = ConfidenceRoutedLLM.from_settings(str(path), environ={})
    assert again.to_settings() == router.to_settings()
    assert (again.threshold, again.signal, again.on_cloud_error) == (0.82, "min_logprob", "local")
    assert again.cloud.region_name == "eu-central-1"


def test_round_trip_needs_the_settings_tiers():
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    with pytest.raises(RoutingConfigError, match="ChatOllama"):
        ConfidenceRoutedLLM(local=FakeListChatModel(responses=["x"])).to_settings()
