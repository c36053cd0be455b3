//! Interrupted runs lose nothing: SIGINT/SIGTERM checkpoint and exit 130/143, SIGKILL at any
//! moment leaves a loadable run folder, `--resume` of plain SGD ends bit-identical to an
//! uninterrupted run, and a diverging run stops with the last good checkpoint.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_lenet5");

/// Plain SGD (no momentum), so resuming loses no optimizer state; shifts exercise the
/// per-step random streams.
const RECIPE: &[&str] = &[
    "--epochs", "3", "--limit-train", "6000", "--batch-size", "64", "--optimizer", "sgd", "--momentum", "0",
    "--lr", "0.05", "--schedule", "cosine", "--shift", "1", "--seed", "5", "--threads", "1", "--checkpoint-every", "10",
];

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lenet5-resume-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The recipe with `overrides` (flag, value) replacing its values.
fn train(out: &Path, overrides: &[(&str, &str)]) -> Command {
    let mut args: Vec<&str> = RECIPE.to_vec();
    for (flag, value) in overrides {
        let at = args.iter().position(|a| a == flag).expect("a flag of the recipe");
        args[at + 1] = value;
    }
    let mut cmd = Command::new(BIN);
    cmd.arg("train").args(args).arg("--out").arg(out).env("OMP_NUM_THREADS", "1");
    cmd
}

fn spawn(out: &Path) -> Child {
    train(out, &[]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

fn resume(out: &Path) -> Output {
    Command::new(BIN).args(["train", "--resume"]).arg(out).args(["--threads", "1"]).output().unwrap()
}

/// The reference: the same recipe, never interrupted.
fn uninterrupted() -> Vec<u8> {
    static ONCE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let out = temp_dir("reference");
        let status = train(&out, &[]).output().unwrap();
        assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
        std::fs::read(out.join("lenet5.safetensors")).unwrap()
    })
    .clone()
}

/// Waits until the run has written its first checkpoint (or gives up after 60 s).
fn wait_for_checkpoint(out: &Path) {
    for _ in 0..600 {
        if out.join("checkpoint.safetensors").exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no checkpoint appeared in {}", out.display());
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

#[test]
fn sigint_and_sigterm_checkpoint_exit_130_143_and_resume_bit_identically() {
    for (sig, code) in [("-INT", 130), ("-TERM", 143)] {
        let out = temp_dir(&format!("signal{code}"));
        let child = spawn(&out);
        wait_for_checkpoint(&out);
        signal(&child, sig);
        let stopped = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&stopped.stderr);
        if stopped.status.code() == Some(0) {
            continue; // the run finished before the signal: nothing to resume
        }
        assert_eq!(stopped.status.code(), Some(code), "{stderr}");
        assert!(stderr.contains(&format!("resume with: lenet5 train --resume {}", out.display())), "{stderr}");
        let resumed = resume(&out);
        assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
        assert!(std::fs::read(out.join("lenet5.safetensors")).unwrap() == uninterrupted(), "{sig}: resumed weights differ");
    }
}

#[test]
fn sigkill_at_any_moment_leaves_a_loadable_run_that_resumes_exactly() {
    // Fixed, spread-out kill times (ms after the first checkpoint) stand in for random ones.
    for (i, delay) in [0u64, 130, 470, 900, 1700].into_iter().enumerate() {
        let out = temp_dir(&format!("kill{i}"));
        let mut child = spawn(&out);
        wait_for_checkpoint(&out);
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap(); // SIGKILL
        let _ = child.wait();
        // Whatever the moment, the checkpoint and the metrics in the folder are whole.
        let (meta, weights) = lenet5::checkpoint::load(&out.join("checkpoint.safetensors")).expect("checkpoint loads");
        assert_eq!(weights.len(), 10);
        let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap_or_default();
        let rows = csv.lines().skip(1).count();
        assert!(rows <= meta.state.history.len(), "metrics ahead of the checkpoint");
        let resumed = resume(&out);
        assert!(resumed.status.success(), "kill {i}: {}", String::from_utf8_lossy(&resumed.stderr));
        assert!(std::fs::read(out.join("lenet5.safetensors")).unwrap() == uninterrupted(), "kill {i}: resumed weights differ");
        let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
        assert_eq!(csv.lines().count(), 4, "three epochs of metrics after resuming:\n{csv}");
    }
}

#[test]
fn a_diverging_run_stops_with_step_and_rate_and_keeps_the_last_good_checkpoint() {
    let out = temp_dir("nan");
    let run = train(&out, &[("--lr", "1e6")]).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(stderr.contains("NaN or infinite by step") || stderr.contains("loss became"), "{stderr}");
    assert!(stderr.contains("(learning rate ") && stderr.contains("try a lower --lr"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    if out.join("checkpoint.safetensors").exists() {
        let (_, weights) = lenet5::checkpoint::load(&out.join("checkpoint.safetensors")).unwrap();
        for (name, t) in weights {
            assert!(t.isfinite().all().int64_value(&[]) == 1, "checkpoint holds non-finite {name}");
        }
    }
    assert!(!out.join("lenet5.safetensors").exists(), "a diverged run must not save a model");
}
