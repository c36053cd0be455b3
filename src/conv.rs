//! `lenet5 conv`: the convolution of deep learning (cross-correlation) on small integer
//! matrices, computed by libtorch and by a plain loop that must agree.

use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

/// A dense row-major matrix of small numbers.
pub type Matrix = Vec<Vec<f64>>;

/// The classic example's 5x5 input.
pub const CLASSIC_INPUT: &str = "11100/01110/00111/00110/01100";
/// The classic example's 3x3 filter.
pub const CLASSIC_FILTER: &str = "101/010/101";

#[derive(clap::Args, Debug)]
pub struct ConvArgs {
    /// Stride of the filter.
    #[arg(long, default_value_t = 1)]
    pub stride: usize,
    /// Zero padding on every side of the input.
    #[arg(long, default_value_t = 0)]
    pub padding: usize,
}

/// Parses the compact `11100/01110/...` form (one digit per cell, rows split by `/`).
pub fn parse_compact(s: &str) -> Matrix {
    s.split('/').map(|row| row.chars().map(|c| c.to_digit(10).unwrap_or(0) as f64).collect()).collect()
}

/// Output side for an input side `n`, filter side `k`: (n + 2p - k) / s + 1.
pub fn output_size(n: usize, k: usize, stride: usize, padding: usize) -> usize {
    (n + 2 * padding - k) / stride + 1
}

/// Cross-correlation by the definition: out[i][j] = sum over the window of input * filter.
pub fn naive_conv2d(input: &Matrix, filter: &Matrix, stride: usize, padding: usize) -> Matrix {
    let (n, m, k, l) = (input.len(), input[0].len(), filter.len(), filter[0].len());
    let at = |y: usize, x: usize| -> f64 {
        // Coordinates in the padded input; the padding is zeros.
        if y < padding || x < padding || y - padding >= n || x - padding >= m { 0.0 } else { input[y - padding][x - padding] }
    };
    let (oh, ow) = (output_size(n, k, stride, padding), output_size(m, l, stride, padding));
    (0..oh)
        .map(|i| {
            (0..ow)
                .map(|j| (0..k).flat_map(|a| (0..l).map(move |b| (a, b))).map(|(a, b)| at(i * stride + a, j * stride + b) * filter[a][b]).sum())
                .collect()
        })
        .collect()
}

fn to_tensor(m: &Matrix) -> Tensor {
    let flat: Vec<f64> = m.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).view([1, 1, m.len() as i64, m[0].len() as i64])
}

/// The same with libtorch's `conv2d`, in float64 so small integers stay exact.
pub fn torch_conv2d(input: &Matrix, filter: &Matrix, stride: usize, padding: usize) -> Matrix {
    let out = to_tensor(input).to_kind(Kind::Double).conv2d::<Tensor>(
        &to_tensor(filter).to_kind(Kind::Double),
        None,
        [stride as i64],
        [padding as i64],
        [1],
        1,
    );
    let rows = out.size()[2];
    Vec::<f64>::try_from(out.flatten(0, -1))
        .expect("a float64 tensor converts to Vec<f64>")
        .chunks(out.size()[3] as usize)
        .take(rows as usize)
        .map(<[f64]>::to_vec)
        .collect()
}

/// A matrix as aligned rows of numbers.
pub fn format_matrix(m: &Matrix) -> String {
    let cell = |v: f64| if v.fract() == 0.0 { format!("{v:.0}") } else { format!("{v}") };
    let width = m.iter().flatten().map(|&v| cell(v).len()).max().unwrap_or(1);
    m.iter().map(|row| row.iter().map(|&v| format!("{:>width$}", cell(v))).collect::<Vec<_>>().join(" ") + "\n").collect()
}

pub fn run(args: &ConvArgs) -> Result<()> {
    ensure!(args.stride > 0, "--stride 0: the stride must be at least 1");
    let (input, filter) = (parse_compact(CLASSIC_INPUT), parse_compact(CLASSIC_FILTER));
    let torch = torch_conv2d(&input, &filter, args.stride, args.padding);
    let naive = naive_conv2d(&input, &filter, args.stride, args.padding);
    println!("input:\n{}\nfilter:\n{}", format_matrix(&input), format_matrix(&filter));
    println!("output (libtorch conv2d):\n{}", format_matrix(&torch));
    println!("plain loop agrees: {}", if torch == naive { "yes" } else { "NO" });
    ensure!(torch == naive, "libtorch and the plain loop disagree:\n{}", format_matrix(&naive));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classic_example_gives_434_243_234() {
        let (input, filter) = (parse_compact(CLASSIC_INPUT), parse_compact(CLASSIC_FILTER));
        let expected = vec![vec![4.0, 3.0, 4.0], vec![2.0, 4.0, 3.0], vec![2.0, 3.0, 4.0]];
        assert_eq!(naive_conv2d(&input, &filter, 1, 0), expected);
        assert_eq!(torch_conv2d(&input, &filter, 1, 0), expected);
    }

    #[test]
    fn libtorch_and_the_loop_agree_with_stride_and_padding() {
        let input: Matrix = (0..7).map(|i| (0..6).map(|j| ((i * 7 + j * 3) % 5) as f64 - 2.0).collect()).collect();
        let filter = parse_compact("120/031/102");
        for (stride, padding) in [(1, 0), (2, 0), (1, 1), (2, 2), (3, 1)] {
            assert_eq!(torch_conv2d(&input, &filter, stride, padding), naive_conv2d(&input, &filter, stride, padding), "s{stride} p{padding}");
        }
    }
}
