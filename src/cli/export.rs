//! `lenet5 export`: a model's files for PyTorch users (TorchScript, safetensors, the check
//! file, a torch.export archive and the card), from any weights this program reads.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use tch::Device;

use lenet5::formats::export::{export_loaded, with_suffix};

use super::{DataArgs, ModelArgs};

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output prefix DIR/NAME: writes NAME.pt, NAME.safetensors, NAME.check.safetensors, NAME.onnx, NAME.pt2,
    /// NAME.json.
    #[arg(long, value_name = "DIR/NAME")]
    pub out: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Also write NAME.ot, tch's own archive format.
    #[arg(long)]
    pub ot: bool,
}

pub fn run(args: &ExportArgs) -> Result<()> {
    let model = args.model.load(Device::Cpu)?;
    let invocation = std::env::args().collect();
    let card = export_loaded(&model, args.data.dataset, args.data.data.as_deref(), &args.out, args.ot, invocation)?;
    for entry in card.files.values() {
        println!("{}", args.out.with_file_name(&entry.name).display());
    }
    println!("{}", with_suffix(&args.out, ".json").display());
    Ok(())
}
