//! `lenet5 summary`: the layer table, from the model's own forward pass.

use anyhow::Result;
use clap::Args;

use lenet5::model::{layer_table, Arch};

use super::named;

#[derive(Args, Debug)]
pub struct SummaryArgs {
    #[arg(long, value_parser = named::<Arch>(Arch::NAMES), default_value = "modern")]
    pub arch: Arch,
}

pub fn run(args: &SummaryArgs) -> Result<()> {
    print!("{}", table(args.arch));
    Ok(())
}

/// The table as `lenet5 summary` prints it.
pub fn table(arch: Arch) -> String {
    let rows = layer_table(arch);
    let mut out =
        format!("LeNet-5 ({arch:?})\n{:<8}{:<8}{:<10}{:<14}{:>10}\n", "stage", "layer", "kind", "output", "params");
    for row in &rows {
        let shape = row.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
        out += &format!(
            "{:<8}{:<8}{:<10}{shape:<14}{:>10}\n",
            row.stage,
            row.layer.unwrap_or("-"),
            row.kind,
            row.parameters
        );
    }
    let total: i64 = rows.iter().map(|r| r.parameters).sum();
    out += &format!("{:<40}{total:>10}\n", "total");
    out
}
