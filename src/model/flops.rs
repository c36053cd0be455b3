//! The arithmetic of one image, counted from the layer table by the convention the benchmarks
//! state: 2 FLOP per multiply-add of the convolutions and linear layers (activations,
//! subsampling, biases and the loss are left out). A training step adds each layer's weight
//! gradient and its input gradient, except the first layer's input gradient: the image needs none.

use super::{layer_table, Arch, PARAMETERS};

/// Multiply-adds of one layer for one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerMacs {
    pub stage: &'static str,
    pub layer: &'static str,
    /// Each output reads every input its weights see: outputs x fan-in.
    pub forward: i64,
    /// Each weight's gradient sums over the outputs it fed: as many as the forward pass.
    pub weight_gradient: i64,
    /// As many again, sent back to the layer's input; none for the first layer.
    pub input_gradient: i64,
}

/// Every layer's multiply-adds, in the order of the forward pass, from the output shapes of the
/// layer table and the weight shapes of [`PARAMETERS`] (both variants have the same).
pub fn layer_macs() -> Vec<LayerMacs> {
    let rows = layer_table(Arch::Modern);
    let layers = rows.iter().filter_map(|row| Some((row, row.layer?)));
    layers
        .enumerate()
        .map(|(i, (row, layer))| {
            let weight = PARAMETERS
                .iter()
                .find(|(name, _)| name.strip_suffix(".weight") == Some(layer))
                .map(|(_, shape)| *shape)
                .expect("every layer of the table has a weight in PARAMETERS");
            let fan_in: i64 = weight[1..].iter().product(); // (out, in[, ky, kx])
            let forward = row.shape.iter().product::<i64>() * fan_in;
            LayerMacs {
                stage: row.stage,
                layer,
                forward,
                weight_gradient: forward,
                input_gradient: if i == 0 { 0 } else { forward },
            }
        })
        .collect()
}

/// FLOP of one image's forward pass.
pub fn inference_flop() -> i64 {
    2 * layer_macs().iter().map(|l| l.forward).sum::<i64>()
}

/// FLOP of one image's share of a training step: forward pass, weight and input gradients.
pub fn training_flop() -> i64 {
    2 * layer_macs().iter().map(|l| l.forward + l.weight_gradient + l.input_gradient).sum::<i64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// By hand, from LeNet-5's shapes: outputs (maps x side x side, or units) times the inputs
    /// each reads (in maps x 5 x 5, or in units).
    #[test]
    fn each_layer_counts_what_a_hand_count_gives() {
        let c1 = 6 * 28 * 28 * (5 * 5);
        let c3 = 16 * 10 * 10 * (6 * 5 * 5);
        let f5 = 120 * (16 * 5 * 5);
        let f6 = 84 * 120;
        let output = 10 * 84;
        let by_hand =
            [("C1", "conv1", c1), ("C3", "conv2", c3), ("F5", "fc1", f5), ("F6", "fc2", f6), ("output", "fc3", output)];
        let got = layer_macs();
        assert_eq!(got.len(), by_hand.len());
        for (l, (stage, layer, macs)) in got.iter().zip(by_hand) {
            let input_gradient = if layer == "conv1" { 0 } else { macs };
            assert_eq!(l, &LayerMacs { stage, layer, forward: macs, weight_gradient: macs, input_gradient }, "{layer}");
        }
        assert_eq!(c1 + c3 + f5 + f6 + output, 416_520);
        assert_eq!(inference_flop(), 2 * 416_520);
        assert_eq!(training_flop(), 2 * (3 * 416_520 - c1)); // 2,263,920
    }
}
