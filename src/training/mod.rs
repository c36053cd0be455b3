//! Training LeNet-5 as torch.optim would: the loop (one, for either engine), its optimizers
//! and schedules, checkpoints, and the run folder that ties them together.

pub mod checkpoint;
mod fused;
pub mod optim;
pub mod recipe;
pub mod run;
pub mod schedule;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::time::Instant;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::check_setting;
use crate::data::{Dataset, Splits};
use crate::direct::{DirectTraining, LentThreads};
use crate::inference::evaluate::{evaluate, Metrics};
use crate::inference::Engine;
use crate::model::{Head, LeNet5, ModelConfig};
use crate::training::optim::{Implementation, Optimizer, OptimizerConfig, OptimizerKind};
use crate::training::recipe::Recipe;
use crate::training::schedule::{Schedule, ScheduleKind, ScheduleState};
use crate::values;

/// A validated training recipe (the CLI's flags after checking), saved with the model.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The named recipe these settings started from (explicit settings override it).
    #[serde(default)]
    pub recipe: Recipe,
    pub epochs: usize,
    pub batch_size: i64,
    pub test_batch_size: i64,
    /// The optimizer and its settings, saved flat beside the rest (`"optimizer": "adamw"`, `"lr"`, ...).
    #[serde(flatten)]
    pub optimizer: OptimizerConfig,
    pub schedule: ScheduleKind,
    pub gamma: f64,
    /// OneCycleLR's `cycle_momentum` (PyTorch's default: on).
    #[serde(default = "yes")]
    pub cycle_momentum: bool,
    /// Random shifts of up to this many pixels in x and y applied to training images.
    pub shift: i64,
    pub seed: i64,
    /// Use only the first N training images.
    pub limit_train: Option<i64>,
    /// A few batches and a small test set, for smoke tests.
    pub dry_run: bool,
    /// When the test set is evaluated: after every epoch, or once at the end.
    #[serde(default)]
    pub evaluate: Evaluate,
    /// What computes the gradients: libtorch's autograd (bit-identical to PyTorch) or the
    /// direct engine's loops (the same recipe, different rounding).
    #[serde(default)]
    pub engine: Engine,
}

fn yes() -> bool {
    true
}

/// When a run measures its test accuracy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Evaluate {
    /// After every epoch: the history has each epoch's test metrics.
    #[default]
    EveryEpoch,
    /// Once, after the last epoch: the others' evaluation time goes to nothing.
    End,
}

crate::named_values!(Evaluate { EveryEpoch => "every-epoch", End => "end" });

impl TrainConfig {
    /// The recipe of a plain `lenet5 train` and of `lenet5.train()`: torch.optim's AdamW under
    /// OneCycleLR for 8 epochs (docs/training.md).
    pub const DEFAULT: TrainConfig = TrainConfig {
        recipe: Recipe::Default,
        epochs: 8,
        batch_size: 128,
        test_batch_size: 1000,
        optimizer: OptimizerConfig {
            kind: OptimizerKind::Adamw,
            implementation: Implementation::Torch,
            lr: 3e-3,
            momentum: 0.9,
            dampening: 0.0,
            nesterov: false,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-4,
            amsgrad: false,
        },
        schedule: ScheduleKind::Onecycle,
        gamma: 0.7,
        cycle_momentum: true,
        shift: 0,
        seed: 1,
        limit_train: None,
        dry_run: false,
        evaluate: Evaluate::EveryEpoch,
        engine: Engine::Libtorch,
    };

    /// Epochs a run of this recipe trains: one for a dry run or a given batch order (which
    /// holds every step), else `epochs`.
    pub fn epochs_run(&self, batch_order: bool) -> usize {
        if batch_order || self.dry_run {
            1
        } else {
            self.epochs
        }
    }

    /// Checks every setting before any work starts, naming the one at fault.
    pub fn validate(&self) -> Result<()> {
        check_setting!(self.epochs > 0, "epochs", self.epochs, "must be at least 1");
        check_setting!(self.batch_size > 0, "batch_size", self.batch_size, "must be at least 1");
        check_setting!(self.test_batch_size > 0, "test_batch_size", self.test_batch_size, "must be at least 1");
        self.optimizer.validate()?;
        check_setting!(self.gamma > 0.0, "gamma", self.gamma, "must be positive");
        check_setting!(
            !(self.optimizer.implementation == Implementation::Libtorch
                && self.schedule == ScheduleKind::Onecycle
                && self.cycle_momentum),
            "optimizer_impl",
            self.optimizer.implementation,
            "cannot cycle the momentum as the onecycle schedule does; turn cycle_momentum off"
        );
        check_setting!((0..=4).contains(&self.shift), "shift", self.shift, "must be between 0 and 4 pixels");
        if let Some(n) = self.limit_train {
            check_setting!(n > 0, "limit_train", n, "must be at least 1");
        }
        Ok(())
    }
}

/// Batches of a dry run, and the size of its test set.
const DRY_RUN_BATCHES: usize = 5;
const DRY_RUN_TEST: i64 = 1000;

/// One row of the metrics history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_accuracy: f64,
    /// The test set's loss and accuracy; None for an epoch not evaluated ([`Evaluate::End`]).
    pub test_loss: Option<f64>,
    pub test_accuracy: Option<f64>,
    /// Training time so far, evaluation excluded.
    pub seconds: f64,
}

impl EpochMetrics {
    /// The one line a run prints after each of its `epochs` epochs.
    pub fn line(&self, epochs: usize) -> String {
        let test = match (self.test_loss, self.test_accuracy) {
            (Some(loss), Some(accuracy)) => format!("test loss {loss:.4} acc {:.2}%", 100.0 * accuracy),
            _ => "not tested".to_string(),
        };
        format!(
            "epoch {:>2}/{epochs}  train loss {:.4} acc {:.2}%  {test}  lr {:.2e}  {:.1}s",
            self.epoch,
            self.train_loss,
            100.0 * self.train_accuracy,
            self.lr,
            self.seconds
        )
    }
}

/// Shifts each image of `xs` `(B, 1, H, W)` by its own random offset of up to `max` pixels
/// in x and y, filling with `background`: the small distortions of the 1998 paper.
pub fn random_shift(xs: &Tensor, max: i64, background: f64) -> Tensor {
    let (b, device) = (xs.size()[0], xs.device());
    // Each image reads the window starting at its own offset in 0..=2*max: rows', then columns'.
    let dy = Tensor::randint(2 * max + 1, [b, 1], (Kind::Int64, device)); // (B, 1)
    let dx = Tensor::randint(2 * max + 1, [b, 1], (Kind::Int64, device)); // (B, 1)
    if device == Device::Cpu && xs.kind() == Kind::Float {
        shift_by_loops(xs, &dy, &dx, max, background)
    } else {
        shift_by_indexing(xs, &dy, &dx, max, background)
    }
}

/// The shift as tensor ops, on any device: an index into the image padded with `background`.
fn shift_by_indexing(xs: &Tensor, dy: &Tensor, dx: &Tensor, max: i64, background: f64) -> Tensor {
    let (b, h, w) = (xs.size()[0], xs.size()[2], xs.size()[3]);
    let device = xs.device();
    let padded = Tensor::full([b, h + 2 * max, w + 2 * max], background, (xs.kind(), device)); // (B, H+2m, W+2m)
    padded.narrow(1, max, h).narrow(2, max, w).copy_(&xs.squeeze_dim(1));
    let rows = (dy + Tensor::arange(h, (Kind::Int64, device)).view([1, h])).view([b, h, 1]); // (B, H, 1)
    let cols = (dx + Tensor::arange(w, (Kind::Int64, device)).view([1, w])).view([b, 1, w]); // (B, 1, W)
    let batch = Tensor::arange(b, (Kind::Int64, device)).view([b, 1, 1]);
    padded.index(&[Some(batch), Some(rows), Some(cols)]).unsqueeze(1) // (B, 1, H, W)
}

/// The same shift as plain loops over float32 pixels on the CPU, bit for bit (it only moves
/// values and fills with `background` rounded to float32 as `Tensor::full` rounds it): a row's
/// pixels that stay in the image move as one copy, while libtorch's index kernel would take
/// each pixel on the one thread the direct engine leaves it.
fn shift_by_loops(xs: &Tensor, dy: &Tensor, dx: &Tensor, max: i64, background: f64) -> Tensor {
    let size = xs.size();
    let (h, w, max) = (size[2] as usize, size[3] as usize, max as usize);
    let (xs, dy, dx) = (xs.contiguous(), dy.contiguous(), dx.contiguous());
    let background = background as f32;
    let mut out = Tensor::empty(size.as_slice(), (Kind::Float, Device::Cpu)); // every pixel written next
    let offsets = values::of::<i64>(&dy).iter().zip(values::of::<i64>(&dx));
    let images =
        values::of::<f32>(&xs).chunks_exact(h * w).zip(values::of_mut::<f32>(&mut out).chunks_exact_mut(h * w));
    for ((image, shifted), (&dy, &dx)) in images.zip(offsets) {
        // Output (y, x) reads input (y + dy - max, x + dx - max) where that lies in the image:
        // columns `from_x..to_x` of the output's rows; the rest is background.
        let (dy, dx) = (dy as usize, dx as usize);
        let to_x = (w + max).saturating_sub(dx).min(w);
        let from_x = max.saturating_sub(dx).min(to_x);
        for (y, row) in shifted.chunks_exact_mut(w).enumerate() {
            let Some(from_y) = (y + dy).checked_sub(max).filter(|&r| r < h) else {
                row.fill(background);
                continue;
            };
            row[..from_x].fill(background);
            if from_x < to_x {
                let start = from_y * w + from_x + dx - max;
                row[from_x..to_x].copy_from_slice(&image[start..start + to_x - from_x]);
            }
            row[to_x..].fill(background);
        }
    }
    out
}

/// Where a run stands between two steps: with the model's weights and the optimizer's state,
/// enough to continue it exactly. Saved in checkpoints.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// The epoch in progress, from 1.
    pub epoch: usize,
    /// Batches of that epoch already trained on.
    pub batch: usize,
    /// Optimizer steps taken in the whole run.
    pub step: usize,
    /// Running sums of the epoch in progress, for its train loss and accuracy.
    pub epoch_loss_sum: f64,
    pub epoch_correct: i64,
    pub epoch_seen: i64,
    /// Training seconds of the finished epochs.
    pub seconds: f64,
    pub history: Vec<EpochMetrics>,
    /// The learning-rate schedule's position and values; None before the first step.
    pub schedule: Option<ScheduleState>,
    /// Optimizer steps the whole run takes: the schedule's length.
    #[serde(default)]
    pub total_steps: usize,
}

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    /// Every epoch trained: the history, and the final model's metrics on the whole test set.
    Finished { history: Vec<EpochMetrics>, test: Metrics },
    /// A stop was requested (a signal); the state was checkpointed.
    Stopped(TrainState),
}

/// What the caller sees and steers while a run trains: the CLI shows a terminal bar and
/// listens for signals, the Python binding updates a notebook bar and checks for
/// KeyboardInterrupt, the benchmarks clock steps.
pub trait Watcher {
    /// Called at the start of each epoch, every 20 batches and at the epoch's last batch.
    fn progress(&mut self, _progress: &EpochProgress) {}
    /// Called with each finished epoch's metrics (of `epochs`), before its checkpoint.
    fn epoch_done(&mut self, _metrics: &EpochMetrics, _epochs: usize) {}
    /// Asked after every step; true stops the run at the next checkpoint.
    fn should_stop(&mut self) -> bool {
        false
    }
    /// Something the run noticed that the user may want to know, one line.
    fn note(&mut self, _note: &str) {}
}

/// Where a run's checkpoints go: called with the state after every `checkpoint_every` steps,
/// at the end of each epoch (after its evaluation) and before stopping. The model's weights
/// and the optimizer's state are those of the state.
pub type CheckpointSink<'a> = dyn FnMut(&TrainState, &Optimizer) -> Result<()> + 'a;

/// A checkpoint sink that keeps nothing, for tests and benchmarks.
pub fn no_checkpoints(_: &TrainState, _: &Optimizer) -> Result<()> {
    Ok(())
}

/// A watcher that sees nothing and never stops the run.
pub struct Unwatched;
impl Watcher for Unwatched {}

/// How far the epoch in progress has got: images seen of `total`, and the running means.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EpochProgress {
    pub epoch: usize,
    pub epochs: usize,
    pub seen: u64,
    pub total: u64,
    pub loss: f64,
    pub accuracy: f64,
}

/// The random stream of epoch `epoch` (its shuffle: stream 1) and of step `step` (its
/// augmentation: stream 2) are seeded from the run's seed alone, so a run resumed from any
/// step replays them. `lenet5_ref.stream_seed` is the same function in Python.
pub fn stream_seed(seed: i64, stream: u64, index: usize) -> i64 {
    // SplitMix64 of (seed, stream, index): well-spread seeds for neighbouring indices.
    let mut z =
        (seed as u64) ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (index as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as i64 & i64::MAX
}

/// Refuses to go on (and so to checkpoint) once a weight is NaN or infinite, which a
/// finite loss can hide for one step; the last checkpoint then stays the last good one.
fn check_finite(vs: &nn::VarStore, state: &TrainState, lr: f64) -> Result<()> {
    let bad = vs.variables().into_iter().find(|(_, t)| t.isfinite().all().int64_value(&[]) == 0);
    match bad {
        None => Ok(()),
        Some((name, _)) => bail!(
            "{name} became NaN or infinite by step {} (learning rate {lr:.3e}); the run folder keeps \
             the last good checkpoint; try a lower lr",
            state.step
        ),
    }
}

/// What computes a training step's gradients ([`TrainConfig::engine`]): libtorch's autograd
/// through the model, or the direct engine's loops. Either way the same optimizer steps.
enum Gradients<'m> {
    Autograd(&'m LeNet5),
    Direct(DirectTraining),
}

impl Gradients<'_> {
    /// Trains on one batch: its logits and mean loss, after the optimizer's step.
    fn step(
        &mut self,
        vs: &nn::VarStore,
        opt: &mut Optimizer,
        head: Head,
        xs: &Tensor,
        ys: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        match self {
            Gradients::Autograd(model) => {
                let logits = model.forward(xs); // (B, 10)
                let loss = head.loss(&logits, ys);
                opt.backward_step(&loss)?;
                Ok((logits, loss))
            }
            Gradients::Direct(direct) => {
                let step = direct.step(vs, xs, ys)?;
                opt.step_flat(step.gradient)?;
                Ok((step.logits, step.loss))
            }
        }
    }

    /// The model's metrics on `data`, computed by the same engine.
    fn evaluate(&mut self, vs: &nn::VarStore, head: Head, data: &Dataset, batch_size: i64) -> Result<Metrics> {
        match self {
            Gradients::Autograd(model) => evaluate(&|xs: &Tensor| Ok(model.forward(xs)), head, data, batch_size),
            Gradients::Direct(direct) => {
                let net = direct.net(vs)?;
                evaluate(&|xs: &Tensor| net.forward(xs), head, data, batch_size)
            }
        }
    }
}

/// What drives one training run, besides the model and the data.
pub struct Trainer<'a> {
    pub config: &'a TrainConfig,
    pub head: Head,
    /// The normalised value of a blank pixel, used to fill shifted-in borders.
    pub background: f64,
    /// Batches as rows of training-set indices, replacing the shuffled epochs (parity checks).
    pub batch_order: Option<Tensor>,
    /// Also checkpoint every this many steps (besides every epoch end).
    pub checkpoint_every: Option<usize>,
}

impl Trainer<'_> {
    /// The optimizer of this recipe over `model`'s parameters, with a fresh state.
    pub fn optimizer(&self, model: &LeNet5, vs: &nn::VarStore) -> Result<Optimizer> {
        Optimizer::new(self.config.optimizer, vs, model.parameters())
    }

    /// Index tensors of each batch of `epoch`.
    fn batches(&self, epoch: usize, train_len: i64, device: Device) -> Vec<Tensor> {
        if let Some(order) = &self.batch_order {
            return (0..order.size()[0]).map(|i| order.get(i).to_device(device)).collect();
        }
        tch::manual_seed(stream_seed(self.config.seed, 1, epoch));
        let perm = Tensor::randperm(train_len, (Kind::Int64, device));
        let mut batches: Vec<Tensor> = perm.split(self.config.batch_size, 0);
        if self.config.dry_run {
            batches.truncate(DRY_RUN_BATCHES);
        }
        batches
    }

    fn steps_per_epoch(&self, train_len: i64) -> usize {
        match &self.batch_order {
            Some(order) => order.size()[0] as usize,
            None if self.config.dry_run => DRY_RUN_BATCHES,
            None => (train_len as usize).div_ceil(self.config.batch_size as usize),
        }
    }

    /// Number of epochs this run trains for.
    pub fn epochs(&self) -> usize {
        self.config.epochs_run(self.batch_order.is_some())
    }

    /// Trains `model` (whose variables live in `vs`) with `opt` (from [`Self::optimizer`],
    /// its state restored when resuming) on `data.train` from `state` (the default state for
    /// a new run), evaluating on `data.test` after every epoch or only the last
    /// ([`TrainConfig::evaluate`]), with the engine that trains.
    #[expect(
        clippy::too_many_arguments,
        reason = "each is the caller's own: the model, its weights, optimizer, data and state, and its two hooks"
    )]
    pub fn run(
        &self,
        model: &LeNet5,
        vs: &nn::VarStore,
        opt: &mut Optimizer,
        data: &Splits,
        mut state: TrainState,
        watcher: &mut dyn Watcher,
        checkpoint: &mut CheckpointSink,
    ) -> Result<Outcome> {
        let c = self.config;
        let train = data.train.take(c.limit_train.unwrap_or(i64::MAX));
        let test = data.test.take(if c.dry_run { DRY_RUN_TEST } else { i64::MAX });
        let epochs = self.epochs();
        let steps_per_epoch = self.steps_per_epoch(train.len());
        let schedule = Schedule {
            kind: c.schedule,
            base_lr: c.optimizer.lr,
            gamma: c.gamma,
            total_steps: steps_per_epoch * epochs,
            cycle_momentum: c.cycle_momentum,
        };
        let mut position = state.schedule.unwrap_or_else(|| schedule.start(opt.hyper));
        state.total_steps = schedule.total_steps;
        let (mut gradients, _lent) = match c.engine {
            Engine::Libtorch => (Gradients::Autograd(model), None),
            Engine::Direct => {
                if !(opt.config().implementation == Implementation::Torch) {
                    anyhow::bail!(crate::setting::invalid(
                        "optimizer_impl",
                        "libtorch",
                        "the direct engine steps with torch.optim's algorithms; use optimizer_impl = torch"
                    ));
                }
                opt.flatten()?;
                let config = ModelConfig { head: self.head, ..model.config };
                let direct = DirectTraining::new(vs, config, LentThreads::available())?;
                (Gradients::Direct(direct), Some(LentThreads::lend()))
            }
        };
        state.epoch = state.epoch.max(1);
        let mut stop_after_epoch = false;
        let mut final_test = None;
        while state.epoch <= epochs {
            let epoch = state.epoch;
            let started = Instant::now();
            let batches = self.batches(epoch, train.len(), vs.device());
            let images: u64 = batches.iter().map(|b| b.size()[0] as u64).sum();
            let report = |watcher: &mut dyn Watcher, state: &TrainState| {
                let seen = state.epoch_seen.max(1) as f64;
                let (loss, accuracy) = (state.epoch_loss_sum / seen, state.epoch_correct as f64 / seen);
                watcher.progress(&EpochProgress {
                    epoch,
                    epochs,
                    seen: state.epoch_seen as u64,
                    total: images,
                    loss,
                    accuracy,
                });
            };
            report(watcher, &state);
            let device = vs.device();
            let mut loss_sum = Tensor::from(state.epoch_loss_sum).to_device(device);
            let mut correct = Tensor::from(state.epoch_correct).to_device(device);
            let mut lr = position.hyper.lr;
            let sync = |state: &mut TrainState, loss_sum: &Tensor, correct: &Tensor, lr: f64| -> Result<()> {
                // Reading values back synchronises with the device, so only now and then.
                state.epoch_loss_sum = loss_sum.double_value(&[]);
                state.epoch_correct = correct.int64_value(&[]);
                let loss = state.epoch_loss_sum / state.epoch_seen.max(1) as f64;
                if !loss.is_finite() {
                    bail!(
                        "the training loss became {loss} by step {} (learning rate {lr:.3e}); the run \
                         folder keeps the last good checkpoint; try a lower lr",
                        state.step
                    );
                }
                Ok(())
            };
            for idx in &batches[state.batch..] {
                lr = position.hyper.lr;
                opt.hyper = position.hyper;
                let mut xs = train.inputs(idx); // (B, 1, 32, 32)
                let ys = train.labels.index_select(0, idx); // (B,)
                if c.shift > 0 {
                    tch::manual_seed(stream_seed(c.seed, 2, state.step));
                    xs = random_shift(&xs, c.shift, self.background);
                }
                let (logits, loss) = gradients.step(vs, opt, self.head, &xs, &ys)?; // (B, 10), ()
                if schedule.per_batch() {
                    schedule.step(&mut position);
                }
                state.schedule = Some(position);
                let b = idx.size()[0];
                tch::no_grad(|| {
                    loss_sum += loss.detach().to_kind(Kind::Double) * b as f64;
                    correct += logits.argmax(-1, false).eq_tensor(&ys).sum(Kind::Int64);
                });
                state.epoch_seen += b;
                state.step += 1;
                state.batch += 1;
                let at_checkpoint = self.checkpoint_every.is_some_and(|n| state.step.is_multiple_of(n));
                let stopping = watcher.should_stop();
                if state.batch.is_multiple_of(20) || state.batch == batches.len() || at_checkpoint || stopping {
                    sync(&mut state, &loss_sum, &correct, lr)?;
                    report(watcher, &state);
                }
                // A stop at an epoch's last batch waits for the epoch's end (its evaluation and
                // per-epoch schedule step), so a stopped run is mid-epoch or between epochs, never
                // at an epoch's end with its bookkeeping undone: one state, as PyTorch's loop saves it.
                stop_after_epoch |= stopping && state.batch == batches.len();
                if stopping && !stop_after_epoch {
                    state.seconds += started.elapsed().as_secs_f64();
                    check_finite(vs, &state, lr)?;
                    checkpoint(&state, opt)?;
                    return Ok(Outcome::Stopped(state));
                }
                if at_checkpoint && state.batch < batches.len() {
                    check_finite(vs, &state, lr)?;
                    checkpoint(
                        &TrainState { seconds: state.seconds + started.elapsed().as_secs_f64(), ..state.clone() },
                        opt,
                    )?;
                }
            }
            sync(&mut state, &loss_sum, &correct, lr)?;
            state.seconds += started.elapsed().as_secs_f64();
            let last = epoch == epochs;
            let test_metrics = match c.evaluate == Evaluate::EveryEpoch || last {
                true => Some(gradients.evaluate(vs, self.head, &test, c.test_batch_size)?),
                false => None,
            };
            if last && test.len() == data.test.len() {
                final_test.clone_from(&test_metrics);
            }
            let seen = state.epoch_seen.max(1) as f64;
            let row = EpochMetrics {
                epoch,
                lr,
                train_loss: state.epoch_loss_sum / seen,
                train_accuracy: state.epoch_correct as f64 / seen,
                test_loss: test_metrics.as_ref().map(|m| m.loss),
                test_accuracy: test_metrics.as_ref().map(Metrics::accuracy),
                seconds: state.seconds,
            };
            watcher.epoch_done(&row, epochs);
            state.history.push(row);
            if !schedule.per_batch() {
                schedule.step(&mut position); // after the epoch's evaluation, as PyTorch's MNIST example
            }
            state = TrainState {
                epoch: epoch + 1,
                step: state.step,
                seconds: state.seconds,
                history: state.history,
                schedule: Some(position),
                total_steps: schedule.total_steps,
                ..Default::default()
            };
            check_finite(vs, &state, lr)?;
            checkpoint(&state, opt)?;
            if stop_after_epoch && state.epoch <= epochs {
                return Ok(Outcome::Stopped(state));
            }
        }
        // The last epoch's evaluation when it saw the whole test set, else one now.
        let test = match final_test {
            Some(test) => test,
            None => gradients.evaluate(vs, self.head, &data.test, c.test_batch_size)?,
        };
        Ok(Outcome::Finished { history: state.history, test })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NUM_CLASSES;

    #[test]
    fn random_shift_moves_each_image_by_at_most_max_and_keeps_its_pixels() {
        tch::manual_seed(0);
        let xs = Tensor::full([64, 1, 8, 8], -1.0, (Kind::Float, Device::Cpu));
        let _ = xs.narrow(2, 3, 2).narrow(3, 3, 2).fill_(5.0); // a 2x2 dot in the middle
        let shifted = random_shift(&xs, 2, -1.0);
        assert_eq!(shifted.size(), [64, 1, 8, 8]);
        let mut offsets = std::collections::BTreeSet::new();
        for i in 0..64 {
            let img = shifted.get(i).squeeze();
            // The dot is whole (4 pixels) and everything else is background.
            assert_eq!(img.eq(5.0).sum(Kind::Int64).int64_value(&[]), 4);
            assert_eq!(img.eq(-1.0).sum(Kind::Int64).int64_value(&[]), 60);
            let at = img.eq(5.0).nonzero().get(0);
            let (y, x) = (at.int64_value(&[0]), at.int64_value(&[1]));
            assert!((1..=5).contains(&y) && (1..=5).contains(&x), "dot moved to ({y}, {x})");
            offsets.insert((y, x));
        }
        assert!(offsets.len() > 5, "shifts should vary between images: {offsets:?}");
    }

    #[test]
    fn the_shift_by_loops_is_the_shift_by_indexing_bit_for_bit() {
        tch::manual_seed(5);
        let xs = Tensor::randn([37, 1, 32, 32], (Kind::Float, Device::Cpu));
        for max in [1, 2, 4] {
            let dy = Tensor::randint(2 * max + 1, [37, 1], (Kind::Int64, Device::Cpu));
            let dx = Tensor::randint(2 * max + 1, [37, 1], (Kind::Int64, Device::Cpu));
            let background = -0.1307 / 0.3081;
            let by_loops = shift_by_loops(&xs, &dy, &dx, max, background);
            let by_indexing = shift_by_indexing(&xs, &dy, &dx, max, background);
            assert_eq!(by_loops.size(), [37, 1, 32, 32]);
            let bits =
                |t: &Tensor| Vec::<f32>::try_from(t.view(-1)).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert!(bits(&by_loops) == bits(&by_indexing), "max {max}");
        }
    }

    #[test]
    fn evaluate_counts_the_confusion_matrix() {
        // A "model" that predicts the first pixel's value as the class.
        let images = Tensor::from_slice(&[3f32, 3.0, 7.0, 1.0]).view([4, 1, 1, 1]);
        let labels = Tensor::from_slice(&[3i64, 5, 7, 1]);
        let data = Dataset::of_inputs(images, labels);
        let forward = |xs: &Tensor| -> Result<Tensor> {
            Ok(xs.view([-1]).to_kind(Kind::Int64).one_hot(NUM_CLASSES).to_kind(Kind::Float))
        };
        let m = evaluate(&forward, Head::Softmax, &data, 3).unwrap();
        assert_eq!((m.correct, m.total), (3, 4));
        assert_eq!(m.confusion[5][3], 1);
        assert_eq!(m.confusion[3][3], 1);
        assert_eq!(m.confusion.iter().flatten().sum::<i64>(), 4);
        assert_eq!(m.per_class_accuracy()[5], 0.0);
        assert_eq!(m.per_class_accuracy()[7], 1.0);
    }
}
