"""Build a router from plain settings: environment variables and/or a TOML or JSON file.

>>> from confidence_router.settings import RouterSettings
>>> s = RouterSettings.from_env({"CONFIDENCE_ROUTER_THRESHOLD": "0.8"})
>>> s.threshold, s.local_model
(0.8, 'qwen2.5:7b')

Build a router with ``ConfidenceRoutedLLM.from_settings(settings)`` (or a path, or nothing:
the environment).

Environment variables (all optional):

============================================ ==============================================
``CONFIDENCE_ROUTER_LOCAL_MODEL``            Ollama model name (default ``qwen2.5:7b``)
``OLLAMA_HOST``                              Ollama base URL (default ``http://127.0.0.1:11434``)
``CONFIDENCE_ROUTER_CLOUD_MODEL``            Bedrock model id; ``none`` disables the cloud
``AWS_REGION`` / ``AWS_DEFAULT_REGION``      Bedrock region (default ``us-west-2``)
``CONFIDENCE_ROUTER_BEDROCK_ENDPOINT``       Bedrock endpoint URL override (tests, VPC)
``CONFIDENCE_ROUTER_CLOUD_MAX_TOKENS``       the cloud's ``max_tokens`` (needed by budgets)
``CONFIDENCE_ROUTER_LOCAL_TIMEOUT``          seconds (default 60); ``CLOUD_TIMEOUT`` likewise
``CONFIDENCE_ROUTER_THRESHOLD``              and every other policy knob, upper-cased
``CONFIDENCE_ROUTER_CONFIG``                 path of a TOML/JSON file read by ``from_settings``
============================================ ==============================================

A ``CONFIDENCE_ROUTER_*`` variable that names no setting (``CONFIDENCE_ROUTER_TRESHOLD``) is a
:class:`~confidence_router.errors.RoutingConfigError`, not silently ignored. Credentials never
go into saved settings, reprs or error messages: a password in ``ollama_host`` or
``bedrock_endpoint`` (``http://user:pass@host``) is written as ``***``; pass it through
``OLLAMA_HOST`` instead. A blank value never switches off what is on by default
(``CONFIDENCE_ROUTER_LOCAL_TIMEOUT=""`` is an error, not "no timeout"): write ``none``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from confidence_router.errors import RoutingConfigError
from confidence_router.policy import DEFAULT_POLICY, RoutingPolicy, unknown_names_message

DEFAULT_LOCAL_MODEL = "qwen2.5:7b"
DEFAULT_OLLAMA_HOST = "http://127.0.0.1:11434"
DEFAULT_CLOUD_MODEL = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
DEFAULT_REGION = "us-west-2"
DEFAULT_LOCAL_TIMEOUT = 60.0
ENV_PREFIX = "CONFIDENCE_ROUTER_"
#: The table of a settings file that holds the settings (else the file's top level does).
FILE_TABLE = "confidence_router"
#: A settings file larger than this is refused unread (a wrong path, e.g. a model file).
MAX_SETTINGS_FILE_BYTES = 1 << 20
#: Bedrock's ``maxTokens`` is a 32-bit integer.
MAX_CLOUD_MAX_TOKENS = 2**31 - 1
#: An AWS region name (botocore refuses anything else when the client is built).
_REGION_RE = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$")

#: ``CONFIDENCE_ROUTER_*`` variables read by other parts of the library (not settings).
OTHER_ENV_VARS = frozenset(
    {
        "CONFIG",
        "HOME",
        "DATA_DIR",
        "KNOWLEDGE_PATH",
        "EMBED_MODEL",
        # the proxy's own settings (confidence_router.proxy.config)
        "REDIS_URL",
        "REDIS_PREFIX",
        "BUDGET_USD",
        "BUDGET_WINDOW_S",
        "TARGET_RATE",
        "CHROMA_URL",
        "EMBEDDING_MODEL",
        "PROXY_API_KEYS",
        "PROXY_MAX_BODY_BYTES",
        "PROXY_MODEL",
        "PROXY_TIMEOUT_S",
    }
)


@dataclass(frozen=True)
class RouterSettings:
    """Everything needed to build a :class:`ConfidenceRoutedLLM` from plain values.

    Invalid values raise :class:`~confidence_router.errors.RoutingConfigError` at construction.

    >>> settings = RouterSettings(local_model="llama3.2:1b", threshold=0.8, cloud_model=None)
    >>> settings.policy().threshold
    0.8
    >>> RouterSettings.from_mapping({"threshold": "0.9"}).threshold  # strings as in files
    0.9

    ``ConfidenceRoutedLLM.from_settings(settings)`` builds the router;
    :meth:`load` reads a TOML/JSON file and ``CONFIDENCE_ROUTER_*`` variables.
    """

    local_model: str = DEFAULT_LOCAL_MODEL
    ollama_host: str = DEFAULT_OLLAMA_HOST
    cloud_model: str | None = DEFAULT_CLOUD_MODEL
    aws_region: str = DEFAULT_REGION
    bedrock_endpoint: str | None = None
    cloud_max_tokens: int | None = None
    local_timeout: float | None = DEFAULT_LOCAL_TIMEOUT
    cloud_timeout: float | None = None
    # The policy knobs; their defaults come from RoutingPolicy (declared once, there).
    threshold: float = DEFAULT_POLICY.threshold
    signal: str = DEFAULT_POLICY.signal
    on_unknown: str = DEFAULT_POLICY.on_unknown
    on_cloud_error: str = DEFAULT_POLICY.on_cloud_error
    precheck_threshold: float = DEFAULT_POLICY.precheck_threshold
    allow_escalation: bool = DEFAULT_POLICY.allow_escalation
    on_budget_exceeded: str = DEFAULT_POLICY.on_budget_exceeded
    early_exit: bool = DEFAULT_POLICY.early_exit

    def __post_init__(self) -> None:
        for name in ("local_model", "ollama_host", "aws_region", "cloud_model", "bedrock_endpoint"):
            value = getattr(self, name)
            optional = name in ("cloud_model", "bedrock_endpoint")
            if not isinstance(value, str) and not (optional and value is None):
                raise RoutingConfigError(f"{name} must be a string, got {value!r}")
        if not self.local_model.strip():
            raise RoutingConfigError("local_model must not be empty")
        for name in ("ollama_host", "bedrock_endpoint"):
            url = getattr(self, name)
            if url is not None and not url.startswith(("http://", "https://")):
                raise RoutingConfigError(
                    f"{name} must be an http(s) URL, got {redact_url(url)!r}"
                )
        if not _REGION_RE.match(self.aws_region):
            raise RoutingConfigError(
                f"aws_region must be an AWS region name (e.g. us-west-2), got {self.aws_region!r}"
            )
        for name in ("local_timeout", "cloud_timeout"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise RoutingConfigError(
                    f"{name} must be a finite number of seconds > 0 or None, got {value!r}"
                )
        if self.cloud_max_tokens is not None and (
            isinstance(self.cloud_max_tokens, bool)
            or not isinstance(self.cloud_max_tokens, int)
            or not 0 < self.cloud_max_tokens <= MAX_CLOUD_MAX_TOKENS
        ):
            raise RoutingConfigError(
                f"cloud_max_tokens must be a positive int up to {MAX_CLOUD_MAX_TOKENS}, "
                f"got {self.cloud_max_tokens!r}"
            )
        self.policy()  # validates the knobs

    def __repr__(self) -> str:
        """The dataclass repr, with any password in a URL masked."""
        values = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"{type(self).__name__}({values})"

    def policy(self) -> RoutingPolicy:
        """The routing policy these settings describe."""
        names = RoutingPolicy.knob_names()
        return RoutingPolicy(**{k: v for k, v in asdict(self).items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable values; a password in ``ollama_host`` is masked (no
        credential is ever part of saved settings)."""
        values = asdict(self)
        values["ollama_host"] = redact_url(self.ollama_host)
        if self.bedrock_endpoint is not None:
            values["bedrock_endpoint"] = redact_url(self.bedrock_endpoint)
        return values

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the settings as JSON, readable by :meth:`from_file` / :meth:`load`."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RouterSettings:
        """Settings from a dict with the field names as keys (unknown keys are an error)."""
        if not isinstance(values, Mapping):
            raise RoutingConfigError(
                f"settings must be a mapping of setting names to values, got {values!r}"
            )
        known = {f.name: f for f in fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise RoutingConfigError(unknown_names_message(unknown, known, what="setting"))
        converted = {
            k: _convert(k, v, known[k].type, known[k].default) for k, v in values.items()
        }
        return cls(**converted)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RouterSettings:
        """Settings from environment variables (see the module docstring)."""
        return cls.from_mapping(_env_values(os.environ if environ is None else environ))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> RouterSettings:
        """Settings from a TOML (``[confidence_router]`` table or top level) or JSON file."""
        if not isinstance(path, (str, os.PathLike)):
            hint = " (for a dict, use RouterSettings.from_mapping)" if isinstance(path, Mapping) else ""
            raise RoutingConfigError(
                f"a settings file is given by its path (a str or os.PathLike), got "
                f"{type(path).__name__}{hint}"
            )
        file = Path(path)
        if file.is_dir():
            raise RoutingConfigError(f"settings file {file} is a directory, not a file")
        if not file.is_file():
            raise RoutingConfigError(f"settings file not found: {file}")
        try:
            size = file.stat().st_size
            if size > MAX_SETTINGS_FILE_BYTES:
                raise RoutingConfigError(
                    f"settings file {file} is {size} bytes, more than the "
                    f"{MAX_SETTINGS_FILE_BYTES} a settings file may have: is it the right file?"
                )
            raw = file.read_bytes()
        except OSError as error:
            raise RoutingConfigError(f"cannot read settings file {file}: {error}") from error
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise RoutingConfigError(
                f"settings file {file} is not UTF-8 text ({error.reason} at byte {error.start})"
            ) from None
        try:
            if file.suffix == ".json":
                data = json.loads(text)
            else:
                data = _load_toml(text)
        except (ValueError, RecursionError) as error:
            problem = "nested too deeply" if isinstance(error, RecursionError) else error
            raise RoutingConfigError(f"cannot parse settings file {file}: {problem}") from None
        if not isinstance(data, dict):
            raise RoutingConfigError(f"settings file {file} must hold a table/object")
        if FILE_TABLE in data:
            outside = sorted(set(data) - {FILE_TABLE})
            if outside:
                # Read from the table only, they would be ignored without a word.
                raise RoutingConfigError(
                    f"settings file {file} has settings outside its [{FILE_TABLE}] table: "
                    f"{outside}; move them into the table"
                )
            data = data[FILE_TABLE]
            if not isinstance(data, dict):
                raise RoutingConfigError(
                    f"[{FILE_TABLE}] in settings file {file} must be a table/object, "
                    f"got {data!r}"
                )
        return cls.from_mapping(data)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> RouterSettings:
        """File settings (``path`` or ``$CONFIDENCE_ROUTER_CONFIG``), overridden by env vars."""
        env = os.environ if environ is None else environ
        path = path or env.get(ENV_PREFIX + "CONFIG")
        base = asdict(cls.from_file(path)) if path else {}
        return cls.from_mapping({**base, **_env_values(env)})

    def tier_models(self) -> tuple[Any, Any]:
        """The tiers these settings describe: ``(ChatOllama, ChatBedrockConverse | None)``.

        The framework clients are imported here, not at module import.
        """
        from langchain_ollama import ChatOllama

        local = ChatOllama(
            model=self.local_model, base_url=self.ollama_host, temperature=0, logprobs=True
        )
        cloud = None
        if self.cloud_model:
            from langchain_aws import ChatBedrockConverse

            cloud_kwargs: dict[str, Any] = {
                "model": self.cloud_model,
                "region_name": self.aws_region,
                "temperature": 0,
            }
            if self.bedrock_endpoint:
                cloud_kwargs["endpoint_url"] = self.bedrock_endpoint
            if self.cloud_max_tokens:
                cloud_kwargs["max_tokens"] = self.cloud_max_tokens
            cloud = ChatBedrockConverse(**cloud_kwargs)
        return local, cloud

    def router_fields(self) -> dict[str, Any]:
        """The router's fields these settings set: every knob and the tier timeouts."""
        knobs = {k: getattr(self, k) for k in RoutingPolicy.knob_names()}
        return {**knobs, "local_timeout": self.local_timeout, "cloud_timeout": self.cloud_timeout}


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Refuse ``CONFIDENCE_ROUTER_*`` variables that nothing reads (``CONFIDENCE_ROUTER_TRESHOLD``,
    ``CONFIDENCE_ROUTER_DATA_DRI``): a :class:`~confidence_router.errors.RoutingConfigError`
    naming each as it was spelt, with the closest known variable as a hint.

    Every settings load checks the environment; so does every ``confidence-router`` command.
    """
    env = os.environ if environ is None else environ
    names = {f.name.upper() for f in fields(RouterSettings)} | OTHER_ENV_VARS
    stray = {key for key in env if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX):] not in names}
    if stray:
        # Reported as set (CONFIDENCE_ROUTER_threshold), with the right spelling as the hint.
        raise RoutingConfigError(
            unknown_names_message(stray, {ENV_PREFIX + n for n in names},
                                  what="environment variable")
        )


def _env_values(env: Mapping[str, str]) -> dict[str, str]:
    """The settings that the environment sets, as raw strings."""
    check_environment(env)
    values = {
        f.name: env[ENV_PREFIX + f.name.upper()]
        for f in fields(RouterSettings)
        if ENV_PREFIX + f.name.upper() in env
    }
    if "ollama_host" not in values and env.get("OLLAMA_HOST"):
        values["ollama_host"] = _normalise_host(env["OLLAMA_HOST"])
    if "aws_region" not in values:
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if region:
            values["aws_region"] = region
    return values


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for files, logs and databases).

    >>> redact_url("http://admin:s3cret@gpu-box:11434")
    'http://admin:***@gpu-box:11434'
    >>> redact_url("http://admin:s3cret@[::1]:11434")
    'http://admin:***@[::1]:11434'

    Only the password is replaced; host and port are kept as written (an IPv6 host keeps its
    brackets). A URL that cannot be parsed (an unclosed ``[``, a port that is not a number)
    is redacted too: everything between ``scheme://`` and the last ``@`` of its authority
    that follows a ``:`` is the password.
    """
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        # No structured parse: mask the authority's password by hand (never return it).
        return _UNPARSED_PASSWORD.sub(r"\1:***@", url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    username = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{username}:***@{hostport}"))


# ``scheme://user:password@`` in a URL urllib cannot parse: the authority ends at the first
# ``/``, ``?`` or ``#``; the password runs to its last ``@``.
_UNPARSED_PASSWORD = re.compile(r"(^[A-Za-z][\w+.-]*://[^/?#@:]*):[^/?#]*@")


def redact_urls(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***`` (for reprs and
    messages that embed URLs).

    >>> redact_urls("ChatOllama(base_url='http://admin:s3cret@gpu-box:11434')")
    "ChatOllama(base_url='http://admin:***@gpu-box:11434')"
    """
    return _EMBEDDED_PASSWORD.sub(r"\1:***@", text)


_EMBEDDED_PASSWORD = re.compile(r"([A-Za-z][\w+.-]*://[^/?#@:\s'\"]*):[^/?#@\s'\"]*@")


def _normalise_host(host: str) -> str:
    # Ollama accepts OLLAMA_HOST without a scheme ("0.0.0.0:11434"); the client needs a URL.
    return host if "://" in host else f"http://{host}"


def _load_toml(text: str) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads(text)


def _convert(name: str, value: Any, annotation: Any, default: Any = None) -> Any:
    """Convert a string from the environment to the field's type, with a clear error.

    A blank string stands for ``None`` only where ``None`` is the default: it never switches
    off what is on by default (a ``local_timeout``, the cloud model); ``none`` / ``off`` do.
    """
    if not isinstance(value, str):
        return value
    kind = str(annotation)
    text = value.strip()
    if not text and default is not None and "None" in kind:
        raise RoutingConfigError(
            f"{name} is blank: unset it for the default ({default!r}), or write 'none'"
        )
    if "int" in kind and "float" not in kind:
        if text.lower() in {"", "none", "null"} and "None" in kind:
            return None
        try:
            return int(text)
        except ValueError:
            raise RoutingConfigError(f"{name} must be an integer, got {value!r}") from None
    if "float" in kind:
        if text.lower() in {"", "none", "null", "off"} and "None" in kind:
            return None
        try:
            return float(text)
        except ValueError:
            raise RoutingConfigError(f"{name} must be a number, got {value!r}") from None
    if "bool" in kind:
        lowered = text.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise RoutingConfigError(f"{name} must be true or false, got {value!r}")
    if "None" in kind and text.lower() in {"", "none", "null", "off"}:
        return None
    return text
