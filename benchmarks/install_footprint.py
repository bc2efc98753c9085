"""Install footprint: packages and venv size of ``pip install .`` with each extra.

For each install (no extras, then each extra) it creates a fresh virtual environment, installs
this checkout into it (not editable, as a user would from PyPI) and counts what landed: the
distributions pip lists (without pip itself) and the bytes of ``site-packages``. pip's cache
makes repeated runs fast; the first ``embedded`` install compiles llama.cpp (about 10 min on 2 cores).

    python benchmarks/install_footprint.py                    # every extra, a Markdown table
    python benchmarks/install_footprint.py --extras "" gsa    # only the core and [gsa]

Prints one table row per install plus each one's ratio to the core install, measured in this
run. docs/install.md shows a committed run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EXTRAS = ["", "gsa", "llamaindex", "embedded", "eval", "all"]
# What a fresh venv holds before anything is installed: not part of the footprint.
BOOTSTRAP = {"pip", "setuptools", "wheel"}
# Portable llama.cpp build flags (the README's); a native build may use instructions VMs trap.
CMAKE_ARGS = ("-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON "
              "-DGGML_F16C=ON -DGGML_BMI2=ON")


def venv_python(env_dir: Path) -> Path:
    """The interpreter of the virtual environment at ``env_dir``."""
    return env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def site_packages(python: Path) -> Path:
    """The ``site-packages`` directory of ``python``'s environment."""
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    )
    return Path(out.stdout.strip())


def tree_bytes(path: Path) -> int:
    """Total size of the regular files under ``path``."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            file = Path(dirpath, name)
            if not file.is_symlink():
                total += file.stat().st_size
    return total


def installed_distributions(python: Path) -> list[str]:
    """Names of the distributions installed in ``python``'s environment (bootstrap excluded)."""
    out = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        check=True, capture_output=True, text=True,
    )
    return sorted(p["name"].lower() for p in json.loads(out.stdout)
                  if p["name"].lower() not in BOOTSTRAP)


def measure(extra: str, workdir: Path, source: Path = ROOT) -> dict[str, object]:
    """Install ``source[extra]`` into a fresh venv under ``workdir``; return its footprint."""
    env_dir = workdir / f"venv-{extra or 'core'}"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = venv_python(env_dir)
    empty_bytes = tree_bytes(site_packages(python))
    target = f"{source}[{extra}]" if extra else str(source)
    env = {**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", CMAKE_ARGS)}
    started = time.perf_counter()
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    target], check=True, env=env)
    seconds = time.perf_counter() - started
    packages = installed_distributions(python)
    return {
        "install": f"pip install confidence-router[{extra}]" if extra
        else "pip install confidence-router",
        "packages": len(packages),
        "bytes": tree_bytes(site_packages(python)) - empty_bytes,
        "seconds": seconds,
        "names": packages,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", nargs="*", default=DEFAULT_EXTRAS,
                        help='extras to measure ("" is the core install)')
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cr-footprint-") as tmp:
        for extra in args.extras:
            rows.append(measure(extra, Path(tmp)))
            print(f"measured {rows[-1]['install']}", file=sys.stderr)
    core = next((r for r in rows if r["install"] == "pip install confidence-router"), None)
    print("| install | packages | venv size (MB) | vs core (packages / size) | install time (s) |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        ratio = (f"{row['packages'] / core['packages']:.2f}x / {row['bytes'] / core['bytes']:.2f}x"
                 if core else "n/a")
        print(f"| `{row['install']}` | {row['packages']} | {row['bytes'] / 1e6:.0f} | {ratio} | "
              f"{row['seconds']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
