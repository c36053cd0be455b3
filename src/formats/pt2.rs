//! `.pt2` archives of `torch.export`: [`write`] makes one from the Rust model, its graph of ATen
//! ops built from the model's config as torch.export traces `scripts/lenet5_ref.py`'s LeNet5;
//! [`read_weights`] reads the weights of any one as data, never running its graph.

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{Kind, Tensor};

use super::torch_pickle::{self, Value};
use crate::model::{Arch, LeNet5, INPUT_SIZE, LAYERS};

/// The export schema written: `SCHEMA_VERSION` in torch 2.11's torch/_export/serde/schema.py
/// (tests/python/test_export_pt2.py fails when the installed torch's differs). torch.export.load
/// refuses a program of another major version.
pub const SCHEMA_VERSION: (i64, i64) = (8, 17);
/// The `aten` opset: torch._C._get_max_operator_version() of torch 2.11 (checked beside the schema).
pub const ATEN_OPSET: i64 = 10;

/// `torch.export.save` keeps the program's state dict in `data/weights/`, one file per storage
/// (raw bytes, or a torch.save pickle), and each tensor's dtype, size, stride and offset in
/// `<model>_weights_config.json` (torch/export/pt2_archive/_package.py; the schema is
/// torch._export.serde.schema.PayloadConfig).
#[derive(Serialize, Deserialize)]
struct PayloadConfig {
    config: BTreeMap<String, PayloadMeta>,
}

#[derive(Serialize, Deserialize)]
struct PayloadMeta {
    path_name: String,
    is_param: bool,
    use_pickle: bool,
    tensor_meta: TensorMeta,
}

#[derive(Clone, Serialize, Deserialize)]
struct TensorMeta {
    dtype: i64,
    sizes: Vec<SymInt>,
    requires_grad: bool,
    device: DeviceMeta,
    strides: Vec<SymInt>,
    storage_offset: SymInt,
    layout: i64,
}

#[derive(Clone, Serialize, Deserialize)]
struct DeviceMeta {
    #[serde(rename = "type")]
    kind: String,
    index: Option<i64>,
}

/// An int of the export schema: a number, or a symbol such as the batch size.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum SymInt {
    AsInt(i64),
    AsExpr { expr_str: String, hint: Option<Box<SymInt>> },
}

impl SymInt {
    fn int(&self) -> Result<i64> {
        match self {
            SymInt::AsInt(i) => Ok(*i),
            SymInt::AsExpr { expr_str, .. } => bail!("a symbolic size {expr_str} where weights have numbers"),
        }
    }
}

/// torch._export.serde.schema.ScalarType, for the dtypes weights have.
fn export_dtype(code: i64) -> Result<Kind> {
    Ok(match code {
        1 => Kind::Uint8,
        2 => Kind::Int8,
        3 => Kind::Int16,
        4 => Kind::Int,
        5 => Kind::Int64,
        6 => Kind::Half,
        7 => Kind::Float,
        8 => Kind::Double,
        12 => Kind::Bool,
        13 => Kind::BFloat16,
        _ => bail!("a tensor of export dtype {code}, which this reader does not know"),
    })
}

/// A contiguous float32 CPU tensor of size `dims`, after the batch dimension `batch` if given.
fn float_meta(dims: &[i64], batch: Option<&SymInt>, requires_grad: bool) -> TensorMeta {
    let mut sizes: Vec<SymInt> = dims.iter().map(|&d| SymInt::AsInt(d)).collect();
    let mut strides: Vec<SymInt> = (0..dims.len()).map(|i| SymInt::AsInt(dims[i + 1..].iter().product())).collect();
    if let Some(batch) = batch {
        sizes.insert(0, batch.clone());
        strides.insert(0, SymInt::AsInt(dims.iter().product()));
    }
    let device = DeviceMeta { kind: "cpu".into(), index: None };
    // ScalarType.FLOAT, Layout.Strided
    TensorMeta { dtype: 7, sizes, requires_grad, device, strides, storage_offset: SymInt::AsInt(0), layout: 7 }
}

/// The graph of the forward pass as torch.export records it: call nodes named as torch names
/// them (`relu`, `relu_1`, …), each output's metadata, and the module each node belongs to.
struct Graph {
    nodes: Vec<Json>,
    values: BTreeMap<String, TensorMeta>,
    names: HashMap<&'static str, usize>,
    batch: SymInt,
}

impl Graph {
    /// Appends `aten.{op}.{overload}(args)`, whose output is `dims` per sample, called inside
    /// the layer `module` (name, class) if any; returns the output's name.
    fn call(
        &mut self,
        op: &'static str,
        overload: &str,
        args: Vec<(&str, Json)>,
        dims: &[i64],
        module: Option<(&str, &str)>,
    ) -> String {
        let n = self.names.entry(op).or_default();
        let name = if *n == 0 { op.to_string() } else { format!("{op}_{n}") };
        *n += 1;
        // The root is the Python twin's class, the one torch.export would name.
        let mut stack = "L__self__,,lenet5_ref.LeNet5".to_string();
        if let Some((layer, class)) = module {
            stack += &format!(";L__self__{layer},{layer},{class}");
        }
        let inputs: Vec<Json> =
            args.into_iter().map(|(name, arg)| json!({"name": name, "arg": arg, "kind": 1})).collect();
        self.nodes.push(json!({
            "target": format!("torch.ops.aten.{op}.{overload}"),
            "inputs": inputs,
            "outputs": [tensor(&name)],
            "metadata": {"nn_module_stack": stack},
            "is_hop_single_tensor_return": null,
            "name": name,
        }));
        self.values.insert(name.clone(), float_meta(dims, Some(&self.batch), false));
        name
    }
}

fn tensor(name: &str) -> Json {
    json!({"as_tensor": {"name": name}})
}

/// The batch size's symbol, and its range: any batch from 1 up (torch.export.export's own
/// default range starts at 2).
const BATCH: &str = "s0";
const MIN_BATCH: i64 = 1;

/// The serialized ExportedProgram (torch._export.serde.schema.ExportedProgram) of `net`: the
/// ops torch.export records for LeNet5.forward, in its order. `hint` is a batch size the symbol
/// may stand for in torch's shape reasoning (the sample inputs').
fn program(net: &LeNet5, hint: i64) -> Result<Json> {
    // Each stage's size per sample, from the model itself.
    let probe = Tensor::f_zeros([1, 1, INPUT_SIZE, INPUT_SIZE], (Kind::Float, tch::Device::Cpu))?;
    let dims: HashMap<String, Vec<i64>> =
        net.stages(&probe).into_iter().map(|(stage, t)| (stage, t.size()[1..].to_vec())).collect();
    let params = net.parameters();
    let placeholder = |param: &str| format!("p_{}", param.replace('.', "_"));
    let batch = SymInt::AsExpr {
        expr_str: format!("Symbol('{BATCH}', positive=True, integer=True)"),
        hint: Some(Box::new(SymInt::AsInt(hint))),
    };
    let mut values: BTreeMap<String, TensorMeta> =
        params.iter().map(|(p, t)| (placeholder(p), float_meta(&t.size(), None, true))).collect();
    values.insert("x".into(), float_meta(&dims["input"], Some(&batch), false));
    let mut g = Graph { nodes: vec![], values, names: HashMap::new(), batch };

    let (act, pool) = match net.config.arch {
        Arch::Modern => ("relu", "max_pool2d"),
        Arch::Classic => ("tanh", "avg_pool2d"), // ceil_mode, count_include_pad, divisor: defaults
    };
    let layer = |name: &str, x: &str| {
        let param = |p: &str| tensor(&placeholder(&format!("{name}.{p}")));
        vec![("input", tensor(x)), ("weight", param("weight")), ("bias", param("bias"))]
    };
    let mut x = "x".to_string();
    for (conv, c, s) in [("conv1", "C1", "S2"), ("conv2", "C3", "S4")] {
        x = g.call("conv2d", "default", layer(conv, &x), &dims[c], Some((conv, "torch.nn.modules.conv.Conv2d")));
        x = g.call(act, "default", vec![("self", tensor(&x))], &dims[c], None);
        // LeNet5::subsample's 2x2 window; the stride defaults to the window.
        x = g.call(
            pool,
            "default",
            vec![("self", tensor(&x)), ("kernel_size", json!({"as_ints": [2, 2]}))],
            &dims[s],
            None,
        );
    }
    let flat = [dims["S4"].iter().product()];
    x = g.call("flatten", "using_ints", vec![("self", tensor(&x)), ("start_dim", json!({"as_int": 1}))], &flat, None);
    for (fc, f) in [("fc1", "F5"), ("fc2", "F6"), ("fc3", "output")] {
        x = g.call("linear", "default", layer(fc, &x), &dims[f], Some((fc, "torch.nn.modules.linear.Linear")));
        if fc != "fc3" {
            x = g.call(act, "default", vec![("self", tensor(&x))], &dims[f], None);
        }
    }

    let mut inputs: Vec<Json> = params.iter().map(|(p, _)| tensor(&placeholder(p))).collect();
    inputs.push(tensor("x"));
    let mut input_specs: Vec<Json> = params
        .iter()
        .map(|(p, _)| json!({"parameter": {"arg": {"name": placeholder(p)}, "parameter_name": p}}))
        .collect();
    input_specs.push(json!({"user_input": {"arg": tensor("x")}}));
    // pytree's treespec_dumps of forward's (args, kwargs) = ((x,), {}) and of its one tensor out.
    let leaf = json!({"type": null, "context": null, "children_spec": []});
    let tuple = |children: Vec<Json>| json!({"type": "builtins.tuple", "context": "null", "children_spec": children});
    let in_spec = json!([
        1,
        tuple(vec![tuple(vec![leaf.clone()]), json!({"type": "builtins.dict", "context": "[]", "children_spec": []})])
    ]);
    let root = json!({"fqn": "", "signature": {
        "inputs": [], "outputs": [], "in_spec": in_spec.to_string(), "out_spec": json!([1, leaf]).to_string(), "forward_arg_names": ["x"],
    }});
    let layers = LAYERS.iter().map(|l| json!({"fqn": l, "signature": null}));
    Ok(json!({
        "graph_module": {
            "graph": {
                "inputs": inputs,
                "outputs": [tensor(&x)],
                "nodes": g.nodes,
                "tensor_values": g.values,
                "sym_int_values": {}, "sym_bool_values": {}, "sym_float_values": {}, "custom_obj_values": {},
                "is_single_tensor_return": false,
            },
            "signature": {"input_specs": input_specs, "output_specs": [{"user_output": {"arg": tensor(&x)}}]},
            "module_call_graph": std::iter::once(root).chain(layers).collect::<Vec<_>>(),
            "metadata": {},
            "treespec_namedtuple_fields": {},
        },
        "opset_version": {"aten": ATEN_OPSET},
        "range_constraints": {BATCH: {"min_val": MIN_BATCH, "max_val": null}},
        "schema_version": {"major": SCHEMA_VERSION.0, "minor": SCHEMA_VERSION.1},
        // torch.export.export's dialect: ops as called (aten.conv2d, aten.linear), not decomposed.
        "verifiers": ["TRAINING"],
        "torch_version": crate::LIBTORCH_VERSION,
        "guards_code": [],
    }))
}

/// Writes `net` (on the CPU) as `torch.export.save` would write its `torch.export.export`, with
/// `example` (a batch of inputs) as the program's sample inputs, atomically.
pub fn write(path: &Path, net: &LeNet5, example: &Tensor) -> Result<()> {
    let write = || -> Result<Vec<u8>> {
        let example = example.f_to_kind(Kind::Float)?.f_contiguous()?;
        let mut records: Vec<(String, Vec<u8>)> = Vec::new();
        let mut weights = BTreeMap::new();
        for (i, (name, t)) in net.parameters().into_iter().enumerate() {
            // Pickled, not raw: torch 2.11 loads raw weights with torch.frombuffer on read-only
            // bytes, which warns (UserWarning) on every torch.export.load.
            let path_name = format!("weight_{i}");
            let tensor_meta = float_meta(&t.size(), None, true);
            records.push((format!("data/weights/{path_name}"), torch_pickle::parameter_to_bytes(&t)?));
            weights.insert(name, PayloadMeta { path_name, is_param: true, use_pickle: true, tensor_meta });
        }
        let config = |config| serde_json::to_vec(&PayloadConfig { config });
        records.push(("data/weights/model_weights_config.json".into(), config(weights)?));
        records.push(("data/constants/model_constants_config.json".into(), config(BTreeMap::new())?));
        records.push(("models/model.json".into(), serde_json::to_vec(&program(net, example.size()[0])?)?));
        let sample = Value::Tuple(vec![Value::Tuple(vec![Value::Tensor(example)]), Value::Dict(vec![])]); // (args, kwargs)
        records.push(("data/sample_inputs/model.pt".into(), torch_pickle::to_bytes(&sample, "archive")?));
        records.push(("archive_format".into(), b"pt2".to_vec()));
        records.push(("archive_version".into(), b"0".to_vec())); // load requires exactly this
        records.push((".data/version".into(), b"6\n".to_vec())); // the zip format version PT2ArchiveWriter sets
        records.push(("byteorder".into(), b"little".to_vec()));
        // PyTorchFileWriter names the top folder after the file.
        let folder = path.file_stem().and_then(|s| s.to_str()).filter(|s| !s.is_empty()).unwrap_or("archive");
        torch_pickle::zip_archive(folder, records)
    };
    let bytes = write().with_context(|| format!("{}: cannot write the torch.export archive", path.display()))?;
    crate::atomic::write(path, &bytes)
}

/// The weights of a `.pt2` archive of one model, each checked to lie inside its storage.
pub fn read_weights(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut zip = torch_pickle::open_zip(std::fs::File::open(path)?)?;
    let configs: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok())
        .filter(|n| {
            n.split_once('/')
                .is_some_and(|(_, rest)| rest.starts_with("data/weights/") && rest.ends_with("_weights_config.json"))
        })
        .map(|n| n.into_owned())
        .collect();
    let [config] = &configs[..] else { bail!("{} weights configs inside, where one model has one", configs.len()) };
    let folder = config.rsplit_once('/').map_or("", |(folder, _)| folder).to_string();
    let json = torch_pickle::read_entry(&mut zip, config, 64 << 20)?;
    let config: PayloadConfig =
        serde_json::from_slice(&json).with_context(|| format!("{config} is not what torch.export writes"))?;
    let mut storages = torch_pickle::Storages::default();
    let mut tensors = Vec::with_capacity(config.config.len());
    for (name, meta) in config.config {
        let kind = export_dtype(meta.tensor_meta.dtype)?;
        let file = meta.path_name;
        let ints = |v: &[SymInt]| v.iter().map(SymInt::int).collect::<Result<Vec<_>>>();
        let (size, stride) = (ints(&meta.tensor_meta.sizes)?, ints(&meta.tensor_meta.strides)?);
        let tensor = if meta.use_pickle {
            // What this program writes: each parameter a torch.save file of its own.
            let data = torch_pickle::read_entry(&mut zip, &format!("{folder}/{file}"), MAX_EXPORT_STORAGE)?;
            let value = torch_pickle::read_bytes(&data).with_context(|| format!("{name} in {file}"))?;
            let Value::Tensor(tensor) = value else { bail!("{name} in {file} is {}, not a tensor", value.type_name()) };
            ensure!(
                tensor.size() == size,
                "{name} in {file} is of size {:?}, where the config says {size:?}",
                tensor.size()
            );
            tensor
        } else {
            if !storages.contains(&file) {
                let data = torch_pickle::read_entry(&mut zip, &format!("{folder}/{file}"), MAX_EXPORT_STORAGE)?;
                storages.insert(&file, kind, &data)?;
            }
            storages.view(&file, &size, &stride, meta.tensor_meta.storage_offset.int()?)?
        };
        ensure!(tensor.kind() == kind, "{name} is {kind:?} in the config and {:?} in {file}", tensor.kind());
        tensors.push((name, tensor));
    }
    Ok(tensors)
}

/// A storage file of a `.pt2` archive larger than this is not LeNet-5's.
const MAX_EXPORT_STORAGE: u64 = 1 << 30;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::weights::{detect, Format};
    use crate::model::{Head, ModelConfig, INPUT_SIZE};
    use tch::nn::VarStore;

    #[test]
    fn an_archive_written_here_gives_back_its_weights_bit_for_bit() {
        let dir = std::env::temp_dir().join(format!("lenet5-pt2-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.pt2");
        tch::manual_seed(5);
        let vs = VarStore::new(tch::Device::Cpu);
        let net = LeNet5::new(&vs.root(), ModelConfig { arch: Arch::Classic, head: Head::Sigmoid });
        write(&path, &net, &Tensor::zeros([2, 1, INPUT_SIZE, INPUT_SIZE], (Kind::Float, tch::Device::Cpu))).unwrap();
        assert_eq!(detect(&path).unwrap(), Format::TorchExport);
        let mut back = read_weights(&path).unwrap();
        back.sort_by(|a, b| a.0.cmp(&b.0));
        let mut want = net.parameters();
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(back.iter().map(|(n, _)| n).collect::<Vec<_>>(), want.iter().map(|(n, _)| n).collect::<Vec<_>>());
        for ((name, got), (_, want)) in back.iter().zip(&want) {
            assert!(got.equal(want), "{name} differs");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
