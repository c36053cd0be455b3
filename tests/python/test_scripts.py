"""The Python scripts' command lines: help texts state their defaults and tolerances, and
train_reference writes the files the Rust side writes, with the same columns."""

import json
import os
import sys
from pathlib import Path

import pytest

from conftest import ROOT, L, load_script, run


@pytest.mark.parametrize("script, expected", [
    ("train_reference", ["--epochs", "(default: 8)", "--batch-size", "(default: 128)", "--lr", "(default: 0.003)",
                         "--optimizer", "(default: adamw)", "--seed", "(default: 1)", "--save-model", "--dry-run",
                         "--no-cycle-momentum", "--nesterov", "--amsgrad", "--shift",
                         "--out", "--data", "--arch", "--head", "--test-batch-size"]),
    ("crosscheck", ["max abs diff <= 0.0001", "argmax agreement 100%", "test_correct"]),
    ("parity", ["--threshold", "(default: 0.0: bit-identical)", "--limit-train", "(default: 6400)",
                "300 optimizer steps", "stock torch.optim"]),
])
def test_help_states_defaults_and_tolerances(script, expected, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", [script, "--help"])
    with pytest.raises(SystemExit) as e:
        load_script(script).main()
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for s in expected:
        assert s in text, f"{s!r} not in the help of {script}"


def test_train_reference_writes_rusts_files(python_run, test_set):
    m = L.read_metrics(python_run)  # the header is METRICS_COLUMNS, as Rust writes it
    assert m["epoch"] == [1] and 0 < m["train_accuracy"][0] <= 1 and 0 < m["seconds"][0]
    rows = [json.loads(line) for line in (python_run / "metrics.jsonl").read_text().splitlines()]
    assert [list(r) for r in rows] == [L.METRICS_COLUMNS]
    card = L.read_card(python_run / "reference_state_dict.json")
    assert card["files"]["weights"]["sha256"] == L.sha256_file(python_run / "reference_state_dict.pt")
    assert card["metrics"]["test_accuracy"] == m["test_accuracy"][0] > 0.8
    # Both saved forms compute the card's numbers.
    x, y = test_set
    for f in ("reference_state_dict.pt", "reference_scripted.pt"):
        got = L.evaluate(L.load_model(python_run / f), x, y)
        assert (got.correct, got.total) == (card["metrics"]["test_correct"], card["metrics"]["test_total"]), f


def test_ci_runs_the_readmes_test_command_and_nothing_else():
    """CI must walk the user's path: a step that only .ci/run performs (an apt-get install, say)
    would hide a set-up that is incomplete on a fresh machine."""
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```sh\n", 1)[1].split("```", 1)[0]
    test_line = next(line for line in first_block.splitlines() if "every test" in line)
    test_command = test_line.split("#", 1)[0].strip()
    assert test_command == "scripts/test"
    commands = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert commands == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', test_command], commands


@pytest.mark.parametrize("script", ["bench-binding", "crosscheck", "parity", "train_ddp", "train_reference"])
def test_a_script_started_by_a_python3_without_the_venv_runs_in_the_venv(script):
    """The README runs them as `scripts/NAME` from a plain shell, where `python3` is the system's
    (without torch, on a fresh machine): each re-runs itself in .venv (scripts/project_venv.py).
    These import torch before parsing their flags, so `--help` fails without that step."""
    venv_bin = Path(sys.prefix, "bin").resolve()
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p and Path(p).resolve() != venv_bin)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    r = run([ROOT / "scripts" / script, "--help"], env={**env, "PATH": path}, timeout=120)
    assert "usage:" in r.stdout, r.stdout


def test_the_gpu_pack_holds_what_its_scripts_import():
    """scripts/pack-gpu copies a few scripts for a machine with its own torch and no .venv: each
    must start there (a module they import left out of the pack stops them at the first line)."""
    if not (ROOT / "target" / "release" / "lenet5").exists():
        pytest.skip("no target/release/lenet5 to pack: run scripts/setup")
    run([ROOT / "scripts" / "pack-gpu"], env={**os.environ, "LENET5_SKIP_BUILD": "1"})
    for script in ("crosscheck", "bench"):
        r = run([sys.executable, ROOT / ".gpu" / "scripts" / script, "--help"], timeout=120)
        assert "usage:" in r.stdout, r.stdout
