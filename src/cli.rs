//! The command line: clap flags, validated into the library's configs, then the work.
//! Flag names follow PyTorch's MNIST example where one exists.

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Device, Tensor};

use crate::card::{CardMetrics, ModelCard};
use crate::data::{self, DatasetKind};
use crate::model::{parameter_count, Arch, Head, LeNet5, ModelConfig};
use crate::checkpoint::{self, CheckpointMeta};
use crate::interrupt::{Interrupted, StopRequest};
use crate::run::{RunDir, RunObserver, CHECKPOINT_FILE};
use crate::schedule::ScheduleKind;
use crate::optim::{Implementation, OptimizerConfig, OptimizerKind};
use crate::serve::ServeConfig;
use crate::train::{self, Outcome, TrainConfig, Trainer};
use crate::weights::{self, Classifier, Engine, KeyMap, LoadOptions};

#[derive(Parser, Debug)]
#[command(name = "lenet5", version, about = "LeNet-5 on libtorch: train on MNIST, evaluate, export to PyTorch")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train LeNet-5, evaluating after every epoch; saves and exports the model into --out.
    Train(TrainArgs),
    /// Accuracy, loss, per-class accuracy and the confusion matrix of a model on the test set.
    Eval(EvalArgs),
    /// Write NAME.pt (TorchScript), NAME.safetensors, NAME.check.safetensors and NAME.json.
    Export(ExportArgs),
    /// Write a run's checkpoint as a PyTorch training checkpoint (the tutorial's layout, with
    /// torch.optim's and lr_scheduler's own state dicts) that a notebook continues.
    TorchCheckpoint(TorchCheckpointArgs),
    /// The layer table: output shape and parameters of every layer.
    Summary(SummaryArgs),
    /// Versions of tch and libtorch, threads, CUDA devices and cuDNN.
    Info(RuntimeArgs),
    /// The convolution walkthrough: the classic example (or your matrices, or a filter on a real
    /// digit) window by window, computed with libtorch and with a plain loop.
    Conv(crate::conv::ConvArgs),
    /// PNG pictures of a trained model: input, filters, feature maps, probabilities, training
    /// curves, confusion matrix and mistakes.
    Visualize(crate::visualize::VisualizeArgs),
    /// The digit in each of your own images (PNG, JPEG, BMP, PGM), with the top-3 probabilities.
    Predict(crate::predict::PredictArgs),
    /// One measurement of the Rust side for scripts/bench: training steps, evaluation,
    /// single-image latency or time to 99% test accuracy.
    Bench(crate::bench::BenchArgs),
    /// A local web page: draw a digit and watch every stage of LeNet-5 compute it, with the
    /// JSON API behind it (see the README). Ctrl-C stops it.
    Serve(ServeArgs),
}

#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Which data set to use.
    #[arg(long, value_enum, default_value = "mnist")]
    pub dataset: DatasetKind,
    /// Folder holding the four IDX files, plain or gzip'd [default: data/mnist; for
    /// fashion-mnist data/fashion-mnist, else /usr/share/datasets/fashion-mnist].
    #[arg(long, value_name = "DIR", env = "LENET5_DATA")]
    pub data: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// Where to compute: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Intra-op CPU threads [default: libtorch's choice, one per core].
    #[arg(long)]
    pub threads: Option<i32>,
}

impl RuntimeArgs {
    /// Applies the thread count and resolves the device.
    pub fn apply(&self) -> Result<Device> {
        if let Some(n) = self.threads {
            ensure!(n > 0, "--threads {n}: must be at least 1");
            tch::set_num_threads(n);
        }
        crate::device::parse(&self.device)
    }
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A model file: safetensors, torch.save state dict, TorchScript or tch .ot (detected by content).
    #[arg(long, value_name = "FILE", default_value = "models/mnist/lenet5.safetensors")]
    pub model: PathBuf,
    /// Architecture of a state dict without a model card beside it [default: the card's, else modern].
    #[arg(long, value_enum)]
    pub arch: Option<Arch>,
    /// Output head [default: the card's, else softmax].
    #[arg(long, value_enum)]
    pub head: Option<Head>,
    /// Rename keys of a foreign state dict: OLD=NEW on dotted prefixes, repeatable
    /// (`--key-map model=` strips `model.`; `--key-map features.0=conv1`).
    #[arg(long = "key-map", value_name = "OLD=NEW")]
    pub key_maps: Vec<KeyMap>,
}

impl ModelArgs {
    pub fn options(&self) -> LoadOptions {
        LoadOptions { arch: self.arch, head: self.head, key_maps: self.key_maps.clone() }
    }

    pub fn load(&self, device: Device) -> Result<Classifier> {
        weights::load(&self.model, &self.options(), device)
    }
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Passes over the training set.
    #[arg(long, default_value_t = 8)]
    pub epochs: usize,
    /// Training batch size.
    #[arg(long, default_value_t = 128)]
    pub batch_size: i64,
    /// Evaluation batch size.
    #[arg(long, default_value_t = 1000)]
    pub test_batch_size: i64,
    /// Learning rate (the peak rate for onecycle).
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// The optimizer, as torch.optim's class of that name.
    #[arg(long, value_enum, default_value = "adamw")]
    pub optimizer: OptimizerKind,
    /// torch: torch.optim's algorithms op for op (bit-identical to PyTorch, state
    /// checkpointed); libtorch: tch's C++ optimizers (another op order, state not saved).
    #[arg(long, value_enum, default_value = "torch")]
    pub optimizer_impl: Implementation,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// SGD dampening.
    #[arg(long, default_value_t = 0.0)]
    pub dampening: f64,
    /// SGD with Nesterov momentum.
    #[arg(long)]
    pub nesterov: bool,
    /// Adam's and AdamW's beta1 (OneCycleLR cycles it unless --no-cycle-momentum).
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    /// Adam's and AdamW's beta2.
    #[arg(long, default_value_t = 0.999)]
    pub beta2: f64,
    /// Adam's and AdamW's eps.
    #[arg(long, default_value_t = 1e-8)]
    pub eps: f64,
    /// Adam's and AdamW's AMSGrad variant.
    #[arg(long)]
    pub amsgrad: bool,
    /// L2 penalty (sgd, adam) or decoupled weight decay (adamw).
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f64,
    /// Learning-rate schedule, as torch.optim.lr_scheduler's class (see README: Schedules).
    #[arg(long, value_enum, default_value = "onecycle")]
    pub schedule: ScheduleKind,
    /// Learning-rate factor per epoch for --schedule step.
    #[arg(long, default_value_t = 0.7)]
    pub gamma: f64,
    /// Keep the momentum (SGD's, or Adam's beta1) fixed under --schedule onecycle, which
    /// otherwise cycles it between 0.95 and 0.85 as PyTorch's OneCycleLR does by default.
    #[arg(long)]
    pub no_cycle_momentum: bool,
    /// Random shifts of training images by up to this many pixels (0 = none).
    #[arg(long, default_value_t = 0)]
    pub shift: i64,
    /// What computes the gradients: libtorch's autograd (bit-identical to PyTorch) or the
    /// direct engine's own loops (CPU only; the same recipe, different rounding; faster).
    #[arg(long, value_enum, default_value = "libtorch")]
    pub engine: Engine,
    #[arg(long, value_enum, default_value = "modern")]
    pub arch: Arch,
    #[arg(long, value_enum, default_value = "softmax")]
    pub head: Head,
    #[command(flatten)]
    pub data: DataArgs,
    /// Random seed: a CPU run with the same seed and threads repeats exactly.
    #[arg(long, default_value_t = 1)]
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

#[derive(Args, Debug)]
pub struct TorchCheckpointArgs {
    /// A run folder or its checkpoint.safetensors.
    #[arg(long, value_name = "DIR|FILE")]
    pub run: PathBuf,
    /// The PyTorch checkpoint to write (torch.load(path, weights_only=True) reads it).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

impl TrainArgs {
    /// Checks every flag before any work starts.
    pub(crate) fn config(&self) -> Result<TrainConfig> {
        ensure!(self.epochs > 0, "--epochs {}: must be at least 1", self.epochs);
        ensure!(self.batch_size > 0, "--batch-size {}: must be at least 1", self.batch_size);
        ensure!(self.test_batch_size > 0, "--test-batch-size {}: must be at least 1", self.test_batch_size);
        let optimizer = OptimizerConfig {
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
        };
        optimizer.validate()?;
        ensure!(self.gamma > 0.0, "--gamma {}: must be positive", self.gamma);
        ensure!(
            !(self.optimizer_impl == Implementation::Libtorch && self.schedule == ScheduleKind::Onecycle && !self.no_cycle_momentum),
            "--optimizer-impl libtorch cannot cycle the momentum as --schedule onecycle does: add --no-cycle-momentum"
        );
        ensure!((0..=4).contains(&self.shift), "--shift {}: must be between 0 and 4 pixels", self.shift);
        if let Some(n) = self.limit_train {
            ensure!(n > 0, "--limit-train {n}: must be at least 1");
        }
        ensure!(self.checkpoint_every != Some(0), "--checkpoint-every 0: must be at least 1");
        Ok(TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            test_batch_size: self.test_batch_size,
            optimizer,
            schedule: self.schedule,
            gamma: self.gamma,
            cycle_momentum: !self.no_cycle_momentum,
            shift: self.shift,
            seed: self.seed,
            limit_train: self.limit_train,
            dry_run: self.dry_run,
            engine: self.engine,
        })
    }

    /// `--out`, else `runs/DATASET-ARCH-HEAD`.
    fn out_dir(&self, dataset: DatasetKind, model: ModelConfig) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            let (d, a, h) = (crate::flag_name(&dataset), crate::flag_name(&model.arch), crate::flag_name(&model.head));
            PathBuf::from(format!("runs/{d}-{a}-{h}"))
        })
    }
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// What runs the forward pass.
    #[arg(long, value_enum, default_value = "libtorch")]
    pub engine: Engine,
    /// Evaluation batch size.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: i64,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output prefix DIR/NAME: writes NAME.pt, NAME.safetensors, NAME.check.safetensors, NAME.json.
    #[arg(long, value_name = "DIR/NAME")]
    pub out: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Also write NAME.ot, tch's own archive format.
    #[arg(long)]
    pub ot: bool,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Test images for the page's picker come from here (the server runs without them).
    #[command(flatten)]
    pub data: DataArgs,
    /// Host name or address to listen on: this machine only by default (0.0.0.0 opens it to
    /// the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
}

impl ServeArgs {
    pub fn config(&self) -> ServeConfig {
        ServeConfig {
            model: self.model.model.clone(),
            load: self.model.options(),
            dataset: self.data.dataset,
            data: self.data.data.clone(),
            host: self.host.clone(),
            port: self.port,
        }
    }
}

#[derive(Args, Debug)]
pub struct SummaryArgs {
    #[arg(long, value_enum, default_value = "modern")]
    pub arch: Arch,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => train_command(&args),
        Command::Eval(args) => eval_command(&args),
        Command::Export(args) => export_command(&args),
        Command::TorchCheckpoint(args) => {
            let (meta, saved) = checkpoint::load(&checkpoint_file(&args.run))?;
            crate::torch_checkpoint::write(&args.out, &meta, &saved)?;
            println!(
                "{}: epoch {} of {}, step {}; continue it in PyTorch with scripts/train_reference --resume {0}",
                args.out.display(),
                meta.state.epoch.saturating_sub(1),
                meta.config.epochs,
                meta.state.step
            );
            Ok(())
        }
        Command::Summary(args) => {
            print!("{}", summary(args.arch));
            Ok(())
        }
        Command::Info(runtime) => {
            runtime.apply()?;
            println!("{}", crate::device::report());
            Ok(())
        }
        Command::Conv(args) => crate::conv::run(&args),
        Command::Visualize(args) => crate::visualize::run(&args),
        Command::Predict(args) => crate::predict::run(&args),
        Command::Bench(args) => crate::bench::run(&args),
        Command::Serve(args) => crate::serve::run(&args.config()),
    }
}


fn train_command(args: &TrainArgs) -> Result<()> {
    let device = args.runtime.apply()?;
    // A new run takes its recipe from the flags; a resumed one from its checkpoint.
    let (meta, saved, out) = match &args.resume {
        Some(path) => {
            ensure!(args.init.is_none() && args.batch_order.is_none(), "--resume continues a run as it was; it takes no --init or --batch-order");
            // A PyTorch checkpoint is a torch.save zip; ours is safetensors (in a run folder).
            if path.is_file() && weights::detect(path)? == weights::Format::TorchSave {
                let (meta, saved) = crate::torch_checkpoint::read(path)?;
                let out = args.out_dir(meta.dataset, meta.model);
                (meta, Some(saved), out)
            } else {
                let file = checkpoint_file(path);
                let (meta, saved) = checkpoint::load(&file)?;
                let out = file.parent().map(Path::to_path_buf).unwrap_or_default();
                (meta, Some(saved), out)
            }
        }
        None => {
            let model = ModelConfig { arch: args.arch, head: args.head };
            let meta = CheckpointMeta::new(model, args.data.dataset, args.data.data.clone(), args.config()?, args.checkpoint_every);
            let out = args.out_dir(meta.dataset, model);
            (meta, None, out)
        }
    };
    let config = &meta.config;
    let run = RunDir::create(&out)?;
    let started = Instant::now();
    tch::manual_seed(config.seed);
    let data = data::load(meta.dataset, meta.data_dir.as_deref())?;
    let data = data.to_device(device);
    let mut vs = VarStore::new(device);
    let net = LeNet5::new(&vs.root(), meta.model);
    let weights_source = args.resume.as_deref().map(checkpoint_file).or(args.init.clone());
    let mut optimizer_state = vec![];
    if let Some(source) = &weights_source {
        let tensors = match saved {
            Some(saved) => {
                optimizer_state = saved.optimizer;
                saved.weights
            }
            None => weights::read_tensors(source, weights::detect(source)?)?,
        };
        weights::load_state_dict(&mut vs, tensors, &[], &source.display().to_string())?;
    }
    let batch_order = match &args.batch_order {
        Some(path) => Some(read_batch_order(path, data.train.len())?),
        None => None,
    };
    let norm = meta.dataset.normalization();
    let trainer = Trainer {
        config,
        head: meta.model.head,
        background: norm.background(),
        batch_order,
        checkpoint_every: meta.checkpoint_every,
    };
    let mut optimizer = trainer.optimizer(&net, &vs)?;
    if let Some(source) = &weights_source {
        optimizer.load_state_tensors(optimizer_state, &source.display().to_string())?;
    }
    eprintln!(
        "{} LeNet-5 ({}, {}) on {} with {} on {}: {} epochs, batch {}, lr {}, {} schedule, {} threads",
        if args.resume.is_some() { "resuming" } else { "training" },
        crate::flag_name(&meta.model.arch),
        crate::flag_name(&meta.model.head),
        crate::flag_name(&meta.dataset),
        crate::flag_name(&config.optimizer.kind),
        crate::device::name(device),
        trainer.epochs(),
        config.batch_size,
        config.optimizer.lr,
        crate::flag_name(&config.schedule),
        tch::get_num_threads()
    );
    if args.resume.is_some() {
        let fresh = config.optimizer.implementation == Implementation::Libtorch;
        eprintln!(
            "continuing at epoch {} after step {}{}",
            meta.state.epoch.max(1),
            meta.state.step,
            if fresh { "; libtorch's optimizer state starts afresh (tch cannot save it)" } else { "" }
        );
    }
    let stop = StopRequest::install()?;
    let state = meta.state.clone();
    let mut observer = RunObserver { run: &run, vs: &vs, meta: meta.clone(), stop: stop.clone(), progress: Default::default() };
    let history = match trainer.run(&net, &vs, &mut optimizer, &data, state, &mut observer)? {
        Outcome::Finished(history) => history,
        Outcome::Stopped(state) => {
            eprintln!(
                "stopped after step {} (epoch {}); checkpoint saved in {}\nresume with: lenet5 train --resume {}",
                state.step,
                state.epoch,
                run.dir.join(CHECKPOINT_FILE).display(),
                run.dir.display()
            );
            return Err(Interrupted { exit_code: stop.requested().unwrap_or(130) }.into());
        }
    };
    let last = history.last().context("training ran no epoch")?;
    let forward = |xs: &Tensor| -> Result<Tensor> { Ok(tch::nn::Module::forward(&net, xs)) };
    let test = train::evaluate(&forward, meta.model.head, &data.test, config.test_batch_size)?;
    let mut card = ModelCard::new(meta.model, meta.dataset, parameter_count(&vs), Some(config.seed));
    card.metrics = Some(CardMetrics {
        test_accuracy: test.accuracy(),
        test_loss: test.loss,
        test_correct: test.correct,
        test_total: test.total,
    });
    card.training = Some(serde_json::json!({
        "recipe": config,
        "device": crate::device::name(device),
        "threads": tch::get_num_threads(),
        "train_seconds": last.seconds,
        "wall_seconds": started.elapsed().as_secs_f64(),
        "epochs_run": history.len(),
        "resumed": args.resume.is_some(),
    }));
    let prefix = run.model_prefix();
    let check_inputs = data.test.images.narrow(0, 0, crate::export::CHECK_BATCH.min(data.test.len()));
    crate::export::export(&vs, &net, &card, &prefix, &check_inputs, false)?;
    println!(
        "test accuracy {:.2}% ({}/{}), loss {:.4}; trained in {:.1}s ({:.1}s wall); model: {}.{{safetensors,json,pt}}",
        100.0 * test.accuracy(),
        test.correct,
        test.total,
        test.loss,
        last.seconds,
        started.elapsed().as_secs_f64(),
        prefix.display()
    );
    Ok(())
}

/// A run folder's checkpoint, or the file itself.
fn checkpoint_file(path: &Path) -> PathBuf {
    if path.is_dir() { path.join(CHECKPOINT_FILE) } else { path.to_path_buf() }
}

fn read_batch_order(path: &Path, train_len: i64) -> Result<Tensor> {
    let tensors = Tensor::read_safetensors(path).map_err(|e| anyhow::anyhow!("{}: cannot read ({e})", path.display()))?;
    let order = tensors
        .into_iter()
        .find_map(|(k, t)| (k == "order").then_some(t))
        .with_context(|| format!("{}: no tensor named `order`", path.display()))?;
    ensure!(
        order.dim() == 2 && order.kind() == tch::Kind::Int64,
        "{}: `order` must be int64 [steps, batch], got {:?} {:?}",
        path.display(),
        order.kind(),
        order.size()
    );
    let (lo, hi) = (order.min().int64_value(&[]), order.max().int64_value(&[]));
    ensure!(lo >= 0 && hi < train_len, "{}: indices {lo}..={hi} outside the {train_len} training images", path.display());
    Ok(order)
}

fn eval_command(args: &EvalArgs) -> Result<()> {
    ensure!(args.batch_size > 0, "--batch-size {}: must be at least 1", args.batch_size);
    let device = args.runtime.apply()?;
    let classifier = args.model.load(device)?.with_engine(args.engine, &args.model.model)?;
    let dataset = classifier.card().map(|c| c.dataset).unwrap_or(args.data.dataset);
    let test = data::load_test(dataset, args.data.data.as_deref(), dataset.normalization())?.to_device(device);
    let forward = |xs: &Tensor| classifier.forward(xs);
    let m = train::evaluate(&forward, classifier.head(), &test, args.batch_size)
        .with_context(|| format!("evaluating {}", args.model.model.display()))?;
    if args.json {
        let json = serde_json::json!({
            "model": args.model.model,
            "format": weights::detect(&args.model.model)?.describe(),
            "engine": crate::flag_name(&classifier.engine()),
            "accuracy": m.accuracy(),
            "correct": m.correct,
            "total": m.total,
            "loss": m.loss,
            "per_class_accuracy": m.per_class_accuracy(),
            "confusion": m.confusion,
        });
        println!("{json}");
        return Ok(());
    }
    println!("{}: {}", args.model.model.display(), weights::detect(&args.model.model)?.describe());
    println!("accuracy {:.2}% ({}/{})  loss {:.4}", 100.0 * m.accuracy(), m.correct, m.total, m.loss);
    println!("\nper class:");
    for (c, acc) in m.per_class_accuracy().iter().enumerate() {
        println!("  {c}  {:6.2}%", 100.0 * acc);
    }
    println!("\nconfusion (rows: true class, columns: predicted):");
    println!("     {}", (0..10).map(|c| format!("{c:>5}")).collect::<String>());
    for (c, row) in m.confusion.iter().enumerate() {
        println!("  {c}  {}", row.iter().map(|n| format!("{n:>5}")).collect::<String>());
    }
    Ok(())
}

fn export_command(args: &ExportArgs) -> Result<()> {
    let classifier = args.model.load(Device::Cpu)?;
    let Classifier::Native { vs, net, card, .. } = &classifier else {
        bail!("{}: already a TorchScript module; export needs weights (safetensors, state dict or .ot)", args.model.model.display());
    };
    let card = crate::export::export_loaded(vs, net, card.as_ref(), args.data.dataset, args.data.data.as_deref(), &args.out, args.ot)?;
    for entry in card.files.values() {
        println!("{}", args.out.with_file_name(&entry.name).display());
    }
    println!("{}", crate::export::with_suffix(&args.out, ".json").display());
    Ok(())
}

/// The layer table of `lenet5 summary`, from a forward pass of one blank image.
pub fn summary(arch: Arch) -> String {
    let vs = VarStore::new(Device::Cpu);
    let net = LeNet5::new(&vs.root(), ModelConfig { arch, head: Head::Softmax });
    let params = vs.variables();
    let count = |layer: &str| -> i64 {
        params.iter().filter(|(k, _)| k.starts_with(&format!("{layer}."))).map(|(_, t)| t.numel() as i64).sum()
    };
    let layers = [("input", "", "input"), ("C1", "conv1", "5x5 conv"), ("S2", "", "2x2 pool"), ("C3", "conv2", "5x5 conv"),
        ("S4", "", "2x2 pool"), ("F5", "fc1", "linear"), ("F6", "fc2", "linear"), ("output", "fc3", "linear")];
    let mut rows = Vec::new();
    let xs = Tensor::zeros([1, 1, 32, 32], (tch::Kind::Float, Device::Cpu));
    let _logits = net.forward_observed(&xs, &mut |stage, t| rows.push((stage.to_string(), t.size()[1..].to_vec())));
    let mut out = format!("LeNet-5 ({arch:?})\n{:<8}{:<8}{:<10}{:<14}{:>10}\n", "stage", "layer", "kind", "output", "params");
    for ((stage, shape), (_, layer, kind)) in rows.iter().zip(layers) {
        let shape = shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
        let n = if layer.is_empty() { 0 } else { count(layer) };
        out += &format!("{stage:<8}{:<8}{kind:<10}{shape:<14}{n:>10}\n", if layer.is_empty() { "-" } else { layer });
    }
    let total = parameter_count(&vs);
    out += &format!("{:<40}{total:>10}\n", "total");
    out
}
