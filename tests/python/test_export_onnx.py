"""NAME.onnx, written by Rust (src/formats/onnx/): accepted by onnx's full checker, run by
onnxruntime with PyTorch's logits, the card's facts in its metadata; and ONNX files read back as
weights by `lenet5 eval --model x.onnx`, torch.onnx.export's among them, bad ones refused by name."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, L, quick_train, run

VARIANTS = [(arch, head) for arch in ("modern", "classic") for head in ("softmax", "sigmoid")]
STAGES = ["C1", "S2", "C3", "S4", "F5", "F6"]


def tolerance(reference: np.ndarray) -> float:
    """float32 sums in another order: 1e-5 of the largest logit, absolute below 1."""
    return 1e-5 * max(1.0, float(np.abs(reference).max()))


def session(path) -> ort.InferenceSession:
    """onnxruntime on the CPU with PyTorch's thread count (conftest sets it)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def reference_stages(model: L.LeNet5, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stages of lenet5_ref's forward, spelled out (model.rs STAGES)."""
    with torch.no_grad():
        c1 = model.act(model.conv1(x))
        s2 = model.pool(c1)
        c3 = model.act(model.conv2(s2))
        s4 = model.pool(c3)
        f5 = model.act(model.fc1(torch.flatten(s4, 1)))
        f6 = model.act(model.fc2(f5))
        return {"C1": c1, "S2": s2, "C3": c3, "S4": s4, "F5": f5, "F6": f6, "logits": model.fc3(f6)}


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: "-".join(v))
def exported(request, binary, mnist_dir, tmp_path_factory):
    """PyTorch's seeded LeNet5, a few steps trained (clear margins for the argmax), exported by
    `lenet5 export` from its safetensors: (reference model, DIR/NAME)."""
    arch, head = request.param
    model = quick_train(mnist_dir, arch, head, n=500, seed=3)
    out = tmp_path_factory.mktemp(f"onnx-{arch}-{head}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "w.safetensors"))
    run([binary, "export", "--model", out / "w.safetensors", "--arch", arch, "--head", head,
         "--data", mnist_dir, "--out", out / "m"])
    return model, out / "m"


def test_the_onnx_file_passes_the_full_checker_and_is_recorded_in_the_card(exported):
    _, prefix = exported
    m = onnx.load(f"{prefix}.onnx")
    onnx.checker.check_model(m, full_check=True)
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 18)]
    assert [t.name for t in m.graph.initializer] == list(L.LeNet5().state_dict())  # conv1.weight, conv1.bias, ...
    batch = [d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim[:1]]
    assert batch == ["batch"] and [o.name for o in m.graph.output] == ["logits", *STAGES]
    card = L.read_card(f"{prefix}.json")
    assert card["files"]["onnx"] == {"name": "m.onnx", "sha256": L.sha256_file(f"{prefix}.onnx")}


def test_onnxruntime_gives_pytorchs_logits_at_every_batch_size(exported, test_set):
    model, prefix = exported
    x, _ = test_set
    want = reference_stages(model, x)["logits"].numpy()
    sess = session(f"{prefix}.onnx")
    for batch in (1, 7, 10_000):
        got = np.concatenate([sess.run(["logits"], {"input": xs.numpy()})[0] for xs in x.split(batch)])
        assert got.shape == want.shape
        diff = float(np.abs(got - want).max())
        assert diff <= tolerance(want), f"batch {batch}: max |Δlogit| {diff:.3g}"
        assert (got.argmax(1) == want.argmax(1)).all(), f"batch {batch}: the argmax differs"


def test_the_stage_outputs_are_the_forward_pass(exported, test_set):
    model, prefix = exported
    x = test_set[0][:64]
    want = reference_stages(model, x)
    got = dict(zip(["logits", *STAGES], session(f"{prefix}.onnx").run(None, {"input": x.numpy()}), strict=True))
    for stage in ["logits", *STAGES]:
        assert got[stage].shape == tuple(want[stage].shape), stage
        assert np.abs(got[stage] - want[stage].numpy()).max() <= tolerance(want[stage].numpy()), stage


def metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def check_card_facts(meta: dict, card: dict):
    assert (meta["model.arch"], meta["model.head"]) == (card["model"]["arch"], card["model"]["head"])
    assert meta["dataset"] == card["dataset"] and json.loads(meta["classes"]) == card["classes"]
    mean, std = L.normalization_of(card)
    assert (float(meta["input.normalization.mean"]), float(meta["input.normalization.std"])) == (mean, std)
    assert json.loads(meta["input.shape"]) == card["input"]["shape"] and int(meta["input.pad"]) == card["input"]["pad"]


def test_the_metadata_holds_the_cards_facts(exported):
    _, prefix = exported
    meta, card = metadata(f"{prefix}.onnx"), L.read_card(f"{prefix}.json")
    check_card_facts(meta, card)
    assert card["metrics"] is None and "metrics.test_accuracy" not in meta  # exported from bare weights


def test_a_training_run_writes_onnx_with_its_accuracy(rust_run):
    card = L.read_card(rust_run / "lenet5.json")
    assert card["files"]["onnx"]["sha256"] == L.sha256_file(rust_run / "lenet5.onnx")
    meta = metadata(rust_run / "lenet5.onnx")
    check_card_facts(meta, card)
    assert float(meta["metrics.test_accuracy"]) == card["metrics"]["test_accuracy"]


def test_rusts_onnx_file_reads_back_as_its_weights(exported, binary, mnist_dir, test_set):
    model, prefix = exported
    got = json.loads(run([binary, "eval", "--model", f"{prefix}.onnx", "--data", mnist_dir, "--json"]).stdout)
    assert got["correct"] == L.evaluate(model, *test_set).correct


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")  # torch.export's own
@pytest.mark.parametrize("arch,head,external_data", [("modern", "softmax", True), ("classic", "sigmoid", False)],
                         ids=["modern-softmax-external-data", "classic-sigmoid-inline"])
def test_torch_onnx_export_reads_back_with_the_references_accuracy(binary, mnist_dir, test_set, tmp_path,
                                                                   arch, head, external_data):
    """The dynamo exporter (torch 2.11's default) keeps PyTorch's names and writes linear layers
    as Gemm with transB = 1; by default the weights go to a NAME.onnx.data file beside it."""
    model = quick_train(mnist_dir, arch, head, n=500, seed=5)
    path = tmp_path / "torch.onnx"
    torch.onnx.export(model, (torch.zeros(2, 1, 32, 32),), str(path), dynamo=True,
                      dynamic_shapes=({0: "batch"},), external_data=external_data)
    assert (tmp_path / "torch.onnx.data").exists() == external_data
    want = L.evaluate(model, *test_set)
    r = run([binary, "eval", "--model", path, "--arch", arch, "--head", head, "--data", mnist_dir, "--json"])
    got = json.loads(r.stdout)
    assert (got["correct"], got["total"]) == (want.correct, 10_000)
    assert got["loss"] == pytest.approx(want.loss, rel=1e-5)


# --- bad input ----------------------------------------------------------------------------


def fails(binary, *args) -> str:
    """The error of a command that must exit 1, without the notes printed before it."""
    r = run([binary, *args], check=False)
    assert r.returncode == 1, f"{args}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return "\n".join(line for line in r.stderr.strip().splitlines() if not line.startswith("note: "))


@pytest.fixture(scope="module")
def good_onnx(binary, mnist_dir, tmp_path_factory) -> bytes:
    """The bytes of a NAME.onnx of seeded weights."""
    out = tmp_path_factory.mktemp("onnx-bad")
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in L.LeNet5().state_dict().items()}, str(out / "w.safetensors"))
    run([binary, "export", "--model", out / "w.safetensors", "--data", mnist_dir, "--out", out / "m"])
    return (out / "m.onnx").read_bytes()


def corrupt(data: bytes) -> bytes:
    """Zeros over the start of the graph: tag 0 is no protobuf field."""
    return data[:4] + bytes(32) + data[36:]


@pytest.mark.parametrize("damage,says", [
    (lambda b: b[: len(b) // 2], "truncated or corrupt"),
    (lambda b: b[:-1], "truncated or corrupt"),
    (corrupt, "truncated or corrupt"),
], ids=["half", "last-byte-cut", "zeroed"])
def test_a_damaged_onnx_file_is_one_line_naming_it(binary, mnist_dir, good_onnx, tmp_path, damage, says):
    path = tmp_path / "bad.onnx"
    path.write_bytes(damage(good_onnx))
    err = fails(binary, "eval", "--model", path, "--data", mnist_dir)
    assert len(err.splitlines()) == 1 and str(path) in err and says in err, err


def test_an_onnx_graph_that_is_not_lenet5_gets_the_state_dict_message(binary, mnist_dir, good_onnx, tmp_path):
    m = onnx.load_from_string(good_onnx)
    init = {t.name: t for t in m.graph.initializer}
    m.graph.initializer.remove(init["fc2.bias"])
    init["fc1.weight"].CopyFrom(onnx.numpy_helper.from_array(np.zeros((120, 256), np.float32), "fc1.weight"))
    onnx.save(m, str(tmp_path / "other.onnx"))
    err = fails(binary, "eval", "--model", tmp_path / "other.onnx", "--data", mnist_dir)
    assert f"{tmp_path / 'other.onnx'}: the state dict does not fit LeNet-5" in err, err
    assert "missing fc2.bias [84]" in err and "wrong shape for fc1.weight: expected [120, 400], got [120, 256]" in err, err


def test_an_export_that_cannot_be_written_leaves_nothing(binary, mnist_dir, good_onnx, tmp_path):
    (tmp_path / "m.onnx").write_bytes(good_onnx)
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    err = fails(binary, "export", "--model", tmp_path / "m.onnx", "--data", mnist_dir,
                "--out", blocker / "sub" / "m")
    assert len(err.splitlines()) == 1 and str(blocker / "sub") in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "m.onnx"]


def test_the_committed_onnx_proto_is_the_pinned_onnx_packages():
    """build.rs compiles src/formats/onnx/onnx.proto; it must be the one the pinned onnx ships."""
    shipped = Path(onnx.__file__).parent / "onnx.proto"
    assert (ROOT / "src/formats/onnx/onnx.proto").read_bytes() == shipped.read_bytes(), \
        f"copy {shipped} (onnx {onnx.__version__}) to src/formats/onnx/onnx.proto"
