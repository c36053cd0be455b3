"""`lenet5.LeNet5`: the Rust LeNet-5 as a `torch.nn.Module`, and the calls that make one.

The module is Python's: `conv1`, `conv2`, `fc1`, `fc2`, `fc3` are `nn.Conv2d` and `nn.Linear`
holding ordinary `nn.Parameter`s, so PyTorch's names, initialisation, `state_dict()`,
optimisers, `.to()`, `.train()/.eval()`, hooks on the model and pickling all work as on any
module. Its forward pass is Rust's: `forward` hands the input and the ten Parameters to one
native call (`_native.forward`: `lenet5::model::forward_with`, the op sequence the CLI's model
runs too), which computes with those very tensors in libtorch ops, so autograd records them
and `loss.backward()` fills every `.grad`. Rust keeps no tensor between calls.

With `engine="direct"` the forward and backward passes both run in the direct engine's loops,
joined to autograd by `_DirectForward`, a `torch.autograd.Function`.
"""

import json
import os
import warnings
from collections.abc import Mapping

import torch
import torch.nn as nn

from . import _native

ARCHS = ("modern", "classic")  # model.rs Arch
HEADS = ("softmax", "sigmoid")  # model.rs Head
ENGINES = ("libtorch", "direct")  # inference/mod.rs Engine
# The parameters in the order of `model.parameters()`, with their shapes (model.rs PARAMETERS).
PARAMETERS = {
    "conv1.weight": (6, 1, 5, 5),
    "conv1.bias": (6,),
    "conv2.weight": (16, 6, 5, 5),
    "conv2.bias": (16,),
    "fc1.weight": (120, 400),
    "fc1.bias": (120,),
    "fc2.weight": (84, 120),
    "fc2.bias": (84,),
    "fc3.weight": (10, 84),
    "fc3.bias": (10,),
}

_NO_INPUT_GRADIENT = (
    "the direct engine computes no gradient for the input, and x requires grad: use "
    "engine='libtorch' for input gradients (saliency maps, adversarial examples), or pass x.detach()"
)


def _choice(what, value, choices):
    if value not in choices:
        raise ValueError(f"{what}={value!r}: must be one of {', '.join(map(repr, choices))}")
    return value


class _InsideTheRustCall:
    """A layer of `LeNet5`: its forward pass runs inside the model's one Rust call, which never
    calls the layer, so a hook registered on it would never fire. Registering one raises
    instead of doing nothing; hook the model itself, or read `model.activations(x)`."""

    def _refuse_hook(self, *args, **kwargs):
        raise NotImplementedError(
            f"a hook on this {type(self).__name__} would never fire: lenet5.LeNet5 computes conv1 ... fc3 "
            "in one Rust call, without calling its layers. Hook the model itself "
            "(model.register_forward_hook), or read every stage with model.activations(x)"
        )

    register_forward_hook = _refuse_hook
    register_forward_pre_hook = _refuse_hook
    register_full_backward_hook = _refuse_hook
    register_full_backward_pre_hook = _refuse_hook
    register_backward_hook = _refuse_hook


class Conv2d(_InsideTheRustCall, nn.Conv2d):
    """`nn.Conv2d` as a layer of `LeNet5` (its Parameters, initialisation and state are
    nn.Conv2d's); hooks on it are refused, since the model never calls it."""


class Linear(_InsideTheRustCall, nn.Linear):
    """`nn.Linear` as a layer of `LeNet5`; hooks on it are refused, as on `Conv2d`."""


class _DirectForward(torch.autograd.Function):
    """The direct engine's forward pass, with its own backward pass for autograd: from
    whatever gradient of the logits autograd hands it (any loss), the direct loops give every
    Parameter's gradient. They compute the batch's forward pass again rather than keep its
    stages. No libtorch kernel runs in either pass."""

    @staticmethod
    def forward(ctx, x, arch, engine, *params):
        # Saved tensors carry their `_version`: a Parameter changed in place between this pass
        # and backward() makes autograd raise, as it does for PyTorch's own layers.
        ctx.save_for_backward(x, *params)
        ctx.arch, ctx.engine = arch, engine
        return _native.forward(x, arch, list(params), engine)

    @staticmethod
    def backward(ctx, d_logits):
        x, *params = ctx.saved_tensors
        gradients = _native.direct_backward(x, ctx.arch, params, ctx.engine, d_logits)
        needed = ctx.needs_input_grad[3:]
        return (None, None, None, *(g if need else None for g, need in zip(gradients, needed, strict=True)))


class LeNet5(nn.Module):
    """LeNet-5 as an `nn.Module` whose forward pass runs in Rust: called on a normalised batch
    `[N, 1, 32, 32]` float32 (on the model's device), it returns the logits `[N, 10]`.

    `LeNet5(arch, head, seed, engine)` builds a fresh model with PyTorch's initialisation (its
    layers are `nn.Conv2d(1, 6, 5)`, `nn.Conv2d(6, 16, 5)`, `nn.Linear(400, 120)`,
    `nn.Linear(120, 84)`, `nn.Linear(84, 10)`, built in that order), so `LeNet5(seed=7)`
    equals `torch.manual_seed(7)` and then the PyTorch model. `arch` is "modern" (ReLU,
    max-pooling) or "classic" (tanh, average-pooling, 1998); `head` is "softmax" or "sigmoid"
    (how `probabilities` and `lenet5.evaluate` read the logits).

    `engine="libtorch"` (the default) computes with the Parameters themselves in libtorch's
    ops: the numbers and gradients of PyTorch, bit for bit, on the CPU or a GPU.
    `engine="direct"` runs the forward pass and, under autograd, the backward pass in the
    direct engine's loops on the CPU (faster; equal to libtorch's to float rounding). They
    work on a copy of the weights in their own layouts (277,552 bytes against the Parameters'
    246,824: the linear layers are padded to whole lanes), made at the first call and
    again whenever a Parameter has changed since (each Parameter's data pointer and
    `_version` are compared, so `opt.step()` or `load_state_dict` show in the next call; a
    write through `p.data` does not, since it bypasses `_version`). Repacking costs about
    0.1 ms, once per change: once per training step. The backward pass computes the batch's
    forward pass again (about a third more arithmetic than a fused training step) and gives no
    gradient for the input: with `x` requiring grad it raises RuntimeError.

    Any Python thread may call a model, several at once; the GIL is released while Rust runs.
    Hooks on the model fire as on any module; hooks on its layers are refused (NotImplementedError),
    since the Rust call never calls them. `model.card` is the model card (a dict) of a loaded or
    trained model, else None.
    """

    def __init__(self, arch="modern", head="softmax", seed=None, engine="libtorch"):
        super().__init__()
        self._configure(arch, head, engine, card=None)
        if seed is not None:
            torch.manual_seed(seed)
        self._build_layers()

    def _configure(self, arch, head, engine, card):
        self.arch = _choice("arch", arch, ARCHS)
        self.head = _choice("head", head, HEADS)
        self.engine = engine
        self.card = card

    def _build_layers(self, device=None):
        self.conv1 = Conv2d(1, 6, 5, device=device)  # C1
        self.conv2 = Conv2d(6, 16, 5, device=device)  # C3
        self.fc1 = Linear(16 * 5 * 5, 120, device=device)  # F5
        self.fc2 = Linear(120, 84, device=device)  # F6
        self.fc3 = Linear(84, 10, device=device)  # output

    @classmethod
    def _from_parts(cls, parts, engine="libtorch"):
        """A model of `parts` (what `_native.read` and `_native.train` give: arch, head, card
        and the tensors by name), its Parameters made of those tensors (no copy), drawing
        nothing from the random generator."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model._configure(parts["arch"], parts["head"], engine, parts["card"])
        model._build_layers(device="meta")  # placeholders, no initialisation: replaced next
        tensors = dict(parts["tensors"])
        for name in PARAMETERS:
            layer, kind = name.split(".")
            setattr(getattr(model, layer), kind, nn.Parameter(tensors[name]))
        return model

    @property
    def engine(self):
        """"libtorch" or "direct": what runs the forward pass. Settable."""
        return self._engine

    @engine.setter
    def engine(self, engine):
        self._engine = _choice("engine", engine, ENGINES)
        self._direct = None  # the direct engine's state: made at its first call
        self._direct_pid = None

    def _tensors(self):
        """The ten Parameters (or whatever tensors the layers hold now), in PARAMETERS order."""
        c1, c2, f1, f2, f3 = self.conv1, self.conv2, self.fc1, self.fc2, self.fc3
        return [c1.weight, c1.bias, c2.weight, c2.bias, f1.weight, f1.bias, f2.weight, f2.bias, f3.weight, f3.bias]

    def _direct_engine(self):
        """The direct engine's native state (its packed weights), or None for libtorch. Made
        in the process that calls: a forked child (a DataLoader worker) makes its own, since a
        lock another thread of the parent held at the fork stays held in the child. (In the
        child, the engine computes on the calling thread alone: OpenMP's team is not forked.)"""
        if self._engine != "direct":
            return None
        pid = os.getpid()
        if self._direct is None or self._direct_pid != pid:
            self._direct, self._direct_pid = _native.DirectEngine(), pid
        return self._direct

    def forward(self, x):
        """Logits `[N, 10]` of a normalised batch `[N, 1, 32, 32]` (float32, on the model's device)."""
        params = self._tensors()
        if self._engine == "libtorch":
            return _native.forward(x, self.arch, params)
        engine = self._direct_engine()
        if not torch.is_grad_enabled() or not (getattr(x, "requires_grad", False) or any(p.requires_grad for p in params)):
            return _native.forward(x, self.arch, params, engine)
        if getattr(x, "requires_grad", False):
            raise RuntimeError(_NO_INPUT_GRADIENT)
        return _DirectForward.apply(x, self.arch, engine, *params)

    def probabilities(self, x):
        """Class probabilities `[N, 10]`: softmax of the logits, or one sigmoid per class
        (model.rs Head::probabilities)."""
        logits = self(x)
        return torch.softmax(logits, dim=-1) if self.head == "softmax" else torch.sigmoid(logits)

    def activations(self, x):
        """Every stage of the forward pass by name: input, C1, S2, C3, S4, F5, F6, output.
        `input` is `x` itself; the others are computed by libtorch's ops whatever the engine
        (recorded by autograd when gradients are enabled, as the forward pass is)."""
        stages = dict(_native.activations(x, self.arch, self._tensors()))
        stages["input"] = x
        return stages

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """nn.Module's, after checking the whole dict as the CLI checks a file: a tensor of
        the wrong shape or dtype, or (`strict`) a missing or unexpected one, raises
        RuntimeError naming them all (`missing fc2.bias [84]`, `wrong shape for ...`), and
        no Parameter changes. `strict=False` returns the missing and unexpected keys."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict: expected a dict of tensors, got {type(state_dict).__name__}")
        _native.check_state_dict(list(state_dict.items()), strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def save(self, prefix, data=None):
        """Writes what `lenet5 export` writes, from the current Parameters: PREFIX.pt
        (TorchScript), PREFIX.safetensors, PREFIX.check.safetensors (logits of the first test
        images of `data`, default data/mnist), PREFIX.onnx, PREFIX.pt2 (torch.export) and PREFIX.json
        (the card); returns their paths."""
        card = None if self.card is None else json.dumps(self.card)
        return _native.save(prefix, data, self.arch, self.head, card, self._tensors())

    def extra_repr(self):
        return f"arch={self.arch!r}, head={self.head!r}, engine={self.engine!r}"

    def __getstate__(self):
        # The direct engine's packed copy is made again at its first call.
        state = super().__getstate__().copy()
        state["_direct"] = state["_direct_pid"] = None
        return state


def load(path, arch=None, head=None, engine="libtorch", device="cpu"):
    """Loads any model the CLI reads, recognised by content, as a `LeNet5`: a run folder,
    safetensors (+ card), a torch.save state dict or training-checkpoint dict, a whole pickled
    module (read as data, nothing executed), TorchScript, tch's .ot. Its weights become the
    Parameters; its card (beside it) gives arch and head unless `arch`/`head` say otherwise.

    A TorchScript module's tensors are read by name (a scripted or traced nn.Module) or else
    by shape (`lenet5 export` traces the weights into the graph as constants), and kept only if
    LeNet-5 with them reproduces the module's logits on a fixed batch (which also tells the
    arch when no card does)."""
    found = _native.read(path, arch, head, engine, device)
    for note in found["notes"]:
        warnings.warn(note, UserWarning, stacklevel=2)
    if found["torchscript"]:
        return _from_torchscript(found, engine)
    return LeNet5._from_parts(found, engine)


def _reason(e):
    """libtorch's message without its C++ backtrace."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _probe():
    """Four fixed images in the range of normalised MNIST (background -0.42, ink up to 2.8),
    made without the random generator."""
    i = torch.arange(4 * 32 * 32, dtype=torch.float32).view(4, 1, 32, 32)
    return torch.sin(i * 0.37) * 1.6 + 1.2


def _script_tensors(script, path):
    """LeNet-5's ten tensors `(name, tensor)` in a TorchScript module: its parameters by
    PyTorch's names, else its tensors and constants by shape (LeNet-5's ten shapes differ)."""
    named = {**dict(script.named_parameters()), **dict(script.named_buffers())}
    if all(k in named and tuple(named[k].shape) == shape for k, shape in PARAMETERS.items()):
        return [(k, named[k].detach().float().clone()) for k in PARAMETERS]
    pool = list(named.values()) + list(script.code_with_constants[1].const_mapping.values())
    tensors = []
    for name, shape in PARAMETERS.items():
        fits = [t for t in pool if isinstance(t, torch.Tensor) and tuple(t.shape) == shape and t.is_floating_point()]
        if len(fits) != 1:
            raise ValueError(f"{path}: a TorchScript module without LeNet-5's tensors: {len(fits)} of {name}'s "
                             f"shape {list(shape)} among its {len(pool)} parameters, buffers and constants")
        tensors.append((name, fits[0].detach().float().clone()))
    return tensors


def _from_torchscript(found, engine):
    path = found["path"]
    try:
        script = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:  # libtorch's RuntimeError, whatever broke
        raise ValueError(f"{path}: cannot load the TorchScript module ({_reason(e)})") from None
    tensors = _script_tensors(script, path)
    probe = _probe()
    try:
        with torch.no_grad():
            expected = script(probe)
    except Exception as e:
        raise ValueError(f"{path}: the TorchScript module fails on a batch [4, 1, 32, 32] ({_reason(e)})") from None
    misses = []
    for arch in [found["arch"]] if found["arch"] else ARCHS:
        model = LeNet5._from_parts({**found, "arch": arch, "tensors": tensors})
        with torch.no_grad():
            got = model(probe)
        if not isinstance(expected, torch.Tensor) or expected.shape != got.shape:
            break
        difference = (got - expected).abs().max().item()
        # The same libtorch ops on the same weights: equal, but for another summation order.
        if difference <= 1e-5 * max(1.0, expected.abs().max().item()):
            model.engine = engine
            return model.to(found["device"])
        misses.append(f"{arch}: {difference:.3g}")
    raise ValueError(f"{path}: a TorchScript module whose logits LeNet-5 with its tensors does not reproduce "
                     f"(largest difference {', '.join(misses) or 'another output shape'}); load its weights "
                     "(a state dict or safetensors) instead")


def evaluate(model, data=None, images=None, labels=None, batch_size=1000):
    """`loss`, `accuracy`, `correct`, `total` and `confusion` (int64 `[10, 10]`,
    `confusion[true][predicted]`) of a `LeNet5` on the test set of its card's data set (in
    `data`, default data/mnist), or on `images` `[N, 1, 32, 32]` and int64 `labels` `[N]`;
    computed in Rust, by the model's engine, without gradients."""
    if not isinstance(model, LeNet5):
        raise TypeError(f"model: expected a lenet5.LeNet5, got {type(model).__name__}")
    dataset = (model.card or {}).get("dataset", "mnist")
    return _native.evaluate(model.arch, model.head, dataset, model._tensors(), model._direct_engine(),
                            data, images, labels, batch_size)
