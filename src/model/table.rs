//! The layer table: each stage's layer, output shape and parameter count, read off the model's
//! own forward pass of one blank image.

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::{Arch, Head, LeNet5, ModelConfig, STAGES};

/// One stage of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerRow {
    pub stage: &'static str,
    /// The layer holding its parameters (`conv1`), None for the input and the subsampling.
    pub layer: Option<&'static str>,
    pub kind: &'static str,
    /// The output shape of one image.
    pub shape: Vec<i64>,
    pub parameters: i64,
}

/// Each of [`STAGES`]' layer and kind.
const LAYERS: [(Option<&str>, &str); 8] = [
    (None, "input"),
    (Some("conv1"), "5x5 conv"),
    (None, "2x2 pool"),
    (Some("conv2"), "5x5 conv"),
    (None, "2x2 pool"),
    (Some("fc1"), "linear"),
    (Some("fc2"), "linear"),
    (Some("fc3"), "linear"),
];

/// The table of a LeNet-5 of `arch`; its parameters add up to 61,706.
pub fn layer_table(arch: Arch) -> Vec<LayerRow> {
    let vs = VarStore::new(Device::Cpu);
    let net = LeNet5::new(&vs.root(), ModelConfig { arch, head: Head::Softmax });
    let params = vs.variables();
    let count = |layer: &str| -> i64 {
        params.iter().filter(|(k, _)| k.starts_with(&format!("{layer}."))).map(|(_, t)| t.numel() as i64).sum()
    };
    let xs = Tensor::zeros([1, 1, 32, 32], (Kind::Float, Device::Cpu));
    net.stages(&xs)
        .into_iter()
        .zip(STAGES.iter().zip(LAYERS))
        .map(|((_, t), (&stage, (layer, kind)))| LayerRow {
            stage,
            layer,
            kind,
            shape: t.size()[1..].to_vec(),
            parameters: layer.map_or(0, count),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// By hand: C1 6·(25+1), C3 16·(6·25+1), F5 120·(400+1), F6 84·(120+1), output 10·(84+1).
    #[test]
    fn the_table_counts_what_a_hand_count_gives() {
        let rows = layer_table(Arch::Modern);
        let params: Vec<i64> = rows.iter().map(|r| r.parameters).collect();
        assert_eq!(params, [0, 156, 0, 2416, 0, 48120, 10164, 850]);
        assert_eq!(params.iter().sum::<i64>(), 61_706);
        let shapes: Vec<Vec<i64>> = rows.iter().map(|r| r.shape.clone()).collect();
        assert_eq!(
            shapes,
            [
                vec![1, 32, 32],
                vec![6, 28, 28],
                vec![6, 14, 14],
                vec![16, 10, 10],
                vec![16, 5, 5],
                vec![120],
                vec![84],
                vec![10]
            ]
        );
    }
}
