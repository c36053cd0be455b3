//! LeNet-5 as an ONNX model: the forward pass of `model::LeNet5` node for node, its parameters
//! as initializers under their PyTorch names, the card's facts in `metadata_props`.

use anyhow::{Context, Result};
use prost::Message;
use std::path::Path;
use tch::{Device, Kind, Tensor};

use super::proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};
use crate::formats::card::ModelCard;
use crate::model::{Arch, Head, LeNet5, INPUT_SIZE};

/// The default (`ai.onnx`) opset: 18, the first with every operator here in its current form,
/// and old enough for any onnxruntime of the last years.
pub const OPSET: i64 = 18;
/// The IR version that came with opset 18 (onnx 1.13; `onnx.helper.VERSION_TABLE`).
pub const IR_VERSION: i64 = 8;
/// The symbolic batch dimension of the input and of every output.
const BATCH: &str = "batch";

/// Writes `net` as ONNX to `path`, atomically, with `card`'s facts as metadata.
pub fn write(net: &LeNet5, card: &ModelCard, path: &Path) -> Result<()> {
    let bytes = model(net, card)?.encode_to_vec();
    crate::atomic::write(path, &bytes)
}

/// The ONNX model of `net`: input `input` `(batch, 1, 32, 32)`, normalised as the card says;
/// outputs `logits` `(batch, 10)` and the stages C1, S2, C3, S4, F5 and F6 (model::STAGES).
fn model(net: &LeNet5, card: &ModelCard) -> Result<ModelProto> {
    let arch = net.config.arch;
    // The stages' shapes from the model itself, on one image: (1, C, H, W) or (1, F).
    let probe = Tensor::zeros([1, 1, INPUT_SIZE, INPUT_SIZE], (Kind::Float, Device::Cpu)).to_device(device_of(net));
    let shapes: Vec<(String, Vec<i64>)> =
        net.stages(&probe).into_iter().map(|(name, t)| (name, t.size()[1..].to_vec())).collect();
    let shape =
        |stage: &str| shapes.iter().find(|(n, _)| n == stage).map(|(_, s)| s.clone()).expect("model::STAGES names it");

    let mut nodes = Vec::new();
    let (activation, pool) = match arch {
        Arch::Modern => ("Relu", "MaxPool"),
        Arch::Classic => ("Tanh", "AveragePool"), // no padding: count_include_pad does not matter
    };
    let mut x = "input".to_string();
    for (conv, (c, s)) in [("conv1", ("C1", "S2")), ("conv2", ("C3", "S4"))] {
        let out = format!("{conv}_out");
        nodes.push(node(
            "Conv",
            conv,
            &[&x, &format!("{conv}.weight"), &format!("{conv}.bias")],
            &out,
            vec![ints("kernel_shape", &[5, 5])],
        ));
        nodes.push(node(activation, &format!("{c}_{}", activation.to_lowercase()), &[&out], c, vec![]));
        nodes.push(node(
            pool,
            &format!("{s}_pool"),
            &[c],
            s,
            vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])],
        ));
        x = s.to_string();
    }
    nodes.push(node("Flatten", "flatten", &[&x], "S4_flat", vec![int("axis", 1)])); // (B, 400)
    x = "S4_flat".into();
    for (fc, stage) in [("fc1", Some("F5")), ("fc2", Some("F6")), ("fc3", None)] {
        // Gemm computes x @ W^T + b with W as PyTorch stores it, (out, in): transB = 1.
        let out = stage.map_or("logits".to_string(), |_| format!("{fc}_out"));
        nodes.push(node(
            "Gemm",
            fc,
            &[&x, &format!("{fc}.weight"), &format!("{fc}.bias")],
            &out,
            vec![int("transB", 1)],
        ));
        if let Some(stage) = stage {
            nodes.push(node(activation, &format!("{stage}_{}", activation.to_lowercase()), &[&out], stage, vec![]));
            x = stage.to_string();
        }
    }

    let mut initializer = Vec::new();
    for (name, t) in net.parameters() {
        initializer.push(float_tensor(&name, &t).with_context(|| format!("{name}: cannot be written as ONNX"))?);
    }
    let stage_docs = [
        ("C1", "first convolution, after the activation"),
        ("S2", "C1 subsampled 2x2"),
        ("C3", "second convolution, after the activation"),
        ("S4", "C3 subsampled 2x2"),
        ("F5", "first fully connected layer, after the activation"),
        ("F6", "second fully connected layer, after the activation"),
    ];
    let mut output =
        vec![value_info("logits", &shape("output"), "the 10 classes' logits (the head applies softmax or sigmoid)")];
    output.extend(stage_docs.iter().map(|(stage, doc)| value_info(stage, &shape(stage), doc)));
    let graph = GraphProto {
        name: Some("lenet5".into()),
        node: nodes,
        initializer,
        input: vec![value_info("input", &shape("input"), "normalised images: see the model's metadata")],
        output,
        ..Default::default()
    };
    Ok(ModelProto {
        ir_version: Some(IR_VERSION),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(OPSET) }],
        producer_name: Some("lenet5".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        doc_string: Some(doc(card)),
        graph: Some(graph),
        metadata_props: metadata(card)
            .into_iter()
            .map(|(key, value)| StringStringEntryProto { key: Some(key), value: Some(value) })
            .collect(),
        ..Default::default()
    })
}

fn device_of(net: &LeNet5) -> Device {
    net.parameters().first().map_or(Device::Cpu, |(_, t)| t.device())
}

/// The card's facts, keyed by their path in the card's JSON (`model.arch`, `input.normalization.mean`);
/// strings as they are, numbers and lists as JSON.
pub fn metadata(card: &ModelCard) -> Vec<(String, String)> {
    let n = &card.input.normalization;
    let mut facts = vec![
        ("model.arch", card.model.arch.to_string()),
        ("model.head", card.model.head.to_string()),
        ("dataset", card.dataset.to_string()),
        ("classes", json(&card.classes)),
        ("input.shape", json(&card.input.shape)),
        ("input.pad", json(&card.input.pad)),
        ("input.normalization.mean", json(&n.mean)),
        ("input.normalization.std", json(&n.std)),
    ];
    if let Some(m) = &card.metrics {
        facts.push(("metrics.test_accuracy", json(&m.test_accuracy)));
    }
    facts.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).expect("numbers and lists of strings always serialise")
}

/// What a viewer shows for the model: what goes in, what comes out.
fn doc(card: &ModelCard) -> String {
    let what = match card.model.arch {
        Arch::Modern => "ReLU and 2x2 max-pooling",
        Arch::Classic => "tanh and 2x2 average pooling, as in the 1998 paper",
    };
    let head = match card.model.head {
        Head::Softmax => "softmax over the classes",
        Head::Sigmoid => "one sigmoid per class",
    };
    let n = &card.input.normalization;
    format!(
        "LeNet-5 ({}: {what}) for {}. Input (batch, 1, 32, 32): each 28x28 image scaled to [0, 1], zero-padded by {} \
         and normalised as (x - {}) / {}. Output `logits` (batch, 10), read through a {head}; C1, S2, C3, S4, F5 and F6 \
         are the stages of the forward pass.",
        card.model.arch, card.dataset, card.input.pad, n.mean, n.std
    )
}

fn node(op: &str, name: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute,
        ..Default::default()
    }
}

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: values.to_vec(),
        ..Default::default()
    }
}

fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    }
}

/// A float tensor value `(batch, ...dims)`.
fn value_info(name: &str, dims: &[i64], doc: &str) -> ValueInfoProto {
    use tensor_shape_proto::{dimension::Value, Dimension};
    let batch = Dimension { value: Some(Value::DimParam(BATCH.into())), denotation: None };
    let dim = std::iter::once(batch)
        .chain(dims.iter().map(|&d| Dimension { value: Some(Value::DimValue(d)), denotation: None }));
    let tensor = type_proto::Tensor {
        elem_type: Some(DataType::Float as i32),
        shape: Some(TensorShapeProto { dim: dim.collect() }),
    };
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto { value: Some(type_proto::Value::TensorType(tensor)), denotation: None }),
        doc_string: Some(doc.into()),
        ..Default::default()
    }
}

/// An initializer: float32, little-endian in `raw_data` (what onnx's own numpy_helper writes).
fn float_tensor(name: &str, t: &Tensor) -> Result<TensorProto> {
    let t = t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    let values = Vec::<f32>::try_from(t.flatten(0, -1))?;
    Ok(TensorProto {
        name: Some(name.into()),
        dims: t.size(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    })
}
