"""How the evaluation metrics' time grows with the number of rows.

Users run the metrics on their own traffic, so one million rows must take seconds, not hours:
every metric must be ``O(n log n)`` (a sort), never quadratic (all pairs for AUROC, a pass over
the rows per threshold for the deferral curve). For each metric prints the median time at
``--size`` rows and at 10x that size, and their ratio: about 10-12 is ``n log n``, about 100
quadratic. Scores are rounded to 3 decimals so that many rows tie (the tie handling is where a
careless implementation goes quadratic). The bootstrap is ``O(B n log n)``; it is timed with
``--resamples`` resamples.

    python benchmarks/metrics_scaling.py [--size 100000] [--repeat 3] [--resamples 20]
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable

import numpy as np
from timing import median_seconds

from confidence_router.evaluation.metrics import (
    apgr,
    auprc_error,
    aurc,
    auroc,
    bootstrap_ci,
    deferral_curve,
    e_aurc,
    ece,
    operating_points,
    paired_bootstrap_delta,
    risk_coverage,
)


def _data(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=n)
    z = rng.integers(0, 2, size=n)
    s = np.round(rng.normal(size=n) + 0.5 * y, 3)
    p = 1.0 / (1.0 + np.exp(-s))
    return y, z, s, p


def _metrics(resamples: int) -> dict[str, Callable[[tuple], object]]:
    return {
        "auroc": lambda d: auroc(d[0], d[2]),
        "auprc_error": lambda d: auprc_error(d[0], d[2]),
        "risk_coverage": lambda d: risk_coverage(d[0], d[2]),
        "aurc": lambda d: aurc(d[0], d[2]),
        "e_aurc": lambda d: e_aurc(d[0], d[2]),
        "deferral_curve": lambda d: deferral_curve(d[0], d[1], d[2]),
        "apgr": lambda d: apgr(d[0], d[1], d[2]),
        "operating_points": lambda d: operating_points(d[0], d[2], cloud_labels=d[1]),
        "ece (quantile)": lambda d: ece(d[0], d[3], strategy="quantile"),
        "auroc from lists": lambda d: auroc(d[0].tolist(), d[2].tolist()),
        f"bootstrap_ci ({resamples})": lambda d: bootstrap_ci(d[0], d[2], n_resamples=resamples),
        f"paired delta ({resamples})": lambda d: paired_bootstrap_delta(
            d[0], d[2], -d[2], n_resamples=resamples
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000, help="rows (and 10x that)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement")
    parser.add_argument("--resamples", type=int, default=20, help="bootstrap resamples")
    args = parser.parse_args()
    small, large = _data(args.size), _data(10 * args.size)
    print(f"| metric | {args.size:,} rows | {10 * args.size:,} rows | ratio |")
    print("| --- | ---: | ---: | ---: |")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, metric in _metrics(args.resamples).items():
            t_small = median_seconds(lambda m=metric: m(small), args.repeat)
            t_large = median_seconds(lambda m=metric: m(large), args.repeat)
            print(f"| {name} | {t_small * 1e3:.1f} ms | {t_large * 1e3:.1f} ms "
                  f"| {t_large / t_small:.1f} |")


if __name__ == "__main__":
    main()
