"""LeNet-5 in PyTorch: the Python twin of the Rust crate, name for name.

The one place the Python side defines the model (src/model/), the data pipeline
(src/data/), the training step (src/training/), readers for every file the Rust binary
reads or writes (src/formats/weights.rs, src/formats/card.rs) and the exact comparison of two runs' weights
and checkpoints. scripts/crosscheck, scripts/train_reference, scripts/parity,
scripts/compare.ipynb and tests/python all import it; none defines its own.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

# -----------------------------------------------------------------------------
# Constants. Each has a twin in Rust; change both or neither.

IMAGE_SIZE = 28  # side of an MNIST image in the IDX files (data/mod.rs IMAGE_SIZE)
INPUT_SIZE = 32  # LeNet-5's input side, as in the 1998 paper (model/mod.rs INPUT_SIZE)
PAD = (INPUT_SIZE - IMAGE_SIZE) // 2  # zero padding on every side (data/mod.rs PAD)
NUM_CLASSES = 10  # model/mod.rs NUM_CLASSES
NUM_PARAMETERS = 61_706  # 156 + 2,416 + 48,120 + 10,164 + 850

# Mean and std of the training pixels scaled to [0, 1] (data/mod.rs DatasetKind::normalization).
NORMALIZATION = {
    "mnist": (0.1307, 0.3081),
    "fashion-mnist": (0.2860, 0.3530),
}


def background(dataset: str) -> float:
    """The normalised value of a blank pixel, the fill of padding and shifts (data/mod.rs Normalization::background)."""
    mean, std = NORMALIZATION[dataset]
    return -mean / std


CLASSES = {  # data/mod.rs DatasetKind::class_names
    "mnist": [str(d) for d in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}
# The folders searched unless --data says otherwise (data/mod.rs DatasetKind::default_dirs):
# the project's own, which scripts/setup fills, then where Debian's package installs it.
DEFAULT_DATA_DIRS = {"mnist": ["data/mnist"],
                     "fashion-mnist": ["data/fashion-mnist", "/usr/share/datasets/fashion-mnist"]}
FETCH_HINT = {"mnist": "scripts/setup (or scripts/fetch-data mnist) fetches it",  # data/mod.rs fetch_hint
              "fashion-mnist": "scripts/setup (or scripts/fetch-data fashion-mnist, on Debian) fetches it"}


def default_data_dir(dataset: str) -> Path:
    """The first of DEFAULT_DATA_DIRS[dataset] that exists, else the first (data/mod.rs default_dir)."""
    dirs = [Path(d) for d in DEFAULT_DATA_DIRS[dataset]]
    return next((d for d in dirs if d.is_dir()), dirs[0])

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
MAX_IDX_BYTES = 512 << 20  # MNIST's largest file is 47 MB; bounds a gzip bomb or a bad header

CARD_FORMAT, CARD_VERSION = "lenet5-model", 1  # formats/card.rs CARD_VERSION
# metrics.csv / metrics.jsonl columns, in order (training/mod.rs EpochMetrics).
METRICS_COLUMNS = ["epoch", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds"]

# -----------------------------------------------------------------------------
# Data: IDX files (plain or gzip'd), checked strictly; errors start with the file's name.


class DataError(ValueError):
    """A data file that is missing, truncated or not what its name says."""


def read_maybe_gzip(path: Path) -> bytes:
    """The file's bytes, gunzipped when they start with the gzip magic 1f 8b (not by extension)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from e
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
            out = f.read(MAX_IDX_BYTES + 1)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: corrupt gzip data ({e})") from e
    return out


def parse_idx(data: bytes, expected_magic: int, name: str) -> np.ndarray:
    """IDX bytes -> a uint8 array shaped as the header says. Mirrors data/mod.rs parse_idx."""
    if not data:
        raise DataError(f"{name}: the file is empty")
    if len(data) < 4:
        raise DataError(f"{name}: truncated: {len(data)} bytes, too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        kind = "image" if expected_magic == IMAGES_MAGIC else "label"
        raise DataError(f"{name}: wrong magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
                        f"(is this an IDX {kind} file?)")
    ndims = magic & 0xFF
    header = 4 + 4 * ndims
    if len(data) < header:
        raise DataError(f"{name}: truncated inside its header ({len(data)} bytes)")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndims)]
    expected = int(np.prod(dims, dtype=object))
    if expected > MAX_IDX_BYTES:
        raise DataError(f"{name}: header declares dimensions {dims}, more data than any IDX file holds")
    body = len(data) - header
    if body < expected:
        raise DataError(f"{name}: truncated: header {dims} needs {expected} bytes of data, the file has {body}")
    if body > expected:
        raise DataError(f"{name}: {body - expected} bytes of trailing garbage after the {expected} bytes "
                        f"its header {dims} declares")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()  # writable


def _find(folder: Path, stem: str) -> Path:
    """`stem` or `stem.gz` in `folder`, the plain one first (data/mod.rs find_file)."""
    for p in (folder / stem, folder / f"{stem}.gz"):
        if p.is_file():
            return p
    raise DataError(f"{folder}: missing {stem} (or {stem}.gz)")


def load_split_raw(folder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw images (N, 28, 28) uint8 and labels (N,) uint8 of `split` ("train" or "t10k")."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist")
    ip, lp = _find(folder, f"{split}-images-idx3-ubyte"), _find(folder, f"{split}-labels-idx1-ubyte")
    images = parse_idx(read_maybe_gzip(ip), IMAGES_MAGIC, str(ip))
    labels = parse_idx(read_maybe_gzip(lp), LABELS_MAGIC, str(lp))
    n, rows, cols = images.shape
    if (rows, cols) != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{ip}: images are {rows}x{cols}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
    if n == 0:
        raise DataError(f"{ip}: holds no images")
    if labels.shape[0] != n:
        raise DataError(f"{lp}: {labels.shape[0]} labels for the {n} images in {ip}")
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise DataError(f"{lp}: label {labels[bad[0]]} at index {bad[0]} is out of range 0..=9")
    return images, labels


def preprocess(images: np.ndarray | torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 32, 32): scale to [0, 1], zero-pad by 2, normalise.
    Same operations in the same order as data/mod.rs to_tensors, so the floats are identical."""
    x = torch.as_tensor(np.asarray(images)).view(-1, 1, IMAGE_SIZE, IMAGE_SIZE)  # (N, 1, 28, 28) u8
    x = x.float() / 255.0
    x = F.pad(x, (PAD, PAD, PAD, PAD))  # (N, 1, 32, 32), black border before normalising
    return (x - mean) / std


def load_split(folder, split: str, dataset: str = "mnist") -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images (N, 1, 32, 32) float32 and labels (N,) int64 of one split."""
    images, labels = load_split_raw(folder, split)
    mean, std = NORMALIZATION[dataset]
    return preprocess(images, mean, std), torch.from_numpy(labels.astype(np.int64))


# -----------------------------------------------------------------------------
# The model


class LeNet5(nn.Module):
    """LeNet-5 with PyTorch's default initialisation; the parameter names are the contract
    with model/mod.rs (conv1, conv2, fc1, fc2, fc3)."""

    def __init__(self, arch: str = "modern", head: str = "softmax"):
        super().__init__()
        if arch not in ("modern", "classic"):
            raise ValueError(f"arch must be 'modern' or 'classic', not {arch!r}")
        if head not in ("softmax", "sigmoid"):
            raise ValueError(f"head must be 'softmax' or 'sigmoid', not {head!r}")
        self.arch, self.head = arch, head  # modern: ReLU + max-pool; classic (1998): tanh + avg-pool
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, NUM_CLASSES)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) if self.arch == "modern" else torch.tanh(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2) if self.arch == "modern" else F.avg_pool2d(x, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 1, 32, 32)
        x = self.pool(self.act(self.conv1(x)))  # C1 (B, 6, 28, 28) -> S2 (B, 6, 14, 14)
        x = self.pool(self.act(self.conv2(x)))  # C3 (B, 16, 10, 10) -> S4 (B, 16, 5, 5)
        x = torch.flatten(x, 1)  # (B, 400)
        x = self.act(self.fc1(x))  # F5 (B, 120)
        x = self.act(self.fc2(x))  # F6 (B, 84)
        return self.fc3(x)  # logits (B, 10)


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, head: str) -> torch.Tensor:
    """Mean loss of logits (B, 10) against labels (B,) (model/mod.rs Head::loss)."""
    if head == "softmax":
        return F.cross_entropy(logits, labels)
    targets = F.one_hot(labels, NUM_CLASSES).to(logits.dtype)  # (B, 10)
    return F.binary_cross_entropy_with_logits(logits, targets)


# -----------------------------------------------------------------------------
# Evaluation (inference/evaluate.rs)


@dataclass
class Metrics:
    correct: int
    total: int
    loss: float
    predictions: torch.Tensor  # (N,) int64

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    def __iter__(self):  # `correct, total, loss = evaluate(...)`
        return iter((self.correct, self.total, self.loss))


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Logits (N, 10) of any module mapping (B, 1, 32, 32) -> (B, 10), in eval mode."""
    model.eval()
    return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def evaluate(model, images, labels, head: str | None = None, batch_size: int = 1000) -> Metrics:
    """Correct count, total and mean loss; `head` defaults to the model's own."""
    head = head or getattr(model, "head", "softmax")
    logits = predict(model, images, batch_size)  # (N, 10)
    loss = sum(loss_fn(logits[i:i + batch_size], labels[i:i + batch_size], head).double().item()
               * len(labels[i:i + batch_size]) for i in range(0, len(labels), batch_size))
    predictions = logits.argmax(-1)
    return Metrics(int((predictions == labels).sum()), len(labels), loss / max(len(labels), 1), predictions)


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(10, 10) int64 counts, confusion[true][predicted] as in inference/evaluate.rs Metrics."""
    return torch.bincount(labels * NUM_CLASSES + predictions, minlength=NUM_CLASSES ** 2).view(NUM_CLASSES, NUM_CLASSES)


# -----------------------------------------------------------------------------
# Training: the optimizers, schedules and random streams of `lenet5 train`, and one loop over
# batches given as index tensors, shared by train_reference and parity (training/mod.rs Trainer::run).


def make_optimizer(name: str, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                   dampening: float = 0.0, nesterov: bool = False, betas=(0.9, 0.999), eps: float = 1e-8,
                   amsgrad: bool = False) -> torch.optim.Optimizer:
    """The stock torch.optim optimizer `lenet5 train --optimizer NAME` reproduces (training/optim.rs), with
    the same settings. On the CPU torch.optim takes its single-tensor path, which training/optim.rs follows
    op for op."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                               nesterov=nesterov)
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
    raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', not {name!r}")


def make_schedule(name: str, optimizer, steps_per_epoch: int, epochs: int, gamma: float = 0.7,
                  cycle_momentum: bool = True):
    """(scheduler or None, per_batch): the stock lr_scheduler class `--schedule NAME` reproduces
    (training/schedule.rs), and whether it steps after every batch (else after every epoch)."""
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler
    if name == "constant":
        return None, True
    if name == "step":  # as in pytorch/examples' MNIST: times gamma after every epoch
        return sched.StepLR(optimizer, step_size=1, gamma=gamma), False
    if name == "cosine":  # lr -> 0 over the run
        return sched.CosineAnnealingLR(optimizer, T_max=total), True
    if name == "onecycle":  # OneCycleLR's defaults, momentum cycling included unless turned off
        lr = optimizer.param_groups[0]["lr"]
        return sched.OneCycleLR(optimizer, max_lr=lr, total_steps=total, cycle_momentum=cycle_momentum), True
    raise ValueError(f"schedule must be constant, step, cosine or onecycle, not {name!r}")


def optimizer_for(recipe: dict, params) -> torch.optim.Optimizer:
    """make_optimizer from a recipe as `lenet5 train` saves it (training/mod.rs TrainConfig as JSON)."""
    return make_optimizer(recipe["optimizer"], params, recipe["lr"], recipe["momentum"], recipe["weight_decay"],
                          recipe["dampening"], recipe["nesterov"], recipe["betas"], recipe["eps"], recipe["amsgrad"])


def schedule_for(recipe: dict, optimizer, steps_per_epoch: int):
    """make_schedule from a recipe as `lenet5 train` saves it."""
    return make_schedule(recipe["schedule"], optimizer, steps_per_epoch, recipe["epochs"], recipe["gamma"],
                         recipe["cycle_momentum"])


def recipe(args) -> dict:
    """A recipe as `lenet5 train` saves it (training/mod.rs TrainConfig, with the model and data set)
    from train_reference's flags, which are named as lenet5 train's."""
    return {"epochs": args.epochs, "batch_size": args.batch_size, "test_batch_size": args.test_batch_size,
            "optimizer": args.optimizer, "optimizer_impl": "torch", "lr": args.lr, "momentum": args.momentum,
            "dampening": args.dampening, "nesterov": args.nesterov, "betas": [args.beta1, args.beta2],
            "eps": args.eps, "weight_decay": args.weight_decay, "amsgrad": args.amsgrad, "schedule": args.schedule,
            "gamma": args.gamma, "cycle_momentum": not args.no_cycle_momentum, "shift": args.shift, "seed": args.seed,
            "limit_train": args.limit_train, "dry_run": False, "arch": args.arch, "head": args.head,
            "dataset": args.dataset, "data_dir": args.data, "checkpoint_every": None}


def training_checkpoint(model, optimizer, scheduler, recipe: dict, epoch: int, batch: int, step: int,
                        history: list) -> dict:
    """The tutorial's training checkpoint, as `lenet5 train --resume FILE` reads it and
    `lenet5 torch-checkpoint` writes it (formats/torch_checkpoint.rs): `epoch` epochs finished, then
    `batch` batches of the next; `step` optimizer steps in all."""
    return {"epoch": epoch, "step": step, "batch": batch, "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "scheduler_state_dict": scheduler.state_dict() if scheduler is not None else None,
            "recipe": recipe, "history": history}


# Random streams (training/mod.rs stream_seed): every shuffle and every augmentation draws from the
# global generator freshly seeded from (seed, stream, index), so a run resumed anywhere replays them.
SHUFFLE_STREAM, SHIFT_STREAM = 1, 2
_MASK64 = (1 << 64) - 1


def stream_seed(seed: int, stream: int, index: int) -> int:
    """SplitMix64 of (seed, stream, index), as training/mod.rs stream_seed."""
    z = (seed & _MASK64) ^ ((stream * 0x9E3779B97F4A7C15) & _MASK64) ^ ((index * 0xBF58476D1CE4E5B9) & _MASK64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def epoch_batches(seed: int, epoch: int, n: int, batch_size: int) -> list[torch.Tensor]:
    """The index tensors of epoch `epoch` (from 1): training/mod.rs Trainer::batches."""
    torch.manual_seed(stream_seed(seed, SHUFFLE_STREAM, epoch))
    return list(torch.randperm(n).split(batch_size))


def random_shift(xs: torch.Tensor, max_shift: int, background: float) -> torch.Tensor:
    """Each image of xs (B, 1, H, W) moved by its own offset of up to max_shift pixels in x and y,
    filled with `background` (training/mod.rs random_shift, draw for draw)."""
    b, _, h, w = xs.shape
    padded = torch.full((b, h + 2 * max_shift, w + 2 * max_shift), background, dtype=xs.dtype)  # (B, H+2m, W+2m)
    padded[:, max_shift:max_shift + h, max_shift:max_shift + w] = xs[:, 0]
    rows = (torch.randint(2 * max_shift + 1, (b, 1)) + torch.arange(h).view(1, h)).view(b, h, 1)
    cols = (torch.randint(2 * max_shift + 1, (b, 1)) + torch.arange(w).view(1, w)).view(b, 1, w)
    return padded[torch.arange(b).view(b, 1, 1), rows, cols].unsqueeze(1)  # (B, 1, H, W)


def train_batches(model, optimizer, images, labels, batches, scheduler=None, shift: int = 0, seed: int = 0,
                  first_step: int = 0, background: float = 0.0) -> tuple[float, float, float]:
    """One optimizer step per index tensor in `batches` (then one scheduler step, for a per-batch
    scheduler); with `shift`, each batch shifted as training/mod.rs does at global step first_step + i.
    Returns the mean loss, the accuracy over the images seen and the learning rate of the last step."""
    model.train()
    loss_sum, correct, seen, lr = 0.0, 0, 0, optimizer.param_groups[0]["lr"]
    for i, idx in enumerate(batches):
        lr = optimizer.param_groups[0]["lr"]
        x, y = images[idx], labels[idx]  # (B, 1, 32, 32), (B,)
        if shift:
            torch.manual_seed(stream_seed(seed, SHIFT_STREAM, first_step + i))
            x = random_shift(x, shift, background)
        logits = model(x)  # (B, 10)
        loss = loss_fn(logits, y, model.head)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.item() * len(idx)
        correct += int((logits.argmax(-1) == y).sum())
        seen += len(idx)
    return loss_sum / max(seen, 1), correct / max(seen, 1), lr


# -----------------------------------------------------------------------------
# Comparing two runs, tolerance 0: their weights, or their training checkpoints entry by entry
# (scripts/parity, tests/python).

def elements(x) -> int:
    """The values `x` holds: a tensor's elements, summed through dicts, lists and tuples; 1 for anything else."""
    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, dict):
        return sum(elements(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(elements(v) for v in x)
    return 1


def differences(a, b, where: str = "", ordered: bool = True) -> dict[str, tuple[int, float]]:
    """Where `a` and `b` differ, walking dicts (any dict may stand for state_dict()'s OrderedDict),
    lists and tuples: {path: (values that differ, largest |difference|)}, empty when identical.
    Tensors match only in dtype, shape and every element; other values in type and value. A
    missing or extra key, another length, type, dtype or shape counts all its values, as inf.
    Dict keys must come in the same order unless `ordered` is False (safetensors sorts them)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out, common = {}, [k for k in a if k in b]
        odd = [k for k in a if k not in b] + [k for k in b if k not in a]
        if odd or (ordered and common != [k for k in b if k in a]):
            out[f"{where} keys".lstrip()] = (max(sum(elements((a | b)[k]) for k in odd), 1), float("inf"))
        for k in common:
            out |= differences(a[k], b[k], f"{where}[{k!r}]", ordered)
        return out
    if type(a) is not type(b):
        return {where: (max(elements(a), elements(b)), float("inf"))}
    if isinstance(a, (list, tuple)):
        out = {f"{where} length".lstrip(): (elements(a[len(b):] + b[len(a):]), float("inf"))} if len(a) != len(b) else {}
        for i, (x, y) in enumerate(zip(a, b, strict=False)):  # a length difference is reported above
            out |= differences(x, y, f"{where}[{i}]", ordered)
        return out
    if isinstance(a, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return {where: (max(a.numel(), b.numel()), float("inf"))}
        n = int((a != b).sum())  # a NaN differs from everything, itself included, by inf
        return {where: (n, (a.double() - b.double()).abs().nan_to_num(float("inf")).max().item())} if n else {}
    if a != b:
        number = isinstance(a, (int, float)) and not math.isnan(a - b)
        return {where: (1, abs(a - b) if number else float("inf"))}
    return {}


def total(diffs: dict[str, tuple[int, float]]) -> tuple[int, float]:
    """(values that differ, largest |difference|) over all of `differences`' entries."""
    return sum(n for n, _ in diffs.values()), max((d for _, d in diffs.values()), default=0.0)


# -----------------------------------------------------------------------------
# Weights in every format, recognised by content (formats/weights.rs detect), checked, then copied.


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit LeNet-5."""


def detect_format(path) -> str:
    """'safetensors', 'state-dict' (torch.save), 'torchscript' or 'tch-archive' (tch .ot)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise WeightsError(f"{path}: missing or empty")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    if head[:4] != b"PK\x03\x04":
        raise WeightsError(f"{path}: not a model file (expected safetensors, a torch.save zip, TorchScript "
                           f"or a tch .ot; it starts with bytes {head[:4].hex(' ')})")
    with zipfile.ZipFile(path) as z:
        entries = {n.split("/", 1)[1]: n for n in z.namelist() if "/" in n}  # under one top folder
        if "data.pkl" not in entries:
            raise WeightsError(f"{path}: a zip file, but not a PyTorch one (no data.pkl inside)")
        code = entries.get("code/__torch__.py") or next((n for e, n in entries.items() if e.startswith("code/")), None)
        if code is None:
            return "state-dict"  # torch.save: a pickle and tensor data, no code
        source = z.read(code).decode("utf-8", "replace")
    # tch's VarStore::save writes libtorch's serialize::OutputArchive: a TorchScript class named
    # Module with parameters `conv1|weight`, ... and no methods. Same rule as formats/weights.rs detect.
    return "tch-archive" if source.startswith("class Module(Module):") and "def forward" not in source else "torchscript"


def read_state_dict(path, key_map: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Named tensors (PyTorch names, CPU) from any format, renamed by `key_map`: {old: new}
    replaces a leading dotted prefix, '' strips it (formats/weights.rs rename, `--key-map`). A torch.save
    file may hold a state dict or a notebook's checkpoint dict with one inside; a `module.` on
    every key is dropped first (formats/weights.rs read_tensors)."""
    path, fmt = Path(path), detect_format(path)
    if fmt == "safetensors":
        tensors = load_file(str(path))
    elif fmt == "state-dict":
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickled nn.Module, or arbitrary objects
            raise WeightsError(f"{path}: not a plain state dict or checkpoint dict ({str(e).splitlines()[0]}); "
                               "save model.state_dict() instead") from e
        tensors = _weights_in(loaded, path)
    else:  # TorchScript module or tch archive: its parameters and buffers
        tensors = torch.jit.load(str(path), map_location="cpu").state_dict()
    tensors = {k.replace("|", "."): v for k, v in tensors.items()}
    # DataParallel and DistributedDataParallel keep the model as their `module`.
    if tensors and all(k.startswith(DATA_PARALLEL_PREFIX) for k in tensors):
        print(f"note: {path}: every key starts with '{DATA_PARALLEL_PREFIX}' (DataParallel); reading them without it",
              file=sys.stderr)
        tensors = {k.removeprefix(DATA_PARALLEL_PREFIX): v for k, v in tensors.items()}
    return {_rename(k, key_map or {}): v for k, v in tensors.items()}


# Where notebooks keep the model's weights in a checkpoint dict, most specific first (PyTorch's
# tutorial writes `model_state_dict`), and the prefix DataParallel adds (formats/weights.rs).
CHECKPOINT_KEYS = ("model_state_dict", "state_dict", "model", "net")
DATA_PARALLEL_PREFIX = "module."


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _weights_in(value, path: Path) -> dict[str, torch.Tensor]:
    """A state dict, or the one a checkpoint dict holds under a CHECKPOINT_KEYS entry (formats/weights.rs
    torch_save_tensors)."""
    if _is_state_dict(value):
        return value
    if not isinstance(value, dict):
        raise WeightsError(f"{path}: holds a {type(value).__name__}, not a state dict or a checkpoint dict")
    for key in CHECKPOINT_KEYS:
        if _is_state_dict(value.get(key)):
            print(f"note: {path}: weights from its '{key}' entry", file=sys.stderr)
            return value[key]
    keys = [repr(k) for k in list(value)[:12]]
    raise WeightsError(f"{path}: holds a dict that is neither a state dict nor a checkpoint with one under "
                       f"{', '.join(map(repr, CHECKPOINT_KEYS))} (keys: {', '.join(keys)}"
                       f"{', …' if len(value) > len(keys) else ''})")


def _rename(key: str, key_map: dict[str, str]) -> str:
    for old, new in key_map.items():
        old, new = old.rstrip("."), new.rstrip(".")
        rest = "" if key == old else key[len(old) + 1:] if key.startswith(old + ".") else None
        if rest is not None:
            return ".".join(p for p in (new, rest) if p)
    return key


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "weights") -> nn.Module:
    """Copies `tensors` into `model` only if every name and shape fits; else names each problem
    (formats/weights.rs load_state_dict). Returns the model."""
    wanted = model.state_dict()
    problems = []
    for name, w in sorted(wanted.items()):
        t = tensors.get(name)
        if t is None:
            problems.append(f"missing {name} {list(w.shape)}")
        elif t.shape != w.shape:
            problems.append(f"wrong shape for {name}: expected {list(w.shape)}, got {list(t.shape)}")
        elif not t.is_floating_point():
            problems.append(f"wrong dtype for {name}: {t.dtype}, expected a floating-point tensor")
    problems += [f"unexpected {k} {list(t.shape)}" for k, t in sorted(tensors.items()) if k not in wanted]
    if problems:
        raise WeightsError(f"{source}: the state dict does not fit LeNet-5:\n  " + "\n  ".join(problems))
    model.load_state_dict({k: t.float() for k, t in tensors.items()})
    return model


def load_model(path, arch: str = "modern", head: str = "softmax", key_map=None):
    """A runnable model from any weights file: TorchScript as-is, anything else into LeNet5
    (its arch/head from the card NAME.json beside it when there is one, else the arguments)."""
    path = Path(path)
    if detect_format(path) == "torchscript":
        return torch.jit.load(str(path), map_location="cpu").eval()
    card_path = path.with_suffix(".json")
    if card_path.is_file():
        card = read_card(card_path)
        arch, head = card["model"]["arch"], card["model"]["head"]
    return load_weights(LeNet5(arch, head), read_state_dict(path, key_map), str(path)).eval()


# -----------------------------------------------------------------------------
# Model cards and exports (formats/card.rs): NAME.json beside NAME.{safetensors,pt,check.safetensors}


def read_card(path) -> dict:
    path = Path(path)
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a lenet5 model card ({e})") from e
    if (card.get("format"), card.get("format_version")) != (CARD_FORMAT, CARD_VERSION):
        raise WeightsError(f"{path}: model card format {card.get('format')} v{card.get('format_version')} "
                           f"is not {CARD_FORMAT} v{CARD_VERSION}")
    return card


def model_from_card(card: dict) -> LeNet5:
    """An untrained LeNet5 of the card's arch and head."""
    return LeNet5(card["model"]["arch"], card["model"]["head"])


def normalization_of(card: dict) -> tuple[float, float]:
    n = card["input"]["normalization"]
    return n["mean"], n["std"]


def sha256_file(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class Export:
    """What `lenet5 export --out DIR/NAME` (or `lenet5 train --out DIR`) writes."""
    card: dict
    model: LeNet5  # rebuilt from the card, weights from NAME.safetensors
    scripted: torch.jit.ScriptModule  # NAME.pt, traced by Rust
    check_inputs: torch.Tensor  # (64, 1, 32, 32): the first test images, preprocessed by Rust
    check_logits: torch.Tensor  # (64, 10): Rust's logits for them
    folder: Path  # where the files are, by the names in card["files"]


def resolve_prefix(path) -> Path:
    """DIR/NAME of an export: `path` itself, or DIR/lenet5 when `path` is a run folder."""
    path = Path(path)
    return path / "lenet5" if path.is_dir() else Path(str(path).removesuffix(".json"))


def load_exported(prefix, verify: bool = True) -> Export:
    """Loads an export, first checking every file's sha256 against the card."""
    prefix = resolve_prefix(prefix)
    folder, card = prefix.parent, read_card(f"{prefix}.json")
    files = card.get("files") or {}
    for role in ("weights", "torchscript", "check"):
        if role not in files:
            raise WeightsError(f"{prefix}.json: the card lists no {role} file")
    if verify:
        for role, entry in files.items():
            got = sha256_file(folder / entry["name"])
            if got != entry["sha256"]:
                raise WeightsError(f"{folder / entry['name']}: sha256 {got} differs from the card's "
                                   f"{entry['sha256']} ({role})")
    model = load_weights(model_from_card(card), read_state_dict(folder / files["weights"]["name"]),
                         str(folder / files["weights"]["name"])).eval()
    scripted = torch.jit.load(str(folder / files["torchscript"]["name"]), map_location="cpu").eval()
    check = load_file(str(folder / files["check"]["name"]))
    return Export(card, model, scripted, check["inputs"], check["logits"], folder)


def write_card(path, model: LeNet5, dataset: str, metrics: Metrics | None, training: dict | None,
               files: dict[str, Path], seed: int | None = None) -> dict:
    """A card in formats/card.rs's format for a PyTorch-trained model, so the same readers work."""
    mean, std = NORMALIZATION[dataset]
    card = {
        "format": CARD_FORMAT, "format_version": CARD_VERSION,
        "model": {"arch": model.arch, "head": model.head},
        "dataset": dataset, "classes": CLASSES[dataset],
        "input": {"shape": [1, INPUT_SIZE, INPUT_SIZE], "pad": PAD, "normalization": {"mean": mean, "std": std}},
        "parameters": sum(p.numel() for p in model.parameters()),
        "metrics": None if metrics is None else {
            "test_accuracy": metrics.accuracy, "test_loss": metrics.loss,
            "test_correct": metrics.correct, "test_total": metrics.total},
        "training": training,
        "provenance": {"lenet5_version": "python-reference", "tch_version": "none (PyTorch)",
                       "libtorch_version": torch.__version__, "command_line": sys.argv,
                       "created_unix": int(time.time()), "seed": seed},
        "files": {role: {"name": Path(p).name, "sha256": sha256_file(p)} for role, p in files.items()},
    }
    Path(path).write_text(json.dumps(card, indent=2) + "\n")
    return card


# -----------------------------------------------------------------------------
# Training metrics files (metrics.csv, metrics.jsonl in a run folder)


def read_metrics(run_dir) -> dict[str, list]:
    """metrics.csv as columns: {'epoch': [1, 2, ...], 'test_accuracy': [...], ...}; an epoch not
    evaluated (`lenet5 train --evaluate end`) has None for its empty test cells."""
    path = Path(run_dir) / "metrics.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or list(rows[0].keys()) != METRICS_COLUMNS:
        raise DataError(f"{path}: expected columns {METRICS_COLUMNS}, got {list(rows[0].keys()) if rows else 'no rows'}")
    cell = lambda c, v: int(v) if c == "epoch" else None if v == "" else float(v)  # noqa: E731
    return {c: [cell(c, r[c]) for r in rows] for c in METRICS_COLUMNS}


def append_metrics(run_dir, row: dict) -> None:
    """Adds one epoch to metrics.csv (writing its header first) and metrics.jsonl."""
    run_dir = Path(run_dir)
    csv_path = run_dir / "metrics.csv"
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, METRICS_COLUMNS)
        if new:
            w.writeheader()
        w.writerow({c: row[c] for c in METRICS_COLUMNS})
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({c: row[c] for c in METRICS_COLUMNS}) + "\n")
