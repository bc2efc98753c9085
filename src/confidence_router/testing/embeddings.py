"""Deterministic, dependency-free text embeddings for offline tests.

:func:`hashing_embedding` maps a text to a unit-norm vector built from hashed word and
character-trigram features ("feature hashing"). It has **no semantics**: it only measures
surface overlap. That is exactly what plumbing tests need:

* identical texts give identical vectors (cosine 1.0), in every process and on every machine
  (the hash is BLAKE2b, not Python's per-process salted ``hash``);
* texts sharing most of their words give a high cosine similarity;
* texts sharing no words give a cosine similarity near 0 (hash collisions add small noise,
  roughly ``±1/sqrt(dim)``).

Usage::

    from confidence_router.testing import cosine_similarity, hashing_embedding

    a = hashing_embedding("What is the capital of France?")
    b = hashing_embedding("what is the capital of france")
    assert cosine_similarity(a, b) > 0.99          # case and punctuation are ignored
    assert len(a) == 64
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator, Sequence

from confidence_router.errors import InvalidArgumentError, InvalidTypeError

__all__ = ["cosine_similarity", "hashing_embedding", "hashing_embeddings"]

_WORD_RE = re.compile(r"\w+", re.UNICODE)

# Words carry the meaning we care about in tests; trigrams make near-identical spellings
# (plural forms, typos) similar too, but are down-weighted so that whole-word overlap dominates.
_WORD_WEIGHT = 1.0
_TRIGRAM_WEIGHT = 0.35


def _features(text: str) -> Iterator[tuple[str, float]]:
    """Yield ``(feature, weight)`` pairs: lower-cased words and their boundary-marked trigrams."""
    for word in _WORD_RE.findall(text.lower()):
        yield "w:" + word, _WORD_WEIGHT
        marked = f"<{word}>"
        for i in range(len(marked) - 2):
            yield "c:" + marked[i : i + 3], _TRIGRAM_WEIGHT


def _bucket(feature: str, dim: int) -> tuple[int, float]:
    """Hash a feature to ``(index, sign)``; the sign halves the bias from collisions."""
    digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
    value = int.from_bytes(digest, "big")
    return value % dim, (1.0 if (value >> 63) & 1 else -1.0)


def hashing_embedding(text: str, dim: int = 64) -> list[float]:
    """Embed ``text`` as a deterministic unit-norm vector of length ``dim``.

    Features are lower-cased ``\\w+`` words (weight 1.0) plus their character trigrams
    (weight 0.35), each hashed with BLAKE2b to a signed bucket. A text without any word
    characters (e.g. ``""`` or ``"?!"``) maps to a fixed unit vector derived from a reserved
    feature, so the result is always unit-norm and never contains NaN.

    >>> round(sum(x * x for x in hashing_embedding("hello world")), 6)
    1.0
    >>> hashing_embedding("Hello, world!") == hashing_embedding("hello world")
    True

    Raises:
        ValueError: if ``dim`` is not a positive integer.
        TypeError: if ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise InvalidTypeError(f"hashing_embedding expects a str, got {type(text).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise InvalidArgumentError(f"dim must be a positive integer, got {dim!r}")
    vector = [0.0] * dim
    for feature, weight in _features(text):
        index, sign = _bucket(feature, dim)
        vector[index] += sign * weight
    norm = math.sqrt(sum(x * x for x in vector))
    if norm == 0.0:
        # No features, or (astronomically unlikely) features that cancelled out exactly.
        index, sign = _bucket("<empty>", dim)
        vector = [0.0] * dim
        vector[index] = sign
        return vector
    return [x / norm for x in vector]


def hashing_embeddings(texts: Sequence[str], dim: int = 64) -> list[list[float]]:
    """Embed several texts with :func:`hashing_embedding` (same ``dim`` for all)."""
    if isinstance(texts, str):
        raise InvalidTypeError("hashing_embeddings expects a sequence of strings, not a single str")
    return [hashing_embedding(text, dim) for text in texts]


def cosine_similarity(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity of two equal-length vectors (0.0 if either is all zeros).

    Raises:
        ValueError: if the vectors differ in length.
    """
    if len(a) != len(b):
        raise InvalidArgumentError(f"vectors differ in length: {len(a)} != {len(b)}")
    dot = sum(x * y for x, y in zip(a, b))
    norm_a = math.sqrt(sum(x * x for x in a))
    norm_b = math.sqrt(sum(y * y for y in b))
    if norm_a == 0.0 or norm_b == 0.0:
        return 0.0
    return dot / (norm_a * norm_b)
