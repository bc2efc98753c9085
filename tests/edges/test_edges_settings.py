"""Settings (environment variables, files) attacked with values of the wrong kind: every one is
a RoutingConfigError naming the setting, raised by ``from_settings`` before any request."""

from __future__ import annotations

import json

import pytest

from confidence_router import ConfidenceRoutedLLM
from confidence_router.errors import RoutingConfigError
from confidence_router.settings import RouterSettings


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"CONFIDENCE_ROUTER_THRESHOLD": "nan"}, "threshold"),
        ({"CONFIDENCE_ROUTER_THRESHOLD": "inf"}, "threshold"),
        ({"CONFIDENCE_ROUTER_THRESHOLD": ""}, "threshold"),
        ({"CONFIDENCE_ROUTER_PRECHECK_THRESHOLD": "-0.1"}, "precheck_threshold"),
        ({"CONFIDENCE_ROUTER_LOCAL_TIMEOUT": "inf"}, "local_timeout"),
        ({"CONFIDENCE_ROUTER_LOCAL_TIMEOUT": "nan"}, "local_timeout"),
        ({"CONFIDENCE_ROUTER_CLOUD_TIMEOUT": "0"}, "cloud_timeout"),
        ({"CONFIDENCE_ROUTER_CLOUD_TIMEOUT": "-3"}, "cloud_timeout"),
        ({"CONFIDENCE_ROUTER_CLOUD_MAX_TOKENS": "1.5"}, "cloud_max_tokens"),
        ({"CONFIDENCE_ROUTER_CLOUD_MAX_TOKENS": "0"}, "cloud_max_tokens"),
        ({"CONFIDENCE_ROUTER_SIGNAL": ""}, "signal"),
        ({"CONFIDENCE_ROUTER_EARLY_EXIT": "sometimes"}, "early_exit"),
        ({"CONFIDENCE_ROUTER_TRESHOLD": "0.5"}, "did you mean 'CONFIDENCE_ROUTER_THRESHOLD'"),
        ({"CONFIDENCE_ROUTER_ALLOW_ESCALATON": "0"}, "CONFIDENCE_ROUTER_ALLOW_ESCALATION"),
        ({"CONFIDENCE_ROUTER_": "x"}, "unknown environment variable"),
    ],
)
def test_bad_environment_fails_from_settings_before_any_request(env, match, ollama_server,
                                                                bedrock_server):
    with pytest.raises(RoutingConfigError, match=match):
        ConfidenceRoutedLLM.from_settings(environ=env)
    assert ollama_server.requests == [] and bedrock_server.requests == []


@pytest.mark.parametrize(
    "values",
    [{"threshold": True}, {"threshold": [0.5]}, {"allow_escalation": 1},
     {"local_timeout": False}, {"cloud_max_tokens": True}, {"signal": 5},
     {"confidence_router": {"threshold": 0.8, "extra": 1}}],
)
def test_bad_file_values_are_routing_config_errors(tmp_path, values):
    path = tmp_path / "router.json"
    path.write_text(json.dumps(values))
    with pytest.raises(RoutingConfigError):
        RouterSettings.from_file(path)


@pytest.mark.parametrize(
    "values",
    [{"local_model": 5}, {"ollama_host": 5}, {"cloud_model": 5}, {"aws_region": ["us"]},
     {"bedrock_endpoint": 5}],
)
def test_string_settings_of_the_wrong_type_are_routing_config_errors(tmp_path, values):
    path = tmp_path / "router.json"
    path.write_text(json.dumps(values))
    with pytest.raises(RoutingConfigError):
        RouterSettings.from_file(path)


def test_unknown_variable_is_reported_as_it_was_spelt():
    with pytest.raises(RoutingConfigError, match="CONFIDENCE_ROUTER_threshold"):
        RouterSettings.from_env({"CONFIDENCE_ROUTER_threshold": "0.5"})
