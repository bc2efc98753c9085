"""Every ``>>>`` example in the package's docstrings runs and prints what it shows.

The examples are the usage documentation of the public API; this keeps them true.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import confidence_router

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(confidence_router.__path__, "confidence_router.")
)


@pytest.mark.parametrize("name", ["confidence_router", *MODULES])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    failures = []
    for test in finder.find(module, name):
        runner.run(test, out=failures.append)
    assert not failures, "".join(failures)


def test_the_examples_cover_the_core_modules():
    # The pure core documents its use with examples (a module losing them is a regression).
    finder = doctest.DocTestFinder(exclude_empty=True)
    for name in ("policy", "signals", "early_exit", "settings", "retry", "costs", "guards"):
        module = importlib.import_module(f"confidence_router.{name}")
        assert sum(len(t.examples) for t in finder.find(module)) >= 3, name
