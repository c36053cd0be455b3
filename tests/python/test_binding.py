"""`import lenet5`, the Rust binding, against stock PyTorch (scripts/lenet5_ref.py's nn.Module)
and against the CLI: same logits, shared memory, the CLI's training run weight for weight,
Python exceptions for bad input, and a training stopped by KeyboardInterrupt that resumes.
test_module.py checks the model as an nn.Module (autograd, threads, pickling, hooks).

scripts/setup builds and installs the binding into the venv (maturin); these tests fail, not
skip, without it: it is part of the product.
"""

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, L, run

try:
    import lenet5
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(f"the binding is not installed in this venv ({e}); scripts/setup builds it") from e

MODEL = ROOT / "models" / "mnist" / "lenet5.safetensors"


@pytest.fixture(scope="module")
def shipped():
    return lenet5.load(MODEL)


@pytest.fixture(scope="module")
def reference():
    """The same weights in the plain PyTorch model."""
    return L.load_model(MODEL).eval()


def test_logits_equal_the_pytorch_model_on_the_10000_test_images(shipped, reference, test_set):
    images, labels = test_set
    ours = torch.cat([shipped(images[i:i + 1000]) for i in range(0, len(images), 1000)])
    theirs = L.predict(reference, images)
    # Both run the same libtorch kernels on the same weights: exact.
    assert (ours - theirs).abs().max().item() == 0.0
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    assert (ours.argmax(1) == labels).sum().item() == lenet5.evaluate(shipped)["correct"]


def test_the_direct_engine_agrees_to_float_rounding(reference, test_set):
    images, _ = test_set
    threads = torch.get_num_threads()
    direct = lenet5.load(MODEL, engine="direct")
    assert direct.engine == "direct"
    assert torch.get_num_threads() == threads  # the notebook's torch keeps its settings
    with torch.no_grad():  # inference (test_module checks its autograd)
        ours = direct(images)
    theirs = L.predict(reference, images)
    assert torch.get_num_threads() == threads
    # Another summation order: rounding only (the logits are ~10 in size).
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (ours.argmax(1) != theirs.argmax(1)).sum().item() <= 1  # a near-tie may flip


def test_evaluate_matches_the_reference_evaluation(shipped, reference, test_set):
    images, labels = test_set
    got = lenet5.evaluate(shipped, images=images, labels=labels)
    want = L.evaluate(reference, images, labels)
    assert (got["correct"], got["total"]) == (want.correct, want.total)
    assert got["loss"] == pytest.approx(want.loss, rel=1e-6)
    assert torch.equal(got["confusion"], L.confusion_matrix(want.predictions, labels))


def test_activations_are_every_stage_and_the_input_is_the_callers_tensor(shipped, reference, test_set):
    x = test_set[0][:3]
    stages = shipped.activations(x)
    assert list(stages) == ["input", "C1", "S2", "C3", "S4", "F5", "F6", "output"]
    assert stages["input"].data_ptr() == x.data_ptr()
    with torch.no_grad():
        c1 = torch.relu(reference.conv1(x))
        assert torch.equal(stages["C1"], c1)
        assert torch.equal(stages["S2"], torch.max_pool2d(c1, 2))
        assert torch.equal(stages["output"], reference(x))
    assert [tuple(t.shape[1:]) for t in stages.values()] == [
        (1, 32, 32), (6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 5, 5), (120,), (84,), (10,)]


def test_state_dict_shares_memory_with_the_model_and_load_state_dict_copies_in(test_set):
    model = lenet5.LeNet5(seed=3)
    assert isinstance(model, torch.nn.Module)
    sd = model.state_dict()
    assert list(sd) == [k for k, _ in L.LeNet5().named_parameters()]
    assert sd["fc3.bias"].data_ptr() == model.state_dict()["fc3.bias"].data_ptr()
    x = test_set[0][:4]
    before = model(x)
    with torch.no_grad():
        sd["fc3.bias"].add_(1.0)  # through the shared memory
    assert torch.allclose(model(x), before + 1.0, atol=1e-5)

    other = L.LeNet5()
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), other(x))


def test_the_same_seed_initialises_as_pytorch_does():
    torch.manual_seed(7)
    theirs = L.LeNet5()
    ours = lenet5.LeNet5(seed=7)
    for name, t in ours.state_dict().items():
        assert torch.equal(t, theirs.state_dict()[name]), name


def test_save_writes_what_lenet5_export_writes(shipped, tmp_path, test_set):
    files = shipped.save(tmp_path / "m")
    assert sorted(p.name for p in map(type(tmp_path), files)) == [
        "m.check.safetensors", "m.json", "m.onnx", "m.pt", "m.pt2", "m.safetensors"]
    exported = L.load_exported(tmp_path / "m")  # verifies the card's hashes and the check logits
    x = test_set[0][:16]
    with torch.no_grad():
        assert torch.equal(exported.model(x), shipped(x))
        assert torch.equal(torch.jit.load(str(tmp_path / "m.pt"))(x), shipped(x))


def test_conv_gives_the_walkthrough_numbers():
    result = lenet5.conv()
    assert result["output"] == [[4, 3, 4], [2, 4, 3], [2, 3, 4]]  # not the 4 3 3 of many copies
    assert result["libtorch"] == result["output"]
    first = result["windows"][0]
    assert (first["row"], first["col"], first["sum"]) == (0, 0, 4.0)
    assert [x for x, _ in first["terms"]] == [1, 1, 1, 0, 1, 1, 0, 0, 1]
    # Stride, padding and a tensor input, against torch's own conv2d.
    x = torch.arange(36.0).view(6, 6) % 7 - 3
    w = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]])
    got = lenet5.conv(x, w, stride=2, padding=1)["output"]
    want = torch.nn.functional.conv2d(x.view(1, 1, 6, 6).double(), w.view(1, 1, 3, 3).double(), stride=2, padding=1)
    assert got == want.view(3, 3).tolist()
    assert len(lenet5.conv(x, w, stride=2, padding=1)["windows"]) == 9


def test_train_equals_the_cli_run_with_the_same_flags(binary, mnist_dir, tmp_path):
    flags = {"epochs": 1, "limit_train": 2000, "batch_size": 64, "seed": 5, "shift": 1}
    cli = tmp_path / "cli"
    run([binary, "train", "--epochs", "1", "--limit-train", "2000", "--batch-size", "64", "--seed", "5",
         "--shift", "1", "--threads", "2", "--device", "cpu", "--data", mnist_dir, "--out", cli])
    model, history = lenet5.train(**flags, data=mnist_dir, out=tmp_path / "py", threads=2, device="cpu", progress=False)
    assert type(model) is lenet5.LeNet5 and (model.arch, model.head, model.engine) == ("modern", "softmax", "libtorch")
    theirs = load_file(cli / "lenet5.safetensors")
    ours = model.state_dict()
    assert set(ours) == set(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k  # weight for weight, bit for bit
    assert load_file(tmp_path / "py" / "lenet5.safetensors").keys() == theirs.keys()
    assert [row["epoch"] for row in history] == [1]
    assert history[0]["test_accuracy"] > 0.6  # far from chance (0.1)
    assert model.card["training"]["recipe"]["seed"] == 5
    # Each card records the call its shell was given: the CLI's argv, the Python call.
    assert json.loads((cli / "lenet5.json").read_text())["provenance"]["command_line"][1:3] == ["train", "--epochs"]
    call = model.card["provenance"]["command_line"]
    assert call == [f"lenet5.train(data={str(mnist_dir)!r}, out={str(tmp_path / 'py')!r}, device='cpu', threads=2, "
                    "epochs=1, limit_train=2000, batch_size=64, seed=5, shift=1)"], call


def test_train_on_the_callers_tensors_reports_progress(test_set, tmp_path):
    images, labels = test_set
    events = []
    with torch.no_grad():  # the caller's grad mode is this libtorch's too: training turns it on
        model, history = lenet5.train(images=images[:2000], labels=labels[:2000], test_images=images[2000:3000],
                                      test_labels=labels[2000:3000], epochs=2, batch_size=50, threads=2,
                                      out=tmp_path, progress=lambda event, value: events.append((event, value)))
    assert [e for e, _ in events].count("epoch") == 2
    last = [v for e, v in events if e == "progress"][-1]
    assert (last["epoch"], last["seen"], last["total"]) == (2, 2000, 2000)
    assert len(history) == 2 and history[1]["test_accuracy"] > 0.8
    assert lenet5.evaluate(model, images=images[2000:3000], labels=labels[2000:3000])["accuracy"] == history[1]["test_accuracy"]


def test_train_starts_from_a_named_recipe_and_keywords_override_it(test_set, tmp_path):
    images, labels = test_set
    model, history = lenet5.train(recipe="fast", epochs=3, batch_size=50, images=images[:1000], labels=labels[:1000],
                                  test_images=images[1000:1500], test_labels=labels[1000:1500], threads=1,
                                  out=tmp_path, progress=False)
    training = model.card["training"]
    named, used = training["named_recipe"], training["recipe"]
    assert named["name"] == used["recipe"] == "fast" and named["changes"]["evaluate"] == "end"
    # The recipe's changes hold where no keyword overrode them; the keywords win where one did.
    overridden = {"epochs", "batch_size"}
    assert overridden <= named["changes"].keys()
    kept = {k: v for k, v in named["changes"].items() if k not in overridden}
    assert {k: used[k] for k in kept} == kept
    assert (used["epochs"], used["batch_size"]) == (3, 50)
    assert [row["test_accuracy"] is not None for row in history] == [False, False, True]  # tested once, at the end
    assert model.card["metrics"]["test_accuracy"] == history[-1]["test_accuracy"]
    with pytest.raises(ValueError, match='recipe="quick": must be one of "default", "fast"'):
        lenet5.train(recipe="quick", epochs=1, progress=False)


def _press_ctrl_c_as_a_terminal_does():
    """Stops a training as Ctrl-C or the notebook's stop button does: a real SIGINT sent to the
    process while the main thread is inside the Rust loop (its callback returns first, so the
    signal lands between steps). Returns the progress callback; the callback does not return
    again until the signal is out, so it always lands before the run ends however loaded the
    machine is."""
    pressed, sent = threading.Event(), threading.Event()

    def press():
        pressed.wait()
        time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)
        sent.set()

    threading.Thread(target=press, daemon=True).start()

    def callback(event, value):
        if pressed.is_set():
            assert sent.wait(10), "the SIGINT was never sent"
        elif event == "progress" and value["seen"] >= 1280:
            pressed.set()

    return callback


def _raise_in_the_callback():
    """A KeyboardInterrupt raised inside the progress callback: where Python delivers a Ctrl-C
    that arrives while the callback runs."""

    def callback(event, value):
        if event == "progress" and value["seen"] >= 1280:
            raise KeyboardInterrupt

    return callback


@pytest.mark.parametrize("interrupt", [_press_ctrl_c_as_a_terminal_does, _raise_in_the_callback], ids=["sigint", "raised-in-callback"])
def test_an_interrupted_training_raises_keyboardinterrupt_and_resumes_bit_identically(mnist_dir, tmp_path, interrupt):
    # Stopped in mid-epoch 1 (of 63 steps, after step 20); the resumed run must be the uninterrupted one.
    recipe = dict(epochs=2, limit_train=4000, batch_size=64, seed=2, data=mnist_dir, threads=2, device="cpu", progress=False)
    whole, _ = lenet5.train(**recipe, out=tmp_path / "whole")

    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt, match="resume with lenet5.train"):
        lenet5.train(**{**recipe, "progress": interrupt()}, out=out)
    assert (out / "checkpoint.safetensors").is_file()
    assert not (out / "lenet5.safetensors").exists()  # stopped before the end

    resumed, history = lenet5.train(resume=out, data=mnist_dir, threads=2, device="cpu", progress=False)
    assert [row["epoch"] for row in history] == [1, 2]
    for k, t in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], t), k


def test_bad_inputs_raise_python_exceptions(shipped, tmp_path, test_set):
    x = test_set[0][:2]
    with pytest.raises(ValueError, match=r"\[N, 1, 32, 32\]"):
        shipped(torch.zeros(2, 28, 28))
    with pytest.raises(TypeError, match="float32"):
        shipped(x.double())
    with pytest.raises(ValueError, match="sparse"):
        shipped(x.to_sparse())
    with pytest.raises(ValueError, match="meta device"):
        shipped(torch.zeros(2, 1, 32, 32, device="meta"))
    # A non-contiguous view is read as it is, not misread.
    t = x.transpose(2, 3)
    assert torch.equal(shipped(t), shipped(t.contiguous()))
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        lenet5.load(tmp_path / "nowhere.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="bad.safetensors"):
        lenet5.load(bad)
    with open(bad, "rb") as f:
        pass
    with pytest.raises(TypeError):
        lenet5.load(f)  # a (closed) file object, not a path
    with pytest.raises(ValueError, match="arch"):
        lenet5.LeNet5(arch="resnet")
    model = lenet5.LeNet5(seed=1)
    before = model.state_dict()["fc3.weight"].clone()
    with pytest.raises(RuntimeError, match="fc3.weight"):  # nn.Module's exception, the CLI's message
        model.load_state_dict({**model.state_dict(), "fc3.weight": torch.zeros(3, 3)})
    assert torch.equal(model.state_dict()["fc3.weight"], before)  # nothing copied
    with pytest.raises(RuntimeError, match="tpu"):  # nn.Module.to's own refusal
        model.to("tpu")
    if not torch.cuda.is_available():
        with pytest.raises((ValueError, RuntimeError)):
            model.to("cuda")
    with pytest.raises(ValueError, match='state_dict\\["fc3.bias"\\].*meta'):
        model.load_state_dict({**model.state_dict(), "fc3.bias": torch.zeros(10, device="meta")})
    with pytest.raises(ValueError, match="labels"):
        lenet5.evaluate(shipped, images=x, labels=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="epochs = 0: must be at least 1") as refused:
        lenet5.train(epochs=0)
    assert "--" not in str(refused.value)  # the setting's own name, not the CLI's flag
    with pytest.raises(TypeError, match="lrr"):
        lenet5.train(lrr=0.1)
    with pytest.raises(TypeError, match="lr="):
        lenet5.train(lr="fast")
    with pytest.raises(ValueError, match="test_images"):
        lenet5.train(images=x, labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="filter"):
        lenet5.conv("101/010/101", [[1, 2], [3]])
    with pytest.raises(ValueError, match="stride = 0"):
        lenet5.conv(stride=0)


@pytest.mark.parametrize("form", ["run folder", "file", "prefix"])
def test_a_model_path_means_the_same_to_the_cli_and_the_binding(binary, form, test_set):
    """`lenet5 eval --model P` and `lenet5.load(P)` read the same model for every form of P."""
    path = {"run folder": "models/mnist", "file": "models/mnist/lenet5.safetensors", "prefix": "models/mnist/lenet5"}[form]
    r = subprocess.run([binary, "eval", "--model", path, "--json", "--threads", "1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cli = json.loads(r.stdout)
    assert Path(cli["model"]).resolve() == (ROOT / "models/mnist/lenet5.safetensors").resolve()
    model = lenet5.load(ROOT / path)
    assert lenet5.evaluate(model)["correct"] == cli["correct"]
    x = test_set[0][:4]
    assert torch.equal(model(x), lenet5.load(ROOT / "models/mnist/lenet5.safetensors")(x))


def test_a_model_path_that_names_nothing_is_refused_alike(binary, tmp_path):
    for path in [tmp_path / "missing", tmp_path]:  # nothing there; a folder without a model
        r = subprocess.run([binary, "eval", "--model", str(path)], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 1 and str(path) in r.stderr, r.stderr
        with pytest.raises((FileNotFoundError, ValueError), match=str(path)):
            lenet5.load(path)


def test_the_cli_binary_links_no_python(binary):
    # tch's python-extension and pyo3's extension-module come in through the binding crate only:
    # the binary must not need libtorch_python or libpython to start.
    linked = run(["ldd", binary]).stdout
    assert "libtorch_cpu" in linked and "python" not in linked, linked
    native = next((ROOT / "binding" / "python" / "lenet5").glob("_native*.so"))
    assert "libtorch_python" in run(["ldd", native]).stdout  # what pyo3-tch's tensors cross through
