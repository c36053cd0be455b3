"""`lenet5.LeNet5` is a real `torch.nn.Module` whose forward pass runs in Rust: PyTorch's
names and initialisation, autograd through the Rust call with PyTorch's gradients bit for bit,
a stock torch.optim loop that ends where the same loop on the PyTorch model ends, calls from
many threads and from a forked worker, pickling, load_state_dict's checks, hooks, and the
direct engine following Parameter changes. The PyTorch model is scripts/lenet5_ref.py's.
"""

import ast
import copy
import inspect
import multiprocessing
import pickle
import threading
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lenet5
from conftest import ROOT, L, save_tch_archive

MODEL = ROOT / "models" / "mnist" / "lenet5.safetensors"
ARCH_HEADS = [("modern", "softmax"), ("modern", "sigmoid"), ("classic", "softmax"), ("classic", "sigmoid")]


def reference_of(twin):
    """The PyTorch model with the twin's weights (copies)."""
    ref = L.LeNet5(twin.arch, twin.head)
    ref.load_state_dict(twin.state_dict())
    return ref


def assert_same_parameters(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_the_twin_is_an_nn_module_with_pytorchs_names_and_initialisation():
    twin = lenet5.LeNet5()
    assert isinstance(twin, nn.Module)
    assert [n for n, _ in twin.named_children()] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert isinstance(twin.conv1, nn.Conv2d) and isinstance(twin.fc3, nn.Linear)
    assert [n for n, _ in twin.named_parameters()] == [n for n, _ in L.LeNet5().named_parameters()]
    assert all(type(p) is nn.Parameter and p.requires_grad for p in twin.parameters())
    assert sum(p.numel() for p in twin.parameters()) == L.NUM_PARAMETERS
    for seed, arch in [(0, "modern"), (7, "classic")]:
        ours = lenet5.LeNet5(arch=arch, seed=seed)
        torch.manual_seed(seed)
        assert_same_parameters(ours, L.LeNet5(arch))
    # Two unseeded twins draw from the stream in turn, as two PyTorch models do.
    torch.manual_seed(3)
    a, b = lenet5.LeNet5(), lenet5.LeNet5()
    torch.manual_seed(3)
    L.LeNet5()
    assert_same_parameters(b, L.LeNet5())
    assert not torch.equal(a.fc1.weight, b.fc1.weight)


def _python_functions(module):
    return [n for n, f in vars(module).items() if not n.startswith("_") and isinstance(f, (types.FunctionType, types.BuiltinFunctionType))]


def test_forward_and_backward_run_in_rust(monkeypatch, test_set):
    x, y = test_set[0][:32], test_set[1][:32]
    twins = [lenet5.LeNet5(seed=1), lenet5.LeNet5(seed=1, engine="direct")]

    def loss_of(logits):  # cross-entropy from tensor methods, none of them patched below
        return (logits.logsumexp(1) - logits.gather(1, y[:, None])[:, 0]).mean()

    def run():
        out = []
        for twin in twins:
            twin.zero_grad()
            logits = twin(x)
            loss_of(logits).backward()
            out.append((logits.detach(), [p.grad.clone() for p in twin.parameters()]))
        return out

    before = run()

    def refuse(*args, **kwargs):
        raise AssertionError("PyTorch's Python op ran: the twin must compute in Rust")

    patched = _python_functions(F)
    assert {"conv2d", "linear", "max_pool2d", "relu", "avg_pool2d", "tanh", "cross_entropy"} <= set(patched)
    for name in patched:
        monkeypatch.setattr(F, name, refuse)
    for name in ["conv2d", "relu", "tanh", "max_pool2d", "flatten"]:
        monkeypatch.setattr(torch, name, refuse)  # F.avg_pool2d is torch._C._nn.avg_pool2d, patched above
    for layer in [nn.Conv2d, nn.Linear]:
        monkeypatch.setattr(layer, "forward", refuse)
    with pytest.raises(AssertionError, match="Rust"):
        F.conv2d(x, twins[0].conv1.weight)  # the patches bite
    for (logits, grads), (logits_before, grads_before) in zip(run(), before, strict=True):
        assert torch.equal(logits, logits_before)
        assert all(g.abs().sum() > 0 and torch.equal(g, h) for g, h in zip(grads, grads_before, strict=True))


@pytest.mark.parametrize("arch,head", ARCH_HEADS)
def test_gradients_are_bit_identical_to_pytorchs(arch, head, test_set):
    twin = lenet5.LeNet5(arch, head, seed=3)
    ref = reference_of(twin)
    x, y = test_set[0][:64], test_set[1][:64]
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    losses = []
    for model, inputs in [(twin, xs[0]), (ref, xs[1])]:
        logits = model(inputs)
        assert logits.grad_fn is not None
        loss = L.loss_fn(logits, y, head)
        loss.backward()
        losses.append((logits, loss))
    assert torch.equal(losses[0][0], losses[1][0]) and torch.equal(losses[0][1], losses[1][1])
    for (name, p), q in zip(twin.named_parameters(), ref.parameters(), strict=True):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.equal(p.grad, q.grad), name  # bit for bit, not approximately
    assert torch.equal(xs[0].grad, xs[1].grad)


def test_a_notebook_training_loop_on_the_twin_ends_bit_identical_to_pytorchs(test_set):
    """Stock torch.optim.AdamW and OneCycleLR, 2 epochs on 3,000 MNIST images, the same
    seed and batch order, 1 thread: the twin ends with the PyTorch model's weights exactly."""
    images, labels = test_set[0][:3000], test_set[1][:3000]
    order = torch.Generator().manual_seed(11)
    epochs = [torch.randperm(len(images), generator=order).split(64) for _ in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        twin = lenet5.LeNet5(seed=5)
        torch.manual_seed(5)
        ref = L.LeNet5()
        ends = []
        for model in [twin, ref]:
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=sum(map(len, epochs)))
            model.train()
            for batches in epochs:
                for idx in batches:
                    opt.zero_grad(set_to_none=True)
                    loss = L.loss_fn(model(images[idx]), labels[idx], "softmax")
                    loss.backward()
                    opt.step()
                    sched.step()
            ends.append((loss.item(), opt.state_dict()["state"]))
    finally:
        torch.set_num_threads(threads)
    assert_same_parameters(twin, ref)
    assert ends[0][0] == ends[1][0]
    for i, state in ends[0][1].items():
        assert torch.equal(state["exp_avg_sq"], ends[1][1][i]["exp_avg_sq"]), i
    assert not torch.equal(twin.fc1.weight, lenet5.LeNet5(seed=5).fc1.weight)  # it did train


@pytest.mark.parametrize("engine", ["libtorch", "direct"])
def test_eight_threads_on_one_model_get_the_right_answers(engine, test_set):
    model = lenet5.load(MODEL, engine=engine)
    batches = test_set[0][:8 * 64].split(64)  # 64 images: the direct engine splits them over its threads
    labels = test_set[1][:8 * 64].split(64)

    def work(i):
        logits = model(batches[i])
        grads = torch.autograd.grad(L.loss_fn(logits, labels[i], "softmax"), list(model.parameters()))
        return logits.detach(), grads

    expected = [work(i) for i in range(8)]
    results, errors = {}, []
    start = threading.Barrier(8)

    def thread(i):
        try:
            start.wait()
            results[i] = [work(i) for _ in range(4)]
        except BaseException as e:  # noqa: BLE001 - reported below, with its thread
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in range(8):
        for logits, grads in results[i]:
            assert torch.equal(logits, expected[i][0]), i
            assert all(torch.equal(g, h) for g, h in zip(grads, expected[i][1], strict=True)), i


def test_pickle_deepcopy_and_torch_save_round_trip(test_set, tmp_path):
    x = test_set[0][:100]
    shipped = lenet5.load(MODEL, engine="direct")
    classic = lenet5.LeNet5("classic", "sigmoid", seed=2)
    with torch.no_grad():
        shipped(x)  # the direct engine's native state exists, and is not pickled
    for model in [shipped, classic]:
        saved = tmp_path / "model.pt"
        torch.save(model, saved)
        copies = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model), torch.load(saved, weights_only=False)]
        for other in copies:
            assert type(other) is lenet5.LeNet5
            assert (other.arch, other.head, other.engine, other.card) == (model.arch, model.head, model.engine, model.card)
            assert_same_parameters(other, model)
            with torch.no_grad():
                assert torch.equal(other(x), model(x))
    assert shipped.card["dataset"] == "mnist"
    # A deep copy is independent: training it leaves the original as it was.
    twin = copy.deepcopy(shipped)
    with torch.no_grad():
        before = shipped(x)
        twin.fc3.bias.add_(1.0)
        assert torch.allclose(twin(x), before + 1.0, atol=1e-4)
        assert torch.equal(shipped(x), before)
    twin.card["dataset"] = "changed"
    assert shipped.card["dataset"] == "mnist"


def _call_in_child(model, x, conn):
    try:
        with torch.no_grad():
            direct = model(x)
        torch.set_num_threads(1)  # as a DataLoader worker does
        model.engine = "libtorch"
        with torch.no_grad():
            libtorch = model(x)
        conn.send((direct.tolist(), libtorch.tolist()))  # plain lists: torch's own reduction shares memory
    except BaseException as e:  # noqa: BLE001 - sent to the parent, which fails with it
        conn.send(repr(e))


def test_a_forked_worker_calls_a_model_after_the_direct_engine_ran_in_the_parent(test_set):
    model = lenet5.load(MODEL, engine="direct")
    x = test_set[0][:256]
    assert torch.get_num_threads() >= 2, "the parent must split the batch across OpenMP's team"
    with torch.no_grad():
        expected = model(x)  # on OpenMP's team, whose threads a forked child lacks
        libtorch = lenet5.load(MODEL)(x)
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_call_in_child, args=(model, x, send))
    child.start()
    got = receive.recv() if receive.poll(60) else None
    child.join(10)
    if child.is_alive():
        child.kill()
    assert got is not None, "the forked child hung calling the model"
    assert not isinstance(got, str), got
    assert torch.equal(torch.tensor(got[0]), expected) and torch.equal(torch.tensor(got[1]), libtorch)


def test_load_state_dict_checks_everything_before_copying_anything():
    model = lenet5.LeNet5(seed=1)
    before = copy.deepcopy(model.state_dict())
    other = lenet5.LeNet5(seed=2).state_dict()

    def unchanged():
        for k, t in model.state_dict().items():
            assert torch.equal(t, before[k]), k

    missing = {k: v for k, v in other.items() if k != "fc2.bias"}
    with pytest.raises(RuntimeError, match=r"missing fc2.bias \[84\]"):
        model.load_state_dict(missing)
    unchanged()
    # A tensor of the wrong shape is refused even when not strict, and the ones that fit wait.
    for strict in [True, False]:
        with pytest.raises(RuntimeError, match=r"wrong shape for fc3.weight: expected \[10, 84\], got \[3, 3\]"):
            model.load_state_dict({**other, "fc3.weight": torch.zeros(3, 3)}, strict=strict)
        unchanged()
    with pytest.raises(RuntimeError, match="wrong dtype for conv1.bias: Int64"):
        model.load_state_dict({**other, "conv1.bias": torch.zeros(6, dtype=torch.int64)})
    with pytest.raises(RuntimeError, match=r"unexpected bn.weight \[6\]"):
        model.load_state_dict({**other, "bn.weight": torch.zeros(6)})
    unchanged()
    with pytest.raises(RuntimeError, match=r"(?s)missing 10 tensors.*\(every key starts with 'model.': strip that prefix") as prefixed:
        model.load_state_dict({f"model.{k}": v for k, v in other.items()})
    assert "key_maps" not in str(prefixed.value)  # the CLI's setting, not a Python argument
    unchanged()
    with pytest.raises(ValueError, match=r'state_dict\["fc3.bias"\].*meta'):
        model.load_state_dict({**other, "fc3.bias": torch.zeros(10, device="meta")})
    with pytest.raises(TypeError, match="state_dict"):
        model.load_state_dict([("fc3.bias", torch.zeros(10))])
    unchanged()
    # Not strict: PyTorch's missing and unexpected keys, and the rest copied in.
    result = model.load_state_dict({**missing, "extra": torch.zeros(1)}, strict=False)
    assert (result.missing_keys, result.unexpected_keys) == (["fc2.bias"], ["extra"])
    assert torch.equal(model.fc1.weight, other["fc1.weight"]) and torch.equal(model.fc2.bias, before["fc2.bias"])
    assert model.load_state_dict(other) is not None  # nn.Module's result: no keys missing
    assert_same_parameters(model, lenet5.LeNet5(seed=2))


def test_hooks_fire_on_the_model_and_are_refused_on_its_layers(test_set):
    model = lenet5.LeNet5(seed=4)
    x = test_set[0][:4].clone().requires_grad_()  # a full backward hook wants an input that needs grad
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(("pre", args[0].shape)))
    model.register_forward_hook(lambda m, args, out: seen.append(("forward", out.shape)))
    model.register_full_backward_hook(lambda m, grad_in, grad_out: seen.append(("backward", grad_out[0].shape)))
    model(x).sum().backward()
    assert seen == [("pre", x.shape), ("forward", (4, 10)), ("backward", (4, 10))]
    for layer in [model.conv1, model.conv2, model.fc1, model.fc2, model.fc3]:
        for register in ["register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
                         "register_full_backward_pre_hook", "register_backward_hook"]:
            with pytest.raises(NotImplementedError, match="model.activations"):
                getattr(layer, register)(lambda *a: None)
        assert not layer._forward_hooks and not layer._forward_pre_hooks


def test_the_direct_engine_follows_parameter_changes(test_set):
    x, y = test_set[0][:64], test_set[1][:64]
    model = lenet5.LeNet5(seed=6, engine="direct")
    twin = lenet5.LeNet5(seed=6)  # the same weights, run by libtorch

    def agree():
        with torch.no_grad():
            got, want = model(x), twin(x)
        assert (got - want).abs().max().item() < 1e-4
        return got

    first = agree()
    # The gradients of the libtorch twin, stepped by a stock optimiser on the direct model.
    L.loss_fn(twin(x), y, "softmax").backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        p.grad = q.grad.clone()
    for m in [model, twin]:
        torch.optim.SGD(m.parameters(), lr=0.5).step()
    stepped = agree()
    assert not torch.equal(stepped, first)
    model.load_state_dict(lenet5.LeNet5(seed=7).state_dict())
    twin.load_state_dict(lenet5.LeNet5(seed=7).state_dict())
    agree()
    with torch.no_grad():
        model.fc3.bias.add_(1.0)
        twin.fc3.bias.add_(1.0)
    agree()
    model.fc1.weight = nn.Parameter(twin.fc1.weight.detach() * 2)  # a replaced Parameter
    twin.fc1.weight = nn.Parameter(twin.fc1.weight.detach() * 2)
    agree()


def _relative_gap(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("arch,head", ARCH_HEADS)
def test_the_direct_engines_gradients_agree_with_libtorchs_for_any_loss(arch, head, test_set):
    """The direct engine's stated tolerance: 1e-5 of the largest value, per tensor (both sum
    in float32 in different orders; Rust's direct::gradients tests see up to 5e-6). A loss
    the engine knows nothing of, (logits * w).sum(), as well as the head's own."""
    x, y = test_set[0][:70], test_set[1][:70]  # 70: two threads' shares
    w = torch.randn(70, 10, generator=torch.Generator().manual_seed(2))
    for loss_of in [lambda logits: L.loss_fn(logits, y, head), lambda logits: (logits * w).sum()]:
        grads = []
        for engine in ["libtorch", "direct"]:
            twin = lenet5.LeNet5(arch, head, seed=4, engine=engine)
            loss_of(twin(x)).backward()
            grads.append({name: p.grad for name, p in twin.named_parameters()})
        for name, want in grads[0].items():
            got = grads[1][name]
            assert got.shape == want.shape and _relative_gap(got, want) <= 1e-5, name


def test_the_direct_engines_backward_runs_no_libtorch_kernel(test_set):
    x, y = test_set[0][:64], test_set[1][:64]
    twin = lenet5.LeNet5(seed=2, engine="direct")
    loss = F.cross_entropy(twin(x), y)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    ran = {e.key for e in prof.key_averages()}
    assert any(k.endswith("_DirectForwardBackward") for k in ran), sorted(ran)  # it saw the backward pass
    kernels = {"convolution_backward", "addmm", "mm", "convolution", "max_pool2d_with_indices_backward"}
    assert not {k for k in ran for kernel in kernels if k == f"aten::{kernel}"}, sorted(ran)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in twin.parameters())


def test_a_loop_on_the_direct_engine_trains_as_libtorchs_to_rounding(test_set):
    """Stock SGD with momentum, 30 steps: each optimiser step is seen by the next forward
    pass (else the logits would stay put), and the weights end near libtorch's loop's."""
    x, y = test_set[0][:64 * 30], test_set[1][:64 * 30]
    ends, losses = [], []
    for engine in ["libtorch", "direct"]:
        twin = lenet5.LeNet5(seed=9, engine=engine)
        opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
        seen = []
        for xb, yb in zip(x.split(64), y.split(64), strict=True):
            loss = F.cross_entropy(twin(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen.append(loss.item())
        ends.append(twin.state_dict())
        losses.append(seen)
    assert max(losses[1][-5:]) < 0.8 * losses[1][0], losses[1]  # it learned (2.29 to about 1.6)
    for k in ends[0]:
        # Rounding differences grow over 30 steps to about 3e-6; a step not seen, or a wrong
        # gradient, is 1e-1 or more.
        assert _relative_gap(ends[1][k], ends[0][k]) < 1e-4, k


def test_the_direct_engine_refuses_an_input_gradient_and_a_stale_backward(test_set):
    x = test_set[0][:8]
    model = lenet5.LeNet5(seed=1, engine="direct")
    with pytest.raises(RuntimeError, match=r"no gradient for the input.*engine='libtorch'.*x.detach\(\)"):
        model(x.clone().requires_grad_())
    with torch.inference_mode():
        assert model(x).shape == (8, 10)
    model.requires_grad_(False)
    assert model(x).grad_fn is None  # nothing asked for a gradient
    model.requires_grad_(True)
    logits = model(x)
    assert logits.grad_fn is not None
    with torch.no_grad():
        model.fc1.weight.add_(1.0)  # changed between the forward pass and backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logits.sum().backward()


def test_the_usual_module_calls_behave_as_on_any_module(test_set, tmp_path):
    x = test_set[0][:8]
    model = lenet5.LeNet5(seed=9)
    assert model.eval() is model and not model.training and model.train().training
    with torch.no_grad():
        assert model(x).grad_fn is None
    model(x).sum().backward()
    model.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert model.to("cpu") is model and model.float() is model
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    ref = L.LeNet5()
    ref.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(ref(x), model(x))
    assert model.probabilities(x).sum(1).allclose(torch.ones(8))
    sigmoid = lenet5.LeNet5(head="sigmoid", seed=9)
    assert torch.equal(sigmoid.probabilities(x), torch.sigmoid(sigmoid(x)))
    assert "arch='modern', head='softmax', engine='libtorch'" in repr(model)


def test_save_writes_the_current_parameters(test_set, tmp_path, mnist_dir):
    model = lenet5.LeNet5(seed=10)
    with torch.no_grad():
        model.fc3.bias.fill_(0.5)
    model.save(tmp_path / "m", data=mnist_dir)
    again = lenet5.load(tmp_path / "m")
    assert_same_parameters(again, model)
    assert again.card["files"]["weights"]["name"] == "m.safetensors"


def test_load_returns_the_module_for_every_format(tmp_path, test_set):
    x = test_set[0][:16]
    shipped = lenet5.load(MODEL)
    ref = reference_of(shipped)
    classic = L.LeNet5("classic")
    files = {
        "safetensors": MODEL,
        "run folder": MODEL.parent,
        "exported TorchScript (weights as constants)": MODEL.with_suffix(".pt"),
    }
    torch.save(ref.state_dict(), tmp_path / "sd.pt")
    torch.save({"epoch": 3, "model_state_dict": ref.state_dict()}, tmp_path / "checkpoint.pt")
    torch.save(ref, tmp_path / "whole.pt")
    save_tch_archive(ref.state_dict(), tmp_path / "tch.ot")
    torch.jit.script(ref).save(str(tmp_path / "scripted.pt"))
    files.update({k: tmp_path / f for k, f in [("state dict", "sd.pt"), ("checkpoint", "checkpoint.pt"),
                                               ("whole module", "whole.pt"), ("tch archive", "tch.ot"),
                                               ("scripted module", "scripted.pt")]})
    with pytest.warns(UserWarning):
        for name, path in files.items():
            model = lenet5.load(path)
            assert type(model) is lenet5.LeNet5, name
            assert_same_parameters(model, shipped)
    # A TorchScript module without a card: the arch is the one whose logits it gives.
    torch.jit.trace(classic, x[:1]).save(str(tmp_path / "classic.pt"))
    with pytest.warns(UserWarning, match="taking head softmax"):
        model = lenet5.load(tmp_path / "classic.pt")
    assert model.arch == "classic" and model.card is None
    assert_same_parameters(model, classic)
    with torch.no_grad():
        assert torch.equal(model(x), classic(x))
    # Something else in TorchScript is refused, naming the file.
    torch.jit.script(nn.Linear(3, 3)).save(str(tmp_path / "linear.pt"))
    with pytest.raises(ValueError, match="linear.pt: a TorchScript module without LeNet-5's tensors"):
        lenet5.load(tmp_path / "linear.pt", head="softmax")


def test_bad_inputs_and_parameters_raise_one_line_python_exceptions(test_set):
    x = test_set[0][:2]
    model = lenet5.LeNet5(seed=1)
    with pytest.raises(TypeError, match="expected a torch.Tensor, got list"):
        model([[0.0]])
    with pytest.raises(ValueError, match=r"\[N, 1, 32, 32\]"):
        model(torch.zeros(2, 1, 28, 28))
    with pytest.raises(TypeError, match="float32"):
        model(x.double())
    with pytest.raises(ValueError, match="meta device"):
        model(torch.zeros(2, 1, 32, 32, device="meta"))
    assert model(torch.zeros(0, 1, 32, 32)).shape == (0, 10)
    with torch.no_grad():
        assert lenet5.LeNet5(engine="direct")(torch.zeros(0, 1, 32, 32)).shape == (0, 10)
    with pytest.raises(TypeError, match="conv1.weight is Double"):
        copy.deepcopy(model).double()(x.double())
    broken = copy.deepcopy(model)
    broken.fc3.weight = nn.Parameter(torch.zeros(3, 84))
    with pytest.raises(ValueError, match=r"fc3.weight has shape \[3, 84\]; LeNet-5's is \[10, 84\]"):
        broken(x)
    with torch.device("meta"):
        broken.fc2.bias = nn.Parameter(torch.zeros(84))
    with pytest.raises(ValueError, match="fc2.bias: a tensor on the meta device"):
        broken(x)
    with pytest.raises(ValueError, match="engine='gpu': must be one of"):
        lenet5.LeNet5(engine="gpu")
    with pytest.raises(ValueError, match="engine="):
        model.engine = "fast"
    with pytest.raises(TypeError, match="lenet5.LeNet5"):
        lenet5.evaluate(L.LeNet5())


def test_the_stubs_name_every_native_call_with_its_parameters():
    """binding/python/lenet5/_native.pyi stays true: the same names, the same parameters."""
    from lenet5 import _native

    tree = ast.parse((ROOT / "binding" / "python" / "lenet5" / "_native.pyi").read_text())
    stubs = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            stubs[node.name] = node
        elif isinstance(node, ast.AnnAssign):
            stubs[node.target.id] = node
    native = {n for n in dir(_native) if not n.startswith("_") or n == "__version__"}
    assert native <= set(stubs), native - set(stubs)
    for name in native:
        if isinstance(stubs[name], ast.FunctionDef):
            stubbed = [a.arg for a in stubs[name].args.args + stubs[name].args.kwonlyargs]
            assert stubbed == list(inspect.signature(getattr(_native, name)).parameters), name
