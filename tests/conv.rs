//! `lenet5 conv`: the classic walkthrough word for word, matrices from files and standard
//! input, errors that point at the row and column, and libtorch against the plain loop.

mod support;

use lenet5::explain::conv::{self, Explain, Matrix};
use support::*;

/// The window expansions a teacher writes on the board for the classic example.
const WINDOW_0_0: &str = "  (1*1) + (1*0) + (1*1) + (0*0) + (1*1) + (1*0) + (0*1) + (0*0) + (1*1) = 4\n";
const WINDOW_0_2: &str = "  (1*1) + (0*0) + (0*1) + (1*0) + (1*1) + (0*0) + (1*1) + (1*0) + (1*1) = 4\n";

#[test]
fn the_classic_walkthrough_writes_out_the_windows_and_explains_the_size() {
    let out = ok(&["conv"]);
    for expected in [
        "input (5x5):\n1 1 1 0 0\n0 1 1 1 0\n0 0 1 1 1\n0 0 1 1 0\n0 1 1 0 0\n",
        "filter (3x3), stride 1, padding 0:\n1 0 1\n0 1 0\n1 0 1\n",
        &format!("window (0,0) covers rows 0-2, columns 0-2 of the input; multiply each cell by the filter cell on top of it and add:\n{WINDOW_0_0}"),
        "  (0,1) rows 0-2, columns 1-3 = 3\n  (0,2) rows 0-2, columns 2-4 = 4\n  (1,0) rows 1-3, columns 0-2 = 2\n",
        &format!("Many copies of this example print `4 3 3` as the first row. Window (0,2) covers rows 0-2, columns 2-4; written out:\n{WINDOW_0_2}so the first row is 4 3 4.\n"),
        "output (3x3):\n4 3 4\n2 4 3\n2 3 4\n",
        "9 windows computed, so the output is 3x3:\n  rows and columns: (5 - 3) / 1 + 1 = 3\n",
        "libtorch's conv2d (float64) and the plain Rust loop above agree on all 9 values (largest difference 0)",
    ] {
        assert!(out.contains(expected), "{expected:?} not in\n{out}");
    }
    // --explain all writes every window out; (0,2) is the one copies get wrong.
    let all = ok(&["conv", "--explain", "all"]);
    assert!(all.contains(&format!("  (0,2) rows 0-2, columns 2-4: {}", WINDOW_0_2.trim_start())), "{all}");
    assert_eq!(
        all.lines().filter(|l| l.starts_with("  (") && l.contains("*")).count(),
        10,
        "9 windows + the note's (0,2):\n{all}"
    );
    let none = ok(&["conv", "--explain", "none"]);
    assert!(!none.contains("(1*1)") && none.contains("4 3 4\n2 4 3\n2 3 4\n"), "{none}");
}

#[test]
fn matrices_come_from_files_and_standard_input_with_stride_and_padding() {
    let dir = temp_dir("conv-files");
    let input = dir.join("input.txt");
    std::fs::write(&input, "# a 4x5 input\n1, 2, 0, -1, 3\n0 1 1 0 2\n\n2 0 1 1 0\n1 1 0 2 1\n").unwrap();
    let filter = dir.join("filter.txt");
    std::fs::write(&filter, "1 0\n-1 2\n").unwrap();
    let out = ok(&["conv", "--input", s(&input), "--filter", s(&filter), "--stride", "2", "--padding", "1"]);
    // Padded 6x7, 2x2 filter, stride 2: (4 + 2*1 - 2) / 2 + 1 = 3 rows, (5 + 2*1 - 2) / 2 + 1 = 3 columns.
    assert!(
        out.contains("rows:    (4 + 2*1 - 2) / 2 + 1 = 3\n  columns: (5 + 2*1 - 2) / 2 + 1 = 3 (5/2 rounds down"),
        "{out}"
    );
    // out[0][0] sees padding except the bottom-right cell: 2 * input[0][0] = 2.
    assert!(out.contains("window (0,0) covers rows 0-1, columns 0-1 of the padded input"), "{out}");
    assert!(out.contains("  (0*1) + (0*0) + (0*-1) + (1*2) = 2\n"), "{out}");
    let expected = conv::naive_conv2d(
        &conv::parse_matrix("1 2 0 -1 3\n0 1 1 0 2\n2 0 1 1 0\n1 1 0 2 1", "t").unwrap(),
        &vec![vec![1.0, 0.0], vec![-1.0, 2.0]],
        2,
        1,
    );
    assert!(out.contains(&conv::format_matrix(&expected)), "{out}");

    // The compact form through standard input.
    let piped = lenet5_with_stdin(&["conv", "--input", "-"], b"11100/01110/00111/00110/01100\n");
    assert!(piped.status.success());
    assert!(String::from_utf8_lossy(&piped.stdout).contains("4 3 4\n2 4 3\n2 3 4\n"));
}

#[test]
fn bad_matrices_get_an_error_at_their_row_and_column() {
    let dir = temp_dir("conv-errors");
    let file = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let ragged = file("ragged.txt", "1 1 1 0 0\n0 1 1 1 0\n0 0 1 1\n");
    let word = file("word.txt", "1 2 3\n4 5 x\n");
    let compact = file("compact.txt", "111/1a1/111");
    let empty = file("empty.txt", "# nothing\n\n");
    let big = file("big.txt", "1 1 1 1\n1 1 1 1\n1 1 1 1\n1 1 1 1\n");
    let nan = file("nan.txt", "1 NaN\n");
    let small = file("small.txt", "1 2 3\n4 5 6\n");
    // Through the binary: one clean line, naming the flag, the file, the row and the column.
    let cases: Vec<(Vec<&str>, String)> = vec![
        (vec!["--input", s(&ragged)], format!("error: --input: {}: row 3: has 4 columns, but row 1 has 5", s(&ragged))),
        (
            vec!["--filter", s(&compact)],
            format!("error: --filter: {}: row 2, column 2: 'a' is not a digit", s(&compact)),
        ),
        (
            vec!["--filter", s(&big), "--input", s(&small)],
            "the 4x4 filter is larger than the 2x3 input padded by 0 (2x3)".into(),
        ),
        (vec!["--stride", "0"], "--stride 0: the stride must be at least 1".into()),
    ];
    for (args, message) in cases {
        let args: Vec<&str> = ["conv"].into_iter().chain(args).collect();
        let err = fails(&args);
        assert!(err.contains(&message), "{message:?} not in {err}");
    }
    // The same reader, called directly.
    for (path, message) in [
        (word.as_path(), format!("{}: row 2, column 3: 'x' is not a number", s(&word))),
        (&empty, format!("{}: no numbers found", s(&empty))),
        (&nan, format!("{}: row 1, column 2: 'NaN' is not a number", s(&nan))),
        (std::path::Path::new("/nonexistent/m.txt"), "/nonexistent/m.txt: cannot open".into()),
    ] {
        let err = format!("{:#}", conv::read_matrix(path).unwrap_err());
        assert!(err.starts_with(&message), "{message:?} vs {err}");
    }
    // A line number is given when it differs from the row number (blank lines, comments).
    let err = conv::parse_matrix("# c\n1 2\n\n3 y\n", "f").unwrap_err().to_string();
    assert_eq!(err, "f: row 2 (line 4), column 2: 'y' is not a number");
}

/// A small deterministic generator (64-bit LCG), so the random cases repeat.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }

    fn matrix(&mut self, rows: usize, cols: usize, integers: bool) -> Matrix {
        (0..rows)
            .map(|_| {
                (0..cols)
                    .map(|_| if integers { self.next(19) as f64 - 9.0 } else { self.next(2001) as f64 / 1000.0 - 1.0 })
                    .collect()
            })
            .collect()
    }
}

#[test]
fn libtorch_and_the_loop_agree_on_random_matrices() {
    tch::set_num_threads(1);
    let mut rng = Lcg(4);
    for case in 0..60 {
        let (n, m) = (1 + rng.next(12) as usize, 1 + rng.next(12) as usize);
        let (k, l) = (1 + rng.next(5) as usize, 1 + rng.next(5) as usize);
        let (stride, padding) = (1 + rng.next(3) as usize, rng.next(3) as usize);
        if k > n + 2 * padding || l > m + 2 * padding {
            assert!(conv::check_shapes(&rng.matrix(n, m, true), &rng.matrix(k, l, true), stride, padding).is_err());
            continue;
        }
        let integers = case % 2 == 0;
        let (input, filter) = (rng.matrix(n, m, integers), rng.matrix(k, l, integers));
        let naive = conv::naive_conv2d(&input, &filter, stride, padding);
        let torch = conv::torch_conv2d(&input, &filter, stride, padding).unwrap();
        let (oh, ow) = (conv::output_size(n, k, stride, padding), conv::output_size(m, l, stride, padding));
        assert_eq!((torch.len(), torch[0].len()), (oh, ow), "case {case}: shape");
        assert_eq!((naive.len(), naive[0].len()), (oh, ow), "case {case}: shape");
        // Small integers are exact in float64 whatever the order of the sum; others within 1e-12.
        for (a, b) in naive.iter().flatten().zip(torch.iter().flatten()) {
            if integers {
                assert_eq!(a, b, "case {case}: {n}x{m} * {k}x{l}, stride {stride}, padding {padding}");
            } else {
                assert!((a - b).abs() <= 1e-12, "case {case}: {a} vs {b}");
            }
        }
        let text = conv::walkthrough(&input, &filter, stride, padding, Explain::All, "").unwrap();
        assert!(text.contains(&format!("{} windows computed, so the output is {oh}x{ow}", oh * ow)), "{text}");
    }
}

#[test]
fn a_preset_filters_a_real_digit_and_draws_it() {
    let dir = temp_dir("conv-preset");
    let png = dir.join("edge.png");
    let out = ok(&["conv", "--preset", "edge", "--png", s(&png)]);
    assert!(out.contains("input (28x28): MNIST test image #18, a 3, pixels scaled to 0-9"), "{out}");
    assert!(out.contains("filter (3x3), stride 1, padding 0:\n-1 -1 -1\n-1  8 -1\n-1 -1 -1\n"), "{out}");
    assert!(out.contains("output (26x26):") && out.contains("676 windows computed"), "{out}");
    assert!(out.contains(&format!("picture: {}", s(&png))), "{out}");

    // The picture's output tile holds the convolution of the printed digit, gray = 0.
    let digit_text: String =
        out.split("pixels scaled to 0-9:\n").nth(1).unwrap().split("\n\n").next().unwrap().to_string();
    let digit = conv::parse_matrix(&digit_text, "printed digit").unwrap();
    assert_eq!((digit.len(), digit[0].len()), (28, 28));
    let filter = conv::Preset::Edge.filter();
    let output = conv::torch_conv2d(&digit, &filter, 1, 0).unwrap();
    let drawn = conv::picture(&digit, &filter, &output, "t").unwrap();
    let image = image::open(&png).unwrap().to_rgb8();
    assert_eq!(image.dimensions(), drawn.image.dimensions());
    let (x0, y0) = drawn.tile_origins[2];
    let m = output.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs()));
    let zoom = 224 / 26;
    for (r, row) in output.iter().enumerate() {
        for (c, &v) in row.iter().enumerate() {
            let expected = (255.0 * (v + m) / (2.0 * m)).round() as u8;
            let p = image.get_pixel(x0 + c as u32 * zoom + zoom / 2, y0 + r as u32 * zoom + zoom / 2).0;
            assert_eq!(p, [expected; 3], "output ({r},{c}) = {v}");
        }
    }
    // Blur has fractional weights: the output says it is rounded for display.
    let blur = ok(&["conv", "--preset", "blur", "--png", s(&dir.join("blur.png")), "--explain", "none"]);
    assert!(blur.contains("0.0625  0.125 0.0625\n") && blur.contains("output (26x26), shown to 2 decimals:"), "{blur}");
}
