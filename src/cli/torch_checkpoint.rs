//! `lenet5 torch-checkpoint`: a run's checkpoint in the PyTorch tutorial's layout, which a
//! notebook continues with the stock torch.optim and lr_scheduler classes.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

use lenet5::training::checkpoint;
use lenet5::training::run::checkpoint_file;

#[derive(Args, Debug)]
pub struct TorchCheckpointArgs {
    /// A run folder or its checkpoint.safetensors.
    #[arg(long, value_name = "DIR|FILE")]
    pub run: PathBuf,
    /// The PyTorch checkpoint to write (torch.load(path, weights_only=True) reads it).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

pub fn run(args: &TorchCheckpointArgs) -> Result<()> {
    let (meta, saved) = checkpoint::load(&checkpoint_file(&args.run))?;
    lenet5::formats::torch_checkpoint::write(&args.out, &meta, &saved)?;
    println!(
        "{}: epoch {} of {}, step {}; continue it in PyTorch with scripts/train_reference --resume {0}",
        args.out.display(),
        meta.state.epoch.saturating_sub(1),
        meta.config.epochs,
        meta.state.step
    );
    Ok(())
}
