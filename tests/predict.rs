//! `lenet5 predict` on real files: MNIST test digits written as images (plain, inverted, shifted,
//! blown up to 300x300, in every format) must be read as well as the model reads the originals,
//! and files that are not images get one clear line. Needs MNIST in data/mnist (scripts/setup).

mod support;

use image::{GrayImage, ImageFormat, Luma};
use std::path::{Path, PathBuf};
use support::*;

/// Test images used: the first N of the test set.
const N: usize = 300;
/// How far the accuracy on preprocessed files may stray from the model's accuracy on the
/// original tensors: 3 points (9 of 300 images). Re-cropping and re-scaling a digit that MNIST
/// already centred moves its pixels by a fraction, which flips a few borderline images.
const TOLERANCE: f64 = 0.03;

fn digit(pixels: &[u8]) -> GrayImage {
    GrayImage::from_raw(28, 28, pixels.to_vec()).unwrap()
}

/// The model's own accuracy on the first `n` test images, as tensors (no files involved).
fn model_accuracy(model: &Path, n: usize) -> f64 {
    tch::set_num_threads(1);
    let classifier = lenet5::inference::Model::load(model, &Default::default(), tch::Device::Cpu).unwrap();
    let norm =
        classifier.card().map(|c| c.input.normalization).unwrap_or(lenet5::data::DatasetKind::Mnist.normalization());
    let test = lenet5::data::load_split(Path::new("data/mnist"), "t10k", norm).unwrap().take(n as i64);
    let logits = tch::no_grad(|| classifier.forward(&test.all_inputs())).unwrap();
    let correct = logits.argmax(-1, false).eq_tensor(&test.labels).sum(tch::Kind::Int64).int64_value(&[]);
    correct as f64 / n as f64
}

/// Runs `predict --json --engine ENGINE` on `files` and returns the predicted classes in order.
fn predict(model: &Path, files: &[PathBuf], engine: &str) -> Vec<i64> {
    let mut args = vec!["predict", "--json", "--threads", "1", "--engine", engine, "--model", s(model)];
    args.extend(files.iter().map(|f| s(f)));
    let json: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    assert_eq!(json["engine"], engine);
    let rows = json["predictions"].as_array().unwrap();
    assert_eq!(rows.len(), files.len());
    rows.iter()
        .zip(files)
        .map(|(r, f)| {
            assert_eq!(r["file"], s(f));
            let top3 = r["top3"].as_array().unwrap();
            assert_eq!(top3.len(), 3);
            assert_eq!(top3[0]["class"], r["prediction"]);
            let p: Vec<f64> = top3.iter().map(|t| t["probability"].as_f64().unwrap()).collect();
            assert!(p[0] >= p[1] && p[1] >= p[2], "top-3 not in order: {p:?}");
            r["prediction"].as_i64().unwrap()
        })
        .collect()
}

#[test]
fn mnist_digits_as_files_are_read_as_well_as_the_originals() {
    let model = model();
    let (images, labels) = mnist_test();
    let dir = temp_dir("predict-variants");
    let names = ["plain", "inverted", "shifted", "300x300"];
    let mut files: Vec<Vec<PathBuf>> = vec![vec![]; names.len()];
    for (i, pixels) in images.iter().take(N).enumerate() {
        let plain = digit(pixels);
        let inverted = GrayImage::from_fn(28, 28, |x, y| Luma([255 - plain.get_pixel(x, y).0[0]]));
        // Off-centre in a larger black frame: 11 columns right and 3 rows down in 48x40.
        let mut shifted = GrayImage::new(48, 40);
        image::imageops::overlay(&mut shifted, &plain, 11, 3);
        // Blown up nearest-neighbour, by hand: image's generic resize runs unoptimised in a test.
        let big = GrayImage::from_fn(300, 300, |x, y| *plain.get_pixel(x * 28 / 300, y * 28 / 300));
        for (k, img) in [plain, inverted, shifted, big].into_iter().enumerate() {
            let path = dir.join(format!("{}-{i:03}.png", names[k]));
            img.save_with_format(&path, ImageFormat::Png).unwrap();
            files[k].push(path);
        }
    }
    let expected = model_accuracy(&model, N);
    assert!(expected > 0.85, "the model scores only {expected} on the first {N} test images");
    let predicted = predict(&model, &files.concat(), "libtorch");
    for (k, name) in names.iter().enumerate() {
        let right = (0..N).filter(|&i| predicted[k * N + i] == labels[i] as i64).count();
        let accuracy = right as f64 / N as f64;
        eprintln!("{name}: {accuracy:.3} on files; the model scores {expected:.3} on the tensors");
        assert!(
            (accuracy - expected).abs() <= TOLERANCE,
            "{name}: {accuracy:.3} on files vs {expected:.3} on the original tensors"
        );
    }
}

#[test]
fn every_format_gives_the_same_answer_and_the_saved_input_is_what_the_network_saw() {
    let model = model();
    let (images, labels) = mnist_test();
    let dir = temp_dir("predict-formats");
    let n = 12;
    let mut files = vec![];
    for (format, ext) in
        [(ImageFormat::Png, "png"), (ImageFormat::Bmp, "bmp"), (ImageFormat::Pnm, "pgm"), (ImageFormat::Jpeg, "jpg")]
    {
        for (i, pixels) in images.iter().take(n).enumerate() {
            // Dark ink on white paper, 4x larger: what a scan looks like.
            let paper = GrayImage::from_fn(28, 28, |x, y| Luma([255 - pixels[(y * 28 + x) as usize]]));
            let scan = image::imageops::resize(&paper, 112, 112, image::imageops::FilterType::Triangle);
            // The extension lies for one file in each format: the content decides.
            let path = dir.join(if i == 0 { format!("digit-{ext}-{i}.dat") } else { format!("digit-{ext}-{i}.{ext}") });
            scan.save_with_format(&path, format).unwrap();
            files.push(path);
        }
    }
    let predicted = predict(&model, &files, "libtorch");
    let (png, rest) = predicted.split_at(n);
    assert_eq!(&rest[..n], png, "BMP differs from PNG");
    assert_eq!(&rest[n..2 * n], png, "PGM differs from PNG");
    let jpeg_same = rest[2 * n..].iter().zip(png).filter(|(a, b)| a == b).count();
    assert!(jpeg_same >= n - 1, "JPEG agrees with PNG on only {jpeg_same} of {n}");
    let right = png.iter().zip(&labels).filter(|(p, l)| **p == **l as i64).count();
    assert!(right >= n - 2, "only {right} of {n} scans read right: {png:?}");
    assert_eq!(predict(&model, &files[..n], "direct"), png, "the direct engine reads the scans otherwise");

    // --save-preprocessed: a 32x32 image, 2 black pixels of padding, the digit inside close to
    // MNIST's own (mean difference under 10 of 255), and predicted the same when fed back.
    let saved = temp_dir("predict-saved");
    let out = ok(&["predict", "--threads", "1", "--model", s(&model), "--save-preprocessed", s(&saved), s(&files[1])]);
    assert!(out.starts_with(&format!("{}: {} ", s(&files[1]), png[1])), "{out}");
    let seen = image::open(saved.join("digit-png-1.png")).unwrap().to_luma8();
    assert_eq!(seen.dimensions(), (32, 32));
    let border = seen.enumerate_pixels().filter(|(x, y, _)| *x < 2 || *y < 2 || *x >= 30 || *y >= 30);
    assert!(border.clone().all(|(_, _, p)| p.0[0] == 0), "the padding is not black");
    let diff: f64 = (0..28 * 28)
        .map(|k| (seen.get_pixel(k % 28 + 2, k / 28 + 2).0[0] as f64 - images[1][k as usize] as f64).abs())
        .sum::<f64>()
        / 784.0;
    assert!(diff < 10.0, "the preprocessed scan differs from the MNIST original by {diff:.1} per pixel");
    let again = ok(&["predict", "--threads", "1", "--model", s(&model), s(&saved.join("digit-png-1.png"))]);
    assert!(again.contains(&format!(": {} ", png[1])), "{again}");
}

#[test]
fn files_that_are_not_digits_get_one_clear_line_each() {
    let model = model();
    let dir = temp_dir("predict-errors");
    let text = dir.join("notes.png");
    std::fs::write(&text, "this is not an image\n").unwrap();
    let empty = dir.join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    let blank = dir.join("blank.png");
    GrayImage::from_pixel(40, 30, Luma([250])).save_with_format(&blank, ImageFormat::Png).unwrap();
    let truncated = dir.join("truncated.png");
    let mut png = Vec::new();
    GrayImage::from_fn(64, 64, |x, y| Luma([((x * y) % 256) as u8]))
        .write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png)
        .unwrap();
    std::fs::write(&truncated, &png[..png.len() / 2]).unwrap();
    // A valid PNG header that claims 100,000 x 100,000 pixels (40 GB), and nothing else.
    let huge = dir.join("huge.png");
    let mut header = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    header.extend(100_000u32.to_be_bytes());
    header.extend(100_000u32.to_be_bytes());
    header.extend([8, 0, 0, 0, 0]);
    let crc = crc32(&header[12..]);
    header.extend(crc.to_be_bytes());
    std::fs::write(&huge, &header).unwrap();
    let good = dir.join("good.png");
    let (images, _) = mnist_test();
    digit(&images[0]).save_with_format(&good, ImageFormat::Png).unwrap();

    // One run over them all: each bad file gets its line on stderr, the good one its answer on
    // stdout, and the run fails because some could not be read.
    let missing = Path::new("/nonexistent/digit.png").to_path_buf();
    let files = [&good, &text, &empty, &blank, &truncated, &huge, &missing];
    let mut args = vec!["predict", "--threads", "1", "--model", s(&model)];
    args.extend(files.iter().map(|f| s(f)));
    let out = lenet5(&args);
    let err = clean_failure(&args, &out);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("{}: 7 ", s(&good))), "{out:?}");
    for message in [
        "notes.png: not an image this program reads (PNG, JPEG, BMP or PGM",
        "empty.png: the file is empty",
        "blank.png: the image is blank",
        "truncated.png: cannot decode the Png image",
        "huge.png: the Png image is too large to read",
        "/nonexistent/digit.png: cannot open",
        "6 of 7 images could not be read",
    ] {
        assert!(err.contains(message), "{message:?} not in {err}");
    }
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error: ")).count(),
        7,
        "one line per bad file and a summary:\n{err}"
    );
    // --json reports the same errors per file.
    args.insert(1, "--json");
    let json: serde_json::Value = serde_json::from_slice(&lenet5(&args).stdout).unwrap();
    let rows = json["predictions"].as_array().unwrap();
    assert_eq!(rows[0]["prediction"], 7);
    assert!(rows[2]["error"].as_str().unwrap().ends_with("empty.png: the file is empty"), "{}", rows[2]);
}

/// The CRC-32 of PNG chunks (ISO 3309), bit by bit.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn sixteen_bit_and_transparent_pngs_read_like_their_8_bit_originals() {
    let model = model();
    let (images, _) = mnist_test();
    let dir = temp_dir("predict-16bit-alpha");
    let mut files = vec![];
    for (i, pixels) in images.iter().take(20).enumerate() {
        let plain = digit(pixels);
        // 16-bit grayscale: every 8-bit value v becomes v * 257 (the same shade, full range).
        let deep = image::ImageBuffer::<Luma<u16>, Vec<u16>>::from_fn(28, 28, |x, y| {
            Luma([plain.get_pixel(x, y).0[0] as u16 * 257])
        });
        // Black ink on a fully transparent background, the way drawing apps export a stroke:
        // transparency counts as white paper, so this reads as dark ink on light paper.
        let stroke = image::RgbaImage::from_fn(28, 28, |x, y| image::Rgba([0, 0, 0, plain.get_pixel(x, y).0[0]]));
        let paths =
            [dir.join(format!("plain-{i}.png")), dir.join(format!("deep-{i}.png")), dir.join(format!("alpha-{i}.png"))];
        plain.save_with_format(&paths[0], ImageFormat::Png).unwrap();
        deep.save_with_format(&paths[1], ImageFormat::Png).unwrap();
        stroke.save_with_format(&paths[2], ImageFormat::Png).unwrap();
        files.extend(paths);
    }
    let predicted = predict(&model, &files, "libtorch");
    for (i, three) in predicted.chunks(3).enumerate() {
        assert_eq!(three[1], three[0], "image {i}: the 16-bit PNG reads differently");
        assert_eq!(three[2], three[0], "image {i}: the transparent PNG reads differently");
    }
}
