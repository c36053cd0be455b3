"""scripts/train_ddp under torchrun, gloo on loopback: the Rust twin wrapped in stock
DistributedDataParallel ends bit-identical to the PyTorch model's run and its ranks to each other,
two torchrun node groups act as two machines, and a run killed by SIGKILL and resumed from its
checkpoint ends where the uninterrupted one does. Equal means torch.equal on every tensor
(tolerance 0): the weights, and in the checkpoints the optimizer and scheduler state too.

Each run is small (1,024 images, 2 ranks of 32 images a step, 3 epochs: 48 steps); most of its
time is the start of three Python processes that import torch.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, SCRIPTS, L, load_script

TORCHRUN = Path(sys.executable).parent / "torchrun"  # the venv's, beside its python
RUN = ["--limit", "1024", "--batch-size", "32", "--epochs", "3", "--checkpoint-every", "8", "--test-limit", "500",
       "--log-every", "4", "--save-every-rank"]
STEPS = 1024 // (2 * 32) * 3  # 16 steps per epoch with 2 ranks
TIMEOUT = 120  # seconds for one torchrun; a run takes about 10 s on 2 busy cores


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick for port 0), for a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (from /proc). torchrun starts each worker in a session of its own, so
    killing torchrun's process group would leave the workers running."""
    tree, i = [pid], 0
    while i < len(tree):
        for task in Path(f"/proc/{tree[i]}/task").glob("*"):
            try:
                tree += [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # the process has gone
                pass
        i += 1
    return tree


def kill_tree(pid: int) -> None:
    for p in process_tree(pid):  # all collected before any dies, so none is re-parented out of reach
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def torchrun(*args, nproc=2, rdzv=None):
    """A running `torchrun ... scripts/train_ddp ARGS`, stdout and stderr in one pipe; killed with all
    its workers when the block ends with it still running. `rdzv`: (nnodes, port) for a node group."""
    nnodes, port = rdzv or (1, free_port())
    cmd = [TORCHRUN, "--nnodes", nnodes, "--nproc-per-node", nproc, "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"lenet5-test-{port}",
           SCRIPTS / "train_ddp", *args]
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    watchdog = threading.Timer(TIMEOUT, kill_tree, [proc.pid])  # ends a hung run, and so any read of its output
    watchdog.start()
    try:
        yield proc
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            kill_tree(proc.pid)
        proc.wait(timeout=30)
        proc.stdout.close()


def finish(proc, expect_ok=True) -> str:
    """The run's output once it exits (the watchdog kills it after TIMEOUT); a failed run fails the test."""
    output, _ = proc.communicate()
    if expect_ok:
        assert proc.returncode == 0, f"torchrun exited {proc.returncode} (-9: killed after {TIMEOUT} s):\n{output}"
    return output


def train(out: Path, *extra) -> str:
    with torchrun(*RUN, "--out", out, *extra) as proc:
        return finish(proc)


def state(out: Path) -> dict:
    """What a run left in OUT: both ranks' final weights, the final checkpoint without its provenance
    (the command lines differ), and model.json."""
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    del ckpt["provenance"]
    return {"rank0": load_file(out / "model.safetensors"), "rank1": load_file(out / "model.rank1.safetensors"),
            "checkpoint": ckpt, "card": json.loads((out / "model.json").read_text())}


def assert_equal(a: dict, b: dict, what: str) -> None:
    """Every tensor torch.equal (and every other entry ==), keys in the same order."""
    assert list(a) == list(b), what
    for k in a:
        if isinstance(a[k], dict):
            assert_equal(a[k], b[k], f"{what}[{k!r}]")
        elif isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}[{k!r}]"
        else:
            assert a[k] == b[k], f"{what}[{k!r}]: {a[k]!r} != {b[k]!r}"


@pytest.fixture(scope="module")
def twin_run(mnist_dir, tmp_path_factory) -> dict:
    """The twin (lenet5.LeNet5, libtorch engine) on 2 gloo ranks, uninterrupted."""
    out = tmp_path_factory.mktemp("ddp-twin")
    output = train(out, "--data", mnist_dir)
    return {**state(out), "output": output}


def test_the_twins_ddp_run_is_bit_identical_to_the_pytorch_models(twin_run, mnist_dir, tmp_path):
    output = train(tmp_path, "--data", mnist_dir, "--reference")
    reference = state(tmp_path)
    assert (twin_run["card"]["model"], reference["card"]["model"]) == ("lenet5.LeNet5", "lenet5_ref.LeNet5")
    for card in (twin_run["card"], reference["card"]):
        assert (card["world_size"], card["backend"], card["threads_per_rank"], card["seed"]) == (2, "gloo", 1, 1)
        assert card["steps"] == STEPS and card["torch_version"] == torch.__version__ and card["git_commit"]
        assert card["test"]["accuracy"] > 0.5, card["test"]  # it learnt: chance is 0.1
    assert f"step {STEPS}/{STEPS}" in twin_run["output"] and f"step {STEPS}/{STEPS}" in output  # progress lines
    for run in (twin_run, reference):
        assert_equal(run["rank0"], run["rank1"], "rank 0 against rank 1")
    torch.manual_seed(1)
    assert not torch.equal(L.LeNet5().fc1.weight, reference["rank0"]["fc1.weight"])  # it moved from the start
    assert_equal(twin_run["rank0"], reference["rank0"], "twin against reference")
    assert_equal(twin_run["checkpoint"], reference["checkpoint"], "final checkpoints")  # optimizer, scheduler too


def test_two_torchrun_node_groups_end_as_one_group(twin_run, mnist_dir, tmp_path):
    """Two torchrun processes, one rank each, meeting at a c10d rendezvous on 127.0.0.1 as two machines
    would; each has its own output folder, as two machines would."""
    port, outs = free_port(), [tmp_path / "machine-a", tmp_path / "machine-b"]
    with (torchrun(*RUN, "--data", mnist_dir, "--out", outs[0], nproc=1, rdzv=(2, port)) as a,
          torchrun(*RUN, "--data", mnist_dir, "--out", outs[1], nproc=1, rdzv=(2, port)) as b):
        finish(a), finish(b)
    # Either node may become rank 0; that one writes the checkpoint and model.safetensors.
    first, second = outs if (outs[0] / "model.safetensors").exists() else outs[::-1]
    assert not (second / "model.safetensors").exists() and not (second / "checkpoint.pt").exists()
    assert not (first / "model.rank1.safetensors").exists()
    card = json.loads((first / "model.json").read_text())
    assert (card["world_size"], card["torchrun_env"]["GROUP_WORLD_SIZE"], card["torchrun_env"]["LOCAL_WORLD_SIZE"]) \
        == (2, "2", "1")
    assert_equal(load_file(first / "model.safetensors"), twin_run["rank0"], "node group 0 against one group")
    assert_equal(load_file(second / "model.rank1.safetensors"), twin_run["rank1"], "node group 1 against one group")


def test_a_run_killed_and_resumed_from_its_checkpoint_ends_as_the_uninterrupted_one(twin_run, mnist_dir, tmp_path):
    """SIGKILL to torchrun and both workers right after the checkpoint of step 24 (epoch 2, batch 8), then
    the same command with --resume."""
    with torchrun(*RUN, "--data", mnist_dir, "--out", tmp_path) as proc:
        lines = []
        for line in proc.stdout:  # until EOF, at the latest when the watchdog kills it
            lines.append(line)
            if line.startswith("checkpoint:") and line.split()[-1] == "24":
                kill_tree(proc.pid)
                break
        else:
            pytest.fail("the run ended without a checkpoint after step 24:\n" + "".join(lines))
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "model.safetensors").exists(), "the run was killed too late: it had finished"
    killed_at = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert 24 <= killed_at["step"] < STEPS and (killed_at["epoch"], killed_at["batch"]) == divmod(killed_at["step"], 16)

    with torchrun(*RUN, "--data", mnist_dir, "--out", tmp_path, "--resume") as proc:
        output = finish(proc)
    assert f"after step {killed_at['step']}" in output.split("resuming", 1)[1].splitlines()[0], output
    resumed = state(tmp_path)
    assert resumed["card"]["resumed_from_step"] == killed_at["step"] and resumed["card"]["steps"] == STEPS
    assert_equal(resumed["rank0"], twin_run["rank0"], "resumed against uninterrupted")
    assert_equal(resumed["rank1"], twin_run["rank1"], "resumed against uninterrupted, rank 1")
    assert_equal(resumed["checkpoint"], twin_run["checkpoint"], "final checkpoints")


def test_a_missing_data_folder_stops_the_process_with_the_folders_name(tmp_path):
    """In a process of its own (as torchrun starts it: its variables set), for the exit status."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    r = subprocess.run([sys.executable, SCRIPTS / "train_ddp", "--data", tmp_path / "nowhere", "--out", tmp_path / "out"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 2, r
    assert r.stderr.startswith(f"train_ddp: data folder {tmp_path / 'nowhere'} does not exist (scripts/setup"), r.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture
def rank0_of_one(monkeypatch):
    """torchrun's variables for a world of one process, so main() runs in this process."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # main() sets --threads for the process: the tests after this one want theirs

def test_bad_flags_are_refused_with_the_flag_and_value(mnist_dir, rank0_of_one, capsys, tmp_path):
    script = load_script("train_ddp")
    for flag, value in (("--limit", "0"), ("--limit", "x"), ("--batch-size", "-3"), ("--test-limit", "-1")):
        with pytest.raises(SystemExit) as e:
            script.main(["--data", str(mnist_dir), flag, value])
        assert e.value.code == 2
        assert f"argument {flag}: must be a positive integer, not '{value}'" in capsys.readouterr().err
    assert script.main(["--data", str(mnist_dir), "--limit", "60001", "--out", str(tmp_path / "out")]) == 2
    assert f"train_ddp: --limit 60001: the train images in {mnist_dir} are only 60000" in capsys.readouterr().err
    assert script.main(["--data", str(mnist_dir), "--test-limit", "10001", "--out", str(tmp_path / "out")]) == 2
    assert "train_ddp: --test-limit 10001: the t10k images" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_without_torchrun_it_says_how_to_start_it(mnist_dir, monkeypatch, capsys):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert load_script("train_ddp").main(["--data", str(mnist_dir)]) == 2
    err = capsys.readouterr().err
    assert "RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set: start this script with torchrun" in err


def test_resume_refuses_another_runs_checkpoint(twin_run, mnist_dir, rank0_of_one, capsys, tmp_path):
    """The twin run's checkpoint (2 ranks, seed 1) in a run of 1 rank with seed 2: another sampler split."""
    torch.save({**twin_run["checkpoint"], "provenance": {}}, tmp_path / "checkpoint.pt")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    args = ["--data", str(mnist_dir), "--out", str(tmp_path), "--resume", *RUN[:6], "--seed", "2"]
    assert load_script("train_ddp").main(args) == 2
    err = capsys.readouterr().err
    assert "belongs to another run: seed 1 there, 2 here; world_size 2 there, 1 here" in err, err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before and not (tmp_path / "model.safetensors").exists()
