"""A real local model behind the Ollama-compatible server: llama.cpp with per-token logprobs.

:class:`LlamaCppBackend` implements :class:`~confidence_router.serving.protocol.ChatBackend`
on top of ``llama-cpp-python`` (0.3.x from 0.3.36, the ``embedded`` extra). It is meant for the
embedded default model, Google Gemma 3 270M **base** (Q4_K_M GGUF), but loads any GGUF.

Usage::

    from confidence_router.embedded import default_model_path
    from confidence_router.serving.llamacpp import LlamaCppBackend
    from confidence_router.serving.ollama_server import OllamaCompatibleServer
    from langchain_ollama import ChatOllama

    backend = LlamaCppBackend(str(default_model_path()))      # ~0.6-1 s, ~0.37 GB RSS
    with OllamaCompatibleServer(backend) as server:
        llm = ChatOllama(base_url=server.url, model="gemma3:270m",
                         logprobs=True, top_logprobs=3)
        msg = llm.invoke("What is the capital of France?")    # " Paris"
        msg.response_metadata["logprobs"]                       # one entry per token

    # or without HTTP (the evaluation harness):
    reply = backend.complete("The country of Novosibirsk is", stop=["\\n", "."])
    tokens = list(reply.tokens)

**Prompt rendering.** A base model has no chat template, so chat messages are rendered into a
few-shot prompt and generation stops at the first newline. Which template is used is chosen
explicitly by the *model name* of the request, as an Ollama Modelfile binds a ``TEMPLATE`` to a
model tag (:data:`PROMPT_TEMPLATES`):

* ``gemma3:270m`` -- the backend's ``prompt_template`` (default :func:`render_prompt`:
  ``Q:``/``A:`` demonstrations, for questions);
* ``gemma3:270m-qa`` -- :func:`render_prompt`, whatever the default is;
* ``gemma3:270m-trivia`` -- :func:`render_trivia_prompt`: the evaluation's ``few-shot-v3``
  question prompt (eight short trivia ``Question:``/``Answer:`` demonstrations);
* ``gemma3:270m-completion`` -- :func:`render_completion_prompt` (plain completion sentences,
  for prompts such as "The capital of Kenya is");
* ``gemma3:270m-raw`` -- :func:`render_raw_prompt`: Ollama's ``raw`` semantics, the messages'
  text is the prompt, byte for byte (the caller rendered it, e.g. the evaluation harness).

An ``/api/generate`` request with ``"raw": true`` uses :func:`render_raw_prompt` whatever the
model name, as Ollama skips the template (and the system prompt) for it. The text of a message
never selects a template. :meth:`LlamaCppBackend.complete` takes any raw prompt without HTTP.

**Token texts are kept exactly as the model produces them**: an answer usually starts with a
space (``" Paris"``) because the prompt ends with ``"A:"``. Nothing is stripped, so the
concatenated token texts are the reply text and every token keeps its own logprob; strip the
final answer text on the client side if needed. The one exception is a byte token carrying
part of a UTF-8 character: it adds ``""`` and the token completing the character adds all
of it, while its ``logprobs`` entry shows the token itself, as Ollama does and as the same
token among the alternatives: its bytes (``bytes``) and their text with U+FFFD (``token``).
The entries' ``bytes`` concatenate to the reply text's bytes (unless the answer ends inside a
character, whose incomplete bytes are not text).

**Fast logprob path.** The model is loaded with ``logits_all=False``; the prompt is evaluated
once, then each step reads only the last position's logits (:func:`last_logits`), computes a
float64 log-softmax in numpy, picks the next token and evaluates just that token. This avoids
llama-cpp-python's built-in logprob support, which needs ``logits_all=True`` (an
n_ctx x 262,144 float buffer, 2-6 s per short answer on this model), and ``Llama.scores``,
which is *not filled* with ``logits_all=False`` (reading it gives uniform logprobs of -12.477).

Supported Ollama ``options``: ``temperature`` (default 0 = greedy, unlike Ollama's 0.8, because
confidence is defined on the greedy answer; with ``temperature > 0`` the next token is sampled
from ``softmax(logits / T)`` but the *reported* logprobs always come from the untempered
distribution), ``seed`` (a negative seed, Ollama's default -1, means none), ``num_predict``
(default ``max_tokens_default``; ``<= 0`` means "until the context is full") and ``stop`` (a
string or a list; the stop text is not included in the reply, as in Ollama). Other options (``top_k``, ``top_p``, ``num_ctx``, ...) are ignored.
Requests with ``tools``, a ``format`` or ``think`` are rejected with status 400 (a 270M base
model can do none of them; Ollama also answers 400 "does not support tools" / "thinking"), as
is an ``/api/generate`` ``suffix`` ("does not support insert"); ``/api/show`` reports the
capabilities ``["completion"]``. An ``/api/generate`` ``template`` replaces the model name's
prompt template; :func:`render_ollama_template` renders the common subset of Ollama's Go
templates and anything else is a 400.
"""

from __future__ import annotations

import codecs
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from confidence_router._extras import missing_extra
from confidence_router.errors import InvalidArgumentError
from confidence_router.gsa import (
    GSA_V2_QUESTION_LAST_PROMPT_TEMPLATE,
    GSA_V2_QUESTION_LAST_VERSION,
    GSA_V2_VERSION,
    GSA_V3_QUESTION_LAST_VERSION,
    GSA_V3_VERSION,
    GSA_VERSIONS,
)
from confidence_router.serving.cpu import IdleCores, batch_threads
from confidence_router.serving.protocol import (
    BackendError,
    ChatReply,
    ChatRequest,
    GeneratedToken,
)

if TYPE_CHECKING:  # numpy and llama_cpp are optional (the "embedded" extra): import lazily
    import numpy as np
    from llama_cpp import Llama
    from typing_extensions import Self

__all__ = [
    "COMPLETION_FEW_SHOT_PREFIX",
    "FEW_SHOT_PREFIX",
    "MAX_TOP_LOGPROBS",
    "PROMPT_TEMPLATES",
    "PROMPT_TEMPLATE_VERSIONS",
    "TRIVIA_FEW_SHOT_PREFIX",
    "YES_NO_QUESTION_LAST_TEMPLATE",
    "YES_NO_TEMPLATE",
    "LlamaCppBackend",
    "PrefixCacheStats",
    "PromptTemplate",
    "last_logits",
    "log_softmax",
    "model_variant",
    "render_completion_prompt",
    "render_ollama_template",
    "render_prompt",
    "render_raw_prompt",
    "render_trivia_prompt",
    "yes_no_template",
]

#: The constant few-shot prefix that teaches the base model the ``Q:``/``A:`` format for
#: questions (short, factual, one line). Measured on 1000 TriviaQA questions: ~10% correct.
FEW_SHOT_PREFIX = (
    "Q: What is the capital of Italy?\nA: Rome\nQ: Who wrote Hamlet?\nA: William Shakespeare\n"
)

#: Trivia-style demonstrations for questions in the evaluation harness's ``few-shot-v3`` set:
#: eight short questions with short entity answers (a name, a place, a year, a thing), in the
#: ``Question:``/``Answer:`` form TriviaQA itself uses. Chosen on TriviaQA rows 1000-1399 over
#: the two ``Q:``/``A:`` pairs of :data:`FEW_SHOT_PREFIX` (the answers get shorter, so the
#: answer-probability signals separate right from wrong better) and confirmed on rows
#: 1400-2999 and the report's rows 0-999; none of the eight is a TriviaQA question.
TRIVIA_FEW_SHOT_PREFIX = (
    "Question: Which planet is known as the Red Planet?\nAnswer: Mars\n"
    "Question: Who wrote Hamlet?\nAnswer: William Shakespeare\n"
    "Question: What is the capital of Italy?\nAnswer: Rome\n"
    "Question: Which element has the chemical symbol Fe?\nAnswer: Iron\n"
    "Question: In which country is the Taj Mahal?\nAnswer: India\n"
    "Question: Who painted the ceiling of the Sistine Chapel?\nAnswer: Michelangelo\n"
    "Question: In which year did the First World War begin?\nAnswer: 1914\n"
    "Question: Which animal is known as the ship of the desert?\nAnswer: Camel\n"
)

#: Plain completion demonstrations for prompts that are sentences to complete ("The capital
#: of Kenya is"): one fact per line, each ending with a full stop, so the model answers in
#: the same shape and stops at the newline. None of the three is a row of the Wikidata
#: evaluation set. Measured with the embedded Gemma 3 270M, completion prompts answered after
#: plain sentences are more often right, and their logprobs separate right from wrong better,
#: than after ``Q:``/``A:`` pairs (see docs/results/embedded-gemma3-270m.md).
COMPLETION_FEW_SHOT_PREFIX = (
    "The country of Big Ben is United Kingdom.\n"
    "The author of Hamlet is William Shakespeare.\n"
    "The chemical symbol of gold is Au.\n"
)

#: The GSA self-assessment probe for this base model: the trivia few-shot prefix, two YES/NO
#: demonstrations in the exact GSA v2 format, then the probe prompt. A base model has no chat
#: template to follow "Respond with exactly one token: YES or NO"; without demonstrations
#: Gemma 3 270M answers " A" (unreadable, neutral). The rendered text is the whole prompt: send
#: it to the raw variant of the model, ``SelfAssessmentProbe(model=ChatOllama(model=
#: model_variant("gemma3:270m", "raw"), ...), message_template=YES_NO_TEMPLATE)``.
YES_NO_TEMPLATE = (
    FEW_SHOT_PREFIX
    + "Q: The user has asked the following question:\nWhat is the capital of France?\n\n"
    "Are you confident you can answer this question correctly? Respond with exactly one "
    "token: YES or NO.\nA: YES\n"
    "Q: The user has asked the following question:\nWhat was the maiden name of the "
    "grandmother of the 9th-century poet Abu Tammam?\n\nAre you confident you can answer "
    "this question correctly? Respond with exactly one token: YES or NO.\nA: NO\n"
    "Q: {prompt}\nA:"
)

# The demonstrations of YES_NO_TEMPLATE, with the question and its answer.
_YES_NO_DEMONSTRATIONS = (
    ("What is the capital of France?", "YES"),
    ("What was the maiden name of the grandmother of the 9th-century poet Abu Tammam?", "NO"),
)

#: :data:`YES_NO_TEMPLATE` for the question-last GSA versions (``gsa-v2-question-last`` /
#: ``gsa-v3-question-last``): the same few-shot prefix and demonstrations, each rendered in
#: that order and answered after a short cue on the line after the question,
#: ``"Confident:"``. Everything before the final question is constant, so the embedded
#: backend's prefix cache evaluates only the question and the cue per probe (~20 tokens on
#: TriviaQA, one batch: the cue's line is too short to be a batch of its own), instead of the
#: question and the paper's fixed GSA tail (~40). A cue is needed: after ``"\nA:"`` alone,
#: Gemma 3 270M answered the question itself in 13 of 30 TriviaQA probes. On its own line:
#: with the cue on the question's line (``"... Confident:"``), 18 of the first 200 NQ-open
#: questions (lower case, no question mark) got an unreadable probe answer (a lone space,
#: neither YES nor NO in the top 5); on its own line, 0 of 200 on each of NQ-open, TriviaQA
#: and Wikidata (measured).
YES_NO_QUESTION_LAST_TEMPLATE = (
    FEW_SHOT_PREFIX
    + "".join(
        f"Q: {GSA_V2_QUESTION_LAST_PROMPT_TEMPLATE.format(query=question)}\nConfident: "
        f"{answer}\n"
        for question, answer in _YES_NO_DEMONSTRATIONS
    )
    + "Q: {prompt}\nConfident:"
)


def yes_no_template(gsa_version: str) -> str:
    """The YES/NO demonstration template for a GSA prompt version (the embedded base model).

    :data:`YES_NO_TEMPLATE` for the paper's versions, :data:`YES_NO_QUESTION_LAST_TEMPLATE`
    for the question-last ones, so the demonstrations are in the probe's own format. Pass it
    as ``SelfAssessmentProbe(version=..., message_template=yes_no_template(version))`` and
    send it to the raw variant of the model (:func:`model_variant`).

    >>> yes_no_template("gsa-v3-question-last") == YES_NO_QUESTION_LAST_TEMPLATE
    True
    """
    if gsa_version in (GSA_V2_VERSION, GSA_V3_VERSION):
        return YES_NO_TEMPLATE
    if gsa_version in (GSA_V2_QUESTION_LAST_VERSION, GSA_V3_QUESTION_LAST_VERSION):
        return YES_NO_QUESTION_LAST_TEMPLATE
    raise InvalidArgumentError(
        f"unknown GSA version {gsa_version!r}; expected one of {GSA_VERSIONS}"
    )

#: Ollama accepts ``top_logprobs`` in 0..20.
MAX_TOP_LOGPROBS = 20

# The embedding context (tokens, the beginning-of-text token included): longer embed()
# inputs are truncated, or refused with truncate=False.
_EMBED_MAX_TOKENS = 256

# Prompts of at most this many bytes per context position are tokenized without a length
# pre-check (any real prompt); longer ones are first measured against the longest token.
_CHEAP_BYTES_PER_TOKEN = 16

#: A function that renders chat messages into the prompt text the model continues.
PromptTemplate = Callable[[Sequence[Mapping[str, Any]]], str]

_WHITESPACE = re.compile(r"\s+")

#: llama.cpp's own log lines go to this logger (see :func:`route_llama_cpp_logs`).
LLAMA_CPP_LOGGER = logging.getLogger("confidence_router.llama_cpp")
# ggml_log_level of the llama.cpp that llama-cpp-python 0.3.x bundles (ggml.h):
# NONE=0, DEBUG=1, INFO=2, WARN=3, ERROR=4, CONT=5 (continues the previous line's level).
_GGML_TO_LOGGING = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.DEBUG,
                    4: logging.ERROR}
_log_state: dict[str, Any] = {"callback": None, "last": logging.DEBUG}
_log_lock = threading.Lock()


def route_llama_cpp_logs(llama_cpp: Any) -> None:
    """Send llama.cpp's log lines to :data:`LLAMA_CPP_LOGGER` instead of stderr (idempotent).

    llama-cpp-python 0.3.x maps ggml's log levels with an outdated table, so with
    ``verbose=False`` llama.cpp's *warnings* still reach stderr (e.g. "llama_kv_cache_iswa:
    using full-size SWA cache" on every Gemma 3 load). Here only llama.cpp's errors are logged
    at ERROR; everything else at DEBUG (``logging.getLogger("confidence_router.llama_cpp")``
    to see it).
    """
    import ctypes

    with _log_lock:
        if _log_state["callback"] is not None:
            return

        @llama_cpp.llama_log_callback  # type: ignore[misc]
        def forward(level: int, text: bytes, _user_data: Any) -> None:
            python_level = _log_state["last"] if level == 5 else _GGML_TO_LOGGING.get(
                level, logging.DEBUG)
            _log_state["last"] = python_level
            if LLAMA_CPP_LOGGER.isEnabledFor(python_level):
                LLAMA_CPP_LOGGER.log(python_level, "%s",
                                     text.decode("utf-8", errors="replace").rstrip("\n"))

        _log_state["callback"] = forward  # ctypes callbacks must outlive their registration
        llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))


# ---------------------------------------------------------------------------------------------
# Prompt rendering (pure; tested without the model)
# ---------------------------------------------------------------------------------------------


def _message_text(message: Mapping[str, Any]) -> str:
    """The text of one message: a string, or the text parts of a content list."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI-style parts; images etc. are ignored
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return " ".join(parts)
    raise InvalidArgumentError(f"message content must be a string, got {type(content).__name__}")


def _one_line(text: str) -> str:
    # The template is line-based: a newline inside a question would end the "Q:" line, and the
    # model would then see a malformed example. Collapse all white space runs to one space.
    return _WHITESPACE.sub(" ", text).strip()


def _conversation(messages: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[tuple[str, str]]]:
    """Split messages into header lines (system/tool) and ``(role, one-line text)`` turns."""
    header: list[str] = []
    turns: list[tuple[str, str]] = []
    for message in messages:
        role = message.get("role")
        text = _one_line(_message_text(message))
        if role in ("system", "tool"):
            if text:
                header.append(text + "\n")
        elif role in ("user", "assistant"):
            turns.append((str(role), text))
        else:
            raise InvalidArgumentError(f"unsupported message role {role!r}")
    if not any(role == "user" for role, _ in turns):
        raise InvalidArgumentError("the conversation has no user message")
    return header, turns


def render_prompt(
    messages: Sequence[Mapping[str, Any]], *, few_shot_prefix: str = FEW_SHOT_PREFIX
) -> str:
    """Render chat messages into a few-shot ``Q:``/``A:`` prompt for a base model (questions).

    Rules, in order:

    * ``system`` messages (and ``tool`` results) become plain lines *before* the few-shot
      prefix, in order.
    * Then the few-shot prefix, then the conversation: each ``user`` message is a
      ``Q: {text}`` line and each ``assistant`` message an ``A: {text}`` line.
    * If the last message is a ``user`` message the prompt ends with ``"A:"`` (no trailing
      space: the model's answer tokens carry their own leading space). If it is an
      ``assistant`` message, the prompt ends with ``"A: {text}"`` and no newline, so the model
      continues that partial answer (Ollama's "prefill").

    Inside a turn, white space runs (including newlines) collapse to one space, because a
    newline would break the line-based format. The message text is never inspected to pick
    another template (use :func:`render_raw_prompt` for a prompt the caller rendered). Unknown
    roles raise ``ValueError``, as does a conversation without any user message.

    >>> render_prompt([{"role": "user", "content": "Who painted the Mona Lisa?"}])[-44:]
    'Shakespeare\\nQ: Who painted the Mona Lisa?\\nA:'
    """
    return _render_labelled(messages, few_shot_prefix, "Q:", "A:")


def render_trivia_prompt(
    messages: Sequence[Mapping[str, Any]], *, few_shot_prefix: str = TRIVIA_FEW_SHOT_PREFIX
) -> str:
    """Render chat messages as the evaluation's ``few-shot-v3`` question prompt: eight short
    trivia demonstrations, then ``Question: {text}`` / ``Answer:`` lines.

    The rules are those of :func:`render_prompt` with the labels ``Question:`` and
    ``Answer:``. For one user message the bytes equal the evaluation harness's question
    template, so routing through the ``-trivia`` model variant uses the prompt the committed
    report measured.

    >>> render_trivia_prompt([{"role": "user", "content": "Who painted the Mona Lisa?"}])[-50:]
    'Camel\\nQuestion: Who painted the Mona Lisa?\\nAnswer:'
    """
    return _render_labelled(messages, few_shot_prefix, "Question:", "Answer:")


def _render_labelled(
    messages: Sequence[Mapping[str, Any]], few_shot_prefix: str, question: str, answer: str
) -> str:
    header, turns = _conversation(messages)
    lines = [f"{question if role == 'user' else answer} {text}\n" for role, text in turns]
    if turns[-1][0] == "assistant":
        lines[-1] = lines[-1].rstrip("\n")  # prefill: let the model continue this answer
    else:
        lines.append(answer)
    return "".join(header) + few_shot_prefix + "".join(lines)


def render_completion_prompt(
    messages: Sequence[Mapping[str, Any]], *, few_shot_prefix: str = COMPLETION_FEW_SHOT_PREFIX
) -> str:
    """Render chat messages into a plain-completion prompt for a base model.

    For prompts that are sentences to complete ("The capital of Kenya is"): the system lines,
    then ``few_shot_prefix`` (plain demonstration sentences, one per line), then the
    conversation as sentences: each ``user`` message starts a line and a following
    ``assistant`` message continues it (``"{user} {assistant}"``). The last user message is
    left open for the model to continue; if the conversation ends with an ``assistant``
    message, the model continues that text (prefill). White space collapses as in
    :func:`render_prompt`; unknown roles and conversations without a user message raise
    ``ValueError``.

    >>> render_completion_prompt([{"role": "user", "content": "The capital of Kenya is"}])[-58:]
    'The chemical symbol of gold is Au.\\nThe capital of Kenya is'
    """
    header, turns = _conversation(messages)
    sentences: list[str] = []
    sentence_open = False  # the last sentence is a user message not yet continued
    for role, text in turns:
        if role == "assistant" and sentence_open:
            sentences[-1] = f"{sentences[-1]} {text}".rstrip()
            sentence_open = False
        else:
            sentences.append(text)
            sentence_open = role == "user"
    # The last sentence stays open (no newline): the model continues it.
    return "".join(header) + few_shot_prefix + "\n".join(sentences)


def render_raw_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
    """Ollama's ``raw`` semantics: the prompt is the messages' text, unchanged.

    The texts of all messages are concatenated in order with nothing added or removed (no
    few-shot prefix, no white-space folding), so a caller that renders its own complete
    prompt -- the evaluation harness, the GSA probe's :data:`YES_NO_TEMPLATE` -- gets exactly
    those bytes evaluated. Unknown roles raise ``ValueError``; so does an empty prompt.

    >>> render_raw_prompt([{"role": "user", "content": "The capital of Kenya is"}])
    'The capital of Kenya is'
    """
    parts = []
    for message in messages:
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise InvalidArgumentError(f"unsupported message role {role!r}")
        parts.append(_message_text(message))
    prompt = "".join(parts)
    if not prompt:
        raise InvalidArgumentError("the raw prompt is empty")
    return prompt


_TEMPLATE_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.DOTALL)
_TEMPLATE_FIELDS = (".System", ".Prompt", ".Response")


def render_ollama_template(template: str, *, system: str, prompt: str) -> str:
    """Render an Ollama prompt template (Go ``text/template``) for ``/api/generate``.

    A subset: the fields ``{{ .System }}``, ``{{ .Prompt }}`` and ``{{ .Response }}``,
    ``{{ if .System }}`` / ``{{ if .Prompt }}`` blocks with an optional ``{{ else }}``, and
    ``{{-`` / ``-}}`` white-space trimming. As Ollama renders a generate prompt, everything
    from ``{{ .Response }}`` on is left out (the model writes the response).

    >>> render_ollama_template("{{ if .System }}{{ .System }}\\n{{ end }}Q: {{ .Prompt }}\\nA:",
    ...                        system="", prompt="Capital of France?")
    'Q: Capital of France?\\nA:'

    Raises:
        InvalidArgumentError: any other action (``range``, ``.Messages``, functions, ...) or
            a malformed template: the caller asked for a prompt this renderer cannot make.
    """
    # Tokens: ("text", str) or ("action", str), with the trim markers applied to the text.
    tokens: list[tuple[str, str]] = []
    position = 0
    for match in _TEMPLATE_ACTION.finditer(template):
        text = template[position:match.start()]
        if match.group(1):
            text = text.rstrip()
        if tokens and tokens[-1][0] == "trim":
            tokens.pop()
            text = text.lstrip()
        tokens.append(("text", text))
        tokens.append(("action", match.group(2)))
        if match.group(3):
            tokens.append(("trim", ""))
        position = match.end()
    tail = template[position:]
    if tokens and tokens[-1][0] == "trim":
        tokens.pop()
        tail = tail.lstrip()
    if "{{" in tail:
        raise InvalidArgumentError(f"template: unclosed action in {tail[:40]!r}")
    tokens.append(("text", tail))
    values = {".System": system, ".Prompt": prompt, ".Response": ""}
    out: list[str] = []
    # Each open block: (whether its current branch renders, whether an else was seen).
    blocks: list[tuple[bool, bool]] = []
    for kind, value in tokens:
        active = all(shown for shown, _ in blocks)
        if kind == "text":
            if active:
                out.append(value)
            continue
        words = value.split()
        if len(words) == 1 and words[0] in _TEMPLATE_FIELDS:
            if active and words[0] == ".Response":
                return "".join(out)  # Ollama leaves out everything from here on
            if active:
                out.append(values[words[0]])
        elif len(words) == 2 and words[0] == "if" and words[1] in _TEMPLATE_FIELDS:
            blocks.append((bool(values[words[1]]), False))
        elif words == ["else"] and blocks and not blocks[-1][1]:
            shown, _ = blocks.pop()
            blocks.append((not shown, True))
        elif words == ["end"] and blocks:
            blocks.pop()
        else:
            raise InvalidArgumentError(
                f"template action {{{{ {value} }}}} is not supported: this backend renders "
                "{{ .System }}, {{ .Prompt }}, {{ .Response }} and {{ if .Field }} ... "
                "{{ else }} ... {{ end }}"
            )
    if blocks:
        raise InvalidArgumentError("template: unexpected EOF (an {{ if }} has no {{ end }})")
    return "".join(out)


#: The prompt templates by name. The backend serves its model under its plain name (with its
#: ``prompt_template``) and under ``model_variant(name, template)`` for each of these.
PROMPT_TEMPLATES: Mapping[str, PromptTemplate] = {
    "qa": render_prompt,
    "trivia": render_trivia_prompt,
    "completion": render_completion_prompt,
    "raw": render_raw_prompt,
}

#: Version of each named template's text; bump it whenever the rendered bytes change.
PROMPT_TEMPLATE_VERSIONS: Mapping[str, str] = {
    "qa": "qa-v1",
    "trivia": "trivia-v1",
    "completion": "completion-v1",
    "raw": "raw-v1",
}


def model_variant(model_name: str, template: str) -> str:
    """The model name that selects prompt template ``template`` on a :class:`LlamaCppBackend`.

    >>> model_variant("gemma3:270m", "completion")
    'gemma3:270m-completion'
    """
    if template not in PROMPT_TEMPLATES:
        raise InvalidArgumentError(
            f"unknown prompt template {template!r}; choose one of {sorted(PROMPT_TEMPLATES)}"
        )
    base = model_name.removesuffix(":latest")
    return f"{base}-{template}"


# ---------------------------------------------------------------------------------------------
# The logits fast path
# ---------------------------------------------------------------------------------------------


def last_logits(llm: Llama) -> np.ndarray:
    """The logits of the last evaluated position as a float32 numpy *view* (n_vocab,).

    This is the one adapter over llama-cpp-python's low level: the public ``Llama.ctx`` (the
    raw ``llama_context*``) and the C binding ``llama_get_logits_ith(ctx, -1)``, which returns
    a pointer into llama.cpp's output buffer (equivalent to the private
    ``Llama._ctx.get_logits_ith(-1)``). The high-level alternatives are unusable here:
    ``Llama.scores`` is only filled when the model is loaded with ``logits_all=True`` (which
    costs n_ctx x n_vocab x 4 bytes and seconds per answer); with ``logits_all=False`` it holds
    zeros and gives uniform logprobs (-12.477). Verified against llama-cpp-python 0.3.36 (the
    ``embedded`` extra allows ``>=0.3.36,<0.4``); ``tests/embedded/test_llamacpp_backend.py``
    checks it on whatever version is installed.

    The view is only valid until the next ``eval()``: copy it (``log_softmax`` does) before
    evaluating another token.
    """
    import llama_cpp
    import numpy as np

    pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    if not pointer:
        raise RuntimeError("llama.cpp returned no logits: evaluate a prompt first")
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Natural-log softmax in float64 (a copy; safe to keep after the next ``eval``).

    float64 because the vocabulary has 262,144 entries: summing that many float32
    exponentials loses precision in the log-normaliser.
    """
    import numpy as np

    values = np.asarray(logits, dtype=np.float64)  # copies the float32 view
    shifted = values - values.max()
    return shifted - math.log(float(np.exp(shifted).sum()))


def top_k_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries of a 1-D array, largest first (exact).

    ``np.argpartition`` over the 262,144-entry vocabulary costs ~3 ms per call, paid by every
    probe and every answer token that reports alternatives. This reads the maximum of each
    block of 512 entries instead, keeps the blocks whose maximum is at least the k-th largest
    block maximum, and partitions only those: at least ``k`` entries are >= that bound, so
    every one of the ``k`` largest lies in a kept block (~0.3 ms). Among equal values the
    order is unspecified, as with ``argpartition``.

    >>> import numpy as np
    >>> top_k_indices(np.array([0.1, 3.0, -1.0, 2.0]), 2).tolist()
    [1, 3]
    """
    import numpy as np

    n = values.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.empty(0, dtype=np.intp)
    width = 512
    full = n - n % width
    maxima = None
    if full >= width * max(4 * k, 64):  # enough blocks to gain something
        maxima = values[:full].reshape(-1, width).max(axis=1)
        if np.isnan(maxima).any():  # NaN compares false: search everything, as argpartition
            maxima = None
    if maxima is None:
        candidates = np.arange(n)
    else:
        bound = np.partition(maxima, len(maxima) - k)[len(maxima) - k]
        blocks = np.flatnonzero(maxima >= bound)
        candidates = (blocks[:, None] * width + np.arange(width)).ravel()
        if full < n:  # the entries past the last whole block are always candidates
            candidates = np.concatenate([candidates, np.arange(full, n)])
    chosen = values[candidates]
    best = np.argpartition(chosen, len(chosen) - k)[len(chosen) - k:]
    best = best[np.argsort(chosen[best])[::-1]]
    return candidates[best]


# ---------------------------------------------------------------------------------------------
# Stop strings over a token stream
# ---------------------------------------------------------------------------------------------


class _StopFilter:
    """Cuts a token stream at the first stop string, holding back possible partial matches.

    Text that might be the start of a stop string is held until the next token decides it,
    so a stop string split across tokens is still removed and never streamed. A token that
    straddles the stop (e.g. ``".\\n"`` with stop ``"\\n"``) is emitted truncated (``"."``)
    with its full logprob; tokens after the stop are dropped.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending: list[GeneratedToken] = []
        self._text = ""  # concatenated text of _pending
        self.stopped = False

    def push(self, token: GeneratedToken) -> list[GeneratedToken]:
        """Add a token; return the tokens that are now safe to emit."""
        self._pending.append(token)
        self._text += token.text
        hits = [i for i in (self._text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._take(min(hits), truncate=True)
        return self._take(len(self._text) - self._partial_match_length(), truncate=False)

    def flush(self) -> list[GeneratedToken]:
        """End of stream without a stop: everything held back is real output."""
        out, self._pending, self._text = self._pending, [], ""
        return out

    def _partial_match_length(self) -> int:
        # Longest suffix of the pending text that is a proper prefix of some stop string.
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _take(self, limit: int, *, truncate: bool) -> list[GeneratedToken]:
        """Emit the pending tokens that lie before character ``limit``.

        ``truncate`` (a stop was found at ``limit``): tokens starting before it are emitted,
        cut at ``limit``; the rest is dropped. Otherwise tokens are emitted in order while
        they end by ``limit``; the first one that does not, and all after it, stay pending.
        """
        out: list[GeneratedToken] = []
        position = 0
        for index, token in enumerate(self._pending):
            end = position + len(token.text)
            if truncate:
                if position >= limit:
                    break
                if end > limit:
                    # Cut at the stop: the entry shows what is left of it, not its own bytes.
                    token = GeneratedToken(
                        token.text[: limit - position], token.logprob, token.top_logprobs,
                        None, token.top_pieces,
                    )
            elif end > limit:
                self._pending = self._pending[index:]
                self._text = self._text[position:]
                return out
            out.append(token)
            position = end
        self._pending, self._text = [], ""
        return out


# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------


def _model_matches(requested: str, available: str) -> bool:
    # Ollama treats "name" and "name:latest" as the same model (as the server does).
    def norm(name: str) -> str:
        return name if ":" in name else f"{name}:latest"

    return norm(requested) == norm(available)


def _int_option(options: Mapping[str, Any], name: str) -> int | None:
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        isinstance(value, float) and not value.is_integer()  # also inf and nan (was a 500)
    ):
        raise BackendError(f"option {name} must be an integer, got {value!r}", status=400)
    return int(value)


def _render_request_template(template: str, messages: Sequence[Mapping[str, Any]]) -> str:
    """An ``/api/generate`` request's own template over its system and user messages."""
    system = "\n".join(
        _message_text(m) for m in messages if m.get("role") == "system" and _message_text(m)
    )
    prompt = "".join(_message_text(m) for m in messages if m.get("role") == "user")
    return render_ollama_template(template, system=system, prompt=prompt)


def _stop_option(options: Mapping[str, Any]) -> list[str]:
    stop = options.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise BackendError(f"option stop must be a string or a list of strings, got {stop!r}", 400)


class LlamaCppBackend:
    """A :class:`ChatBackend` running a GGUF model in-process with llama.cpp.

    Args:
        model_path: the GGUF file (for the embedded Gemma 3 270M:
            :func:`confidence_router.embedded.load_embedded_backend`, which assembles it into
            the user cache on first use).
        n_ctx: context window in tokens (prompt + answer). Longer prompts are rejected (400).
        n_threads: threads for prompt evaluation and generation. ``None`` uses half the CPU
            cores, at least 1 and at most 4: a 270M model gains little beyond that, and
            llama.cpp's OpenMP threads busy-wait, so using every core of a busy machine
            stalls badly (measured on 2 shared cores: 2 threads had 26 s worst-case answers
            where 1 thread had 2.6 s).
        n_threads_batch: threads for evaluating prompt batches (compute-bound, unlike
            generating a token). ``None`` (default) adapts per prompt: ``n_threads`` plus one
            thread for each further core that other processes left idle over the last
            quarter second (Linux ``/proc/stat``; see :mod:`confidence_router.serving.cpu`),
            at most ``2 * n_threads``; elsewhere ``n_threads``. An int fixes it (the
            attribute may be changed between requests). The thread
            count does not change results (llama.cpp splits a batch's rows between threads;
            tested bit for bit). ``batch_thread_counts`` counts the prompts per thread count.
        max_tokens_default: answer length limit when a request sets no ``num_predict``.
        model_name: the model name served (``/api/tags``), with one variant per prompt
            template (:func:`model_variant`); requests for another name get 404 like Ollama
            (as in Ollama, an untagged ``"x"`` means ``"x:latest"``).
        prompt_template: renders chat messages to a prompt for the plain ``model_name``
            (default :func:`render_prompt`); the variants use :data:`PROMPT_TEMPLATES`.
        stop_at_newline: stop every chat answer at the first newline (the ``Q:``/``A:``
            template is line-based; without it a base model goes on to invent the next
            ``Q:``). :meth:`complete` does not add it.
        prefix_cache: reuse the KV cache of the longest common token prefix with earlier
            prompts instead of evaluating every prompt from scratch (default ``True``; see
            "Prompt-prefix cache" below). ``False`` re-evaluates each prompt in full.
        prefix_slots: how many earlier prompts' KV states are kept for prefix reuse besides
            the live one (default 3: e.g. the probe's and the answer's few-shot prefixes,
            which would otherwise evict each other, and one more prompt family). A prompt
            restored from a snapshot replaces it, so one family keeps one slot. 0 keeps only
            the live state.
        prompt_batch: a prompt batch ends at every multiple of this many positions
            (default 256), so no batch is longer. See below.
        batch_at_newlines: a prompt batch also ends after every token that contains a
            newline (default ``True``), so that a cached prefix is reused up to the start of
            the first line that differs. ``False`` with a ``prompt_batch`` of at least
            ``n_ctx`` evaluates each prompt in one batch (the behaviour before the cache).

    **Prompt-prefix cache.** As llama.cpp's server and Ollama do, a request reuses the KV
    entries of the longest token prefix its prompt shares with what is in the context (the
    previous request's prompt and answer), and evaluates only the rest. Because the probe
    prompt and the answer prompt alternate in the two-stage router, the context alone would
    keep only their short shared prefix; so the KV state of recent prompts is also saved in
    ``prefix_slots`` snapshots (~0.75 MB for the ~170-token probe prompt on Gemma 3 270M) and
    restored when one shares a longer prefix with the new prompt than the live context does.

    Outputs and logprobs are identical with and without the cache (tested token for token)
    because both evaluate the same batches: llama.cpp's float results for a token depend, in
    the last bits, on the batch it was computed in (measured on Gemma 3 270M: splitting one
    prompt differently moves top logprobs by up to ~0.05). So every prompt is split at fixed
    boundaries: after every token containing a newline, and at every multiple of
    ``prompt_batch`` positions, except within its last 4 tokens (a few-shot prompt's final
    ``"A:"`` joins the line before it: each batch costs ~10 ms on top of its tokens). The
    batch ends of every cached prompt are kept, and a new prompt reuses the batches that
    ended at the same positions in both and lie in their common prefix: for few-shot
    prompts, everything up to the first line that differs (nothing is re-evaluated for
    alignment). Answer tokens (evaluated one by one) are never reused as prompt. Logprobs
    therefore differ slightly from evaluating the prompt in one batch
    (``batch_at_newlines=False, prompt_batch=n_ctx`` with the cache off: the behaviour before
    the cache existed). Measured on one busy core: ~5-7 ms per prompt token, ~10 ms per
    batch, ~25 ms more for the batch that computes the 262,144-way logits, ~35 ms per
    generated token. Gemma 3 uses sliding-window attention on most layers: a prefix is
    only reused when llama.cpp still holds all its positions (its sliding-window cache
    covers a whole 1024-token context; larger contexts get a full-size one, ``swa_full``).

    The model loads in the constructor (``load_seconds`` says how long it took). Requests
    are serialised by a lock, because a llama.cpp context is not thread-safe: a second
    request waits until the first one's token stream is exhausted or closed (a waiting
    request whose client hangs up, as the HTTP server reports, is dropped without model
    work). Consume or ``close()`` each reply's ``tokens`` in the thread that started it;
    interleaving two replies' token streams in one thread would deadlock.

    Call :meth:`close` (or use ``with``) to free the model memory early.
    """

    def __init__(
        self,
        model_path: str | None = None,
        *,
        n_ctx: int = 1024,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        max_tokens_default: int = 48,
        model_name: str = "gemma3:270m",
        prompt_template: PromptTemplate = render_prompt,
        stop_at_newline: bool = True,
        prefix_cache: bool = True,
        prefix_slots: int = 3,
        prompt_batch: int = 256,
        batch_at_newlines: bool = True,
    ) -> None:
        if prefix_slots < 0:
            raise InvalidArgumentError(f"prefix_slots must be >= 0, got {prefix_slots}")
        if prompt_batch < 1:
            raise InvalidArgumentError(f"prompt_batch must be positive, got {prompt_batch}")
        if n_ctx < 16:
            raise InvalidArgumentError(f"n_ctx must be at least 16, got {n_ctx}")
        for name, value in (("n_threads", n_threads), ("n_threads_batch", n_threads_batch)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise InvalidArgumentError(f"{name} must be a positive int or None, got {value!r}")
        if max_tokens_default < 1:
            raise InvalidArgumentError(f"max_tokens_default must be positive, got {max_tokens_default}")
        if model_path is None:
            raise InvalidArgumentError(
                "model_path is required (the embedded default model: "
                "confidence_router.embedded.load_embedded_backend())"
            )
        try:
            import llama_cpp
        except ImportError as exc:
            raise missing_extra(
                "embedded", "the llama.cpp backend (llama-cpp-python)", "llama_cpp"
            ) from exc
        route_llama_cpp_logs(llama_cpp)
        self.model_path = str(model_path)
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.n_threads_batch = n_threads_batch
        #: Prompt evaluations per number of batch threads used (see ``n_threads_batch``).
        self.batch_thread_counts: dict[int, int] = {}
        self._idle_cores = IdleCores()  # read only while n_threads_batch is None
        self._set_batch_threads = 0  # the count last given to llama.cpp
        self.max_tokens_default = max_tokens_default
        self.model_name = model_name
        self.prompt_template = prompt_template
        self.stop_at_newline = stop_at_newline
        self.prefix_cache = prefix_cache
        self.prefix_slots = prefix_slots
        self._prompt_batch = prompt_batch
        self._batch_at_newlines = bool(batch_at_newlines)
        self._newline_cache: dict[int, bool] = {}
        self.cache_stats = PrefixCacheStats()
        #: Tokens produced so far (all requests). A client that closes its stream early
        #: stops the decode loop, so this stops growing (tested through the HTTP server).
        self.generated_tokens = 0
        #: Inputs embedded so far (all requests). A client that hangs up stops a batch
        #: between inputs, so this stops growing (tested through the HTTP server).
        self.embedded_inputs = 0

        self._lock = threading.Lock()
        # Saved KV states of earlier prompts (guarded by _lock), most recently used last.
        self._snapshots: list[_Snapshot] = []
        # The batch ends of the prompt evaluated in the live context (its reusable batches).
        self._live_ends: list[int] = []
        self._embed_lock = threading.Lock()
        self._embedder: Llama | None = None
        self._piece_cache: dict[int, tuple[str, bytes]] = {}
        self._longest_token: int | None = None  # bytes; see _longest_token_bytes

        if not Path(self.model_path).is_file():
            raise FileNotFoundError(f"model file not found: {self.model_path}")
        start = time.perf_counter()
        try:
            self._llm: Llama | None = llama_cpp.Llama(
                model_path=self.model_path,
                n_ctx=n_ctx,
                n_threads=self._threads(),
                # llama-cpp-python's default for prompt batches is every core, busy or not;
                # set per prompt (_batch_threads).
                n_threads_batch=self._threads(),
                logits_all=False,  # the fast path reads the last position only
                # llama.cpp sizes the sliding-window cache at n_swa + n_ubatch positions (512 +
                # 512 for Gemma 3, i.e. all of a 1024-token context) and overwrites the oldest
                # beyond that. A larger context keeps every position (swa_full, more memory),
                # so that a reused prefix always has the positions its continuation attends
                # to; the pos_min check in _evaluate_prompt covers other models.
                swa_full=n_ctx > 1024,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:  # llama-cpp raises ValueError on a bad file
            raise InvalidArgumentError(f"could not load model {self.model_path}: {exc}") from exc
        self.load_seconds = time.perf_counter() - start

    # ---- ChatBackend -----------------------------------------------------------------------

    def models(self) -> list[str]:
        """The served model names: the plain name, then one variant per prompt template."""
        return [self.model_name, *(model_variant(self.model_name, t) for t in PROMPT_TEMPLATES)]

    def capabilities(self, model: str) -> list[str]:
        """What ``/api/show`` reports for ``model``: ``["completion"]``, as Ollama reports a
        model whose template has no tools, suffix or thinking (requests with ``tools``,
        ``think``, images or an ``/api/generate`` ``suffix`` are refused with 400). Every
        variant can also be used with ``/api/embed``, as any Ollama model can.

        Raises:
            BackendError: 404 for a name this backend does not serve.
        """
        self.template_for(model)
        return ["completion"]

    def template_for(self, model: str) -> PromptTemplate:
        """The prompt template that a request for ``model`` uses (404 for an unknown name)."""
        if _model_matches(model, self.model_name):
            return self.prompt_template
        for name, template in PROMPT_TEMPLATES.items():
            if _model_matches(model, model_variant(self.model_name, name)):
                return template
        raise BackendError(
            f"model '{model}' not found (this server serves {', '.join(self.models())})", 404
        )

    def chat(self, request: ChatRequest) -> ChatReply:
        """Answer a chat request; the returned ``tokens`` generate lazily (streaming).

        ``prompt_tokens`` is set immediately; ``done_reason`` (``"stop"`` or ``"length"``)
        is final once ``tokens`` is exhausted.
        """
        template = self.template_for(request.model)
        if request.raw:  # /api/generate with "raw": true (Ollama: no template at all)
            template = render_raw_prompt
        if request.tools:
            raise BackendError(f"{request.model} does not support tools", status=400)
        if request.format:
            raise BackendError(
                f"{request.model} does not support structured output (format)", status=400
            )
        if request.think:  # was ignored: the client asked for reasoning and got none
            raise BackendError(f"{request.model} does not support thinking (think)", status=400)
        if any(message.get("images") for message in request.messages):
            # Answering without seeing the picture would look like a real answer (and could
            # be confident): refuse, so a router escalates it as a local error.
            raise BackendError(f"{request.model} reads text only (the request has images)",
                               status=400)
        if request.suffix:  # the server refuses it first: no model here lists "insert"
            raise BackendError(f"{request.model} does not support insert", status=400)
        try:
            if request.template:  # /api/generate's template replaces the model's
                prompt = _render_request_template(request.template, request.messages)
            else:
                prompt = template(request.messages)
        except ValueError as exc:
            raise BackendError(str(exc), status=400) from exc
        stops = _stop_option(request.options)
        if self.stop_at_newline:
            stops.append("\n")
        top_k = request.top_logprobs if request.logprobs else 0
        return self._reply(prompt, request.options, stops, top_k, request.client_gone)

    def complete(
        self,
        prompt: str,
        *,
        num_predict: int | None = None,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        seed: int | None = None,
        top_logprobs: int = 0,
    ) -> ChatReply:
        """Continue a raw prompt (no template, no implicit newline stop); lazy like :meth:`chat`.

        >>> reply = backend.complete(FEW_SHOT_PREFIX + "Q: Capital of France?\\nA:",
        ...                          stop=["\\n"], top_logprobs=3)  # doctest: +SKIP
        >>> "".join(t.text for t in reply.tokens)                   # doctest: +SKIP
        ' Paris'
        """
        options: dict[str, Any] = {"temperature": temperature, "num_predict": num_predict}
        if seed is not None:
            options["seed"] = seed
        return self._reply(prompt, options, list(stop), top_logprobs)

    def embed(
        self,
        model: str,
        inputs: Sequence[str],
        *,
        truncate: bool = True,
        client_gone: Callable[[], bool] | None = None,
    ) -> list[list[float]]:
        """L2-normalised mean-pooled embeddings (one 640-d vector per input for Gemma 3 270M).

        Uses a second llama.cpp instance in embedding mode, created on the first call
        (~1 s, ~+0.6 GB RSS; it maps the same weight file). Its context is 256 tokens, the
        beginning-of-text token included:
        longer inputs are cut to it, or with ``truncate=False`` (``/api/embed``'s field) the
        request is refused with 400 "the input length exceeds the context length" before
        any input is embedded, as Ollama does. These are mean hidden states of a small
        *base* LM, not a trained sentence
        embedding, and they are anisotropic: unrelated questions score cosine ~0.77,
        paraphrases ~0.8-0.93 (top-1 retrieval 3/5 on a paraphrase probe). Usable for
        near-duplicates and smoke tests, weak for semantic search. Cost is ~0.4-0.6 s per
        short question on one shared core: llama.cpp computes every token's logits in
        embedding mode.

        ``client_gone`` (set by the HTTP server): once it returns True, the batch stops
        before its next input (and a request still waiting for the embedder gives up) with
        :class:`BackendError` 499, so a client that hung up does not hold the embedder.
        :attr:`embedded_inputs` counts the inputs actually embedded.
        """
        import numpy as np

        self._check_model(model)
        if not inputs:
            return []
        if not truncate:
            llm = self._model()
            for index, text in enumerate(inputs):
                # As llama-cpp-python's embed tokenizes (with BOS); the vocabulary is the
                # generation model's, and reading it needs no lock.
                count = len(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))
                if count > _EMBED_MAX_TOKENS:
                    raise BackendError(
                        "the input length exceeds the context length "
                        f"(input {index}: {count} tokens; context {_EMBED_MAX_TOKENS})", 400
                    )
        if not _acquire_unless_gone(self._embed_lock, client_gone):
            raise BackendError("the client disconnected", 499)
        try:
            embedder = self._get_embedder()
            raw = []
            for text in inputs:
                if client_gone is not None and client_gone():
                    raise BackendError("the client disconnected", 499)
                try:
                    # One text per decode: packing many texts into one batch was no faster
                    # here and grows llama.cpp's all-token logits buffer (+0.25 GB for 32).
                    raw.append(embedder.embed(text, normalize=False, truncate=True))
                except (ValueError, RuntimeError) as exc:
                    raise BackendError(f"embedding failed: {exc}") from exc
                self.embedded_inputs += 1
        finally:
            self._embed_lock.release()
        vectors = np.asarray(raw, dtype=np.float64)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        # A zero vector cannot be normalised; leave it as is rather than divide by zero.
        vectors = vectors / np.where(norms == 0.0, 1.0, norms)
        return [row.tolist() for row in vectors]

    # ---- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Free the model and the embedding context (idempotent)."""
        with self._lock, self._embed_lock:
            for llm in (self._llm, self._embedder):
                if llm is not None:
                    llm.close()
            self._llm = self._embedder = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- internals -------------------------------------------------------------------------

    def _threads(self) -> int:
        import os

        return self.n_threads or max(1, min(4, (os.cpu_count() or 1) // 2))

    def _use_batch_threads(self, llm: Llama) -> None:
        """Give llama.cpp this prompt's batch thread count (caller holds ``_lock``)."""
        import llama_cpp

        threads = self.n_threads_batch or batch_threads(
            self._threads(),
            idle_cores=self._idle_cores.idle_cores(),
            max_threads=2 * self._threads(),
        )
        if threads != self._set_batch_threads:
            llama_cpp.llama_set_n_threads(llm.ctx, self._threads(), threads)
            self._set_batch_threads = threads
        self.batch_thread_counts[threads] = self.batch_thread_counts.get(threads, 0) + 1

    def _model(self) -> Llama:
        if self._llm is None:
            raise BackendError("the model was closed", status=503)
        return self._llm

    def _check_model(self, model: str) -> None:
        self.template_for(model)  # every variant embeds with the same weights

    def _get_embedder(self) -> Llama:
        if self._embedder is None:
            import llama_cpp

            self._embedder = llama_cpp.Llama(
                model_path=self.model_path,
                embedding=True,
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                # Mean pooling needs a whole sequence in one micro-batch. llama.cpp computes
                # the 262,144-way logits of *every* token in embedding mode, so its buffers
                # grow with n_ubatch: this context adds ~0.6 GB RSS at 256 (its own mapping
                # of the weights included) and ~1.1 GB at 512 (measured).
                n_ctx=_EMBED_MAX_TOKENS,
                n_batch=_EMBED_MAX_TOKENS,
                n_ubatch=_EMBED_MAX_TOKENS,
                n_threads=self._threads(),
                n_threads_batch=self._threads(),
                verbose=False,
            )
        return self._embedder

    def _reply(
        self,
        prompt: str,
        options: Mapping[str, Any],
        stops: list[str],
        top_k: int,
        client_gone: Callable[[], bool] | None = None,
    ) -> ChatReply:
        """Validate options and tokenize now (errors become HTTP statuses); generate lazily.

        ``client_gone`` (set by the HTTP server) says whether the client hung up: the decode
        loop then stops, also while the request still waits for the model.
        """
        llm = self._model()
        temperature = options.get("temperature")
        temperature = 0.0 if temperature is None else temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or (
            temperature < 0 or not math.isfinite(temperature)
        ):
            raise BackendError(f"option temperature must be >= 0, got {temperature!r}", 400)
        seed = _int_option(options, "seed")
        if seed is not None and seed < 0:
            seed = None  # Ollama's default seed, -1: no fixed seed (numpy refused it: a 500)
        num_predict = _int_option(options, "num_predict")
        if num_predict is None:
            num_predict = self.max_tokens_default
        if not 0 <= top_k <= MAX_TOP_LOGPROBS:
            raise BackendError(f"top_logprobs must be between 0 and 20, got {top_k}", 400)

        # Tokenizing reads only the immutable vocabulary, so it needs no lock; doing it here
        # makes prompt_tokens known before streaming and rejects over-long prompts with 400.
        encoded = prompt.encode("utf-8")
        if len(encoded) > self.n_ctx * _CHEAP_BYTES_PER_TOKEN and (
            len(encoded) > self.n_ctx * self._longest_token_bytes()
        ):
            # More tokens than the window for sure (no token covers more bytes): refuse
            # without tokenizing it (~3 s of a core per MB, for a 400 anyway).
            raise BackendError(
                f"prompt is {len(encoded)} bytes, more than the context window of "
                f"{self.n_ctx} tokens can hold", 400
            )
        prompt_ids = llm.tokenize(encoded, add_bos=True, special=False)
        room = self.n_ctx - len(prompt_ids)
        if room < 1:
            raise BackendError(
                f"prompt is {len(prompt_ids)} tokens; the context window is {self.n_ctx}", 400
            )
        # num_predict <= 0 means "no limit" in Ollama (-1 infinite, -2 fill the context).
        limit = room if num_predict <= 0 else min(num_predict, room)
        reply = ChatReply(tokens=(), prompt_tokens=len(prompt_ids), done_reason="stop")
        reply.tokens = self._generate(
            reply, prompt_ids, limit, stops, float(temperature), seed, top_k, client_gone
        )
        return reply

    def _longest_token_bytes(self) -> int:
        """Bytes of the vocabulary's longest token text (computed once, ~1-2 s; only prompts
        of more than ``n_ctx * 16`` bytes need it)."""
        if self._longest_token is None:
            llm = self._model()
            self._longest_token = max(
                (len(llm.detokenize([token])) for token in range(llm.n_vocab())), default=1
            )
        return self._longest_token

    def _evaluate_prompt(self, llm: Llama, prompt_ids: list[int]) -> None:
        """Bring the KV cache to ``prompt_ids`` and evaluate it (caller holds ``_lock``).

        The prompt is evaluated in batches that end at fixed boundaries (:meth:`_boundaries`),
        with or without the cache: llama.cpp's results for a token depend (in the last bits)
        on the batch it is evaluated in, so both paths must run the same batches. Only whole
        batches of an earlier prompt are reused (the live context or a snapshot), and at
        least the last prompt token is evaluated: its logits are the first step's.
        """
        import numpy as np

        stats = self.cache_stats
        stats.requests += 1
        boundaries = self._boundaries(llm, prompt_ids)
        keep = 0
        restored_from: _Snapshot | None = None
        if self.prefix_cache:
            limit = len(prompt_ids) - 1
            n_live = llm.n_tokens
            live = _shared_batches(
                llm.input_ids[:n_live], [e for e in self._live_ends if e <= n_live],
                prompt_ids, boundaries, limit,
            )
            scored = [
                (_shared_batches(snap.tokens, snap.ends, prompt_ids, boundaries, limit), snap)
                for snap in self._snapshots
            ]
            restored, best = max(scored, key=lambda pair: pair[0], default=(0, None))
            if best is not None and restored >= live + _MIN_RESTORE_GAIN:
                self._snapshots.remove(best)
                if best.restore(llm):
                    stats.restores += 1
                    keep = restored
                    restored_from = best
                # else: the context was emptied and the broken snapshot dropped (keep = 0)
            else:
                keep = live
            if keep and not _positions_intact(llm):
                keep = 0  # llama.cpp dropped positions the prefix needs: evaluate it all
        if keep:
            llm.n_tokens = keep  # eval() removes every KV entry from position n_tokens on
            stats.hits += 1
        else:
            llm.reset()
        self._live_ends = []  # until the evaluation below has succeeded
        stats.reused_tokens += keep
        stats.evaluated_tokens += len(prompt_ids) - keep
        self._use_batch_threads(llm)
        try:
            start = keep
            for end in boundaries + [len(prompt_ids)]:
                if end <= start:
                    continue
                # Only the last prompt token's logits are read: an intermediate batch that
                # asked for logits would pay the 262,144-way output projection for nothing.
                _decode_batch(llm, prompt_ids[start:end], logits=end == len(prompt_ids))
                stats.batches += 1
                start = end
        except RuntimeError as exc:
            llm.reset()  # the cache may hold a partial batch: trust nothing next time
            raise BackendError(f"llama.cpp failed to evaluate the prompt: {exc}") from exc
        self._live_ends = [*boundaries, len(prompt_ids)]
        if self.prefix_cache and self.prefix_slots:
            self._save_snapshot(
                llm, np.asarray(prompt_ids, dtype=np.intc), self._live_ends, restored_from
            )
        elif restored_from is not None:
            self._snapshots.append(restored_from)

    def _save_snapshot(
        self, llm: Llama, tokens: np.ndarray, ends: list[int], replaces: _Snapshot | None
    ) -> None:
        """Keep the KV state of this prompt unless a kept snapshot already covers it.

        ``replaces`` is the snapshot this prompt was restored from (taken out of the list):
        the new one serves that prompt family at least as well (it shares the restored
        prefix), so it takes its place instead of evicting another family's snapshot.
        """
        if replaces is not None:
            self._snapshots.append(replaces)  # most recently used last
        for index, snap in enumerate(self._snapshots):
            shared = _common_prefix(snap.tokens, tokens, len(tokens))
            if shared == len(tokens):  # this prompt is a prefix of a kept one
                self._snapshots.append(self._snapshots.pop(index))
                return
            if shared == len(snap.tokens):  # a kept one is a prefix of this prompt: replace
                del self._snapshots[index]
                break
        if replaces is not None and replaces in self._snapshots:
            self._snapshots.remove(replaces)
        snapshot = _Snapshot.capture(llm, tokens, ends)
        if snapshot is None:
            return
        self._snapshots.append(snapshot)
        del self._snapshots[: -self.prefix_slots]

    def _is_boundary(self, llm: Llama, prompt_ids: Sequence[int], position: int) -> bool:
        """Whether a prompt batch ends before ``position`` (depends on ``prompt_ids[:position]``
        only, so every prompt sharing that prefix has the same boundaries inside it)."""
        if position <= 0:
            return False
        if position % self._prompt_batch == 0:
            return True
        return self.batch_at_newlines and self._ends_line(llm, prompt_ids[position - 1])

    def _boundaries(self, llm: Llama, prompt_ids: Sequence[int]) -> list[int]:
        """The batch boundaries strictly inside the prompt, ascending.

        Boundaries within the last ``_SHORT_FINAL_BATCH`` tokens are left out: a batch costs
        ~10 ms more than its tokens, and the final line of a few-shot prompt (``"A:"``) is that
        short. Whether a prompt reuses an earlier one's batches is decided on the batch ends
        both really used (:func:`_shared_batches`), so this exception stays exact.
        """
        last = len(prompt_ids) - _SHORT_FINAL_BATCH
        return [p for p in range(1, last) if self._is_boundary(llm, prompt_ids, p)]

    def _ends_line(self, llm: Llama, token: int) -> bool:
        # Whether the token's text contains a newline (a fixed property of the vocabulary).
        ends = self._newline_cache.get(token)
        if ends is None:
            ends = b"\n" in llm.detokenize([token])
            self._newline_cache[token] = ends
        return ends

    @property
    def prompt_batch(self) -> int:
        """The longest prompt batch in tokens (see the class docstring); settable."""
        return self._prompt_batch

    @prompt_batch.setter
    def prompt_batch(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"prompt_batch must be a positive int, got {value!r}")
        with self._lock:
            # Cached states were computed in batches of the old size: reusing them would
            # break "identical with and without the cache".
            self._forget_cache()
            self._prompt_batch = value

    @property
    def batch_at_newlines(self) -> bool:
        """Whether a prompt batch also ends after every token containing a newline; settable."""
        return self._batch_at_newlines

    @batch_at_newlines.setter
    def batch_at_newlines(self, value: bool) -> None:
        with self._lock:
            self._forget_cache()  # cached states were computed in other batches
            self._batch_at_newlines = bool(value)

    def clear_prefix_cache(self) -> None:
        """Forget all cached prompt state (the next request evaluates its prompt in full)."""
        with self._lock:
            self._forget_cache()

    def _forget_cache(self) -> None:
        self._snapshots.clear()
        self._live_ends = []
        if self._llm is not None:
            self._llm.reset()

    def _piece(self, llm: Llama, token: int) -> tuple[str, bytes]:
        # Stand-alone text and bytes of one token, for logprobs entries (a partial UTF-8
        # byte token's text is U+FFFD). The vocabulary is fixed, so cache them.
        piece = self._piece_cache.get(token)
        if piece is None:
            raw = llm.detokenize([token])
            piece = (raw.decode("utf-8", errors="replace"), raw)
            self._piece_cache[token] = piece
        return piece

    def _generate(
        self,
        reply: ChatReply,
        prompt_ids: list[int],
        limit: int,
        stops: list[str],
        temperature: float,
        seed: int | None,
        top_k: int,
        client_gone: Callable[[], bool] | None = None,
    ) -> Iterator[GeneratedToken]:
        """The decode loop. Holds the model lock from the first ``next()`` until exhausted or
        closed (the server closes the iterator when a client disconnects). With
        ``client_gone``, a client that hung up ends it before the next token, and one that hung
        up while waiting for the lock gets nothing (no prompt evaluated, no token produced)."""
        import llama_cpp
        import numpy as np

        if not self._acquire_unless_gone(client_gone):
            return
        try:
            llm = self._model()
            # End-of-generation tokens (EOS, EOT, ...) via the public C API on the model.
            vocab = llama_cpp.llama_model_get_vocab(llm.model)
            rng = np.random.default_rng(seed) if temperature > 0 else None
            # Token pieces may split a multi-byte UTF-8 character (Gemma has byte-fallback
            # tokens): the incremental decoder keeps incomplete bytes until the rest arrive,
            # so such a token is emitted with text "" and the next one carries the character.
            # Its logprobs entry still shows the token itself (piece: its own bytes), as the
            # alternatives do.
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            stop_filter = _StopFilter(stops)

            self._evaluate_prompt(llm, prompt_ids)

            for step in range(limit):
                logits = last_logits(llm)
                logprobs = log_softmax(logits)
                if rng is None:
                    token = int(np.argmax(logprobs))
                else:
                    token = _sample(logits, temperature, rng)
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    reply.done_reason = "stop"
                    yield from stop_filter.flush()
                    return
                self.generated_tokens += 1
                _, own = self._piece(llm, token)
                text = decoder.decode(own)
                top: tuple[tuple[str, float], ...] = ()
                top_pieces: tuple[bytes, ...] = ()
                if top_k:
                    best = [int(i) for i in top_k_indices(logprobs, top_k)]
                    pieces = [self._piece(llm, i) for i in best]
                    top = tuple((shown, float(logprobs[i])) for (shown, _), i in zip(pieces, best))
                    top_pieces = tuple(raw for _, raw in pieces)
                yield from stop_filter.push(
                    GeneratedToken(text, float(logprobs[token]), top, own, top_pieces)
                )
                if stop_filter.stopped:
                    reply.done_reason = "stop"
                    return
                if client_gone is not None and client_gone():
                    return  # nobody reads the rest: stop before decoding another token
                if step + 1 < limit:
                    try:
                        llm.eval([token])
                    except RuntimeError as exc:
                        raise BackendError(f"llama.cpp failed to decode: {exc}") from exc
            reply.done_reason = "length"
            # Incomplete UTF-8 bytes at the length limit are dropped (not a character yet).
            yield from stop_filter.flush()
        finally:
            self._lock.release()

    def _acquire_unless_gone(self, client_gone: Callable[[], bool] | None) -> bool:
        """Take the model lock; ``False`` (without it) once ``client_gone()`` says the
        client hung up while waiting."""
        return _acquire_unless_gone(self._lock, client_gone)


def _acquire_unless_gone(lock: threading.Lock, client_gone: Callable[[], bool] | None) -> bool:
    """Take ``lock``; ``False`` (without it) once ``client_gone()`` says the client hung up
    while waiting."""
    if client_gone is None:
        lock.acquire()
        return True
    while not lock.acquire(timeout=_GONE_POLL_SECONDS):
        if client_gone():
            return False
    if client_gone():
        lock.release()
        return False
    return True


# How often a request waiting for the model checks whether its client is still there.
_GONE_POLL_SECONDS = 0.05

# Boundaries this close to the end of a prompt are left out (see LlamaCppBackend._boundaries).
_SHORT_FINAL_BATCH = 4

# Restoring a snapshot copies its KV state back (~1 ms for a few hundred tokens); it is only
# worth it when it saves evaluating at least this many prompt tokens.
_MIN_RESTORE_GAIN = 8


@dataclass
class PrefixCacheStats:
    """Counters of :class:`LlamaCppBackend`'s prompt-prefix cache (for tests and benchmarks).

    Attributes:
        requests: prompts evaluated.
        hits: prompts that reused a cached prefix.
        restores: hits served from a saved snapshot rather than the live context.
        reused_tokens: prompt tokens taken from the cache.
        evaluated_tokens: prompt tokens evaluated by the model.
        batches: llama.cpp batches those prompt tokens were evaluated in.
    """

    requests: int = 0
    hits: int = 0
    restores: int = 0
    reused_tokens: int = 0
    evaluated_tokens: int = 0
    batches: int = 0


@dataclass(eq=False)  # identity: the fields hold numpy arrays
class _Snapshot:
    """The saved KV state of one evaluated prompt (sequence 0 of the llama.cpp context)."""

    tokens: np.ndarray
    ends: list[int]  # where the prompt's batches ended (the last one: the prompt's length)
    state: Any  # a ctypes byte buffer owned by this snapshot

    @classmethod
    def capture(cls, llm: Llama, tokens: np.ndarray, ends: list[int]) -> _Snapshot | None:
        import ctypes

        import llama_cpp

        size = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(llm.ctx, buffer, size, 0)
        if not 0 < written <= size:
            return None  # not worth failing a request over: just do not cache it
        tokens = tokens.copy()
        return cls(tokens=tokens, ends=list(ends), state=buffer)

    def restore(self, llm: Llama) -> bool:
        """Replace sequence 0 by this state; ``False`` (and an empty context) on failure."""
        import ctypes

        import llama_cpp

        size = ctypes.sizeof(self.state)
        if llama_cpp.llama_state_seq_set_data(llm.ctx, self.state, size, 0) == 0:
            llm.reset()
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), 0, -1, -1)
            return False
        count = len(self.tokens)
        llm.input_ids[:count] = self.tokens
        llm.n_tokens = count
        return True


def _decode_batch(llm: Llama, tokens: Sequence[int], *, logits: bool) -> None:
    """Evaluate ``tokens`` at the next positions of sequence 0, like ``Llama.eval`` (which
    always computes the last token's logits), with logits for the last token only if asked."""
    import llama_cpp

    n_past, count = llm.n_tokens, len(tokens)
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), -1, n_past, -1)
    batch = llama_cpp.llama_batch_init(count, 0, 1)
    try:
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = n_past + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = logits and i == count - 1
        batch.n_tokens = count
        code = llama_cpp.llama_decode(llm.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")
    finally:
        llama_cpp.llama_batch_free(batch)
    llm.input_ids[n_past : n_past + count] = tokens
    llm.n_tokens = n_past + count


def _shared_batches(
    cached: Sequence[int] | np.ndarray,
    cached_ends: Sequence[int],
    prompt: Sequence[int],
    boundaries: Sequence[int],
    limit: int,
) -> int:
    """How much of an evaluated prompt a new one can reuse: whole batches only.

    The longest run of batches that ended at the same positions in both prompts and lies in
    their common token prefix (at most ``limit``): those batches held the same tokens, so
    reusing them gives exactly what evaluating the new prompt in its own batches would.
    """
    shared = _common_prefix(cached, prompt, limit)
    keep = 0
    for new_end, old_end in zip(boundaries, cached_ends):
        if new_end != old_end or new_end > shared:
            break
        keep = new_end
    return keep


def _common_prefix(
    cached: Sequence[int] | np.ndarray, prompt: Sequence[int] | np.ndarray, limit: int
) -> int:
    """Length of the common prefix of two token sequences, at most ``limit``."""
    import numpy as np

    n = min(len(cached), len(prompt), limit)
    if n <= 0:
        return 0
    mismatch = np.flatnonzero(np.asarray(cached[:n]) != np.asarray(prompt[:n]))
    return int(mismatch[0]) if mismatch.size else n


def _positions_intact(llm: Llama) -> bool:
    # llama.cpp's sliding-window cache may overwrite old positions once it is full. A reused
    # prefix needs all of them (llama.cpp's server makes the same check). For Gemma 3 with
    # n_ctx <= 1024, or with swa_full, this never fails; it keeps other models correct.
    import llama_cpp

    return int(llama_cpp.llama_memory_seq_pos_min(llama_cpp.llama_get_memory(llm.ctx), 0)) == 0


def _sample(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """Draw a token from ``softmax(logits / temperature)`` (inverse CDF, float64)."""
    import numpy as np

    values = np.asarray(logits, dtype=np.float64)
    # Shift before dividing: logits / T overflows to inf for a tiny T (inf - inf = NaN, and
    # the last token was drawn); shifted, the best token is exp(0) = 1 and the rest -> 0.
    with np.errstate(over="ignore"):  # -x / tiny T = -inf is intended: probability 0
        probs = np.exp((values - values.max()) / temperature)
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return min(index, len(cdf) - 1)
