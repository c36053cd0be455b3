"""scripts/bench end to end, as a smoke run: every row of the table is measured on every side it
names and lands in the JSON as a positive number, each speed row with its GFLOP/s and its share
of the measured peak. Not a timed test: no threshold on any speed."""

import json
from pathlib import Path

from conftest import PYTHON, SCRIPTS, run

# Every row a --quick --skip-time-to-99 run reports, (key, field) as scripts/bench names them,
# and the peers it compares with (--quick compiles with torch.compile at batch 64 and in
# evaluation only).
TRAINING, EVALUATION, LATENCY = {"eager", "torch.compile"}, {"eager", "torch.compile", "onnxruntime"}, {"eager", "onnxruntime"}
EXPECTED_ROWS = [
    (("peak", "gflops"), set()), (("peak_one_thread", "one_thread_gflops"), set()),
    (("train64", "images_per_s"), TRAINING), (("train64_direct", "images_per_s"), TRAINING),
    (("train256", "images_per_s"), {"eager"}), (("train256_direct", "images_per_s"), {"eager"}),
    (("train256_direct_classic", "images_per_s"), {"eager"}),
    (("eval", "images_per_s"), EVALUATION), (("eval_direct", "images_per_s"), EVALUATION),
    (("latency", "median_us"), LATENCY), (("latency", "p99_us"), LATENCY),
    (("latency_direct", "median_us"), LATENCY), (("latency_direct", "p99_us"), LATENCY),
    (("latency_script", "median_us"), {"eager"}), (("latency_script", "p99_us"), {"eager"}),
    (("train256", "peak_rss_mib"), {"eager"}), (("train256_direct", "peak_rss_mib"), {"eager"}),
    (("eval", "peak_rss_mib"), EVALUATION), (("latency", "peak_rss_mib"), LATENCY),
    (("startup_version", "ms"), {"eager"}), (("startup_info", "ms"), {"eager"}),
]
# FLOP per image, counted by hand from LeNet-5's shapes (2 per multiply-add): the forward pass
# is C1 6*28*28*25 + C3 16*10*10*150 + F5 120*400 + F6 84*120 + output 10*84 = 416,520
# multiply-adds; training adds as many for the weight gradients and as many less C1's for the
# input gradients.
INFERENCE_FLOP = 2 * 416_520
TRAINING_FLOP = 2 * (3 * 416_520 - 6 * 28 * 28 * 25)


def test_quick_bench_measures_every_row_on_every_side(binary, mnist_dir, tmp_path):
    out = tmp_path / "bench.json"
    r = run([PYTHON, SCRIPTS / "bench", "--quick", "--skip-time-to-99", "--threads", "1", "--bin", binary,
             "--data", mnist_dir, "--out", out], timeout=1200)
    result = json.loads(out.read_text())
    assert result["errors"] == []
    assert [(row["key"], row["field"]) for row in result["rows"]] == [key for key, _ in EXPECTED_ROWS]
    for row, (_, peers) in zip(result["rows"], EXPECTED_ROWS, strict=True):
        assert set(row["peers"]) == peers, row["row"]
        assert row["rust"] > 0 and all(v > 0 for v in row["peers"].values()), row
        assert row["better"] in ("higher", "lower") and row["row"] in r.stdout
        if peers:  # the ratio is against the best peer, by the row's own direction
            pick = max if row["better"] == "higher" else min
            assert row["best_peer"] == pick(row["peers"], key=row["peers"].get), row
            assert row["ratio"] == row["rust"] / row["peers"][row["best_peer"]], row
    # Every speed row: each side's GFLOP/s from the hand count, and a share of the peak in (0, 100%].
    peak = result["peak"]
    assert peak["gflops"] > 0 and peak["one_thread_gflops"] > 0 and peak["kernel"]["chains"] == 12
    for row in result["rows"]:
        if row["field"] not in ("images_per_s", "median_us", "p99_us"):
            assert row["gflops"] == {}, row["row"]
            continue
        flop = TRAINING_FLOP if row["key"].startswith("train") else INFERENCE_FLOP
        values = {row["engine"]: row["rust"], **row["peers"]}
        assert set(row["gflops"]) == set(values), row["row"]
        ceiling = peak["gflops"] if row["field"] == "images_per_s" else peak["one_thread_gflops"]
        for side, value in values.items():
            expected = value * flop / 1e9 if row["field"] == "images_per_s" else flop / (value * 1e-6) / 1e9
            assert abs(row["gflops"][side] - expected) <= 1e-9 * expected, (row["row"], side)
            assert abs(row["peak_share"][side] - expected / ceiling) <= 1e-9, (row["row"], side)
            assert 0 < row["peak_share"][side] <= 1, (row["row"], side)
    assert "float32 peak:" in r.stdout and "% of peak" in r.stdout
    # Every side of a measurement ran the same one: same batch sizes, threads and device.
    for key, sides in result["runs"].items():
        if key.startswith("startup") or key == "peak":
            continue
        first = next(iter(sides.values()))[0]
        for side, runs in sides.items():
            assert [(x["batch_size"], x["threads"], x["device"]) for x in runs] == [
                (first["batch_size"], first["threads"], first["device"])], (key, side)
        for side in set(sides) & {"eager", "torch.compile", "onnxruntime"}:
            assert [x["peer"] for x in sides[side]] == [side], (key, side)
    runs = result["runs"]
    for key in ("eval", "latency"):
        for engine in ("libtorch", "direct"):
            assert [x["engine"] for x in runs[key][engine]] == [engine], key
    for key in ("train64", "train256", "train256_classic"):
        for engine in set(runs[key]) & {"libtorch", "direct"}:
            assert [x["recipe"]["engine"] for x in runs[key][engine]] == [engine], key
    # onnxruntime ran the ONNX file `lenet5 export` wrote, and it is the same model: the test
    # set's accuracy agrees with eager's to a few images in 10,000 (float rounding may flip one).
    (ort,) = runs["eval"]["onnxruntime"]
    assert ort["model"].endswith(".onnx") and Path(ort["model"]).is_file()
    for side in ("torch.compile", "onnxruntime", "libtorch", "direct"):
        assert abs(runs["eval"][side][0]["accuracy"] - runs["eval"]["eager"][0]["accuracy"]) <= 3e-4, side
    # Every side trained the same variant.
    for key, arch in (("train256", "modern"), ("train256_classic", "classic")):
        assert {x["arch"] for side in runs[key].values() for x in side} == {arch}, key
    stages = {s["stage"]: s for s in result["stages_median_us"]}
    assert list(stages) == ["C1", "S2", "C3", "S4", "F5", "F6", "output", "sum"]
    assert all(s["rust"] > 0 and s["pytorch"] > 0 for s in stages.values())
    assert result["machine"]["cpu"] and result["machine"]["libtorch_rust"] != "unknown"
    assert "machine:" in r.stdout and "Rust/best" in r.stdout
    # The whole fast command, once in a quick run: its own wall clock, accuracy and peak memory.
    fast = result["fast_recipe_command"]
    assert fast["command"] == "lenet5 train --recipe fast --engine direct --threads 1" and len(fast["runs"]) == 1
    (one,) = fast["runs"]
    assert one["wall_s"] > one["train_s"] > 0 and one["test_accuracy"] > 0.98 and one["peak_rss_mib"] > 0, one
    # The binary's own peak (about 210 MiB), not the bench's process with torch loaded (over
    # 500), which a child forked straight from it counts in its ru_maxrss.
    assert one["peak_rss_mib"] < 400, one
    assert fast["median_wall_s"] == one["wall_s"] and f"{100 * one['test_accuracy']:.2f}%" in r.stdout
