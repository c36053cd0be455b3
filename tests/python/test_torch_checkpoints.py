"""Training checkpoints cross between Rust and PyTorch mid-run, both ways, and the run goes on
bit-identically: `lenet5 torch-checkpoint` writes what stock torch.optim and lr_scheduler
write themselves (compared entry by entry, tolerance 0), PyTorch continues it to the weights
of the uninterrupted Rust run, and `lenet5 train --resume FILE.pt` continues a checkpoint that
train_reference (stock classes) wrote to the weights PyTorch itself reaches."""

import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, SCRIPTS

RECIPE = ["--limit-train", "3200", "--epochs", "3", "--batch-size", "64", "--seed", "3", "--threads", "1",
          "--shift", "1"]
RECIPES = {
    "default": [],  # AdamW, OneCycleLR cycling beta1
    "sgd-nesterov-step": ["--optimizer", "sgd", "--lr", "0.05", "--nesterov", "--weight-decay", "5e-4",
                          "--schedule", "step"],
    "adam-amsgrad-cosine": ["--optimizer", "adam", "--amsgrad", "--lr", "1e-3", "--schedule", "cosine"],
}
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run(cmd):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stderr[-3000:]}"
    return r


def reference(*args):
    return run([PYTHON, SCRIPTS / "train_reference", *args])


def same(a, b, where="checkpoint"):
    """Equal as values, types and order included (a dict may stand for model.state_dict()'s
    OrderedDict, which every load_state_dict takes); tensors bit for bit."""
    dicts = isinstance(a, dict) and isinstance(b, dict)
    assert dicts or type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__} ({a!r} vs {b!r})"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def weights_equal(rust_file, torch_state):
    rust = load_file(str(rust_file))
    return rust.keys() == torch_state.keys() and all(torch.equal(rust[k], v) for k, v in torch_state.items())


@pytest.fixture(scope="module")
def uninterrupted(binary, mnist_dir, tmp_path_factory):
    """The final weights of each recipe trained by Rust without a stop."""
    out = {}
    for name, flags in RECIPES.items():
        folder = tmp_path_factory.mktemp(f"straight-{name}")
        run([binary, "train", *RECIPE, *flags, "--data", mnist_dir, "--out", folder])
        out[name] = folder / "lenet5.safetensors"
    return out


def interrupted_rust_run(binary, mnist_dir, folder, flags):
    """A Rust run stopped by SIGINT soon after its first checkpoint (step 7), mid-epoch."""
    child = subprocess.Popen([str(binary), "train", *RECIPE, *flags, "--data", str(mnist_dir), "--checkpoint-every",
                              "7", "--out", str(folder)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (folder / "checkpoint.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err.decode()[-2000:]


@pytest.mark.parametrize("name", ["default", "sgd-nesterov-step"])
def test_a_rust_checkpoint_is_torch_optims_own_and_pytorch_continues_it(name, binary, mnist_dir, tmp_path,
                                                                        uninterrupted):
    flags = RECIPES[name]
    interrupted_rust_run(binary, mnist_dir, tmp_path / "rust", flags)
    exported = tmp_path / "rust.pt"
    run([binary, "torch-checkpoint", "--run", tmp_path / "rust", "--out", exported])
    ours = torch.load(exported, weights_only=True)
    assert 0 < ours["step"] < 150 and ours["batch"] > 0, "the stop fell mid-epoch"
    # What stock torch.optim/lr_scheduler hold after the same number of steps of the same run.
    theirs_file = tmp_path / "torch.pt"
    reference(*RECIPE, *flags, "--data", mnist_dir, "--stop-after-steps", ours["step"], "--checkpoint", theirs_file,
              "--out", tmp_path / "torch-run")
    theirs = torch.load(theirs_file, weights_only=True)
    for key in ("epoch", "step", "batch", "model_state_dict", "optimizer_state_dict", "scheduler_state_dict"):
        same(ours[key], theirs[key], key)
    # PyTorch continues the Rust checkpoint to the uninterrupted Rust run's weights.
    reference("--resume", exported, "--save-model", "--data", mnist_dir, "--threads", "1", "--out",
              tmp_path / "continued")
    final = torch.load(tmp_path / "continued" / "reference_state_dict.pt", weights_only=True)
    assert weights_equal(uninterrupted[name], final)


@pytest.mark.parametrize("name", ["default", "adam-amsgrad-cosine"])
def test_lenet5_resumes_a_notebook_checkpoint_as_pytorch_does(name, binary, mnist_dir, tmp_path, uninterrupted):
    flags = RECIPES[name]
    notebook = tmp_path / "notebook.pt"
    reference(*RECIPE, *flags, "--data", mnist_dir, "--stop-after-steps", "70", "--checkpoint", notebook,
              "--out", tmp_path / "first-part")
    run([binary, "train", "--resume", notebook, "--threads", "1", "--data", mnist_dir, "--out", tmp_path / "rust"])
    reference("--resume", notebook, "--save-model", "--data", mnist_dir, "--threads", "1", "--out", tmp_path / "torch")
    torch_final = torch.load(tmp_path / "torch" / "reference_state_dict.pt", weights_only=True)
    assert weights_equal(tmp_path / "rust" / "lenet5.safetensors", torch_final)
    assert weights_equal(uninterrupted[name], torch_final)


def test_a_checkpoint_without_a_recipe_is_refused_in_one_line(binary, tmp_path):
    torch.save({"epoch": 1, "model_state_dict": {}}, tmp_path / "bare.pt")
    r = subprocess.run([str(binary), "train", "--resume", str(tmp_path / "bare.pt"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 1 and "no 'recipe' entry" in r.stderr and "panicked" not in r.stderr, r.stderr
