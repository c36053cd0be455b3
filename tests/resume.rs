//! Interrupted runs lose nothing: SIGINT/SIGTERM checkpoint and exit 130/143, SIGKILL at any
//! moment leaves a loadable run folder, `--resume` ends bit-identical to an uninterrupted run
//! (the default recipe, AdamW with OneCycleLR cycling beta1, also trained by the direct
//! engine from the fast recipe, which it keeps, and SGD with Nesterov momentum under StepLR),
//! and a diverging run stops with the last good checkpoint.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_lenet5");

/// The default recipe (AdamW, OneCycleLR with beta1 cycling) on a small run; shifts exercise
/// the per-step random streams, and checkpoints fall inside epochs as well as at their ends.
const RECIPE: &[&str] = &[
    "--recipe",
    "default",
    "--epochs",
    "3",
    "--limit-train",
    "6000",
    "--batch-size",
    "64",
    "--shift",
    "1",
    "--seed",
    "5",
    "--threads",
    "1",
    "--checkpoint-every",
    "10",
    "--optimizer",
    "adamw",
    "--lr",
    "3e-3",
    "--schedule",
    "onecycle",
    "--engine",
    "libtorch",
];

/// SGD's momentum buffers and a schedule that steps once per epoch.
const SGD: &[(&str, &str)] = &[("--optimizer", "sgd"), ("--lr", "0.05"), ("--schedule", "step")];

/// The direct engine, whose checkpoints record the engine, on the fast recipe, whose
/// evaluation only at the end the resumed run must keep (the flags above override the rest).
const DIRECT: &[(&str, &str)] = &[("--engine", "direct"), ("--recipe", "fast")];

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

fn spawn(out: &Path, overrides: &[(&str, &str)]) -> Child {
    train(out, overrides).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

fn resume(out: &Path) -> Output {
    Command::new(BIN).args(["train", "--resume"]).arg(out).args(["--threads", "1"]).output().unwrap()
}

/// The reference: the same recipe, never interrupted (trained once per recipe).
fn uninterrupted(overrides: &[(&str, &str)]) -> Vec<u8> {
    static DONE: std::sync::Mutex<Vec<(String, Vec<u8>)>> = std::sync::Mutex::new(Vec::new());
    let key = format!("{overrides:?}");
    let mut done = DONE.lock().unwrap();
    if let Some((_, weights)) = done.iter().find(|(k, _)| *k == key) {
        return weights.clone();
    }
    let out = temp_dir(&format!("reference-{}", done.len()));
    let status = train(&out, overrides).output().unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let weights = std::fs::read(out.join("lenet5.safetensors")).unwrap();
    done.push((key, weights.clone()));
    weights
}

/// A run in progress, its stderr read as it trains: the test interrupts it at a point of its
/// own progress, not after a guessed time, so the run cannot end first on a fast machine.
struct Running {
    child: Child,
    stderr: BufReader<ChildStderr>,
    /// All it has written to stderr so far.
    log: String,
}

impl Running {
    fn start(out: &Path, overrides: &[(&str, &str)]) -> Running {
        let mut child = spawn(out, overrides);
        let stderr = BufReader::new(child.stderr.take().unwrap());
        Running { child, stderr, log: String::new() }
    }

    /// Reads stderr up to the run's `n`th report about an epoch. With stderr not a terminal, a
    /// run reports each quarter of an epoch ("epoch 1/3  25%  ...", after the step it reached)
    /// and each epoch's end ("epoch  1/3  train loss ..."): four lines an epoch, so the recipe's
    /// 3 epochs make 12, and line 1 comes about 30 of the run's 282 steps in.
    fn wait_for_epoch_report(&mut self, n: usize) {
        let mut seen = 0;
        while seen < n {
            let mut line = String::new();
            let read = self.stderr.read_line(&mut line).unwrap();
            assert!(read > 0, "the run ended before its epoch report {n}:\n{}", self.log);
            seen += usize::from(line.starts_with("epoch "));
            self.log.push_str(&line);
        }
    }

    /// Waits for the run to end: its exit status and everything it wrote to stderr.
    fn finish(mut self) -> (ExitStatus, String) {
        self.stderr.read_to_string(&mut self.log).unwrap();
        let status = self.child.wait_with_output().unwrap().status;
        (status, self.log)
    }
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

#[test]
fn sigint_and_sigterm_checkpoint_exit_130_143_and_resume_bit_identically() {
    const DEFAULT: &[(&str, &str)] = &[];
    for (sig, code, recipe) in [("-INT", 130, DEFAULT), ("-TERM", 143, SGD), ("-INT", 130, DIRECT)] {
        let out = temp_dir(&format!("signal{code}"));
        let mut run = Running::start(&out, recipe);
        // A quarter into the first epoch, with checkpoints behind it and most of the run ahead.
        run.wait_for_epoch_report(1);
        signal(&run.child, sig);
        let (status, stderr) = run.finish();
        // Every case must really be interrupted: a run that ended first (exit 0) fails here.
        assert_eq!(status.code(), Some(code), "{sig}: the run was not stopped by the signal\n{stderr}");
        assert!(stderr.contains(&format!("resume with: lenet5 train --resume {}", out.display())), "{stderr}");
        let resumed = resume(&out);
        assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
        assert!(
            std::fs::read(out.join("lenet5.safetensors")).unwrap() == uninterrupted(recipe),
            "{sig}: resumed weights differ"
        );
        let card: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("lenet5.json")).unwrap()).unwrap();
        let (name, evaluate) = if recipe == DIRECT { ("fast", "end") } else { ("default", "every-epoch") };
        let saved = &card["training"]["recipe"];
        assert_eq!((saved["recipe"].as_str(), saved["evaluate"].as_str()), (Some(name), Some(evaluate)), "{sig}");
    }
}

#[test]
fn sigkill_at_any_moment_leaves_a_loadable_run_that_resumes_exactly() {
    // Fixed, spread-out kill points stand in for random ones: a few ms after one of the run's
    // epoch reports (see Running::wait_for_epoch_report), from a quarter into the first epoch to
    // the end of the second; right after an epoch's end report, the epoch's checkpoint and
    // metrics are being written.
    for (i, (report, delay)) in [(1, 0u64), (2, 3), (4, 0), (7, 5), (8, 1)].into_iter().enumerate() {
        let out = temp_dir(&format!("kill{i}"));
        let mut run = Running::start(&out, &[]);
        run.wait_for_epoch_report(report);
        std::thread::sleep(Duration::from_millis(delay));
        run.child.kill().unwrap(); // SIGKILL
        let (status, stderr) = run.finish();
        // A run that ended before the kill (exit 0) tests nothing: it must die by the signal.
        assert_eq!(status.signal(), Some(9), "kill {i}: the run was not killed ({status})\n{stderr}");
        // Whatever the moment, the checkpoint and the metrics in the folder are whole.
        let (meta, saved) =
            lenet5::training::checkpoint::load(&out.join("checkpoint.safetensors")).expect("checkpoint loads");
        assert_eq!(saved.weights.len(), 10);
        // AdamW's step, exp_avg and exp_avg_sq for each of the 10 parameters.
        assert_eq!(saved.optimizer.len(), 30, "{:?}", saved.optimizer.iter().map(|(k, _)| k).collect::<Vec<_>>());
        let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap_or_default();
        let rows = csv.lines().skip(1).count();
        assert!(rows <= meta.state.history.len(), "metrics ahead of the checkpoint");
        let resumed = resume(&out);
        assert!(resumed.status.success(), "kill {i}: {}", String::from_utf8_lossy(&resumed.stderr));
        assert!(
            std::fs::read(out.join("lenet5.safetensors")).unwrap() == uninterrupted(&[]),
            "kill {i}: resumed weights differ"
        );
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
    assert!(stderr.contains("(learning rate ") && stderr.contains("try a lower lr"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    if out.join("checkpoint.safetensors").exists() {
        let (_, saved) = lenet5::training::checkpoint::load(&out.join("checkpoint.safetensors")).unwrap();
        for (name, t) in saved.weights.into_iter().chain(saved.optimizer) {
            assert!(t.isfinite().all().int64_value(&[]) == 1, "checkpoint holds non-finite {name}");
        }
    }
    assert!(!out.join("lenet5.safetensors").exists(), "a diverged run must not save a model");
}
