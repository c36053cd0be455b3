//! The real binary end to end: training, evaluation, reproducibility, other data sets and
//! formats, and the one-line errors for bad input. Needs MNIST in data/mnist (scripts/setup).

mod support;

use std::path::Path;
use support::*;

fn card(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("lenet5.json")).unwrap()).unwrap()
}

#[test]
fn dry_run_trains_saves_exports_and_eval_agrees() {
    let out = temp_dir("dry");
    ok(&["train", "--dry-run", "--threads", "1", "--out", s(&out)]);
    for f in [
        "lenet5.safetensors",
        "lenet5.json",
        "lenet5.pt",
        "lenet5.check.safetensors",
        "lenet5.onnx",
        "lenet5.pt2",
        "metrics.csv",
        "metrics.jsonl",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let card = card(&out);
    assert_eq!(card["model"]["arch"], "modern");
    assert_eq!(card["parameters"], 61706);
    let eval: serde_json::Value =
        serde_json::from_str(&ok(&["eval", "--model", s(&out.join("lenet5.safetensors")), "--json", "--threads", "1"]))
            .unwrap();
    // `eval` rebuilds the model from the card alone and must count the same images right.
    assert_eq!(eval["correct"], card["metrics"]["test_correct"]);
    assert_eq!(eval["total"], 10000);
    let header = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert!(header.starts_with("epoch,lr,train_loss,train_accuracy,test_loss,test_accuracy,seconds\n"));
}

#[test]
fn the_direct_engine_counts_the_test_set_as_libtorch_does() {
    // The shipped model (or the quick one) on all 10,000 test images: its logits are within
    // 1e-5 of libtorch's (src/direct/mod.rs), which moves no prediction here; the loss agrees to
    // far better than the 1e-4 allowed.
    let model = support::model();
    let eval = |engine: &str, threads: &str| -> serde_json::Value {
        serde_json::from_str(&ok(&["eval", "--model", s(&model), "--engine", engine, "--threads", threads, "--json"]))
            .unwrap()
    };
    let reference = eval("libtorch", "1");
    assert_eq!(reference["engine"], "libtorch");
    for threads in ["1", "2"] {
        let direct = eval("direct", threads);
        assert_eq!(direct["engine"], "direct");
        assert_eq!(direct["confusion"], reference["confusion"], "{threads} threads");
        let (a, b) = (direct["loss"].as_f64().unwrap(), reference["loss"].as_f64().unwrap());
        assert!((a - b).abs() < 1e-4 * b, "loss {a} vs {b}");
    }
    let script = temp_dir("direct-script").join("m");
    ok(&["export", "--model", s(&model), "--out", s(&script)]);
    let err = fails(&["eval", "--model", s(&script.with_extension("pt")), "--engine", "direct"]);
    assert!(err.contains("only libtorch runs") && err.contains("m.pt"), "{err}");
}

#[test]
fn a_seeded_cpu_run_repeats_exactly() {
    let run = |name| {
        let out = temp_dir(name);
        ok(&[
            "train",
            "--epochs",
            "2",
            "--limit-train",
            "1500",
            "--shift",
            "2",
            "--seed",
            "7",
            "--threads",
            "1",
            "--out",
            s(&out),
        ]);
        let metrics: Vec<String> = std::fs::read_to_string(out.join("metrics.csv"))
            .unwrap()
            .lines()
            .map(|l| l.rsplit_once(',').unwrap().0.to_string()) // all but the timing column
            .collect();
        (metrics, std::fs::read(out.join("lenet5.safetensors")).unwrap())
    };
    let (a, b) = (run("seed-a"), run("seed-b"));
    assert_eq!(a.0, b.0, "metrics differ between two runs with the same seed");
    assert!(a.1 == b.1, "weights differ between two runs with the same seed");
    assert_eq!(a.0.len(), 3);
}

#[test]
fn fashion_mnist_trains_with_its_own_classes() {
    // Fashion-MNIST comes from Debian's package: scripts/setup fetches it where it can.
    let kind = lenet5::data::DatasetKind::FashionMnist;
    if !kind.default_dir().is_dir() {
        eprintln!("skipped: Fashion-MNIST is in none of {:?}; {}", kind.default_dirs(), kind.fetch_hint());
        return;
    }
    let out = temp_dir("fashion");
    ok(&[
        "train",
        "--dataset",
        "fashion-mnist",
        "--epochs",
        "2",
        "--limit-train",
        "5000",
        "--threads",
        "1",
        "--out",
        s(&out),
    ]);
    let card = card(&out);
    assert_eq!(card["dataset"], "fashion-mnist");
    assert_eq!(card["classes"][9], "Ankle boot");
    let acc = card["metrics"]["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.7, "fashion-mnist accuracy {acc} after 2 epochs of 5,000 images");
}

/// Writes the four MNIST files gzip'd (the torchvision layout) into `dir`.
fn gzip_mnist(dir: &Path) {
    use std::io::Write;
    for f in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    {
        let bytes = std::fs::read(Path::new("data/mnist").join(f)).expect("MNIST in data/mnist: run scripts/setup");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&bytes).unwrap();
        std::fs::write(dir.join(format!("{f}.gz")), gz.finish().unwrap()).unwrap();
    }
}

#[test]
fn gzipped_data_gives_the_same_result_and_broken_files_are_named() {
    let model = temp_dir("gz-model");
    ok(&["train", "--dry-run", "--threads", "1", "--out", s(&model)]);
    let weights = model.join("lenet5.safetensors");
    let gz = temp_dir("gz-data");
    gzip_mnist(&gz);
    let eval = |data: &Path| -> serde_json::Value {
        serde_json::from_str(&ok(&["eval", "--model", s(&weights), "--data", s(data), "--json", "--threads", "1"]))
            .unwrap()
    };
    assert_eq!(eval(&gz)["correct"], eval(Path::new("data/mnist"))["correct"]);

    // Break the gzip'd test labels in three ways; each error names the file.
    let labels = gz.join("t10k-labels-idx1-ubyte.gz");
    let good = std::fs::read(&labels).unwrap();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (good[..good.len() / 2].to_vec(), "corrupt gzip data"),
        (vec![], "the file is empty"),
        (b"\x1f\x8bnot really gzip".to_vec(), "corrupt gzip data"),
    ];
    for (bytes, reason) in cases {
        std::fs::write(&labels, bytes).unwrap();
        let err = fails(&["eval", "--model", s(&weights), "--data", s(&gz), "--threads", "1"]);
        assert!(err.contains("t10k-labels-idx1-ubyte.gz") && err.contains(reason), "{reason}: {err}");
    }
}

#[test]
fn idx_problems_across_files_are_named() {
    let model = temp_dir("idx-model");
    ok(&["train", "--dry-run", "--threads", "1", "--out", s(&model)]);
    let weights = model.join("lenet5.safetensors");
    let dir = temp_dir("idx-data");
    let images = std::fs::read("data/mnist/t10k-images-idx3-ubyte").unwrap();
    let labels = std::fs::read("data/mnist/t10k-labels-idx1-ubyte").unwrap();
    for f in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"] {
        std::fs::copy(Path::new("data/mnist").join(f), dir.join(f)).unwrap();
    }
    let write = |i: &[u8], l: &[u8]| {
        std::fs::write(dir.join("t10k-images-idx3-ubyte"), i).unwrap();
        std::fs::write(dir.join("t10k-labels-idx1-ubyte"), l).unwrap();
    };
    let eval = || fails(&["eval", "--model", s(&weights), "--data", s(&dir), "--threads", "1"]);

    // More labels than images: drop the last 1,000 images and fix the header's count.
    let mut fewer = images[..16 + 9000 * 784].to_vec();
    fewer[4..8].copy_from_slice(&9000u32.to_be_bytes());
    write(&fewer, &labels);
    let err = eval();
    assert!(err.contains("10000 labels for the 9000 images"), "{err}");

    let mut bad_label = labels.clone();
    bad_label[8 + 5] = 10;
    write(&images, &bad_label);
    let err = eval();
    assert!(err.contains("t10k-labels-idx1-ubyte: label 10 at index 5 is out of range"), "{err}");

    write(&labels, &labels);
    let err = eval();
    assert!(err.contains("t10k-images-idx3-ubyte: wrong magic number"), "{err}");

    write(&images[..1000], &labels);
    let err = eval();
    assert!(err.contains("t10k-images-idx3-ubyte: truncated"), "{err}");

    // A consistent file of 28x27 images: not what LeNet-5's input expects.
    let mut narrow = images[..16 + 10000 * 28 * 27].to_vec();
    narrow[12..16].copy_from_slice(&27u32.to_be_bytes());
    write(&narrow, &labels);
    let err = eval();
    assert!(err.contains("t10k-images-idx3-ubyte: images are 28x27, expected 28x28"), "{err}");
}

#[test]
fn bad_command_lines_get_one_clear_line() {
    let missing = fails(&["train", "--data", "/nonexistent/mnist", "--dry-run"]);
    assert!(missing.contains("/nonexistent/mnist does not exist") && missing.contains("scripts/setup"), "{missing}");
    let device = fails(&["train", "--device", "tpu", "--dry-run"]);
    assert!(device.contains("--device tpu: unknown device"), "{device}");
    if ok(&["info"]).contains("cuda        false") {
        let cuda = fails(&["train", "--device", "cuda", "--dry-run"]);
        assert!(cuda.contains("no CUDA device"), "{cuda}");
    }
    let batch = fails(&["train", "--batch-size", "0", "--dry-run"]);
    assert!(batch.contains("--batch-size 0: must be at least 1"), "{batch}");
    let lr = fails(&["train", "--lr=-1", "--dry-run"]);
    assert!(lr.contains("--lr"), "{lr}");
    let model = fails(&["eval", "--model", "/nonexistent/model.pt"]);
    assert!(model.contains("/nonexistent/model.pt: no such model file or run folder"), "{model}");
    let arch = fails(&["bench", "--what", "eval", "--arch", "classic"]);
    assert!(arch.contains("--arch is for train and time-to-99"), "{arch}");
}

#[test]
fn summary_and_conv_print_the_numbers_of_the_paper() {
    let summary = ok(&["summary"]);
    for row in ["6x28x28", "6x14x14", "16x10x10", "16x5x5", "61706"] {
        assert!(summary.contains(row), "{row} not in\n{summary}");
    }
    let conv = ok(&["conv"]);
    assert!(conv.contains("4 3 4\n2 4 3\n2 3 4\n"), "{conv}");
}

#[test]
fn export_writes_every_format_with_no_python_on_path_and_the_card_lists_each_with_its_sha256() {
    let dir = temp_dir("export-no-python");
    let prefix = dir.join("m");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lenet5"))
        .args(["export", "--model", s(&support::model()), "--out", s(&prefix)])
        .env_clear()
        .env("PATH", dir.join("no-such-bin")) // nothing to run: no python, no shell
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(prefix.with_extension("json")).unwrap()).unwrap();
    let files = card["files"].as_object().unwrap();
    for (role, extension) in [
        ("weights", "safetensors"),
        ("torchscript", "pt"),
        ("check", "check.safetensors"),
        ("onnx", "onnx"),
        ("torch_export", "pt2"),
    ] {
        let entry = &files[role];
        let path = dir.join(format!("m.{extension}"));
        assert_eq!(entry["name"], format!("m.{extension}"), "{role}");
        assert_eq!(entry["sha256"].as_str().unwrap(), lenet5::formats::card::sha256_file(&path).unwrap(), "{role}");
    }
}
