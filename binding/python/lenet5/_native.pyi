"""Type stubs of the compiled module (binding/src/lib.rs). `lenet5/model.py` (the nn.Module
`LeNet5`, `load`, `evaluate`) and `lenet5/__init__.py` (`train`) call it."""

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

Arch = Literal["modern", "classic"]
HeadName = Literal["softmax", "sigmoid"]
EngineName = Literal["libtorch", "direct"]
MatrixLike = str | Sequence[Sequence[float]] | torch.Tensor
PathLike = str | os.PathLike[str]

__version__: str
DEFAULT_RECIPE: dict[str, Any]
"""The recipe of a plain `lenet5 train`: the defaults of `lenet5.train`'s keyword arguments."""

Parts = dict[str, Any]
"""What `read` and `train` give `LeNet5._from_parts`: `arch`, `head`, `card` (dict or None),
`device`, `tensors` (`[(name, tensor)]` in `model.parameters()` order), `torchscript` (False);
`read` adds `path` and `notes`. For a TorchScript file `read` gives `torchscript=True`,
`path`, `device`, `arch` (None unless the card or the caller says), `head`, `card`, `notes`,
and no tensors: model.py reads them."""

class DirectEngine:
    """The direct engine's state for one model in one process: its weights packed into the
    direct engine's layouts and its threads, remade when a parameter's data pointer or
    `_version` changes (or the thread count). Behind a lock: calls from several threads run one
    at a time. Not picklable; a forked child makes its own."""

    def __init__(self) -> None: ...

def forward(x: torch.Tensor, arch: Arch, params: Sequence[torch.Tensor], direct: DirectEngine | None = None) -> torch.Tensor:
    """Logits `[N, 10]` of `x` `[N, 1, 32, 32]` (float32, on the parameters' device) by LeNet-5
    of `arch` with `params` (the ten tensors `conv1.weight` ... `fc3.bias`): libtorch's ops on
    those very tensors (autograd records them), or `direct`'s loops on its copy. The GIL is
    released while it runs."""

def direct_backward(
    x: torch.Tensor, arch: Arch, params: Sequence[torch.Tensor], direct: DirectEngine, d_logits: torch.Tensor
) -> list[torch.Tensor]:
    """The ten parameters' gradients (their shapes, in order) from `d_logits` `[N, 10]`, the
    gradient of some loss with respect to the logits of `x`, by `direct`'s loops: the
    backward pass of model.py's `_DirectForward`. The GIL is released while it runs."""

def activations(x: torch.Tensor, arch: Arch, params: Sequence[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Every stage of the libtorch forward pass: input, C1, S2, C3, S4, F5, F6, output."""

def check_state_dict(items: Sequence[tuple[str, torch.Tensor]], strict: bool) -> tuple[list[str], list[str]]:
    """`(missing, unexpected)` names of a state dict against LeNet-5's; RuntimeError with the
    CLI's grouped message if a tensor has the wrong shape or dtype or, `strict`, if any is
    missing or unexpected."""

def read(
    path: PathLike,
    arch: Arch | None = None,
    head: HeadName | None = None,
    engine: EngineName = "libtorch",
    device: str = "cpu",
) -> Parts:
    """Any model file the CLI reads, recognised by content (a run folder, safetensors + card, a
    torch.save state dict or checkpoint dict, a whole pickled module read as data, tch's .ot),
    as the parts of a model; a TorchScript file is recognised, with its card."""

def save(
    prefix: PathLike,
    data: PathLike | None,
    arch: Arch,
    head: HeadName,
    card: str | None,
    params: Sequence[torch.Tensor],
) -> list[str]:
    """Writes what `lenet5 export` writes for these parameters and card (JSON text):
    PREFIX.pt (TorchScript), PREFIX.safetensors, PREFIX.check.safetensors, PREFIX.onnx,
    PREFIX.pt2 (torch.export), PREFIX.json; returns their paths."""

def evaluate(
    arch: Arch,
    head: HeadName,
    dataset: Literal["mnist", "fashion-mnist"],
    params: Sequence[torch.Tensor],
    direct: DirectEngine | None = None,
    data: PathLike | None = None,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    batch_size: int = 1000,
) -> dict[str, Any]:
    """`loss`, `accuracy`, `correct`, `total` and `confusion` (int64 `[10, 10]`,
    `confusion[true][predicted]`) on the test set, or on `images`/`labels`."""

def conv(
    input: MatrixLike | None = None,
    filter: MatrixLike | None = None,
    stride: int = 1,
    padding: int = 0,
) -> dict[str, Any]:
    """The convolution walkthrough as data (`lenet5 conv`'s numbers): `windows` (each with
    `row`, `col`, `terms` as (input, filter) pairs and `sum`), `output` by the plain loop and
    `libtorch` by conv2d. Default: the classic 5x5 input and 3x3 filter, giving
    4 3 4 / 2 4 3 / 2 3 4. A matrix is a list of rows, a 2-D tensor or text ("101/010/101")."""

def train(
    recipe_overrides: Mapping[str, Any] | None = None,
    *,
    arch: Arch = "modern",
    head: HeadName = "softmax",
    dataset: Literal["mnist", "fashion-mnist"] = "mnist",
    data: PathLike | None = None,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    test_images: torch.Tensor | None = None,
    test_labels: torch.Tensor | None = None,
    out: PathLike | None = None,
    resume: PathLike | None = None,
    init: PathLike | None = None,
    checkpoint_every: int | None = None,
    device: str = "auto",
    threads: int | None = None,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
    invocation: str | None = None,
) -> tuple[Parts, list[dict[str, Any]]]:
    """The native training call behind `lenet5.train` (which adds the progress display and
    the `invocation` the model card records, and builds the model from the parts)."""
