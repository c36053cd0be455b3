"""scripts/parity: `lenet5 train` and train_reference (stock torch.optim and lr_scheduler), run
with the same flags and seed, end with identical weights for every recipe, and a run that
crosses mid-epoch in a PyTorch checkpoint, either way, goes on identically on both sides:
weights, optimizer and scheduler state (tolerance 0)."""

import json
import math

import torch

from conftest import L, load_script


def test_every_recipe_and_crossing_ends_bit_identical(binary, mnist_dir, tmp_path, monkeypatch, capsys):
    parity = load_script("parity")
    summary = tmp_path / "parity.json"
    monkeypatch.setattr("sys.argv", ["parity", "--bin", str(binary), "--data", str(mnist_dir), "--out",
                                     str(tmp_path / "runs"), "--summary", str(summary)])
    assert parity.main() == 0, capsys.readouterr().out
    result = json.loads(summary.read_text())
    assert result["threshold"] == 0.0
    # No row left out, none unchecked: both directions for AdamW + one-cycle and SGD + StepLR.
    assert set(result["rows"]) == {r.name for r in parity.ROWS} | {
        f"{d}-{r}" for d in ("rust-to-torch", "torch-to-rust") for r in ("default", "sgd-momentum-step")}
    for name, row in result["rows"].items():
        assert row["differing_elements"] == 0 and row["max_abs"] == 0.0, (name, row)
    for name in (c.name for c in parity.CROSSINGS):
        row = result["rows"][name]
        assert 0 < row["step"] < 300 and row["batch"] > 0, (name, "not mid-epoch")
        # The optimizer's moments or momentum buffers were compared too, not only the weights.
        assert row["state_differing"] == 0 and row["state_values"] > L.NUM_PARAMETERS, (name, row)
        assert row["at_crossing_differing"] == (0 if row["direction"] == "rust-to-torch" else None), (name, row)


def test_differences_finds_one_ulp_a_nan_a_type_and_a_key():
    """The comparison the rows rest on (lenet5_ref.differences), on values built by hand."""
    a = {"w": torch.ones(3), "betas": (0.9, 0.999), "step": 3}
    b = {"w": torch.tensor([1.0, 1.0 + 2 ** -23, 1.0]), "betas": (0.9, float("nan")), "step": 3.0,
         "extra": torch.zeros(4)}
    assert L.differences(a, {k: v for k, v in a.items()}) == {}
    assert L.differences(a, b) == {"keys": (4, math.inf), "['w']": (1, 2 ** -23), "['betas'][1]": (1, math.inf),
                                   "['step']": (1, math.inf)}
    assert L.differences(dict(reversed(a.items())), a) == {"keys": (1, math.inf)}
    assert L.differences(dict(reversed(a.items())), a, ordered=False) == {}
