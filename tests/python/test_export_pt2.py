"""`lenet5 export` writes NAME.pt2, a torch.export archive made in Rust alone. For every arch and
head, torch.export.load reads it without a warning; its program is the one torch.export.export
makes of scripts/lenet5_ref.py's LeNet5 (the same ops in the same order, the same signature and
shapes, a batch from 1 up); its logits equal the reference model's exactly; the binary reads it
back; and a damaged copy is refused in one line naming it."""

import json
import zipfile

import pytest
import torch
from safetensors.torch import save_file
from torch._export.serde.schema import SCHEMA_VERSION

from conftest import PYTHON, L, run

VARIANTS = [(arch, head) for arch in ("modern", "classic") for head in ("softmax", "sigmoid")]
BATCHES = (1, 7, 1000)

# Loads a .pt2 and runs the 10,000 test images at each batch size, in a fresh process: libtorch
# warns of some things once per process, which an earlier test could have used up. One thread,
# as the reference runs (faster at batch 1, and the same kernels on both sides).
LOAD_AND_RUN = """
import sys, warnings, torch
sys.path.insert(0, "scripts")
import lenet5_ref as L
torch.set_num_threads(1)
pt2, data, out, *batches = sys.argv[1:]
images, _ = L.load_split(data, "t10k")
with warnings.catch_warnings():
    warnings.simplefilter("error")
    module = torch.export.load(pt2).module()
    with torch.no_grad():
        logits = {b: torch.cat([module(images[i:i + b]) for i in range(0, len(images), b)]) for b in map(int, batches)}
torch.save(logits, out)
"""


@pytest.fixture(scope="module", params=VARIANTS, ids=["-".join(v) for v in VARIANTS])
def exported(request, binary, mnist_dir, tmp_path_factory):
    """The reference model with seeded initial weights, and the .pt2 the binary exports of them."""
    arch, head = request.param
    torch.manual_seed(VARIANTS.index(request.param))
    model = L.LeNet5(arch, head).eval()
    out = tmp_path_factory.mktemp(f"pt2-{arch}-{head}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "init.safetensors"))
    run([binary, "export", "--model", out / "init.safetensors", "--arch", arch, "--head", head,
         "--data", mnist_dir, "--out", out / "m"])
    return model, out / "m.pt2"


def load_and_run(pt2, data, tmp_path):
    r = run([PYTHON, "-c", LOAD_AND_RUN, pt2, data, tmp_path / "logits.pt", *BATCHES], check=False)
    return r, (torch.load(tmp_path / "logits.pt") if r.returncode == 0 else None)


def test_it_loads_without_a_word_and_its_logits_equal_the_reference_models(exported, mnist_dir, test_set, tmp_path):
    model, pt2 = exported
    r, logits = load_and_run(pt2, mnist_dir, tmp_path)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for b in BATCHES:
                want = torch.cat([model(test_set[0][i:i + b]) for i in range(0, len(test_set[0]), b)])
                assert torch.equal(logits[b], want), f"batch {b}: max |diff| {(logits[b] - want).abs().max()}"
    finally:
        torch.set_num_threads(threads)


def test_the_no_warning_check_catches_torchs_own_archives(mnist_dir, tmp_path):
    """torch.export.save stores weights raw, and torch 2.11 loads them with torch.frombuffer on
    read-only bytes, which warns: why the Rust writer pickles them. This is the check failing."""
    ref = tmp_path / "ref.pt2"
    torch.export.save(torch.export.export(L.LeNet5().eval(), (torch.zeros(2, 1, 32, 32),)), str(ref))
    r, _ = load_and_run(ref, mnist_dir, tmp_path)
    assert r.returncode != 0 and "UserWarning: The given buffer is not writable" in r.stderr, \
        "torch.export.load of raw weights no longer warns: src/formats/pt2.rs could store them raw, as torch does"


def signature(ep):
    """The program as torch.export describes it, the batch symbol's name aside."""
    batch = next(iter(ep.range_constraints))

    def shape(n):
        return [str(d).replace(str(batch), "B") for d in n.meta["val"].shape]

    return {
        "ops": [str(n.target) for n in ep.graph.nodes if n.op == "call_function"],
        "values": [(n.op, n.name, shape(n), n.meta.get("nn_module_stack")) for n in ep.graph.nodes if n.op != "output"],
        "inputs": [(s.kind, s.arg.name, s.target) for s in ep.graph_signature.input_specs],
        "outputs": [(s.kind, s.arg.name, s.target) for s in ep.graph_signature.output_specs],
        "ranges": [(r.lower, r.upper) for r in ep.range_constraints.values()],
        "module_call_graph": [e.fqn for e in ep.module_call_graph],
        "verifiers": [v.dialect for v in ep.verifiers],
    }


def test_its_program_is_the_one_torch_export_makes_of_the_reference_model(exported):
    model, pt2 = exported
    batch = torch.export.Dim("batch", min=1)  # torch's own default would be 2
    want = torch.export.export(model, (torch.zeros(4, 1, 32, 32),), dynamic_shapes=({0: batch},))
    got = signature(torch.export.load(pt2))
    assert got == signature(want)
    assert got["ranges"] == [(1, torch.utils._sympy.numbers.int_oo)]
    assert got["ops"][:3] == (["aten.conv2d.default", "aten.relu.default", "aten.max_pool2d.default"]
                              if model.arch == "modern" else
                              ["aten.conv2d.default", "aten.tanh.default", "aten.avg_pool2d.default"])


def test_the_schema_version_rust_pins_is_the_installed_torchs(exported):
    _, pt2 = exported
    with zipfile.ZipFile(pt2) as z:
        program = json.loads(z.read(next(n for n in z.namelist() if n.endswith("/models/model.json"))))
    ours = (program["schema_version"]["major"], program["schema_version"]["minor"])
    assert ours == SCHEMA_VERSION, (
        f"torch {torch.__version__} writes export schema {SCHEMA_VERSION}; src/formats/pt2.rs pins "
        f"SCHEMA_VERSION = {ours}: compare the layout with what this torch writes, then update the pin")
    assert program["opset_version"] == {"aten": torch._C._get_max_operator_version()}, \
        "src/formats/pt2.rs ATEN_OPSET differs from torch._C._get_max_operator_version()"


def test_the_card_records_it_and_the_binary_reads_it_back(exported, binary, mnist_dir, test_set):
    model, pt2 = exported
    card = L.read_card(pt2.with_suffix(".json"))
    assert card["files"]["torch_export"] == {"name": "m.pt2", "sha256": L.sha256_file(pt2)}
    got = json.loads(run([binary, "eval", "--model", pt2, "--data", mnist_dir, "--json", "--threads", "2"]).stdout)
    want = L.evaluate(model, *test_set)
    assert (got["correct"], got["total"]) == (want.correct, want.total)
    assert got["loss"] == pytest.approx(want.loss, rel=1e-5)


def test_a_truncated_or_corrupt_archive_is_refused_in_one_line_naming_it(exported, binary, mnist_dir, tmp_path):
    _, pt2 = exported
    data = pt2.read_bytes()
    with zipfile.ZipFile(pt2) as z:
        entry = z.getinfo(next(n for n in z.namelist() if n.endswith("/data/weights/weight_4")))  # fc1.weight
    name_len, extra_len = (int.from_bytes(data[entry.header_offset + i:entry.header_offset + i + 2], "little") for i in (26, 28))
    start = entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2
    rows = [("truncated.pt2", data[:len(data) // 2], "truncated zip archive"),
            ("corrupt.pt2", data[:start] + bytes(b ^ 0xFF for b in data[start:start + 64]) + data[start + 64:],
             "weight_4: Invalid checksum")]
    for name, content, expected in rows:
        bad = tmp_path / name
        bad.write_bytes(content)
        r = run([binary, "eval", "--model", bad, "--data", mnist_dir, "--json"], check=False)
        error = [line for line in r.stderr.splitlines() if not line.startswith("note: ")]
        assert r.returncode == 1 and r.stdout == "" and len(error) == 1, r.stderr
        assert error[0].startswith(f"error: {bad}: ") and expected in error[0], r.stderr
