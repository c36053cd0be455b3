//! The command line: one file per subcommand with its clap flags and its `run`, turning them
//! into the library's plain configs, doing the work and printing; settings respelt as flags.
//!
//! The library knows nothing of clap. Flag names follow PyTorch's MNIST example.

mod bench;
mod conv;
mod eval;
mod export;
mod info;
mod interrupt;
mod predict;
mod progress;
mod serve;
mod summary;
mod torch_checkpoint;
mod train;
mod visualize;

pub use interrupt::Interrupted;

use anyhow::Result;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::str::FromStr;
use tch::Device;

use lenet5::data::DatasetKind;
use lenet5::formats::weights::KeyMap;
use lenet5::inference::{Engine, LoadOptions, Model};
use lenet5::model::{Arch, Head};
use lenet5::setting::{InvalidSetting, Suggestion};

#[derive(Parser, Debug)]
#[command(name = "lenet5", version, about = "LeNet-5 on libtorch: train on MNIST, evaluate, export to PyTorch")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train LeNet-5 from a named recipe (--recipe) and flags, evaluating after every epoch (or
    /// once at the end); saves and exports the model into --out.
    Train(Box<train::TrainArgs>),
    /// Accuracy, loss, per-class accuracy and the confusion matrix of a model on the test set.
    Eval(eval::EvalArgs),
    /// Write NAME.pt (TorchScript), NAME.safetensors, NAME.check.safetensors, NAME.onnx, NAME.pt2
    /// (torch.export) and NAME.json.
    Export(export::ExportArgs),
    /// Write a run's checkpoint as a PyTorch training checkpoint (the tutorial's layout, with
    /// torch.optim's and lr_scheduler's own state dicts) that a notebook continues.
    TorchCheckpoint(torch_checkpoint::TorchCheckpointArgs),
    /// The layer table: output shape and parameters of every layer.
    Summary(summary::SummaryArgs),
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
    /// JSON API behind it (see docs/). Ctrl-C stops it.
    Serve(serve::ServeArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => train::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Export(args) => export::run(&args),
        Command::TorchCheckpoint(args) => torch_checkpoint::run(&args),
        Command::Summary(args) => summary::run(&args),
        Command::Info(runtime) => info::run(&runtime),
        Command::Conv(args) => conv::run(&args),
        Command::Visualize(args) => visualize::run(&args),
        Command::Predict(args) => predict::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Serve(args) => serve::run(&args),
    }
}

/// clap's parser for one of the library's named enums (`named::<Arch>(Arch::NAMES)`): its
/// values are listed in `--help` and in clap's error for any other.
pub fn named<T: FromStr + Clone + Send + Sync + 'static>(
    names: &'static [&'static str],
) -> impl TypedValueParser<Value = T> {
    PossibleValuesParser::new(names)
        .map(|s| s.parse::<T>().unwrap_or_else(|_| unreachable!("{s:?} is one of the listed names")))
}

/// The flag that sets a library setting, where its spelling differs from `--name-with-dashes`.
fn flag(setting: &str) -> String {
    match setting {
        "betas" => "--beta1/--beta2".into(),
        "key_maps" => "--key-map".into(),
        _ => format!("--{}", setting.replace('_', "-")),
    }
}

/// The error chain as anyhow's `{:#}` prints it, each setting named by its flag:
/// `--epochs 0: must be at least 1`, `...: every key starts with 'model.': try --key-map model=`.
pub fn describe(err: &anyhow::Error) -> String {
    err.chain()
        .map(|cause| {
            if let Some(s) = cause.downcast_ref::<InvalidSetting>() {
                format!("{} {}: {}", flag(s.name), s.value, s.problem)
            } else if let Some(s) = cause.downcast_ref::<Suggestion>() {
                format!("{}: try {} {}", s.reason, flag(s.name), s.value)
            } else {
                cause.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(": ")
}

#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Which data set to use.
    #[arg(long, value_parser = named::<DatasetKind>(DatasetKind::NAMES), default_value = "mnist")]
    pub dataset: DatasetKind,
    /// Folder holding the four IDX files, plain or gzip'd [default: data/mnist; for
    /// fashion-mnist data/fashion-mnist, else /usr/share/datasets/fashion-mnist].
    #[arg(long, value_name = "DIR", env = "LENET5_DATA")]
    pub data: Option<PathBuf>,
}

#[derive(Args, Debug, Clone, Copy)]
pub struct EngineArgs {
    /// What computes: libtorch (PyTorch's numbers, bit for bit; for training, its autograd) or
    /// direct (the direct engine's loops, CPU only: logits and gradients within float rounding
    /// of libtorch's, many times faster on small batches).
    #[arg(long, value_parser = named::<Engine>(Engine::NAMES), default_value = "libtorch")]
    pub engine: Engine,
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
            lenet5::check_setting!(n > 0, "threads", n, "must be at least 1");
            tch::set_num_threads(n);
        }
        lenet5::device::parse(&self.device)
    }
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A model: a file (safetensors, torch.save state dict or checkpoint, pickled module,
    /// torch.export .pt2, TorchScript, tch .ot or ONNX; recognised by content), a run folder, or an
    /// export's DIR/NAME prefix.
    #[arg(long, value_name = "PATH", default_value = "models/mnist")]
    pub model: PathBuf,
    /// Architecture of a state dict without a model card beside it [default: the card's, else modern].
    #[arg(long, value_parser = named::<Arch>(Arch::NAMES))]
    pub arch: Option<Arch>,
    /// Output head [default: the card's, else softmax].
    #[arg(long, value_parser = named::<Head>(Head::NAMES))]
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

    /// Loads the model, showing what loading noticed.
    pub fn load(&self, device: Device) -> Result<Model> {
        let model = Model::load(&self.model, &self.options(), device)?;
        for note in model.notes() {
            eprintln!("note: {note}");
        }
        Ok(model)
    }
}
