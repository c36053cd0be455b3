//! The direct engine's training pass (`lenet5 train --engine direct`): a batch's logits, mean
//! loss and the gradient of that loss for every parameter, from the forward loops of the
//! parent module and, stage by stage backwards, their transposes. No autograd and no libtorch
//! kernels: the optimizer step stays the project's (`optim.rs`), fed these gradients. The same
//! pass started from a given gradient of the logits ([`DirectTraining::backward`]) is the
//! backward pass the Python twin's autograd calls, for any loss.
//!
//! Each thread takes a contiguous share of the batch and adds its images' gradients into its
//! own sums; the sums are then added in thread order, so a batch's gradients repeat exactly
//! for a given thread count (and differ from another count's only in rounding).

use anyhow::{ensure, Result};
use tch::{nn::VarStore, Tensor};

use super::*;
use crate::model::Head;

/// What one batch gives the optimizer.
pub struct Step {
    /// `(B, 10)`, as the forward pass gives them.
    pub logits: Tensor,
    /// The head's mean loss over the batch, a float scalar.
    pub loss: Tensor,
    /// d loss / d parameter, every parameter flattened and concatenated in PyTorch's order
    /// ([`crate::model::parameter_names`]): what [`crate::training::optim::Optimizer::step_flat`] takes.
    pub gradient: Tensor,
}

/// A [`DirectNet`] that trains: its weights are read from the VarStore before every batch;
/// each thread's gradient sums and buffers are kept from batch to batch.
pub struct DirectTraining {
    net: DirectNet,
    scratch: Vec<Scratch>,
}

/// How one thread computes a share of the batch: `DirectNet::share_with` in some lanes.
type Share = fn(&DirectNet, &Conv2ByOutput, &[f32], Start, &mut [f32], &mut Scratch) -> f64;

/// Where the backward pass starts, for each image of a batch.
#[derive(Clone, Copy)]
enum Start<'a> {
    /// Its label: the head's loss, whose gradient is made here, each image's times the factor
    /// (the mean's 1/B).
    Labels(&'a [i64], f32),
    /// The gradient of some loss with respect to its logits, 10 values per image.
    LogitGradient(&'a [f32]),
}

impl<'a> Start<'a> {
    fn images(&self) -> usize {
        match self {
            Start::Labels(labels, _) => labels.len(),
            Start::LogitGradient(d) => d.len() / CLASSES,
        }
    }

    /// Images `from..to` of the batch.
    fn range(self, from: usize, to: usize) -> Start<'a> {
        match self {
            Start::Labels(labels, scale) => Start::Labels(&labels[from..to], scale),
            Start::LogitGradient(d) => Start::LogitGradient(&d[from * CLASSES..to * CLASSES]),
        }
    }
}

/// Images a thread takes through the linear layers together: one matrix product per layer
/// and direction for all of them, so each layer's weights and weight gradient (fc1's are
/// 200 KB each) pass through the cache once per `MICRO` images instead of once per image.
const MICRO: usize = 32;

/// One thread's memory: its gradient sums (laid out as the weights), what the backward pass
/// reads of each image of a micro-batch, and the linear layers' rows.
struct Scratch {
    sums: Box<Weights>,
    kept: Vec<Kept>,
    rows: Box<Rows>,
}

/// One image's convolutional stages as the backward pass reads them: the padded input, C1
/// and C3 as [`subsample`] leaves them, S2 and S4.
struct Kept {
    image: [[f32; IMAGE_WIDE]; SIDE],
    c1: Maps<C1_MAPS, C1_SIDE, C1_WIDE>,
    s2: Maps<C1_MAPS, S2_SIDE, S2_SIDE>,
    c3: Maps<C3_MAPS, C3_SIDE, C3_SIDE>,
    s4: Maps<C3_MAPS, S4_SIDE, S4_SIDE>,
}

/// A micro-batch's rows through the linear layers (each row one image), and their gradients.
struct Rows {
    flat: [[f32; FLAT]; MICRO],
    f5: [[f32; F5_WIDE]; MICRO],
    f6: [[f32; F6_WIDE]; MICRO],
    out: [[f32; CLASSES_WIDE]; MICRO],
    d_flat: [[f32; FLAT]; MICRO],
    d5: [[f32; F5_WIDE]; MICRO],
    d6: [[f32; F6_WIDE]; MICRO],
    d_out: [[f32; CLASSES_WIDE]; MICRO],
}

impl Scratch {
    fn new() -> Scratch {
        let kept = (0..MICRO)
            .map(|_| Kept {
                image: [[0.0; IMAGE_WIDE]; SIDE],
                c1: [[[0.0; C1_WIDE]; C1_SIDE]; C1_MAPS],
                s2: [[[0.0; S2_SIDE]; S2_SIDE]; C1_MAPS],
                c3: [[[0.0; C3_SIDE]; C3_SIDE]; C3_MAPS],
                s4: [[[0.0; S4_SIDE]; S4_SIDE]; C3_MAPS],
            })
            .collect();
        let rows = Box::new(Rows {
            flat: [[0.0; FLAT]; MICRO],
            f5: [[0.0; F5_WIDE]; MICRO],
            f6: [[0.0; F6_WIDE]; MICRO],
            out: [[0.0; CLASSES_WIDE]; MICRO],
            d_flat: [[0.0; FLAT]; MICRO],
            d5: [[0.0; F5_WIDE]; MICRO],
            d6: [[0.0; F6_WIDE]; MICRO],
            d_out: [[0.0; CLASSES_WIDE]; MICRO],
        });
        Scratch { sums: Weights::zeroed(), kept, rows }
    }
}

impl DirectTraining {
    /// The engine for the LeNet-5 in `vs` (on the CPU), splitting batches across up to
    /// `threads` threads.
    pub fn new(vs: &VarStore, config: ModelConfig, threads: usize) -> Result<DirectTraining> {
        crate::check_setting!(
            vs.device() == Device::Cpu,
            "device",
            format!("{:?}", vs.device()),
            "the direct engine trains on the CPU"
        );
        Ok(DirectTraining { net: DirectNet::new(vs, config, threads)?, scratch: vec![] })
    }

    /// The forward pass with the current weights of `vs`, for evaluating during training.
    pub fn net(&mut self, vs: &VarStore) -> Result<&DirectNet> {
        self.net.weights.load(vs)?;
        Ok(&self.net)
    }

    /// The logits, mean loss and gradients of a normalised batch `xs` `(B, 1, 32, 32)` with
    /// labels `ys` `(B,)`, at the current weights of `vs`.
    pub fn step(&mut self, vs: &VarStore, xs: &Tensor, ys: &Tensor) -> Result<Step> {
        self.step_in(vs, xs, ys, DirectNet::share)
    }

    fn step_in(&mut self, vs: &VarStore, xs: &Tensor, ys: &Tensor, share: Share) -> Result<Step> {
        self.net.weights.load(vs)?;
        let batch = pixels_of(xs)?;
        let pixels = values::of(&batch);
        let images = pixels.len() / PIXELS;
        let labels = Vec::<i64>::try_from(ys.to_device(Device::Cpu).f_to_kind(Kind::Int64)?.view(-1))?;
        ensure!(labels.len() == images && images > 0, "a batch of {images} images has {} labels", labels.len());
        if let Some(bad) = labels.iter().find(|&&y| !(0..CLASSES as i64).contains(&y)) {
            anyhow::bail!("label {bad} is not a class (0-9)");
        }
        let scale = 1.0 / images as f32; // the mean's 1/B, in every image's output gradient
        let (logits, loss_sum, gradient) = self.pass(pixels, Start::Labels(&labels, scale), share);
        Ok(Step {
            logits: Tensor::from_slice(&logits).view([images as i64, CLASSES as i64]),
            loss: Tensor::from((loss_sum / images as f64) as f32),
            gradient: Tensor::from_slice(&gradient),
        })
    }

    /// The gradient of some loss with respect to every parameter (shaped as
    /// [`PARAMETERS`], in that order), given its gradient `d_logits` `(B, 10)` with respect to
    /// the logits of the normalised batch `xs` `(B, 1, 32, 32)`, at the weights last loaded:
    /// autograd's backward pass. The forward pass is computed again, not kept from the call
    /// that gave the logits: that costs about a third more arithmetic than a training step
    /// and keeps no batch's stages between calls.
    pub fn backward(&mut self, xs: &Tensor, d_logits: &Tensor) -> Result<Vec<Tensor>> {
        let batch = pixels_of(xs)?;
        let pixels = values::of(&batch);
        let images = pixels.len() / PIXELS;
        ensure!(
            d_logits.size() == [images as i64, CLASSES as i64],
            "the gradient of the logits has shape {:?}; the logits of {images} images have [{images}, {CLASSES}]",
            d_logits.size()
        );
        ensure!(d_logits.device() == Device::Cpu, "the gradient of the logits is on {:?}", d_logits.device());
        let d_logits = d_logits.f_to_kind(Kind::Float)?.f_contiguous()?;
        let gradient = match images {
            0 => vec![0f32; (0..PARAMETERS.len()).map(parameter_len).sum()], // no image, no gradient
            _ => self.pass(pixels, Start::LogitGradient(values::of(&d_logits)), DirectNet::share).2,
        };
        Ok(shaped(&gradient))
    }

    /// The forward and backward pass of a batch (`pixels`, at least one image) from `start`,
    /// split across the threads: its logits, the sum of its losses (0 from a given logit
    /// gradient) and the gradient, flat in PyTorch's order.
    fn pass(&mut self, pixels: &[f32], start: Start, share: Share) -> (Vec<f32>, f64, Vec<f32>) {
        let images = pixels.len() / PIXELS;
        let threads = self.net.shares(images);
        while self.scratch.len() < threads {
            self.scratch.push(Scratch::new());
        }
        let per_thread = images.div_ceil(threads);
        let mut logits = vec![0f32; images * CLASSES];
        let net = &self.net;
        let by_output = &*conv2_by_output(&net.weights);
        let shares = pixels
            .chunks(per_thread * PIXELS)
            .zip(logits.chunks_mut(per_thread * CLASSES))
            .zip(&mut self.scratch)
            .enumerate()
            .map(|(i, ((pixels, logits), scratch))| {
                let from = i * per_thread;
                (pixels, start.range(from, from + pixels.len() / PIXELS), logits, scratch)
            });
        let losses = team::run(shares.collect(), |(pixels, start, logits, scratch)| {
            share(net, by_output, pixels, start, logits, scratch)
        });
        let loss_sum: f64 = losses.into_iter().sum();
        let (total, rest) = self.scratch.split_at_mut(1);
        let mut total = total[0].sums.arrays_mut();
        for scratch in &mut rest[..threads - 1] {
            for (t, s) in total.iter_mut().zip(scratch.sums.arrays_mut()) {
                t.iter_mut().zip(s.iter()).for_each(|(t, s)| *t += s);
            }
        }
        let mut gradient = vec![0f32; (0..PARAMETERS.len()).map(parameter_len).sum()];
        let mut rest = &mut gradient[..];
        for (p, array) in total.iter().enumerate() {
            let (out, tail) = rest.split_at_mut(parameter_len(p));
            Weights::to_torch(p, array, out);
            rest = tail;
        }
        (logits, loss_sum, gradient)
    }

    /// The net, for changing its weights ([`DirectNet::reload`]) or config, or running its
    /// forward pass.
    pub fn net_mut(&mut self) -> &mut DirectNet {
        &mut self.net
    }
}

impl From<DirectNet> for DirectTraining {
    fn from(net: DirectNet) -> DirectTraining {
        DirectTraining { net, scratch: vec![] }
    }
}

/// A gradient flat in PyTorch's order as one tensor per parameter, shaped as [`PARAMETERS`].
fn shaped(gradient: &[f32]) -> Vec<Tensor> {
    let mut rest = gradient;
    PARAMETERS
        .iter()
        .enumerate()
        .map(|(p, (_, shape))| {
            let (values, tail) = rest.split_at(parameter_len(p));
            rest = tail;
            Tensor::from_slice(values).view(*shape)
        })
        .collect()
}

impl DirectNet {
    /// One thread's share: logits into `logits`, gradients (from `start`) into
    /// `scratch.sums`, which it zeroes first; returns the sum of the losses.
    fn share(
        &self,
        by_output: &Conv2ByOutput,
        pixels: &[f32],
        start: Start,
        logits: &mut [f32],
        scratch: &mut Scratch,
    ) -> f64 {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: the CPU has the features `share_avx512` is compiled for.
            return unsafe { self.share_avx512(by_output, pixels, start, logits, scratch) };
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has the features `share_avx2` is compiled for.
            return unsafe { self.share_avx2(by_output, pixels, start, logits, scratch) };
        }
        self.share_with::<Portable, Portable>(by_output, pixels, start, logits, scratch)
    }

    /// `share_with` compiled for AVX2 and FMA, as `run_avx2`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn share_avx2(
        &self,
        by_output: &Conv2ByOutput,
        pixels: &[f32],
        start: Start,
        logits: &mut [f32],
        scratch: &mut Scratch,
    ) -> f64 {
        self.share_with::<avx2::Avx2, avx2::Avx2>(by_output, pixels, start, logits, scratch)
    }

    /// `share_with` in AVX-512, the same bits as in AVX2: the forward pass as `run_avx512`,
    /// conv2's backward pass sixteen wide, conv1's eight wide (AVX2).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn share_avx512(
        &self,
        by_output: &Conv2ByOutput,
        pixels: &[f32],
        start: Start,
        logits: &mut [f32],
        scratch: &mut Scratch,
    ) -> f64 {
        self.share_with::<avx512::Avx512, avx2::Avx2>(by_output, pixels, start, logits, scratch)
    }

    /// The share in micro-batches: each image's convolutional stages forwards, the linear
    /// layers for all of them forwards and backwards, then each image's convolutional stages
    /// backwards; in `L` lanes (eight or sixteen wide) but for conv1's backward pass, in
    /// `Eight` lanes: its kernel rows are padded to eight floats and lie a row apart.
    #[inline(always)]
    fn share_with<L: Lanes, Eight: Lanes>(
        &self,
        by_output: &Conv2ByOutput,
        pixels: &[f32],
        start: Start,
        logits: &mut [f32],
        scratch: &mut Scratch,
    ) -> f64 {
        const {
            assert!(
                Eight::WIDTH == LANES && (L::WIDTH == LANES || L::WIDTH == 2 * LANES),
                "lanes eight or sixteen wide"
            )
        };
        let Scratch { sums, kept, rows } = scratch;
        for array in sums.arrays_mut() {
            array.fill(0.0);
        }
        let mut loss = 0f64;
        for (m, (pixels, logits)) in pixels.chunks(MICRO * PIXELS).zip(logits.chunks_mut(MICRO * CLASSES)).enumerate() {
            let start = start.range(m * MICRO, m * MICRO + pixels.len() / PIXELS);
            let kept = &mut kept[..start.images()];
            for ((kept, input), flat) in kept.iter_mut().zip(pixels.chunks_exact(PIXELS)).zip(&mut rows.flat) {
                self.convolutions_forward::<L>(input, kept, flat);
            }
            loss += self.linear_layers(rows, start, logits, sums);
            for (kept, d_flat) in kept.iter().zip(&rows.d_flat) {
                self.convolutions_backward::<L, Eight>(by_output, kept, d_flat, sums);
            }
        }
        loss
    }

    /// C1 to S4 of one image (`input`, 32x32), keeping what their backward pass reads in
    /// `kept`; S4 flattened in PyTorch's order (map, y, x) into `flat`.
    #[inline(always)]
    fn convolutions_forward<L: Lanes>(&self, input: &[f32], kept: &mut Kept, flat: &mut [f32; FLAT]) {
        let w = &*self.weights;
        let arch = self.config.arch;
        for (row, src) in kept.image.iter_mut().zip(input.chunks_exact(SIDE)) {
            row[..SIDE].copy_from_slice(src);
        }
        conv1::<L>(w, &kept.image, &mut kept.c1); // (6, 28, 32), before the activation
        match arch {
            Arch::Modern => max_pool_c1::<L>(&kept.c1, &mut kept.s2),
            Arch::Classic => subsample(arch, &mut kept.c1, &mut kept.s2),
        }
        conv2::<L>(w, &kept.s2, &mut kept.c3); // (16, 10, 10)
        subsample(arch, &mut kept.c3, &mut kept.s4);
        flat.copy_from_slice(kept.s4.as_flattened().as_flattened());
    }

    /// F5, F6 and the output for a micro-batch (`rows.flat`, one row per image of `start`)
    /// forwards, the logits into `logits`, then from `start` (the head's loss of the labels, or
    /// a given logit gradient) every linear layer backwards: the weight and bias gradients
    /// added into `g`, S4's gradient left in `rows.d_flat`. Returns the sum of the losses (0
    /// from a given gradient).
    fn linear_layers(&self, rows: &mut Rows, start: Start, logits: &mut [f32], g: &mut Weights) -> f64 {
        let (w, arch, m) = (&*self.weights, self.config.arch, start.images());
        let Rows { flat, f5, f6, out, d_flat, d5, d6, d_out } = rows;
        let (flat, f5, f6, out) = (&flat[..m], &mut f5[..m], &mut f6[..m], &mut out[..m]);
        let (d_flat, d5, d6, d_out) = (&mut d_flat[..m], &mut d5[..m], &mut d6[..m], &mut d_out[..m]);
        dense_rows(&w.fc1, &w.fc1_bias, flat, f5);
        activate_rows(arch, f5);
        dense_rows(&w.fc2, &w.fc2_bias, f5, f6);
        activate_rows(arch, f6);
        dense_rows(&w.fc3, &w.fc3_bias, f6, out);
        let mut loss = 0f64;
        for (i, ((out, logits), d_out)) in
            out.iter().zip(logits.chunks_exact_mut(CLASSES)).zip(d_out.iter_mut()).enumerate()
        {
            logits.copy_from_slice(&out[..CLASSES]);
            match start {
                Start::Labels(labels, scale) => {
                    let (image_loss, d) = loss_gradient(self.config.head, out, labels[i] as usize, scale);
                    loss += image_loss as f64;
                    *d_out = d;
                }
                Start::LogitGradient(d) => {
                    d_out.fill(0.0); // the padding past the 10 logits
                    d_out[..CLASSES].copy_from_slice(&d[i * CLASSES..(i + 1) * CLASSES]);
                }
            }
        }
        dense_rows_backward(&w.fc3, f6, d_out, &mut g.fc3, &mut g.fc3_bias, d6);
        activation_backward_rows(arch, f6, d6);
        dense_rows_backward(&w.fc2, f5, d6, &mut g.fc2, &mut g.fc2_bias, d5);
        activation_backward_rows(arch, f5, d5);
        dense_rows_backward(&w.fc1, flat, d5, &mut g.fc1, &mut g.fc1_bias, d_flat);
        loss
    }

    /// S4 to C1 of one image backwards from S4's gradient `d_flat` (PyTorch's flatten order),
    /// adding conv2's and conv1's weight and bias gradients into `g`.
    #[inline(always)]
    fn convolutions_backward<L: Lanes, Eight: Lanes>(
        &self,
        by_output: &Conv2ByOutput,
        kept: &Kept,
        d_flat: &[f32; FLAT],
        g: &mut Weights,
    ) {
        let arch = self.config.arch;
        let d4: &Maps<C3_MAPS, S4_SIDE, S4_SIDE> =
            d_flat.as_chunks::<S4_SIDE>().0.as_chunks::<S4_SIDE>().0.try_into().expect("16 x 5 x 5 values");
        let d3: Maps<C3_MAPS, C3_SIDE, C3_SIDE> = subsample_backward(arch, &kept.c3, &kept.s4, d4);
        let d2 = conv2_backward::<L>(by_output, &kept.s2, &d3, g);
        match arch {
            Arch::Modern => conv1_backward_routed::<Eight>(&kept.image, &kept.c1, &kept.s2, &d2, g),
            Arch::Classic => {
                conv1_backward::<Eight>(&kept.image, &subsample_backward(arch, &kept.c1, &kept.s2, &d2), g)
            }
        }
    }
}

/// `c = a b + beta c` (matrixmultiply's sgemm, which picks its AVX2 or portable kernel at run
/// time): `a` is `m x k` and `b` is `k x n`, each given as a slice and its (row, column)
/// strides; `c` is `m x n`, row-major and dense.
fn gemm(m: usize, k: usize, n: usize, a: (&[f32], [usize; 2]), b: (&[f32], [usize; 2]), beta: f32, c: &mut [f32]) {
    let last = |rows: usize, cols: usize, [row, col]: [usize; 2]| (rows - 1) * row + (cols - 1) * col;
    assert!(m > 0 && k > 0 && n > 0);
    assert!(
        last(m, k, a.1) < a.0.len() && last(k, n, b.1) < b.0.len() && m * n <= c.len(),
        "a matrix outside its slice"
    );
    let [rsa, csa, rsb, csb] = [a.1[0], a.1[1], b.1[0], b.1[1]].map(|s| s as isize);
    // SAFETY: every element of the three matrices lies inside its slice (checked above), and
    // `c`'s elements, dense, have distinct addresses.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.0.as_ptr(),
            rsa,
            csa,
            b.0.as_ptr(),
            rsb,
            csb,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        )
    }
}

/// A linear layer for a row of inputs per image: `y = x W + b`, weights stored (in, out).
fn dense_rows<const I: usize, const O: usize>(w: &[[f32; O]; I], bias: &[f32; O], x: &[[f32; I]], y: &mut [[f32; O]]) {
    y.fill(*bias);
    gemm(x.len(), I, O, (x.as_flattened(), [I, 1]), (w.as_flattened(), [O, 1]), 1.0, y.as_flattened_mut());
}

/// [`dense_rows`] backwards from the outputs' gradient `d`: adds `x^T d` into the weight
/// gradient `gw` and the column sums of `d` into `gb`, and sets the inputs' gradient
/// `dx = d W^T`.
fn dense_rows_backward<const I: usize, const O: usize>(
    w: &[[f32; O]; I],
    x: &[[f32; I]],
    d: &[[f32; O]],
    gw: &mut [[f32; O]; I],
    gb: &mut [f32; O],
    dx: &mut [[f32; I]],
) {
    for row in d {
        gb.iter_mut().zip(row).for_each(|(g, d)| *g += d);
    }
    let m = x.len();
    gemm(I, m, O, (x.as_flattened(), [1, I]), (d.as_flattened(), [O, 1]), 1.0, gw.as_flattened_mut());
    gemm(m, O, I, (d.as_flattened(), [O, 1]), (w.as_flattened(), [1, O]), 0.0, dx.as_flattened_mut());
}

/// [`activate`] on every row.
fn activate_rows<const N: usize>(arch: Arch, rows: &mut [[f32; N]]) {
    for row in rows {
        *row = activate(arch, *row);
    }
}

/// [`activation_backward`] on every row.
fn activation_backward_rows<const N: usize>(arch: Arch, y: &[[f32; N]], d: &mut [[f32; N]]) {
    for (y, d) in y.iter().zip(d) {
        activation_backward(arch, y, d);
    }
}

/// The loss of one image's logits (the first 10 of `z`) and its gradient, times `scale`.
/// Softmax: cross-entropy, gradient `softmax(z) - onehot`. Sigmoid: binary cross-entropy
/// against the one-hot target, averaged over the 10 units as `BCEWithLogitsLoss` does, so
/// its gradient is `(sigmoid(z) - onehot) / 10`.
fn loss_gradient(head: Head, z: &[f32; CLASSES_WIDE], label: usize, scale: f32) -> (f32, [f32; CLASSES_WIDE]) {
    let mut d = [0f32; CLASSES_WIDE];
    let z = &z[..CLASSES];
    let loss = match head {
        Head::Softmax => {
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: [f32; CLASSES] = std::array::from_fn(|j| (z[j] - max).exp());
            let sum: f32 = exps.iter().sum();
            for (j, d) in d[..CLASSES].iter_mut().enumerate() {
                *d = (exps[j] / sum - (j == label) as u8 as f32) * scale;
            }
            sum.ln() + max - z[label]
        }
        Head::Sigmoid => {
            let mut loss = 0f32;
            for (j, d) in d[..CLASSES].iter_mut().enumerate() {
                let (x, t) = (z[j], (j == label) as u8 as f32);
                // PyTorch's stable form: max(x, 0) - x t + ln(1 + e^-|x|).
                loss += x.max(0.0) - x * t + (-x.abs()).exp().ln_1p();
                *d = (1.0 / (1.0 + (-x).exp()) - t) * (scale / CLASSES as f32);
            }
            loss / CLASSES as f32
        }
    };
    (loss, d)
}

/// The gradient with respect to the pre-activations of C1 or C3, from that of the subsampled
/// maps `d` (`kept` and `pooled` as [`subsample`] left them; columns past `2 S` get 0).
/// Modern: ReLU passes the gradient where the pooled value is above 0, and max-pooling sends
/// it to the first window position holding the maximum (PyTorch's choice on ties). Classic:
/// each position gets a quarter of it, times tanh's derivative.
#[inline(always)]
fn subsample_backward<const C: usize, const N: usize, const W: usize, const S: usize>(
    arch: Arch,
    kept: &Maps<C, N, W>,
    pooled: &Maps<C, S, S>,
    d: &Maps<C, S, S>,
) -> Maps<C, N, W> {
    let mut out = [[[0f32; W]; N]; C];
    for ((out, kept), (pooled, d)) in out.iter_mut().zip(kept).zip(pooled.iter().zip(d)) {
        for (y, (pooled, d)) in pooled.iter().zip(d).enumerate() {
            let (top, bottom) = out[2 * y..].split_at_mut(1);
            let (top, bottom) = (&mut top[0], &mut bottom[0]);
            let (kept_top, kept_bottom) = (&kept[2 * y], &kept[2 * y + 1]);
            for (x, (&max, &d)) in pooled.iter().zip(d).enumerate() {
                let (l, r) = (2 * x, 2 * x + 1);
                match arch {
                    Arch::Modern => {
                        // The first of the four values equal to the maximum, if it is above 0:
                        // without branches, which the data would mispredict one time in two.
                        let hits =
                            [kept_top[l] == max, kept_top[r] == max, kept_bottom[l] == max, kept_bottom[r] == max];
                        let mut open = max > 0.0;
                        let mut route = |hit: bool| {
                            let take = open & hit;
                            open &= !take;
                            d * f32::from(u8::from(take))
                        };
                        (top[l], top[r], bottom[l], bottom[r]) =
                            (route(hits[0]), route(hits[1]), route(hits[2]), route(hits[3]));
                    }
                    Arch::Classic => {
                        let quarter = d / 4.0;
                        for (out, kept) in [(&mut *top, kept_top), (&mut *bottom, kept_bottom)] {
                            for i in [l, r] {
                                out[i] = quarter * (1.0 - kept[i] * kept[i]);
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// F5's and F6's activation, backwards: `d` times ReLU's derivative (1 where the output is
/// above 0) or tanh's (`1 - y^2`), from the layer's outputs `y`.
#[inline(always)]
fn activation_backward<const N: usize>(arch: Arch, y: &[f32; N], d: &mut [f32; N]) {
    for (d, &y) in d.iter_mut().zip(y) {
        *d = match arch {
            Arch::Modern if y > 0.0 => *d,
            Arch::Modern => 0.0,
            Arch::Classic => *d * (1.0 - y * y),
        };
    }
}

/// Input maps whose S2 gradient rows [`conv2_backward`] sums together, in registers.
const S2_GROUP: usize = 2;

/// conv2's weights by output map, `(out, in, ky, kx)`, each row of five kx padded to a lane
/// vector with zeros: the rows S2's gradient adds.
type Conv2ByOutput = [[[[f32; LANES]; KERNEL]; C1_MAPS]; C3_MAPS];

fn conv2_by_output(w: &Weights) -> Box<Conv2ByOutput> {
    let mut out = Box::new([[[[0f32; LANES]; KERNEL]; C1_MAPS]; C3_MAPS]);
    for (i, kernel) in w.conv2.iter().enumerate() {
        for (ky, row) in kernel.iter().enumerate() {
            for (kx, outputs) in row.iter().enumerate() {
                for (o, &v) in outputs.iter().enumerate() {
                    out[o][i][ky][kx] = v;
                }
            }
        }
    }
    out
}

/// C3 backwards (full connections): adds the gradients of conv2's weights and biases into
/// `g` and returns that of S2. `d3` is the gradient of C3's pre-activations.
#[inline(always)]
fn conv2_backward<L: Lanes>(
    by_output: &Conv2ByOutput,
    s2: &Maps<C1_MAPS, S2_SIDE, S2_SIDE>,
    d3: &Maps<C3_MAPS, C3_SIDE, C3_SIDE>,
    g: &mut Weights,
) -> Maps<C1_MAPS, S2_SIDE, S2_SIDE> {
    // The gradient by position, its 16 maps in `parts` lane vectors: (10, 10, 16).
    let mut by_position = [[[0f32; C3_MAPS]; C3_SIDE]; C3_SIDE];
    for (o, map) in d3.iter().enumerate() {
        for (y, row) in map.iter().enumerate() {
            for (x, &v) in row.iter().enumerate() {
                by_position[y][x][o] = v;
            }
        }
    }
    // 16 values in lane vectors: two eight wide, or one sixteen wide (the second left zero).
    let parts = C3_MAPS / L::WIDTH;
    let load_maps =
        |at: &[f32]| -> [L; 2] { array_of(|h| if h < parts { L::load(&at[h * L::WIDTH..]) } else { L::splat(0.0) }) };
    let store_maps = |v: [L; 2], at: &mut [f32]| (0..parts).for_each(|h| v[h].store(&mut at[h * L::WIDTH..]));
    let mut bias = load_maps(&g.conv2_bias);
    for d in by_position.as_flattened() {
        let d = load_maps(d);
        (0..parts).for_each(|h| bias[h] = bias[h].add(d[h]));
    }
    store_maps(bias, &mut g.conv2_bias);
    // Weights: g[i][ky][kx][o] += sum over positions of S2[i][y + ky][x + kx] d3[o][y][x],
    // the five kx of one (i, ky) in five or ten running sums.
    for (map, g_kernel) in s2.iter().zip(g.conv2.iter_mut()) {
        for (ky, g_row) in g_kernel.iter_mut().enumerate() {
            let mut acc: [[L; 2]; KERNEL] = array_of(|kx| load_maps(&g_row[kx]));
            for (y, d_row) in by_position.iter().enumerate() {
                let input = &map[y + ky];
                for (x, d) in d_row.iter().enumerate() {
                    let d = load_maps(d);
                    for (kx, acc) in acc.iter_mut().enumerate() {
                        let s = L::splat(input[x + kx]);
                        (0..parts).for_each(|h| acc[h] = acc[h].mul_add(s, d[h]));
                    }
                }
            }
            for (g, acc) in g_row.iter_mut().zip(acc) {
                store_maps(acc, g);
            }
        }
    }
    // S2's gradient: each C3 position adds its gradient times conv2's 6 x 5 x 5 weights into
    // the S2 window it read, d2[i][y + ky][x + kx] += d3[o][y][x] w[o][i][ky][kx], one row
    // of five kx (in eight lanes, three zero weights past them) at a time. Maps whose
    // gradient is 0 there are skipped: with max-pooling, at least three positions in four.
    let mut padded = [[[0f32; S2_SIDE + LANES + 2]; S2_SIDE]; C1_MAPS]; // rows 24 wide
    let rows_per_vector = L::WIDTH / LANES; // kernel rows side by side in a lane vector
    let vectors = S2_GROUP * KERNEL / rows_per_vector;
    for (y, row) in by_position.iter().enumerate() {
        for (x, d) in row.iter().enumerate() {
            let (nonzero, n) = nonzero(d);
            if n == 0 {
                continue;
            }
            // Two input maps' ten kernel rows at a time in ten (or five) running sums, each
            // map's gradient broadcast once for all of them.
            for (i0, maps) in padded.chunks_exact_mut(S2_GROUP).enumerate().map(|(g, maps)| (g * S2_GROUP, maps)) {
                let mut acc = [L::splat(0.0); S2_GROUP * KERNEL];
                for &(o, v) in &nonzero[..n] {
                    let v = L::splat(v);
                    let weights = by_output[o][i0..i0 + S2_GROUP].as_flattened().as_flattened();
                    for (j, acc) in acc[..vectors].iter_mut().enumerate() {
                        *acc = acc.mul_add(v, L::load(&weights[j * L::WIDTH..]));
                    }
                }
                for (j, acc) in acc[..vectors].iter().enumerate() {
                    let mut lanes = [0f32; 2 * LANES];
                    acc.store(&mut lanes);
                    for (k, lanes) in lanes[..L::WIDTH].chunks_exact(LANES).enumerate() {
                        let r = j * rows_per_vector + k;
                        let at = &mut maps[r / KERNEL][y + r % KERNEL][x..x + LANES];
                        at.iter_mut().zip(lanes).for_each(|(t, v)| *t += v);
                    }
                }
            }
        }
    }
    let mut d2 = [[[0f32; S2_SIDE]; S2_SIDE]; C1_MAPS];
    for (d2, padded) in d2.iter_mut().zip(&padded) {
        for (row, src) in d2.iter_mut().zip(padded) {
            row.copy_from_slice(&src[..S2_SIDE]);
        }
    }
    d2
}

/// S2 and C1 backwards in the modern variant: only the maximum of each 2x2 window has a
/// gradient (that of its S2 value, where that is above 0), so each window adds its 5x5 input
/// patch, scaled, into conv1's weight gradient: a quarter of the dense pass's work. Without
/// branches: windows with nothing to pass add a zero.
#[inline(always)]
fn conv1_backward_routed<L: Lanes>(
    image: &[[f32; IMAGE_WIDE]; SIDE],
    c1: &Maps<C1_MAPS, C1_SIDE, C1_WIDE>,
    s2: &Maps<C1_MAPS, S2_SIDE, S2_SIDE>,
    d2: &Maps<C1_MAPS, S2_SIDE, S2_SIDE>,
    g: &mut Weights,
) {
    for (o, ((c1, s2), d2)) in c1.iter().zip(s2).zip(d2).enumerate() {
        // Row ky of the kernel's gradient, kx in the first five lanes.
        let mut acc = [L::splat(0.0); KERNEL];
        let mut bias = 0f32;
        for (wy, (s2, d2)) in s2.iter().zip(d2).enumerate() {
            let (top, bottom) = (&c1[2 * wy], &c1[2 * wy + 1]);
            for (wx, (&max, &d)) in s2.iter().zip(d2).enumerate() {
                let (l, r) = (2 * wx, 2 * wx + 1);
                // The first of the four equal to the maximum, as max-pooling's backward picks.
                let (h0, h1, h2) = (top[l] == max, top[r] == max, bottom[l] == max);
                let y = 2 * wy + usize::from(!(h0 | h1));
                let x = l + usize::from(!h0 & (h1 | !h2));
                let d = d * f32::from(u8::from(max > 0.0));
                bias += d;
                let d = L::splat(d);
                for (ky, acc) in acc.iter_mut().enumerate() {
                    *acc = acc.mul_add(d, L::load(&image[y + ky][x..]));
                }
            }
        }
        for (g, acc) in g.conv1[o].iter_mut().zip(acc) {
            let mut row = [0f32; LANES];
            acc.store(&mut row);
            g.iter_mut().zip(row).for_each(|(g, v)| *g += v);
        }
        g.conv1_bias[o] += bias;
    }
}

/// C1 backwards (the classic variant, whose every position has a gradient): adds the gradients of conv1's weights and biases into `g` from `d1`, that
/// of C1's pre-activations (its columns past 28 zero). Each weight's sum runs over the 784
/// positions 8 columns at a time, two maps and five kx per pass over the rows.
#[inline(always)]
fn conv1_backward<L: Lanes>(image: &[[f32; IMAGE_WIDE]; SIDE], d1: &Maps<C1_MAPS, C1_SIDE, C1_WIDE>, g: &mut Weights) {
    const CHUNKS: usize = C1_WIDE / LANES;
    for (o, map) in d1.iter().enumerate() {
        let mut acc = L::splat(0.0);
        for row in map {
            for j in 0..CHUNKS {
                acc = acc.add(L::load(&row[j * LANES..]));
            }
        }
        g.conv1_bias[o] += acc.sum();
    }
    for o0 in (0..C1_MAPS).step_by(C1_GROUP) {
        for ky in 0..KERNEL {
            let mut acc = [[L::splat(0.0); KERNEL]; C1_GROUP];
            for y in 0..C1_SIDE {
                let input = &image[y + ky];
                for j in 0..CHUNKS {
                    let xs: [L; KERNEL] = array_of(|kx| L::load(&input[kx + j * LANES..]));
                    for (g, acc) in acc.iter_mut().enumerate() {
                        let d = L::load(&d1[o0 + g][y][j * LANES..]);
                        for (a, &x) in acc.iter_mut().zip(&xs) {
                            *a = a.mul_add(d, x);
                        }
                    }
                }
            }
            for (g_o, acc) in g.conv1[o0..o0 + C1_GROUP].iter_mut().zip(acc) {
                for (g, a) in g_o[ky].iter_mut().zip(acc) {
                    *g += a.sum();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LeNet5;
    use tch::nn::Module;

    /// libtorch's autograd on one batch: the logits, the loss and each parameter's gradient,
    /// with the model's weights in `kind`.
    fn autograd(vs: &VarStore, config: ModelConfig, kind: Kind, xs: &Tensor, ys: &Tensor) -> Vec<(String, Tensor)> {
        let mut copy = VarStore::new(Device::Cpu);
        let net = LeNet5::new(&copy.root(), config);
        copy.copy(vs).unwrap();
        copy.set_kind(kind);
        let logits = net.forward(&xs.to_kind(kind));
        let loss = config.head.loss(&logits, ys);
        loss.backward();
        let mut out: Vec<(String, Tensor)> = net.parameters().into_iter().map(|(name, p)| (name, p.grad())).collect();
        out.push(("logits".into(), logits.detach()));
        out.push(("loss".into(), loss.detach()));
        out
    }

    /// Per tensor (each parameter's gradient, the logits, the loss), max |direct - autograd| /
    /// max |autograd| over one batch: against float32 and float64 autograd, for the loops this
    /// CPU runs and for the portable ones.
    fn relative_differences(arch: Arch, head: Head, batch: i64, seed: i64) -> Vec<(String, [f64; 4])> {
        tch::manual_seed(seed);
        let vs = VarStore::new(Device::Cpu);
        let config = ModelConfig { arch, head };
        let _net = LeNet5::new(&vs.root(), config);
        // Inputs in the range of normalised MNIST (background -0.42, ink up to 2.8).
        let xs = Tensor::rand([batch, 1, 32, 32], (Kind::Float, Device::Cpu)) * 3.2 - 0.42;
        let ys = Tensor::randint(10, [batch], (Kind::Int64, Device::Cpu));
        let [float, double] = [Kind::Float, Kind::Double].map(|kind| autograd(&vs, config, kind, &xs, &ys));
        let mut direct = DirectTraining::new(&vs, config, 2).unwrap();
        let [fast, portable] = [DirectNet::share as Share, DirectNet::share_with::<Portable, Portable>].map(|share| {
            let step = direct.step_in(&vs, &xs, &ys, share).unwrap();
            let gradients = shaped(&Vec::<f32>::try_from(&step.gradient).unwrap());
            gradients.into_iter().chain([step.logits, step.loss]).collect::<Vec<_>>()
        });
        let relative = |got: &Tensor, want: &Tensor| {
            let want = want.to_kind(Kind::Double);
            (got.to_kind(Kind::Double) - &want).abs().max().double_value(&[]) / want.abs().max().double_value(&[])
        };
        float
            .iter()
            .zip(&double)
            .enumerate()
            .map(|(i, ((name, f), (_, d)))| {
                (
                    name.clone(),
                    [
                        relative(&fast[i], f),
                        relative(&portable[i], f),
                        relative(&fast[i], d),
                        relative(&portable[i], d),
                    ],
                )
            })
            .collect()
    }

    #[test]
    fn gradients_agree_with_libtorch_autograd_for_every_parameter() {
        // Both sides sum in f32 in different orders: seen up to 5e-6 against float32 autograd
        // (most of it libtorch's own rounding: against float64 autograd the direct engine is
        // within 3e-6, libtorch's float32 within 5e-6). 1e-5 is the bound; a wrong
        // index, a missing 1/B or a misrouted max-pool gradient gives 1e-2 or more.
        let against = [
            "this CPU's loops vs float32",
            "portable loops vs float32",
            "this CPU's loops vs float64",
            "portable loops vs float64",
        ];
        for arch in [Arch::Modern, Arch::Classic] {
            for head in [Head::Softmax, Head::Sigmoid] {
                // 70 images: two threads' shares (35 each, above the 32-image minimum).
                for (batch, seed) in [(1, 11), (70, 12)] {
                    for (name, diffs) in relative_differences(arch, head, batch, seed) {
                        for (what, diff) in against.into_iter().zip(diffs) {
                            assert!(
                                diff <= 1e-5,
                                "{arch:?}/{head:?}, batch {batch}, {name}, {what}: relative difference {diff:e}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_step_in_avx512_gives_the_avx2_steps_bits() {
        if !has_avx512() {
            eprintln!("skipped: this CPU has no AVX-512, so training runs the AVX2 loops that the other tests check");
            return;
        }
        for arch in [Arch::Modern, Arch::Classic] {
            tch::manual_seed(8);
            let vs = VarStore::new(Device::Cpu);
            let config = ModelConfig { arch, head: Head::Softmax };
            let _net = LeNet5::new(&vs.root(), config);
            let xs = Tensor::rand([70, 1, 32, 32], (Kind::Float, Device::Cpu)) * 3.2 - 0.42;
            let ys = Tensor::randint(10, [70], (Kind::Int64, Device::Cpu));
            let mut direct = DirectTraining::new(&vs, config, 2).unwrap();
            // SAFETY (both): has_avx512 (which includes AVX2 and FMA) said the CPU has them.
            let avx2: Share = |net, by_output, pixels, start, logits, scratch| unsafe {
                net.share_avx2(by_output, pixels, start, logits, scratch)
            };
            let avx512: Share = |net, by_output, pixels, start, logits, scratch| unsafe {
                net.share_avx512(by_output, pixels, start, logits, scratch)
            };
            let [a, b] = [avx2, avx512].map(|share| {
                let step = direct.step_in(&vs, &xs, &ys, share).unwrap();
                [step.gradient, step.logits.view(-1), step.loss.view(-1)]
                    .map(|t| Vec::<f32>::try_from(t).unwrap().iter().map(|x| x.to_bits()).collect::<Vec<u32>>())
            });
            assert!(a == b, "{arch:?}: the gradient, logits or loss differ");
        }
    }

    #[test]
    fn backward_from_any_logit_gradient_agrees_with_libtorch_autograd() {
        // A loss the head knows nothing of, (logits * w).sum() with w fixed: its logit
        // gradient is w, and autograd's parameter gradients are the reference. The bound is
        // the training test's; a gradient taken as the head's own loss would be off by 1e-1.
        for arch in [Arch::Modern, Arch::Classic] {
            tch::manual_seed(21);
            let vs = VarStore::new(Device::Cpu);
            let config = ModelConfig { arch, head: Head::Softmax };
            let net = LeNet5::new(&vs.root(), config);
            let xs = Tensor::rand([70, 1, 32, 32], (Kind::Float, Device::Cpu)) * 3.2 - 0.42;
            let w = Tensor::randn([70, 10], (Kind::Float, Device::Cpu));
            (net.forward(&xs) * &w).sum(Kind::Float).backward();
            let mut direct = DirectTraining::new(&vs, config, 2).unwrap();
            let got = direct.backward(&xs, &w).unwrap();
            for ((name, p), got) in net.parameters().into_iter().zip(got) {
                let want = p.grad();
                assert_eq!(got.size(), want.size(), "{name}");
                let diff = (&got - &want).abs().max().double_value(&[]) / want.abs().max().double_value(&[]);
                assert!(diff <= 1e-5, "{arch:?}, {name}: relative difference {diff:e}");
            }
            let err = direct.backward(&xs, &w.narrow(0, 0, 69)).unwrap_err();
            assert!(err.to_string().contains("[69, 10]"), "{err}");
        }
    }

    #[test]
    fn bad_labels_and_shapes_are_refused() {
        tch::manual_seed(1);
        let vs = VarStore::new(Device::Cpu);
        let config = ModelConfig { arch: Arch::Modern, head: Head::Softmax };
        let _net = LeNet5::new(&vs.root(), config);
        let mut direct = DirectTraining::new(&vs, config, 1).unwrap();
        let xs = Tensor::zeros([2, 1, 32, 32], (Kind::Float, Device::Cpu));
        let err = direct.step(&vs, &xs, &Tensor::from_slice(&[1i64, 10])).err().unwrap();
        assert!(err.to_string().contains("label 10"), "{err}");
        let err = direct.step(&vs, &xs, &Tensor::from_slice(&[1i64])).err().unwrap();
        assert!(err.to_string().contains("2 images has 1 labels"), "{err}");
        let err = direct.step(&vs, &xs.view([2, 1, 16, 64]), &Tensor::from_slice(&[1i64, 2])).err().unwrap();
        assert!(err.to_string().contains("[2, 1, 16, 64]"), "{err}");
    }
}
