//! A model's loss, accuracy and confusion matrix on a data set, returned rather than printed so
//! the CLI, the binding, the tests and the benchmarks share it.

use anyhow::{bail, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::data::Dataset;
use crate::model::{Head, NUM_CLASSES};

/// Loss, accuracy and the confusion matrix of a model on a data set.
#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    pub loss: f64,
    pub correct: i64,
    pub total: i64,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<i64>>,
}

impl Metrics {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }

    pub fn per_class_accuracy(&self) -> Vec<f64> {
        self.confusion
            .iter()
            .enumerate()
            .map(|(c, row)| row[c] as f64 / row.iter().sum::<i64>().max(1) as f64)
            .collect()
    }
}

/// Evaluates `forward` (normalised images -> logits) on `data` in batches, without gradients.
pub fn evaluate(
    forward: &dyn Fn(&Tensor) -> Result<Tensor>,
    head: Head,
    data: &Dataset,
    batch_size: i64,
) -> Result<Metrics> {
    tch::no_grad(|| {
        let device = data.device();
        let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
        let mut confusion = Tensor::zeros([NUM_CLASSES * NUM_CLASSES], (Kind::Int64, device));
        let n = data.len();
        for start in (0..n).step_by(batch_size as usize) {
            let len = batch_size.min(n - start);
            let xs = data.inputs_range(start, len);
            let ys = data.labels.narrow(0, start, len);
            let logits = forward(&xs)?;
            if logits.size() != [len, NUM_CLASSES] {
                bail!(
                    "the model returned shape {:?} for a batch of {len}; expected [{len}, {NUM_CLASSES}]",
                    logits.size()
                );
            }
            loss_sum += head.loss(&logits, &ys).to_kind(Kind::Double) * len as f64;
            let pairs = &ys * NUM_CLASSES + logits.argmax(-1, false); // true * 10 + predicted
            confusion += pairs.bincount::<Tensor>(None, NUM_CLASSES * NUM_CLASSES);
        }
        let confusion = Vec::<i64>::try_from(confusion.to_device(Device::Cpu))?;
        let confusion: Vec<Vec<i64>> = confusion.chunks(NUM_CLASSES as usize).map(<[i64]>::to_vec).collect();
        let correct = (0..NUM_CLASSES as usize).map(|c| confusion[c][c]).sum();
        Ok(Metrics { loss: loss_sum.double_value(&[]) / n.max(1) as f64, correct, total: n, confusion })
    })
}
