//! The direct engine's layer loops, generic over [`Lanes`]: the convolutions, the
//! subsampling and activations, and the dense layers, on the layouts of [`Weights`].

use super::*;
/// C1 maps computed together eight floats wide: in conv1's backward pass, and its forward
/// pass in AVX2.
pub(super) const C1_GROUP: usize = 2;

/// C1 before its activation, into `maps` (every value written): each output row accumulates
/// 25 shifted input rows, 32 wide ([`conv1_row`]). (Into a place rather than returned: the
/// training pass keeps C1, and a returned 21 KB array was copied there.)
#[inline(always)]
pub(super) fn conv1<L: Lanes>(
    w: &Weights,
    image: &[[f32; IMAGE_WIDE]; SIDE],
    maps: &mut Maps<C1_MAPS, C1_SIDE, C1_WIDE>,
) {
    let group = conv1_group::<L>();
    for c0 in (0..C1_MAPS).step_by(group) {
        for y in 0..C1_SIDE {
            let rows = conv1_row::<L>(w, image, c0, y);
            for (map, a) in maps[c0..c0 + group].iter_mut().zip(&rows) {
                for (j, a) in a[..C1_WIDE / L::WIDTH].iter().enumerate() {
                    a.store(&mut map[y][j * L::WIDTH..]);
                }
            }
        }
    }
}

/// S2 of the modern variant straight from C1's rows in lanes, for inference (training keeps
/// C1 for its backward pass): rows `2y` and `2y + 1` of each map max-pooled and ReLU'd as
/// [`max_pool_c1`] does them from [`conv1`]'s maps, the same values, without C1's 21 KB
/// stored and read back.
#[inline(always)]
pub(super) fn conv1_max_pooled<L: Lanes>(
    w: &Weights,
    image: &[[f32; IMAGE_WIDE]; SIDE],
    s2: &mut Maps<C1_MAPS, S2_SIDE, S2_SIDE>,
) {
    let group = conv1_group::<L>();
    for c0 in (0..C1_MAPS).step_by(group) {
        for y in 0..S2_SIDE {
            let (top, bottom) = (conv1_row::<L>(w, image, c0, 2 * y), conv1_row::<L>(w, image, c0, 2 * y + 1));
            for (out, (top, bottom)) in s2[c0..c0 + group].iter_mut().zip(top.iter().zip(&bottom)) {
                pooled_row::<L>(|v| top[v].max_keeping_nan(bottom[v]), &mut out[y]);
            }
        }
    }
}

/// How many C1 maps [`conv1_row`] computes at once: each input vector loaded serves several
/// maps, for at least eight running sums, since an FMA's result is ready about four cycles
/// after it starts and a core starts two a cycle, so fewer independent sums leave its FMA
/// units idle. AVX-512 rows are two vectors: all six maps at once, 12 sums; AVX2's are four:
/// [`C1_GROUP`] maps, 8 sums, as its 16 registers allow.
#[inline(always)]
fn conv1_group<L: Lanes>() -> usize {
    if C1_WIDE / L::WIDTH <= 2 {
        C1_MAPS
    } else {
        C1_GROUP
    }
}

/// Row `y` of C1 maps `c0..c0 + conv1_group()` before the activation, in lanes (the first
/// `C1_WIDE / L::WIDTH` vectors of each). Every output sums its bias and 25 products in the
/// same order, whatever the lanes.
#[inline(always)]
fn conv1_row<L: Lanes>(
    w: &Weights,
    image: &[[f32; IMAGE_WIDE]; SIDE],
    c0: usize,
    y: usize,
) -> [[L; C1_WIDE / LANES]; C1_MAPS] {
    const MOST: usize = C1_WIDE / LANES; // vectors per row, at the narrowest lanes
    let (vectors, group) = (C1_WIDE / L::WIDTH, conv1_group::<L>());
    let mut acc = [[L::splat(0.0); MOST]; C1_MAPS];
    for (g, a) in acc[..group].iter_mut().enumerate() {
        *a = [L::splat(w.conv1_bias[c0 + g]); MOST];
    }
    for ky in 0..KERNEL {
        let input = &image[y + ky];
        for kx in 0..KERNEL {
            let xs: [L; MOST] =
                array_of(|j| if j < vectors { L::load(&input[kx + j * L::WIDTH..]) } else { L::splat(0.0) });
            for (g, a) in acc[..group].iter_mut().enumerate() {
                let k = L::splat(w.conv1[c0 + g][ky][kx]);
                for (a, &x) in a[..vectors].iter_mut().zip(&xs) {
                    *a = a.mul_add(k, x);
                }
            }
        }
    }
    acc
}

/// Row `y` of C3 before its activation, with full connections, for maps `half..half +
/// L::WIDTH`: each position accumulates its 150 inputs against weight vectors of those maps,
/// the whole row's ten positions at a time, so each weight vector loaded serves ten running
/// sums (ten, a weight vector and a broadcast input take 12 of AVX2's 16 registers).
#[inline(always)]
pub(super) fn conv2_row<L: Lanes>(
    w: &Weights,
    s2: &Maps<C1_MAPS, S2_SIDE, S2_SIDE>,
    y: usize,
    half: usize,
) -> [L; C3_SIDE] {
    let mut acc = [L::load(&w.conv2_bias[half..]); C3_SIDE];
    for (map, kernel) in s2.iter().zip(&w.conv2) {
        for (ky, kernel_row) in kernel.iter().enumerate() {
            let input = &map[y + ky];
            for (kx, k) in kernel_row.iter().enumerate() {
                let k = L::load(&k[half..]);
                for (x, a) in acc.iter_mut().enumerate() {
                    *a = a.mul_add(L::splat(input[x + kx]), k);
                }
            }
        }
    }
    acc
}

/// Stores the vector of maps `half..` at position (y, x) of `maps`.
#[inline(always)]
pub(super) fn scatter<L: Lanes, const H: usize, const W: usize>(
    v: L,
    maps: &mut Maps<C3_MAPS, H, W>,
    half: usize,
    y: usize,
    x: usize,
) {
    let mut values = [0f32; C3_MAPS];
    v.store(&mut values);
    for (map, &v) in maps[half..].iter_mut().zip(&values[..L::WIDTH]) {
        map[y][x] = v;
    }
}

/// C3 before its activation into `maps` (every value written, as [`conv1`]), row by row.
#[inline(always)]
pub(super) fn conv2<L: Lanes>(
    w: &Weights,
    s2: &Maps<C1_MAPS, S2_SIDE, S2_SIDE>,
    maps: &mut Maps<C3_MAPS, C3_SIDE, C3_SIDE>,
) {
    for half in (0..C3_MAPS).step_by(L::WIDTH) {
        for y in 0..C3_SIDE {
            for (x, v) in conv2_row::<L>(w, s2, y, half).into_iter().enumerate() {
                scatter(v, maps, half, y, x);
            }
        }
    }
}

/// S4 of the modern variant straight from C3's rows in lanes, for inference (training keeps
/// C3 for its backward pass): each window's four position vectors max-pooled and ReLU'd
/// lane by lane, the same values as [`subsample`] of [`conv2`] (as [`max_pool_c1`]), with a
/// quarter of the scattering into maps.
#[inline(always)]
pub(super) fn conv2_max_pooled<L: Lanes>(
    w: &Weights,
    s2: &Maps<C1_MAPS, S2_SIDE, S2_SIDE>,
    s4: &mut Maps<C3_MAPS, S4_SIDE, S4_SIDE>,
) {
    for half in (0..C3_MAPS).step_by(L::WIDTH) {
        for y in 0..S4_SIDE {
            let (top, bottom) = (conv2_row::<L>(w, s2, 2 * y, half), conv2_row::<L>(w, s2, 2 * y + 1, half));
            for x in 0..S4_SIDE {
                let (l, r) = (2 * x, 2 * x + 1);
                let max = top[l].max_keeping_nan(top[r]).max_keeping_nan(bottom[l].max_keeping_nan(bottom[r]));
                scatter(max.max_keeping_nan(L::splat(0.0)), s4, half, y, x);
            }
        }
    }
}

/// S2 of the modern variant, in lanes, into `s2`: [`subsample`]'s max-pooling and ReLU, with
/// the same values (a maximum is one of its inputs, and ReLU makes a zero of either sign 0),
/// each pair of rows' maximum a vector at a time and then each pair of columns' by
/// deinterleaving. (One value at a time this took a tenth of a single image's forward pass.)
#[inline(always)]
pub(super) fn max_pool_c1<L: Lanes>(c1: &Maps<C1_MAPS, C1_SIDE, C1_WIDE>, s2: &mut Maps<C1_MAPS, S2_SIDE, S2_SIDE>) {
    for (out, map) in s2.iter_mut().zip(c1) {
        for (y, out) in out.iter_mut().enumerate() {
            let (top, bottom) = (&map[2 * y], &map[2 * y + 1]);
            pooled_row::<L>(|v| L::load(&top[v * L::WIDTH..]).max_keeping_nan(L::load(&bottom[v * L::WIDTH..])), out);
        }
    }
}

/// An S2 row into `out` from `vertical(v)`, vector `v` of the larger of two C1 rows: each
/// pair of columns' maximum by deinterleaving, then ReLU.
#[inline(always)]
fn pooled_row<L: Lanes>(vertical: impl Fn(usize) -> L, out: &mut [f32; S2_SIDE]) {
    let mut row = [0f32; C1_WIDE / 2];
    for (p, row) in row.chunks_exact_mut(L::WIDTH).enumerate() {
        let (evens, odds) = L::deinterleave(vertical(2 * p), vertical(2 * p + 1));
        evens.max_keeping_nan(odds).max_keeping_nan(L::splat(0.0)).store(row);
    }
    out.copy_from_slice(&row[..S2_SIDE]);
}

/// The activation and 2x2 subsampling of S2 and S4, from the first `2 S` columns of each
/// row, into `out`. Modern: max-pool, then ReLU (the same as ReLU then max-pool, since ReLU
/// keeps order, on a quarter of the values). Classic: tanh, then the window's mean; the tanh'd
/// values stay in `maps`, where the backward pass reads them (tanh's derivative is
/// `1 - tanh^2`).
#[inline(always)]
pub(super) fn subsample<const C: usize, const N: usize, const W: usize, const S: usize>(
    arch: Arch,
    maps: &mut Maps<C, N, W>,
    out: &mut Maps<C, S, S>,
) {
    if arch == Arch::Classic {
        tanh_in_place(maps.as_flattened_mut().as_flattened_mut()); // padding columns too: never read
    }
    for (o, m) in out.iter_mut().zip(maps.iter()) {
        for (y, row) in o.iter_mut().enumerate() {
            let (top, bottom) = (&m[2 * y], &m[2 * y + 1]);
            for (x, v) in row.iter_mut().enumerate() {
                *v = pool(arch, [top[2 * x], top[2 * x + 1], bottom[2 * x], bottom[2 * x + 1]]);
            }
        }
    }
}

/// One 2x2 window subsampled: modern, ReLU of the largest pre-activation; classic, the mean
/// of the tanh'd values.
#[inline(always)]
pub(super) fn pool(arch: Arch, window: [f32; 4]) -> f32 {
    match arch {
        Arch::Modern => relu(window.into_iter().reduce(max_keeping_nan).unwrap()),
        Arch::Classic => window.into_iter().sum::<f32>() / 4.0,
    }
}

#[inline(always)]
pub(super) fn activate<const N: usize>(arch: Arch, mut xs: [f32; N]) -> [f32; N] {
    match arch {
        Arch::Modern => xs.iter_mut().for_each(|x| *x = relu(*x)),
        Arch::Classic => tanh_in_place(&mut xs),
    }
    xs
}

/// tanh of every value, a vector at a time (rten-vecmath's, within 3 ulp of `f32::tanh`, AVX2
/// or AVX-512 chosen at run time): libm's `tanhf`, one value at a time, took most of the
/// classic variant's time.
pub(super) fn tanh_in_place(xs: &mut [f32]) {
    rten_vecmath::Tanh {}.map_mut(xs);
}

/// The larger of `a` and `b`, or NaN if either is: NaN passes through max-pooling and ReLU in
/// PyTorch, where `f32::max` would drop it.
#[inline(always)]
pub(super) fn max_keeping_nan(a: f32, b: f32) -> f32 {
    if a.is_nan() || a > b {
        a
    } else {
        b
    }
}

#[inline(always)]
pub(super) fn relu(x: f32) -> f32 {
    max_keeping_nan(x, 0.0)
}

/// The nonzero values of `xs` with their indices, in order, in the first `n` entries (`n`
/// returned); the entries past them hold zero values. Gathered without a branch: one on each
/// value being zero mispredicts about every other time on values after ReLU (in the dense
/// layers it took a sixth of a single image's time).
#[inline(always)]
pub(super) fn nonzero<const N: usize>(xs: &[f32; N]) -> ([(usize, f32); N], usize) {
    let mut nonzero = [(0, 0f32); N];
    let mut n = 0;
    for (i, &v) in xs.iter().enumerate() {
        nonzero[n] = (i, v);
        n += usize::from(v != 0.0);
    }
    (nonzero, n)
}

/// Vectors of outputs of a linear layer computed together.
pub(super) const DENSE_VECTORS: usize = 4;

/// `bias + x W^T` with the weights stored transposed, (in, out). The layer is bound by
/// reading its weights (fc1's are 200 KB), so inputs that are zero, about half of them after
/// ReLU, are skipped along with their rows ([`nonzero`]). Two running sums per output, over
/// alternate inputs, keep the multiply-adds independent.
#[inline(always)]
pub(super) fn dense<L: Lanes, const I: usize, const O: usize>(
    w: &[[f32; O]; I],
    bias: &[f32; O],
    x: &[f32; I],
) -> [f32; O] {
    let (nonzero, n) = nonzero(x);
    // An odd count takes the next entry along, whose value is 0.0: I is even, so there is one.
    const { assert!(I.is_multiple_of(2)) };
    let pairs = nonzero[..n.next_multiple_of(2)].chunks_exact(2);
    let mut out = [0f32; O];
    const { assert!(O.is_multiple_of(LANES) && O.is_multiple_of(16)) };
    for j in (0..O).step_by(DENSE_VECTORS * L::WIDTH) {
        let vectors = ((O - j) / L::WIDTH).min(DENSE_VECTORS);
        let mut acc = [[L::splat(0.0); DENSE_VECTORS]; 2];
        for (v, a) in acc[0][..vectors].iter_mut().enumerate() {
            *a = L::load(&bias[j + v * L::WIDTH..]);
        }
        for pair in pairs.clone() {
            for (a, &(i, xi)) in acc.iter_mut().zip(pair) {
                let xi = L::splat(xi);
                for (v, a) in a[..vectors].iter_mut().enumerate() {
                    *a = a.mul_add(xi, L::load(&w[i][j + v * L::WIDTH..]));
                }
            }
        }
        for (v, (a, b)) in acc[0][..vectors].iter().zip(&acc[1]).enumerate() {
            a.add(*b).store(&mut out[j + v * L::WIDTH..]);
        }
    }
    out
}
