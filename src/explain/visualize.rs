//! `lenet5 visualize`: what a trained LeNet-5 does to one image, stage by stage, and how it does
//! overall (training curves, confusion matrix, its mistakes), as PNG files in one folder.

use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

use crate::data::{self, DatasetKind};
use crate::explain::pictures::{self, Picture, Series, Shading, Tile};
use crate::inference::Model;
use crate::model::{Arch, ModelConfig, NUM_CLASSES};

/// The feature-map pictures: stage, file, tiles per row, pixels per value.
pub const STAGE_PICTURES: [(&str, &str, usize, u32); 4] =
    [("C1", "c1.png", 6, 4), ("S2", "s2.png", 6, 8), ("C3", "c3.png", 8, 8), ("S4", "s4.png", 8, 16)];
/// Pixels per value of the input picture and of the conv1 filters.
pub const INPUT_ZOOM: u32 = 8;
pub const FILTER_ZOOM: u32 = 16;
/// Pixels per value of each 28x28 image in mistakes.png, and how many images per row.
const MISTAKE_ZOOM: u32 = 3;
const MISTAKE_COLUMNS: usize = 9;

/// What `visualize` draws and where: the test data, the image to follow (a test index or a
/// file) and the output folder.
#[derive(Debug, Clone)]
pub struct VisualizeConfig {
    pub dataset: DatasetKind,
    pub data: Option<PathBuf>,
    pub index: Option<i64>,
    pub image: Option<PathBuf>,
    pub out: PathBuf,
    /// Most misclassified test images drawn in mistakes.png.
    pub mistakes: usize,
}

/// What [`write`] wrote.
pub struct Report {
    /// `SOURCE: predicted ...` for the image followed.
    pub verdict: String,
    pub written: Vec<Written>,
    /// The safetensors file of every stage's activations.
    pub activations: PathBuf,
    /// The metrics file that was not there, so no training curves were drawn.
    pub missing_metrics: Option<PathBuf>,
}

/// A tensor's values as `f32`s on the CPU.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    Vec::<f32>::try_from(t.detach().to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1))
        .context("reading a tensor")
}

fn activation_name(config: ModelConfig) -> (&'static str, &'static str) {
    match config.arch {
        Arch::Modern => ("ReLU", "2x2 max-pool"),
        Arch::Classic => ("tanh", "2x2 average-pool"),
    }
}

/// The maps of one stage (`(1, C, H, W)`) as a grid, each map stretched from its own minimum
/// (black) to its maximum (white); the caption gives that range.
pub fn stage_picture(stage: &str, activation: &Tensor, config: ModelConfig) -> Result<Picture> {
    let &(_, _, columns, zoom) =
        STAGE_PICTURES.iter().find(|p| p.0 == stage).with_context(|| format!("no picture for stage {stage}"))?;
    let size = activation.size();
    ensure!(size.len() == 4 && size[0] == 1, "stage {stage}: expected (1, C, H, W), got {size:?}");
    let (c, h, w) = (size[1] as usize, size[2] as usize, size[3] as usize);
    let all = values(activation)?;
    let tiles: Vec<Tile> = all
        .chunks(h * w)
        .enumerate()
        .map(|(i, v)| {
            let (lo, hi) = Shading::Stretch.range(v);
            Tile {
                values: v.to_vec(),
                rows: h,
                cols: w,
                zoom,
                shading: Shading::Stretch,
                caption: format!(
                    "{}: {} to {}",
                    i + 1,
                    pictures::short_number(lo as f64, 2),
                    pictures::short_number(hi as f64, 2)
                ),
            }
        })
        .collect();
    let (act, pool) = activation_name(config);
    let how = match stage {
        "C1" => format!("conv1 (5x5) + {act}"),
        "S2" => format!("{pool} of C1"),
        "C3" => format!("conv2 (5x5 over the 6 S2 maps) + {act}"),
        _ => format!("{pool} of C3"),
    };
    let title = format!("{stage}: {c} maps of {h}x{w}, {how}; black = the map's min, white = its max");
    pictures::grid(&title, &tiles, columns)
}

/// The six 5x5 filters of conv1 (`(6, 1, 5, 5)`), gray = 0.
pub fn filters_picture(weight: &Tensor, bias: &Tensor) -> Result<Picture> {
    let w = values(weight)?;
    let b = values(bias)?;
    let tiles: Vec<Tile> = w
        .chunks(25)
        .zip(&b)
        .enumerate()
        .map(|(i, (v, bias))| Tile {
            values: v.to_vec(),
            rows: 5,
            cols: 5,
            zoom: FILTER_ZOOM,
            shading: Shading::Signed,
            caption: format!("{}: bias {}", i + 1, pictures::short_number(*bias as f64, 2)),
        })
        .collect();
    pictures::grid("conv1: the 6 learnt 5x5 filters (gray = 0, white > 0, black < 0)", &tiles, 6)
}

/// The 32x32 input, stretched from its minimum (black) to its maximum (white).
pub fn input_picture(image: &Tensor, title: &str) -> Result<Picture> {
    let tile = Tile {
        values: values(image)?,
        rows: 32,
        cols: 32,
        zoom: INPUT_ZOOM,
        shading: Shading::Stretch,
        caption: "32x32, normalised".into(),
    };
    pictures::grid(title, &[tile], 1)
}

/// Loss and accuracy per epoch, train and test.
pub fn curves_picture(history: &[crate::training::EpochMetrics], title: &str) -> Result<Picture> {
    // An epoch without a test evaluation has no test point.
    let series = |name, f: &dyn Fn(&crate::training::EpochMetrics) -> Option<f64>| Series {
        name,
        points: history.iter().filter_map(|m| Some((m.epoch as f64, f(m)?))).collect(),
    };
    pictures::curves(
        title,
        &[series("train", &|m| Some(m.train_loss)), series("test", &|m| m.test_loss)],
        &[
            series("train", &|m| Some(100.0 * m.train_accuracy)),
            series("test", &|m| m.test_accuracy.map(|a| 100.0 * a)),
        ],
    )
}

/// Short class labels for axes: the names when they are short, else the class numbers.
fn axis_labels(classes: &[String]) -> Vec<String> {
    if classes.iter().all(|c| c.chars().count() <= 3) {
        classes.to_vec()
    } else {
        (0..classes.len()).map(|i| i.to_string()).collect()
    }
}

/// What `visualize` wrote: each file with one line saying what it shows.
pub struct Written {
    pub path: PathBuf,
    pub what: String,
}

/// Draws every picture of `model` into `c.out`.
pub fn write(model: &Model, c: &VisualizeConfig) -> Result<Report> {
    let device = model.device();
    let (vs, net) = model.require_lenet5(
        "its feature maps cannot be read; give visualize the weights instead (the .safetensors file beside it)",
    )?;
    let card = model.card();
    let dataset = card.map(|c| c.dataset).unwrap_or(c.dataset);
    let norm = card.map(|c| c.input.normalization).unwrap_or_else(|| dataset.normalization());
    let classes = card.map(|c| c.classes.clone()).unwrap_or_else(|| dataset.class_names());
    let test = data::load_test(dataset, c.data.as_deref(), norm)?.to_device(device);
    let out = &c.out;
    std::fs::create_dir_all(out)
        .map_err(|e| crate::setting::invalid("out", out.display(), format!("cannot create the folder ({e})")))?;
    let mut written = Vec::new();
    let mut save = |picture: Picture, file: &str, what: String| -> Result<()> {
        let path = out.join(file);
        picture.save(&path)?;
        written.push(Written { path, what });
        Ok(())
    };

    // One image through the network.
    let (image, source, truth) = match &c.image {
        Some(path) => {
            let prepared = crate::data::handwriting::load(path)?;
            (prepared.tensor(norm).to_device(device), path.display().to_string(), None)
        }
        None => {
            let i = super::pick_index(&test, c.index)?;
            let label = test.labels.int64_value(&[i]);
            (test.inputs_range(i, 1), format!("test image #{i}"), Some(label))
        }
    };
    let stages = net.stages(&image);
    let stage =
        |name: &str| stages.iter().find(|(n, _)| n == name).map(|(_, t)| t).context("a stage the model always reports");
    let truth_text = truth.map(|t| format!(", label {}", classes[t as usize])).unwrap_or_default();
    save(
        input_picture(stage("input")?, &format!("Input: {source}{truth_text}"))?,
        "input.png",
        format!("the 32x32 input ({source}{truth_text})"),
    )?;
    let vars = vs.variables();
    let (weight, bias) =
        (vars.get("conv1.weight").context("conv1.weight")?, vars.get("conv1.bias").context("conv1.bias")?);
    save(filters_picture(weight, bias)?, "conv1-filters.png", "the 6 learnt 5x5 filters of conv1".into())?;
    for (name, file, _, _) in STAGE_PICTURES {
        let t = stage(name)?;
        let s = t.size();
        save(stage_picture(name, t, net.config)?, file, format!("the {} {name} maps ({}x{})", s[1], s[2], s[3]))?;
    }
    let probabilities: Vec<f64> =
        values(&net.config.head.probabilities(stage("output")?))?.into_iter().map(f64::from).collect();
    let best = (0..probabilities.len()).max_by(|&a, &b| probabilities[a].total_cmp(&probabilities[b])).unwrap_or(0);
    let verdict = format!("predicted {} ({:.1}%){truth_text}", classes[best], 100.0 * probabilities[best]);
    save(
        pictures::bar_chart(&format!("Output probabilities: {verdict}"), &axis_labels(&classes), &probabilities)?,
        "probabilities.png",
        format!("the output probabilities: {verdict}"),
    )?;
    let activations = out.join("activations.safetensors");
    let named: Vec<(String, Tensor)> =
        stages.iter().map(|(n, t)| (n.clone(), t.to_kind(Kind::Float).contiguous())).collect();
    crate::atomic::write_with(&activations, |tmp| {
        Tensor::write_safetensors(&named, tmp).map_err(|e| anyhow::anyhow!("{}: {e}", tmp.display()))
    })?;

    // The run that made the model: its metrics file sits beside the weights.
    let metrics =
        model.path().and_then(Path::parent).unwrap_or(Path::new(".")).join(crate::training::run::METRICS_FILE);
    let skipped_curves = if metrics.is_file() {
        let history = crate::training::run::read_metrics(&metrics)?;
        save(
            curves_picture(
                &history,
                &format!(
                    "Training: {} epoch{}, from {}",
                    history.len(),
                    if history.len() == 1 { "" } else { "s" },
                    metrics.display()
                ),
            )?,
            "curves.png",
            format!("loss and accuracy per epoch, from {}", metrics.display()),
        )?;
        None
    } else {
        Some(metrics)
    };

    // The whole test set: confusion matrix and mistakes.
    let predicted = model.predicted_classes(&test.all_inputs())?;
    let labels = Vec::<i64>::try_from(test.labels.to_device(Device::Cpu))?;
    let mut confusion = vec![vec![0i64; NUM_CLASSES as usize]; NUM_CLASSES as usize];
    for (&t, &p) in labels.iter().zip(&predicted) {
        confusion[t as usize][p as usize] += 1;
    }
    let wrong: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] != predicted[i]).collect();
    let accuracy = 1.0 - wrong.len() as f64 / labels.len().max(1) as f64;
    let summary =
        format!("{} of {} test images right ({:.2}%)", labels.len() - wrong.len(), labels.len(), 100.0 * accuracy);
    save(
        pictures::heat_map(&format!("Confusion matrix: {summary}"), &axis_labels(&classes), &confusion)?,
        "confusion.png",
        format!("the confusion matrix: {summary}"),
    )?;
    let shown = &wrong[..wrong.len().min(c.mistakes)];
    if !shown.is_empty() {
        let pad = data::PAD;
        let short = axis_labels(&classes);
        let tiles = shown
            .iter()
            .map(|&i| {
                let img = test.inputs_range(i as i64, 1).squeeze().narrow(0, pad, 28).narrow(1, pad, 28); // (28, 28)
                Ok(Tile {
                    values: values(&img)?,
                    rows: 28,
                    cols: 28,
                    zoom: MISTAKE_ZOOM,
                    shading: Shading::Stretch,
                    caption: format!("#{i}: {} → {}", short[labels[i] as usize], short[predicted[i] as usize]),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let title = format!("The model's mistakes: {} of {} test images (true → predicted)", wrong.len(), labels.len());
        save(
            pictures::grid(&title, &tiles, MISTAKE_COLUMNS)?,
            "mistakes.png",
            format!("{} of the {} test images the model gets wrong (true → predicted)", shown.len(), wrong.len()),
        )?;
    }

    Ok(Report { verdict: format!("{source}: {verdict}"), written, activations, missing_metrics: skipped_curves })
}
