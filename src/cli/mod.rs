//! The command line: clap flags, turned into the library's plain configs and values, then the
//! work and its printing. Only the binary compiles this; the library knows nothing of clap's
//! argument types. Flag names follow PyTorch's MNIST example where one exists.

mod bench;
mod conv;
mod interrupt;
mod predict;
mod progress;
mod serve;
mod train;
mod visualize;

pub use interrupt::Interrupted;

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use tch::nn::VarStore;
use tch::{Device, Tensor};

use lenet5::checkpoint;
use lenet5::data::{self, DatasetKind};
use lenet5::model::{parameter_count, Arch, Head, LeNet5, ModelConfig};
use lenet5::run::checkpoint_file;
use lenet5::weights::{self, Classifier, Engine, KeyMap, LoadOptions};

#[derive(Parser, Debug)]
#[command(name = "lenet5", version, about = "LeNet-5 on libtorch: train on MNIST, evaluate, export to PyTorch")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train LeNet-5, evaluating after every epoch; saves and exports the model into --out.
    Train(train::TrainArgs),
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
    Conv(conv::ConvArgs),
    /// PNG pictures of a trained model: input, filters, feature maps, probabilities, training
    /// curves, confusion matrix and mistakes.
    Visualize(visualize::VisualizeArgs),
    /// The digit in each of your own images (PNG, JPEG, BMP, PGM), with the top-3 probabilities.
    Predict(predict::PredictArgs),
    /// One measurement of the Rust side for scripts/bench: training steps, evaluation,
    /// single-image latency or time to 99% test accuracy.
    Bench(bench::BenchArgs),
    /// A local web page: draw a digit and watch every stage of LeNet-5 compute it, with the
    /// JSON API behind it (see the README). Ctrl-C stops it.
    Serve(serve::ServeArgs),
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
        lenet5::device::parse(&self.device)
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
pub struct TorchCheckpointArgs {
    /// A run folder or its checkpoint.safetensors.
    #[arg(long, value_name = "DIR|FILE")]
    pub run: PathBuf,
    /// The PyTorch checkpoint to write (torch.load(path, weights_only=True) reads it).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
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
pub struct SummaryArgs {
    #[arg(long, value_enum, default_value = "modern")]
    pub arch: Arch,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => train::run(&args),
        Command::Eval(args) => eval_command(&args),
        Command::Export(args) => export_command(&args),
        Command::TorchCheckpoint(args) => {
            let (meta, saved) = checkpoint::load(&checkpoint_file(&args.run))?;
            lenet5::torch_checkpoint::write(&args.out, &meta, &saved)?;
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
            println!("{}", lenet5::device::report());
            Ok(())
        }
        Command::Conv(args) => conv::run(&args),
        Command::Visualize(args) => visualize::run(&args),
        Command::Predict(args) => predict::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Serve(args) => serve::run(&args),
    }
}


fn eval_command(args: &EvalArgs) -> Result<()> {
    ensure!(args.batch_size > 0, "--batch-size {}: must be at least 1", args.batch_size);
    let device = args.runtime.apply()?;
    let classifier = args.model.load(device)?.with_engine(args.engine, &args.model.model)?;
    let dataset = classifier.card().map(|c| c.dataset).unwrap_or(args.data.dataset);
    let test = data::load_test(dataset, args.data.data.as_deref(), dataset.normalization())?.to_device(device);
    let forward = |xs: &Tensor| classifier.forward(xs);
    let m = lenet5::train::evaluate(&forward, classifier.head(), &test, args.batch_size)
        .with_context(|| format!("evaluating {}", args.model.model.display()))?;
    if args.json {
        let json = serde_json::json!({
            "model": args.model.model,
            "format": weights::detect(&args.model.model)?.describe(),
            "engine": lenet5::flag_name(&classifier.engine()),
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
    let card = lenet5::export::export_loaded(vs, net, card.as_ref(), args.data.dataset, args.data.data.as_deref(), &args.out, args.ot)?;
    for entry in card.files.values() {
        println!("{}", args.out.with_file_name(&entry.name).display());
    }
    println!("{}", lenet5::export::with_suffix(&args.out, ".json").display());
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
