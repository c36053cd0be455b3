"""The Rust LeNet-5 inside PyTorch: the model, its training loop and the convolution
walkthrough of the `lenet5` CLI as a Python module that works on `torch.Tensor`s directly,
in the same process and on the libtorch `import torch` loaded (tensors cross without copies).
`lenet5.LeNet5` is a `torch.nn.Module` (model.py) whose forward pass runs in Rust.

    import torch, lenet5
    model, history = lenet5.train(epochs=1, seed=1)     # lenet5 train --epochs 1 --seed 1
    logits = model(torch.zeros(8, 1, 32, 32))           # [8, 10]
    lenet5.evaluate(model)["accuracy"]

Every call raises a Python exception (FileNotFoundError, ValueError, TypeError, RuntimeError,
KeyboardInterrupt) with the CLI's message; nothing aborts the interpreter.
"""

import sys

# First: the native module links against the libtorch inside the torch package, which
# `import torch` loads into the process.
import torch  # noqa: F401

from ._native import DEFAULT_RECIPE, __version__, conv
from ._native import train as _train
from .model import LeNet5, evaluate, load

__all__ = ["DEFAULT_RECIPE", "LeNet5", "__version__", "conv", "evaluate", "load", "train"]


def train(
    data=None,
    *,
    images=None,
    labels=None,
    test_images=None,
    test_labels=None,
    arch="modern",
    head="softmax",
    dataset="mnist",
    out=None,
    resume=None,
    init=None,
    checkpoint_every=None,
    device="auto",
    threads=None,
    progress=True,
    **recipe,
):
    """Trains LeNet-5 exactly as `lenet5 train` does and returns `(model, history)`.

    The recipe is the CLI's, as keyword arguments named as the model card records them:
    `recipe` names the one to start from ("default", whose values are `lenet5.DEFAULT_RECIPE`,
    "fast", "short", "long": `lenet5 train --help` and docs/training.md list their settings),
    and these override its values: `epochs`, `batch_size`, `test_batch_size`, `evaluate`
    ("every-epoch", "end"), `lr`, `optimizer` ("adamw", "adam", "sgd"), `optimizer_impl`
    ("torch", "libtorch"), `momentum`, `dampening`, `nesterov`, `betas`, `eps`,
    `weight_decay`, `amsgrad`, `schedule` ("onecycle", "cosine", "step", "constant"), `gamma`,
    `cycle_momentum`, `shift`, `seed`, `limit_train`, `dry_run`, `engine` ("libtorch":
    bit-identical to PyTorch; "direct": the direct engine's own gradient loops, faster on a
    CPU, other rounding). The same seed and thread count give the same weights as the CLI,
    bit for bit.

    Data: the MNIST folder (`data`, default data/mnist; `dataset="fashion-mnist"`), or your
    own `images` `[N, 1, 32, 32]` float32 network inputs with int64 `labels` `[N]`, and
    `test_images`/`test_labels` to evaluate on after every epoch.

    The run folder `out` (default runs/DATASET-ARCH-HEAD) gets the checkpoints, the metrics
    and the exported model, as the CLI's. The interpreter is free while it trains (other
    threads run); `progress=True` shows a bar (an HTML one in a notebook), False shows
    nothing, and a callable gets `(event, value)` for every update ("progress", "epoch").

    A KeyboardInterrupt (Ctrl-C, the notebook's stop button) stops the run at the next step
    with a checkpoint written, then raises KeyboardInterrupt saying how to continue:
    `lenet5.train(resume=DIR)` continues it bit for bit (pass your tensors again).

    `model` is a `lenet5.LeNet5` holding the trained weights, with its card as `model.card`;
    `history` is a list of dicts, one per epoch (`pandas.DataFrame(history)` reads it).
    """
    given = dict(
        data=data, images=images, labels=labels, test_images=test_images, test_labels=test_labels,
        arch=arch, head=head, dataset=dataset, out=out, resume=resume, init=init,
        checkpoint_every=checkpoint_every, device=device, threads=threads,
    )
    defaults = dict(arch="modern", head="softmax", dataset="mnist", device="auto")
    invocation = _call_repr("lenet5.train", {**{k: v for k, v in given.items() if not (k in defaults and v == defaults[k])}, **recipe})
    display = _Progress() if progress is True else (progress or None)
    try:
        parts, history = _train(
            recipe,
            arch=arch,
            head=head,
            dataset=dataset,
            data=data,
            images=images,
            labels=labels,
            test_images=test_images,
            test_labels=test_labels,
            out=out,
            resume=resume,
            init=init,
            checkpoint_every=checkpoint_every,
            device=device,
            threads=threads,
            progress=display,
            invocation=invocation,
        )
        return LeNet5._from_parts(parts), history
    finally:
        if isinstance(display, _Progress):
            display.close()


def _call_repr(name, kwargs):
    """`lenet5.train(epochs=1, images=<tensor [N, 1, 32, 32]>)`: the call as the model card
    records it, leaving out arguments at their defaults (None, or `defaults`' values)."""

    def show(v):
        if isinstance(v, torch.Tensor):
            return f"<tensor {list(v.shape)}>"
        return repr(str(v)) if hasattr(v, "__fspath__") else repr(v)

    args = ", ".join(f"{k}={show(v)}" for k, v in kwargs.items() if v is not None)
    return f"{name}({args})"


def _in_notebook():
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in shell.config


class _Progress:
    """The bar `train(progress=True)` shows: HTML updated in place in a notebook, one
    rewritten line on a terminal, nothing but the epoch lines in a log; each finished
    epoch's line stays."""

    def __init__(self):
        self.handle = None
        self.terminal = sys.stderr.isatty()
        self.shown = False
        if _in_notebook():
            from IPython.display import HTML, display

            self._html = HTML
            self.handle = display(HTML(""), display_id=True)

    def __call__(self, event, value):
        if event == "epoch":
            self.clear()
            print(value["line"], flush=True)
            return
        p = value
        fraction = p["seen"] / max(p["total"], 1)
        text = (
            f"epoch {p['epoch']}/{p['epochs']}  {p['seen']}/{p['total']} images  "
            f"loss {p['loss']:.4f}  acc {100 * p['accuracy']:.2f}%"
        )
        if self.handle is not None:
            self.handle.update(
                self._html(
                    f"<progress value='{fraction:.4f}' max='1' style='width:24em'></progress> "
                    f"<code>{text}</code>"
                )
            )
        elif self.terminal:
            sys.stderr.write(f"\r\033[K[{'=' * int(30 * fraction):<30}] {text}")
            sys.stderr.flush()
        self.shown = True

    def clear(self):
        if not self.shown:
            return
        if self.handle is not None:
            self.handle.update(self._html(""))
        elif self.terminal:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
        self.shown = False

    close = clear
