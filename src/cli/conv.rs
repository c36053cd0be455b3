//! `lenet5 conv`: the walkthrough of [`lenet5::explain::conv`] on the classic example, your matrices or
//! a named filter on a real digit.

use anyhow::{ensure, Context, Result};
use std::path::PathBuf;

use lenet5::explain::conv::{
    mnist_digit, naive_conv2d, parse_compact, picture, read_matrix, walkthrough, Explain, Preset, CLASSIC_FILTER,
    CLASSIC_INPUT,
};

#[derive(clap::Args, Debug)]
pub struct ConvArgs {
    /// Input matrix file, or - for standard input: one row per line, cells split by spaces or
    /// commas, or the compact `11100/01110/...` (one digit per cell) [default: the classic 5x5].
    #[arg(long, value_name = "FILE|-", conflicts_with = "preset")]
    pub input: Option<PathBuf>,
    /// Filter matrix file, same format [default: the classic 3x3 `101/010/101`].
    #[arg(long, value_name = "FILE", conflicts_with = "preset")]
    pub filter: Option<PathBuf>,
    /// Stride of the filter.
    #[arg(long, default_value_t = 1)]
    pub stride: usize,
    /// Zero padding on every side of the input.
    #[arg(long, default_value_t = 0)]
    pub padding: usize,
    /// Which windows to write out term by term.
    #[arg(long, value_parser = super::named::<Explain>(Explain::NAMES), default_value = "first")]
    pub explain: Explain,
    /// Apply a named filter to a real MNIST test digit (pixels scaled to 0-9 so each prints as one digit).
    #[arg(long, value_parser = super::named::<Preset>(Preset::NAMES))]
    pub preset: Option<Preset>,
    /// Test-set index of the digit for --preset [default: the first 3].
    #[arg(long, requires = "preset")]
    pub index: Option<i64>,
    /// Folder holding the MNIST IDX files, for --preset [default: data/mnist].
    #[arg(long, value_name = "DIR", env = "LENET5_DATA")]
    pub data: Option<PathBuf>,
    /// Also draw input, filter and output as a PNG [default with --preset: conv-PRESET.png].
    #[arg(long, value_name = "FILE")]
    pub png: Option<PathBuf>,
}

pub fn run(args: &ConvArgs) -> Result<()> {
    ensure!(args.stride > 0, "--stride 0: the stride must be at least 1");
    let (input, filter, input_name, png) = match args.preset {
        Some(preset) => {
            let (digit, index, label) = mnist_digit(args.data.as_deref(), args.index)?;
            let png = args.png.clone().unwrap_or_else(|| PathBuf::from(format!("conv-{}.png", preset)));
            (digit, preset.filter(), format!(": MNIST test image #{index}, a {label}, pixels scaled to 0-9"), Some(png))
        }
        None => {
            let input = match &args.input {
                Some(path) => read_matrix(path).context("--input")?,
                None => parse_compact(CLASSIC_INPUT),
            };
            let filter = match &args.filter {
                Some(path) => read_matrix(path).context("--filter")?,
                None => parse_compact(CLASSIC_FILTER),
            };
            (input, filter, String::new(), args.png.clone())
        }
    };
    print!("{}", walkthrough(&input, &filter, args.stride, args.padding, args.explain, &input_name)?);
    if let Some(png) = png {
        let output = naive_conv2d(&input, &filter, args.stride, args.padding);
        let title = match args.preset {
            Some(p) => format!("{} filter on an MNIST digit, stride {}, padding {}", p, args.stride, args.padding),
            None => format!("convolution, stride {}, padding {}", args.stride, args.padding),
        };
        picture(&input, &filter, &output, &title)?.save(&png)?;
        println!("picture: {}", png.display());
    }
    Ok(())
}
