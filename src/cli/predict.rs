//! `lenet5 predict IMAGE...`: the digit in each of your own images and the three likeliest
//! classes, after the MNIST-style preprocessing of `handwriting`.

use anyhow::{bail, Context, Result};
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use tch::Tensor;

use lenet5::data::handwriting::{self, Prepared};
use lenet5::inference::card_path;
use lenet5::inference::predict::predict;

use super::{EngineArgs, ModelArgs, RuntimeArgs};

#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    /// Image files: PNG, JPEG, BMP or PGM/PPM/PBM (recognised by content), dark ink on light
    /// paper or light on dark.
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub compute: EngineArgs,
    /// Print one JSON object instead of a line per image.
    #[arg(long)]
    pub json: bool,
    /// Write the 32x32 image the network saw for each IMAGE as DIR/NAME.png.
    #[arg(long, value_name = "DIR")]
    pub save_preprocessed: Option<PathBuf>,
}

/// `DIR/STEM.png` for each image, with `-2`, `-3`... when two images share a stem.
fn preprocessed_names(images: &[PathBuf]) -> Vec<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    images
        .iter()
        .map(|p| {
            let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
            let n = seen.entry(stem.clone()).or_insert(0);
            *n += 1;
            if *n == 1 {
                format!("{stem}.png")
            } else {
                format!("{stem}-{n}.png")
            }
        })
        .collect()
}

pub fn run(args: &PredictArgs) -> Result<()> {
    let device = args.runtime.apply()?;
    let classifier = args.model.load(device)?.with_engine(args.compute.engine)?;
    // A TorchScript file carries no card; the card written beside it by `export` still says
    // how its inputs were normalised.
    let card = match classifier.card() {
        Some(c) => Some(c.clone()),
        None => {
            let path = card_path(classifier.path().context("a loaded model has its file")?);
            if path.is_file() {
                Some(lenet5::formats::card::ModelCard::read(&path)?)
            } else {
                None
            }
        }
    };
    let dataset = card.as_ref().map(|c| c.dataset).unwrap_or(lenet5::data::DatasetKind::Mnist);
    let norm = card.as_ref().map(|c| c.input.normalization).unwrap_or_else(|| dataset.normalization());
    let classes = card.as_ref().map(|c| c.classes.clone()).unwrap_or_else(|| dataset.class_names());

    let prepared: Vec<Result<Prepared>> = args.images.iter().map(|p| handwriting::load(p)).collect();
    let good: Vec<&Prepared> = prepared.iter().filter_map(|p| p.as_ref().ok()).collect();
    let predictions = if good.is_empty() {
        vec![]
    } else {
        let batch = Tensor::cat(&good.iter().map(|p| p.tensor(norm)).collect::<Vec<_>>(), 0).to_device(device); // (B, 1, 32, 32)
        predict(&classifier, &batch)?
    };
    if let Some(dir) = &args.save_preprocessed {
        for (p, name) in prepared.iter().zip(preprocessed_names(&args.images)) {
            if let Ok(p) = p {
                lenet5::atomic::write(&dir.join(name), &p.png()?)?;
            }
        }
    }

    let mut results = predictions.iter();
    let mut failures = 0;
    let mut json_rows = Vec::new();
    for (path, p) in args.images.iter().zip(&prepared) {
        let file = path.display().to_string();
        match p {
            Err(e) => {
                failures += 1;
                if args.json {
                    json_rows.push(json!({ "file": file, "error": format!("{e:#}") }));
                } else {
                    eprintln!("error: {e:#}");
                }
            }
            Ok(p) => {
                let r = results.next().context("one prediction per image read")?;
                let best = r.ranked[0];
                if args.json {
                    let mut row = serde_json::Map::from_iter([("file".to_string(), json!(file))]);
                    row.extend(r.to_json(&classes));
                    row.insert("inverted".into(), json!(p.inverted));
                    json_rows.push(serde_json::Value::Object(row));
                } else {
                    let top3: Vec<String> = r
                        .ranked
                        .iter()
                        .take(3)
                        .map(|&c| format!("{} {:.1}%", classes[c], 100.0 * r.probabilities[c]))
                        .collect();
                    println!("{file}: {}   ({})", classes[best], top3.join(", "));
                }
            }
        }
    }
    if args.json {
        println!(
            "{}",
            json!({ "model": args.model.model, "engine": classifier.engine().as_str(), "predictions": json_rows })
        );
    }
    if failures > 0 {
        bail!("{failures} of {} images could not be read", args.images.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocessed_files_get_distinct_names() {
        let names = preprocessed_names(&["a/x.png".into(), "b/x.jpg".into(), "y.bmp".into(), "c/x.png".into()]);
        assert_eq!(names, ["x.png", "x-2.png", "y.png", "x-3.png"]);
    }
}
