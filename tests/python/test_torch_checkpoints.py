"""Training checkpoints cross between Rust and PyTorch mid-run, both ways, and the run goes on
bit-identically, through scripts/parity's crossings on other recipes than its own (with
shifts): `lenet5 torch-checkpoint` writes what stock torch.optim and lr_scheduler write
themselves (compared entry by entry, tolerance 0), PyTorch continues it as Rust does, to the
weights of the uninterrupted Rust run, and `lenet5 train --resume FILE.pt` continues a
checkpoint that train_reference (stock classes) wrote as PyTorch itself does."""

import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import L, load_script

parity = load_script("parity")
RECIPE = ["--limit-train", "3200", "--epochs", "3", "--batch-size", "64", "--seed", "3", "--shift", "1"]
RECIPES = {
    "default": [],  # AdamW, OneCycleLR cycling beta1
    "sgd-nesterov-step": ["--optimizer", "sgd", "--lr", "0.05", "--nesterov", "--weight-decay", "5e-4",
                          "--schedule", "step"],
    "adam-amsgrad-cosine": ["--optimizer", "adam", "--amsgrad", "--lr", "1e-3", "--schedule", "cosine"],
}


@pytest.fixture(scope="module")
def runtime(mnist_dir):
    return ["--threads", "1", "--data", str(mnist_dir)]


@pytest.fixture(scope="module")
def uninterrupted(binary, runtime, tmp_path_factory):
    """The final weights of each recipe trained by Rust without a stop."""
    out = {}
    for name, flags in RECIPES.items():
        folder = tmp_path_factory.mktemp(f"straight-{name}")
        parity.run([binary, "train", *RECIPE, *flags, *runtime, "--out", folder], 1)
        out[name] = load_file(str(folder / "lenet5.safetensors"))
    return out


def assert_identical(compared):
    assert (compared.weights, compared.state) == ({}, {}), compared
    assert compared.state_values > L.NUM_PARAMETERS  # the optimizer's state was there to compare


def assert_ends_uninterrupted(crossed, weights):
    final = torch.load(crossed.torch_final, weights_only=True)["model_state_dict"]
    assert L.differences(weights, final, ordered=False) == {}


@pytest.mark.parametrize("name", ["default", "sgd-nesterov-step"])
def test_a_rust_checkpoint_is_torch_optims_own_and_pytorch_continues_it(name, binary, runtime, tmp_path,
                                                                        uninterrupted):
    crossed = parity.rust_to_torch(binary, [*RECIPE, *RECIPES[name]], runtime, 1, tmp_path)
    assert 0 < crossed.step < 150 and crossed.batch > 0, "the stop fell mid-epoch"
    assert_identical(crossed.at_crossing)  # stock torch.optim's and lr_scheduler's state after as many steps
    assert_identical(crossed.final)  # PyTorch continuing it ends where Rust continuing it ends
    assert_ends_uninterrupted(crossed, uninterrupted[name])


@pytest.mark.parametrize("name", ["default", "adam-amsgrad-cosine"])
def test_lenet5_resumes_a_notebook_checkpoint_as_pytorch_does(name, binary, runtime, tmp_path, uninterrupted):
    crossed = parity.torch_to_rust(binary, [*RECIPE, *RECIPES[name]], runtime, 1, tmp_path, 70)
    assert (crossed.step, crossed.batch) == (70, 20)
    assert_identical(crossed.final)
    assert_ends_uninterrupted(crossed, uninterrupted[name])


def test_a_checkpoint_without_a_recipe_is_refused_in_one_line(binary, tmp_path):
    torch.save({"epoch": 1, "model_state_dict": {}}, tmp_path / "bare.pt")
    r = subprocess.run([str(binary), "train", "--resume", str(tmp_path / "bare.pt"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 1 and "no 'recipe' entry" in r.stderr and "panicked" not in r.stderr, r.stderr
