//! `lenet5 train`: the recipe's flags (over a named recipe, `--recipe`, by default
//! [`TrainConfig::DEFAULT`]), turned into a [`RunPlan`] for [`lenet5::training::run::train`], with progress on the terminal and a clean
//! stop at Ctrl-C or SIGTERM.

use anyhow::{ensure, Context, Result};
use clap::Args;
use std::path::PathBuf;

use lenet5::model::{Arch, Head, ModelConfig};
use lenet5::training::checkpoint::CheckpointMeta;
use lenet5::training::optim::{Implementation, OptimizerConfig, OptimizerKind};
use lenet5::training::recipe::Recipe;
use lenet5::training::run::{self, RunEnd, RunPlan, Start, CHECKPOINT_FILE};
use lenet5::training::schedule::ScheduleKind;
use lenet5::training::{EpochMetrics, EpochProgress, Evaluate, TrainConfig, Watcher};

use super::interrupt::{Interrupted, StopRequest};
use super::progress::TerminalProgress;
use super::{DataArgs, EngineArgs, RuntimeArgs};

/// The recipe flags: each one given overrides the `--recipe`'s value ([`Recipe::config`]).
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The recipe the flags start from; a flag given overrides its value.
    #[arg(long, value_name = "NAME", value_parser = super::named::<Recipe>(Recipe::NAMES), default_value_t = Recipe::Default, long_help = recipes_help())]
    pub recipe: Recipe,
    /// Passes over the training set.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Training batch size.
    #[arg(long)]
    pub batch_size: Option<i64>,
    /// Evaluation batch size.
    #[arg(long)]
    pub test_batch_size: Option<i64>,
    /// When to evaluate on the test set: after every epoch, or only at the end.
    #[arg(long, value_parser = super::named::<Evaluate>(Evaluate::NAMES))]
    pub evaluate: Option<Evaluate>,
    /// Learning rate (the peak rate for onecycle).
    #[arg(long)]
    pub lr: Option<f64>,
    /// The optimizer, as torch.optim's class of that name.
    #[arg(long, value_parser = super::named::<OptimizerKind>(OptimizerKind::NAMES))]
    pub optimizer: Option<OptimizerKind>,
    /// torch: torch.optim's algorithms op for op (bit-identical to PyTorch, state
    /// checkpointed); libtorch: tch's C++ optimizers (another op order, state not saved).
    #[arg(long, value_parser = super::named::<Implementation>(Implementation::NAMES))]
    pub optimizer_impl: Option<Implementation>,
    /// SGD momentum.
    #[arg(long)]
    pub momentum: Option<f64>,
    /// SGD dampening.
    #[arg(long)]
    pub dampening: Option<f64>,
    /// SGD with Nesterov momentum.
    #[arg(long)]
    pub nesterov: bool,
    /// Adam's and AdamW's beta1 (OneCycleLR cycles it unless --no-cycle-momentum).
    #[arg(long)]
    pub beta1: Option<f64>,
    /// Adam's and AdamW's beta2.
    #[arg(long)]
    pub beta2: Option<f64>,
    /// Adam's and AdamW's eps.
    #[arg(long)]
    pub eps: Option<f64>,
    /// Adam's and AdamW's AMSGrad variant.
    #[arg(long)]
    pub amsgrad: bool,
    /// L2 penalty (sgd, adam) or decoupled weight decay (adamw).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Learning-rate schedule, as torch.optim.lr_scheduler's class (docs/parity.md).
    #[arg(long, value_parser = super::named::<ScheduleKind>(ScheduleKind::NAMES))]
    pub schedule: Option<ScheduleKind>,
    /// Learning-rate factor per epoch for --schedule step.
    #[arg(long)]
    pub gamma: Option<f64>,
    /// Keep the momentum (SGD's, or Adam's beta1) fixed under --schedule onecycle, which
    /// otherwise cycles it between 0.95 and 0.85 as PyTorch's OneCycleLR does by default.
    #[arg(long)]
    pub no_cycle_momentum: bool,
    /// Random shifts of training images by up to this many pixels (0 = none).
    #[arg(long)]
    pub shift: Option<i64>,
    #[command(flatten)]
    pub compute: EngineArgs,
    #[arg(long, value_parser = super::named::<Arch>(Arch::NAMES), default_value_t = ModelConfig::DEFAULT.arch)]
    pub arch: Arch,
    #[arg(long, value_parser = super::named::<Head>(Head::NAMES), default_value_t = ModelConfig::DEFAULT.head)]
    pub head: Head,
    #[command(flatten)]
    pub data: DataArgs,
    /// Random seed: a CPU run with the same seed and threads repeats exactly.
    #[arg(long)]
    pub seed: Option<i64>,
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

/// The flags that set a recipe's settings (`Recipe::changes`, or all of one): `--epochs 2
/// --lr 0.008`, booleans as bare flags, `cycle_momentum` off as `--no-cycle-momentum`.
pub fn recipe_flags(settings: &[(String, serde_json::Value)]) -> String {
    use serde_json::Value;
    let flags = settings.iter().filter_map(|(name, value)| {
        let flag = format!("--{}", name.replace('_', "-"));
        Some(match (name.as_str(), value) {
            ("cycle_momentum", Value::Bool(on)) => (!on).then(|| "--no-cycle-momentum".to_string())?,
            (_, Value::Bool(on)) => on.then_some(flag)?,
            (_, Value::Null) => return None,
            ("betas", Value::Array(b)) if b.len() == 2 => format!("--beta1 {} --beta2 {}", b[0], b[1]),
            (_, Value::String(s)) => format!("{flag} {s}"),
            (_, v) => format!("{flag} {v}"),
        })
    });
    flags.collect::<Vec<_>>().join(" ")
}

/// `--recipe`'s long help: every recipe with its flags.
fn recipes_help() -> String {
    let mut help = String::from(
        "The recipe the flags start from; a flag given overrides its value, and a flag not given takes the \
         recipe's (a resumed run keeps its saved recipe). The recipes:",
    );
    for &r in Recipe::ALL {
        let flags = match r {
            Recipe::Default => recipe_flags(&default_settings()),
            _ => format!("the default's with {}", recipe_flags(&r.changes())),
        };
        help += &format!("\n\n{r}: {}.\n  {flags}", r.about());
    }
    help
}

/// Every setting of the default recipe that a flag sets, as (name, value).
fn default_settings() -> Vec<(String, serde_json::Value)> {
    let skip = ["recipe", "engine", "limit_train", "dry_run"]; // their own flags, not a recipe's
    match serde_json::to_value(TrainConfig::DEFAULT) {
        Ok(serde_json::Value::Object(fields)) => {
            fields.into_iter().filter(|(k, _)| !skip.contains(&k.as_str())).collect()
        }
        _ => unreachable!("a TrainConfig serialises as an object"),
    }
}

impl TrainArgs {
    /// The recipe these flags give: `--recipe`'s settings, each flag given overriding one, checked.
    fn config(&self) -> Result<TrainConfig> {
        let r = self.recipe.config();
        let o = r.optimizer;
        let config = TrainConfig {
            recipe: self.recipe,
            epochs: self.epochs.unwrap_or(r.epochs),
            batch_size: self.batch_size.unwrap_or(r.batch_size),
            test_batch_size: self.test_batch_size.unwrap_or(r.test_batch_size),
            optimizer: OptimizerConfig {
                kind: self.optimizer.unwrap_or(o.kind),
                implementation: self.optimizer_impl.unwrap_or(o.implementation),
                lr: self.lr.unwrap_or(o.lr),
                momentum: self.momentum.unwrap_or(o.momentum),
                dampening: self.dampening.unwrap_or(o.dampening),
                nesterov: self.nesterov || o.nesterov,
                betas: (self.beta1.unwrap_or(o.betas.0), self.beta2.unwrap_or(o.betas.1)),
                eps: self.eps.unwrap_or(o.eps),
                weight_decay: self.weight_decay.unwrap_or(o.weight_decay),
                amsgrad: self.amsgrad || o.amsgrad,
            },
            schedule: self.schedule.unwrap_or(r.schedule),
            gamma: self.gamma.unwrap_or(r.gamma),
            cycle_momentum: !self.no_cycle_momentum && r.cycle_momentum,
            shift: self.shift.unwrap_or(r.shift),
            seed: self.seed.unwrap_or(r.seed),
            limit_train: self.limit_train.or(r.limit_train),
            dry_run: self.dry_run || r.dry_run,
            evaluate: self.evaluate.unwrap_or(r.evaluate),
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The recipe `lenet5 train ARGS` runs.
    fn config(args: &[&str]) -> TrainConfig {
        let cli = super::super::Cli::try_parse_from(["lenet5", "train"].iter().chain(args)).unwrap();
        match cli.command {
            super::super::Command::Train(train) => train.config().unwrap(),
            _ => unreachable!("a train command line"),
        }
    }

    fn json(c: &TrainConfig) -> serde_json::Value {
        serde_json::to_value(c).unwrap()
    }

    /// docs/training.md's recipe table: each row's name and flags (the first `--...` code span).
    fn documented() -> Vec<(String, String)> {
        let docs = std::fs::read_to_string("docs/training.md").unwrap();
        let table = docs.split("## Recipes").nth(1).expect("a Recipes section").split("\n## ").next().unwrap();
        let rows = table.lines().filter(|l| l.starts_with("| `"));
        rows.map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let code = |cell: &str| cell.split('`').nth(1).unwrap_or_default().to_string();
            (code(cells[1]), code(cells[2]))
        })
        .collect()
    }

    #[test]
    fn each_recipe_resolves_to_the_flags_the_docs_and_help_list() {
        let docs = documented();
        assert_eq!(docs.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>(), Recipe::NAMES);
        for (name, flags) in &docs {
            let recipe: Recipe = name.parse().unwrap();
            let expected = match recipe {
                Recipe::Default => recipe_flags(&default_settings()),
                _ => recipe_flags(&recipe.changes()),
            };
            assert_eq!(flags, &expected, "docs/training.md's flags for {name} are not --help's");
            let by_name = config(&["--recipe", name]);
            let by_flags = config(&flags.split_whitespace().collect::<Vec<_>>());
            assert_eq!(by_name.recipe, recipe);
            assert_eq!(json(&TrainConfig { recipe, ..by_flags }), json(&by_name), "{name}: {flags}");
            assert_eq!(json(&by_name), json(&recipe.config()));
        }
        assert!(recipes_help().contains(&format!("fast: {}", Recipe::Fast.about())));
    }

    #[test]
    fn flags_given_override_the_recipe_and_the_rest_keep_its_values() {
        let fast = Recipe::Fast.config();
        let c = config(&["--recipe", "fast", "--epochs", "5", "--evaluate", "every-epoch", "--seed", "4"]);
        assert_eq!((c.recipe, c.epochs, c.evaluate, c.seed), (Recipe::Fast, 5, Evaluate::EveryEpoch, 4));
        assert_eq!(
            json(&TrainConfig { epochs: fast.epochs, evaluate: fast.evaluate, seed: fast.seed, ..c }),
            json(&fast)
        );
        assert_eq!(json(&config(&[])), json(&TrainConfig::DEFAULT));
        let c = config(&["--no-cycle-momentum", "--beta2", "0.99", "--amsgrad"]);
        assert!(!c.cycle_momentum && c.optimizer.amsgrad && c.optimizer.betas == (0.9, 0.99));
    }
}
