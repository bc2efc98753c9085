"""How PIIGuard's time grows with the length of what it reads.

A guard sits on every escalation, so its cost must grow linearly with the request: a regular
expression that backtracks quadratically on some input (a long base64 or minified-JSON token
without spaces, for the email pattern) would hold a request for minutes. For each input shape
prints the median time of ``PIIGuard().find`` at ``--size`` and at 10x that size, and their
ratio: about 10 is linear, about 100 quadratic. Also the time of a whole conversation
(``guard(messages)``, 20 turns of ordinary text) per kB.

    python benchmarks/guard_scaling.py [--size 20000] [--repeat 5]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from langchain_core.messages import AIMessage, HumanMessage
from timing import median_seconds

from confidence_router.guards import PIIGuard

SHAPES: dict[str, Callable[[int], str]] = {
    "letters (base64-like)": lambda n: "a" * n,
    "digits": lambda n: "1" * n,
    "word-dash runs": lambda n: "ab1-" * (n // 4),
    "dotted runs": lambda n: "a." * (n // 2),
    "prose with numbers": lambda n: ("Version 2.3.14 shipped on 2024-05-17 to 1,234 users; "
                                     * (n // 54 + 1))[:n],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    guard = PIIGuard()
    print(f"{'input':<24} {'n':>8} {'t(n) ms':>9} {'t(10n) ms':>10} {'ratio':>6}")
    for name, make in SHAPES.items():
        small, large = make(args.size), make(args.size * 10)
        t_small = median_seconds(lambda text=small: guard.find(text), args.repeat)
        t_large = median_seconds(lambda text=large: guard.find(text), args.repeat)
        print(f"{name:<24} {args.size:>8} {t_small * 1e3:>9.2f} {t_large * 1e3:>10.2f} "
              f"{t_large / t_small:>6.1f}")
    turn = "Which treaty ended the Thirty Years' War in 1648, and who signed it? " * 4
    history = [HumanMessage(turn) if i % 2 == 0 else AIMessage(turn) for i in range(20)]
    size_kb = sum(len(m.content) for m in history) / 1000
    t_history = median_seconds(lambda: guard(history), args.repeat)
    print(f"conversation of 20 turns: {t_history * 1e3:.2f} ms ({t_history * 1e3 / size_kb:.3f} "
          f"ms per kB)")


if __name__ == "__main__":
    main()
