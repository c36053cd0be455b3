//! `.pt2` archives of `torch.export.save`, read as data: the program's weights, never its graph.

use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

use super::torch_pickle;

/// `torch.export.save` keeps the program's state dict in `data/weights/`: one raw storage per
/// file, and each tensor's dtype, size, stride and offset in `<model>_weights_config.json`
/// (torch/export/pt2_archive/_package.py; the schema is torch._export.serde.schema.PayloadMeta).
#[derive(serde::Deserialize)]
struct WeightsConfig {
    config: BTreeMap<String, PayloadMeta>,
}

#[derive(serde::Deserialize)]
struct PayloadMeta {
    path_name: String,
    use_pickle: bool,
    tensor_meta: TensorMeta,
}

#[derive(serde::Deserialize)]
struct TensorMeta {
    dtype: i64,
    sizes: Vec<SymInt>,
    strides: Vec<SymInt>,
    storage_offset: SymInt,
}

/// An int of the export schema; a symbolic one (`as_expr`) has no place among weights.
#[derive(serde::Deserialize)]
struct SymInt {
    as_int: i64,
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

/// The weights of a `.pt2` archive of one model, each checked to lie inside its storage.
pub fn read_weights(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut zip = torch_pickle::open_zip(std::fs::File::open(path)?)?;
    let configs: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok())
        .filter(|n| n.split_once('/').is_some_and(|(_, rest)| rest.starts_with("data/weights/") && rest.ends_with("_weights_config.json")))
        .map(|n| n.into_owned())
        .collect();
    let [config] = &configs[..] else { bail!("{} weights configs inside, where one model has one", configs.len()) };
    let folder = config.rsplit_once('/').map_or("", |(folder, _)| folder).to_string();
    let json = torch_pickle::read_entry(&mut zip, config, 64 << 20)?;
    let config: WeightsConfig = serde_json::from_slice(&json).with_context(|| format!("{config} is not what torch.export writes"))?;
    let mut storages = torch_pickle::Storages::default();
    let mut tensors = Vec::with_capacity(config.config.len());
    for (name, meta) in config.config {
        ensure!(!meta.use_pickle, "{name} is stored pickled (a tensor subclass)");
        let kind = export_dtype(meta.tensor_meta.dtype)?;
        let file = meta.path_name;
        if !storages.contains(&file) {
            let data = torch_pickle::read_entry(&mut zip, &format!("{folder}/{file}"), MAX_EXPORT_STORAGE)?;
            storages.insert(&file, kind, &data)?;
        }
        let ints = |v: &[SymInt]| v.iter().map(|i| i.as_int).collect::<Vec<_>>();
        let (size, stride) = (ints(&meta.tensor_meta.sizes), ints(&meta.tensor_meta.strides));
        let tensor = storages.view(&file, &size, &stride, meta.tensor_meta.storage_offset.as_int)?;
        ensure!(tensor.kind() == kind, "{name} is {kind:?} in storage {file} of {:?} items", tensor.kind());
        tensors.push((name, tensor));
    }
    Ok(tensors)
}

/// A storage file of a `.pt2` archive larger than this is not LeNet-5's.
const MAX_EXPORT_STORAGE: u64 = 1 << 30;
