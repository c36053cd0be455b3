//! A training run in its folder, from start (or resume) to the exported model: the one flow
//! behind `lenet5 train` and `lenet5.train()`. The folder holds the metrics history (CSV and
//! JSON lines, rewritten atomically after every epoch), the latest checkpoint, and the trained
//! model under the name [`MODEL_NAME`].

use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::data::{self, Splits};
use crate::formats::card::{CardMetrics, ModelCard};
use crate::formats::weights;
use crate::inference::evaluate::Metrics;
use crate::model::{parameter_count, LeNet5};
use crate::training::checkpoint::{self, CheckpointMeta, Saved};
use crate::training::optim::{Implementation, Optimizer};
use crate::training::{EpochMetrics, Outcome, TrainState, Trainer, Watcher};

/// Files of the trained model in a run folder are `lenet5.safetensors`, `lenet5.json`, ...
pub const MODEL_NAME: &str = "lenet5";

pub struct RunDir {
    pub dir: PathBuf,
}

impl RunDir {
    pub fn create(dir: &Path) -> Result<RunDir> {
        std::fs::create_dir_all(dir).map_err(|e| {
            anyhow::anyhow!(crate::setting::invalid("out", dir.display(), format!("cannot create the folder ({e})")))
        })?;
        // Fail now, not after an hour of training, if the folder cannot be written.
        crate::atomic::write(&dir.join(".writable"), b"").map_err(|e| {
            anyhow::anyhow!(crate::setting::invalid(
                "out",
                dir.display(),
                format!("the folder is not writable ({e:#})")
            ))
        })?;
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
        // An epoch not evaluated leaves its test cells empty (null in the JSON lines).
        let cell = |v: Option<f64>| v.map_or_else(String::new, |v| v.to_string());
        for m in history {
            csv.push_str(&format!(
                "{},{},{},{},{},{},{}\n",
                m.epoch,
                m.lr,
                m.train_loss,
                m.train_accuracy,
                cell(m.test_loss),
                cell(m.test_accuracy),
                m.seconds
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

/// A run folder's checkpoint, or the file itself.
pub fn checkpoint_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(CHECKPOINT_FILE)
    } else {
        path.to_path_buf()
    }
}

/// Where a run's weights start.
pub enum Start {
    /// A fresh initialisation from the recipe's seed.
    Fresh,
    /// These weights (any format `weights::read_tensors` reads) and a fresh optimizer.
    Init(PathBuf),
    /// A checkpoint's weights and optimizer state, read from `source`.
    Resume { source: PathBuf, saved: Saved },
}

/// A run to start or continue: its recipe and state, where it starts and its folder.
pub struct RunPlan {
    pub meta: CheckpointMeta,
    pub start: Start,
    /// A safetensors file whose int64 `order` [steps, batch] replaces the shuffled epochs
    /// (parity checks).
    pub batch_order: Option<PathBuf>,
    pub out: PathBuf,
    /// How the shell was asked for this run (the CLI's argv, the Python call), for the card.
    pub invocation: Vec<String>,
}

/// `runs/DATASET-ARCH-HEAD`, the folder of a run not told otherwise.
fn default_out(meta: &CheckpointMeta) -> PathBuf {
    let (d, a, h) = (meta.dataset.as_str(), meta.model.arch.as_str(), meta.model.head.as_str());
    PathBuf::from(format!("runs/{d}-{a}-{h}"))
}

impl RunPlan {
    /// A new run of `meta`'s recipe, in `out` (default `runs/DATASET-ARCH-HEAD`).
    pub fn new(meta: CheckpointMeta, start: Start, out: Option<PathBuf>) -> Result<RunPlan> {
        meta.config.validate()?;
        crate::check_setting!(meta.checkpoint_every != Some(0), "checkpoint_every", 0, "must be at least 1");
        ensure!(matches!(start, Start::Fresh | Start::Init(_)), "a new run starts fresh or from init weights");
        let out = out.unwrap_or_else(|| default_out(&meta));
        Ok(RunPlan { meta, start, batch_order: None, out, invocation: vec![] })
    }

    /// Continues the run saved at `path`: a run folder, its checkpoint.safetensors, or a
    /// PyTorch training checkpoint (.pt; its run folder is `out`, default as for a new run).
    pub fn resume(path: &Path, out: Option<PathBuf>) -> Result<RunPlan> {
        // A PyTorch checkpoint is a torch.save zip; ours is safetensors (in a run folder).
        let (meta, saved, folder) = if path.is_file() && weights::detect(path)? == weights::Format::TorchSave {
            let (meta, saved) = crate::formats::torch_checkpoint::read(path)?;
            (meta, saved, None)
        } else {
            let file = checkpoint_file(path);
            let (meta, saved) = checkpoint::load(&file)?;
            (meta, saved, Some(file.parent().map(Path::to_path_buf).unwrap_or_default()))
        };
        let out = folder.or(out).unwrap_or_else(|| default_out(&meta));
        Ok(RunPlan {
            meta,
            start: Start::Resume { source: path.to_path_buf(), saved },
            batch_order: None,
            out,
            invocation: vec![],
        })
    }

    /// The line a run starts with: what trains, on what, how.
    pub fn describe(&self, device: Device) -> String {
        let (m, c) = (&self.meta, &self.meta.config);
        let epochs = c.epochs_run(self.batch_order.is_some());
        let mut line = format!(
            "{} LeNet-5 ({}, {}) on {} with {} on {}: {} recipe, {epochs} epochs, batch {}, lr {}, {} schedule, {} threads",
            if matches!(self.start, Start::Resume { .. }) { "resuming" } else { "training" },
            m.model.arch.as_str(),
            m.model.head.as_str(),
            m.dataset.as_str(),
            c.optimizer.kind.as_str(),
            crate::device::name(device),
            c.recipe,
            c.batch_size,
            c.optimizer.lr,
            c.schedule.as_str(),
            tch::get_num_threads()
        );
        if matches!(self.start, Start::Resume { .. }) {
            line += &format!("\ncontinuing at epoch {} after step {}", m.state.epoch.max(1), m.state.step);
            if c.optimizer.implementation == Implementation::Libtorch {
                line += "; libtorch's optimizer state starts afresh (tch cannot save it)";
            }
        }
        line
    }
}

/// A finished run: the model, its card (as exported), its history and its final test metrics.
pub struct Trained {
    pub vs: VarStore,
    pub net: LeNet5,
    pub card: ModelCard,
    pub history: Vec<EpochMetrics>,
    pub test: Metrics,
    /// `DIR/lenet5`: the exported model files are this with .safetensors, .json, .pt.
    pub prefix: PathBuf,
    pub wall_seconds: f64,
}

/// How [`train`] ended.
pub enum RunEnd {
    Finished(Box<Trained>),
    /// Stopped on the watcher's request; the checkpoint in `dir` continues it.
    Stopped {
        state: TrainState,
        dir: PathBuf,
    },
}

/// Trains `plan` on `device`, on `data` or else the plan's data set read from disk, keeping
/// its folder current, and exports the model into it when the run finishes.
pub fn train(plan: RunPlan, device: Device, data: Option<Splits>, watcher: &mut dyn Watcher) -> Result<RunEnd> {
    let RunPlan { meta, start, batch_order, out, invocation } = plan;
    let config = &meta.config;
    let run = RunDir::create(&out)?;
    let started = Instant::now();
    tch::manual_seed(config.seed);
    let data = match data {
        Some(data) => data,
        None => data::load(meta.dataset, meta.data_dir.as_deref())?,
    }
    .to_device(device);
    let mut vs = VarStore::new(device);
    let net = LeNet5::new(&vs.root(), meta.model);
    let batch_order = match &batch_order {
        Some(path) => Some(read_batch_order(path, data.train.len())?),
        None => None,
    };
    let trainer = Trainer {
        config,
        head: meta.model.head,
        background: meta.dataset.normalization().background(),
        batch_order,
        checkpoint_every: meta.checkpoint_every,
    };
    let mut optimizer = trainer.optimizer(&net, &vs)?;
    let resumed = matches!(start, Start::Resume { .. });
    match start {
        Start::Fresh => {}
        Start::Init(path) => {
            let (tensors, notes) = weights::read_tensors(&path, weights::detect(&path)?)?;
            notes.iter().for_each(|n| watcher.note(n));
            weights::load_state_dict(&mut vs, tensors, &[], &path.display().to_string())?;
        }
        Start::Resume { source, saved } => {
            let name = source.display().to_string();
            weights::load_state_dict(&mut vs, saved.weights, &[], &name)?;
            optimizer.load_state_tensors(saved.optimizer, &name)?;
        }
    }
    // Keeps the folder current: a checkpoint and the metrics history at every checkpoint.
    let mut saved_meta = meta.clone();
    saved_meta.provenance.command_line = invocation.clone();
    let mut save = |state: &TrainState, optimizer: &Optimizer| -> Result<()> {
        saved_meta.state = state.clone();
        checkpoint::save(&run.dir.join(CHECKPOINT_FILE), &vs, optimizer, &saved_meta)?;
        run.write_metrics(&state.history)
    };
    // Gradients on, whatever the caller's thread had: a notebook's `with torch.no_grad():`
    // reaches this libtorch too.
    let outcome =
        tch::with_grad(|| trainer.run(&net, &vs, &mut optimizer, &data, meta.state.clone(), watcher, &mut save));
    let (history, test) = match outcome? {
        Outcome::Finished { history, test } => (history, test),
        Outcome::Stopped(state) => return Ok(RunEnd::Stopped { state, dir: run.dir }),
    };
    let last = history.last().context("training ran no epoch")?;
    let mut card = ModelCard::new(meta.model, meta.dataset, parameter_count(&vs), Some(config.seed), invocation);
    card.metrics = Some(CardMetrics {
        test_accuracy: test.accuracy(),
        test_loss: test.loss,
        test_correct: test.correct,
        test_total: test.total,
    });
    let wall_seconds = started.elapsed().as_secs_f64();
    card.training = Some(serde_json::json!({
        "recipe": config,
        // What the named recipe stood for when this ran: its changes to the default one.
        "named_recipe": {
            "name": config.recipe,
            "about": config.recipe.about(),
            "changes": serde_json::Map::from_iter(config.recipe.changes()),
        },
        "device": crate::device::name(device),
        "threads": tch::get_num_threads(),
        "train_seconds": last.seconds,
        "wall_seconds": wall_seconds,
        "epochs_run": history.len(),
        "resumed": resumed,
        "data": meta.data_dir.as_ref().map_or_else(|| meta.dataset.to_string(), |d| d.display().to_string()),
    }));
    let prefix = run.model_prefix();
    let check_inputs = data.test.inputs_range(0, crate::formats::export::CHECK_BATCH.min(data.test.len()));
    let card = crate::formats::export::export(&vs, &net, &card, &prefix, &check_inputs, false)?;
    Ok(RunEnd::Finished(Box::new(Trained { vs, net, card, history, test, prefix, wall_seconds })))
}

fn read_batch_order(path: &Path, train_len: i64) -> Result<Tensor> {
    let tensors =
        Tensor::read_safetensors(path).map_err(|e| anyhow::anyhow!("{}: cannot read ({e})", path.display()))?;
    let order = tensors
        .into_iter()
        .find_map(|(k, t)| (k == "order").then_some(t))
        .with_context(|| format!("{}: no tensor named `order`", path.display()))?;
    ensure!(
        order.dim() == 2 && order.kind() == Kind::Int64,
        "{}: `order` must be int64 [steps, batch], got {:?} {:?}",
        path.display(),
        order.kind(),
        order.size()
    );
    let (lo, hi) = (order.min().int64_value(&[]), order.max().int64_value(&[]));
    ensure!(
        lo >= 0 && hi < train_len,
        "{}: indices {lo}..={hi} outside the {train_len} training images",
        path.display()
    );
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_history_reads_back_as_written_and_bad_lines_are_named() {
        let dir = std::env::temp_dir().join(format!("lenet5-metrics-{}", std::process::id()));
        let run = RunDir::create(&dir).unwrap();
        let row = |epoch, test_accuracy| EpochMetrics {
            epoch,
            lr: 0.003,
            train_loss: 0.5,
            train_accuracy: 0.8,
            test_loss: Some(0.3),
            test_accuracy,
            seconds: 2.5 * epoch as f64,
        };
        let history = vec![row(1, None), row(2, Some(0.97))];
        run.write_metrics(&history).unwrap();
        assert_eq!(read_metrics(&dir.join(METRICS_FILE)).unwrap(), history);
        std::fs::write(dir.join(METRICS_FILE), "{\"epoch\": 1}\n").unwrap();
        let err = format!("{:#}", read_metrics(&dir.join(METRICS_FILE)).unwrap_err());
        assert!(err.contains("metrics.jsonl: line 1") && err.contains("missing field"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
