"""The reference model, its loss, and the readers for every weights format, in Python alone
(no binary): names and shapes pinned as in model/mod.rs, formulas checked by hand, files written
by PyTorch itself."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import L, load_script, save_tch_archive, write_export

PYTORCH_NAMES = {
    "conv1.weight": (6, 1, 5, 5), "conv1.bias": (6,),
    "conv2.weight": (16, 6, 5, 5), "conv2.bias": (16,),
    "fc1.weight": (120, 400), "fc1.bias": (120,),
    "fc2.weight": (84, 120), "fc2.bias": (84,),
    "fc3.weight": (10, 84), "fc3.bias": (10,),
}


def test_parameter_names_shapes_and_count_match_model_rs():
    m = L.LeNet5()
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == PYTORCH_NAMES
    assert sum(p.numel() for p in m.parameters()) == L.NUM_PARAMETERS == 61_706


@pytest.mark.parametrize("arch", ["modern", "classic"])
def test_forward_stages_have_the_paper_shapes(arch):
    m = L.LeNet5(arch)
    x = torch.zeros(3, 1, 32, 32)
    c1 = m.act(m.conv1(x))
    s2 = m.pool(c1)
    c3 = m.act(m.conv2(s2))
    s4 = m.pool(c3)
    assert [t.shape[1:] for t in (c1, s2, c3, s4)] == [(6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 5, 5)]
    assert m(x).shape == (3, 10)
    # TorchScript (what train_reference saves) computes the same function.
    x = torch.randn(4, 1, 32, 32)
    assert torch.equal(torch.jit.script(m)(x), m(x))


def test_classic_uses_tanh_and_average_pooling():
    m = L.LeNet5("classic")
    x = torch.tensor([[[[-1.0, 3.0], [1.0, 1.0]]]])  # (1, 1, 2, 2)
    assert m.pool(x).item() == 1.0 and L.LeNet5("modern").pool(x).item() == 3.0
    assert m.act(torch.tensor(-1.0)) == math.tanh(-1.0) and L.LeNet5().act(torch.tensor(-1.0)) == 0.0
    with pytest.raises(ValueError, match="arch"):
        L.LeNet5("lenet1")


def test_the_classic_convolution_example():
    """The 5x5 image and 3x3 kernel of the usual walkthrough (`lenet5 conv`), with F.conv2d
    (cross-correlation, stride 1, no padding) and with a plain loop."""
    image = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 1, 1, 0], [0, 1, 1, 0, 0]],
                         dtype=torch.float32)
    kernel = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.float32)
    got = F.conv2d(image.view(1, 1, 5, 5), kernel.view(1, 1, 3, 3)).view(3, 3)  # (1, 1, 3, 3) -> (3, 3)
    loop = torch.tensor([[float((image[i:i + 3, j:j + 3] * kernel).sum()) for j in range(3)] for i in range(3)])
    expected = [[4, 3, 4], [2, 4, 3], [2, 3, 4]]
    assert got.tolist() == loop.tolist() == expected


def test_losses_match_their_formulas():
    """Same numbers as model/mod.rs head_losses_match_their_formulas."""
    xs = [0.3 * j - 1.5 for j in range(10)]
    logits, label = torch.tensor([xs]), torch.tensor([3])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    bce = -sum(math.log(sig(x)) if j == 3 else math.log(1 - sig(x)) for j, x in enumerate(xs)) / 10
    ce = -(xs[3] - math.log(sum(math.exp(x) for x in xs)))
    assert L.loss_fn(logits, label, "sigmoid").item() == pytest.approx(bce, abs=1e-6)
    assert L.loss_fn(logits, label, "softmax").item() == pytest.approx(ce, abs=1e-6)


def test_evaluate_and_confusion_matrix():
    class FirstPixel(torch.nn.Module):  # predicts the first pixel's value as the class
        def forward(self, x):
            return F.one_hot(x.view(-1).long(), 10).float()

    images = torch.tensor([3.0, 3.0, 7.0, 1.0]).view(4, 1, 1, 1)
    labels = torch.tensor([3, 5, 7, 1])
    m = L.evaluate(FirstPixel(), images, labels, "softmax", batch_size=3)
    correct, total, _ = m
    assert (correct, total, m.accuracy) == (3, 4, 0.75)
    cm = L.confusion_matrix(m.predictions, labels)
    assert cm[5, 3] == 1 and cm[3, 3] == 1 and cm.sum() == 4  # confusion[true][predicted]


# --- weights files ----------------------------------------------------------------------


@pytest.fixture
def trained():
    torch.manual_seed(0)
    return L.LeNet5()


def test_every_format_reads_back_the_same_tensors(tmp_path, trained):
    sd = trained.state_dict()
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "sd.pt")
    torch.jit.script(trained).save(str(tmp_path / "scripted.pt"))
    save_tch_archive(sd, tmp_path / "w.ot")
    for name, fmt in [("w.safetensors", "safetensors"), ("sd.pt", "state-dict"),
                      ("scripted.pt", "torchscript"), ("w.ot", "tch-archive")]:
        assert L.detect_format(tmp_path / name) == fmt, name
        got = L.read_state_dict(tmp_path / name)
        assert got.keys() == sd.keys(), name
        assert all(torch.equal(got[k], sd[k]) for k in sd), name


def test_key_maps_rename_whole_dotted_prefixes(tmp_path, trained):
    torch.save({f"model.{k}": v for k, v in trained.state_dict().items()}, tmp_path / "wrapped.pt")
    with pytest.raises(L.WeightsError, match="unexpected model.conv1.weight"):
        L.load_weights(L.LeNet5(), L.read_state_dict(tmp_path / "wrapped.pt"))
    got = L.read_state_dict(tmp_path / "wrapped.pt", {"model": ""})
    assert got.keys() == trained.state_dict().keys()
    assert L._rename("features.0.bias", {"features.0": "conv1"}) == "conv1.bias"
    assert L._rename("features.01.bias", {"features.0": "conv1"}) == "features.01.bias"


@pytest.mark.parametrize("key", L.CHECKPOINT_KEYS)
def test_a_notebooks_checkpoint_dict_gives_its_weights_as_rust_reads_it(tmp_path, trained, key, capsys):
    """The entries formats/weights.rs looks in, beside what a notebook saves with them (tutorial layout)."""
    sd = trained.state_dict()
    opt = torch.optim.AdamW(trained.parameters())
    torch.save({"epoch": 3, key: sd, "optimizer_state_dict": opt.state_dict(), "loss": 0.25}, tmp_path / "ckpt.pt")
    assert L.differences(L.read_state_dict(tmp_path / "ckpt.pt"), sd) == {}
    assert f"note: {tmp_path / 'ckpt.pt'}: weights from its '{key}' entry" in capsys.readouterr().err
    # The most specific entry wins: a checkpoint whose `model` holds other tensors too.
    torch.save({"model": {k: torch.zeros_like(v) for k, v in sd.items()}, "model_state_dict": sd}, tmp_path / "two.pt")
    assert L.differences(L.read_state_dict(tmp_path / "two.pt"), sd) == {}


def test_data_parallels_module_prefix_is_dropped_in_every_file(tmp_path, trained, capsys):
    sd = trained.state_dict()
    dp = torch.nn.DataParallel(trained).state_dict()
    assert all(k.startswith("module.") for k in dp)
    torch.save(dp, tmp_path / "dp.pt")
    torch.save({"epoch": 1, "state_dict": dp}, tmp_path / "dp_ckpt.pt")
    save_file(dict(dp), str(tmp_path / "dp.safetensors"))
    for name in ("dp.pt", "dp_ckpt.pt", "dp.safetensors"):
        assert L.differences(L.read_state_dict(tmp_path / name), sd, ordered=False) == {}, name  # safetensors sorts
        assert "every key starts with 'module.' (DataParallel)" in capsys.readouterr().err, name
    # A prefix on only some keys is left for --key-map (and the fit check) to name.
    torch.save({**sd, "module.extra": torch.zeros(1)}, tmp_path / "some.pt")
    assert "module.extra" in L.read_state_dict(tmp_path / "some.pt")


def test_a_dict_without_weights_names_where_it_looked_and_what_it_holds(tmp_path, trained):
    torch.save({"epoch": 1, "weights": trained.state_dict()}, tmp_path / "odd.pt")
    with pytest.raises(L.WeightsError, match=r"odd.pt: holds a dict that is neither a state dict nor a checkpoint "
                                             r"with one under 'model_state_dict', 'state_dict', 'model', 'net' "
                                             r"\(keys: 'epoch', 'weights'\)"):
        L.read_state_dict(tmp_path / "odd.pt")
    torch.save([trained.state_dict()], tmp_path / "list.pt")
    with pytest.raises(L.WeightsError, match="list.pt: holds a list, not a state dict or a checkpoint dict"):
        L.read_state_dict(tmp_path / "list.pt")


def test_a_state_dict_that_does_not_fit_is_refused_whole_with_every_problem_named(trained):
    sd = {k: torch.zeros_like(v) for k, v in trained.state_dict().items()}
    sd["fc1.weight"] = torch.zeros(120, 256)
    sd["fc3.bias"] = torch.zeros(10, dtype=torch.int64)
    del sd["fc2.bias"]
    sd["bn.running_mean"] = torch.zeros(6)
    target = L.LeNet5()
    before = target.conv1.weight.detach().clone()
    with pytest.raises(L.WeightsError) as e:
        L.load_weights(target, sd, "f.pt")
    for expected in ["missing fc2.bias [84]", "wrong shape for fc1.weight: expected [120, 400], got [120, 256]",
                     "wrong dtype for fc3.bias: torch.int64", "unexpected bn.running_mean [6]"]:
        assert expected in str(e.value)
    assert str(e.value).startswith("f.pt: ")
    assert torch.equal(target.conv1.weight, before)  # nothing half-loaded


def test_files_that_are_not_weights_say_what_they_are(tmp_path, trained):
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(L.WeightsError, match="not a model file"):
        L.detect_format(tmp_path / "text.pt")
    torch.save(trained, tmp_path / "pickled_module.pt")  # a whole pickled nn.Module
    with pytest.raises(L.WeightsError, match="not a plain state dict"):
        L.read_state_dict(tmp_path / "pickled_module.pt")


# --- exports and crosscheck, on a Python-made stand-in for a Rust export ------------------


@pytest.fixture(scope="module")
def fake_export(tmp_path_factory, test_set):
    torch.manual_seed(0)
    x, y = test_set
    return write_export(L.LeNet5(), tmp_path_factory.mktemp("export") / "m", x, y)


def test_load_exported_verifies_checksums(fake_export, tmp_path):
    ex = L.load_exported(fake_export)
    assert ex.check_inputs.shape == (64, 1, 32, 32) and ex.check_logits.shape == (64, 10)
    assert torch.equal(ex.model(ex.check_inputs), ex.check_logits)
    # A changed weights file no longer matches the card.
    import shutil
    for f in fake_export.parent.iterdir():
        shutil.copy(f, tmp_path / f.name)
    w = L.read_state_dict(tmp_path / "m.safetensors")
    w["fc3.bias"] += 1
    save_file(w, str(tmp_path / "m.safetensors"))
    with pytest.raises(L.WeightsError, match=r"m.safetensors: sha256 .* differs from the card's"):
        L.load_exported(tmp_path / "m")


def run_crosscheck(monkeypatch, capsys, *argv) -> tuple[int, str]:
    crosscheck = load_script("crosscheck")
    monkeypatch.setattr("sys.argv", ["crosscheck", *map(str, argv)])
    code = crosscheck.main()
    return code, capsys.readouterr().out


def test_crosscheck_passes_a_consistent_export(fake_export, mnist_dir, monkeypatch, capsys):
    code, out = run_crosscheck(monkeypatch, capsys, fake_export, "--data", mnist_dir)
    assert code == 0, out
    assert "crosscheck passed" in out and "max abs" in out and "argmax agree 100.00%" in out


def test_crosscheck_fails_when_rust_logits_differ(fake_export, mnist_dir, tmp_path, monkeypatch, capsys):
    import shutil

    from safetensors.torch import load_file
    for f in fake_export.parent.iterdir():
        shutil.copy(f, tmp_path / f.name)
    check = load_file(str(tmp_path / "m.check.safetensors"))
    check["logits"][5, 3] += 1e-3  # 10x the tolerance, in one logit
    save_file(check, str(tmp_path / "m.check.safetensors"))
    card = L.read_card(tmp_path / "m.json")
    card["files"]["check"]["sha256"] = L.sha256_file(tmp_path / "m.check.safetensors")
    card["metrics"]["test_correct"] += 1  # and a card that claims one more correct answer
    (tmp_path / "m.json").write_text(__import__("json").dumps(card))
    code, out = run_crosscheck(monkeypatch, capsys, tmp_path / "m", "--data", mnist_dir)
    assert code == 1, out
    assert "FAIL Rust check logits vs reference" in out and "crosscheck FAILED" in out
    assert "FAIL reference   accuracy" in out
