//! SGD, Adam and AdamW as torch.optim writes them: its single-tensor path (the one PyTorch
//! takes on the CPU), op for op over tch tensors, so a run matches PyTorch bit for bit, and
//! the state (steps, moments, momentum buffers) is ours to checkpoint. tch's bindings of
//! libtorch's C++ optimizers stay selectable ([`Implementation::Libtorch`]).

use anyhow::{anyhow, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ffi::{c_char, CStr};
use tch::nn::{self, OptimizerConfig as _};
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

use crate::check_setting;
use crate::training::fused;
use crate::values;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    Sgd,
    Adam,
    Adamw,
}

/// Which code runs the optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Implementation {
    /// torch.optim's algorithms, op for op (this module): bit-identical to PyTorch, state saved.
    #[default]
    Torch,
    /// libtorch's C++ optimizers through tch: a different op order (Adam's moment update is
    /// `mul_`+`add_`, not `lerp_`), state kept in C++ where it cannot be saved, fixed momentum.
    Libtorch,
}

crate::named_values!(OptimizerKind { Sgd => "sgd", Adam => "adam", Adamw => "adamw" });
crate::named_values!(Implementation { Torch => "torch", Libtorch => "libtorch" });

/// An optimizer's settings, with torch.optim's names and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    #[serde(rename = "optimizer")]
    pub kind: OptimizerKind,
    #[serde(default, rename = "optimizer_impl")]
    pub implementation: Implementation,
    pub lr: f64,
    /// SGD's momentum.
    pub momentum: f64,
    #[serde(default)]
    pub dampening: f64,
    #[serde(default)]
    pub nesterov: bool,
    /// Adam's `betas`.
    #[serde(default = "default_betas")]
    pub betas: (f64, f64),
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// An L2 penalty added to the gradient (sgd, adam) or decoupled weight decay (adamw).
    pub weight_decay: f64,
    #[serde(default)]
    pub amsgrad: bool,
}

fn default_betas() -> (f64, f64) {
    (0.9, 0.999)
}

fn default_eps() -> f64 {
    1e-8
}

impl OptimizerConfig {
    /// `kind` at learning rate `lr` with torch.optim's other defaults (AdamW's weight decay
    /// aside, which is 0 here as for the other two).
    pub fn new(kind: OptimizerKind, lr: f64) -> OptimizerConfig {
        OptimizerConfig {
            kind,
            implementation: Implementation::Torch,
            lr,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            betas: default_betas(),
            eps: default_eps(),
            weight_decay: 0.0,
            amsgrad: false,
        }
    }

    /// The hyper-parameter OneCycleLR cycles: SGD's momentum or Adam's beta1.
    pub fn momentum_like(&self) -> f64 {
        match self.kind {
            OptimizerKind::Sgd => self.momentum,
            OptimizerKind::Adam | OptimizerKind::Adamw => self.betas.0,
        }
    }

    /// The checks torch.optim makes in its constructors, naming the setting at fault.
    pub fn validate(&self) -> Result<()> {
        check_setting!(self.lr > 0.0 && self.lr.is_finite(), "lr", self.lr, "must be a positive number");
        check_setting!((0.0..1.0).contains(&self.momentum), "momentum", self.momentum, "must be in [0, 1)");
        check_setting!((0.0..=1.0).contains(&self.dampening), "dampening", self.dampening, "must be in [0, 1]");
        check_setting!(
            !self.nesterov || (self.momentum > 0.0 && self.dampening == 0.0),
            "nesterov",
            self.nesterov,
            "needs a momentum above 0 and no dampening (as torch.optim.SGD)"
        );
        for (i, b) in [self.betas.0, self.betas.1].into_iter().enumerate() {
            check_setting!(
                (0.0..1.0).contains(&b),
                "betas",
                format!("{:?}", self.betas),
                "beta{} = {b} must be in [0, 1)",
                i + 1
            );
        }
        check_setting!(self.eps >= 0.0, "eps", self.eps, "must not be negative");
        check_setting!(self.weight_decay >= 0.0, "weight_decay", self.weight_decay, "must not be negative");
        check_setting!(
            self.kind == OptimizerKind::Sgd || !(self.nesterov || self.dampening != 0.0),
            "optimizer",
            self.kind,
            "takes no nesterov or dampening, which are SGD's"
        );
        check_setting!(
            self.kind != OptimizerKind::Sgd || !self.amsgrad,
            "amsgrad",
            self.amsgrad,
            "is Adam's and AdamW's, not SGD's"
        );
        Ok(())
    }
}

/// The names of torch.optim's per-parameter state, in the order it creates them.
pub const STATE_FIELDS: [&str; 5] = ["step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"];

/// The per-parameter state torch.optim keeps, by its names.
#[derive(Debug, Default)]
struct ParamState {
    /// A float32 scalar, as torch.optim.Adam keeps it.
    step: Option<Tensor>,
    exp_avg: Option<Tensor>,
    exp_avg_sq: Option<Tensor>,
    max_exp_avg_sq: Option<Tensor>,
    momentum_buffer: Option<Tensor>,
}

impl ParamState {
    fn fields(&self) -> [(&'static str, &Option<Tensor>); 5] {
        let [a, b, c, d, e] = STATE_FIELDS;
        [
            (a, &self.step),
            (b, &self.exp_avg),
            (c, &self.exp_avg_sq),
            (d, &self.max_exp_avg_sq),
            (e, &self.momentum_buffer),
        ]
    }

    fn field_mut(&mut self, name: &str) -> Option<&mut Option<Tensor>> {
        Some(match name {
            "step" => &mut self.step,
            "exp_avg" => &mut self.exp_avg,
            "exp_avg_sq" => &mut self.exp_avg_sq,
            "max_exp_avg_sq" => &mut self.max_exp_avg_sq,
            "momentum_buffer" => &mut self.momentum_buffer,
            _ => return None,
        })
    }
}

/// The values a scheduler changes between steps: torch.optim's `param_groups[0]["lr"]` and
/// its `"momentum"` (SGD) or `"betas"[0]` (Adam).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Hyper {
    pub lr: f64,
    pub momentum: f64,
}

/// One optimizer over a model's parameters, in the order of PyTorch's `model.parameters()`.
pub struct Optimizer {
    config: OptimizerConfig,
    params: Vec<(String, Tensor)>,
    engine: Engine,
    pub hyper: Hyper,
}

enum Engine {
    Torch(Vec<ParamState>),
    /// torch.optim's algorithms over every parameter at once ([`Optimizer::flatten`]):
    /// `params` is their concatenation, of which the parameters are now views.
    Flat {
        params: Tensor,
        state: ParamState,
    },
    Libtorch(nn::Optimizer),
}

impl Optimizer {
    /// An optimizer for `params` (PyTorch's order; the variables of `vs`, shallow clones).
    pub fn new(config: OptimizerConfig, vs: &nn::VarStore, params: Vec<(String, Tensor)>) -> Result<Optimizer> {
        config.validate()?;
        let engine = match config.implementation {
            Implementation::Torch => Engine::Torch(params.iter().map(|_| ParamState::default()).collect()),
            Implementation::Libtorch => {
                let c = config;
                if !(c.betas == default_betas() && c.eps == default_eps() && !c.amsgrad) {
                    anyhow::bail!(crate::setting::invalid(
                        "optimizer_impl",
                        "libtorch",
                        "tch's Adam takes no betas, eps or amsgrad other than the defaults"
                    ));
                }
                Engine::Libtorch(match c.kind {
                    OptimizerKind::Sgd => {
                        nn::sgd(c.momentum, c.dampening, c.weight_decay, c.nesterov).build(vs, c.lr)?
                    }
                    OptimizerKind::Adam => nn::adam(c.betas.0, c.betas.1, c.weight_decay).build(vs, c.lr)?,
                    OptimizerKind::Adamw => nn::adamw(c.betas.0, c.betas.1, c.weight_decay).build(vs, c.lr)?,
                })
            }
        };
        Ok(Optimizer { hyper: Hyper { lr: config.lr, momentum: config.momentum_like() }, config, params, engine })
    }

    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// `optimizer.zero_grad()` (gradients set to None), `loss.backward()`, `optimizer.step()`.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        match &mut self.engine {
            Engine::Libtorch(opt) => {
                if !(self.hyper.momentum == self.config.momentum_like()) {
                    anyhow::bail!(crate::setting::invalid("optimizer_impl", "libtorch", "libtorch's optimizers cannot change their momentum mid-run; use optimizer_impl = torch, or turn cycle_momentum off"));
                }
                opt.set_lr(self.hyper.lr);
                opt.backward_step(loss);
                Ok(())
            }
            Engine::Torch(_) | Engine::Flat { .. } => {
                for (_, p) in &mut self.params {
                    check(unsafe { lenet5_clear_grad(p.as_mut_ptr()) })?;
                }
                loss.f_backward()?;
                let grads = self.params.iter().map(|(_, p)| p.grad()).collect();
                self.step(grads)
            }
        }
    }

    /// `optimizer.step()` with these gradients, one per parameter in PyTorch's order (an
    /// undefined tensor for a `.grad` of None).
    pub fn step(&mut self, grads: Vec<Tensor>) -> Result<()> {
        ensure!(grads.len() == self.params.len(), "{} gradients for {} parameters", grads.len(), self.params.len());
        for ((name, p), grad) in self.params.iter().zip(&grads) {
            ensure!(
                !grad.defined() || grad.size() == p.size(),
                "the gradient of {name} has shape {:?}, expected {:?}",
                grad.size(),
                p.size()
            );
        }
        let (config, hyper) = (self.config, self.hyper);
        match &mut self.engine {
            Engine::Torch(states) => tch::no_grad(|| {
                for (((_, p), state), grad) in self.params.iter_mut().zip(states.iter_mut()).zip(grads) {
                    if grad.defined() {
                        update(&config, hyper, p, grad, state)?; // torch.optim skips parameters whose .grad is None
                    }
                }
                Ok(())
            }),
            Engine::Flat { .. } => {
                ensure!(
                    grads.iter().all(Tensor::defined),
                    "a flattened optimizer steps every parameter: each needs a gradient"
                );
                self.step_flat(Tensor::f_cat(&grads.iter().map(|g| g.view(-1)).collect::<Vec<_>>(), 0)?)
            }
            Engine::Libtorch(_) => {
                anyhow::bail!(crate::setting::invalid("optimizer_impl", "libtorch", "libtorch's optimizers step on the gradients autograd left; the direct engine needs optimizer_impl = torch"))
            }
        }
    }

    /// `optimizer.step()` with every parameter's gradient in one flat float32 tensor on the
    /// CPU, concatenated in the parameters' order: what the direct engine gives a flattened
    /// optimizer.
    pub fn step_flat(&mut self, grad: Tensor) -> Result<()> {
        let Engine::Flat { params, state } = &mut self.engine else {
            anyhow::bail!("a flat gradient needs a flattened optimizer (Optimizer::flatten)");
        };
        ensure!(
            grad.size() == params.size(),
            "a flat gradient of shape {:?} for {} parameter values",
            grad.size(),
            params.numel()
        );
        ensure!(
            grad.kind() == Kind::Float && grad.device() == tch::Device::Cpu,
            "a flat gradient of {:?} on {:?}; the flat optimizer steps float32 on the CPU",
            grad.kind(),
            grad.device()
        );
        let (c, h) = (&self.config, self.hyper);
        let grad = grad.f_contiguous()?;
        let mut params = params.shallow_clone();
        let fresh = |field: &mut Option<Tensor>| field.get_or_insert_with(|| params.zeros_like()).shallow_clone();
        match c.kind {
            OptimizerKind::Sgd => {
                let momentum = (h.momentum != 0.0).then(|| fused::Momentum {
                    momentum: h.momentum as f32,
                    one_minus_dampening: (1.0 - c.dampening) as f32,
                    nesterov: c.nesterov,
                    first: state.momentum_buffer.is_none(),
                });
                let mut buffer = momentum.map(|_| fresh(&mut state.momentum_buffer));
                let rule = fused::Sgd {
                    weight_decay: (c.weight_decay != 0.0).then_some(c.weight_decay as f32),
                    momentum,
                    neg_lr: -h.lr as f32,
                };
                fused::sgd(rule, values::of_mut(&mut params), values::of(&grad), buffer.as_mut().map(values::of_mut));
            }
            OptimizerKind::Adam | OptimizerKind::Adamw => {
                let (beta1, beta2) = (h.momentum, c.betas.1);
                let (step_size, bias_correction2_sqrt) = count_step(state, h, beta2)?;
                let decay = c.weight_decay != 0.0;
                let rule = fused::Adam {
                    decoupled_decay: (decay && c.kind == OptimizerKind::Adamw)
                        .then_some((1.0 - h.lr * c.weight_decay) as f32),
                    coupled_decay: (decay && c.kind == OptimizerKind::Adam).then_some(c.weight_decay as f32),
                    lerp_weight: (1.0 - beta1) as f32,
                    beta2: beta2 as f32,
                    one_minus_beta2: (1.0 - beta2) as f32,
                    bias_correction2_sqrt: bias_correction2_sqrt as f32,
                    eps: c.eps as f32,
                    neg_step_size: -step_size as f32,
                };
                let (mut exp_avg, mut exp_avg_sq) = (fresh(&mut state.exp_avg), fresh(&mut state.exp_avg_sq));
                let mut max = c.amsgrad.then(|| fresh(&mut state.max_exp_avg_sq));
                fused::adam_moments(
                    &rule,
                    values::of_mut(&mut params),
                    values::of(&grad),
                    values::of_mut(&mut exp_avg),
                    values::of_mut(&mut exp_avg_sq),
                    max.as_mut().map(values::of_mut),
                );
                let roots = max.as_ref().unwrap_or(&exp_avg_sq).f_sqrt()?;
                fused::adam_apply(&rule, values::of_mut(&mut params), values::of(&exp_avg), values::of(&roots));
            }
        }
        Ok(())
    }

    /// Steps all the parameters as one flat tensor from now on (their state too): the same
    /// algorithm and arithmetic as [`Self::step`] param by param, each element getting the
    /// same bits, in one loop over the values (`fused.rs`) instead of a dozen libtorch calls,
    /// which for LeNet-5's small tensors cost more than the arithmetic. For the direct engine
    /// (float32 on the CPU), whose step is otherwise plain loops; the libtorch engine keeps
    /// torch.optim's per-parameter loop, which it matches bit for bit.
    /// The parameters become views of one tensor (`set_data`: every shallow clone, the
    /// VarStore's included, sees it), so the step writes them in place.
    pub fn flatten(&mut self) -> Result<()> {
        let Engine::Torch(states) = &self.engine else {
            return Ok(()); // flat already, or libtorch's (which `step` refuses)
        };
        for (name, p) in &self.params {
            ensure!(
                p.kind() == Kind::Float && p.device() == tch::Device::Cpu,
                "{name} is {:?} on {:?}; the flat optimizer steps float32 on the CPU",
                p.kind(),
                p.device()
            );
        }
        let mut flat = ParamState::default();
        for (f, field) in STATE_FIELDS.into_iter().enumerate() {
            let present: Vec<&Tensor> = states.iter().filter_map(|state| state.fields()[f].1.as_ref()).collect();
            if present.is_empty() {
                continue;
            }
            ensure!(
                present.len() == states.len(),
                "optimizer state {field} is kept for some parameters only: it cannot be flattened"
            );
            let value = if field == "step" {
                let steps: Vec<f64> = present.iter().map(|t| t.double_value(&[])).collect();
                ensure!(
                    steps.iter().all(|&s| s == steps[0]),
                    "the parameters' optimizer steps differ ({steps:?}): they cannot be flattened"
                );
                present[0].copy()
            } else {
                Tensor::f_cat(&present.iter().map(|t| t.view(-1)).collect::<Vec<_>>(), 0)?
            };
            *flat.field_mut(field).expect("a state field") = Some(value);
        }
        let params = tch::no_grad(|| {
            Tensor::f_cat(&self.params.iter().map(|(_, p)| p.detach().view(-1)).collect::<Vec<_>>(), 0)
        })?;
        let views = split(&self.params, &params);
        for ((_, p), view) in self.params.iter_mut().zip(views) {
            p.f_set_data(&view)?;
        }
        self.engine = Engine::Flat { params, state: flat };
        Ok(())
    }

    /// The state as named tensors, `PARAM.FIELD` (e.g. `conv1.weight.exp_avg`); empty for the
    /// libtorch optimizers, whose state tch cannot reach.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let states = match &self.engine {
            Engine::Torch(states) => states,
            Engine::Flat { state, .. } => &self.unflattened(state),
            Engine::Libtorch(_) => return vec![],
        };
        let mut out = vec![];
        for ((name, _), state) in self.params.iter().zip(states) {
            for (field, t) in state.fields() {
                if let Some(t) = t {
                    out.push((format!("{name}.{field}"), t.shallow_clone()));
                }
            }
        }
        out
    }

    /// Restores what [`Self::state_tensors`] gave, checking every name and shape first.
    pub fn load_state_tensors(&mut self, tensors: Vec<(String, Tensor)>, source: &str) -> Result<()> {
        if let Engine::Libtorch(_) = self.engine {
            ensure!(tensors.is_empty(), "{source}: optimizer state saved, but libtorch's optimizers cannot take it");
            return Ok(());
        }
        let index: BTreeMap<&str, usize> = self.params.iter().enumerate().map(|(i, (n, _))| (n.as_str(), i)).collect();
        let mut placed = vec![];
        for (key, t) in tensors {
            let (param, field) = key
                .rsplit_once('.')
                .with_context(|| format!("{source}: optimizer state {key}: no PARAM.FIELD name"))?;
            let i =
                *index.get(param).with_context(|| format!("{source}: optimizer state {key}: no parameter {param}"))?;
            let p = &self.params[i].1;
            let scalar = field == "step";
            let shape_ok = if scalar { t.numel() == 1 } else { t.size() == p.size() };
            ensure!(
                shape_ok,
                "{source}: optimizer state {key} has shape {:?}, expected {:?}",
                t.size(),
                if scalar { vec![] } else { p.size() }
            );
            ensure!(t.is_floating_point(), "{source}: optimizer state {key} is {:?}, not floating point", t.kind());
            placed.push((i, field.to_string(), key.clone(), t));
        }
        let mut fresh: Vec<ParamState> = self.params.iter().map(|_| ParamState::default()).collect();
        for (i, field, key, t) in placed {
            let p = &self.params[i].1;
            // torch.optim keeps `step` as a float32 CPU scalar, the rest like the parameter.
            let (kind, device, shape) = if field == "step" {
                (Kind::Float, tch::Device::Cpu, vec![])
            } else {
                (p.kind(), p.device(), p.size())
            };
            let slot = fresh[i]
                .field_mut(&field)
                .with_context(|| format!("{source}: optimizer state {key}: unknown field {field}"))?;
            *slot = Some(t.to_kind(kind).to_device(device).reshape(shape));
        }
        let flat = matches!(self.engine, Engine::Flat { .. });
        self.engine = Engine::Torch(fresh);
        if flat {
            self.flatten().with_context(|| format!("{source}: optimizer state"))?;
        }
        Ok(())
    }

    /// The per-parameter state of a flat one: views of its tensors (`step` shared).
    fn unflattened(&self, flat: &ParamState) -> Vec<ParamState> {
        let mut states: Vec<ParamState> = self.params.iter().map(|_| ParamState::default()).collect();
        for (field, value) in flat.fields() {
            let Some(value) = value else { continue };
            let parts = if field == "step" {
                states.iter().map(|_| value.shallow_clone()).collect()
            } else {
                split(&self.params, value)
            };
            for (state, part) in states.iter_mut().zip(parts) {
                *state.field_mut(field).expect("a state field") = Some(part);
            }
        }
        states
    }
}

/// A flat tensor over all of `params` cut into one view per parameter, shaped as it.
fn split(params: &[(String, Tensor)], flat: &Tensor) -> Vec<Tensor> {
    let mut offset = 0;
    params
        .iter()
        .map(|(_, p)| {
            let n = p.numel() as i64;
            offset += n;
            flat.narrow(0, offset - n, n).view(p.size().as_slice())
        })
        .collect()
}

/// One parameter's step (or a flat tensor's) by the configured algorithm.
fn update(c: &OptimizerConfig, h: Hyper, p: &mut Tensor, grad: Tensor, state: &mut ParamState) -> Result<()> {
    match c.kind {
        OptimizerKind::Sgd => sgd(c, h, p, grad, state),
        OptimizerKind::Adam | OptimizerKind::Adamw => adam(c, h, p, grad, state),
    }
}

/// `torch.optim.SGD`'s `_single_tensor_sgd` for one parameter.
fn sgd(c: &OptimizerConfig, h: Hyper, p: &mut Tensor, grad: Tensor, state: &mut ParamState) -> Result<()> {
    let mut grad = grad;
    if c.weight_decay != 0.0 {
        grad = add(&grad, p, c.weight_decay)?;
    }
    if h.momentum != 0.0 {
        let buf = match &mut state.momentum_buffer {
            None => state.momentum_buffer.insert(grad.detach().copy()),
            Some(buf) => {
                let _ = buf.f_mul_scalar_(h.momentum)?;
                add_(buf, &grad, 1.0 - c.dampening)?;
                buf
            }
        };
        grad = if c.nesterov { add(&grad, buf, h.momentum)? } else { buf.shallow_clone() };
    }
    add_(p, &grad, -h.lr)
}

/// Adam's step counter (`state["step"]`, a float32 tensor) moved on by one, and what the
/// step takes from it as Python floats (`step_t.item()`, `beta ** step`,
/// `bias_correction2 ** 0.5`, libm's pow): the step size and the square root of the second
/// moment's bias correction. `h.momentum` is beta1.
fn count_step(state: &mut ParamState, h: Hyper, beta2: f64) -> Result<(f64, f64)> {
    let step_t = state.step.get_or_insert_with(|| Tensor::from(0f32));
    let _ = step_t.f_add_scalar_(1i64)?;
    let step = step_t.f_double_value(&[])?;
    let (bias_correction1, bias_correction2) = (1.0 - h.momentum.powf(step), 1.0 - beta2.powf(step));
    Ok((h.lr / bias_correction1, bias_correction2.powf(0.5)))
}

/// `torch.optim.Adam`'s `_single_tensor_adam` for one parameter (AdamW: decoupled decay).
fn adam(c: &OptimizerConfig, h: Hyper, p: &mut Tensor, grad: Tensor, state: &mut ParamState) -> Result<()> {
    let (beta1, beta2) = (h.momentum, c.betas.1);
    let (step_size, bias_correction2_sqrt) = count_step(state, h, beta2)?;
    let exp_avg = state.exp_avg.get_or_insert_with(|| p.zeros_like());
    let exp_avg_sq = state.exp_avg_sq.get_or_insert_with(|| p.zeros_like());
    let mut grad = grad;
    if c.weight_decay != 0.0 {
        if c.kind == OptimizerKind::Adamw {
            let _ = p.f_mul_scalar_(1.0 - h.lr * c.weight_decay)?;
        } else {
            grad = add(&grad, p, c.weight_decay)?;
        }
    }
    let _ = exp_avg.f_lerp_(&grad, 1.0 - beta1)?;
    let _ = exp_avg_sq.f_mul_scalar_(beta2)?;
    addcmul_(exp_avg_sq, &grad, &grad, 1.0 - beta2)?;
    let second = if c.amsgrad {
        let max = state.max_exp_avg_sq.get_or_insert_with(|| p.zeros_like());
        let _ = max.f_maximum_out(max, exp_avg_sq)?;
        &*max
    } else {
        &*exp_avg_sq
    };
    let mut denom = second.f_sqrt()?.f_div_scalar(bias_correction2_sqrt)?;
    let _ = denom.f_add_scalar_(c.eps)?;
    addcdiv_(p, exp_avg, &denom, -step_size)
}

extern "C" {
    fn lenet5_add_(this: *mut C_tensor, other: *const C_tensor, alpha: f64) -> *mut c_char;
    fn lenet5_add(out: *mut *mut C_tensor, this: *const C_tensor, other: *const C_tensor, alpha: f64) -> *mut c_char;
    fn lenet5_addcmul_(this: *mut C_tensor, t1: *const C_tensor, t2: *const C_tensor, value: f64) -> *mut c_char;
    fn lenet5_addcdiv_(this: *mut C_tensor, t1: *const C_tensor, t2: *const C_tensor, value: f64) -> *mut c_char;
    fn lenet5_clear_grad(this: *mut C_tensor) -> *mut c_char;
    fn lenet5_free_error(error: *mut c_char);
}

/// Turns the shim's error string (null for success) into a Result, freeing it.
fn check(error: *mut c_char) -> Result<()> {
    if error.is_null() {
        return Ok(());
    }
    // SAFETY: the shim returns a NUL-terminated string from strdup, freed once here.
    let message = unsafe { CStr::from_ptr(error) }.to_string_lossy().lines().next().unwrap_or("").to_string();
    unsafe { lenet5_free_error(error) };
    Err(anyhow!("libtorch: {message}"))
}

// SAFETY (all four): the pointers come from live tch tensors borrowed for the call; the shim
// catches every C++ exception and returns it as an error string.

/// `this.add_(other, alpha=alpha)`.
fn add_(this: &mut Tensor, other: &Tensor, alpha: f64) -> Result<()> {
    check(unsafe { lenet5_add_(this.as_mut_ptr(), other.as_ptr(), alpha) })
}

/// `this.add(other, alpha=alpha)`.
fn add(this: &Tensor, other: &Tensor, alpha: f64) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    check(unsafe { lenet5_add(&mut out, this.as_ptr(), other.as_ptr(), alpha) })?;
    // SAFETY: on success the shim returned a new heap tensor, now owned (and freed) by tch.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// `this.addcmul_(t1, t2, value=value)`.
fn addcmul_(this: &mut Tensor, t1: &Tensor, t2: &Tensor, value: f64) -> Result<()> {
    check(unsafe { lenet5_addcmul_(this.as_mut_ptr(), t1.as_ptr(), t2.as_ptr(), value) })
}

/// `this.addcdiv_(t1, t2, value=value)`.
fn addcdiv_(this: &mut Tensor, t1: &Tensor, t2: &Tensor, value: f64) -> Result<()> {
    check(unsafe { lenet5_addcdiv_(this.as_mut_ptr(), t1.as_ptr(), t2.as_ptr(), value) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_with_alpha_is_one_rounding_per_element_and_errors_are_results() {
        let a = Tensor::from_slice(&[1f32, 2.0, 3.0]);
        let b = Tensor::from_slice(&[10f32, 20.0, 30.0]);
        let got = add(&a, &b, 0.5).unwrap();
        assert_eq!(Vec::<f32>::try_from(&got).unwrap(), [6.0, 12.0, 18.0]);
        let wrong = Tensor::from_slice(&[1f32, 2.0]);
        let err = add(&a, &wrong, 1.0).unwrap_err().to_string();
        assert!(err.starts_with("libtorch: ") && err.contains("size"), "{err}");
    }

    #[test]
    fn bad_settings_are_refused_naming_the_setting() {
        let c = OptimizerConfig { nesterov: true, ..OptimizerConfig::new(OptimizerKind::Sgd, 0.1) };
        assert!(c.validate().unwrap_err().to_string().contains("nesterov = true"));
        let c = OptimizerConfig { kind: OptimizerKind::Adam, nesterov: false, betas: (1.0, 0.999), ..c };
        assert!(c.validate().unwrap_err().to_string().contains("beta1 = 1 must be"));
    }

    /// A run's end: its parameters, and its optimizer's state by name.
    type RunEnd = (Vec<Tensor>, Vec<(String, Tensor)>);

    /// Two optimizers over equal copies of LeNet-5's parameters, the second flattened after
    /// `flatten_after` steps (its state then continues flat), stepped with the same gradients:
    /// the parameters as shallow clones taken before the optimizer was built, and its state.
    fn per_parameter_and_flat(config: OptimizerConfig, flatten_after: usize, steps: usize) -> [RunEnd; 2] {
        tch::manual_seed(3);
        let shapes: [&[i64]; 10] =
            [&[6, 1, 5, 5], &[6], &[16, 6, 5, 5], &[16], &[120, 400], &[120], &[84, 120], &[84], &[10, 84], &[10]];
        let start: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(*s, (Kind::Float, tch::Device::Cpu))).collect();
        let grads: Vec<Vec<Tensor>> = (0..steps)
            .map(|_| shapes.iter().map(|s| Tensor::randn(*s, (Kind::Float, tch::Device::Cpu))).collect())
            .collect();
        [usize::MAX, flatten_after].map(|flatten_after| {
            let vs = nn::VarStore::new(tch::Device::Cpu);
            let params: Vec<(String, Tensor)> =
                start.iter().enumerate().map(|(i, t)| (format!("p{i}"), t.copy())).collect();
            // What the VarStore and the model hold: shallow clones, which must see every step.
            let held: Vec<Tensor> = params.iter().map(|(_, p)| p.shallow_clone()).collect();
            let mut opt = Optimizer::new(config, &vs, params).unwrap();
            for (step, grads) in grads.iter().enumerate() {
                if step == flatten_after {
                    opt.flatten().unwrap();
                }
                if config.momentum_like() != 0.0 {
                    opt.hyper.momentum = config.momentum_like() - 0.01 * step as f64;
                    // as one-cycle moves it
                }
                opt.step(grads.iter().map(Tensor::copy).collect()).unwrap();
            }
            (held, opt.state_tensors())
        })
    }

    #[test]
    fn a_flattened_optimizer_steps_as_the_per_parameter_one() {
        // Elementwise ops give each element the same arithmetic whatever tensor it sits in;
        // seen bit-identical, so the bound is 0 (a wrong offset, a lost state field or a
        // step counted twice would differ by far more than rounding).
        let adamw =
            OptimizerConfig { weight_decay: 1e-2, amsgrad: true, ..OptimizerConfig::new(OptimizerKind::Adamw, 1e-2) };
        let sgd = OptimizerConfig {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 1e-3,
            ..OptimizerConfig::new(OptimizerKind::Sgd, 0.1)
        };
        // Each branch of the flat loops: Adam's coupled decay and a first beta under 0.5 (lerp's
        // other form), AdamW without AMSGrad, SGD with dampening and without momentum.
        let adam = OptimizerConfig {
            weight_decay: 1e-3,
            betas: (0.3, 0.99),
            ..OptimizerConfig::new(OptimizerKind::Adam, 1e-2)
        };
        let plain_adamw = OptimizerConfig { amsgrad: false, ..adamw };
        let damped = OptimizerConfig { nesterov: false, dampening: 0.2, ..sgd };
        let plain_sgd = OptimizerConfig { momentum: 0.0, nesterov: false, weight_decay: 0.0, ..sgd };
        let cases =
            [(adamw, 0), (adamw, 2), (adam, 0), (plain_adamw, 1), (sgd, 0), (sgd, 3), (damped, 0), (plain_sgd, 0)];
        for (config, flatten_after) in cases {
            let [(want, want_state), (got, got_state)] = per_parameter_and_flat(config, flatten_after, 5);
            for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                assert!(w.equal(g), "{:?}, flattened after {flatten_after} steps: parameter {i} differs", config.kind);
            }
            let names = |state: &[(String, Tensor)]| state.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
            assert_eq!(names(&want_state), names(&got_state));
            for ((name, w), (_, g)) in want_state.iter().zip(&got_state) {
                assert!(w.size() == g.size() && w.equal(g), "{:?}: state {name} differs", config.kind);
            }
        }
    }

    #[test]
    fn a_flattened_optimizer_takes_back_its_saved_state() {
        let config = OptimizerConfig { weight_decay: 1e-2, ..OptimizerConfig::new(OptimizerKind::Adamw, 1e-2) };
        let [(_, per_parameter), (params, flat)] = per_parameter_and_flat(config, 0, 3);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let mut opt =
            Optimizer::new(config, &vs, params.iter().enumerate().map(|(i, t)| (format!("p{i}"), t.copy())).collect())
                .unwrap();
        opt.flatten().unwrap();
        opt.load_state_tensors(per_parameter.iter().map(|(n, t)| (n.clone(), t.copy())).collect(), "test").unwrap();
        for ((name, want), (_, got)) in flat.iter().zip(opt.state_tensors()) {
            assert!(want.equal(&got), "{name}");
        }
        // Steps that differ between parameters cannot share one flat state.
        let mut uneven = per_parameter;
        let step = uneven.iter_mut().find(|(n, _)| n == "p3.step").unwrap();
        step.1 = Tensor::from(7f32);
        let err = opt.load_state_tensors(uneven, "ckpt").unwrap_err();
        assert!(
            format!("{err:#}").contains("ckpt: optimizer state") && format!("{err:#}").contains("steps differ"),
            "{err:#}"
        );
    }
}
