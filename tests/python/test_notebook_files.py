"""The model files notebook users actually have, written by stock PyTorch and evaluated by the
Rust binary (`lenet5 eval --json`): checkpoint dicts, whole pickled modules (classes Rust cannot
import), DataParallel state dicts, torch.export archives. Each must score exactly what the same
weights score in PyTorch (L.evaluate), say in a note where the weights came from, and each bad
variant must fail in one clean line. Nothing in the files is run: they are read as data."""

import collections
import json
import os
import zipfile

import pytest
import torch

from conftest import PYTHON, L, quick_train, run


@pytest.fixture(scope="module")
def trained(mnist_dir):
    return quick_train(mnist_dir, seed=3)


@pytest.fixture(scope="module")
def want(trained, test_set):
    """What PyTorch scores with the trained weights: the number every readable file must match."""
    return L.evaluate(trained, *test_set)


def eval_rust(binary, model, data, *flags, check=True):
    return run([binary, "eval", "--model", model, "--data", data, "--json", "--threads", "2", *flags], check=check)


def assert_scores(r, want):
    got = json.loads(r.stdout)
    assert (got["correct"], got["total"]) == (want.correct, want.total)
    assert got["loss"] == pytest.approx(want.loss, rel=1e-5)


def notes(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("note: ")]


def assert_clean_failure(r, path) -> str:
    """Exit 1, no panic or backtrace, nothing on stdout; returns the error (notes dropped)."""
    assert r.returncode == 1, r.stderr
    assert r.stdout.strip() == ""
    for noise in ("panicked", "Exception raised from", "frame #", "Traceback", "RUST_BACKTRACE"):
        assert noise not in r.stderr, r.stderr
    error = "\n".join(line for line in r.stderr.splitlines() if not line.startswith("note: "))
    assert error.startswith(f"error: {path}"), r.stderr
    return error


@pytest.mark.parametrize("key", ["model_state_dict", "state_dict", "model", "net"])
def test_a_checkpoint_dict_gives_its_weights_and_names_the_entry(binary, mnist_dir, trained, want, tmp_path, key):
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    checkpoint = {"epoch": 3, key: trained.state_dict(), "optimizer_state_dict": opt.state_dict(),
                  "loss": 0.25, "args": {"lr": 1e-3, "betas": (0.9, 0.999)}}
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    r = eval_rust(binary, tmp_path / "ckpt.pt", mnist_dir)
    assert_scores(r, want)
    assert f"note: {tmp_path / 'ckpt.pt'}: weights from its '{key}' entry" in notes(r), r.stderr


def test_the_tutorials_checkpoint_after_training_steps_loads(binary, mnist_dir, test_set, tmp_path):
    """PyTorch's "saving and loading a general checkpoint" recipe, after real AdamW and
    OneCycleLR steps: the weights that moved are the ones scored."""
    model = quick_train(mnist_dir, seed=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=10)
    x, y = L.load_split(mnist_dir, "train")
    model.train()
    for i in range(3):
        opt.zero_grad()
        L.loss_fn(model(x[i * 64:(i + 1) * 64]), y[i * 64:(i + 1) * 64], "softmax").backward()
        opt.step()
        sched.step()
    torch.save({"epoch": 1, "step": 3, "model_state_dict": model.state_dict(),
                "optimizer_state_dict": opt.state_dict(), "scheduler_state_dict": sched.state_dict()},
               tmp_path / "tutorial.pt")
    r = eval_rust(binary, tmp_path / "tutorial.pt", mnist_dir)
    assert_scores(r, L.evaluate(model.eval(), *test_set))
    assert any("weights from its 'model_state_dict' entry" in n for n in notes(r)), r.stderr


# A notebook's own class, defined in __main__ where no other program can import it: the
# pickle names `__main__.Net`, and torch.load(weights_only=True) refuses the file.
WHOLE_MODULE = """
import sys, torch
sys.path.insert(0, "scripts")
import lenet5_ref as L

class Net(L.LeNet5):
    pass

net = Net()
net.load_state_dict(torch.load(sys.argv[1] + ".sd.pt", weights_only=True))
wrap = sys.argv[2]
model = {"plain": net, "sequential": torch.nn.Sequential(net), "dataparallel": torch.nn.DataParallel(net)}[wrap]
torch.save(model, sys.argv[1])
try:
    torch.load(sys.argv[1], weights_only=True)
    raise SystemExit("weights_only=True read a pickled module")
except Exception as e:
    assert "__main__.Net" in str(e) or "Unsupported global" in str(e), e
"""


@pytest.mark.parametrize("wrap, flags, note", [
    ("plain", [], "a whole pickled __main__.Net"),
    ("sequential", ["--key-map", "0="], "a whole pickled torch.nn.modules.container.Sequential"),
    ("dataparallel", [], "every key starts with 'module.'"),
])
def test_a_whole_pickled_module_of_a_class_we_cannot_import_loads_as_data(
        binary, mnist_dir, trained, want, tmp_path, wrap, flags, note):
    path = tmp_path / f"{wrap}.pt"
    torch.save(trained.state_dict(), f"{path}.sd.pt")
    run([PYTHON, "-c", WHOLE_MODULE, path, wrap])
    r = eval_rust(binary, path, mnist_dir, *flags)
    assert_scores(r, want)
    assert any(note in n for n in notes(r)), r.stderr


def test_a_data_parallel_state_dict_loads_without_its_module_prefix(binary, mnist_dir, trained, want, tmp_path):
    sd = torch.nn.DataParallel(trained).state_dict()
    assert all(k.startswith("module.") for k in sd)
    torch.save(sd, tmp_path / "dp.pt")
    r = eval_rust(binary, tmp_path / "dp.pt", mnist_dir)
    assert_scores(r, want)
    assert f"note: {tmp_path / 'dp.pt'}: every key starts with 'module.' (DataParallel); reading them without it" in notes(r)
    # In a checkpoint too, and as safetensors.
    torch.save({"epoch": 1, "state_dict": sd}, tmp_path / "dp_ckpt.pt")
    assert_scores(eval_rust(binary, tmp_path / "dp_ckpt.pt", mnist_dir), want)
    from safetensors.torch import save_file
    save_file(dict(sd), str(tmp_path / "dp.safetensors"))
    assert_scores(eval_rust(binary, tmp_path / "dp.safetensors", mnist_dir), want)


def test_a_torch_export_archive_gives_its_weights(binary, mnist_dir, trained, want, tmp_path):
    # Named so that the archive's layout trips the zip crate's default reader: a .pt2 holds a
    # torch.save zip of sample inputs, whose end record it took for the outer one's.
    path = tmp_path / "notebook.pt2"
    torch.export.save(torch.export.export(trained, (torch.zeros(1, 1, 32, 32),)), str(path))
    r = eval_rust(binary, path, mnist_dir)
    assert_scores(r, want)
    assert f"note: {path}: a torch.export archive; its weights are read, its graph is not run" in notes(r), r.stderr

    def tampered(name, change):
        """A copy of the archive with change(weights config) applied."""
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp_path / name, "w") as dst:
            for e in src.namelist():
                data = src.read(e)
                if e.endswith("/data/weights/model_weights_config.json"):
                    config = json.loads(data)
                    change(config["config"])
                    data = json.dumps(config).encode()
                dst.writestr(e, data)
        return tmp_path / name

    def grow(config):
        config["fc1.weight"]["tensor_meta"]["sizes"][1]["as_int"] = 4000
    rows = [
        (tampered("outside.pt2", grow), "[120, 4000], stride [400, 1], offset 0 lies outside weight_4 (48000 items)"),
        (tampered("pickled.pt2", lambda c: c["fc2.bias"].update(use_pickle=True)), "fc2.bias in weight_7: not a readable zip"),
        (tampered("complex.pt2", lambda c: c["fc3.bias"]["tensor_meta"].update(dtype=10)), "export dtype 10"),
    ]
    for bad, expected in rows:
        error = assert_clean_failure(eval_rust(binary, bad, mnist_dir, check=False), bad)
        assert len(error.splitlines()) == 1 and expected in error, f"{bad.name}: {expected!r} not in\n{error}"
        assert "cannot read the torch.export archive" in error, error


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_objects_that_are_not_modules_are_never_run(binary, mnist_dir, trained, want, tmp_path):
    evil = Evil()
    evil.target = tmp_path / "pwned"
    torch.save({"model_state_dict": trained.state_dict(), "hook": evil}, tmp_path / "evil.pt")
    assert_scores(eval_rust(binary, tmp_path / "evil.pt", mnist_dir), want)
    assert not (tmp_path / "pwned").exists()
    torch.save(evil, tmp_path / "only_evil.pt")
    error = assert_clean_failure(eval_rust(binary, tmp_path / "only_evil.pt", mnist_dir, check=False), tmp_path / "only_evil.pt")
    assert "holds a posix.system object, not a state dict or an nn.Module" in error, error
    assert not (tmp_path / "pwned").exists()


class FlatNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 8, 3))
        self.classifier = torch.nn.Sequential(torch.nn.Linear(8 * 28 * 28, 10))


def test_bad_variants_fail_in_one_clean_line(binary, mnist_dir, trained, tmp_path):
    sd = trained.state_dict()
    rows = [
        ("no_known_key.pt", {"epoch": 1, "ema_weights": sd},
         "holds a dict that is neither a state dict nor a checkpoint with one under 'model_state_dict', "
         "'state_dict', 'model', 'net' (keys: \"epoch\", \"ema_weights\")"),
        ("a_list.pt", [sd], "holds a list, not a state dict, a checkpoint dict or a pickled module"),
        ("counter.pt", collections.Counter(a=1), "holds a collections.Counter object, not a state dict or an nn.Module"),
        ("tuple_key.pt", {("a", 1): 2}, "a dict key that is a tuple"),
    ]
    for name, obj, expected in rows:
        torch.save(obj, tmp_path / name)
        error = assert_clean_failure(eval_rust(binary, tmp_path / name, mnist_dir, check=False), tmp_path / name)
        assert len(error.splitlines()) == 1 and expected in error, f"{name}: {expected!r} not in\n{error}"


def test_a_module_of_another_layout_is_summed_up_in_a_few_lines(binary, mnist_dir, tmp_path):
    torch.save(FlatNet().state_dict(), tmp_path / "flat.pt")
    error = assert_clean_failure(eval_rust(binary, tmp_path / "flat.pt", mnist_dir, check=False), tmp_path / "flat.pt")
    assert len(error.splitlines()) <= 10, error
    assert "missing 10 tensors: conv1.bias [6], conv1.weight [6, 1, 5, 5]" in error, error
    assert "unexpected 6 tensors: classifier.0.bias [10], classifier.0.weight [10, 6272]" in error, error
    assert "(under classifier.*, features.*)" in error, error
    # Wrong shapes are still named with both shapes.
    sd = {k: v[:1] for k, v in quick_train(mnist_dir, n=64).state_dict().items()}
    torch.save({"model_state_dict": sd}, tmp_path / "small.pt")
    error = assert_clean_failure(eval_rust(binary, tmp_path / "small.pt", mnist_dir, check=False), tmp_path / "small.pt")
    assert len(error.splitlines()) <= 10, error
    assert "wrong shape for conv1.bias: expected [6], got [1]" in error and "and 6 more" in error, error
