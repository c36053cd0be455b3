//! `torch_pickle::read` and `write` against stock PyTorch: a value Rust writes must come back from
//! `torch.load(weights_only=True)` exactly, and a training checkpoint `torch.save` wrote (AdamW,
//! OneCycleLR) must read in Rust exactly. Both sides print the value in one tagged JSON form
//! (types kept, floats as their bits, tensors as dtype, shape and SHA-256 of their bytes) and
//! the two forms must be equal.

mod support;

use lenet5::formats::torch_pickle::{self, Value};
use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};

/// `describe(obj)`, the Python side of the tagged form, with stock torch and nothing of ours.
const DESCRIBE: &str = r#"
import hashlib, json, struct, sys
from collections import OrderedDict
import torch

def describe(v, exact):
    """exact: containers must be plain dict/list/tuple (what Rust writes); else OrderedDict too."""
    if v is None:
        return None
    if type(v) is bool:
        return {"bool": v}
    if type(v) is int:
        return {"int": v}
    if type(v) is float:
        return {"float": struct.unpack("<Q", struct.pack("<d", v))[0]}
    if type(v) is str:
        return {"str": v}
    if type(v) is list:
        return {"list": [describe(x, exact) for x in v]}
    if type(v) is tuple or (not exact and type(v) is torch.Size):
        return {"tuple": [describe(x, exact) for x in v]}
    if type(v) is dict or (not exact and type(v) is OrderedDict):
        return {"dict": [[describe(k, exact), describe(x, exact)] for k, x in v.items()]}
    if type(v) is torch.Tensor or (not exact and type(v) is torch.nn.Parameter):
        data = v.detach().contiguous().flatten().view(torch.uint8).numpy().tobytes()
        return {"tensor": str(v.dtype), "shape": list(v.shape), "sha256": hashlib.sha256(data).hexdigest()}
    raise TypeError(f"unexpected {type(v)}")
"#;

/// Reads what Rust wrote with `torch.load(weights_only=True)` (and with mmap=True, which maps
/// the records in place and so needs them 64-byte aligned), and prints its description.
const LOAD: &str = r#"
value = torch.load(sys.argv[1], weights_only=True)
mapped = torch.load(sys.argv[1], weights_only=True, mmap=True)
assert describe(mapped, True) == describe(value, True), "mmap=True reads other values"
print(json.dumps(describe(value, True)))
"#;

/// Trains LeNet-5 for 3 steps with AdamW and OneCycleLR as a notebook would, saves the
/// tutorial's checkpoint layout to sys.argv[1] and prints its description (of the objects
/// in memory, before any saving).
const CHECKPOINT: &str = r#"
sys.path.insert(0, "scripts")
from lenet5_ref import LeNet5
torch.manual_seed(0)
model = LeNet5()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=100)
for step in range(3):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(torch.randn(8, 1, 32, 32)), torch.randint(0, 10, (8,))).backward()
    opt.step()
    sched.step()
checkpoint = {
    "epoch": 1, "step": 3,
    "model_state_dict": model.state_dict(),
    "optimizer_state_dict": opt.state_dict(),
    "scheduler_state_dict": sched.state_dict(),
    "recipe": {"batch_size": 64, "betas": (0.9, 0.999), "big": 2**40, "negative": -70000, "name": "adamw ✓",
               "none": None, "empty": (), "nested": [[], {}, (1,)],
               "shape": model.conv1.weight.shape},
}
assert isinstance(checkpoint["optimizer_state_dict"]["state"][0]["step"], torch.Tensor)
torch.save(checkpoint, sys.argv[1])
print(json.dumps(describe(checkpoint, False)))
"#;

/// The venv's Python, or None (with a note) when scripts/setup has not made one.
fn python() -> Option<PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    if !python.exists() {
        eprintln!("skipped: {} is missing (scripts/setup creates it)", python.display());
        return None;
    }
    Some(python)
}

/// Runs `DESCRIBE` + `script` with `arg` and returns the JSON it prints.
fn run_python(python: &Path, script: &str, arg: &Path) -> Json {
    let out = Command::new(python)
        .args(["-c", &format!("{DESCRIBE}{script}")])
        .arg(arg)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("python runs");
    assert!(out.status.success(), "python failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("python prints JSON")
}

fn dtype(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "torch.float32",
        Kind::Double => "torch.float64",
        Kind::Half => "torch.float16",
        Kind::BFloat16 => "torch.bfloat16",
        Kind::Int64 => "torch.int64",
        Kind::Int => "torch.int32",
        Kind::Int16 => "torch.int16",
        Kind::Int8 => "torch.int8",
        Kind::Uint8 => "torch.uint8",
        Kind::Bool => "torch.bool",
        other => panic!("no dtype name for {other:?}"),
    }
}

/// The Rust side of the tagged form.
fn describe(v: &Value) -> Json {
    let all = |items: &[Value]| items.iter().map(describe).collect::<Vec<_>>();
    match v {
        Value::None => Json::Null,
        Value::Bool(b) => json!({ "bool": b }),
        Value::Int(i) => json!({ "int": i }),
        Value::Float(f) => json!({ "float": f.to_bits() }),
        Value::Str(s) => json!({ "str": s }),
        Value::List(items) => json!({ "list": all(items) }),
        Value::Tuple(items) => json!({ "tuple": all(items) }),
        Value::Dict(items) => {
            json!({ "dict": items.iter().map(|(k, v)| json!([describe(k), describe(v)])).collect::<Vec<_>>() })
        }
        Value::Tensor(t) => {
            let n = t.numel();
            let mut data = vec![0u8; n * t.kind().elt_size_in_bytes()];
            t.contiguous().copy_data_u8(&mut data, n);
            let sha: String = Sha256::digest(&data).iter().map(|b| format!("{b:02x}")).collect();
            json!({ "tensor": dtype(t.kind()), "shape": t.size(), "sha256": sha })
        }
    }
}

fn key(k: &str) -> Value {
    Value::Str(k.into())
}

#[test]
fn a_value_written_in_rust_loads_in_pytorch_with_the_same_types_and_bits() {
    let Some(python) = python() else { return };
    tch::manual_seed(0);
    let cpu = (Kind::Float, Device::Cpu);
    let t = |t: Tensor| Value::Tensor(t);
    let state = |i: i64| {
        Value::Dict(vec![
            (key("step"), t(Tensor::from(3.0f32))),
            (key("exp_avg"), t(Tensor::randn([6, 1, 5, 5], cpu))),
            (key("exp_avg_sq"), t(Tensor::randn([6], cpu).abs() * (i + 1))),
        ])
    };
    let value = Value::Dict(vec![
        (key("epoch"), Value::Int(3)),
        (key("step"), Value::Int(70_000)),
        (
            key("model_state_dict"),
            Value::Dict(vec![
                (key("conv1.weight"), t(Tensor::randn([6, 1, 5, 5], cpu))),
                (key("conv1.bias"), t(Tensor::randn([6], cpu))),
            ]),
        ),
        (
            key("optimizer_state_dict"),
            Value::Dict(vec![
                (key("state"), Value::Dict(vec![(Value::Int(0), state(0)), (Value::Int(1), state(1))])),
                (
                    key("param_groups"),
                    Value::List(vec![Value::Dict(vec![
                        (key("lr"), Value::Float(0.001)),
                        (key("betas"), Value::Tuple(vec![Value::Float(0.9), Value::Float(0.999)])),
                        (key("eps"), Value::Float(1e-8)),
                        (key("amsgrad"), Value::Bool(false)),
                        (key("foreach"), Value::None),
                        (key("params"), Value::List(vec![Value::Int(0), Value::Int(1)])),
                    ])]),
                ),
            ]),
        ),
        (
            key("kinds"),
            Value::List(vec![
                t(Tensor::randn([3], (Kind::Double, Device::Cpu))),
                t(Tensor::from_slice(&[-(1i64 << 40), -1, 0, 7])),
                t(Tensor::from_slice(&[0u8, 7, 255])),
                t(Tensor::from_slice(&[true, false])),
                t(Tensor::from_slice(&[i32::MIN, 0, i32::MAX])),
                t(Tensor::from(-0.0f64)),
                t(Tensor::arange(12, cpu).reshape([3, 4]).tr()), // written contiguous
                t(Tensor::zeros([0, 2], cpu)),
            ]),
        ),
        (key("ints"), Value::Tuple([255, 256, 65536, -1, i64::MIN, i64::MAX].into_iter().map(Value::Int).collect())),
        (
            key("floats"),
            Value::List([f64::NAN, f64::NEG_INFINITY, 1e300, -0.0].into_iter().map(Value::Float).collect()),
        ),
        (Value::Int(-2), Value::Str("négatif ✓".into())),
        (
            key("tuples"),
            Value::Tuple(vec![
                Value::Tuple(vec![]),
                Value::Tuple(vec![Value::None]),
                Value::Tuple((0..5).map(Value::Int).collect()),
            ]),
        ),
    ]);
    let dir = support::temp_dir("pickle-values");
    let path = dir.join("values.pt");
    torch_pickle::write(&path, &value).unwrap();
    assert_eq!(run_python(&python, LOAD, &path), describe(&value));
    // And our own reader reads it back the same.
    assert_eq!(describe(&torch_pickle::read(&path).unwrap()), describe(&value));
}

#[test]
fn a_training_checkpoint_saved_by_pytorch_reads_in_rust_exactly() {
    let Some(python) = python() else { return };
    let dir = support::temp_dir("pickle-checkpoint");
    let path = dir.join("checkpoint.pt");
    let want = run_python(&python, CHECKPOINT, &path);
    let got = torch_pickle::read(&path).unwrap();
    assert_eq!(describe(&got), want);
    // The accessors find what a resume needs.
    let opt = got.get("optimizer_state_dict").unwrap();
    let group = &opt.get("param_groups").and_then(Value::as_list).unwrap()[0];
    assert_eq!(group.get("betas").and_then(Value::as_list).map(|b| b[1].as_float()), Some(Some(0.999)));
    assert_eq!(group.get("weight_decay").and_then(Value::as_float), Some(0.01));
    assert_eq!(group.get("foreach").map(|v| matches!(v, Value::None)), Some(true));
    let state = opt.get("state").and_then(Value::as_dict).unwrap();
    assert_eq!(state.iter().map(|(k, _)| k.as_int().unwrap()).collect::<Vec<_>>(), (0..10).collect::<Vec<_>>());
    let step = state[0].1.get("step").and_then(Value::as_tensor).unwrap();
    assert_eq!((step.size(), step.double_value(&[])), (vec![], 3.0));
    assert_eq!(got.get("scheduler_state_dict").and_then(|s| s.get("last_epoch")).and_then(Value::as_int), Some(3));
    assert_eq!(got.get("epoch").and_then(Value::as_int), Some(1));
    // Written back by Rust, PyTorch reads the same checkpoint.
    let copy = dir.join("copy.pt");
    torch_pickle::write(&copy, &got).unwrap();
    assert_eq!(run_python(&python, LOAD, &copy), want);
}
