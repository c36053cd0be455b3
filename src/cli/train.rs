//! `lenet5 train`: the recipe's flags (their defaults are [`TrainConfig::DEFAULT`]), turned
//! into a [`RunPlan`] for [`lenet5::training::run::train`], with progress on the terminal and a clean
//! stop at Ctrl-C or SIGTERM.

use anyhow::{ensure, Context, Result};
use clap::Args;
use std::path::PathBuf;

use lenet5::model::{Arch, Head, ModelConfig};
use lenet5::training::checkpoint::CheckpointMeta;
use lenet5::training::optim::{Implementation, OptimizerConfig, OptimizerKind};
use lenet5::training::run::{self, RunEnd, RunPlan, Start, CHECKPOINT_FILE};
use lenet5::training::schedule::ScheduleKind;
use lenet5::training::{EpochMetrics, EpochProgress, TrainConfig, Watcher};

use super::interrupt::{Interrupted, StopRequest};
use super::progress::TerminalProgress;
use super::{DataArgs, EngineArgs, RuntimeArgs};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Passes over the training set.
    #[arg(long, default_value_t = TrainConfig::DEFAULT.epochs)]
    pub epochs: usize,
    /// Training batch size.
    #[arg(long, default_value_t = TrainConfig::DEFAULT.batch_size)]
    pub batch_size: i64,
    /// Evaluation batch size.
    #[arg(long, default_value_t = TrainConfig::DEFAULT.test_batch_size)]
    pub test_batch_size: i64,
    /// Learning rate (the peak rate for onecycle).
    #[arg(long, default_value_t = TrainConfig::DEFAULT.optimizer.lr)]
    pub lr: f64,
    /// The optimizer, as torch.optim's class of that name.
    #[arg(long, value_parser = super::named::<OptimizerKind>(OptimizerKind::NAMES), default_value_t = TrainConfig::DEFAULT.optimizer.kind)]
    pub optimizer: OptimizerKind,
    /// torch: torch.optim's algorithms op for op (bit-identical to PyTorch, state
    /// checkpointed); libtorch: tch's C++ optimizers (another op order, state not saved).
    #[arg(long, value_parser = super::named::<Implementation>(Implementation::NAMES), default_value_t = TrainConfig::DEFAULT.optimizer.implementation)]
    pub optimizer_impl: Implementation,
    /// SGD momentum.
    #[arg(long, default_value_t = TrainConfig::DEFAULT.optimizer.momentum)]
    pub momentum: f64,
    /// SGD dampening.
    #[arg(long, default_value_t = TrainConfig::DEFAULT.optimizer.dampening)]
    pub dampening: f64,
    /// SGD with Nesterov momentum.
    #[arg(long)]
    pub nesterov: bool,
    /// Adam's and AdamW's beta1 (OneCycleLR cycles it unless --no-cycle-momentum).
    #[arg(long, default_value_t = TrainConfig::DEFAULT.optimizer.betas.0)]
    pub beta1: f64,
    /// Adam's and AdamW's beta2.
    #[arg(long, default_value_t = TrainConfig::DEFAULT.optimizer.betas.1)]
    pub beta2: f64,
    /// Adam's and AdamW's eps.
    #[arg(long, default_value_t = TrainConfig::DEFAULT.optimizer.eps)]
    pub eps: f64,
    /// Adam's and AdamW's AMSGrad variant.
    #[arg(long)]
    pub amsgrad: bool,
    /// L2 penalty (sgd, adam) or decoupled weight decay (adamw).
    #[arg(long, default_value_t = TrainConfig::DEFAULT.optimizer.weight_decay)]
    pub weight_decay: f64,
    /// Learning-rate schedule, as torch.optim.lr_scheduler's class (docs/parity.md).
    #[arg(long, value_parser = super::named::<ScheduleKind>(ScheduleKind::NAMES), default_value_t = TrainConfig::DEFAULT.schedule)]
    pub schedule: ScheduleKind,
    /// Learning-rate factor per epoch for --schedule step.
    #[arg(long, default_value_t = TrainConfig::DEFAULT.gamma)]
    pub gamma: f64,
    /// Keep the momentum (SGD's, or Adam's beta1) fixed under --schedule onecycle, which
    /// otherwise cycles it between 0.95 and 0.85 as PyTorch's OneCycleLR does by default.
    #[arg(long)]
    pub no_cycle_momentum: bool,
    /// Random shifts of training images by up to this many pixels (0 = none).
    #[arg(long, default_value_t = TrainConfig::DEFAULT.shift)]
    pub shift: i64,
    #[command(flatten)]
    pub compute: EngineArgs,
    #[arg(long, value_parser = super::named::<Arch>(Arch::NAMES), default_value_t = ModelConfig::DEFAULT.arch)]
    pub arch: Arch,
    #[arg(long, value_parser = super::named::<Head>(Head::NAMES), default_value_t = ModelConfig::DEFAULT.head)]
    pub head: Head,
    #[command(flatten)]
    pub data: DataArgs,
    /// Random seed: a CPU run with the same seed and threads repeats exactly.
    #[arg(long, default_value_t = TrainConfig::DEFAULT.seed)]
    pub seed: i64,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Run folder for metrics and the model [default: runs/DATASET-ARCH-HEAD].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// A few batches of one epoch and a 1,000-image test, for smoke tests.
    #[arg(long)]
    pub dry_run: bool,
    /// Train on the first N training images only.
    #[arg(long, value_name = "N")]
    pub limit_train: Option<i64>,
    /// Start from these weights (safetensors) instead of a fresh initialisation.
    #[arg(long, value_name = "FILE")]
    pub init: Option<PathBuf>,
    /// Take batches from tensor `order` (int64 [steps, batch]) of this safetensors file
    /// instead of shuffling: one step per row, for parity checks against PyTorch.
    #[arg(long, value_name = "FILE")]
    pub batch_order: Option<PathBuf>,
    /// Also checkpoint every N optimizer steps (a checkpoint is always written at each epoch end).
    #[arg(long, value_name = "N")]
    pub checkpoint_every: Option<usize>,
    /// Continue an interrupted run with its saved recipe (the recipe flags here are ignored):
    /// a run folder, its checkpoint.safetensors, or a PyTorch training checkpoint (.pt, as
    /// `lenet5 torch-checkpoint` or scripts/train_reference --checkpoint write it; its run
    /// folder is --out). Weights, optimizer state, step, schedule, random streams and metrics
    /// carry over, so the run ends bit-identical to an uninterrupted one (with
    /// --optimizer-impl libtorch the optimizer's state restarts: tch cannot save it).
    #[arg(long, value_name = "DIR|FILE")]
    pub resume: Option<PathBuf>,
}

impl TrainArgs {
    /// The recipe these flags give, checked.
    fn config(&self) -> Result<TrainConfig> {
        let config = TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            test_batch_size: self.test_batch_size,
            optimizer: OptimizerConfig {
                kind: self.optimizer,
                implementation: self.optimizer_impl,
                lr: self.lr,
                momentum: self.momentum,
                dampening: self.dampening,
                nesterov: self.nesterov,
                betas: (self.beta1, self.beta2),
                eps: self.eps,
                weight_decay: self.weight_decay,
                amsgrad: self.amsgrad,
            },
            schedule: self.schedule,
            gamma: self.gamma,
            cycle_momentum: !self.no_cycle_momentum,
            shift: self.shift,
            seed: self.seed,
            limit_train: self.limit_train,
            dry_run: self.dry_run,
            engine: self.compute.engine,
        };
        config.validate()?;
        Ok(config)
    }
}

/// Shows a run on the terminal and stops it at SIGINT or SIGTERM.
struct TerminalWatcher {
    progress: TerminalProgress,
    stop: StopRequest,
}

impl Watcher for TerminalWatcher {
    fn progress(&mut self, progress: &EpochProgress) {
        self.progress.show(progress);
    }

    fn epoch_done(&mut self, metrics: &EpochMetrics, epochs: usize) {
        eprintln!("{}", metrics.line(epochs));
    }

    fn should_stop(&mut self) -> bool {
        self.stop.requested().is_some()
    }

    fn note(&mut self, note: &str) {
        eprintln!("note: {note}");
    }
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let device = args.runtime.apply()?;
    // A new run takes its recipe from the flags; a resumed one from its checkpoint.
    let mut plan = match &args.resume {
        Some(path) => {
            ensure!(
                args.init.is_none() && args.batch_order.is_none(),
                "--resume continues a run as it was; it takes no --init or --batch-order"
            );
            RunPlan::resume(path, args.out.clone())?
        }
        None => {
            let model = ModelConfig { arch: args.arch, head: args.head };
            let meta = CheckpointMeta::new(
                model,
                args.data.dataset,
                args.data.data.clone(),
                args.config()?,
                args.checkpoint_every,
            );
            let start = args.init.clone().map_or(Start::Fresh, Start::Init);
            RunPlan::new(meta, start, args.out.clone())?
        }
    };
    plan.batch_order = args.batch_order.clone();
    plan.invocation = std::env::args().collect();
    eprintln!("{}", plan.describe(device));
    let mut watcher = TerminalWatcher { progress: TerminalProgress::default(), stop: StopRequest::install()? };
    match run::train(plan, device, None, &mut watcher)? {
        RunEnd::Finished(trained) => {
            let (test, last) = (&trained.test, trained.history.last().context("training ran no epoch")?);
            println!(
                "test accuracy {:.2}% ({}/{}), loss {:.4}; trained in {:.1}s ({:.1}s wall); model: {}.{{pt2,onnx,safetensors,pt,json}}",
                100.0 * test.accuracy(),
                test.correct,
                test.total,
                test.loss,
                last.seconds,
                trained.wall_seconds,
                trained.prefix.display()
            );
            Ok(())
        }
        RunEnd::Stopped { state, dir } => {
            eprintln!(
                "stopped after step {} (epoch {}); checkpoint saved in {}\nresume with: lenet5 train --resume {}",
                state.step,
                state.epoch,
                dir.join(CHECKPOINT_FILE).display(),
                dir.display()
            );
            Err(Interrupted { exit_code: watcher.stop.requested().unwrap_or(130) }.into())
        }
    }
}
