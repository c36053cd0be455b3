"""The README's commands and snippets work as written: every fenced block that follows a
`<!-- tested -->` line is run from the repository root (sh blocks with bash, python blocks
with this venv's Python), in order, so a later block may use files an earlier one wrote."""

import re
import subprocess
import sys

from conftest import ROOT

BLOCK = re.compile(r"<!-- tested -->\s*\n```(sh|python)\n(.*?)```", re.S)


def readme_blocks():
    return BLOCK.findall((ROOT / "README.md").read_text())


def test_the_readme_has_tested_blocks_for_both_directions():
    text = " ".join(code for _, code in readme_blocks())
    # Rust -> PyTorch and PyTorch -> Rust must both be shown, not only described.
    assert "torch.jit.load" in text and "load_state_dict" in text
    assert "torch.save" in text and "lenet5 eval" in text.replace("target/release/", "")


def test_readme_blocks_run(binary):
    for lang, code in readme_blocks():
        cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "sh" else [sys.executable, "-c", code]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"README block failed:\n{code}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
