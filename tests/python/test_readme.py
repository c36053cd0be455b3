"""The README and the docs/ pages are true as written: every fenced block that follows a
`<!-- tested -->` line is run from the repository root (sh blocks with bash, python blocks with
this venv's Python), each page's blocks in order, so a later block may use files an earlier one
of the same page wrote; every block after `<!-- output: FILE -->` is its command and then FILE
(a program's output that scripts/make-pictures wrote); every relative link points at a file
and heading that exist; the README stays a front door (at most 15,000 bytes, linking every
page); and the results tables are exactly what scripts/bench makes from the newest file in
docs/results/."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, load_script

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# Every Markdown file whose links are checked: the pages, and the notes in docs/ subfolders.
LINKED = PAGES + sorted(p for p in (ROOT / "docs").glob("*/**/*.md"))
README_LIMIT = 15_000  # bytes: the README is the front door; the rest lives in docs/

BLOCK = re.compile(r"<!-- tested -->\s*\n```(sh|python)\n(.*?)```", re.S)
OUTPUT = re.compile(r"<!-- output: (\S+) -->\s*\n```\n(\$ [^\n]*\n)(.*?)```", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.M)


def rel(page: Path) -> str:
    return os.path.relpath(page, ROOT)


def runnable_blocks(page: Path) -> list[tuple[str, str]]:
    return BLOCK.findall(page.read_text())


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to
    hyphens, and -1, -2 ... after repeats."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a '# comment' in a block is no heading
    slugs, counts = set(), {}
    for heading in HEADING.findall(text):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = counts[slug] = counts.get(slug, -1) + 1
        slugs.add(slug if n == 0 else f"{slug}-{n}")
    return slugs


def test_the_pages_have_tested_blocks_for_both_directions():
    text = " ".join(code for page in PAGES for _, code in runnable_blocks(page))
    # Rust -> PyTorch and PyTorch -> Rust must both be shown, not only described; Rust's
    # exports are shown in today's formats: torch.export and ONNX through onnxruntime.
    readme = " ".join(code for _, code in runnable_blocks(ROOT / "README.md"))
    assert "torch.export.load" in readme and "onnxruntime" in readme and "torch.jit.load" not in readme
    assert "load_state_dict" in text
    assert "torch.save" in text and "lenet5 eval" in text.replace("target/release/", "")


@pytest.mark.parametrize("page", [p for p in PAGES if runnable_blocks(p)], ids=rel)
def test_the_tested_blocks_run(page, binary):
    for lang, code in runnable_blocks(page):
        cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "sh" else [sys.executable, "-c", code]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{rel(page)}: block failed:\n{code}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"


@pytest.mark.parametrize("page", [p for p in PAGES if OUTPUT.search(p.read_text())], ids=rel)
def test_the_outputs_shown_are_the_files_written(page):
    for name, _command, shown in OUTPUT.findall(page.read_text()):
        assert shown == (page.parent / name).read_text(), f"{rel(page)}: the output shown is not {name}"


@pytest.mark.parametrize("page", LINKED, ids=rel)
def test_every_relative_link_points_at_what_exists(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for link in (a or b for a, b in LINK.findall(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # https:, mailto: ...
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no {target})")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link} (no heading #{anchor} in {rel(target)})")
    assert not broken, f"{rel(page)}: broken links: {broken}"


def test_the_readme_is_a_front_door():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}: move detail to a docs/ page"
    links = {(ROOT / a.partition("#")[0]).resolve() for a, _ in LINK.findall(README.read_text()) if a}
    unlinked = [rel(p) for p in PAGES[1:] if p.resolve() not in links]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


# -----------------------------------------------------------------------------
# The results tables: scripts/bench's renderer, on the real files and on made-up ones.


@pytest.fixture(scope="module")
def bench():
    return load_script("bench")


def test_the_pages_tables_are_made_from_the_newest_results_file(bench):
    for page in bench.TABLE_PAGES:
        text = page.read_text()
        assert text == bench.render_page(page, text), (
            f"{rel(page)}: its results table is not what the newest file in docs/results/ gives: "
            "run `scripts/bench --write-tables`")


# Made-up values of each field: the Rust side's, and each peer's.
SAMPLE_VALUES = {
    "images_per_s": (30_000.0, {"eager": 10_000.0, "torch.compile": 12_000.0, "onnxruntime": 11_000.0}),
    "median_us": (20.0, {"eager": 200.0, "onnxruntime": 40.0}), "p99_us": (30.0, {"eager": 400.0, "onnxruntime": 60.0}),
    "seconds": (5.0, {"eager": 20.0}), "peak_rss_mib": (850.0, {"eager": 1_240.0, "torch.compile": 1_500.0}),
    "ms": (300.0, {"eager": 1_200.0}), "gflops": (300.0, {}), "one_thread_gflops": (150.0, {})}
SAMPLE_FLOP = 2e6  # FLOP per image on the Rust side's speed runs


def sample_runs(bench, values=SAMPLE_VALUES) -> dict:
    """Made-up runs (two a side) of every measurement the rows name."""
    runs = {}
    for _key, measurement, engine, _label, field, _unit, _better in bench.ROWS:
        rust, peers = values[field]
        sides = runs.setdefault(measurement, {})
        for side, value in ((engine, rust), *peers.items()):
            for i, run in enumerate(sides.setdefault(side, [{}, {}])):
                run.update({field: value * (1 + i / 10), "epochs": 3, "reached": True})
                if side in bench.ENGINES and field in ("images_per_s", "median_us", "p99_us"):
                    run["flop_per_image"] = SAMPLE_FLOP
    theoretical = {"cores": 2, "lanes": 16, "mhz": 2600.0, "clock": "/proc/cpuinfo's cpu MHz", "fma_units_assumed": 2,
                   "gflops": 332.8}
    measured = {"threads": 2, "lanes": 16, "chains": 12, "instructions": "AVX-512 FMA", "cpus": [0, 1]}
    for run in runs["peak"]["direct"]:
        run.update({"theoretical": theoretical, "measured": measured, "fma_per_cycle": 1.9})
    runs["latency"]["libtorch"][0]["stages_median_us"] = {s: 10.0 for s in bench.STAGES}
    runs["latency"]["eager"][0]["stages_median_us"] = {s: 20.0 for s in bench.STAGES}
    return runs


def sample_result(bench, started: str, cpu: str = "Intel(R) Xeon(R) CPU @ 2.20GHz", quick=False) -> dict:
    """A results file as scripts/bench writes one, from made-up runs (two a side) of every row."""
    runs = sample_runs(bench)
    m = {"cpu": cpu, "logical_cpus": 4, "usable_cpus": 2, "cpu_capability": "AVX2", "torch": "2.11.0",
         "onnxruntime": "1.32.0", "libtorch_rust": "2.11.0", "threads": 2, "device": "cpu", "load_average_at_start": 0.1}
    prov = {**m, "machine": bench.machine_slug(cpu, m["cpu_capability"], 2), "date": started[:10], "started_utc": started,
            "git_commit": "0123456789abcdef", "git_dirty": False, "lenet5": "0.1.0", "command": "scripts/bench"}
    settings = {"quick": quick, "reps": 2, "reps_time_to_99": 2, "reps_startup": 2}
    return {"format": "lenet5-bench-results", "format_version": 2, "provenance": prov, "settings": settings,
            "rows": bench.summarize(runs, "cpu", 2),
            "stages_median_us": bench.stage_table(runs["latency"]["libtorch"], runs["latency"]["eager"]),
            "peak": bench.peak_summary(runs["peak"]["direct"])}


def test_the_machine_is_named_by_cpu_model_vectors_and_cores(bench):
    slug = bench.machine_slug
    assert slug("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "AVX512", 2) == "intel-xeon-platinum-8481c-avx512-2c"
    assert slug("AMD EPYC 7B13", "AVX2", 2) == "amd-epyc-7b13-avx2-2c"
    assert slug("AMD EPYC 9B45 128-Core Processor", "AVX512", 4) == "amd-epyc-9b45-avx512-4c"
    assert slug("Intel(R) Xeon(R) CPU @ 2.20GHz", "AVX2", 2, "NVIDIA H100 80GB HBM3") == "intel-xeon-avx2-2c-nvidia-h100-80gb"
    # Two VMs that name their CPU only "AMD EPYC", a Zen 3 and a Zen 4, on one day: two files.
    assert slug("AMD EPYC", "AVX2", 2) != slug("AMD EPYC", "AVX512", 2)


def test_the_tables_come_from_the_newest_file_with_ratios_against_the_best_peer(bench, tmp_path):
    older = sample_result(bench, "2026-01-02T10:00:00+00:00", cpu="AMD EPYC 7B13")
    newer = sample_result(bench, "2026-03-04T10:00:00+00:00")
    # Written with bench's own writer; the newer one first, so the file order cannot decide.
    for result in (newer, older):
        bench.write_results(tmp_path, result["provenance"], result["settings"], result["rows"], result["stages_median_us"],
                            result["peak"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["amd-epyc-7b13-avx2-2c-2026-01-02.json", "intel-xeon-avx2-2c-2026-03-04.json"]
    assert bench.newest_results(tmp_path) == tmp_path / "intel-xeon-avx2-2c-2026-03-04.json"

    page = README
    text = f"# front\n\nbefore\n\n{bench.TABLE_BEGIN}\nold table\n{bench.TABLE_END}\n\nafter\n"
    got = bench.render_page(page, text, tmp_path)
    assert got.startswith("# front\n\nbefore\n\n") and got.endswith("\n\nafter\n") and "old table" not in got
    table = got.split(bench.TABLE_BEGIN)[1].split(bench.TABLE_END)[0]
    assert "**intel-xeon-avx2-2c**" in table and "2026-03-04" in table and "commit `0123456789`" in table
    assert "Intel(R) Xeon(R) CPU @ 2.20GHz" in table and "amd" not in table
    # Links relative to the page: the results file, and the page with every row.
    assert f"]({os.path.relpath(tmp_path / 'intel-xeon-avx2-2c-2026-03-04.json', ROOT)})" in table and "](docs/speed.md)" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(bench.SUMMARY_ROWS)
    # Training images/s: Rust 31,500 (the median of 30,000 and 33,000) against the best peer,
    # torch.compile's 12,600; 31,500 images/s x 2 MFLOP = 63 GFLOP/s, 20% of the 315 measured.
    assert "| training, batch 64, images/s | 31,500 | 12,600 (torch.compile) | 2.50 (Rust ahead 2.50x) | 20% |" in rows
    # Times: lower is better, the best peer is the fastest, and the ratio is still Rust/peer;
    # 2 MFLOP in 21 µs is 95.2 GFLOP/s, 60% of one thread's 157.5.
    assert "| latency of one image, median µs | 21.00 | 42.00 (onnxruntime) | 0.50 (Rust ahead 2.00x) | 60% |" in rows
    # No peer: no ratio.
    assert "| float32 FMA peak of the machine, GFLOP/s, measured | 315 | - | - | - |" in rows

    full = bench.render_page(bench.SPEED_PAGE, text, tmp_path)
    full_rows = [line for line in full.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(full_rows) == 1 + len(bench.ROWS) + 1 + len(bench.STAGES) + 1  # headers, rows, stages and their sum
    assert "| C1 | 10.00 | 20.00 | 0.50 |" in full_rows
    assert "theoretical 333 GFLOP/s = 2 cores x 2,600 MHz x 16 lanes x 2 x 2 FMA units" in full
    # Rendering is a pure function of the files: twice gives the same text.
    assert bench.render_page(page, got, tmp_path) == got


def test_a_row_over_the_measured_peak_is_an_error(bench):
    values = {**SAMPLE_VALUES, "gflops": (50.0, {})}  # a peak of 52.5: below the training rows' 63 GFLOP/s
    errors = bench.over_peak(bench.summarize(sample_runs(bench, values), "cpu", 2))
    assert errors and all("more than the machine can do" in e for e in errors)
    assert "training cpu, batch 64 (steady state): libtorch engine (libtorch): 120% of the measured peak" in errors[0]
    assert bench.over_peak(bench.summarize(sample_runs(bench), "cpu", 2)) == []


def test_without_a_results_file_the_table_is_one_line(bench, tmp_path):
    text = f"{bench.TABLE_BEGIN}\n{bench.TABLE_END}\n"
    got = bench.render_page(README, text, tmp_path)
    assert len(got.splitlines()) == 3 and "No results file yet" in got


def test_a_quick_run_says_it_is_not_a_measurement(bench, tmp_path):
    result = sample_result(bench, "2026-03-04T10:00:00+00:00", quick=True)
    (tmp_path / "x.json").write_text(json.dumps(result))
    assert "not a measurement" in bench.render_page(README, f"{bench.TABLE_BEGIN}\n{bench.TABLE_END}\n", tmp_path)


def test_a_quick_run_may_not_write_into_docs_results():
    r = subprocess.run([sys.executable, ROOT / "scripts" / "bench", "--quick", "--results-dir", "docs/results"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "smoke run, not a measurement" in r.stderr, r.stderr


def test_a_results_file_says_where_and_from_what_it_came(bench, tmp_path):
    fake = tmp_path / "lenet5"  # stands in for the binary: only its --version is asked
    fake.write_text("#!/bin/sh\necho 'lenet5 9.8.7'\n")
    fake.chmod(0o755)
    m = {"cpu": "AMD EPYC 7B13", "logical_cpus": 4, "usable_cpus": 2, "cpu_capability": "AVX2", "torch": "2.11.0",
         "libtorch_rust": "2.11.0", "threads": 2, "device": "cpu", "load_average_at_start": 0.1}
    started = bench.datetime.datetime(2026, 3, 4, 10, 0, tzinfo=bench.datetime.UTC)
    prov = bench.provenance(m, fake, started)
    assert prov["machine"] == "amd-epyc-7b13-avx2-2c" and prov["date"] == "2026-03-04"
    assert prov["started_utc"] == "2026-03-04T10:00:00+00:00" and prov["finished_utc"] > prov["started_utc"]
    assert prov["lenet5"] == "9.8.7" and prov["torch"] == "2.11.0" and prov["command"].startswith("scripts/bench")
    assert prov["cpu"] == "AMD EPYC 7B13" and prov["usable_cpus"] == 2 and prov["threads"] == 2
    assert re.fullmatch(r"[0-9a-f]{40}", prov["git_commit"]) and prov["git_dirty"] in (True, False)
