//! The flat optimizer's step ([`super::optim::Optimizer::flatten`]) as loops over the
//! values: the ops of torch.optim's single-tensor SGD and Adam(W) (`optim.rs`) in their
//! order, each rounded as libtorch's CPU kernels round it: a Python float scalar becomes a
//! float32, `add` with `alpha`, `lerp` and `addcmul` end in one fused multiply-add, the rest
//! are one IEEE operation each. Adam's square root stays libtorch's. So every element gets
//! the same bits as there (a test compares them), in one or two passes over memory instead
//! of a dozen libtorch calls that are a pass each.

/// SGD's scalars for one step, each rounded to float32 as libtorch rounds a Python float
/// for a float32 tensor.
#[derive(Debug, Clone, Copy)]
pub struct Sgd {
    /// `grad + weight_decay * p`, when not zero.
    pub weight_decay: Option<f32>,
    pub momentum: Option<Momentum>,
    pub neg_lr: f32,
}

/// Adam's and AdamW's scalars for one step, rounded as [`Sgd`]'s.
#[derive(Debug, Clone, Copy)]
pub struct Adam {
    /// AdamW's `p *= 1 - lr * weight_decay`, when decay is on.
    pub decoupled_decay: Option<f32>,
    /// Adam's `grad + weight_decay * p`, when decay is on.
    pub coupled_decay: Option<f32>,
    /// `exp_avg.lerp_(grad, 1 - beta1)`'s weight.
    pub lerp_weight: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub bias_correction2_sqrt: f32,
    pub eps: f32,
    pub neg_step_size: f32,
}

/// SGD's momentum buffer update: `buf * momentum + (1 - dampening) * grad`, or on the first
/// step (`first`) the gradient itself.
#[derive(Debug, Clone, Copy)]
pub struct Momentum {
    pub momentum: f32,
    pub one_minus_dampening: f32,
    pub nesterov: bool,
    pub first: bool,
}

/// Defines `pub fn $name`, which runs `$loops` (an `#[inline(always)]` function of the same
/// arguments) compiled for the widest vectors the CPU has: inlined into a function built for
/// AVX-512 or AVX2 with FMA, the compiler vectorises its loops, with the same operations per
/// element (each IEEE operation has one result).
macro_rules! vectorised {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $type:ty),*) => $loops:ident) => {
        $(#[$doc])*
        pub fn $name($($arg: $type),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn in_avx512($($arg: $type),*) {
                    $loops($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn in_avx2($($arg: $type),*) {
                    $loops($($arg),*)
                }
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `in_avx512` is compiled for.
                    return unsafe { in_avx512($($arg),*) };
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `in_avx2` is compiled for.
                    return unsafe { in_avx2($($arg),*) };
                }
            }
            $loops($($arg),*)
        }
    };
}

vectorised! {
    /// SGD's step: decay, momentum, then `p.add_(grad, alpha=-lr)`. `momentum_buffer` is
    /// there when `rule` has momentum, as long as the parameters.
    pub fn sgd(rule: Sgd, params: &mut [f32], grad: &[f32], momentum_buffer: Option<&mut [f32]>) => sgd_loops
}

vectorised! {
    /// Adam's first half: decay, then the two moments (`exp_avg.lerp_(grad, 1 - beta1)`,
    /// `exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)`) and, for AMSGrad,
    /// `max_exp_avg_sq`, their running maximum. Each slice is as long as the parameters.
    pub fn adam_moments(
        rule: &Adam,
        params: &mut [f32],
        grad: &[f32],
        exp_avg: &mut [f32],
        exp_avg_sq: &mut [f32],
        max_exp_avg_sq: Option<&mut [f32]>
    ) => adam_moments_loops
}

vectorised! {
    /// Adam's second half: `p.addcdiv_(exp_avg, roots / bias_correction2_sqrt + eps,
    /// value=-step_size)`, where `roots` are the square roots of the second moment (or of
    /// its maximum). Those come from libtorch's `sqrt`, whose float32 kernel (MKL's) is not
    /// always correctly rounded, so only it gives torch.optim's bits.
    pub fn adam_apply(rule: &Adam, params: &mut [f32], exp_avg: &[f32], roots: &[f32]) => adam_apply_loops
}

#[inline(always)]
fn sgd_loops(rule: Sgd, params: &mut [f32], grad: &[f32], momentum_buffer: Option<&mut [f32]>) {
    assert_eq!(grad.len(), params.len(), "one gradient value per parameter value");
    let Sgd { weight_decay, momentum, neg_lr } = rule;
    match (momentum, momentum_buffer) {
        (None, _) => {
            for (p, &g) in params.iter_mut().zip(grad) {
                *p = decayed(weight_decay, *p, g).mul_add(neg_lr, *p);
            }
        }
        (Some(m), Some(buffer)) => {
            assert_eq!(buffer.len(), params.len(), "one momentum value per parameter value");
            for ((p, &g), b) in params.iter_mut().zip(grad).zip(buffer) {
                let g = decayed(weight_decay, *p, g);
                *b = if m.first { g } else { g.mul_add(m.one_minus_dampening, *b * m.momentum) };
                let g = if m.nesterov { b.mul_add(m.momentum, g) } else { *b };
                *p = g.mul_add(neg_lr, *p);
            }
        }
        (Some(_), None) => panic!("SGD with momentum needs its buffer"),
    }
}

#[inline(always)]
fn adam_moments_loops(
    rule: &Adam,
    params: &mut [f32],
    grad: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    max_exp_avg_sq: Option<&mut [f32]>,
) {
    let n = params.len();
    assert!(grad.len() == n && exp_avg.len() == n && exp_avg_sq.len() == n, "one value per parameter value");
    let moments = params.iter_mut().zip(grad).zip(exp_avg).zip(exp_avg_sq);
    match max_exp_avg_sq {
        None => {
            for (((p, &g), m), v) in moments {
                rule.moments_of(p, g, m, v);
            }
        }
        Some(max) => {
            assert_eq!(max.len(), n, "one maximum per parameter value");
            for ((((p, &g), m), v), max) in moments.zip(max) {
                rule.moments_of(p, g, m, v);
                *max = maximum(*max, *v);
            }
        }
    }
}

#[inline(always)]
fn adam_apply_loops(rule: &Adam, params: &mut [f32], exp_avg: &[f32], roots: &[f32]) {
    assert!(exp_avg.len() == params.len() && roots.len() == params.len(), "one value per parameter value");
    for ((p, &m), &root) in params.iter_mut().zip(exp_avg).zip(roots) {
        let denom = root / rule.bias_correction2_sqrt + rule.eps;
        *p += rule.neg_step_size * m / denom;
    }
}

impl Adam {
    #[inline(always)]
    fn moments_of(&self, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
        if let Some(factor) = self.decoupled_decay {
            *p *= factor;
        }
        let g = decayed(self.coupled_decay, *p, g);
        // ATen's lerp: start + weight * (end - start) for a weight under 0.5, else
        // end - (1 - weight) * (end - start), each one fused multiply-add.
        *m = if self.lerp_weight.abs() < 0.5 {
            (g - *m).mul_add(self.lerp_weight, *m)
        } else {
            (g - *m).mul_add(self.lerp_weight - 1.0, g)
        };
        // ATen's addcmul: self + value * t1 * t2, the last two one fused multiply-add.
        *v = (self.one_minus_beta2 * g).mul_add(g, *v * self.beta2);
    }
}

/// `grad.add(p, alpha=weight_decay)`: one fused multiply-add.
#[inline(always)]
fn decayed(weight_decay: Option<f32>, p: f32, g: f32) -> f32 {
    match weight_decay {
        Some(wd) => p.mul_add(wd, g),
        None => g,
    }
}

/// `torch.maximum` of two values: NaN if either is.
#[inline(always)]
fn maximum(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if a > b {
        a
    } else {
        b
    }
}
