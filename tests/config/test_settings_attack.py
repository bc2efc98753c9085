"""Attacks on ``from_settings()``, settings files and ``CONFIDENCE_ROUTER_*`` variables, and on
the same knobs given per call and through LCEL ``configurable``.

Every bad value is a :class:`RoutingConfigError` naming the setting or knob, raised before any
request: the tests count what the fake Ollama and the fake Bedrock received (0). Secrets
(passwords in URLs) never reach reprs, errors or saved files. Precedence is the README's:
explicit arguments > environment > settings file > defaults, checked on real routed calls.
"""

from __future__ import annotations

import json
import math
import os

import pytest
from langchain_core.runnables import ConfigurableField

from confidence_router import ConfidenceRoutedLLM, RouterSettings, RoutingConfigError
from confidence_router.settings import MAX_SETTINGS_FILE_BYTES

SECRET = "hunter2-s3cret"


def no_requests(ollama_server, bedrock_server) -> bool:
    return ollama_server.requests == [] and bedrock_server.requests == []


# -- settings files ------------------------------------------------------------------------------


def write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        # Not UTF-8: Latin-1 and UTF-16 files were a bare UnicodeDecodeError.
        ("latin1.toml", 'local_model = "caf\xe9"\n'.encode("latin-1"), "not UTF-8"),
        ("utf16.json", '{"threshold": 0.5}'.encode("utf-16"), "not UTF-8"),
        # A null or scalar table was a TypeError (or an "unknown setting 'x'").
        ("null.json", '{"confidence_router": null}', r"\[confidence_router\] .* table/object"),
        ("str.json", '{"confidence_router": "x"}', r"\[confidence_router\] .* table/object"),
        # A JSON file nested past the recursion limit was a RecursionError.
        ("deep.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_unreadable_settings_files_are_routing_config_errors(
    tmp_path, ollama_server, bedrock_server, name, content, match
):
    path = write(tmp_path, name, content)
    with pytest.raises(RoutingConfigError, match=match):
        RouterSettings.from_file(path)
    with pytest.raises(RoutingConfigError, match=match):
        ConfidenceRoutedLLM.from_settings(path, environ={})
    assert no_requests(ollama_server, bedrock_server)


def test_settings_beside_the_table_are_an_error_not_ignored(tmp_path):
    # The table was read and the top-level threshold silently dropped (0.7 was used).
    path = write(tmp_path, "mixed.toml",
                 'threshold = 0.9\n[confidence_router]\nsignal = "min_logprob"\n')
    with pytest.raises(RoutingConfigError, match=r"outside its \[confidence_router\].*threshold"):
        RouterSettings.from_file(path)
    # Either form alone is fine.
    top = write(tmp_path, "top.toml", 'threshold = 0.9\nsignal = "min_logprob"\n')
    table = write(tmp_path, "table.toml",
                  '[confidence_router]\nthreshold = 0.9\nsignal = "min_logprob"\n')
    assert RouterSettings.from_file(top) == RouterSettings.from_file(table)
    assert RouterSettings.from_file(top).threshold == 0.9


def test_nested_and_unknown_keys_name_the_key(tmp_path):
    nested = write(tmp_path, "n.toml", '[confidence_router]\nthreshold = 0.8\n'
                                       '[confidence_router.cloud]\nmodel = "x"\n')
    with pytest.raises(RoutingConfigError, match=r"unknown setting\(s\) \['cloud'\]"):
        RouterSettings.from_file(nested)
    misspelt = write(tmp_path, "m.json", json.dumps({"treshold": 0.8}))
    with pytest.raises(RoutingConfigError, match="'treshold' -> did you mean 'threshold'"):
        RouterSettings.from_file(misspelt)


def test_a_huge_file_is_refused_unread(tmp_path):
    # A valid TOML file (one long comment) just over the cap: refused before parsing.
    path = write(tmp_path, "huge.toml", "threshold = 0.8\n#" + "x" * MAX_SETTINGS_FILE_BYTES)
    with pytest.raises(RoutingConfigError, match="more than"):
        RouterSettings.from_file(path)
    small = write(tmp_path, "small.toml", "threshold = 0.8\n#" + "x" * 10_000)
    assert RouterSettings.from_file(small).threshold == 0.8


def test_symlinks_missing_files_and_directories(tmp_path):
    target = write(tmp_path, "real.toml", "threshold = 0.55\n")
    link = tmp_path / "link.toml"
    os.symlink(target, link)
    assert RouterSettings.from_file(link).threshold == 0.55
    dangling = tmp_path / "dangling.toml"
    os.symlink(tmp_path / "gone.toml", dangling)
    for path in (dangling, tmp_path / "missing.toml"):
        with pytest.raises(RoutingConfigError, match="not found"):
            RouterSettings.from_file(path)
    with pytest.raises(RoutingConfigError, match="is a directory, not a file"):
        RouterSettings.from_file(tmp_path)
    with pytest.raises(RoutingConfigError, match="not found"):
        RouterSettings.load(environ={"CONFIDENCE_ROUTER_CONFIG": str(dangling)})


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"threshold": float("nan")}, "threshold"),
        ({"precheck_threshold": float("inf")}, "precheck_threshold"),
        ({"local_timeout": float("-inf")}, "local_timeout"),
        ({"cloud_timeout": float("nan")}, "cloud_timeout"),
        ({"cloud_max_tokens": 2**31}, "cloud_max_tokens"),  # Bedrock's maxTokens is int32
        ({"cloud_max_tokens": -1}, "cloud_max_tokens"),
        ({"aws_region": ""}, "aws_region"),
        ({"aws_region": "us west 2"}, "aws_region"),
        ({"bedrock_endpoint": "bedrock.local:443"}, "bedrock_endpoint"),
        ({"ollama_host": {"url": "http://x"}}, "ollama_host"),
    ],
)
def test_out_of_range_file_values(tmp_path, ollama_server, bedrock_server, values, match):
    # JSON can carry NaN and Infinity; each is refused naming the setting.
    path = write(tmp_path, "r.json", json.dumps(values))
    with pytest.raises(RoutingConfigError, match=match):
        ConfidenceRoutedLLM.from_settings(path, environ={})
    assert no_requests(ollama_server, bedrock_server)


# -- environment variables -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "match"),
    [
        # A blank value used to switch off what is on by default: no local timeout at all,
        # or no cloud (a compose file's unset ${VAR} expands to "").
        ({"CONFIDENCE_ROUTER_LOCAL_TIMEOUT": ""}, "local_timeout is blank"),
        ({"CONFIDENCE_ROUTER_LOCAL_TIMEOUT": "  "}, "local_timeout is blank"),
        ({"CONFIDENCE_ROUTER_CLOUD_MODEL": ""}, "cloud_model is blank"),
        ({"CONFIDENCE_ROUTER_AWS_REGION": " "}, "aws_region"),
        ({"CONFIDENCE_ROUTER_BEDROCK_ENDPOINT": "not a url"}, "bedrock_endpoint"),
        ({"CONFIDENCE_ROUTER_CLOUD_MAX_TOKENS": "9" * 30}, "cloud_max_tokens"),
        ({"CONFIDENCE_ROUTER_CLOUD_MAX_TOKENS": "1e3"}, "cloud_max_tokens"),
        ({"CONFIDENCE_ROUTER_PRECHECK_THRESHOLD": "NaN"}, "precheck_threshold"),
        ({"CONFIDENCE_ROUTER_EARLY_EXIT": ""}, "early_exit"),
        ({"CONFIDENCE_ROUTER_ON_BUDGET_EXCEEDED": "LOCAL"}, "on_budget_exceeded"),
    ],
)
def test_bad_environment_values(env, match, ollama_server, bedrock_server):
    with pytest.raises(RoutingConfigError, match=match):
        ConfidenceRoutedLLM.from_settings(environ=env)
    assert no_requests(ollama_server, bedrock_server)


def test_none_and_off_still_switch_things_off():
    settings = RouterSettings.from_env({
        "CONFIDENCE_ROUTER_LOCAL_TIMEOUT": "none",
        "CONFIDENCE_ROUTER_CLOUD_MODEL": "off",
        "CONFIDENCE_ROUTER_CLOUD_TIMEOUT": "",  # blank where None is the default: the default
    })
    assert (settings.local_timeout, settings.cloud_model, settings.cloud_timeout) == (
        None, None, None)


# -- secrets -------------------------------------------------------------------------------------


def test_passwords_in_urls_never_reach_reprs_errors_or_saved_files(tmp_path):
    host = f"http://admin:{SECRET}@gpu-box:11434"
    endpoint = f"https://svc:{SECRET}@bedrock.internal:8443"
    settings = RouterSettings.from_env({"OLLAMA_HOST": host,
                                        "CONFIDENCE_ROUTER_BEDROCK_ENDPOINT": endpoint})
    assert settings.ollama_host == host and settings.bedrock_endpoint == endpoint  # usable
    assert SECRET not in repr(settings) and SECRET not in str(settings)
    assert "admin:***@gpu-box" in repr(settings) and "svc:***@bedrock.internal" in repr(settings)
    assert SECRET not in json.dumps(settings.to_dict())
    path = tmp_path / "saved.json"
    settings.save(path)
    assert SECRET not in path.read_text()
    # Built from a router too (to_settings reads the tiers' URLs).
    router = ConfidenceRoutedLLM.from_settings(settings)
    router.to_settings().save(path)
    assert SECRET not in path.read_text()
    assert SECRET not in repr(router)
    # Error messages quoting a bad URL mask its password too.
    for env in ({"OLLAMA_HOST": f"ftp://admin:{SECRET}@gpu-box"},
                {"CONFIDENCE_ROUTER_BEDROCK_ENDPOINT": f"ftp://svc:{SECRET}@h"}):
        with pytest.raises(RoutingConfigError) as caught:
            RouterSettings.from_env(env)
        assert SECRET not in str(caught.value) and "***" in str(caught.value)


# -- precedence: explicit > environment > file > defaults -----------------------------------------


def test_precedence_on_routed_calls(tmp_path, ollama_backend, ollama_server, bedrock_server):
    # An answer of confidence ~0.94 (mean logprob -0.1): kept at threshold 0.5, escalated
    # at 0.99. The file says 0.99, the environment 0.5, the explicit argument 0.99 again.
    ollama_backend.add_answer("Peru", "Lima", logprobs=-0.1)
    bedrock_server.add_answer("Peru", "Lima (cloud)")
    path = write(tmp_path, "router.toml", (
        "[confidence_router]\n"
        f'ollama_host = "{ollama_server.url}"\nlocal_model = "scripted-local"\n'
        f'bedrock_endpoint = "{bedrock_server.url}"\naws_region = "us-east-1"\n'
        "threshold = 0.99\nlocal_timeout = 30\n"
    ))

    def decision(router: ConfidenceRoutedLLM) -> str:
        return router.invoke("Capital of Peru?").response_metadata["routing"]["decision"]

    file_only = ConfidenceRoutedLLM.from_settings(path, environ={})
    assert (file_only.threshold, decision(file_only)) == (0.99, "cloud")
    env = {"CONFIDENCE_ROUTER_THRESHOLD": "0.5", "CONFIDENCE_ROUTER_LOCAL_TIMEOUT": "12"}
    env_over_file = ConfidenceRoutedLLM.from_settings(path, environ=env)
    assert (env_over_file.threshold, decision(env_over_file)) == (0.5, "local")
    assert env_over_file.local_timeout == 12
    explicit = ConfidenceRoutedLLM.from_settings(path, environ=env, threshold=0.99)
    assert (explicit.threshold, decision(explicit)) == (0.99, "cloud")
    # Defaults where nobody said anything.
    assert (explicit.signal, explicit.on_unknown) == ("mean_min", "escalate")
    assert len(ollama_server.requests_to("/api/chat")) == 3
    assert len(bedrock_server.requests) == 2
    # An explicit path beats $CONFIDENCE_ROUTER_CONFIG.
    other = write(tmp_path, "other.toml", "threshold = 0.3\n")
    settings = RouterSettings.load(path, environ={"CONFIDENCE_ROUTER_CONFIG": str(other)})
    assert settings.threshold == 0.99


def test_confidence_router_ollama_host_beats_ollama_host():
    settings = RouterSettings.from_env({"OLLAMA_HOST": "http://a:1",
                                        "CONFIDENCE_ROUTER_OLLAMA_HOST": "http://b:2"})
    assert settings.ollama_host == "http://b:2"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [({"threshold": "0.9"}, "threshold"), ({"local_timeout": math.nan}, "local_timeout"),
     ({"treshold": 0.9}, "did you mean 'threshold'")],
)
def test_explicit_overrides_are_validated(overrides, match, ollama_server, bedrock_server):
    with pytest.raises(RoutingConfigError, match=match):
        ConfidenceRoutedLLM.from_settings(environ={}, **overrides)
    assert no_requests(ollama_server, bedrock_server)


# -- per-call kwargs and LCEL configurable: the same validation, before any request --------------

BAD_KNOBS = [
    ("threshold", math.nan), ("threshold", math.inf), ("threshold", "0.9"), ("threshold", True),
    ("threshold", None), ("precheck_threshold", 1.0000001), ("signal", ""),
    ("on_unknown", None), ("on_cloud_error", "LOCAL"), ("allow_escalation", "false"),
    ("early_exit", 1), ("on_budget_exceeded", "cloud"),
]


@pytest.fixture
def router(ollama_chat, bedrock_chat):
    return ConfidenceRoutedLLM(local=ollama_chat(), cloud=bedrock_chat())


@pytest.mark.parametrize(("knob", "value"), BAD_KNOBS)
async def test_bad_knobs_per_call_and_in_lcel_fail_before_any_request(
    router, ollama_server, bedrock_server, knob, value
):
    kwargs = {knob: value}
    calls = {
        "invoke": lambda: router.invoke("hi", **kwargs),
        "stream": lambda: list(router.stream("hi", **kwargs)),
        "batch": lambda: router.batch(["hi", "ho"], **kwargs),
        "bound": lambda: router.bind(**kwargs),
        "tools": lambda: router.bind_tools([]).invoke("hi", **kwargs),
    }
    for name, call in calls.items():
        with pytest.raises(RoutingConfigError, match=knob):
            call()
        assert no_requests(ollama_server, bedrock_server), name
    with pytest.raises(RoutingConfigError, match=knob):
        await router.ainvoke("hi", **kwargs)
    with pytest.raises(RoutingConfigError, match=knob):
        async for _ in router.astream("hi", **kwargs):
            pass
    configurable = router.configurable_fields(**{knob: ConfigurableField(id="knob")})
    config = {"configurable": {"knob": value}}
    with pytest.raises(RoutingConfigError, match=knob):
        configurable.invoke("hi", config)
    with pytest.raises(RoutingConfigError, match=knob):
        await configurable.abatch(["hi"], config)
    with pytest.raises(RoutingConfigError, match=knob):
        list(configurable.bind_tools([]).stream("hi", config))
    assert no_requests(ollama_server, bedrock_server)


@pytest.mark.parametrize("value", [math.nan, math.inf, -1, 0, "abc"])
def test_bad_timeouts_in_lcel_fail_before_any_request(router, ollama_server, bedrock_server,
                                                     value):
    configurable = router.configurable_fields(local_timeout=ConfigurableField(id="lt"),
                                              cloud_timeout=ConfigurableField(id="ct"))
    for key, name in (("lt", "local_timeout"), ("ct", "cloud_timeout")):
        with pytest.raises(RoutingConfigError, match=name):
            configurable.invoke("hi", {"configurable": {key: value}})
    assert no_requests(ollama_server, bedrock_server)


def test_proxy_settings_never_show_keys_or_passwords():
    # The proxy's CONFIDENCE_ROUTER_* settings: its repr showed the bearer keys and the Redis
    # and Chroma passwords, and a bad Chroma URL's error its password.
    from confidence_router.proxy.config import ProxyConfig

    config = ProxyConfig.from_env({
        "CONFIDENCE_ROUTER_PROXY_API_KEYS": f"sk-{SECRET}-1,sk-{SECRET}-2",
        "CONFIDENCE_ROUTER_REDIS_URL": f"redis://:{SECRET}@cache:6379/0",
        "CONFIDENCE_ROUTER_CHROMA_URL": f"http://svc:{SECRET}@chroma:8000",
        "CONFIDENCE_ROUTER_EMBEDDING_MODEL": "nomic-embed-text",
    })
    assert config.api_keys == (f"sk-{SECRET}-1", f"sk-{SECRET}-2")  # still usable
    assert config.redis_url == f"redis://:{SECRET}@cache:6379/0"
    assert SECRET not in repr(config) and SECRET not in str(config)
    assert "api_keys=('***', '***')" in repr(config)
    assert "redis://:***@cache:6379/0" in repr(config)
    with pytest.raises(RoutingConfigError) as caught:
        ProxyConfig.from_env({"CONFIDENCE_ROUTER_CHROMA_URL": f"ftp://svc:{SECRET}@chroma",
                              "CONFIDENCE_ROUTER_EMBEDDING_MODEL": "nomic-embed-text"})
    assert SECRET not in str(caught.value) and "chroma_url" in str(caught.value)


@pytest.mark.parametrize("given", [{"threshold": 0.8}, 123, b"router.toml"],
                         ids=["dict", "int", "bytes"])
def test_from_settings_with_neither_settings_nor_a_path(given, ollama_server, bedrock_server):
    # It was a bare TypeError from pathlib.
    with pytest.raises(RoutingConfigError, match="path"):
        ConfidenceRoutedLLM.from_settings(given, environ={})
    assert no_requests(ollama_server, bedrock_server)


def test_explicit_tier_settings_override_file_and_environment(
    tmp_path, ollama_backend, ollama_server, bedrock_server
):
    # from_settings(path, local_model=...) was refused ("unknown router field"): the tier
    # settings are replaced in the settings like the knobs are, explicit > env > file.
    ollama_backend.add_answer("Peru", "Lima", logprobs=-3.0)  # escalates at any threshold
    bedrock_server.add_answer("Peru", "Lima (cloud)")
    path = write(tmp_path, "router.toml", (
        'ollama_host = "http://127.0.0.1:9"\nlocal_model = "from-file"\n'
        'bedrock_endpoint = "http://127.0.0.1:9"\ncloud_model = "from.file-v1"\n'
    ))
    env = {"CONFIDENCE_ROUTER_LOCAL_MODEL": "from-env"}
    router = ConfidenceRoutedLLM.from_settings(
        path, environ=env, local_model="explicit-local", ollama_host=ollama_server.url,
        bedrock_endpoint=bedrock_server.url, cloud_model="anthropic.claude-3-haiku-20240307-v1:0",
        aws_region="eu-west-1", threshold=0.8, local_timeout=30,
    )
    answer = router.invoke("Capital of Peru?")
    assert answer.content == "Lima (cloud)"
    assert [r["body"]["model"] for r in ollama_server.requests_to("/api/chat")] == [
        "explicit-local"
    ]
    assert len(bedrock_server.requests) == 1
    assert bedrock_server.requests[0]["model_id"] == "anthropic.claude-3-haiku-20240307-v1:0"
    assert router.threshold == 0.8
    # cloud_model=None: no cloud tier at all.
    local_only = ConfidenceRoutedLLM.from_settings(path, environ={}, cloud_model=None)
    assert local_only.cloud is None


def test_explicit_tier_models_replace_the_settings_ones(ollama_backend, ollama_server):
    from langchain_ollama import ChatOllama

    ollama_backend.add_answer("Peru", "Lima", logprobs=-0.01)
    mine = ChatOllama(model="my-own", base_url=ollama_server.url, logprobs=True)
    router = ConfidenceRoutedLLM.from_settings(environ={}, local=mine, cloud=None)
    assert router.local.model == "my-own" and router.cloud is None
    assert router.invoke("Capital of Peru?").content == "Lima"
    assert [r["body"]["model"] for r in ollama_server.requests_to("/api/chat")] == ["my-own"]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [({"local_model": ""}, "local_model"), ({"ollama_host": "ftp://x"}, "ollama_host"),
     ({"aws_region": "us west 2"}, "aws_region"), ({"cloud_max_tokens": 0}, "cloud_max_tokens"),
     ({"cloud_model": 3}, "cloud_model")],
)
def test_explicit_tier_settings_are_validated(overrides, match, ollama_server, bedrock_server):
    with pytest.raises(RoutingConfigError, match=match):
        ConfidenceRoutedLLM.from_settings(environ={}, **overrides)
    assert no_requests(ollama_server, bedrock_server)
