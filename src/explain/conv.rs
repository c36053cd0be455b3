//! `lenet5 conv`: the convolution of deep learning (cross-correlation) on small matrices, worked
//! through window by window as on a blackboard, computed by libtorch and by a plain loop that must agree.

use anyhow::{bail, ensure, Context, Result};
use std::io::Read;
use tch::{Kind, Tensor};

use crate::explain::pictures::{self, Shading, Tile};

/// A dense row-major matrix of small numbers.
pub type Matrix = Vec<Vec<f64>>;

/// The classic example's 5x5 input.
pub const CLASSIC_INPUT: &str = "11100/01110/00111/00110/01100";
/// The classic example's 3x3 filter.
pub const CLASSIC_FILTER: &str = "101/010/101";
/// Largest side of an input or output matrix: enough for any MNIST digit, small enough to print.
pub const MAX_SIDE: usize = 512;
/// Largest input text read (from a file or standard input).
const MAX_TEXT_BYTES: u64 = 16 << 20;
/// With `--explain first`, the other windows' sums are listed up to this many windows.
const LIST_LIMIT: usize = 100;

/// How much of the arithmetic to write out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Explain {
    /// The first window in full, then the sum of every other window.
    First,
    /// Every window in full.
    All,
    /// Only the matrices.
    None,
}

/// Named 3x3 filters for `--preset`, applied to a real MNIST digit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// Edge detection (Laplacian, 8 neighbours): flat areas give 0, outlines light up.
    Edge,
    /// Vertical edges (Sobel x): positive where the image gets brighter to the right.
    SobelX,
    /// Horizontal edges (Sobel y): positive where the image gets brighter downwards.
    SobelY,
    /// Sharpen: the pixel boosted against its four neighbours.
    Sharpen,
    /// Blur: a 3x3 Gaussian whose weights sum to 1.
    Blur,
}

crate::named_values!(Explain { First => "first", All => "all", None => "none" });
crate::named_values!(Preset { Edge => "edge", SobelX => "sobel-x", SobelY => "sobel-y", Sharpen => "sharpen", Blur => "blur" });

impl Preset {
    pub fn filter(self) -> Matrix {
        let m: &[[f64; 3]; 3] = match self {
            Preset::Edge => &[[-1.0, -1.0, -1.0], [-1.0, 8.0, -1.0], [-1.0, -1.0, -1.0]],
            Preset::SobelX => &[[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]],
            Preset::SobelY => &[[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]],
            Preset::Sharpen => &[[0.0, -1.0, 0.0], [-1.0, 5.0, -1.0], [0.0, -1.0, 0.0]],
            Preset::Blur => &[[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]],
        };
        m.iter().map(|r| r.to_vec()).collect()
    }
}

/// Parses the compact `11100/01110/...` form of the built-in examples.
/// Panics on malformed text, so it is only for constants; user input goes through [`parse_matrix`].
pub fn parse_compact(s: &str) -> Matrix {
    parse_matrix(s, "built-in matrix").expect("the built-in matrices are well-formed")
}

/// Parses a matrix, naming `source` and the row and column of any problem.
///
/// Two forms: the compact one when the text holds a `/` (rows split by `/` or new lines, one
/// digit per cell: `11100/01110`), otherwise one row per line with cells split by spaces, tabs
/// or commas (any finite number: `-1 0.5 2`). Blank lines and lines starting with `#` are skipped.
pub fn parse_matrix(text: &str, source: &str) -> Result<Matrix> {
    let compact = text.contains('/');
    let lines = text.lines().enumerate().flat_map(|(l, line)| {
        let parts: Vec<&str> = if compact { line.split('/').collect() } else { vec![line] };
        parts.into_iter().map(move |p| (l + 1, p.trim()))
    });
    let mut rows: Matrix = Vec::new();
    for (line, row_text) in lines.filter(|(_, r)| !r.is_empty() && !r.starts_with('#')) {
        let r = rows.len() + 1;
        // The line is worth naming only where blank lines or comments make it differ from the row.
        let row_name = if compact || line == r { format!("row {r}") } else { format!("row {r} (line {line})") };
        let at = |c: usize| format!("{row_name}, column {c}");
        let row: Vec<f64> = if compact {
            row_text
                .chars()
                .filter(|c| !c.is_whitespace())
                .enumerate()
                .map(|(c, ch)| match ch.to_digit(10) {
                    Some(d) => Ok(d as f64),
                    None => bail!("{source}: {}: '{ch}' is not a digit (the compact form `11100/01110` has one digit 0-9 per cell)", at(c + 1)),
                })
                .collect::<Result<_>>()?
        } else {
            row_text
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|cell| !cell.is_empty())
                .enumerate()
                .map(|(c, cell)| match cell.parse::<f64>() {
                    Ok(v) if v.is_finite() => Ok(v),
                    _ => bail!("{source}: {}: '{cell}' is not a number", at(c + 1)),
                })
                .collect::<Result<_>>()?
        };
        if let Some(first) = rows.first() {
            ensure!(
                row.len() == first.len(),
                "{source}: {row_name}: has {} columns, but row 1 has {} (every row needs the same number of cells)",
                row.len(),
                first.len()
            );
        }
        ensure!(row.len() <= MAX_SIDE, "{source}: row {r} has {} columns; at most {MAX_SIDE} are allowed", row.len());
        rows.push(row);
        ensure!(rows.len() <= MAX_SIDE, "{source}: more than {MAX_SIDE} rows");
    }
    ensure!(
        !rows.is_empty() && !rows[0].is_empty(),
        "{source}: no numbers found (expected rows like `1 0 1` or `101/010/101`)"
    );
    Ok(rows)
}

/// Reads a matrix from a file, or from standard input for `-`.
pub fn read_matrix(path: &std::path::Path) -> Result<Matrix> {
    let mut text = String::new();
    let source = if path.as_os_str() == "-" {
        std::io::stdin().take(MAX_TEXT_BYTES).read_to_string(&mut text).context("standard input: cannot read text")?;
        "standard input".to_string()
    } else {
        let name = path.display().to_string();
        std::fs::File::open(path)
            .with_context(|| format!("{name}: cannot open"))?
            .take(MAX_TEXT_BYTES)
            .read_to_string(&mut text)
            .with_context(|| format!("{name}: cannot read as text"))?;
        name
    };
    parse_matrix(&text, &source)
}

/// Output side for an input side `n`, filter side `k`: (n + 2p - k) / s + 1.
pub fn output_size(n: usize, k: usize, stride: usize, padding: usize) -> usize {
    (n + 2 * padding - k) / stride + 1
}

/// Checks that the filter fits the padded input and the stride is positive.
pub fn check_shapes(input: &Matrix, filter: &Matrix, stride: usize, padding: usize) -> Result<()> {
    crate::check_setting!(stride > 0, "stride", stride, "must be at least 1");
    let (n, m, k, l) = (input.len(), input[0].len(), filter.len(), filter[0].len());
    let (pn, pm) = (n + 2 * padding, m + 2 * padding);
    ensure!(
        k <= pn && l <= pm,
        "the {k}x{l} filter is larger than the {n}x{m} input padded by {padding} ({pn}x{pm}): it fits nowhere; \
         use a smaller filter or more padding"
    );
    let (oh, ow) = (output_size(n, k, stride, padding), output_size(m, l, stride, padding));
    crate::check_setting!(
        oh <= MAX_SIDE && ow <= MAX_SIDE,
        "padding",
        padding,
        "the output would be {oh}x{ow}; at most {MAX_SIDE}x{MAX_SIDE} is allowed"
    );
    Ok(())
}

/// One placement of the filter: output cell `(row, col)`, its `(input, filter)` products in
/// reading order and their sum.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Window {
    pub row: usize,
    pub col: usize,
    pub terms: Vec<(f64, f64)>,
    pub sum: f64,
}

/// `input` inside `padding` rings of zeros.
fn padded(input: &Matrix, padding: usize) -> Matrix {
    let m = input[0].len();
    let mut out = vec![vec![0.0; m + 2 * padding]; input.len() + 2 * padding];
    for (y, row) in input.iter().enumerate() {
        out[y + padding][padding..padding + m].copy_from_slice(row);
    }
    out
}

/// Every window of the cross-correlation, row by row: the plain loop of the definition.
pub fn windows(input: &Matrix, filter: &Matrix, stride: usize, padding: usize) -> Vec<Window> {
    let (n, m, k, l) = (input.len(), input[0].len(), filter.len(), filter[0].len());
    let input = padded(input, padding);
    let (oh, ow) = (output_size(n, k, stride, padding), output_size(m, l, stride, padding));
    let mut out = Vec::with_capacity(oh * ow);
    for i in 0..oh {
        for j in 0..ow {
            let terms: Vec<(f64, f64)> = (0..k)
                .flat_map(|a| (0..l).map(move |b| (a, b)))
                .map(|(a, b)| (input[i * stride + a][j * stride + b], filter[a][b]))
                .collect();
            let sum = terms.iter().map(|(x, w)| x * w).sum();
            out.push(Window { row: i, col: j, terms, sum });
        }
    }
    out
}

/// Cross-correlation by the definition: out[i][j] = sum over the window of input * filter.
pub fn naive_conv2d(input: &Matrix, filter: &Matrix, stride: usize, padding: usize) -> Matrix {
    let ow = output_size(input[0].len(), filter[0].len(), stride, padding);
    sums(&windows(input, filter, stride, padding), ow)
}

/// The output matrix of [`windows`], `ow` per row.
pub fn sums(windows: &[Window], ow: usize) -> Matrix {
    windows.chunks(ow).map(|row| row.iter().map(|w| w.sum).collect()).collect()
}

fn to_tensor(m: &Matrix) -> Tensor {
    let flat: Vec<f64> = m.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).view([1, 1, m.len() as i64, m[0].len() as i64]) // (1, 1, rows, cols)
}

/// The same with libtorch's `conv2d`, in float64 so small integers stay exact.
pub fn torch_conv2d(input: &Matrix, filter: &Matrix, stride: usize, padding: usize) -> Result<Matrix> {
    let out = to_tensor(input)
        .to_kind(Kind::Double)
        .f_conv2d::<Tensor>(&to_tensor(filter).to_kind(Kind::Double), None, [stride as i64], [padding as i64], [1], 1)
        .context("libtorch conv2d")?; // (1, 1, out_rows, out_cols)
    let cols = out.size()[3] as usize;
    let flat = Vec::<f64>::try_from(out.flatten(0, -1)).context("reading the conv2d result")?;
    Ok(flat.chunks(cols.max(1)).map(<[f64]>::to_vec).collect())
}

/// A number as a person writes it: integers bare, others with at most `decimals` decimals.
pub fn format_number(v: f64, decimals: usize) -> String {
    pictures::short_number(v, decimals)
}

/// A matrix as right-aligned rows of numbers (at most 4 decimals).
pub fn format_matrix(m: &Matrix) -> String {
    format_matrix_with(m, 4)
}

fn format_matrix_with(m: &Matrix, decimals: usize) -> String {
    let cells: Vec<Vec<String>> =
        m.iter().map(|row| row.iter().map(|&v| format_number(v, decimals)).collect()).collect();
    let width = cells.iter().flatten().map(String::len).max().unwrap_or(1);
    cells.iter().map(|row| row.iter().map(|c| format!("{c:>width$}")).collect::<Vec<_>>().join(" ") + "\n").collect()
}

/// `(1*1) + (1*0) + ... = 4`: a window written out term by term.
pub fn expansion(w: &Window) -> String {
    let terms: Vec<String> =
        w.terms.iter().map(|&(x, f)| format!("({}*{})", format_number(x, 4), format_number(f, 4))).collect();
    format!("{} = {}", terms.join(" + "), format_number(w.sum, 4))
}

/// `(5 - 3) / 1 + 1 = 3`, with padding and rounding spelled out when they occur.
fn size_formula(n: usize, k: usize, stride: usize, padding: usize) -> String {
    let padded = if padding > 0 { format!("{n} + 2*{padding} - {k}") } else { format!("{n} - {k}") };
    let span = n + 2 * padding - k;
    let rounding = match span % stride {
        0 => String::new(),
        1 => format!(" ({span}/{stride} rounds down: the last cell is never under the filter)"),
        left => format!(" ({span}/{stride} rounds down: the last {left} cells are never under the filter)"),
    };
    format!("({padded}) / {stride} + 1 = {}{rounding}", output_size(n, k, stride, padding))
}

/// The classic 5x5 example with its 3x3 filter, stride 1 and no padding.
fn is_classic(input: &Matrix, filter: &Matrix, stride: usize, padding: usize) -> bool {
    *input == parse_compact(CLASSIC_INPUT) && *filter == parse_compact(CLASSIC_FILTER) && stride == 1 && padding == 0
}

/// The whole walkthrough as text; fails if libtorch and the plain loop disagree.
pub fn walkthrough(
    input: &Matrix,
    filter: &Matrix,
    stride: usize,
    padding: usize,
    explain: Explain,
    input_name: &str,
) -> Result<String> {
    check_shapes(input, filter, stride, padding)?;
    let (n, m, k, l) = (input.len(), input[0].len(), filter.len(), filter[0].len());
    let (oh, ow) = (output_size(n, k, stride, padding), output_size(m, l, stride, padding));
    let mut s = String::from(
        "Convolution as deep learning computes it (cross-correlation: the filter slides over the input unflipped).\n\n",
    );
    s += &format!("input ({n}x{m}){input_name}:\n{}\n", format_matrix(input));
    if padding > 0 {
        s += &format!(
            "input padded with {padding} ring(s) of zeros ({}x{}); windows are placed on this:\n{}\n",
            n + 2 * padding,
            m + 2 * padding,
            format_matrix(&padded(input, padding))
        );
    }
    s += &format!("filter ({k}x{l}), stride {stride}, padding {padding}:\n{}\n", format_matrix(filter));

    let all = windows(input, filter, stride, padding);
    let place = |w: &Window| {
        let (y, x) = (w.row * stride, w.col * stride);
        format!("rows {}-{}, columns {}-{}", y, y + k - 1, x, x + l - 1)
    };
    if explain != Explain::None {
        let first = &all[0];
        s += &format!(
            "window (0,0) covers {} of the {}input; multiply each cell by the filter cell on top of it and add:\n  {}\n",
            place(first),
            if padding > 0 { "padded " } else { "" },
            expansion(first)
        );
        if all.len() > 1 {
            let cells = |what: &str| if stride == 1 { format!("1 {what}") } else { format!("{stride} {what}s") };
            s += &format!(
                "then the filter moves {} right, and at the end of a row {} down:\n",
                cells("column"),
                cells("row")
            );
            if explain == Explain::All {
                for w in &all[1..] {
                    s += &format!("  ({},{}) {}: {}\n", w.row, w.col, place(w), expansion(w));
                }
            } else if all.len() <= LIST_LIMIT {
                for w in &all[1..] {
                    s += &format!("  ({},{}) {} = {}\n", w.row, w.col, place(w), format_number(w.sum, 4));
                }
            } else {
                s += &format!(
                    "  ({} more windows: their sums are the output below; explain = all writes each out)\n",
                    all.len() - 1
                );
                let strongest = all.iter().max_by(|a, b| a.sum.abs().total_cmp(&b.sum.abs())).unwrap_or(first);
                s += &format!(
                    "the strongest response, window ({},{}), covers {}:\n  {}\n",
                    strongest.row,
                    strongest.col,
                    place(strongest),
                    expansion(strongest)
                );
            }
        }
        if is_classic(input, filter, stride, padding) {
            let w = &all[2];
            s += &format!(
                "\nMany copies of this example print `4 3 3` as the first row. Window ({},{}) covers {}; written out:\n  {}\nso the first row is 4 3 4.\n",
                w.row,
                w.col,
                place(w),
                expansion(w)
            );
        }
        s += "\n";
    }
    let naive = sums(&all, ow);
    let torch = torch_conv2d(input, filter, stride, padding)?;
    let rounded = naive.iter().flatten().any(|v| format_number(*v, 2) != format_number(*v, 12));
    s += &format!(
        "output ({oh}x{ow}){}:\n{}\n",
        if rounded { ", shown to 2 decimals" } else { "" },
        format_matrix_with(&torch, 2)
    );
    s += &format!("{} windows computed, so the output is {oh}x{ow}:\n", all.len());
    if n == m && k == l {
        s += &format!("  rows and columns: {}\n", size_formula(n, k, stride, padding));
    } else {
        s += &format!(
            "  rows:    {}\n  columns: {}\n",
            size_formula(n, k, stride, padding),
            size_formula(m, l, stride, padding)
        );
    }
    let diff = naive.iter().flatten().zip(torch.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    let scale = naive.iter().flatten().map(|v| v.abs()).fold(1.0, f64::max);
    let same_shape = naive.len() == torch.len() && naive.iter().zip(&torch).all(|(a, b)| a.len() == b.len());
    ensure!(
        same_shape && diff <= 1e-12 * scale,
        "libtorch conv2d and the plain loop disagree (largest difference {diff:e}):\nlibtorch:\n{}loop:\n{}",
        format_matrix(&torch),
        format_matrix(&naive)
    );
    s += &format!(
        "checked: libtorch's conv2d (float64) and the plain Rust loop above agree on all {} values (largest difference {}).\n",
        oh * ow,
        if diff == 0.0 { "0".to_string() } else { format!("{diff:.1e}") }
    );
    Ok(s)
}

/// The PNG of a walkthrough: input, filter and output side by side.
pub fn picture(input: &Matrix, filter: &Matrix, output: &Matrix, title: &str) -> Result<pictures::Picture> {
    let tile = |m: &Matrix, caption: String, shading: Shading| {
        let side = m.len().max(m[0].len()) as u32;
        Tile {
            values: m.iter().flatten().map(|&v| v as f32).collect(),
            rows: m.len(),
            cols: m[0].len(),
            zoom: (224 / side).clamp(1, 48),
            shading,
            caption,
        }
    };
    let signed_output = output.iter().flatten().any(|&v| v < 0.0);
    let tiles = [
        tile(input, format!("input {}x{}", input.len(), input[0].len()), Shading::Stretch),
        tile(filter, format!("filter {}x{} (gray = 0)", filter.len(), filter[0].len()), Shading::Signed),
        tile(
            output,
            format!("output {}x{}{}", output.len(), output[0].len(), if signed_output { " (gray = 0)" } else { "" }),
            if signed_output { Shading::Signed } else { Shading::Stretch },
        ),
    ];
    pictures::grid(title, &tiles, 3)
}

/// An MNIST test digit as a 28x28 matrix of 0-9 (pixel / 255 * 9, rounded), with its label.
pub fn mnist_digit(data: Option<&std::path::Path>, index: Option<i64>) -> Result<(Matrix, i64, i64)> {
    let test = crate::data::load_test(
        crate::data::DatasetKind::Mnist,
        data,
        crate::data::Normalization { mean: 0.0, std: 1.0 },
    )?;
    let index = super::pick_index(&test, index)?;
    let pad = crate::data::PAD;
    let image = test.inputs_range(index, 1).squeeze().narrow(0, pad, 28).narrow(1, pad, 28); // (28, 28) in [0, 1]
    let values =
        Vec::<f32>::try_from((image * 9.0).round().flatten(0, -1).to_kind(Kind::Float)).context("reading the digit")?;
    let label = test.labels.int64_value(&[index]);
    Ok((values.chunks(28).map(|r| r.iter().map(|&v| v as f64).collect()).collect(), index, label))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classic_example_gives_434_243_234() {
        let (input, filter) = (parse_compact(CLASSIC_INPUT), parse_compact(CLASSIC_FILTER));
        let expected = vec![vec![4.0, 3.0, 4.0], vec![2.0, 4.0, 3.0], vec![2.0, 3.0, 4.0]];
        assert_eq!(naive_conv2d(&input, &filter, 1, 0), expected);
        assert_eq!(torch_conv2d(&input, &filter, 1, 0).unwrap(), expected);
    }

    #[test]
    fn libtorch_and_the_loop_agree_with_stride_and_padding() {
        let input: Matrix = (0..7).map(|i| (0..6).map(|j| ((i * 7 + j * 3) % 5) as f64 - 2.0).collect()).collect();
        let filter = parse_compact("120/031/102");
        for (stride, padding) in [(1, 0), (2, 0), (1, 1), (2, 2), (3, 1)] {
            assert_eq!(
                torch_conv2d(&input, &filter, stride, padding).unwrap(),
                naive_conv2d(&input, &filter, stride, padding),
                "s{stride} p{padding}"
            );
        }
    }

    #[test]
    fn both_text_forms_parse_to_the_same_matrix() {
        let spaced =
            parse_matrix("# the classic input\n1 1 1 0 0\n0,1,1,1,0\n\n0 0 1 1 1\n0 0 1 1 0\n0 1 1 0 0\n", "f")
                .unwrap();
        assert_eq!(spaced, parse_compact(CLASSIC_INPUT));
        assert_eq!(parse_matrix("11100\n01110/00111\n00110/01100", "f").unwrap(), spaced);
        assert_eq!(parse_matrix("-1 0.5\n2e1 3", "f").unwrap(), vec![vec![-1.0, 0.5], vec![20.0, 3.0]]);
    }

    #[test]
    fn size_formula_spells_out_padding_and_rounding() {
        assert_eq!(size_formula(5, 3, 1, 0), "(5 - 3) / 1 + 1 = 3");
        assert_eq!(size_formula(5, 3, 1, 1), "(5 + 2*1 - 3) / 1 + 1 = 5");
        assert!(size_formula(6, 3, 2, 0).starts_with("(6 - 3) / 2 + 1 = 2 (3/2 rounds down"));
    }
}
