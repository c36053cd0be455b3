"""Type stubs of the compiled module (binding/src/lib.rs); `lenet5/__init__.py` re-exports it."""

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

class LeNet5:
    """LeNet-5 in Rust: callable on a `[N, 1, 32, 32]` float32 tensor (normalised as MNIST),
    returning logits `[N, 10]` as a `torch.Tensor`."""

    def __init__(
        self,
        arch: Arch = "modern",
        head: HeadName = "softmax",
        seed: int | None = None,
        engine: EngineName = "libtorch",
    ) -> None:
        """A freshly initialised LeNet-5, as PyTorch initialises nn.Conv2d and nn.Linear,
        from libtorch's generator (the one `torch.manual_seed` seeds); `seed` seeds it first.
        `engine="direct"` runs inference in plain Rust loops on the CPU."""
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits `[N, 10]` of a batch `[N, 1, 32, 32]` (float32, on the model's device)."""
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities `[N, 10]`: softmax of the logits, or one sigmoid per class."""
    def activations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every stage of the forward pass: input, C1, S2, C3, S4, F5, F6, output."""
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights by PyTorch's names (conv1.weight, ...), sharing memory with the model."""
    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copies the weights in after checking every name and shape, as the CLI does;
        nothing changes if one does not fit (ValueError)."""
    def to(self, device: str) -> LeNet5:
        """Moves the model to "cpu", "cuda" or "cuda:N" and returns it."""
    def save(self, prefix: PathLike, data: PathLike | None = None) -> list[str]:
        """Writes what `lenet5 export` writes: PREFIX.pt (TorchScript), PREFIX.safetensors,
        PREFIX.check.safetensors, PREFIX.onnx, PREFIX.json; returns their paths."""
    @property
    def engine(self) -> EngineName:
        """What runs the forward pass."""
    @property
    def arch(self) -> Arch: ...
    @property
    def head(self) -> HeadName: ...
    @property
    def card(self) -> dict[str, Any] | None:
        """The model card (dataset, metrics, recipe, provenance), or None."""

def load(
    path: PathLike,
    arch: Arch | None = None,
    head: HeadName | None = None,
    engine: EngineName = "libtorch",
    device: str = "cpu",
) -> LeNet5:
    """Loads any model the CLI reads, recognised by content: a run folder, safetensors (+ card),
    a torch.save state dict or training-checkpoint dict, a whole pickled module (read as data,
    nothing executed), TorchScript, tch's .ot."""

def evaluate(
    model: LeNet5,
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
) -> tuple[LeNet5, list[dict[str, Any]]]:
    """The native training call behind `lenet5.train` (which adds the progress display and
    the `invocation` the model card records)."""
