//! ONNX files as weights: recognised by decoding (protobuf has no magic bytes), and each
//! layer's initializers found through the node that uses them, named and laid out as PyTorch's
//! state dict has them. The graph itself is never run.

use anyhow::{bail, ensure, Context, Result};
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use tch::{Kind, Tensor};

use super::proto::{attribute_proto::AttributeType, tensor_proto, GraphProto, ModelProto, NodeProto, TensorProto};
use crate::formats::weights::NamedTensors;

/// Protobuf's own limit on a message, and so on an ONNX file that keeps its weights inside.
const MAX_BYTES: u64 = 2 << 30;

/// What a file that is neither safetensors nor a zip turned out to be.
#[derive(Debug, PartialEq)]
pub enum Sniff {
    /// A ModelProto with an IR version, an opset and a graph.
    Onnx,
    /// Starts as an ONNX model does but is not a whole one: why, in a few words.
    Damaged(String),
    /// Anything else.
    Other,
}

/// Decides whether `path` is ONNX: it decodes as a ModelProto with `ir_version`, `opset_import`
/// and a `graph`. A file whose first bytes are an ONNX model's (an `ir_version` field) but which
/// does not decode, or lacks those parts, is damaged: truncated, most likely.
pub fn sniff(path: &Path) -> Result<Sniff> {
    let name = path.display();
    let len = std::fs::metadata(path).with_context(|| format!("{name}: cannot read"))?.len();
    if len > MAX_BYTES {
        return Ok(Sniff::Other);
    }
    let bytes = std::fs::read(path).with_context(|| format!("{name}: cannot read"))?;
    // Field 1 (ir_version) as a varint, 0x08, comes first in every writer's output; a small value follows.
    let starts_as_onnx = bytes.len() >= 2 && bytes[0] == 0x08 && (1..0x40).contains(&bytes[1]);
    match ModelProto::decode(bytes.as_slice()) {
        Ok(m) if m.ir_version.is_some_and(|v| v > 0) && !m.opset_import.is_empty() && m.graph.is_some() => {
            Ok(Sniff::Onnx)
        }
        Ok(m) if starts_as_onnx => {
            let parts = [
                ("ir_version", m.ir_version.is_none_or(|v| v <= 0)),
                ("opset_import", m.opset_import.is_empty()),
                ("graph", m.graph.is_none()),
            ];
            let lacks: Vec<&str> = parts.into_iter().filter_map(|(what, lacking)| lacking.then_some(what)).collect();
            Ok(Sniff::Damaged(format!("starts as an ONNX model does but has no {} (truncated?)", lacks.join(", no "))))
        }
        Err(e) if starts_as_onnx => {
            Ok(Sniff::Damaged(format!("starts as an ONNX model does but is truncated or corrupt ({e})")))
        }
        _ => Ok(Sniff::Other),
    }
}

/// Where a layer's parameter is: an initializer, used as PyTorch stores it or transposed.
#[derive(Debug, Clone)]
struct Source {
    initializer: String,
    transposed: bool,
}

/// The weights of an ONNX model by their PyTorch names, with a note saying where they came from.
///
/// Each `Conv` node is the next `convN` and each linear layer the next `fcN` (in graph order):
/// a `Gemm` (`transB = 1` holds the weight as PyTorch does, `(out, in)`; `transB = 0` as
/// `(in, out)`), or a `MatMul` by an initializer `(in, out)` whose output an `Add` of an
/// initializer (the bias) takes. A weight reached through a 2-D `Transpose` is transposed once
/// more. Other floating-point initializers keep their own names, so the state-dict check
/// reports them; integer ones are shapes and axes, not weights, and are left out.
pub fn read_weights(path: &Path) -> Result<(NamedTensors, Vec<String>)> {
    let name = path.display();
    let bytes = std::fs::read(path).with_context(|| format!("{name}: cannot read"))?;
    let model = ModelProto::decode(bytes.as_slice()).with_context(|| format!("{name}: not a whole ONNX model"))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let graph = model.graph.as_ref().with_context(|| format!("{name}: an ONNX model without a graph"))?;
    let initializers: BTreeMap<&str, &TensorProto> =
        graph.initializer.iter().map(|t| (t.name.as_deref().unwrap_or(""), t)).collect();
    let params = layer_parameters(graph, &initializers).with_context(|| format!("{name}: cannot read its layers"))?;

    let mut tensors = Vec::new();
    let mut renamed = Vec::new();
    for (param, source) in &params {
        let t = tensor(initializers[source.initializer.as_str()], dir)
            .with_context(|| format!("{name}: initializer {}", source.initializer))?;
        let t = if source.transposed && t.dim() == 2 { t.tr().contiguous() } else { t };
        if source.initializer != *param || source.transposed {
            renamed.push(format!(
                "{}{} -> {param}",
                source.initializer,
                if source.transposed { " (transposed)" } else { "" }
            ));
        }
        tensors.push((param.clone(), t));
    }
    let used: BTreeSet<&str> = params.values().map(|s| s.initializer.as_str()).collect();
    for (&init, proto) in &initializers {
        let floating = matches!(data_type(proto), Some((k, _)) if matches!(k, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16));
        if used.contains(init) || !floating {
            continue;
        }
        ensure!(
            !params.contains_key(init),
            "{name}: initializer {init} has the name of another layer's parameter, which it is not"
        );
        tensors.push((init.to_string(), tensor(proto, dir).with_context(|| format!("{name}: initializer {init}"))?));
    }

    let producer = [model.producer_name.as_deref(), model.producer_version.as_deref()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
    let opset =
        model.opset_import.iter().find(|o| o.domain.as_deref().unwrap_or("").is_empty()).and_then(|o| o.version);
    let mut note = format!(
        "{name}: an ONNX model (IR {}{}{}); its weights are read from the layers that use them, its graph is not run",
        model.ir_version.unwrap_or(0),
        opset.map(|v| format!(", opset {v}")).unwrap_or_default(),
        if producer.is_empty() { String::new() } else { format!(", by {producer}") },
    );
    if !renamed.is_empty() {
        const SHOWN: usize = 4;
        let more =
            if renamed.len() > SHOWN { format!(", … and {} more", renamed.len() - SHOWN) } else { String::new() };
        note += &format!(" ({}{more})", renamed[..renamed.len().min(SHOWN)].join(", "));
    }
    Ok((tensors, vec![note]))
}

/// `convN.weight`, `fcN.bias`, … -> where each is, from the nodes that use them.
fn layer_parameters(
    graph: &GraphProto,
    initializers: &BTreeMap<&str, &TensorProto>,
) -> Result<BTreeMap<String, Source>> {
    // An initializer as it is, or through a Transpose that swaps its two axes.
    let resolve = |value: Option<&String>| -> Option<Source> {
        let value = value.filter(|v| !v.is_empty())?;
        if initializers.contains_key(value.as_str()) {
            return Some(Source { initializer: value.clone(), transposed: false });
        }
        let t = graph.node.iter().find(|n| op(n) == "Transpose" && n.output.first() == Some(value))?;
        let input = t.input.first().filter(|i| initializers.get(i.as_str()).is_some_and(|p| p.dims.len() == 2))?;
        let perm = attribute(t, "perm").map(|a| a.ints.clone()).unwrap_or_else(|| vec![1, 0]);
        (perm == [1, 0]).then(|| Source { initializer: input.clone(), transposed: true })
    };
    let flip = |s: Source| Source { transposed: !s.transposed, ..s };

    let mut params = BTreeMap::new();
    let mut add = |layer: &str, weight: Option<Source>, bias: Option<Source>| {
        params.extend(weight.map(|w| (format!("{layer}.weight"), w)));
        params.extend(bias.map(|b| (format!("{layer}.bias"), b)));
    };
    let (mut convs, mut linears) = (0, 0);
    for n in &graph.node {
        let node = n.name.as_deref().filter(|s| !s.is_empty()).unwrap_or_else(|| op(n));
        match op(n) {
            "Conv" => {
                convs += 1;
                add(&format!("conv{convs}"), resolve(n.input.get(1)), resolve(n.input.get(2)));
            }
            "Gemm" => {
                for (attr, want) in [("transA", 0.0), ("alpha", 1.0), ("beta", 1.0)] {
                    let value = attribute(n, attr).map(|a| {
                        if a.r#type == Some(AttributeType::Float as i32) {
                            a.f.unwrap_or(1.0) as f64
                        } else {
                            a.i.unwrap_or(0) as f64
                        }
                    });
                    ensure!(
                        value.unwrap_or(want) == want,
                        "Gemm node {node} has {attr} = {}: not a linear layer",
                        value.unwrap_or(want)
                    );
                }
                linears += 1;
                let trans_b = attribute(n, "transB").and_then(|a| a.i).unwrap_or(0) != 0;
                // transB = 1: B is (out, in), as PyTorch stores it; transB = 0: (in, out).
                let weight = resolve(n.input.get(1)).map(|w| if trans_b { w } else { flip(w) });
                add(&format!("fc{linears}"), weight, resolve(n.input.get(2)));
            }
            "MatMul" => {
                // x @ W with W an initializer (in, out): a linear layer. A MatMul of two
                // activations is not a layer and is passed over.
                let Some(weight) = resolve(n.input.get(1)) else { continue };
                linears += 1;
                let out = n.output.first();
                let bias = graph
                    .node
                    .iter()
                    .filter(|a| op(a) == "Add" && out.is_some_and(|o| a.input.contains(o)))
                    .find_map(|a| a.input.iter().find(|i| Some(*i) != out).and_then(|i| resolve(Some(i))));
                add(&format!("fc{linears}"), Some(flip(weight)), bias);
            }
            _ => {}
        }
    }
    Ok(params)
}

fn op(n: &NodeProto) -> &str {
    n.op_type.as_deref().unwrap_or("")
}

fn attribute<'a>(n: &'a NodeProto, name: &str) -> Option<&'a super::proto::AttributeProto> {
    n.attribute.iter().find(|a| a.name.as_deref() == Some(name))
}

/// The libtorch kind and byte size of an ONNX data type this reader takes.
fn data_type(t: &TensorProto) -> Option<(Kind, usize)> {
    use tensor_proto::DataType as D;
    Some(match D::try_from(t.data_type.unwrap_or(0)).ok()? {
        D::Float => (Kind::Float, 4),
        D::Double => (Kind::Double, 8),
        D::Float16 => (Kind::Half, 2),
        D::Bfloat16 => (Kind::BFloat16, 2),
        D::Int64 => (Kind::Int64, 8),
        D::Int32 => (Kind::Int, 4),
        _ => return None,
    })
}

/// A TensorProto's values as a CPU tensor of its shape: from `raw_data` (little-endian), the
/// typed field, or a file in `dir` (external data), each checked to hold exactly as many values
/// as the dims say.
fn tensor(t: &TensorProto, dir: &Path) -> Result<Tensor> {
    use tensor_proto::{DataLocation, DataType};
    let code = t.data_type.unwrap_or(0);
    let Some((kind, size)) = data_type(t) else {
        let name = DataType::try_from(code).map(|d| d.as_str_name().to_string()).unwrap_or_else(|_| code.to_string());
        bail!("data type {name}, which this reader does not take (float, double, float16, bfloat16, int64, int32)")
    };
    ensure!(t.dims.iter().all(|&d| d >= 0), "negative dims {:?}", t.dims);
    let numel = t.dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d as usize)).context("dims too large")?;
    let count = |n: usize| -> Result<()> {
        ensure!(n == numel, "holds {n} values, and its dims {:?} need {numel}", t.dims);
        Ok(())
    };
    if t.data_location == Some(DataLocation::External as i32) {
        let raw = external_data(t, dir, numel * size)?;
        return Ok(Tensor::f_from_data_size(&raw, &t.dims, kind)?);
    }
    if let Some(raw) = &t.raw_data {
        ensure!(
            raw.len() == numel * size,
            "raw_data holds {} bytes, and its dims {:?} need {}",
            raw.len(),
            t.dims,
            numel * size
        );
        return Ok(Tensor::f_from_data_size(raw, &t.dims, kind)?);
    }
    // The typed fields: float in float_data, double in double_data, int64 in int64_data, and
    // int32, float16 and bfloat16 (their 16 bits) in int32_data.
    let flat = match kind {
        Kind::Float => {
            count(t.float_data.len())?;
            Tensor::from_slice(&t.float_data)
        }
        Kind::Double => {
            count(t.double_data.len())?;
            Tensor::from_slice(&t.double_data)
        }
        Kind::Int64 => {
            count(t.int64_data.len())?;
            Tensor::from_slice(&t.int64_data)
        }
        Kind::Int => {
            count(t.int32_data.len())?;
            Tensor::from_slice(&t.int32_data)
        }
        _ => {
            count(t.int32_data.len())?;
            let bits: Vec<u8> = t.int32_data.iter().flat_map(|&v| (v as u16).to_le_bytes()).collect();
            Tensor::f_from_data_size(&bits, &[numel as i64], kind)?
        }
    };
    Ok(flat.f_reshape(t.dims.as_slice())?)
}

/// The `bytes` of an initializer kept in a file beside the model (`torch.onnx.export` does so
/// by default): `location` relative to the model's folder and inside it, `offset`, `length`.
fn external_data(t: &TensorProto, dir: &Path, bytes: usize) -> Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let key = |k: &str| t.external_data.iter().find(|e| e.key.as_deref() == Some(k)).and_then(|e| e.value.as_deref());
    let number = |k: &str| {
        key(k).map(|v| v.parse::<u64>().with_context(|| format!("external data {k} {v:?} is not a number"))).transpose()
    };
    let location = key("location").context("external data without a location")?;
    let relative = Path::new(location);
    ensure!(
        relative.components().all(|c| matches!(c, std::path::Component::Normal(_))),
        "external data location {location:?} is not a file inside the model's folder"
    );
    let (offset, length) = (number("offset")?.unwrap_or(0), number("length")?.unwrap_or(bytes as u64));
    ensure!(length == bytes as u64, "external data of {length} bytes, and its dims {:?} need {bytes}", t.dims);
    let path = dir.join(relative);
    let mut file =
        std::fs::File::open(&path).with_context(|| format!("{}: cannot open its external data", path.display()))?;
    let size = file.metadata().with_context(|| format!("{}: cannot read", path.display()))?.len();
    ensure!(
        offset.checked_add(length).is_some_and(|end| end <= size),
        "{}: bytes {offset}..{} are past its end ({size} bytes)",
        path.display(),
        offset.saturating_add(length)
    );
    let mut raw = vec![0u8; bytes];
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(&mut raw))
        .with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(raw)
}
