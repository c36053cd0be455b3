//! The direct engine's vectors: `WIDTH` floats in an AVX-512 or AVX2 register, or a plain
//! array where the CPU has neither, chosen at run time, behind the small [`Lanes`] trait.

use super::*;
/// Whether the CPU has AVX-512 (its foundation set, with AVX2 and FMA): the forward pass,
/// in inference and in training, and conv2's backward pass use it; conv1's backward pass
/// stays in AVX2 (its kernel rows are padded to eight floats).
pub(super) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && has_avx2()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

pub(super) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The instructions the direct engine runs on this CPU, for `lenet5 info`.
pub fn instruction_set() -> &'static str {
    if has_avx512() {
        "AVX-512 (forward pass, conv2's backward pass), AVX2 and FMA (conv1's backward pass)"
    } else if has_avx2() {
        "AVX2 and FMA"
    } else {
        "portable loops (no AVX2 and FMA: several times slower)"
    }
}

/// `WIDTH` `f32` lanes: an AVX-512 or AVX2 register, or a plain array of eight on CPUs
/// without either.
pub(super) trait Lanes: Copy {
    const WIDTH: usize;
    fn splat(v: f32) -> Self;
    /// The first `WIDTH` values of `src`.
    fn load(src: &[f32]) -> Self;
    /// Into the first `WIDTH` values of `dst`.
    fn store(self, dst: &mut [f32]);
    fn add(self, other: Self) -> Self;
    /// `self + a * b` in each lane (fused where the CPU has FMA).
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// The sum of the lanes.
    fn sum(self) -> f32;
    /// [`max_keeping_nan`] in each lane.
    fn max_keeping_nan(self, other: Self) -> Self;
    /// The even-indexed and the odd-indexed values of the row `a` then `b` (2 `WIDTH` values).
    fn deinterleave(a: Self, b: Self) -> (Self, Self);
}

/// `[f(0), .., f(N - 1)]`, as `std::array::from_fn` builds it, but always inlined: inside the
/// `target_feature` functions `from_fn` was left out of line, where every [`Lanes::load`] in
/// `f` became a call (a tenth of the classic variant's training step).
#[inline(always)]
pub(super) fn array_of<T: Copy, const N: usize>(mut f: impl FnMut(usize) -> T) -> [T; N] {
    const { assert!(N > 0) };
    let mut out = [f(0); N];
    for (i, v) in out.iter_mut().enumerate().skip(1) {
        *v = f(i);
    }
    out
}

#[derive(Clone, Copy)]
pub(super) struct Portable([f32; LANES]);

impl Lanes for Portable {
    const WIDTH: usize = LANES;
    #[inline(always)]
    fn splat(v: f32) -> Self {
        Portable([v; LANES])
    }
    #[inline(always)]
    fn load(src: &[f32]) -> Self {
        Portable(src[..LANES].try_into().unwrap())
    }
    #[inline(always)]
    fn store(self, dst: &mut [f32]) {
        dst[..LANES].copy_from_slice(&self.0);
    }
    #[inline(always)]
    fn add(self, other: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] + other.0[i]))
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] + a.0[i] * b.0[i]))
    }
    #[inline(always)]
    fn sum(self) -> f32 {
        // In the pairs the AVX2 version adds, so both round alike.
        let [a, b, c, d, e, f, g, h] = self.0;
        ((a + e) + (c + g)) + ((b + f) + (d + h))
    }
    #[inline(always)]
    fn max_keeping_nan(self, other: Self) -> Self {
        Portable(std::array::from_fn(|i| max_keeping_nan(self.0[i], other.0[i])))
    }
    #[inline(always)]
    fn deinterleave(a: Self, b: Self) -> (Self, Self) {
        let at = |i: usize| if i < LANES { a.0[i] } else { b.0[i - LANES] };
        (Portable(std::array::from_fn(|i| at(2 * i))), Portable(std::array::from_fn(|i| at(2 * i + 1))))
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::{Lanes, LANES};
    use std::arch::x86_64::*;

    /// Only ever made inside `DirectNet::run_avx2`, which runs once the CPU is known to have
    /// AVX2 and FMA: that is what makes the intrinsics below sound.
    #[derive(Clone, Copy)]
    pub struct Avx2(__m256);

    impl Lanes for Avx2 {
        const WIDTH: usize = LANES;
        #[inline(always)]
        fn splat(v: f32) -> Self {
            unsafe { Avx2(_mm256_set1_ps(v)) }
        }
        #[inline(always)]
        fn load(src: &[f32]) -> Self {
            let src = &src[..LANES];
            unsafe { Avx2(_mm256_loadu_ps(src.as_ptr())) }
        }
        #[inline(always)]
        fn store(self, dst: &mut [f32]) {
            let dst = &mut dst[..LANES];
            unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn add(self, other: Self) -> Self {
            unsafe { Avx2(_mm256_add_ps(self.0, other.0)) }
        }
        #[inline(always)]
        fn mul_add(self, a: Self, b: Self) -> Self {
            unsafe { Avx2(_mm256_fmadd_ps(a.0, b.0, self.0)) }
        }
        #[inline(always)]
        fn sum(self) -> f32 {
            unsafe {
                let halves = _mm_add_ps(_mm256_castps256_ps128(self.0), _mm256_extractf128_ps(self.0, 1)); // a+e, b+f, c+g, d+h
                let pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves)); // (a+e)+(c+g), (b+f)+(d+h)
                _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)))
            }
        }
        #[inline(always)]
        fn max_keeping_nan(self, other: Self) -> Self {
            // maxps gives `other` where either is NaN; their sum is NaN there.
            unsafe {
                let unordered = _mm256_cmp_ps::<_CMP_UNORD_Q>(self.0, other.0);
                Avx2(_mm256_blendv_ps(_mm256_max_ps(self.0, other.0), _mm256_add_ps(self.0, other.0), unordered))
            }
        }
        #[inline(always)]
        fn deinterleave(a: Self, b: Self) -> (Self, Self) {
            unsafe {
                // Within each 128-bit half: a0 a2 b0 b2 | a4 a6 b4 b6; then the middle 64-bit
                // pairs swapped: a0 a2 a4 a6 b0 b2 b4 b6.
                let order = |v: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)));
                (
                    Avx2(order(_mm256_shuffle_ps::<0b10_00_10_00>(a.0, b.0))),
                    Avx2(order(_mm256_shuffle_ps::<0b11_01_11_01>(a.0, b.0))),
                )
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use super::Lanes;
    use std::arch::x86_64::*;

    const WIDTH: usize = 16;

    /// Only ever made inside `DirectNet::run_avx512`, which runs once the CPU is known to
    /// have AVX-512: that is what makes the intrinsics below sound.
    #[derive(Clone, Copy)]
    pub struct Avx512(__m512);

    impl Lanes for Avx512 {
        const WIDTH: usize = WIDTH;
        #[inline(always)]
        fn splat(v: f32) -> Self {
            unsafe { Avx512(_mm512_set1_ps(v)) }
        }
        #[inline(always)]
        fn load(src: &[f32]) -> Self {
            let src = &src[..WIDTH];
            unsafe { Avx512(_mm512_loadu_ps(src.as_ptr())) }
        }
        #[inline(always)]
        fn store(self, dst: &mut [f32]) {
            let dst = &mut dst[..WIDTH];
            unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn add(self, other: Self) -> Self {
            unsafe { Avx512(_mm512_add_ps(self.0, other.0)) }
        }
        #[inline(always)]
        fn mul_add(self, a: Self, b: Self) -> Self {
            unsafe { Avx512(_mm512_fmadd_ps(a.0, b.0, self.0)) }
        }
        #[inline(always)]
        fn sum(self) -> f32 {
            unsafe { _mm512_reduce_add_ps(self.0) }
        }
        #[inline(always)]
        fn max_keeping_nan(self, other: Self) -> Self {
            // As the AVX2 version: where either is NaN, their sum.
            unsafe {
                let unordered = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(self.0, other.0);
                Avx512(_mm512_mask_blend_ps(unordered, _mm512_max_ps(self.0, other.0), _mm512_add_ps(self.0, other.0)))
            }
        }
        #[inline(always)]
        fn deinterleave(a: Self, b: Self) -> (Self, Self) {
            unsafe {
                let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                let odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
                (Avx512(_mm512_permutex2var_ps(a.0, evens, b.0)), Avx512(_mm512_permutex2var_ps(a.0, odds, b.0)))
            }
        }
    }
}
