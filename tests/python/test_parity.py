"""scripts/parity: `lenet5 train` and train_reference (stock torch.optim and lr_scheduler), run
with the same flags and seed, end with identical weights for every recipe (tolerance 0)."""

import json

from conftest import load_script


def test_every_recipe_ends_bit_identical(binary, mnist_dir, tmp_path, monkeypatch, capsys):
    parity = load_script("parity")
    summary = tmp_path / "parity.json"
    monkeypatch.setattr("sys.argv", ["parity", "--bin", str(binary), "--data", str(mnist_dir), "--out",
                                     str(tmp_path / "runs"), "--summary", str(summary)])
    assert parity.main() == 0, capsys.readouterr().out
    result = json.loads(summary.read_text())
    assert result["threshold"] == 0.0
    assert set(result["rows"]) == {r.name for r in parity.ROWS}  # no row left out, none unchecked
    for name, row in result["rows"].items():
        assert row["differing_elements"] == 0 and row["max_abs"] == 0.0, (name, row)
