"""End to end against the Rust binary: Rust's exports checked by PyTorch (scripts/crosscheck),
PyTorch's files evaluated by Rust (`lenet5 eval --json`) with the same correct count, tch's
.ot read by Python, foreign state dicts refused with every problem named, and training parity
(scripts/parity). Each test skips when the binary is missing."""

import json
import shutil

import pytest
import torch

from conftest import PYTHON, SCRIPTS, L, load_script, quick_train, run, save_tch_archive

# --- Rust -> Python -----------------------------------------------------------------------


def test_a_rust_training_run_passes_crosscheck(rust_run, mnist_dir):
    r = run([PYTHON, SCRIPTS / "crosscheck", rust_run / "lenet5", "--data", mnist_dir])
    assert "crosscheck passed" in r.stdout
    card = L.read_card(rust_run / "lenet5.json")
    assert card["metrics"]["test_total"] == 10_000 and card["parameters"] == L.NUM_PARAMETERS
    assert card["metrics"]["test_accuracy"] > 0.8, "one small epoch still learns something"


def test_lenet5_export_passes_crosscheck(binary, rust_run, mnist_dir, tmp_path, monkeypatch, capsys):
    run([binary, "export", "--model", rust_run / "lenet5.safetensors", "--data", mnist_dir, "--out", tmp_path / "m"])
    assert {f.name for f in tmp_path.iterdir()} == {"m.pt", "m.safetensors", "m.json", "m.check.safetensors", "m.onnx", "m.pt2"}
    monkeypatch.setattr("sys.argv", ["crosscheck", str(tmp_path / "m"), "--data", str(mnist_dir)])
    assert load_script("crosscheck").main() == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    for checked in [".pt2 (torch.export) vs reference", "ONNX (onnxruntime, batch 1)", "ONNX (onnxruntime, batch 7)",
                    "ONNX (onnxruntime, batch 10000)", "TorchScript vs reference"]:
        assert f"ok   {checked}" in out, out  # every export file was compared, none skipped


def test_a_fashion_mnist_run_passes_crosscheck(binary, tmp_path, monkeypatch, capsys):
    """Fashion-MNIST's own normalisation and class names, gzipped IDX files on both sides."""
    folder = L.default_data_dir("fashion-mnist")
    if not (folder / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST is in none of {L.DEFAULT_DATA_DIRS['fashion-mnist']}; {L.FETCH_HINT['fashion-mnist']}")
    run([binary, "train", "--dataset", "fashion-mnist", "--data", folder, "--dry-run", "--epochs", "1", "--out", tmp_path])
    card = L.read_card(tmp_path / "lenet5.json")
    assert card["dataset"] == "fashion-mnist" and card["classes"] == L.CLASSES["fashion-mnist"]
    assert L.normalization_of(card) == L.NORMALIZATION["fashion-mnist"]
    monkeypatch.setattr("sys.argv", ["crosscheck", str(tmp_path), "--data", str(folder)])
    assert load_script("crosscheck").main() == 0, capsys.readouterr().out


def test_rust_metrics_files_have_the_agreed_columns(rust_run):
    m = L.read_metrics(rust_run)  # checks the header against METRICS_COLUMNS
    assert m["epoch"] == [1]
    assert 0 <= m["train_accuracy"][0] <= 1 and 0 <= m["test_accuracy"][0] <= 1
    lines = (rust_run / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [list(r) for r in rows] == [L.METRICS_COLUMNS]
    assert rows[0]["test_accuracy"] == pytest.approx(m["test_accuracy"][0], rel=1e-12)


def test_a_tch_ot_archive_reads_in_python(binary, rust_run, mnist_dir, tmp_path):
    run([binary, "export", "--model", rust_run / "lenet5.safetensors", "--data", mnist_dir,
         "--out", tmp_path / "m", "--ot"])
    assert L.detect_format(tmp_path / "m.ot") == "tch-archive"
    names = [n for n, _ in torch.jit.load(str(tmp_path / "m.ot")).named_parameters()]
    assert sorted(names) == sorted(k.replace(".", "|") for k in L.LeNet5().state_dict())
    got, want = L.read_state_dict(tmp_path / "m.ot"), L.read_state_dict(rust_run / "lenet5.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_rusts_own_torchscript_export_evaluates_in_rust(binary, rust_run, mnist_dir):
    """NAME.pt is TorchScript (traced); `eval --model NAME.pt` must run it."""
    r = eval_json(binary, rust_run / "lenet5.pt", mnist_dir)
    assert r["correct"] == L.read_card(rust_run / "lenet5.json")["metrics"]["test_correct"]


# --- Python -> Rust -----------------------------------------------------------------------


def eval_json(binary, model, data, *flags) -> dict:
    r = run([binary, "eval", "--model", model, "--data", data, "--json", *flags])
    return json.loads(r.stdout)


def python_metrics(model, test_set) -> L.Metrics:
    x, y = test_set
    return L.evaluate(model, x, y)


@pytest.mark.parametrize("file", ["reference_state_dict.pt", "reference_scripted.pt"])
def test_python_trained_models_score_the_same_in_rust(binary, python_run, test_set, mnist_dir, file):
    card = L.read_card(python_run / "reference_state_dict.json")
    got = eval_json(binary, python_run / file, mnist_dir)
    assert (got["correct"], got["total"]) == (card["metrics"]["test_correct"], 10_000)
    assert got["accuracy"] == pytest.approx(card["metrics"]["test_accuracy"], abs=1e-12)
    assert got["loss"] == pytest.approx(card["metrics"]["test_loss"], rel=1e-5)
    m = python_metrics(L.load_model(python_run / "reference_state_dict.pt"), test_set)
    assert got["confusion"] == L.confusion_matrix(m.predictions, test_set[1]).tolist()
    assert len(got["per_class_accuracy"]) == 10


def test_classic_sigmoid_from_python_with_and_without_a_card(binary, mnist_dir, test_set, tmp_path):
    model = quick_train(mnist_dir, "classic", "sigmoid")
    want = python_metrics(model, test_set)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    # The card beside the state dict (m.json for m.pt) says classic/sigmoid ...
    L.write_card(tmp_path / "m.json", model, "mnist", want, None, {"weights": tmp_path / "m.pt"})
    got = eval_json(binary, tmp_path / "m.pt", mnist_dir)
    assert (got["correct"], got["loss"]) == (want.correct, pytest.approx(want.loss, rel=1e-5))
    # ... and without it the flags do.
    shutil.copy(tmp_path / "m.pt", tmp_path / "bare.pt")
    got = eval_json(binary, tmp_path / "bare.pt", mnist_dir, "--arch", "classic", "--head", "sigmoid")
    assert (got["correct"], got["loss"]) == (want.correct, pytest.approx(want.loss, rel=1e-5))


def test_a_python_written_ot_archive_evaluates_in_rust(binary, python_run, test_set, mnist_dir, tmp_path):
    model = L.load_model(python_run / "reference_state_dict.pt")
    save_tch_archive(model.state_dict(), tmp_path / "m.ot")
    assert eval_json(binary, tmp_path / "m.ot", mnist_dir)["correct"] == python_metrics(model, test_set).correct


def test_torchscript_scripted_in_a_main_script_runs_its_own_forward(binary, mnist_dir, test_set, tmp_path):
    """pytorch/examples defines its Net in __main__, so torch.jit.script stores it as
    code/__torch__.py, the file an OutputArchive (.ot) also has. Rust must still run the
    module's forward (here classic: tanh + avg-pool), not load its weights into a modern LeNet5."""

    class Net(L.LeNet5):
        pass

    Net.__module__ = "__main__"  # as if defined in the script being run
    model = Net("classic")
    model.load_state_dict(quick_train(mnist_dir, "classic").state_dict())
    torch.jit.script(model).save(str(tmp_path / "net.pt"))
    want = python_metrics(torch.jit.load(str(tmp_path / "net.pt")), test_set)
    assert eval_json(binary, tmp_path / "net.pt", mnist_dir)["correct"] == want.correct


def test_a_state_dict_that_does_not_fit_is_refused_naming_each_tensor(binary, mnist_dir, tmp_path):
    torch.manual_seed(0)
    sd = dict(L.LeNet5().state_dict())  # a plain dict: the OrderedDict case is tested above
    sd["fc1.weight"] = torch.zeros(120, 401)  # wrong shape
    sd["extra.weight"] = torch.zeros(3)  # not in LeNet-5
    del sd["fc3.bias"]  # missing
    torch.save(sd, tmp_path / "bad.pt")
    r = run([binary, "eval", "--model", tmp_path / "bad.pt", "--data", mnist_dir, "--json"], check=False)
    assert r.returncode != 0
    err = r.stderr
    assert "fc1.weight" in err and "[120, 400]" in err and "[120, 401]" in err, err
    assert "extra.weight" in err and "[3]" in err, err
    assert "fc3.bias" in err and "[10]" in err, err
    assert r.stdout.strip() == "", "nothing on stdout when --json fails"


def test_key_map_strips_a_prefix(binary, python_run, test_set, mnist_dir, tmp_path):
    model = L.load_model(python_run / "reference_state_dict.pt")
    torch.save({f"model.{k}": v for k, v in model.state_dict().items()}, tmp_path / "wrapped.pt")
    r = run([binary, "eval", "--model", tmp_path / "wrapped.pt", "--data", mnist_dir, "--json"], check=False)
    assert r.returncode != 0 and "--key-map model=" in r.stderr, r.stderr
    got = eval_json(binary, tmp_path / "wrapped.pt", mnist_dir, "--key-map", "model=")
    assert got["correct"] == python_metrics(model, test_set).correct


# --- training parity ----------------------------------------------------------------------


class FlatNet(torch.nn.Module):
    """A notebook model that wants 28x28 images, not LeNet-5's 32x32."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(x.reshape(x.shape[0], 784))


def test_a_torchscript_module_that_wants_other_input_fails_in_one_line(binary, mnist_dir, tmp_path):
    torch.jit.script(FlatNet()).save(str(tmp_path / "flat.pt"))
    r = run([binary, "eval", "--model", tmp_path / "flat.pt", "--data", mnist_dir], check=False)
    assert r.returncode == 1, r.stderr
    assert "flat.pt" in r.stderr and "TorchScript module failed" in r.stderr, r.stderr
    assert "shape" in r.stderr and "784" in r.stderr, r.stderr  # the reason, not only that it failed
    for noise in ("Exception raised from", "frame #", "panicked", "Traceback"):
        assert noise not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_run_evaluated_only_at_the_end_reads_back_with_none_for_the_other_epochs(binary, mnist_dir, tmp_path):
    run([binary, "train", "--recipe", "fast", "--engine", "direct", "--epochs", "2", "--limit-train", "1000",
         "--threads", "1", "--data", mnist_dir, "--out", tmp_path])
    m = L.read_metrics(tmp_path)
    assert m["test_accuracy"][0] is None and m["test_loss"][0] is None and m["train_loss"][0] > 0
    card = L.read_card(tmp_path / "lenet5.json")
    assert m["test_accuracy"][1] == pytest.approx(card["metrics"]["test_accuracy"], rel=1e-12)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_accuracy"] is None for r in rows] == [True, False]
