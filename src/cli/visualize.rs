//! `lenet5 visualize`: its flags, turned into a [`VisualizeConfig`], and the list of what it wrote.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

use lenet5::explain::visualize::{self, VisualizeConfig};
use lenet5::model::STAGES;

use super::{DataArgs, ModelArgs, RuntimeArgs};

#[derive(Args, Debug)]
pub struct VisualizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Test-set index of the image to follow through the network [default: the first 3].
    #[arg(long, conflicts_with = "image")]
    pub index: Option<i64>,
    /// Follow your own image instead (PNG, JPEG, BMP, PGM), preprocessed as `predict` does.
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// Folder for the PNG files.
    #[arg(long, value_name = "DIR", default_value = "runs/pictures")]
    pub out: PathBuf,
    /// Most misclassified test images drawn in mistakes.png.
    #[arg(long, default_value_t = 36)]
    pub mistakes: usize,
}

pub fn run(args: &VisualizeArgs) -> Result<()> {
    let config = VisualizeConfig {
        dataset: args.data.dataset,
        data: args.data.data.clone(),
        index: args.index,
        image: args.image.clone(),
        out: args.out.clone(),
        mistakes: args.mistakes,
    };
    let model = args.model.load(args.runtime.apply()?)?;
    let report = visualize::write(&model, &config)?;
    println!("{}", report.verdict);
    for w in &report.written {
        println!("{}  {}", w.path.display(), w.what);
    }
    println!("{}  the activations of every stage ({})", report.activations.display(), STAGES.join(", "));
    if let Some(missing) = report.missing_metrics {
        eprintln!(
            "note: no training curves: {} does not exist (train writes it into the run folder)",
            missing.display()
        );
    }
    Ok(())
}
