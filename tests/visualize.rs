//! `lenet5 visualize`: the pictures must show the numbers the model computes, checked pixel by
//! pixel against this test's own forward pass and evaluation. Needs MNIST in data/mnist.

mod support;

use image::RgbImage;
use lenet5::explain::visualize::{FILTER_ZOOM, INPUT_ZOOM, STAGE_PICTURES};
use lenet5::inference::Model;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use support::*;
use tch::{Device, Kind, Tensor};

/// One `visualize` run on the default image (the first 3 of the test set), shared by the tests:
/// its folder and what it printed.
fn pictures() -> &'static (PathBuf, String) {
    static RUN: OnceLock<(PathBuf, String)> = OnceLock::new();
    RUN.get_or_init(|| {
        let out = temp_dir("visualize");
        let printed = ok(&["visualize", "--model", s(&model()), "--out", s(&out), "--threads", "1"]);
        (out, printed)
    })
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

/// The documented scaling: `lo` black, `hi` white, round(255 (v - lo) / (hi - lo)).
fn gray(v: f32, lo: f32, hi: f32) -> i32 {
    if hi > lo {
        (255.0 * (v - lo) / (hi - lo)).round() as i32
    } else {
        0
    }
}

/// Checks every value of every map in a grid picture: the pixel in the middle of its
/// `zoom x zoom` square must be gray at exactly the documented level (the binary and this test
/// both compute on one CPU thread, so their floats agree to the bit).
fn assert_tiles(
    png: &RgbImage,
    origins: &[(u32, u32)],
    maps: &[Vec<f32>],
    cols: u32,
    zoom: u32,
    signed: bool,
    what: &str,
) {
    assert_eq!(origins.len(), maps.len(), "{what}: tile count");
    for (m, (map, &(x0, y0))) in maps.iter().zip(origins).enumerate() {
        let (mut lo, mut hi) =
            map.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        if signed {
            (lo, hi) = (-lo.abs().max(hi.abs()), lo.abs().max(hi.abs()));
        }
        for (k, &v) in map.iter().enumerate() {
            let (r, c) = (k as u32 / cols, k as u32 % cols);
            let p = png.get_pixel(x0 + c * zoom + zoom / 2, y0 + r * zoom + zoom / 2).0;
            assert!(p[0] == p[1] && p[1] == p[2], "{what} map {m} ({r},{c}) is not gray: {p:?}");
            let expected = gray(v, lo, hi);
            assert!(
                p[0] as i32 == expected,
                "{what} map {m} ({r},{c}): pixel {} for value {v} in [{lo}, {hi}], expected {expected}",
                p[0]
            );
        }
    }
}

/// This test's own view of the model: weights, test set, and the index of the first 3.
fn own_forward_pass(model: &Path) -> (Model, lenet5::data::Dataset, i64, HashMap<String, Tensor>) {
    tch::set_num_threads(1);
    let classifier = Model::load(model, &Default::default(), Device::Cpu).unwrap();
    let norm = classifier.card().expect("a model card").input.normalization;
    let test = lenet5::data::load_split(Path::new("data/mnist"), "t10k", norm).unwrap();
    let labels = Vec::<i64>::try_from(&test.labels).unwrap();
    let index = labels.iter().position(|&l| l == 3).unwrap() as i64;
    let mut stages = HashMap::new();
    let (_, net) = classifier.lenet5().expect("a safetensors model is native");
    let _logits = tch::no_grad(|| {
        net.forward_observed(&test.inputs_range(index, 1), &mut |name, t| {
            stages.insert(name.to_string(), t.copy());
        })
    });
    (classifier, test, index, stages)
}

#[test]
fn the_pictures_hold_the_activations_the_model_computes() {
    let (out, printed) = pictures();
    let (classifier, _test, index, stages) = own_forward_pass(&model());
    let (vs, net) = classifier.lenet5().expect("a safetensors model is native");

    let predicted = stages["output"].argmax(-1, false).int64_value(&[0]);
    assert!(printed.starts_with(&format!("test image #{index}: predicted {predicted} (")), "{printed}");
    for file in [
        "input.png",
        "conv1-filters.png",
        "c1.png",
        "s2.png",
        "c3.png",
        "s4.png",
        "probabilities.png",
        "confusion.png",
        "activations.safetensors",
    ] {
        assert!(printed.contains(&format!("{}  ", s(&out.join(file)))), "{file} not listed in\n{printed}");
    }

    // The saved activations are this test's own, stage by stage.
    let saved: HashMap<String, Tensor> =
        Tensor::read_safetensors(out.join("activations.safetensors")).unwrap().into_iter().collect();
    for stage in lenet5::model::STAGES {
        let diff = (&saved[stage] - &stages[stage]).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{stage}: the saved activations differ by {diff}");
    }

    // Each feature-map grid: size, then every value of every map.
    for (stage, file, columns, zoom) in STAGE_PICTURES {
        let png = image::open(out.join(file)).unwrap().to_rgb8();
        let a = &stages[stage]; // (1, C, H, W)
        let (c, h, w) = (a.size()[1] as u32, a.size()[2] as u32, a.size()[3] as u32);
        let rows = c.div_ceil(columns as u32);
        // Title band 36, each row of tiles H*zoom plus a 20-pixel caption, 12 between rows and below.
        assert_eq!(png.height(), 36 + rows * (h * zoom + 20) + (rows - 1) * 12 + 12, "{file} height");
        assert!(
            png.width() >= 24 + columns as u32 * w * zoom + (columns as u32 - 1) * 12,
            "{file} width {}",
            png.width()
        );
        // Where the tiles are comes from the library; what they show is checked against our numbers.
        let layout = lenet5::explain::visualize::stage_picture(stage, a, net.config).unwrap();
        assert_eq!(png.dimensions(), layout.image.dimensions(), "{file}");
        let maps: Vec<Vec<f32>> = values(a).chunks((h * w) as usize).map(<[f32]>::to_vec).collect();
        assert_tiles(&png, &layout.tile_origins, &maps, w, zoom, false, file);
    }

    let input = image::open(out.join("input.png")).unwrap().to_rgb8();
    let layout = lenet5::explain::visualize::input_picture(&stages["input"], "t").unwrap();
    assert_tiles(&input, &layout.tile_origins, &[values(&stages["input"])], 32, INPUT_ZOOM, false, "input.png");
    assert!(input.width() >= 32 * INPUT_ZOOM && input.height() == 36 + 32 * INPUT_ZOOM + 20 + 12);

    let filters = image::open(out.join("conv1-filters.png")).unwrap().to_rgb8();
    let vars = vs.variables();
    let layout = lenet5::explain::visualize::filters_picture(&vars["conv1.weight"], &vars["conv1.bias"]).unwrap();
    let maps: Vec<Vec<f32>> = values(&vars["conv1.weight"]).chunks(25).map(<[f32]>::to_vec).collect();
    assert_eq!(maps.len(), 6);
    assert_tiles(&filters, &layout.tile_origins, &maps, 5, FILTER_ZOOM, true, "conv1-filters.png");

    assert_eq!(image::open(out.join("probabilities.png")).unwrap().to_rgb8().dimensions(), (640, 400));
}

#[test]
fn the_confusion_matrix_and_the_mistakes_match_evaluation() {
    let (out, printed) = pictures();
    let model = model();
    let (classifier, test, _, _) = own_forward_pass(&model);
    let forward = |xs: &Tensor| classifier.forward(xs);
    let m = lenet5::inference::evaluate::evaluate(&forward, classifier.head(), &test, 1000).unwrap();

    // Every cell of the heat map has the colour of its share of the true class.
    let heat = image::open(out.join("confusion.png")).unwrap().to_rgb8();
    let (cell, left, top) = (
        lenet5::explain::pictures::HEAT_CELL,
        lenet5::explain::pictures::HEAT_LEFT,
        lenet5::explain::pictures::HEAT_TOP,
    );
    assert!(heat.width() >= left + 10 * cell && heat.height() >= top + 10 * cell);
    for (i, row) in m.confusion.iter().enumerate() {
        let total = row.iter().sum::<i64>() as f64;
        for (j, &count) in row.iter().enumerate() {
            let colour = lenet5::explain::pictures::heat_colour(count as f64 / total);
            let p = heat.get_pixel(left + j as u32 * cell + 3, top + i as u32 * cell + 3).0;
            assert_eq!(p, [colour.0, colour.1, colour.2], "cell ({i},{j}) holding {count} of {total}");
        }
    }
    let wrong = m.total - m.correct;
    assert!(
        printed.contains(&format!("confusion matrix: {} of {} test images right", m.correct, m.total)),
        "{printed}"
    );
    assert!(
        printed.contains(&format!("{} of the {wrong} test images the model gets wrong", wrong.min(36))),
        "{printed}"
    );
    let mistakes = image::open(out.join("mistakes.png")).unwrap().to_rgb8();
    let rows = (wrong.min(36) as u32).div_ceil(9);
    assert_eq!(mistakes.height(), 36 + rows * (28 * 3 + 20) + (rows - 1) * 12 + 12);

    // Training curves come from the run folder's metrics.jsonl, when there is one.
    if model.with_file_name("metrics.jsonl").is_file() {
        let curves = image::open(out.join("curves.png")).unwrap().to_rgb8();
        assert_eq!(curves.dimensions(), (960, 420));
    }
}

#[test]
fn torchscript_is_refused_and_your_own_image_can_be_followed() {
    let model = model();
    let dir = temp_dir("visualize-own");
    let script = model.with_extension("pt");
    assert!(script.is_file(), "train and export write {} beside the weights", script.display());
    let err = fails(&["visualize", "--model", s(&script), "--out", s(&dir)]);
    assert!(
        err.contains(&format!("{}: a TorchScript module", s(&script))) && err.contains("feature maps cannot be read"),
        "{err}"
    );
    let err = fails(&["visualize", "--model", s(&model), "--index", "10000", "--out", s(&dir)]);
    assert!(err.contains("--index 10000: the test set has images 0 to 9999"), "{err}");

    // Test digit 0 (a 7) as dark ink on white paper, three times larger.
    let (images, _) = mnist_test();
    let paper = image::GrayImage::from_fn(28, 28, |x, y| image::Luma([255 - images[0][(y * 28 + x) as usize]]));
    let file = dir.join("seven.png");
    image::imageops::resize(&paper, 84, 84, image::imageops::FilterType::Triangle).save(&file).unwrap();
    let printed = ok(&["visualize", "--model", s(&model), "--image", s(&file), "--out", s(&dir), "--threads", "1"]);
    assert!(printed.starts_with(&format!("{}: predicted 7 (", s(&file))), "{printed}");
    // input.png shows what `predict` feeds the network for that file.
    let prepared = lenet5::data::handwriting::load(&file).unwrap();
    let input = image::open(dir.join("input.png")).unwrap().to_rgb8();
    let seen = prepared.tensor(lenet5::data::DatasetKind::Mnist.normalization()); // (1, 1, 32, 32)
    let layout = lenet5::explain::visualize::input_picture(&seen, "t").unwrap();
    assert_tiles(&input, &layout.tile_origins, &[values(&seen)], 32, INPUT_ZOOM, false, "input.png of seven.png");
}
