//! The `direct` engine: LeNet-5's forward and backward passes as plain Rust loops on the CPU,
//! for inference (this file) and training (`gradients.rs`).
//!
//! For one image libtorch spends most of its time on per-call set-up (oneDNN primitives,
//! dispatch, allocations), not on the 0.42 M multiply-adds. These loops do only the
//! arithmetic, eight or sixteen floats at a time through the small `Lanes` trait
//! (`lanes.rs`), on weights laid out for them (`layers.rs` holds the layer loops), and split
//! a batch across threads. Their logits agree with libtorch's to float rounding (the tests
//! bound the difference), not bit for bit: the libtorch engine stays the one that reproduces
//! PyTorch exactly.

use anyhow::{ensure, Context, Result};
use rten_simd::SimdUnaryOp;
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::model::{Arch, ModelConfig, INPUT_SIZE, NUM_CLASSES, PARAMETERS};
use crate::values;

mod gradients;
mod lanes;
mod layers;
pub mod peak;
mod team;

pub use gradients::{DirectTraining, Step};
pub use lanes::instruction_set;
use lanes::*;
use layers::*;
pub use team::LentThreads;

const SIDE: usize = INPUT_SIZE as usize;
const KERNEL: usize = 5;
const C1_MAPS: usize = 6;
const C1_SIDE: usize = 28;
const S2_SIDE: usize = 14;
const C3_MAPS: usize = 16;
const C3_SIDE: usize = 10;
const S4_SIDE: usize = 5;
const FLAT: usize = C3_MAPS * S4_SIDE * S4_SIDE; // 400
const CLASSES: usize = NUM_CLASSES as usize;
const PIXELS: usize = SIDE * SIDE;
/// Below this many images per thread, starting a thread costs more than it saves.
const MIN_IMAGES_PER_THREAD: usize = 32;

/// Eight floats: one AVX2 register, the narrowest [`Lanes`] and the unit the layouts are
/// sized in (their widths are whole multiples of sixteen too, for AVX-512).
const LANES: usize = 8;
/// Widths rounded up to whole lanes. The extra weights and biases are zero, so the extra
/// outputs are zero, and stay zero through ReLU and tanh.
const C1_WIDE: usize = 32; // C1 rows, computed 32 wide; the last 4 are never read
const IMAGE_WIDE: usize = C1_WIDE + 8; // input rows, zero-padded for those 4 columns
const F5_WIDE: usize = 128; // 120 units
const F6_WIDE: usize = 96; // 84 units
const CLASSES_WIDE: usize = 32;

type Maps<const C: usize, const H: usize, const W: usize> = [[[f32; W]; H]; C];

/// The weights of a LeNet-5, copied out of libtorch into the layouts the loops want.
struct Weights {
    conv1: [[[f32; KERNEL]; KERNEL]; C1_MAPS], // as PyTorch: (out, ky, kx)
    conv1_bias: [f32; C1_MAPS],
    conv2: [[[[f32; C3_MAPS]; KERNEL]; KERNEL]; C1_MAPS], // (in, ky, kx, out): vectorised over out
    conv2_bias: [f32; C3_MAPS],
    // Linear layers transposed, (in, out), so each input scales one contiguous row; fc1's
    // inputs in PyTorch's flatten order (map, y, x).
    fc1: [[f32; F5_WIDE]; FLAT],
    fc1_bias: [f32; F5_WIDE],
    fc2: [[f32; F6_WIDE]; F5_WIDE],
    fc2_bias: [f32; F6_WIDE],
    fc3: [[f32; CLASSES_WIDE]; F6_WIDE],
    fc3_bias: [f32; CLASSES_WIDE],
}

/// A LeNet-5 that runs on the CPU without libtorch; see the module comment.
pub struct DirectNet {
    weights: Box<Weights>,
    pub config: ModelConfig,
    /// Threads a batch is split across: libtorch's OpenMP team (`team.rs`).
    threads: usize,
}

/// How many values parameter `p` of [`PARAMETERS`] holds.
fn parameter_len(p: usize) -> usize {
    PARAMETERS[p].1.iter().product::<i64>() as usize
}

/// `to[c * to_row + r] = from[r * from_row + c]` for every `r < rows`, `c < cols`: a matrix
/// transposed between row strides, in 8 x 8 tiles, so both sides move whole cache lines (the
/// weights go in and the gradients out at every training step; value by value, fc1's
/// transpose cost a cache miss per value).
fn transpose(from: &[f32], from_row: usize, to: &mut [f32], to_row: usize, rows: usize, cols: usize) {
    const TILE: usize = 8;
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            if r0 + TILE <= rows && c0 + TILE <= cols {
                let mut tile = [[0f32; TILE]; TILE];
                for (r, line) in tile.iter_mut().enumerate() {
                    line.copy_from_slice(&from[(r0 + r) * from_row + c0..][..TILE]);
                }
                for c in 0..TILE {
                    let line: &mut [f32; TILE] =
                        (&mut to[(c0 + c) * to_row + r0..][..TILE]).try_into().expect("8 values");
                    *line = std::array::from_fn(|r| tile[r][c]);
                }
            } else {
                for r in r0..(r0 + TILE).min(rows) {
                    for c in c0..(c0 + TILE).min(cols) {
                        to[c * to_row + r] = from[r * from_row + c];
                    }
                }
            }
        }
    }
}

impl Weights {
    fn zeroed() -> Box<Weights> {
        Box::new(Weights {
            conv1: [[[0.0; KERNEL]; KERNEL]; C1_MAPS],
            conv1_bias: [0.0; C1_MAPS],
            conv2: [[[[0.0; C3_MAPS]; KERNEL]; KERNEL]; C1_MAPS],
            conv2_bias: [0.0; C3_MAPS],
            fc1: [[0.0; F5_WIDE]; FLAT],
            fc1_bias: [0.0; F5_WIDE],
            fc2: [[0.0; F6_WIDE]; F5_WIDE],
            fc2_bias: [0.0; F6_WIDE],
            fc3: [[0.0; CLASSES_WIDE]; F6_WIDE],
            fc3_bias: [0.0; CLASSES_WIDE],
        })
    }

    /// Each parameter's array, flat, in the order of [`PARAMETERS`].
    fn arrays_mut(&mut self) -> [&mut [f32]; 10] {
        [
            self.conv1.as_flattened_mut().as_flattened_mut(),
            &mut self.conv1_bias,
            self.conv2.as_flattened_mut().as_flattened_mut().as_flattened_mut(),
            &mut self.conv2_bias,
            self.fc1.as_flattened_mut(),
            &mut self.fc1_bias,
            self.fc2.as_flattened_mut(),
            &mut self.fc2_bias,
            self.fc3.as_flattened_mut(),
            &mut self.fc3_bias,
        ]
    }

    /// Where parameter `p` of [`PARAMETERS`] differs from PyTorch's layout: its (outputs,
    /// inputs) stored transposed, as rows of `row` floats, one per input. conv2 is (in, ky,
    /// kx, out) here and the linear layers (in, out) with rows padded to whole lanes; the rest
    /// are as PyTorch (None).
    fn transposed(p: usize) -> Option<(usize, usize, usize)> {
        match PARAMETERS[p].0 {
            "conv2.weight" => Some((C3_MAPS, C1_MAPS * KERNEL * KERNEL, C3_MAPS)),
            "fc1.weight" => Some((120, FLAT, F5_WIDE)),
            "fc2.weight" => Some((84, 120, F6_WIDE)),
            "fc3.weight" => Some((CLASSES, 84, CLASSES_WIDE)),
            _ => None,
        }
    }

    /// Parameter `p`'s values in PyTorch's layout (`torch`) into its array here (the padding
    /// untouched).
    fn from_torch(p: usize, torch: &[f32], array: &mut [f32]) {
        match Weights::transposed(p) {
            Some((outputs, inputs, row)) => transpose(torch, inputs, array, row, outputs, inputs),
            None => array[..torch.len()].copy_from_slice(torch), // a bias, padded
        }
    }

    /// Parameter `p`'s array here into PyTorch's layout (`torch`): the gradients, each step.
    fn to_torch(p: usize, array: &[f32], torch: &mut [f32]) {
        match Weights::transposed(p) {
            Some((outputs, inputs, row)) => transpose(array, row, torch, inputs, inputs, outputs),
            None => torch.copy_from_slice(&array[..torch.len()]),
        }
    }

    /// Copies the weights of the LeNet-5 in `vs` into these layouts (the padding stays zero).
    fn load(&mut self, vs: &VarStore) -> Result<()> {
        let variables = vs.variables();
        let mut tensors = vec![];
        for (name, _) in PARAMETERS {
            tensors.push(variables.get(name).with_context(|| format!("the model has no {name}"))?);
        }
        self.load_tensors(tensors.try_into().expect("one per parameter"))
    }

    /// Copies `params` (the [`PARAMETERS`] in order) into these layouts. Every shape is
    /// checked before anything is copied.
    fn load_tensors(&mut self, params: [&Tensor; 10]) -> Result<()> {
        for (t, (name, shape)) in params.iter().zip(PARAMETERS) {
            ensure!(t.size() == shape, "{name} has shape {:?}; expected {shape:?}", t.size());
        }
        for (p, array) in self.arrays_mut().into_iter().enumerate() {
            let t = params[p];
            let converted; // only where the values are not float32 in place on the CPU already
            let t = if t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous() {
                t
            } else {
                converted = t.detach().f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?;
                &converted
            };
            Weights::from_torch(p, values::of(t), array);
        }
        Ok(())
    }
}

impl DirectNet {
    /// Copies the weights of the LeNet-5 in `vs` (built by `LeNet5::new`); batches are split
    /// across up to `threads` threads.
    pub fn new(vs: &VarStore, config: ModelConfig, threads: usize) -> Result<DirectNet> {
        let mut weights = Weights::zeroed();
        weights.load(vs)?;
        DirectNet::with_weights(weights, config, threads)
    }

    /// Copies `params`, the ten tensors of [`crate::model::forward_with`] in that order (the
    /// Python twin's `nn.Parameter`s), as [`DirectNet::new`] copies a VarStore's.
    pub fn from_tensors(params: [&Tensor; 10], config: ModelConfig, threads: usize) -> Result<DirectNet> {
        let mut weights = Weights::zeroed();
        weights.load_tensors(params)?;
        DirectNet::with_weights(weights, config, threads)
    }

    /// Copies `params` in again, in place, keeping the threads: after the weights changed.
    /// On an error the old weights may be half overwritten; the caller drops the net.
    pub fn reload(&mut self, params: [&Tensor; 10]) -> Result<()> {
        self.weights.load_tensors(params)
    }

    fn with_weights(weights: Box<Weights>, config: ModelConfig, threads: usize) -> Result<DirectNet> {
        let threads = threads.max(1);
        team::check(threads)?;
        Ok(DirectNet { weights, config, threads })
    }

    /// Threads a batch is split across.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// How many shares a batch of `images` is split into: one per thread, but none smaller
    /// than [`MIN_IMAGES_PER_THREAD`].
    fn shares(&self, images: usize) -> usize {
        self.threads.min(images / MIN_IMAGES_PER_THREAD).max(1)
    }

    /// Logits `(B, 10)` for a normalised batch `(B, 1, 32, 32)` on the CPU, as `LeNet5::forward`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let batch = pixels_of(xs)?;
        let pixels = values::of(&batch);
        // Written in place: at one image, the conversion and copies this skips took 5% of the time.
        let mut logits = Tensor::f_empty([(pixels.len() / PIXELS) as i64, CLASSES as i64], (Kind::Float, Device::Cpu))?;
        self.run(pixels, values::of_mut(&mut logits));
        Ok(logits)
    }

    /// Logits of the images in `pixels` (32x32 each, row-major) into `logits` (10 each),
    /// on up to `self.threads` threads.
    pub fn run(&self, pixels: &[f32], logits: &mut [f32]) {
        let images = pixels.len() / PIXELS;
        assert!(
            pixels.len().is_multiple_of(PIXELS) && logits.len() == images * CLASSES,
            "32x32 pixels and 10 logits per image"
        );
        if images == 0 {
            return; // an empty batch (and `chunks` takes no size 0)
        }
        let per_share = images.div_ceil(self.shares(images));
        let shares = pixels.chunks(per_share * PIXELS).zip(logits.chunks_mut(per_share * CLASSES));
        team::run(shares.collect(), |(inputs, outputs)| self.run_here(inputs, outputs));
    }

    fn run_here(&self, pixels: &[f32], logits: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: the CPU has the features `run_avx512` is compiled for.
            return unsafe { self.run_avx512(pixels, logits) };
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has the features `run_avx2` is compiled for.
            return unsafe { self.run_avx2(pixels, logits) };
        }
        self.run_with::<Portable>(pixels, logits)
    }

    /// `run_with` in AVX2 registers: everything it calls is inlined into this function, which
    /// is compiled for AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, pixels: &[f32], logits: &mut [f32]) {
        self.run_with::<avx2::Avx2>(pixels, logits)
    }

    /// `run_with` in AVX-512 registers, as [`DirectNet::run_avx2`]: each lane does the same
    /// operations in the same order as there, so the logits are the same, bit for bit, and
    /// sooner where the CPU runs 16-float operations at full width.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn run_avx512(&self, pixels: &[f32], logits: &mut [f32]) {
        self.run_with::<avx512::Avx512>(pixels, logits)
    }

    /// Each image's logits, the variant chosen once, outside [`DirectNet::each_image`]'s loop
    /// over images: chosen inside, the classic variant's set-up (address tables for its
    /// gathers, hoisted to before the loop) ran on every call, a tenth of one image's time in
    /// the modern variant.
    #[inline(always)]
    fn run_with<L: Lanes>(&self, pixels: &[f32], logits: &mut [f32]) {
        match self.config.arch {
            Arch::Modern => self.each_image::<L>(Arch::Modern, pixels, logits),
            Arch::Classic => self.each_image::<L>(Arch::Classic, pixels, logits),
        }
    }

    /// Each image's logits in variant `arch`, a constant in each of `run_with`'s arms.
    #[inline(always)]
    fn each_image<L: Lanes>(&self, arch: Arch, pixels: &[f32], logits: &mut [f32]) {
        let mut image = [[0f32; IMAGE_WIDE]; SIDE];
        for (input, out) in pixels.chunks_exact(PIXELS).zip(logits.chunks_exact_mut(CLASSES)) {
            for (row, src) in image.iter_mut().zip(input.chunks_exact(SIDE)) {
                row[..SIDE].copy_from_slice(src);
            }
            out.copy_from_slice(&self.image::<L>(arch, &image)[..CLASSES]);
        }
    }

    /// The forward pass of one image in variant `arch`.
    #[inline(always)]
    fn image<L: Lanes>(&self, arch: Arch, image: &[[f32; IMAGE_WIDE]; SIDE]) -> [f32; CLASSES_WIDE] {
        let w = &*self.weights;
        let mut s2 = [[[0.0; S2_SIDE]; S2_SIDE]; C1_MAPS];
        match arch {
            Arch::Modern => conv1_max_pooled::<L>(w, image, &mut s2),
            Arch::Classic => {
                let mut c1 = [[[0.0; C1_WIDE]; C1_SIDE]; C1_MAPS];
                conv1::<L>(w, image, &mut c1);
                subsample(arch, &mut c1, &mut s2);
            }
        }
        let mut s4 = [[[0.0; S4_SIDE]; S4_SIDE]; C3_MAPS];
        match arch {
            Arch::Modern => conv2_max_pooled::<L>(w, &s2, &mut s4),
            Arch::Classic => {
                let mut c3 = [[[0.0; C3_SIDE]; C3_SIDE]; C3_MAPS];
                conv2::<L>(w, &s2, &mut c3);
                subsample(arch, &mut c3, &mut s4);
            }
        }
        let flat: &[f32; FLAT] = s4.as_flattened().as_flattened().try_into().expect("16 x 5 x 5 values");
        let f5 = activate(arch, dense::<L, FLAT, F5_WIDE>(&w.fc1, &w.fc1_bias, flat));
        let f6 = activate(arch, dense::<L, F5_WIDE, F6_WIDE>(&w.fc2, &w.fc2_bias, &f5));
        dense::<L, F6_WIDE, CLASSES_WIDE>(&w.fc3, &w.fc3_bias, &f6)
    }
}

/// A normalised batch `(B, 1, 32, 32)` on the CPU as a contiguous float tensor (the input
/// itself when it is one, else a converted copy), whose pixels [`values::of`] reads in place.
fn pixels_of(xs: &Tensor) -> Result<Tensor> {
    ensure!(xs.device() == Device::Cpu, "the direct engine runs on the CPU; the input is on {:?}", xs.device());
    let size = xs.size();
    ensure!(
        size.len() == 4 && size[1..] == [1, SIDE as i64, SIDE as i64],
        "the input has shape {size:?}; expected [B, 1, {SIDE}, {SIDE}]"
    );
    if xs.kind() == Kind::Float && xs.is_contiguous() {
        return Ok(xs.shallow_clone()); // no libtorch op: each costs a dispatch at one image
    }
    Ok(xs.f_to_kind(Kind::Float)?.f_contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Head, LeNet5};
    use tch::nn::Module;

    /// A freshly initialised LeNet-5 (seeded) and its direct twin; the VarStore keeps the
    /// libtorch model's weights alive.
    fn twins(arch: Arch, seed: i64) -> (VarStore, LeNet5, DirectNet) {
        tch::manual_seed(seed);
        let vs = VarStore::new(Device::Cpu);
        let config = ModelConfig { arch, head: Head::Softmax };
        let net = LeNet5::new(&vs.root(), config);
        let direct = DirectNet::new(&vs, config, 2).unwrap();
        (vs, net, direct)
    }

    /// Largest |direct - libtorch| over a batch, relative to the largest |libtorch| logit, for
    /// the loops this CPU runs and for the portable ones (which CPUs without AVX2 run).
    fn relative_differences(arch: Arch, batch: i64, seed: i64) -> [f64; 2] {
        let (_vs, net, direct) = twins(arch, seed);
        // Inputs in the range of normalised MNIST (background -0.42, ink up to 2.8).
        let xs = Tensor::rand([batch, 1, 32, 32], (Kind::Float, Device::Cpu)) * 3.2 - 0.42;
        let expected = tch::no_grad(|| net.forward(&xs));
        let got = direct.forward(&xs).unwrap();
        assert_eq!(got.size(), [batch, 10]);
        let pixels = Vec::<f32>::try_from(xs.view(-1)).unwrap();
        let mut portable = vec![0f32; batch as usize * CLASSES];
        direct.run_with::<Portable>(&pixels, &mut portable);
        let portable = Tensor::from_slice(&portable).view([batch, 10]);
        let scale = expected.abs().max().double_value(&[]);
        [got, portable].map(|t| (t - &expected).abs().max().double_value(&[]) / scale)
    }

    #[test]
    fn logits_agree_with_libtorch_to_float_rounding() {
        // Both sides sum in f32 in different orders; 1e-5 of the largest logit is 20-50x the
        // rounding seen (2e-7 to 5e-7), and far below what a wrong weight layout gives (0.17).
        for arch in [Arch::Modern, Arch::Classic] {
            for (batch, seed) in [(1, 1), (7, 2), (200, 3)] {
                for (loops, diff) in ["this CPU's", "portable"].into_iter().zip(relative_differences(arch, batch, seed))
                {
                    assert!(diff < 1e-5, "{arch:?}, batch {batch}, {loops} loops: relative difference {diff:e}");
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx512_loops_give_the_avx2_loops_logits_bit_for_bit() {
        if !has_avx512() {
            eprintln!(
                "skipped: this CPU has no AVX-512, so its forward pass runs the AVX2 loops that the other tests check"
            );
            return;
        }
        for arch in [Arch::Modern, Arch::Classic] {
            let (_vs, _net, direct) = twins(arch, 7);
            let xs = Tensor::rand([50, 1, 32, 32], (Kind::Float, Device::Cpu)) * 3.2 - 0.42;
            let pixels = Vec::<f32>::try_from(xs.view(-1)).unwrap();
            let [mut avx2, mut avx512] = [0, 1].map(|_| vec![0f32; 50 * CLASSES]);
            // SAFETY: has_avx512 (which includes AVX2 and FMA) said the CPU has both.
            unsafe {
                direct.run_avx2(&pixels, &mut avx2);
                direct.run_avx512(&pixels, &mut avx512);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            assert_eq!(bits(&avx2), bits(&avx512), "{arch:?}");
        }
    }

    /// `values` drawn from `choices` by a fixed linear congruential sequence.
    fn draw(values: &mut [f32], choices: &[f32], mut state: u32) {
        for v in values {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            *v = choices[(state >> 16) as usize % choices.len()];
        }
    }

    /// The bits of each value, every NaN as one.
    fn canonical<const C: usize, const H: usize, const W: usize>(maps: &Maps<C, H, W>) -> Vec<u32> {
        maps.as_flattened()
            .as_flattened()
            .iter()
            .map(|x| if x.is_nan() { f32::NAN.to_bits() } else { x.to_bits() })
            .collect()
    }

    /// S2 from `c1` and S4 from `s2` in the modern variant, as the lanes compute them
    /// ([`max_pool_c1`], [`conv2_max_pooled`]) and as [`subsample`] does one value at a time;
    /// and S2 from `image`, fused ([`conv1_max_pooled`]) and not.
    #[inline(always)]
    fn pooled_both_ways<L: Lanes>(
        w: &Weights,
        c1: &Maps<C1_MAPS, C1_SIDE, C1_WIDE>,
        s2: &Maps<C1_MAPS, S2_SIDE, S2_SIDE>,
        image: &[[f32; IMAGE_WIDE]; SIDE],
    ) -> [[Vec<u32>; 2]; 3] {
        let mut pooled_c1 = [[[0f32; S2_SIDE]; S2_SIDE]; C1_MAPS];
        max_pool_c1::<L>(c1, &mut pooled_c1);
        let (mut s4, mut c3) = ([[[0f32; S4_SIDE]; S4_SIDE]; C3_MAPS], [[[0f32; C3_SIDE]; C3_SIDE]; C3_MAPS]);
        conv2_max_pooled::<L>(w, s2, &mut s4);
        conv2::<L>(w, s2, &mut c3);
        let (mut s2_loop, mut s4_loop) = ([[[0f32; S2_SIDE]; S2_SIDE]; C1_MAPS], [[[0f32; S4_SIDE]; S4_SIDE]; C3_MAPS]);
        subsample(Arch::Modern, &mut c1.clone(), &mut s2_loop);
        subsample(Arch::Modern, &mut c3, &mut s4_loop);
        let (mut fused, mut s2_of_c1) = ([[[0f32; S2_SIDE]; S2_SIDE]; C1_MAPS], [[[0f32; S2_SIDE]; S2_SIDE]; C1_MAPS]);
        let mut c1_of_image = [[[0f32; C1_WIDE]; C1_SIDE]; C1_MAPS];
        conv1_max_pooled::<L>(w, image, &mut fused);
        conv1::<L>(w, image, &mut c1_of_image);
        max_pool_c1::<L>(&c1_of_image, &mut s2_of_c1);
        [
            [canonical(&pooled_c1), canonical(&s2_loop)],
            [canonical(&s4), canonical(&s4_loop)],
            [canonical(&fused), canonical(&s2_of_c1)],
        ]
    }

    #[test]
    fn max_pooling_in_lanes_gives_the_maxima_of_the_one_value_at_a_time_loop() {
        // Few distinct values, so windows tie; negatives, zeros of both signs and NaN among
        // them. Small integers into conv2, so its sums are exact (the same with and without
        // FMA) and tie too.
        let mut c1 = Box::new([[[0f32; C1_WIDE]; C1_SIDE]; C1_MAPS]);
        draw(c1.as_flattened_mut().as_flattened_mut(), &[-1.5, -0.0, 0.0, 0.25, 0.25, 2.0, f32::NAN, -3.0], 1);
        let mut s2 = [[[0f32; S2_SIDE]; S2_SIDE]; C1_MAPS];
        draw(s2.as_flattened_mut().as_flattened_mut(), &[0.0, 1.0, 2.0, 1.0, 0.0, 3.0], 2);
        s2[2][7][3] = f32::NAN; // the C3 positions (3..=7, 0..=3) read it, in every map
        let mut w = Weights::zeroed();
        let [conv1, conv1_bias, conv2, bias, ..] = w.arrays_mut();
        draw(conv2, &[-1.0, 0.0, 1.0], 3);
        draw(bias, &[-2.0, 0.0, 1.0], 4);
        // conv1 the same way, on a small-integer image with a NaN pixel (read by C1 rows 8..=12).
        draw(conv1, &[-1.0, 0.0, 1.0], 5);
        draw(conv1_bias, &[-1.0, 0.0, 0.5], 6);
        let mut image = Box::new([[0f32; IMAGE_WIDE]; SIDE]);
        for (y, row) in image.iter_mut().enumerate() {
            draw(&mut row[..SIDE], &[0.0, 1.0, -1.0, 2.0], 7 + y as u32);
        }
        image[12][9] = f32::NAN;
        let check = |lanes: &str, [s2, s4, fused]: [[Vec<u32>; 2]; 3]| {
            assert!(s2[0] == s2[1], "{lanes}: S2 is not the loop's maxima");
            assert!(s4[0] == s4[1], "{lanes}: S4 is not the loop's maxima");
            assert!(fused[0] == fused[1], "{lanes}: S2 fused with conv1 is not S2 of conv1's maps");
        };
        check("portable lanes", pooled_both_ways::<Portable>(&w, &c1, &s2, &image));
        #[cfg(target_arch = "x86_64")]
        {
            type Pooled = [[Vec<u32>; 2]; 3];
            #[target_feature(enable = "avx2,fma")]
            unsafe fn in_avx2(
                w: &Weights,
                c1: &Maps<C1_MAPS, C1_SIDE, C1_WIDE>,
                s2: &Maps<C1_MAPS, S2_SIDE, S2_SIDE>,
                image: &[[f32; IMAGE_WIDE]; SIDE],
            ) -> Pooled {
                pooled_both_ways::<avx2::Avx2>(w, c1, s2, image)
            }
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn in_avx512(
                w: &Weights,
                c1: &Maps<C1_MAPS, C1_SIDE, C1_WIDE>,
                s2: &Maps<C1_MAPS, S2_SIDE, S2_SIDE>,
                image: &[[f32; IMAGE_WIDE]; SIDE],
            ) -> Pooled {
                pooled_both_ways::<avx512::Avx512>(w, c1, s2, image)
            }
            if has_avx2() {
                // SAFETY: the CPU has AVX2 and FMA.
                check("AVX2", unsafe { in_avx2(&w, &c1, &s2, &image) });
            }
            if has_avx512() {
                // SAFETY: the CPU has AVX-512.
                check("AVX-512", unsafe { in_avx512(&w, &c1, &s2, &image) });
            }
        }
    }

    #[test]
    fn a_batch_split_across_threads_gives_each_image_its_own_logits() {
        let (vs, _net, direct) = twins(Arch::Modern, 4);
        let direct = DirectNet::new(&vs, direct.config, 3).unwrap(); // whatever this machine's core count: 3 uneven chunks
        let xs = Tensor::randn([4 * MIN_IMAGES_PER_THREAD as i64 + 3, 1, 32, 32], (Kind::Float, Device::Cpu));
        let together = direct.forward(&xs).unwrap();
        for i in [0, 2 * MIN_IMAGES_PER_THREAD as i64, xs.size()[0] - 1] {
            let alone = direct.forward(&xs.narrow(0, i, 1)).unwrap();
            assert_eq!(
                Vec::<f32>::try_from(together.get(i)).unwrap(),
                Vec::<f32>::try_from(alone.get(0)).unwrap(),
                "image {i}"
            );
        }
    }

    #[test]
    fn a_nan_pixel_makes_every_logit_nan_as_in_libtorch() {
        let (_vs, net, direct) = twins(Arch::Modern, 5);
        let xs = Tensor::zeros([1, 1, 32, 32], (Kind::Float, Device::Cpu));
        let _ = xs.get(0).get(0).get(16).get(16).fill_(f64::NAN);
        let expected = tch::no_grad(|| net.forward(&xs));
        assert!(bool::try_from(expected.isnan().all()).unwrap(), "libtorch: {expected}");
        let got = direct.forward(&xs).unwrap();
        assert!(bool::try_from(got.isnan().all()).unwrap(), "direct: {got}");
    }

    #[test]
    fn an_empty_batch_gives_no_logits() {
        let (_vs, _net, direct) = twins(Arch::Modern, 6);
        assert_eq!(direct.forward(&Tensor::zeros([0, 1, 32, 32], (Kind::Float, Device::Cpu))).unwrap().size(), [0, 10]);
    }

    #[test]
    fn reloading_changed_tensors_follows_them() {
        let (_vs, net, mut direct) = twins(Arch::Classic, 9);
        let xs = Tensor::rand([3, 1, 32, 32], (Kind::Float, Device::Cpu));
        let before = direct.forward(&xs).unwrap();
        tch::no_grad(|| {
            let _ = net.tensors()[9].shallow_clone().f_add_scalar_(1.0).unwrap();
            // fc3.bias
        });
        assert!(direct.forward(&xs).unwrap().equal(&before), "a copy: unchanged until reloaded");
        direct.reload(net.tensors()).unwrap();
        let after = direct.forward(&xs).unwrap();
        assert!((after - before - 1.0).abs().max().double_value(&[]) < 1e-5);
        let fresh = DirectNet::from_tensors(net.tensors(), direct.config, 1).unwrap();
        assert!(fresh.forward(&xs).unwrap().equal(&direct.forward(&xs).unwrap()));
    }

    #[test]
    fn inputs_of_the_wrong_shape_are_refused() {
        let (_vs, _net, direct) = twins(Arch::Modern, 6);
        let err = direct.forward(&Tensor::zeros([2, 1, 28, 28], (Kind::Float, Device::Cpu))).unwrap_err();
        assert!(err.to_string().contains("[2, 1, 28, 28]"), "{err}");
    }
}
