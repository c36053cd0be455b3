//! Training checkpoints in PyTorch's layout, both ways. A run's checkpoint becomes the
//! tutorial's `torch.save({'epoch', 'step', 'model_state_dict', 'optimizer_state_dict',
//! 'scheduler_state_dict', 'recipe', ...})`, whose optimizer and scheduler entries are exactly
//! what the stock torch.optim classes' `state_dict()` give; and such a file, written by a
//! notebook, becomes a checkpoint that `train --resume` continues.

use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use tch::Tensor;

use crate::formats::torch_pickle::Value;
use crate::model::{parameter_names, ModelConfig};
use crate::training::checkpoint::{CheckpointMeta, Saved};
use crate::training::optim::{Hyper, OptimizerKind, STATE_FIELDS};
use crate::training::schedule::{onecycle_lrs, ScheduleKind, ScheduleState, BASE_MOMENTUM, MAX_MOMENTUM, PCT_START};
use crate::training::{TrainConfig, TrainState};

fn str(s: &str) -> Value {
    Value::Str(s.to_string())
}

fn dict(items: Vec<(&str, Value)>) -> Value {
    Value::Dict(items.into_iter().map(|(k, v)| (str(k), v)).collect())
}

/// A JSON value as the Python value json.loads would give (numbers with a fraction or an
/// exponent are floats).
fn from_json(json: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match json {
        J::Null => Value::None,
        J::Bool(b) => Value::Bool(*b),
        J::Number(n) => n.as_i64().map(Value::Int).unwrap_or_else(|| Value::Float(n.as_f64().unwrap_or(f64::NAN))),
        J::String(s) => str(s),
        J::Array(items) => Value::List(items.iter().map(from_json).collect()),
        J::Object(map) => Value::Dict(map.iter().map(|(k, v)| (str(k), from_json(v))).collect()),
    }
}

/// The reverse, for the recipe and history a notebook wrote; `what` names the entry in errors.
fn to_json(value: &Value, what: &str) -> Result<serde_json::Value> {
    use serde_json::Value as J;
    Ok(match value {
        Value::None => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Int(i) => J::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(J::Number)
            .with_context(|| format!("{what}: {f} is not a number JSON holds"))?,
        Value::Str(s) => J::String(s.clone()),
        Value::List(items) | Value::Tuple(items) => {
            J::Array(items.iter().map(|v| to_json(v, what)).collect::<Result<_>>()?)
        }
        Value::Dict(items) => J::Object(
            items
                .iter()
                .map(|(k, v)| {
                    Ok((
                        k.as_str().with_context(|| format!("{what}: a key that is not a string"))?.to_string(),
                        to_json(v, what)?,
                    ))
                })
                .collect::<Result<_>>()?,
        ),
        Value::Tensor(_) => bail!("{what}: holds a tensor where plain values belong"),
    })
}

/// What the stock lr_scheduler adds to the optimizer's param group, after the optimizer's own keys.
fn scheduler_group_keys(c: &TrainConfig) -> Vec<(&'static str, Value)> {
    let lr = c.optimizer.lr;
    match c.schedule {
        ScheduleKind::Constant => vec![],
        ScheduleKind::Step | ScheduleKind::Cosine => vec![("initial_lr", Value::Float(lr))],
        ScheduleKind::Onecycle => {
            let (initial, min) = onecycle_lrs(lr);
            let mut keys = vec![
                ("initial_lr", Value::Float(initial)),
                ("max_lr", Value::Float(lr)),
                ("min_lr", Value::Float(min)),
            ];
            if c.cycle_momentum {
                keys.push(("max_momentum", Value::Float(MAX_MOMENTUM)));
                keys.push(("base_momentum", Value::Float(BASE_MOMENTUM)));
            }
            keys
        }
    }
}

/// `optimizer.state_dict()` of the stock torch.optim class.
fn optimizer_state_dict(meta: &CheckpointMeta, state_tensors: &[(String, Tensor)], hyper: Hyper) -> Value {
    let o = &meta.config.optimizer;
    let names = parameter_names();
    let mut state = vec![];
    for (i, name) in names.iter().enumerate() {
        let fields: Vec<(Value, Value)> = STATE_FIELDS
            .iter()
            .filter_map(|field| {
                let key = format!("{name}.{field}");
                let (_, t) = state_tensors.iter().find(|(k, _)| *k == key)?;
                Some((str(field), Value::Tensor(t.shallow_clone())))
            })
            .collect();
        if !fields.is_empty() {
            state.push((Value::Int(i as i64), Value::Dict(fields)));
        }
    }
    let (f, b) = (Value::Float, Value::Bool);
    let mut group: Vec<(&str, Value)> = match o.kind {
        OptimizerKind::Sgd => vec![
            ("lr", f(hyper.lr)),
            ("momentum", f(hyper.momentum)),
            ("dampening", f(o.dampening)),
            ("weight_decay", f(o.weight_decay)),
            ("nesterov", b(o.nesterov)),
            ("maximize", b(false)),
            ("foreach", Value::None),
            ("differentiable", b(false)),
            ("fused", Value::None),
        ],
        OptimizerKind::Adam | OptimizerKind::Adamw => vec![
            ("lr", f(hyper.lr)),
            ("betas", Value::Tuple(vec![f(hyper.momentum), f(o.betas.1)])),
            ("eps", f(o.eps)),
            ("weight_decay", f(o.weight_decay)),
            ("amsgrad", b(o.amsgrad)),
            ("maximize", b(false)),
            ("foreach", Value::None),
            ("capturable", b(false)),
            ("differentiable", b(false)),
            ("fused", Value::None),
            ("decoupled_weight_decay", b(o.kind == OptimizerKind::Adamw)),
        ],
    };
    group.extend(scheduler_group_keys(&meta.config));
    group.push(("params", Value::List((0..names.len() as i64).map(Value::Int).collect())));
    dict(vec![("state", Value::Dict(state)), ("param_groups", Value::List(vec![dict(group)]))])
}

/// `scheduler.state_dict()` of the stock lr_scheduler class (None for a constant rate).
fn scheduler_state_dict(meta: &CheckpointMeta, position: ScheduleState) -> Value {
    let c = &meta.config;
    let total = meta.state.total_steps as i64;
    let lr = c.optimizer.lr;
    let (f, i) = (Value::Float, Value::Int);
    let mut items: Vec<(&str, Value)> = match c.schedule {
        ScheduleKind::Constant => return Value::None,
        ScheduleKind::Step => vec![("step_size", i(1)), ("gamma", f(c.gamma)), ("base_lrs", Value::List(vec![f(lr)]))],
        ScheduleKind::Cosine => vec![("T_max", i(total)), ("eta_min", f(0.0)), ("base_lrs", Value::List(vec![f(lr)]))],
        ScheduleKind::Onecycle => {
            let phase = |end: Value, lrs: (&str, &str), ms: (&str, &str)| {
                dict(vec![
                    ("end_step", end),
                    ("start_lr", str(lrs.0)),
                    ("end_lr", str(lrs.1)),
                    ("start_momentum", str(ms.0)),
                    ("end_momentum", str(ms.1)),
                ])
            };
            let phases = vec![
                phase(f(PCT_START * total as f64 - 1.0), ("initial_lr", "max_lr"), ("max_momentum", "base_momentum")),
                phase(i(total - 1), ("max_lr", "min_lr"), ("base_momentum", "max_momentum")),
            ];
            let mut items = vec![
                ("total_steps", i(total)),
                ("_schedule_phases", Value::List(phases)),
                ("_anneal_func_type", str("cos")),
                ("cycle_momentum", Value::Bool(c.cycle_momentum)),
            ];
            if c.cycle_momentum {
                items.push(("use_beta1", Value::Bool(c.optimizer.kind != OptimizerKind::Sgd)));
            }
            items.push(("base_lrs", Value::List(vec![f(onecycle_lrs(lr).0)])));
            items
        }
    };
    items.extend([
        ("last_epoch", i(position.last_epoch)),
        ("_step_count", i(position.last_epoch + 1)),
        ("_is_initial", Value::Bool(false)),
        ("_get_lr_called_within_step", Value::Bool(false)),
        ("_last_lr", Value::List(vec![f(position.hyper.lr)])),
    ]);
    dict(items)
}

/// A run's checkpoint as a PyTorch training checkpoint.
pub fn to_torch(meta: &CheckpointMeta, saved: &Saved) -> Result<Value> {
    let s = &meta.state;
    let position =
        s.schedule.context("the checkpoint was written before the first step: there is nothing to continue")?;
    let order = parameter_names();
    let mut weights = vec![];
    for name in &order {
        let t =
            saved.weights.iter().find(|(k, _)| k == name).with_context(|| format!("the checkpoint has no {name}"))?;
        weights.push((str(name), Value::Tensor(t.1.shallow_clone())));
    }
    let mut recipe = serde_json::to_value(meta.config).expect("a recipe always serialises");
    let extra = serde_json::json!({
        "arch": meta.model.arch, "head": meta.model.head, "dataset": meta.dataset,
        "data_dir": meta.data_dir, "checkpoint_every": meta.checkpoint_every,
    });
    recipe.as_object_mut().expect("a struct").extend(extra.as_object().expect("an object").clone());
    Ok(dict(vec![
        ("epoch", Value::Int(s.epoch.saturating_sub(1) as i64)),
        ("step", Value::Int(s.step as i64)),
        ("batch", Value::Int(s.batch as i64)),
        ("model_state_dict", Value::Dict(weights)),
        ("optimizer_state_dict", optimizer_state_dict(meta, &saved.optimizer, position.hyper)),
        ("scheduler_state_dict", scheduler_state_dict(meta, position)),
        ("recipe", from_json(&recipe)),
        ("history", from_json(&serde_json::to_value(&s.history).expect("metrics always serialise"))),
        (
            "running",
            dict(vec![
                ("loss_sum", Value::Float(s.epoch_loss_sum)),
                ("correct", Value::Int(s.epoch_correct)),
                ("seen", Value::Int(s.epoch_seen)),
                ("seconds", Value::Float(s.seconds)),
            ]),
        ),
    ]))
}

/// Writes a run's checkpoint as a PyTorch training checkpoint at `path` (atomically).
pub fn write(path: &Path, meta: &CheckpointMeta, saved: &Saved) -> Result<()> {
    crate::formats::torch_pickle::write(path, &to_torch(meta, saved)?)
}

fn entry<'a>(value: &'a Value, key: &str, source: &str) -> Result<&'a Value> {
    value.get(key).with_context(|| format!("{source}: no '{key}' entry"))
}

fn int(value: &Value, key: &str, source: &str) -> Result<i64> {
    let v = entry(value, key, source)?;
    let i = v.as_int().with_context(|| format!("{source}: '{key}' is {}, not an int", v.type_name()))?;
    ensure!(i >= 0, "{source}: '{key}' is {i}, must not be negative");
    Ok(i)
}

/// Reads a PyTorch training checkpoint (as [`to_torch`] writes it, or a notebook following
/// the same layout) into what `train --resume` continues from.
pub fn read(path: &Path) -> Result<(CheckpointMeta, Saved)> {
    let source = path.display().to_string();
    let value = crate::formats::torch_pickle::read(path)?;
    ensure!(value.as_dict().is_some(), "{source}: holds {}, not a training checkpoint dict", value.type_name());
    let recipe = entry(&value, "recipe", &source).map_err(|e| {
        e.context("lenet5 continues a run with its recipe (epochs, batch_size, seed, ...): save it as scripts/train_reference does")
    })?;
    let recipe = to_json(recipe, &format!("{source}: 'recipe'"))?;
    let parse = |key: &str| -> Result<serde_json::Value> {
        recipe.get(key).cloned().with_context(|| format!("{source}: the recipe has no '{key}'"))
    };
    let config: TrainConfig = serde_json::from_value(recipe.clone())
        .with_context(|| format!("{source}: the recipe is not lenet5 train's"))?;
    let model: ModelConfig = ModelConfig {
        arch: serde_json::from_value(parse("arch")?).with_context(|| format!("{source}: recipe 'arch'"))?,
        head: serde_json::from_value(parse("head")?).with_context(|| format!("{source}: recipe 'head'"))?,
    };
    let dataset = serde_json::from_value(parse("dataset")?).with_context(|| format!("{source}: recipe 'dataset'"))?;
    let data_dir: Option<PathBuf> = recipe.get("data_dir").and_then(|d| d.as_str()).map(PathBuf::from);
    let checkpoint_every = recipe.get("checkpoint_every").and_then(|n| n.as_u64()).map(|n| n as usize);

    let weights = entry(&value, "model_state_dict", &source)?;
    let weights: Vec<(String, Tensor)> = weights
        .as_state_dict()
        .with_context(|| format!("{source}: 'model_state_dict' is not a dict of tensors"))?
        .into_iter()
        .map(|(k, t)| (k.to_string(), t.shallow_clone()))
        .collect();

    let optimizer = entry(&value, "optimizer_state_dict", &source)?;
    let groups = entry(optimizer, "param_groups", &source)?.as_list().unwrap_or_default();
    ensure!(groups.len() == 1, "{source}: the optimizer has {} param groups; lenet5 trains one", groups.len());
    let group = &groups[0];
    let float = |key: &str| -> Result<f64> {
        group
            .get(key)
            .and_then(Value::as_float)
            .with_context(|| format!("{source}: the optimizer's param group has no float '{key}'"))
    };
    let adam = group.get("betas").is_some();
    let kind = match (adam, group.get("decoupled_weight_decay").and_then(Value::as_bool)) {
        (false, _) => OptimizerKind::Sgd,
        (true, Some(true)) => OptimizerKind::Adamw,
        (true, _) => OptimizerKind::Adam,
    };
    ensure!(
        kind == config.optimizer.kind,
        "{source}: the optimizer's state is {}'s, the recipe says {}",
        kind.as_str(),
        config.optimizer.kind.as_str()
    );
    let momentum = if adam {
        let betas = group.get("betas").and_then(Value::as_list).unwrap_or_default();
        betas
            .first()
            .and_then(Value::as_float)
            .with_context(|| format!("{source}: the param group's 'betas' is not a pair of floats"))?
    } else {
        float("momentum")?
    };
    let hyper = Hyper { lr: float("lr")?, momentum };
    let names = parameter_names();
    let params = group.get("params").and_then(Value::as_list).unwrap_or_default();
    ensure!(
        params.iter().map(Value::as_int).collect::<Vec<_>>() == (0..names.len() as i64).map(Some).collect::<Vec<_>>(),
        "{source}: the optimizer's param group does not hold LeNet-5's {} parameters in order",
        names.len()
    );
    let mut state_tensors = vec![];
    for (index, fields) in entry(optimizer, "state", &source)?.as_dict().unwrap_or_default() {
        let i = index.as_int().filter(|i| (0..names.len() as i64).contains(i));
        let i = i.with_context(|| {
            format!("{source}: optimizer state for parameter {} of {}", index.key_repr(), names.len())
        })?;
        for (field, t) in fields.as_dict().with_context(|| format!("{source}: optimizer state {i} is not a dict"))? {
            let field =
                field.as_str().with_context(|| format!("{source}: optimizer state {i}: a key that is not a string"))?;
            match t {
                Value::None => {} // an SGD momentum buffer not yet made
                Value::Tensor(t) => state_tensors.push((format!("{}.{field}", names[i as usize]), t.shallow_clone())),
                other => bail!("{source}: optimizer state {i} '{field}' is {}, not a tensor", other.type_name()),
            }
        }
    }

    let last_epoch = match value.get("scheduler_state_dict") {
        None | Some(Value::None) => int(&value, "step", &source)?,
        Some(s) => int(s, "last_epoch", &source)?,
    };
    let history = match value.get("history") {
        None => vec![],
        Some(h) => serde_json::from_value(to_json(h, &format!("{source}: 'history'"))?)
            .with_context(|| format!("{source}: 'history' is not a list of lenet5's metrics rows"))?,
    };
    let running = value.get("running");
    let run_float = |key: &str| running.and_then(|r| r.get(key)).and_then(Value::as_float).unwrap_or(0.0);
    let run_int = |key: &str| running.and_then(|r| r.get(key)).and_then(Value::as_int).unwrap_or(0);
    let state = TrainState {
        epoch: int(&value, "epoch", &source)? as usize + 1,
        batch: value.get("batch").and_then(Value::as_int).unwrap_or(0).max(0) as usize,
        step: int(&value, "step", &source)? as usize,
        epoch_loss_sum: run_float("loss_sum"),
        epoch_correct: run_int("correct"),
        epoch_seen: run_int("seen"),
        seconds: run_float("seconds"),
        history,
        schedule: Some(ScheduleState { last_epoch, hyper }),
        total_steps: 0, // set by the trainer from the data
    };
    let mut meta = CheckpointMeta::new(model, dataset, data_dir, config, checkpoint_every);
    meta.state = state;
    Ok((meta, Saved { weights, optimizer: state_tensors }))
}
