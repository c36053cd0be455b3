//! `lenet5 eval`: accuracy, loss, per-class accuracy and the confusion matrix of a model on
//! the test set, as tables or one JSON object.

use anyhow::{Context, Result};
use clap::Args;

use lenet5::data;
use lenet5::formats::weights;
use lenet5::inference::evaluate::evaluate;

use super::{DataArgs, EngineArgs, ModelArgs, RuntimeArgs};

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub compute: EngineArgs,
    /// Evaluation batch size.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: i64,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &EvalArgs) -> Result<()> {
    lenet5::check_setting!(args.batch_size > 0, "batch_size", args.batch_size, "must be at least 1");
    let device = args.runtime.apply()?;
    let model = args.model.load(device)?.with_engine(args.compute.engine)?;
    let path = model.path().context("a loaded model has its file")?.to_path_buf();
    let dataset = model.card().map(|c| c.dataset).unwrap_or(args.data.dataset);
    let test = data::load_test(dataset, args.data.data.as_deref(), dataset.normalization())?.to_device(device);
    let m = evaluate(&|xs| model.forward(xs), model.head(), &test, args.batch_size)
        .with_context(|| format!("evaluating {}", path.display()))?;
    let format = weights::detect(&path)?.describe();
    if args.json {
        let json = serde_json::json!({
            "model": path,
            "format": format,
            "engine": model.engine().as_str(),
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
    println!("{}: {format}", path.display());
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
