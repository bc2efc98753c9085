"""The dataset samples ship in the wheel: a user who pip-installed it can run an evaluation.

Builds the project's wheel, installs it with ``--no-deps`` into a fresh virtual environment
whose only other packages are this environment's dependencies (reached through a ``.pth``
line, so the repository's editable install is *not* visible), and runs from a directory
outside the repository, with no data directory configured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _clean_env() -> dict[str, str]:
    # No PYTHONPATH (it would show the repository's sources) and no data directory.
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "CONFIDENCE_ROUTER_DATA_DIR", "PYTHONHOME")
    }


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("env", _clean_env())
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-w", str(work / "dist"), str(REPO)])
    assert built.returncode == 0, built.stderr[-2000:]
    wheels = list((work / "dist").glob("confidence_router-*.whl"))
    assert len(wheels) == 1
    venv = work / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                     ).stdout.strip())
    installed = _run([sys.executable, "-m", "pip", "--python", str(python), "install",
                      "--no-deps", "--no-index", str(wheels[0])])
    assert installed.returncode == 0, installed.stderr[-2000:]
    assert (site / "confidence_router" / "data" / "wikidata_sample.jsonl").is_file()
    # Then this environment's third-party packages, as a plain path: its .pth files
    # (including the editable install of the repository) are not processed from there.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_samples_load_from_the_installed_wheel(wheel_venv: Path, tmp_path: Path) -> None:
    code = (
        "import json, confidence_router\n"
        "from confidence_router.evaluation.datasets import dataset_file, load_dataset\n"
        "out = {}\n"
        "for name in ('wikidata', 'triviaqa'):\n"
        "    items = load_dataset(name)\n"
        "    out[name] = [str(dataset_file(name)), len(items), items[0].id, items[0].prompt_style]\n"
        "out['package'] = confidence_router.__file__\n"
        "print(json.dumps(out))\n"
    )
    done = _run([str(wheel_venv / "bin" / "python"), "-c", code], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["package"].startswith(str(wheel_venv))  # the wheel, not the repository
    for name, style in (("wikidata", "completion"), ("triviaqa", "question")):
        path, count, first_id, first_style = out[name]
        assert path.startswith(str(wheel_venv)) and path.endswith(f"{name}_sample.jsonl")
        assert count == 300 and first_id == f"{name}_sample:1" and first_style == style
    notes = Path(out["wikidata"][0]).parent / "README.md"
    assert "Apache-2.0" in notes.read_text(encoding="utf-8")


def test_eval_command_runs_on_a_sample_from_the_wheel(
    wheel_venv: Path, tmp_path: Path, ollama_backend, ollama_server
) -> None:
    ollama_backend.add_answer(None, [" Paris", "."], logprobs=[-0.1, -0.2])
    db = tmp_path / "runs.sqlite"
    done = _run([str(wheel_venv / "bin" / "confidence-router"), "eval", "--dataset", "triviaqa",
                 "--limit", "3", "--ollama-url", ollama_server.url, "--model", "scripted-local",
                 "--db", str(db), "--no-progress"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "packaged sample triviaqa_sample.jsonl" in done.stderr
    assert "triviaqa_sample__scripted-local__instruct-v1: 3 items" in done.stdout
    assert len(ollama_server.requests_to("/api/chat")) == 3
