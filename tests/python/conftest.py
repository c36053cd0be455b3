"""Shared fixtures: paths, the MNIST test set, the Rust binary, and one small training run on
each side (session-scoped, a few seconds each) that the end-to-end tests share.

Run from the repository root: `.venv/bin/python -m pytest tests/python`. Tests that need the
binary skip, saying so, when target/release/lenet5 (or $LENET5_BIN) is missing.
"""

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))
import lenet5_ref as L  # noqa: E402

PYTHON = sys.executable
DATA = Path(os.environ.get("LENET5_DATA", ROOT / "data" / "mnist"))
BIN = Path(os.environ.get("LENET5_BIN", ROOT / "target" / "release" / "lenet5"))
# Small enough for seconds of CPU, large enough that accuracy is far from chance.
RUST_TRAIN = ["--epochs", "1", "--limit-train", "3000", "--batch-size", "64", "--seed", "1"]
PY_TRAIN = ["--epochs", "1", "--limit-train", "3000", "--batch-size", "64", "--seed", "1"]

torch.set_num_threads(min(2, os.cpu_count() or 1))


def run(cmd, timeout=300, check=True, **kw) -> subprocess.CompletedProcess:
    """Runs a command from the repository root; on failure the assertion shows its output."""
    r = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)
    if check:
        assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def load_script(name: str):
    """A script in scripts/ (no .py suffix) as a module, to call its functions in-process."""
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), str(SCRIPTS / name))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def save_tch_archive(tensors: dict, path: Path) -> None:
    """Writes what tch's VarStore::save writes for a non-safetensors path: libtorch's
    serialize::OutputArchive, a TorchScript module `__torch__.Module` with no methods and one
    parameter per tensor, '.' in names replaced by '|' (tch Tensor::save_multi)."""

    class Module(nn.Module):
        def __init__(self):
            super().__init__()
            for k, v in tensors.items():
                self.register_parameter(k.replace(".", "|"), nn.Parameter(v.detach().clone(), requires_grad=False))

    Module.__module__ = "__main__"  # TorchScript names it __torch__.Module, as OutputArchive does
    torch.jit.script(Module()).save(str(path))


def write_export(model: L.LeNet5, prefix: Path, images: torch.Tensor, labels: torch.Tensor) -> Path:
    """A Python-made stand-in for `lenet5 export --out PREFIX`: the same four files, so the
    Python readers and crosscheck can be tested without the binary."""
    from safetensors.torch import save_file
    prefix.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    files = {"weights": Path(f"{prefix}.safetensors"), "torchscript": Path(f"{prefix}.pt"),
             "check": Path(f"{prefix}.check.safetensors")}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(files["weights"]))
    with torch.no_grad():
        torch.jit.trace(model, images[:2]).save(str(files["torchscript"]))
        save_file({"inputs": images[:64].contiguous(), "logits": model(images[:64]).contiguous()},
                  str(files["check"]))
    L.write_card(f"{prefix}.json", model, "mnist", L.evaluate(model, images, labels), None, files)
    return prefix


def quick_train(data_dir: Path, arch="modern", head="softmax", n=1000, seed=1) -> L.LeNet5:
    """A LeNet5 trained in-process for one pass over the first `n` training images (~1 s)."""
    torch.manual_seed(seed)
    x, y = L.load_split(data_dir, "train")
    model = L.LeNet5(arch, head)
    opt = L.make_optimizer("adam", model.parameters(), 3e-3)
    L.train_batches(model, opt, x[:n], y[:n], torch.randperm(n).split(64))
    return model.eval()


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (DATA / "t10k-images-idx3-ubyte").exists() and not (DATA / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST is not in {DATA} (scripts/setup fetches it)")
    return DATA


@pytest.fixture(scope="session")
def test_set(mnist_dir):
    """The 10,000 MNIST test images (N, 1, 32, 32) and labels (N,)."""
    return L.load_split(mnist_dir, "t10k")


@pytest.fixture(scope="session")
def binary() -> Path:
    if not BIN.is_file():
        pytest.skip(f"{BIN} is missing: build it with `cargo build --release` (or set LENET5_BIN)")
    return BIN


@pytest.fixture(scope="session")
def rust_run(binary, mnist_dir, tmp_path_factory) -> Path:
    """A run folder from a small `lenet5 train`: lenet5.{safetensors,json,pt,check.safetensors,onnx,pt2},
    metrics.csv, metrics.jsonl."""
    out = tmp_path_factory.mktemp("rust-run")
    run([binary, "train", *RUST_TRAIN, "--threads", "2", "--data", mnist_dir, "--out", out])
    return out


@pytest.fixture(scope="session")
def python_run(mnist_dir, tmp_path_factory) -> Path:
    """A run folder from a small scripts/train_reference --save-model."""
    out = tmp_path_factory.mktemp("python-run")
    run([PYTHON, SCRIPTS / "train_reference", *PY_TRAIN, "--threads", "2", "--save-model", "--data", mnist_dir, "--out", out])
    return out
