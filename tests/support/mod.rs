//! Shared by the tests that run the binary: running it, checking that failures are clean, and
//! a trained model to look at (the shipped one, or a quick one trained once and cached).
#![allow(dead_code)] // each test file uses its own part of this module

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// The model `predict` and `visualize` use by default.
pub const SHIPPED_MODEL: &str = "models/mnist/lenet5.safetensors";

pub fn lenet5_with_stdin(args: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write;
    // One thread per process: cargo runs tests in parallel on a small machine.
    let mut child = Command::new(env!("CARGO_BIN_EXE_lenet5"))
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    child.stdin.take().expect("piped").write_all(stdin).expect("stdin takes the input");
    child.wait_with_output().expect("the binary finishes")
}

pub fn lenet5(args: &[&str]) -> Output {
    lenet5_with_stdin(args, b"")
}

pub fn ok(args: &[&str]) -> String {
    let out = lenet5(args);
    assert!(out.status.success(), "lenet5 {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Checks that a failed run is a clean error (exit status 1 or 2, an `error:` line, no panic
/// and no C++ backtrace) and returns its stderr.
pub fn clean_failure(args: &[&str], out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "lenet5 {args:?} should fail");
    assert!(matches!(out.status.code(), Some(1 | 2)), "exit status {:?} for {args:?}: {stderr}", out.status.code());
    assert!(stderr.contains("error:"), "no error line for {args:?}: {stderr}");
    for bad in ["panicked", "Exception raised from", "frame #", "RUST_BACKTRACE", "libc10"] {
        assert!(!stderr.contains(bad), "{bad:?} in stderr of {args:?}: {stderr}");
    }
    stderr
}

pub fn fails(args: &[&str]) -> String {
    clean_failure(args, &lenet5(args))
}

pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lenet5-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A trained model: the shipped one when it exists, else one trained here in a few seconds
/// (1 epoch on 10,000 images, about 92% on the test set) and cached under cargo's test
/// folder for the other test files.
pub fn model() -> PathBuf {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            if Path::new(SHIPPED_MODEL).is_file() {
                return PathBuf::from(SHIPPED_MODEL);
            }
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("lenet5-quick-model");
            let weights = dir.join("lenet5.safetensors");
            if !weights.is_file() {
                let staging = temp_dir("quick-model");
                ok(&[
                    "train",
                    "--epochs",
                    "1",
                    "--limit-train",
                    "10000",
                    "--threads",
                    "1",
                    "--seed",
                    "1",
                    "--out",
                    s(&staging),
                ]);
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::rename(&staging, &dir).expect("the quick model moves into place");
            }
            weights
        })
        .clone()
}

/// The raw MNIST test set: 28x28 images as bytes, and labels.
pub fn mnist_test() -> (Vec<Vec<u8>>, Vec<u8>) {
    let read = |file: &str, magic: u32| {
        let path = Path::new("data/mnist").join(file);
        let bytes = lenet5::data::read_maybe_gzip(&path).expect("MNIST in data/mnist: run scripts/setup");
        lenet5::data::parse_idx(&bytes, magic, file).unwrap().data
    };
    let images = read("t10k-images-idx3-ubyte", 0x0803);
    let labels = read("t10k-labels-idx1-ubyte", 0x0801);
    (images.chunks(28 * 28).map(<[u8]>::to_vec).collect(), labels)
}
