"""The wheel of scripts/wheel, installed with pip into a new venv outside the project that holds
the torch the wheel requires and nothing else: `import lenet5` there loads libtorch from that
venv's torch package with no LD_LIBRARY_PATH, the module names no folder of this machine to find
it (no absolute rpath), and a probe run there with a bare environment loads the shipped model by
path, gives stock PyTorch's logits bit for bit and trains the CLI's run weight for weight.

torch and its dependencies are downloaded once into target/wheelhouse and installed from there:
pip's own cache needs HTTP caching headers, which a proxy may strip.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, RUST_TRAIN, SCRIPTS, L, run

WHEELHOUSE = ROOT / "target" / "wheelhouse"
VERSION = tomllib.loads((ROOT / "binding" / "pyproject.toml").read_text())["project"]["version"]
TORCH_LIBS = {"libtorch_cpu.so", "libc10.so", "libtorch_python.so"}
# Run by the new venv's Python with -I (no PYTHONPATH, no user site, not its own folder on sys.path).
PROBE = r"""
import json, sys
from pathlib import Path
import torch
import lenet5

model, inputs, data, out, threads, recipe = sys.argv[1:]
torch.set_num_threads(int(threads))
with torch.no_grad():
    logits = lenet5.load(model)(torch.load(inputs))
trained, history = lenet5.train(data=data, out=Path(out) / "run", progress=False, **json.loads(recipe))
# The files mapped into this process: every shared library the loader found, at its path.
maps = [line.split(None, 5) for line in Path("/proc/self/maps").read_text().splitlines()]
libraries = sorted({m[5] for m in maps if len(m) == 6 and ".so" in Path(m[5]).name})
torch.save({"lenet5": lenet5.__file__, "sys_path": sys.path, "libraries": libraries, "logits": logits,
            "trained": trained.state_dict(), "history": history}, Path(out) / "probe.pt")
"""


def inside(path, folder) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


@pytest.fixture(scope="module")
def wheel() -> Path:
    # For the Python running these tests: its venv is the one scripts/setup built into.
    r = run([SCRIPTS / "wheel"], timeout=1800, env={**os.environ, "LENET5_VENV": sys.prefix})
    path = Path(r.stdout.strip())
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert path.is_file() and path.parent == ROOT / "target" / "wheels", r.stdout
    assert path.name == f"lenet5-{VERSION}-{tag}-{tag}-{sysconfig.get_platform().replace('-', '_')}.whl"
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A new venv in a temporary folder with the wheel and what it requires, from pip."""
    folder = tmp_path_factory.mktemp("wheel-venv")
    assert not inside(folder, ROOT)
    venv = folder / "venv"
    run([sys.executable, "-m", "venv", venv])
    pip = [venv / "bin" / "python", "-m", "pip", "--quiet", "--disable-pip-version-check"]
    install = [*pip, "install", "--no-compile", "--no-index", "--find-links", WHEELHOUSE, wheel]
    if run(install, timeout=1800, check=False).returncode != 0:  # pip installs nothing unless all is there
        WHEELHOUSE.mkdir(parents=True, exist_ok=True)
        run([*pip, "download", "--dest", WHEELHOUSE, *requirements(wheel)], timeout=1800)
        run(install, timeout=1800)
    yield venv
    # torch's gigabytes, removed in the background (on a disk mounted with `discard` that takes a
    # while, and nothing needs to wait for it): sh starts rm, returns, and leaves it to init.
    subprocess.run(["sh", "-c", 'rm -rf "$1" &', "sh", folder], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, start_new_session=True, check=True)


@pytest.fixture(scope="module")
def probe(venv, test_set, mnist_dir, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("wheel-probe")
    torch.save(test_set[0][:1000].clone(), work / "inputs.pt")
    # rust_run's flags (conftest.RUST_TRAIN, --threads 2) as lenet5.train's keywords.
    recipe = {flag.removeprefix("--").replace("-", "_"): int(v) for flag, v in zip(RUST_TRAIN[::2], RUST_TRAIN[1::2], strict=True)}
    recipe["threads"] = 2
    args = [ROOT / "models" / "mnist", work / "inputs.pt", mnist_dir, work, torch.get_num_threads(), json.dumps(recipe)]
    # A bare environment: no LD_LIBRARY_PATH, PYTHONPATH or VIRTUAL_ENV; the cwd is outside the project.
    env = {"PATH": os.defpath, "HOME": str(work), "LANG": "C.UTF-8"}
    r = subprocess.run([venv / "bin" / "python", "-I", "-c", PROBE, *map(str, args)], cwd=work, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"the probe in {venv} exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    return torch.load(work / "probe.pt")


def requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(f"lenet5-{VERSION}.dist-info/METADATA").decode()
    return re.findall(r"^Requires-Dist: (.+)$", metadata, re.M)


def test_the_wheel_holds_the_package_and_requires_the_projects_torch(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert {"lenet5/__init__.py", "lenet5/model.py", "lenet5/_native.pyi", "lenet5/py.typed"} <= set(names)
    # One native file, the module: libtorch is not bundled (no auditwheel repair).
    assert [n for n in names if ".so" in n] == [f"lenet5/_native{sysconfig.get_config_var('EXT_SUFFIX')}"], names
    pinned = [line for line in (SCRIPTS / "requirements.txt").read_text().splitlines() if line.startswith("torch==")]
    assert requirements(wheel) == pinned == [f"torch=={torch.__version__.split('+')[0]}"]


def test_the_module_links_libtorch_by_name_with_no_absolute_rpath(venv):
    [module] = venv.glob("lib/python*/site-packages/lenet5/_native*.so")
    readelf = shutil.which("readelf")
    assert readelf, "readelf (binutils) is needed to read the module's dynamic section"
    section = subprocess.run([readelf, "-d", module], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", section)
    assert TORCH_LIBS <= set(needed) and not [n for n in needed if "/" in n], section
    # $ORIGIN-relative entries would move with the venv; an absolute one would point at the build machine.
    rpaths = [e for p in re.findall(r"\((?:RPATH|RUNPATH)\)\s+Library r(?:un)?path: \[(.*)\]", section) for e in p.split(":")]
    assert all(e.startswith("$ORIGIN") for e in rpaths), section


def test_import_in_the_new_venv_loads_that_venvs_libtorch_and_nothing_of_the_project(venv, probe):
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert inside(probe["lenet5"], site / "lenet5"), probe["lenet5"]
    assert not [p for p in probe["sys_path"] if inside(p, ROOT)], probe["sys_path"]
    libraries = probe["libraries"]
    assert not [p for p in libraries if inside(p, ROOT)], libraries  # no .so of the project (nor of its .venv)
    torch_libs = [p for p in libraries if Path(p).name in TORCH_LIBS]
    assert {Path(p).name for p in torch_libs} == TORCH_LIBS and all(inside(p, site / "torch" / "lib") for p in torch_libs), torch_libs
    [module] = (site / "lenet5").glob("_native*.so")
    assert [Path(p) for p in libraries if Path(p).name.startswith("_native")] == [module.resolve()]


def test_the_shipped_model_loaded_there_gives_stock_pytorchs_logits(probe, test_set):
    reference = L.load_model(ROOT / "models" / "mnist" / "lenet5.safetensors").eval()
    want = L.predict(reference, test_set[0][:1000])
    # The same libtorch release and kernels on the same weights: exact.
    assert (probe["logits"] - want).abs().max().item() == 0.0


def test_training_there_equals_the_clis_run(probe, rust_run):
    assert [row["epoch"] for row in probe["history"]] == [1] and probe["history"][0]["test_accuracy"] > 0.6
    theirs = load_file(rust_run / "lenet5.safetensors")
    ours = probe["trained"]
    assert set(ours) == set(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k  # weight for weight, bit for bit


def test_the_readme_installs_this_wheel(wheel):
    assert f"pip install {wheel.relative_to(ROOT)}" in (ROOT / "README.md").read_text()
