"""The project's virtualenv for the Python scripts under scripts/: the README runs them from a
plain shell (`scripts/bench`, `scripts/train_reference ...`), where `python3` is the system's,
without torch. `enter()` re-runs the script in `.venv` (made by scripts/setup) when that
exists and is not already the interpreter; elsewhere (a machine with its own torch and no
.venv, such as the GPU machine) the script goes on as started."""

import importlib.util
import os
import sys
from pathlib import Path

VENV = Path(__file__).resolve().parent.parent / ".venv"


def enter() -> None:
    python = VENV / "bin" / "python"
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    if python.exists():
        os.execv(python, [str(python), *sys.argv])
    if importlib.util.find_spec("torch") is None:
        sys.exit(f"{sys.argv[0]}: {sys.executable} has no torch and {VENV} does not exist: run scripts/setup first")
