"""scripts/bench end to end, as a smoke run: every row of the table is measured on both sides
and lands in the JSON as a positive number. Not a timed test: no threshold on any speed."""

import json

from conftest import PYTHON, SCRIPTS, run

# Every row a --skip-time-to-99 run reports: (key, field) as scripts/bench names them.
EXPECTED_ROWS = [
    ("train64", "images_per_s"), ("train256", "images_per_s"), ("eval", "images_per_s"), ("eval_direct", "images_per_s"),
    ("latency", "median_us"), ("latency", "p99_us"), ("latency_direct", "median_us"), ("latency_direct", "p99_us"),
    ("latency_script", "median_us"), ("latency_script", "p99_us"),
    ("train64_direct", "images_per_s"), ("train256_direct", "images_per_s"), ("train256_direct_classic", "images_per_s"),
    ("train256", "peak_rss_mib"), ("train256_direct", "peak_rss_mib"), ("eval", "peak_rss_mib"), ("latency", "peak_rss_mib"),
    ("startup_version", "ms"), ("startup_info", "ms"),
]


def test_quick_bench_measures_every_row_on_both_sides(binary, mnist_dir, tmp_path):
    out = tmp_path / "bench.json"
    r = run([PYTHON, SCRIPTS / "bench", "--quick", "--skip-time-to-99", "--threads", "1", "--bin", binary,
             "--data", mnist_dir, "--out", out], timeout=600)
    result = json.loads(out.read_text())
    assert result["errors"] == []
    got = [(row["key"], row["field"]) for row in result["rows"]]
    assert got == EXPECTED_ROWS
    for row in result["rows"]:
        assert row["rust"] > 0 and row["pytorch"] > 0 and row["ratio"] > 0, row
        assert row["better"] in ("higher", "lower") and row["row"] in r.stdout
    # Both sides ran the same measurement: same batch sizes, threads and device.
    for key, runs in result["runs"].items():
        if key.startswith("startup"):
            continue
        rust, pytorch = runs["rust"][0], runs["pytorch"][0]
        assert (rust["batch_size"], rust["threads"], rust["device"]) == (pytorch["batch_size"], pytorch["threads"], pytorch["device"]), key
    for key in ("eval_direct", "latency_direct"):
        assert [r["engine"] for r in result["runs"][key]["rust"]] == ["direct"], key
    for key in ("eval", "latency"):
        assert [r["engine"] for r in result["runs"][key]["rust"]] == ["libtorch"], key
    for key, engine in (("train64", "libtorch"), ("train256", "libtorch"), ("train64_direct", "direct"), ("train256_direct", "direct"),
                        ("train256_direct_classic", "direct")):
        assert [r["recipe"]["engine"] for r in result["runs"][key]["rust"]] == [engine], key
    # Both sides trained the same variant.
    for key, arch in (("train256", "modern"), ("train256_direct", "modern"), ("train256_direct_classic", "classic")):
        runs = result["runs"][key]
        assert [r["arch"] for r in runs["rust"] + runs["pytorch"]] == [arch, arch], key
    stages = {s["stage"]: s for s in result["stages_median_us"]}
    assert list(stages) == ["C1", "S2", "C3", "S4", "F5", "F6", "output", "sum"]
    assert all(s["rust"] > 0 and s["pytorch"] > 0 for s in stages.values())
    assert result["machine"]["cpu"] and result["machine"]["libtorch_rust"] != "unknown"
    assert "machine:" in r.stdout and "Rust/PyTorch" in r.stdout
    # The whole fast command, once in a quick run: its own wall clock, accuracy and peak memory.
    fast = result["fast_recipe_command"]
    assert fast["command"] == "lenet5 train --recipe fast --engine direct --threads 1" and len(fast["runs"]) == 1
    (one,) = fast["runs"]
    assert one["wall_s"] > one["train_s"] > 0 and one["test_accuracy"] > 0.98 and one["peak_rss_mib"] > 0, one
    assert fast["median_wall_s"] == one["wall_s"] and f"{100 * one['test_accuracy']:.2f}%" in r.stdout
