//! LeNet-5 (LeCun et al. 1998) as a tch `nn` module, with PyTorch-identical parameter names.
//! The Python twin is `LeNet5` in `scripts/lenet5_ref.py`; both must keep the same names.

pub mod flops;
mod table;
pub use table::{layer_table, LayerRow};

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, Reduction, TchError, Tensor};

/// Side of the square input image: MNIST's 28x28 zero-padded by 2, as in the 1998 paper.
pub const INPUT_SIZE: i64 = 32;
/// Number of output classes.
pub const NUM_CLASSES: i64 = 10;

/// Which flavour of LeNet-5: the activation and the subsampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// ReLU and 2x2 max-pooling: what most notebooks mean by LeNet-5 today.
    Modern,
    /// tanh and 2x2 average-pooling subsampling, as in the 1998 paper.
    Classic,
}

/// How the ten output units are read: a softmax over classes or one sigmoid per class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// Cross-entropy on the logits (PyTorch's `nn.CrossEntropyLoss`).
    Softmax,
    /// Binary cross-entropy against one-hot targets (`nn.BCEWithLogitsLoss`).
    Sigmoid,
}

crate::named_values!(Arch { Modern => "modern", Classic => "classic" });
crate::named_values!(Head { Softmax => "softmax", Sigmoid => "sigmoid" });

impl Head {
    /// Mean loss of a batch of logits `(B, 10)` against integer labels `(B,)`.
    pub fn loss(self, logits: &Tensor, labels: &Tensor) -> Tensor {
        match self {
            Head::Softmax => logits.cross_entropy_for_logits(labels),
            Head::Sigmoid => {
                let targets = labels.one_hot(NUM_CLASSES).to_kind(logits.kind()); // (B, 10)
                logits.binary_cross_entropy_with_logits::<Tensor>(&targets, None, None, Reduction::Mean)
            }
        }
    }

    /// Per-class probabilities `(B, 10)`; for the sigmoid head they need not sum to one.
    pub fn probabilities(self, logits: &Tensor) -> Tensor {
        match self {
            Head::Softmax => logits.softmax(-1, Kind::Float),
            Head::Sigmoid => logits.sigmoid(),
        }
    }
}

/// What a model is, independent of its weights: saved beside every set of weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub head: Head,
}

impl ModelConfig {
    /// What `lenet5 train` and `lenet5.LeNet5()` build unless told otherwise.
    pub const DEFAULT: ModelConfig = ModelConfig { arch: Arch::Modern, head: Head::Softmax };
}

/// The layers in the order PyTorch registers them.
pub const LAYERS: [&str; 5] = ["conv1", "conv2", "fc1", "fc2", "fc3"];

/// The parameter names in the order of PyTorch's `model.parameters()` (each layer's weight,
/// then its bias), which is also the order of torch.optim's state indices.
pub fn parameter_names() -> Vec<String> {
    LAYERS.iter().flat_map(|l| [format!("{l}.weight"), format!("{l}.bias")]).collect()
}

/// The parameters in that order, with their shapes: what [`forward_with`] takes.
pub const PARAMETERS: [(&str, &[i64]); 10] = [
    ("conv1.weight", &[6, 1, 5, 5]),
    ("conv1.bias", &[6]),
    ("conv2.weight", &[16, 6, 5, 5]),
    ("conv2.bias", &[16]),
    ("fc1.weight", &[120, 400]),
    ("fc1.bias", &[120]),
    ("fc2.weight", &[84, 120]),
    ("fc2.bias", &[84]),
    ("fc3.weight", &[10, 84]),
    ("fc3.bias", &[10]),
];

/// The named stages of the forward pass, in order, for pictures and the summary table.
pub const STAGES: [&str; 8] = ["input", "C1", "S2", "C3", "S4", "F5", "F6", "output"];

#[derive(Debug)]
pub struct LeNet5 {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    fc1: nn::Linear,
    fc2: nn::Linear,
    fc3: nn::Linear,
    pub config: ModelConfig,
}

/// PyTorch's default initialisation of a Conv2d or Linear layer (`reset_parameters`):
/// `kaiming_uniform_(weight, a=sqrt(5))`, then the bias uniform in +-1/sqrt(fan_in), drawn in
/// that order from libtorch's generator with the bounds computed as torch computes them, so
/// `torch.manual_seed(s); LeNet5()` and `tch::manual_seed(s); LeNet5::new` start identical.
/// (tch's own initialisers draw the bias first, and round the bound differently.)
fn reset_parameters(weight: &mut Tensor, bias: &mut Tensor) {
    let fan_in = weight.size()[1..].iter().product::<i64>() as f64;
    let a = 5f64.sqrt();
    let gain = (2.0 / (1.0 + a * a)).sqrt(); // calculate_gain("leaky_relu", a)
    let std = gain / fan_in.sqrt();
    let bound = 3f64.sqrt() * std;
    tch::no_grad(|| {
        let _ = weight.uniform_(-bound, bound);
        let bound = 1.0 / fan_in.sqrt();
        let _ = bias.uniform_(-bound, bound);
    });
}

/// A 5x5 convolution layer; `init` draws its weights as PyTorch does, else they stay zero.
fn conv(p: nn::Path, c_in: i64, c_out: i64, init: bool) -> nn::Conv2D {
    let zero = nn::Init::Const(0.0); // drawn by reset_parameters, in PyTorch's order
    let mut conv = nn::conv2d(p, c_in, c_out, 5, nn::ConvConfig { ws_init: zero, bs_init: zero, ..Default::default() });
    if init {
        reset_parameters(&mut conv.ws, conv.bs.as_mut().expect("conv2d has a bias by default"));
    }
    conv
}

fn linear(p: nn::Path, d_in: i64, d_out: i64, init: bool) -> nn::Linear {
    let zero = nn::Init::Const(0.0);
    let mut linear = nn::linear(p, d_in, d_out, nn::LinearConfig { ws_init: zero, bs_init: Some(zero), bias: true });
    if init {
        reset_parameters(&mut linear.ws, linear.bs.as_mut().expect("built with bias: true"));
    }
    linear
}

fn activation(arch: Arch, xs: &Tensor) -> Result<Tensor, TchError> {
    match arch {
        Arch::Modern => xs.f_relu(),
        Arch::Classic => xs.f_tanh(),
    }
}

fn subsample(arch: Arch, xs: &Tensor) -> Result<Tensor, TchError> {
    match arch {
        Arch::Modern => xs.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false),
        // Not `avg_pool2d_default`: tch passes divisor_override = 1 there, which sums the
        // window instead of averaging it (caught by the PyTorch cross-check).
        Arch::Classic => xs.f_avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None),
    }
}

/// The forward pass of LeNet-5 over `params` (the [`PARAMETERS`], in that order), handing
/// every stage named in [`STAGES`] to `observe` on the way: the one sequence of libtorch ops
/// that [`LeNet5`] runs on its own layers and the Python twin on its `nn.Parameter`s (which
/// is why it takes bare tensors). With gradients enabled, autograd records it, as it records
/// PyTorch's `F.conv2d`, `F.linear`, ...: the same ops, so the same gradients, bit for bit.
pub fn forward_with(
    arch: Arch,
    params: [&Tensor; 10],
    xs: &Tensor,
    observe: &mut impl FnMut(&str, &Tensor),
) -> Result<Tensor, TchError> {
    let [conv1_w, conv1_b, conv2_w, conv2_b, fc1_w, fc1_b, fc2_w, fc2_b, fc3_w, fc3_b] = params;
    let conv = |xs: &Tensor, w: &Tensor, b: &Tensor| xs.f_conv2d(w, Some(b), [1, 1], [0, 0], [1, 1], 1); // nn.Conv2d's defaults
    observe("input", xs); // (B, 1, 32, 32)
    let c1 = activation(arch, &conv(xs, conv1_w, conv1_b)?)?; // (B, 6, 28, 28)
    observe("C1", &c1);
    let s2 = subsample(arch, &c1)?; // (B, 6, 14, 14)
    observe("S2", &s2);
    let c3 = activation(arch, &conv(&s2, conv2_w, conv2_b)?)?; // (B, 16, 10, 10)
    observe("C3", &c3);
    let s4 = subsample(arch, &c3)?; // (B, 16, 5, 5)
    observe("S4", &s4);
    let f5 = activation(arch, &s4.f_flatten(1, -1)?.f_linear(fc1_w, Some(fc1_b))?)?; // (B, 120)
    observe("F5", &f5);
    let f6 = activation(arch, &f5.f_linear(fc2_w, Some(fc2_b))?)?; // (B, 84)
    observe("F6", &f6);
    let logits = f6.f_linear(fc3_w, Some(fc3_b))?; // (B, 10)
    observe("output", &logits);
    Ok(logits)
}

impl LeNet5 {
    /// Builds the layers under `p`, named `conv1`, `conv2`, `fc1`, `fc2`, `fc3` as in PyTorch,
    /// and initialised as PyTorch does, layer by layer in this order.
    pub fn new(p: &nn::Path, config: ModelConfig) -> LeNet5 {
        LeNet5::build(p, config, true)
    }

    /// The same layers, all zeros, drawing nothing from libtorch's generator: for weights
    /// copied in next (a model file, the binding's `save`), so that reading a model leaves
    /// the caller's random stream (`torch.manual_seed`'s) where it was.
    pub fn zeros(p: &nn::Path, config: ModelConfig) -> LeNet5 {
        LeNet5::build(p, config, false)
    }

    fn build(p: &nn::Path, config: ModelConfig, init: bool) -> LeNet5 {
        LeNet5 {
            conv1: conv(p / "conv1", 1, 6, init),
            conv2: conv(p / "conv2", 6, 16, init),
            fc1: linear(p / "fc1", 16 * 5 * 5, 120, init),
            fc2: linear(p / "fc2", 120, 84, init),
            fc3: linear(p / "fc3", 84, NUM_CLASSES, init),
            config,
        }
    }

    /// The parameters, named as [`parameter_names`] gives them.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        parameter_names().into_iter().zip(self.tensors().map(Tensor::shallow_clone)).collect()
    }

    /// The ten tensors [`forward_with`] takes, in [`PARAMETERS`] order.
    pub fn tensors(&self) -> [&Tensor; 10] {
        fn bias(b: &Option<Tensor>) -> &Tensor {
            b.as_ref().expect("every layer is built with a bias")
        }
        let (c1, c2, f1, f2, f3) = (&self.conv1, &self.conv2, &self.fc1, &self.fc2, &self.fc3);
        [&c1.ws, bias(&c1.bs), &c2.ws, bias(&c2.bs), &f1.ws, bias(&f1.bs), &f2.ws, bias(&f2.bs), &f3.ws, bias(&f3.bs)]
    }

    /// The forward pass ([`forward_with`] on this model's layers), handing every stage named
    /// in [`STAGES`] to `observe` on the way. `forward` passes a no-op observer, which the
    /// compiler removes.
    pub fn forward_observed(&self, xs: &Tensor, observe: &mut impl FnMut(&str, &Tensor)) -> Tensor {
        // Panics where tch's infallible ops panic (a tensor libtorch refuses): the callers of
        // a `Module` have checked their inputs; the binding calls `forward_with` itself.
        forward_with(self.config.arch, self.tensors(), xs, observe)
            .unwrap_or_else(|e| panic!("LeNet-5 forward pass: {e}"))
    }

    /// Every stage named in [`STAGES`] of the forward pass of `xs`, without gradients,
    /// detached and on the CPU.
    pub fn stages(&self, xs: &Tensor) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        tch::no_grad(|| {
            let _logits = self
                .forward_observed(xs, &mut |name, t| out.push((name.to_string(), t.detach().to_device(Device::Cpu))));
        });
        out
    }
}

/// How many numbers the variables of `vs` hold: 61,706 for a LeNet-5.
pub fn parameter_count(vs: &nn::VarStore) -> i64 {
    vs.variables().values().map(|t| t.numel() as i64).sum()
}

impl Module for LeNet5 {
    /// Logits `(B, 10)` for a normalised batch `(B, 1, 32, 32)`.
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.forward_observed(xs, &mut |_, _| {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device};

    fn model(arch: Arch) -> (VarStore, LeNet5) {
        let vs = VarStore::new(Device::Cpu);
        let net = LeNet5::new(&vs.root(), ModelConfig { arch, head: Head::Softmax });
        (vs, net)
    }

    #[test]
    fn parameter_names_and_shapes_match_pytorch() {
        let (vs, _) = model(Arch::Modern);
        let mut got: Vec<(String, Vec<i64>)> = vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
        got.sort();
        let expected: Vec<(String, Vec<i64>)> = [
            ("conv1.bias", vec![6]),
            ("conv1.weight", vec![6, 1, 5, 5]),
            ("conv2.bias", vec![16]),
            ("conv2.weight", vec![16, 6, 5, 5]),
            ("fc1.bias", vec![120]),
            ("fc1.weight", vec![120, 400]),
            ("fc2.bias", vec![84]),
            ("fc2.weight", vec![84, 120]),
            ("fc3.bias", vec![10]),
            ("fc3.weight", vec![10, 84]),
        ]
        .into_iter()
        .map(|(n, s)| (n.to_string(), s))
        .collect();
        assert_eq!(got, expected);
        let listed: Vec<(String, Vec<i64>)> = PARAMETERS.iter().map(|(n, s)| (n.to_string(), s.to_vec())).collect();
        assert_eq!(listed.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(), parameter_names());
        let mut sorted = listed;
        sorted.sort();
        assert_eq!(sorted, expected);
        let total: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
        assert_eq!(total, 61_706);
    }

    #[test]
    fn every_stage_has_the_paper_shape() {
        for arch in [Arch::Modern, Arch::Classic] {
            let (_vs, net) = model(arch);
            let mut shapes = vec![];
            let xs = Tensor::zeros([3, 1, 32, 32], (Kind::Float, Device::Cpu));
            let _logits = net.forward_observed(&xs, &mut |name, t| shapes.push((name.to_string(), t.size())));
            let expected: Vec<(String, Vec<i64>)> = STAGES
                .iter()
                .zip([
                    vec![3, 1, 32, 32],
                    vec![3, 6, 28, 28],
                    vec![3, 6, 14, 14],
                    vec![3, 16, 10, 10],
                    vec![3, 16, 5, 5],
                    vec![3, 120],
                    vec![3, 84],
                    vec![3, 10],
                ])
                .map(|(n, s)| (n.to_string(), s))
                .collect();
            assert_eq!(shapes, expected, "{arch:?}");
        }
    }

    #[test]
    fn classic_subsampling_averages_each_2x2_window() {
        let (_vs, net) = model(Arch::Classic);
        let xs = Tensor::from_slice(&[1f32, 2.0, 3.0, 4.0]).view([1, 1, 2, 2]);
        assert_eq!(subsample(net.config.arch, &xs).unwrap().double_value(&[0, 0, 0, 0]), 2.5);
        assert_eq!(subsample(Arch::Modern, &xs).unwrap().double_value(&[0, 0, 0, 0]), 4.0);
    }

    #[test]
    fn initialisation_follows_pytorch_bounds() {
        let (vs, _) = model(Arch::Modern);
        // Tensors of 120 or more values, so the largest is above 0.8 of the bound but for a
        // chance below 1e-11 (conv2.bias, 16 values, missed it one run in 36: whichever seed
        // another test had just set).
        for (name, fan_in) in [("conv1.weight", 25.0), ("fc1.bias", 400.0), ("fc1.weight", 400.0)] {
            let t = vs.variables()[name].abs().max().double_value(&[]);
            let bound = 1.0 / f64::sqrt(fan_in);
            assert!(t <= bound && t > 0.8 * bound, "{name}: max |w| {t} vs bound {bound}");
        }
    }

    #[test]
    fn head_losses_match_their_formulas() {
        let xs: Vec<f64> = (0..10).map(|j| 0.3 * j as f64 - 1.5).collect();
        let logits = Tensor::from_slice(&xs).to_kind(Kind::Float).view([1, 10]);
        let labels = Tensor::from_slice(&[3i64]);
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        // Sigmoid head: mean over the 10 units of -[y ln s(x) + (1 - y) ln(1 - s(x))].
        let bce =
            -xs.iter().enumerate().map(|(j, &x)| if j == 3 { sig(x).ln() } else { (1.0 - sig(x)).ln() }).sum::<f64>()
                / 10.0;
        // Softmax head: -ln softmax(x)[label].
        let ce = -(xs[3] - xs.iter().map(|x| x.exp()).sum::<f64>().ln());
        for (head, manual) in [(Head::Sigmoid, bce), (Head::Softmax, ce)] {
            let got = head.loss(&logits, &labels).double_value(&[]);
            assert!((got - manual).abs() < 1e-5, "{head:?}: {got} vs {manual}");
        }
    }
}
