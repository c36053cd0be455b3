//! Bad input, one row per class, through the real binary: each gets a one-line error that
//! names the file or flag and the problem, a non-zero exit, no panic, no libtorch backtrace,
//! and no partial output. (IDX data rows are in tests/cli.rs; images in tests/predict.rs.)

mod support;

use std::path::PathBuf;
use support::*;

/// The folder of a trained model and its card (`support::model`), for the rows that need a
/// good file to break.
fn model_dir() -> PathBuf {
    model().parent().expect("a model file is in a folder").to_path_buf()
}

#[test]
fn broken_model_files_are_named_with_the_problem() {
    let good = std::fs::read(model_dir().join("lenet5.safetensors")).unwrap();
    let zip_not_torch: &[u8] = b"PK\x03\x04\x14\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x05\x00\x00\x00a.txtPK\x05\x06\x00\x00\x00\x00\x01\x00\x01\x00\x33\x00\x00\x00\x1f\x00\x00\x00\x00\x00";
    let random: Vec<u8> = (0u32..4096).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let d = temp_dir("models");
    ok(&["export", "--model", s(&model_dir().join("lenet5.safetensors")), "--out", s(&d.join("m"))]);
    let onnx = std::fs::read(d.join("m.onnx")).unwrap();
    let rows: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "the file is empty"),
        ("truncated", good[..good.len() / 2].to_vec(), "cannot read the safetensors"),
        ("random", random, "not a model file this program reads"),
        ("zip", zip_not_torch.to_vec(), "zip"),
        ("header-only", good[..200].to_vec(), "cannot read the safetensors"),
        // ONNX has no magic bytes: one cut short, or a ModelProto with nothing but its IR version.
        ("onnx-truncated", onnx[..onnx.len() / 2].to_vec(), "starts as an ONNX model does but is truncated or corrupt"),
        ("onnx-ir-only", vec![0x08, 0x08], "starts as an ONNX model does but has no opset_import, no graph"),
    ];
    for (name, bytes, reason) in rows {
        let path = d.join(format!("{name}.pt"));
        std::fs::write(&path, bytes).unwrap();
        let err = fails(&["eval", "--model", s(&path), "--threads", "1"]);
        assert!(err.contains(s(&path)) && err.contains(reason), "{name}: expected {reason:?}:\n{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{name}: not one line:\n{err}");
    }
}

#[test]
fn a_model_card_that_does_not_match_its_weights_is_refused() {
    let d = temp_dir("card");
    for f in ["lenet5.safetensors", "lenet5.json"] {
        std::fs::copy(model_dir().join(f), d.join(f)).unwrap();
    }
    // Same names and shapes, other values: the card's checksum catches the swap.
    let mut bytes = std::fs::read(d.join("lenet5.safetensors")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(d.join("lenet5.safetensors"), bytes).unwrap();
    let err = fails(&["eval", "--model", s(&d.join("lenet5.safetensors")), "--threads", "1"]);
    assert!(err.contains("lenet5.json: does not match") && err.contains("describes other weights"), "{err}");

    std::fs::write(d.join("lenet5.json"), "{\"format\": \"something else\"}").unwrap();
    let err = fails(&["eval", "--model", s(&d.join("lenet5.safetensors")), "--threads", "1"]);
    assert!(err.contains("lenet5.json: not a lenet5 model card"), "{err}");
}

#[test]
fn a_missing_card_is_a_note_not_a_failure() {
    let d = temp_dir("nocard");
    std::fs::copy(model_dir().join("lenet5.safetensors"), d.join("w.safetensors")).unwrap();
    let out = lenet5(&["eval", "--model", s(&d.join("w.safetensors")), "--threads", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("no model card") && stderr.contains("taking arch modern and head softmax"), "{stderr}");
}

#[test]
fn weights_of_another_architecture_list_every_mismatch() {
    // The classic/modern variants share shapes, so build a real mismatch: fc1 with 256 inputs.
    let d = temp_dir("shape");
    let good = model_dir().join("lenet5.safetensors");
    let tensors = tch::Tensor::read_safetensors(&good).unwrap();
    let changed: Vec<(String, tch::Tensor)> = tensors
        .into_iter()
        .filter(|(k, _)| k != "fc3.bias")
        .map(|(k, t)| {
            if k == "fc1.weight" {
                (k, tch::Tensor::zeros([120, 256], (tch::Kind::Float, tch::Device::Cpu)))
            } else {
                (k, t)
            }
        })
        .chain([("extra.weight".to_string(), tch::Tensor::zeros([3], (tch::Kind::Float, tch::Device::Cpu)))])
        .collect();
    let path = d.join("other.safetensors");
    tch::Tensor::write_safetensors(&changed, &path).unwrap();
    let out = lenet5(&["eval", "--model", s(&path), "--threads", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for expected in [
        "missing fc3.bias [10]",
        "wrong shape for fc1.weight: expected [120, 400], got [120, 256]",
        "unexpected extra.weight [3]",
    ] {
        assert!(stderr.contains(expected), "{expected:?} not in\n{stderr}");
    }
}

#[test]
fn bad_flag_values_name_the_flag() {
    let rows: &[(&[&str], &str)] = &[
        (&["train", "--batch-size", "0"], "--batch-size 0"),
        (&["train", "--batch-size=-5"], "--batch-size"),
        (&["train", "--epochs", "0"], "--epochs 0"),
        (&["train", "--test-batch-size", "0"], "--test-batch-size 0"),
        (&["train", "--threads", "0"], "--threads 0"),
        (&["train", "--momentum", "1.5"], "--momentum 1.5"),
        (&["train", "--optimizer", "lbfgs"], "--optimizer"),
        (&["train", "--arch", "alexnet"], "--arch"),
        (&["train", "--schedule", "warm"], "--schedule"),
        (&["train", "--device", "cuda:7x"], "--device cuda:7x"),
        (&["train", "--checkpoint-every", "0"], "--checkpoint-every 0"),
        (&["eval", "--batch-size", "0"], "--batch-size 0"),
        (&["train", "--key-map", "x=y"], "--key-map"),
    ];
    for (args, flag) in rows {
        let err = fails(args);
        assert!(err.contains(flag), "{args:?}: {flag:?} not in\n{err}");
    }
}

#[test]
fn an_output_folder_that_cannot_be_written_fails_before_any_work() {
    let blocker = temp_dir("blocker").join("a-file");
    std::fs::write(&blocker, b"").unwrap();
    let out = blocker.join("run");
    let err = fails(&["train", "--dry-run", "--out", s(&out)]);
    assert!(err.contains(&format!("--out {}: cannot create the folder", out.display())), "{err}");
    let err = fails(&["export", "--model", s(&model_dir().join("lenet5.safetensors")), "--out", s(&out.join("m"))]);
    assert!(err.contains(s(&out)), "{err}");
    assert!(!out.exists());
    // An export into a folder that is not there is refused, and makes none.
    let missing = temp_dir("export-missing").join("no-such-folder");
    let err = fails(&["export", "--model", s(&model_dir().join("lenet5.safetensors")), "--out", s(&missing.join("m"))]);
    let expected = format!("--out {}: the folder {} does not exist", missing.join("m").display(), missing.display());
    assert!(err.contains(&expected), "{err}");
    assert!(!missing.exists());
}
