//! Predictions from logits: each image's classes ranked by probability, for `lenet5 predict`,
//! the web page and the binding.

use anyhow::{Context, Result};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::model::Head;

/// One image's result: the classes ranked by probability.
#[derive(Debug, Clone)]
pub struct Prediction {
    pub probabilities: Vec<f64>,
    /// Class indices, likeliest first.
    pub ranked: Vec<usize>,
}

/// Class probabilities of a batch of prepared images `(B, 1, 32, 32)`.
pub fn predict(model: &super::Model, inputs: &Tensor) -> Result<Vec<Prediction>> {
    let logits = tch::no_grad(|| model.forward(inputs))?;
    from_logits(model.head(), &logits)
}

/// The predictions of a batch of logits `(B, 10)` read by `head`.
pub fn from_logits(head: Head, logits: &Tensor) -> Result<Vec<Prediction>> {
    let probabilities = tch::no_grad(|| head.probabilities(logits));
    let rows = Vec::<Vec<f64>>::try_from(probabilities.to_device(Device::Cpu).to_kind(Kind::Double))
        .context("reading the probabilities")?;
    Ok(rows
        .into_iter()
        .map(|p| {
            let mut ranked: Vec<usize> = (0..p.len()).collect();
            ranked.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
            Prediction { probabilities: p, ranked }
        })
        .collect())
}

impl Prediction {
    /// The fields `predict --json` prints for an image (and `serve` answers): `prediction`,
    /// `label`, `top3` and all `probabilities`, with the classes named by `classes`.
    pub fn to_json(&self, classes: &[String]) -> serde_json::Map<String, serde_json::Value> {
        let best = self.ranked[0];
        let top3: Vec<_> = self
            .ranked
            .iter()
            .take(3)
            .map(|&c| json!({ "class": c, "label": classes[c], "probability": self.probabilities[c] }))
            .collect();
        serde_json::Map::from_iter([
            ("prediction".to_string(), json!(best)),
            ("label".to_string(), json!(classes[best])),
            ("top3".to_string(), json!(top3)),
            ("probabilities".to_string(), json!(self.probabilities)),
        ])
    }
}
