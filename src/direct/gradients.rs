//! The direct engine's training pass (`lenet5 train --engine direct`): a batch's logits, mean
//! loss and the gradient of that loss for every parameter, from the forward loops of the
//! parent module and, stage by stage backwards, their transposes. No autograd and no libtorch
//! kernels: the optimizer step stays the project's (`optim.rs`), fed these gradients.
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
    /// d loss / d parameter, in PyTorch's order and shapes ([`crate::model::parameter_names`]).
    pub gradients: Vec<Tensor>,
}

/// A [`DirectNet`] that trains: its weights are read from the VarStore before every batch,
/// and each thread's gradient sums are kept from batch to batch (they are 250 KB each).
pub struct DirectTraining {
    net: DirectNet,
    sums: Vec<Box<Weights>>,
}

/// How one thread computes a share of the batch: `DirectNet::share_with` in some lanes.
type Share = fn(&DirectNet, &Conv2ByOutput, &[f32], &[i64], f32, &mut [f32], &mut Weights) -> f64;

impl DirectTraining {
    /// The engine for the LeNet-5 in `vs` (on the CPU), splitting batches across up to
    /// `threads` threads.
    pub fn new(vs: &VarStore, config: ModelConfig, threads: usize) -> Result<DirectTraining> {
        ensure!(vs.device() == Device::Cpu, "--engine direct trains on the CPU; the model is on {:?}: use --device cpu", vs.device());
        Ok(DirectTraining { net: DirectNet::new(vs, config, threads)?, sums: vec![] })
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
        let pixels = pixels_of(xs)?;
        let images = pixels.len() / PIXELS;
        let labels = Vec::<i64>::try_from(ys.to_device(Device::Cpu).f_to_kind(Kind::Int64)?.view(-1))?;
        ensure!(labels.len() == images && images > 0, "a batch of {images} images has {} labels", labels.len());
        if let Some(bad) = labels.iter().find(|&&y| !(0..CLASSES as i64).contains(&y)) {
            anyhow::bail!("label {bad} is not a class (0-9)");
        }
        let threads = self.net.threads.min(images / MIN_IMAGES_PER_THREAD).max(1);
        while self.sums.len() < threads {
            self.sums.push(Weights::zeroed());
        }
        let per_thread = images.div_ceil(threads);
        let scale = 1.0 / images as f32; // the mean's 1/B, in every image's output gradient
        let mut logits = vec![0f32; images * CLASSES];
        let net = &self.net;
        let by_output = &*conv2_by_output(&net.weights);
        let mut shares = pixels.chunks(per_thread * PIXELS).zip(labels.chunks(per_thread)).zip(logits.chunks_mut(per_thread * CLASSES)).zip(&mut self.sums);
        let (((first_pixels, first_labels), first_logits), first_sums) = shares.next().expect("at least one image");
        let loss_sum = std::thread::scope(|scope| {
            let others: Vec<_> = shares
                .map(|(((pixels, labels), logits), sums)| scope.spawn(move || share(net, by_output, pixels, labels, scale, logits, sums)))
                .collect();
            let mut loss = share(net, by_output, first_pixels, first_labels, scale, first_logits, first_sums);
            for handle in others {
                loss += handle.join().expect("a gradient thread panicked");
            }
            loss
        });
        let (total, rest) = self.sums.split_at_mut(1);
        let total = &mut total[0];
        for sums in &mut rest[..threads - 1] {
            for (t, s) in total.arrays_mut().into_iter().zip(sums.arrays_mut()) {
                t.iter_mut().zip(s.iter()).for_each(|(t, s)| *t += s);
            }
        }
        let gradients = total
            .arrays_mut()
            .into_iter()
            .enumerate()
            .map(|(p, array)| {
                let shape = PARAMETERS[p].1;
                let n = shape.iter().product::<i64>() as usize;
                let index = Weights::index(p);
                let values: Vec<f32> = (0..n).map(|k| array[index(k)]).collect();
                Tensor::from_slice(&values).view(shape)
            })
            .collect();
        Ok(Step {
            logits: Tensor::from_slice(&logits).view([images as i64, CLASSES as i64]),
            loss: Tensor::from((loss_sum / images as f64) as f32),
            gradients,
        })
    }
}

impl DirectNet {
    /// One thread's share: logits into `logits`, gradients (each image's output gradient
    /// scaled by `scale`) into `sums`, which it zeroes first; returns the sum of the losses.
    fn share(&self, by_output: &Conv2ByOutput, pixels: &[f32], labels: &[i64], scale: f32, logits: &mut [f32], sums: &mut Weights) -> f64 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has the features `share_avx2` is compiled for.
            return unsafe { self.share_avx2(by_output, pixels, labels, scale, logits, sums) };
        }
        self.share_with::<Portable>(by_output, pixels, labels, scale, logits, sums)
    }

    /// `share_with` compiled for AVX2 and FMA, as `run_avx2`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn share_avx2(&self, by_output: &Conv2ByOutput, pixels: &[f32], labels: &[i64], scale: f32, logits: &mut [f32], sums: &mut Weights) -> f64 {
        self.share_with::<avx2::Avx2>(by_output, pixels, labels, scale, logits, sums)
    }

    #[inline(always)]
    fn share_with<L: Lanes>(&self, by_output: &Conv2ByOutput, pixels: &[f32], labels: &[i64], scale: f32, logits: &mut [f32], sums: &mut Weights) -> f64 {
        for array in sums.arrays_mut() {
            array.fill(0.0);
        }
        let mut image = [[0f32; IMAGE_WIDE]; SIDE];
        let mut loss = 0f64;
        for ((input, &label), out) in pixels.chunks_exact(PIXELS).zip(labels).zip(logits.chunks_exact_mut(CLASSES)) {
            for (row, src) in image.iter_mut().zip(input.chunks_exact(SIDE)) {
                row[..SIDE].copy_from_slice(src);
            }
            loss += self.learn::<L>(by_output, &image, label as usize, scale, out, sums) as f64;
        }
        loss
    }

    /// The forward pass of one image, keeping what the backward pass reads, then the backward
    /// pass, adding into `g` (laid out as the weights). Returns the image's loss.
    #[inline(always)]
    fn learn<L: Lanes>(&self, by_output: &Conv2ByOutput, image: &[[f32; IMAGE_WIDE]; SIDE], label: usize, scale: f32, logits: &mut [f32], g: &mut Weights) -> f32 {
        let w = &*self.weights;
        let arch = self.config.arch;
        let mut c1 = conv1::<L>(w, image); // (6, 28, 32), before the activation
        let s2: Maps<C1_MAPS, S2_SIDE, S2_SIDE> = subsample_keeping(arch, &mut c1);
        let mut c3 = conv2::<L>(w, &s2); // (16, 10, 10)
        let s4: Maps<C3_MAPS, S4_SIDE, S4_SIDE> = subsample_keeping(arch, &mut c3);
        let flat: [f32; FLAT] = s4.as_flattened().as_flattened().try_into().expect("16 x 5 x 5 values");
        let f5 = activate(arch, dense::<L, FLAT, F5_WIDE>(&w.fc1, &w.fc1_bias, &flat)); // (128): 120 + zeros
        let f6 = activate(arch, dense::<L, F5_WIDE, F6_WIDE>(&w.fc2, &w.fc2_bias, &f5)); // (96): 84 + zeros
        let out = dense::<L, F6_WIDE, CLASSES_WIDE>(&w.fc3, &w.fc3_bias, &f6); // (32): 10 + zeros
        logits.copy_from_slice(&out[..CLASSES]);

        let (loss, d_out) = loss_gradient(self.config.head, &out, label, scale);
        let mut d6 = dense_backward::<L, F6_WIDE, CLASSES_WIDE>(arch, &w.fc3, &f6, &d_out, &mut g.fc3, &mut g.fc3_bias);
        activation_backward(arch, &f6, &mut d6);
        let mut d5 = dense_backward::<L, F5_WIDE, F6_WIDE>(arch, &w.fc2, &f5, &d6, &mut g.fc2, &mut g.fc2_bias);
        activation_backward(arch, &f5, &mut d5);
        let d_flat = dense_backward::<L, FLAT, F5_WIDE>(arch, &w.fc1, &flat, &d5, &mut g.fc1, &mut g.fc1_bias);
        // Back from PyTorch's flatten order (map, y, x) to maps.
        let d4: Maps<C3_MAPS, S4_SIDE, S4_SIDE> =
            std::array::from_fn(|c| std::array::from_fn(|y| std::array::from_fn(|x| d_flat[(c * S4_SIDE + y) * S4_SIDE + x])));
        let d3: Maps<C3_MAPS, C3_SIDE, C3_SIDE> = subsample_backward(arch, &c3, &s4, &d4);
        let d2 = conv2_backward::<L>(by_output, &s2, &d3, g);
        match arch {
            Arch::Modern => conv1_backward_routed::<L>(image, &c1, &s2, &d2, g),
            Arch::Classic => conv1_backward::<L>(image, &subsample_backward(arch, &c1, &s2, &d2), g),
        }
        loss
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

/// S2 and S4 as [`subsample`] computes them, leaving in `maps` what their backward pass
/// reads: the pre-activations (modern: the window's maximum is where the gradient goes) or
/// the tanh'd values (classic: tanh's derivative is `1 - tanh^2`).
#[inline(always)]
fn subsample_keeping<const C: usize, const N: usize, const W: usize, const S: usize>(arch: Arch, maps: &mut Maps<C, N, W>) -> Maps<C, S, S> {
    if arch == Arch::Classic {
        for row in maps.iter_mut().flatten() {
            row[..2 * S].iter_mut().for_each(|v| *v = v.tanh());
        }
    }
    let mut out = [[[0f32; S]; S]; C];
    for (o, m) in out.iter_mut().zip(maps.iter()) {
        for (y, row) in o.iter_mut().enumerate() {
            let (top, bottom) = (&m[2 * y], &m[2 * y + 1]);
            for (x, v) in row.iter_mut().enumerate() {
                *v = pool(arch, [top[2 * x], top[2 * x + 1], bottom[2 * x], bottom[2 * x + 1]]);
            }
        }
    }
    out
}

/// The gradient with respect to the pre-activations of C1 or C3, from that of the subsampled
/// maps `d` (`kept` and `pooled` as [`subsample_keeping`] left them; columns past `2 S` get 0).
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
                        let hits = [kept_top[l] == max, kept_top[r] == max, kept_bottom[l] == max, kept_bottom[r] == max];
                        let mut open = max > 0.0;
                        let mut route = |hit: bool| {
                            let take = open & hit;
                            open &= !take;
                            d * f32::from(u8::from(take))
                        };
                        (top[l], top[r], bottom[l], bottom[r]) = (route(hits[0]), route(hits[1]), route(hits[2]), route(hits[3]));
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

/// A linear layer backwards, weights stored (in, out) as [`dense`] reads them: adds the
/// gradient of its weights (`x d^T`) and bias (`d`) into `gw` and `gb`, and returns that of
/// its inputs (`W d`). Inputs that are 0 add nothing to `gw`, so their rows are skipped; in
/// the modern variant every input is a ReLU output, whose gradient the next step zeroes where
/// it is 0, so the input gradient is skipped there too.
#[inline(always)]
fn dense_backward<L: Lanes, const I: usize, const O: usize>(
    arch: Arch,
    w: &[[f32; O]; I],
    x: &[f32; I],
    d: &[f32; O],
    gw: &mut [[f32; O]; I],
    gb: &mut [f32; O],
) -> [f32; I] {
    for (gb, d) in gb.iter_mut().zip(d) {
        *gb += d;
    }
    let mut dx = [0f32; I];
    for ((&xi, dx), (w, gw)) in x.iter().zip(&mut dx).zip(w.iter().zip(gw)) {
        if xi != 0.0 {
            let s = L::splat(xi);
            for (g, d) in gw.chunks_exact_mut(LANES).zip(d.chunks_exact(LANES)) {
                L::load(g).mul_add(s, L::load(d)).store(g);
            }
        }
        if xi != 0.0 || arch == Arch::Classic {
            // Two running sums, over alternate lane vectors.
            let mut acc = [L::splat(0.0); 2];
            for (k, (w, d)) in w.chunks_exact(LANES).zip(d.chunks_exact(LANES)).enumerate() {
                acc[k % 2] = acc[k % 2].mul_add(L::load(w), L::load(d));
            }
            *dx = acc[0].add(acc[1]).sum();
        }
    }
    dx
}

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
    // The gradient by position, its 16 maps in two lane vectors: (10, 10, 16).
    let mut by_position = [[[0f32; C3_MAPS]; C3_SIDE]; C3_SIDE];
    for (o, map) in d3.iter().enumerate() {
        for (y, row) in map.iter().enumerate() {
            for (x, &v) in row.iter().enumerate() {
                by_position[y][x][o] = v;
            }
        }
    }
    let halves = |at: &[f32]| [L::load(at), L::load(&at[LANES..])];
    let mut bias = halves(&g.conv2_bias);
    for d in by_position.as_flattened() {
        let d = halves(d);
        bias = [bias[0].add(d[0]), bias[1].add(d[1])];
    }
    bias[0].store(&mut g.conv2_bias);
    bias[1].store(&mut g.conv2_bias[LANES..]);
    // Weights: g[i][ky][kx][o] += sum over positions of S2[i][y + ky][x + kx] d3[o][y][x],
    // the five kx of one (i, ky) in ten running sums.
    for (map, g_kernel) in s2.iter().zip(g.conv2.iter_mut()) {
        for (ky, g_row) in g_kernel.iter_mut().enumerate() {
            let mut acc: [[L; 2]; KERNEL] = std::array::from_fn(|kx| halves(&g_row[kx]));
            for (y, d_row) in by_position.iter().enumerate() {
                let input = &map[y + ky];
                for (x, d) in d_row.iter().enumerate() {
                    let d = halves(d);
                    for (kx, acc) in acc.iter_mut().enumerate() {
                        let s = L::splat(input[x + kx]);
                        *acc = [acc[0].mul_add(s, d[0]), acc[1].mul_add(s, d[1])];
                    }
                }
            }
            for (g, acc) in g_row.iter_mut().zip(acc) {
                acc[0].store(g);
                acc[1].store(&mut g[LANES..]);
            }
        }
    }
    // S2's gradient: each C3 position adds its gradient times conv2's 6 x 5 x 5 weights into
    // the S2 window it read, d2[i][y + ky][x + kx] += d3[o][y][x] w[o][i][ky][kx], one row
    // of five kx (in a lane vector, three zero weights past them) at a time. Maps whose
    // gradient is 0 there are skipped: with max-pooling, at least three positions in four.
    let mut padded = [[[0f32; S2_SIDE + LANES + 2]; S2_SIDE]; C1_MAPS]; // rows 24 wide
    for (y, row) in by_position.iter().enumerate() {
        for (x, d) in row.iter().enumerate() {
            let mut nonzero = [(0, 0f32); C3_MAPS];
            let mut n = 0;
            for (o, &v) in d.iter().enumerate() {
                nonzero[n] = (o, v);
                n += usize::from(v != 0.0);
            }
            if n == 0 {
                continue;
            }
            for (i, rows) in padded.iter_mut().enumerate() {
                for ky in 0..KERNEL {
                    let mut acc = L::splat(0.0);
                    for &(o, v) in &nonzero[..n] {
                        acc = acc.mul_add(L::splat(v), L::load(&by_output[o][i][ky]));
                    }
                    let at = &mut rows[y + ky][x..];
                    L::load(at).add(acc).store(at);
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
                    let xs: [L; KERNEL] = std::array::from_fn(|kx| L::load(&input[kx + j * LANES..]));
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
        let [fast, portable] = [DirectNet::share as Share, DirectNet::share_with::<Portable>].map(|share| {
            let step = direct.step_in(&vs, &xs, &ys, share).unwrap();
            step.gradients.into_iter().chain([step.logits, step.loss]).collect::<Vec<_>>()
        });
        let relative = |got: &Tensor, want: &Tensor| {
            let want = want.to_kind(Kind::Double);
            (got.to_kind(Kind::Double) - &want).abs().max().double_value(&[]) / want.abs().max().double_value(&[])
        };
        float
            .iter()
            .zip(&double)
            .enumerate()
            .map(|(i, ((name, f), (_, d)))| (name.clone(), [relative(&fast[i], f), relative(&portable[i], f), relative(&fast[i], d), relative(&portable[i], d)]))
            .collect()
    }

    #[test]
    fn gradients_agree_with_libtorch_autograd_for_every_parameter() {
        // Both sides sum in f32 in different orders: seen up to 5e-6 against float32 autograd
        // (most of it libtorch's own rounding: against float64 autograd the direct engine is
        // within 3e-6, libtorch's float32 within 5e-6). 1e-5 is the bound; a wrong
        // index, a missing 1/B or a misrouted max-pool gradient gives 1e-2 or more.
        let against = ["this CPU's loops vs float32", "portable loops vs float32", "this CPU's loops vs float64", "portable loops vs float64"];
        for arch in [Arch::Modern, Arch::Classic] {
            for head in [Head::Softmax, Head::Sigmoid] {
                // 70 images: two threads' shares (35 each, above the 32-image minimum).
                for (batch, seed) in [(1, 11), (70, 12)] {
                    for (name, diffs) in relative_differences(arch, head, batch, seed) {
                        for (what, diff) in against.into_iter().zip(diffs) {
                            assert!(diff <= 1e-5, "{arch:?}/{head:?}, batch {batch}, {name}, {what}: relative difference {diff:e}");
                        }
                    }
                }
            }
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
