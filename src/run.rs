//! The run folder: where `train` puts the metrics history (CSV and JSON lines, rewritten
//! atomically after every epoch), the latest checkpoint, and the trained model under the
//! name [`MODEL_NAME`].

use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};

use tch::nn::VarStore;

use crate::checkpoint::{self, CheckpointMeta};
use crate::interrupt::StopRequest;
use crate::optim::Optimizer;
use crate::progress::TerminalProgress;
use crate::train::{EpochMetrics, EpochProgress, Observer, TrainState};

/// Files of the trained model in a run folder are `lenet5.safetensors`, `lenet5.json`, ...
pub const MODEL_NAME: &str = "lenet5";

pub struct RunDir {
    pub dir: PathBuf,
}

impl RunDir {
    pub fn create(dir: &Path) -> Result<RunDir> {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("--out {}: cannot create the folder ({e})", dir.display()))?;
        // Fail now, not after an hour of training, if the folder cannot be written.
        crate::atomic::write(&dir.join(".writable"), b"")
            .map_err(|e| anyhow::anyhow!("--out {}: the folder is not writable ({e:#})", dir.display()))?;
        let _ = std::fs::remove_file(dir.join(".writable")); // its absence changes nothing
        Ok(RunDir { dir: dir.to_path_buf() })
    }

    /// `DIR/lenet5`, the prefix of the model files.
    pub fn model_prefix(&self) -> PathBuf {
        self.dir.join(MODEL_NAME)
    }

    /// Rewrites `metrics.csv` and `metrics.jsonl` with the whole history so far.
    pub fn write_metrics(&self, history: &[EpochMetrics]) -> Result<()> {
        let mut csv = String::from("epoch,lr,train_loss,train_accuracy,test_loss,test_accuracy,seconds\n");
        let mut jsonl = String::new();
        for m in history {
            csv.push_str(&format!(
                "{},{},{},{},{},{},{}\n",
                m.epoch, m.lr, m.train_loss, m.train_accuracy, m.test_loss, m.test_accuracy, m.seconds
            ));
            jsonl.push_str(&serde_json::to_string(m).expect("metrics always serialise"));
            jsonl.push('\n');
        }
        crate::atomic::write(&self.dir.join("metrics.csv"), csv.as_bytes())?;
        crate::atomic::write(&self.dir.join(METRICS_FILE), jsonl.as_bytes())
    }
}

/// The metrics history that programs read back (scripts/train_reference writes it too).
pub const METRICS_FILE: &str = "metrics.jsonl";

/// A run's metrics history, from its [`METRICS_FILE`].
pub fn read_metrics(path: &Path) -> Result<Vec<EpochMetrics>> {
    let name = path.display();
    let text = std::fs::read_to_string(path).with_context(|| format!("{name}: cannot read"))?;
    let rows = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| serde_json::from_str(line).with_context(|| format!("{name}: line {}", i + 1)))
        .collect::<Result<Vec<EpochMetrics>>>()?;
    ensure!(!rows.is_empty(), "{name}: no epochs recorded");
    Ok(rows)
}

/// The run's latest checkpoint, replaced at every epoch end and every --checkpoint-every steps.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// Keeps a run folder current while training: a checkpoint and the metrics history at
/// every checkpoint, progress on the terminal, and a stop when a signal arrives.
pub struct RunObserver<'a> {
    pub run: &'a RunDir,
    pub vs: &'a VarStore,
    pub meta: CheckpointMeta,
    pub stop: StopRequest,
    pub progress: TerminalProgress,
}

impl Observer for RunObserver<'_> {
    fn checkpoint(&mut self, state: &TrainState, optimizer: &Optimizer) -> Result<()> {
        self.meta.state = state.clone();
        checkpoint::save(&self.run.dir.join(CHECKPOINT_FILE), self.vs, optimizer, &self.meta)?;
        self.run.write_metrics(&state.history)
    }

    fn progress(&mut self, progress: &EpochProgress) {
        self.progress.show(progress);
    }

    fn should_stop(&mut self) -> bool {
        self.stop.requested().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_history_reads_back_as_written_and_bad_lines_are_named() {
        let dir = std::env::temp_dir().join(format!("lenet5-metrics-{}", std::process::id()));
        let run = RunDir::create(&dir).unwrap();
        let row = |epoch, test_accuracy| EpochMetrics {
            epoch, lr: 0.003, train_loss: 0.5, train_accuracy: 0.8, test_loss: 0.3, test_accuracy, seconds: 2.5 * epoch as f64,
        };
        let history = vec![row(1, 0.9), row(2, 0.97)];
        run.write_metrics(&history).unwrap();
        assert_eq!(read_metrics(&dir.join(METRICS_FILE)).unwrap(), history);
        std::fs::write(dir.join(METRICS_FILE), "{\"epoch\": 1}\n").unwrap();
        let err = format!("{:#}", read_metrics(&dir.join(METRICS_FILE)).unwrap_err());
        assert!(err.contains("metrics.jsonl: line 1") && err.contains("missing field"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
