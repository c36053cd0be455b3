//! Model files in every format people have, recognised by content (a `.pt` may be a state
//! dict, a checkpoint, a pickled module or TorchScript), and state dicts checked whole before
//! anything is copied.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::formats::torch_pickle::{self, ModelPickle, Value};

/// What a model file turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A safetensors file (what this program writes).
    Safetensors,
    /// `torch.save(...)`: a zip holding a pickle and raw tensor data. Weights are read from a
    /// state dict, a checkpoint dict holding one, or a whole pickled `nn.Module`, as data.
    TorchSave,
    /// `torch.export.save(ep, path)` (`.pt2`, and this program's export): the program's graph,
    /// which is not run, and its state dict (raw storages, or one pickle per tensor), which is read.
    TorchExport,
    /// `torch.jit.script(model).save(path)` or a traced module: a zip with `code/`.
    TorchScript,
    /// tch's own `VarStore::save` format (`.ot`): a libtorch archive with `|` in names.
    TchArchive,
    /// An ONNX model (`NAME.onnx`, or `torch.onnx.export`'s): its initializers are read by the
    /// layers that use them; the graph is not run.
    Onnx,
}

impl Format {
    pub fn describe(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::TorchSave => "PyTorch torch.save file",
            Format::TorchExport => "torch.export archive (.pt2)",
            Format::TorchScript => "TorchScript module",
            Format::TchArchive => "tch archive (.ot)",
            Format::Onnx => "ONNX model",
        }
    }
}

/// Recognises a model file from its first bytes and, for zips, the names inside.
pub fn detect(path: &Path) -> Result<Format> {
    let name = path.display();
    let mut file = std::fs::File::open(path).with_context(|| format!("{name}: cannot open"))?;
    let mut head = [0u8; 9];
    let n = file.read(&mut head).with_context(|| format!("{name}: cannot read"))?;
    if n == 0 {
        bail!("{name}: the file is empty");
    }
    // safetensors: a little-endian u64 header length, then the JSON header. A length beyond
    // the file still says "safetensors" (a truncated one), and reading it says what is wrong.
    if n == 9 && head[8] == b'{' && u64::from_le_bytes(head[..8].try_into().expect("8 bytes")) < 100 << 20 {
        return Ok(Format::Safetensors);
    }
    if !head.starts_with(b"PK\x03\x04") {
        // Protobuf has no magic bytes: ONNX is what decodes as a model with a graph.
        match super::onnx::sniff(path)? {
            super::onnx::Sniff::Onnx => return Ok(Format::Onnx),
            super::onnx::Sniff::Damaged(why) => bail!("{name}: {why}"),
            super::onnx::Sniff::Other => {}
        }
        bail!(
            "{name}: not a model file this program reads (expected safetensors, a torch.save zip, \
             TorchScript, a tch .ot or ONNX; it starts with bytes {:02x?})",
            &head[..n.min(4)]
        );
    }
    let mut zip = torch_pickle::open_zip(std::fs::File::open(path)?)
        .with_context(|| format!("{name}: a damaged or truncated zip archive"))?;
    // Every PyTorch archive keeps its entries under one top-level folder.
    let entries: Vec<String> = zip.file_names().filter_map(|n| n.ok().map(|n| n.into_owned())).collect();
    let find = |suffix: &str| entries.iter().find(|e| e.split_once('/').is_some_and(|(_, rest)| rest == suffix));
    if find("archive_format").is_some() && entries.iter().any(|e| e.contains("/data/weights/")) {
        return Ok(Format::TorchExport);
    }
    if find("data.pkl").is_none() {
        bail!("{name}: a zip file, but not a PyTorch one (no data.pkl inside)");
    }
    let Some(code): Option<String> =
        find("code/__torch__.py").or_else(|| entries.iter().find(|e| e.contains("/code/"))).cloned()
    else {
        return Ok(Format::TorchSave); // torch.save: pickle and tensor data only
    };
    // tch's VarStore::save writes a libtorch serialize::OutputArchive: a TorchScript
    // container class named `Module` whose parameters are the tensors, `.` spelt `|`.
    let mut source = String::new();
    zip.by_name(&code)
        .ok()
        .and_then(|f| f.take(1 << 20).read_to_string(&mut source).ok())
        .with_context(|| format!("{name}: cannot read {code} inside the archive"))?;
    if source.starts_with("class Module(Module):") && !source.contains("def forward") {
        Ok(Format::TchArchive)
    } else {
        Ok(Format::TorchScript)
    }
}

/// A renaming rule for foreign state dicts: `old=new` replaces a leading dotted prefix
/// (`model=` strips `model.`, `features.0=conv1` renames `features.0.weight` to `conv1.weight`).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyMap {
    pub old: String,
    pub new: String,
}

impl std::str::FromStr for KeyMap {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (old, new) = s.split_once('=').ok_or_else(|| format!("expected OLD=NEW, got {s:?}"))?;
        if old.is_empty() {
            return Err(format!("the OLD part of {s:?} is empty"));
        }
        Ok(KeyMap { old: old.trim_end_matches('.').into(), new: new.trim_end_matches('.').into() })
    }
}

/// Applies the first matching rule to `key`, on whole dotted components.
pub fn rename(key: &str, maps: &[KeyMap]) -> String {
    for m in maps {
        let rest = if key == m.old { Some("") } else { key.strip_prefix(&format!("{}.", m.old)) };
        if let Some(rest) = rest {
            return match (m.new.is_empty(), rest.is_empty()) {
                (true, _) => rest.to_string(),
                (false, true) => m.new.clone(),
                (false, false) => format!("{}.{rest}", m.new),
            };
        }
    }
    key.to_string()
}

/// Tensors by their PyTorch names, as a state dict holds them.
pub type NamedTensors = Vec<(String, Tensor)>;

/// Reads the named tensors of a state-dict-like file onto the CPU, names in PyTorch form
/// (DataParallel's `module.` prefix dropped), with notes saying where they were found.
pub fn read_tensors(path: &Path, format: Format) -> Result<(NamedTensors, Vec<String>)> {
    let name = path.display();
    let mut notes = Vec::new();
    let tensors = match format {
        Format::Safetensors => Tensor::read_safetensors(path),
        // libtorch's unpickler cannot read state_dict()'s OrderedDict; ours names its errors.
        Format::TorchSave => Ok(torch_save_tensors(path, &mut notes)?),
        Format::TorchExport => {
            let tensors = super::pt2::read_weights(path)
                .map_err(|e| anyhow::anyhow!("{name}: cannot read the torch.export archive: {e:#}"))?;
            notes.push(format!("{name}: a torch.export archive; its weights are read, its graph is not run"));
            Ok(tensors)
        }
        Format::TchArchive => Tensor::load_multi_with_device(path, Device::Cpu),
        Format::Onnx => {
            let (tensors, onnx_notes) = super::onnx::read_weights(path)?;
            notes.extend(onnx_notes);
            Ok(tensors)
        }
        Format::TorchScript => bail!("{name}: a TorchScript module, not a state dict"),
    }
    .map_err(|e| anyhow::anyhow!("{name}: cannot read the {} ({})", format.describe(), first_line(&e.to_string())))?;
    // tch writes `conv1|weight` because libtorch archives reserve '.'.
    let tensors: Vec<(String, Tensor)> = tensors.into_iter().map(|(k, t)| (k.replace('|', "."), t)).collect();
    // DataParallel and DistributedDataParallel keep the model as their `module`.
    let prefix = "module.";
    if !tensors.is_empty() && tensors.iter().all(|(k, _)| k.starts_with(prefix)) {
        notes.push(format!("{name}: every key starts with '{prefix}' (DataParallel); reading them without it"));
        return Ok((tensors.into_iter().map(|(k, t)| (k[prefix.len()..].to_string(), t)).collect(), notes));
    }
    Ok((tensors, notes))
}

/// Where notebooks keep the model's weights in a checkpoint dict, most specific first
/// (PyTorch's tutorial writes `model_state_dict`).
const CHECKPOINT_KEYS: [&str; 4] = ["model_state_dict", "state_dict", "model", "net"];

/// The weights in a torch.save file, read as data (nothing in it runs): a state dict, a
/// checkpoint dict holding one under a [`CHECKPOINT_KEYS`] entry, or a whole pickled module.
fn torch_save_tensors(path: &Path, notes: &mut Vec<String>) -> Result<Vec<(String, Tensor)>> {
    let name = path.display();
    let ModelPickle { value, modules } = torch_pickle::read_model(path)?;
    let value = match value.into_state_dict() {
        Ok(tensors) => {
            if let Some(class) = modules.first() {
                notes.push(format!(
                    "{name}: a whole pickled {class}; its parameters and buffers read as data, nothing in it run"
                ));
            }
            return Ok(tensors);
        }
        Err(value) => value,
    };
    let Value::Dict(mut items) = value else {
        bail!("{name}: holds {}, not a state dict, a checkpoint dict or a pickled module", value.type_name())
    };
    for key in CHECKPOINT_KEYS {
        let Some(i) = items.iter().position(|(k, v)| k.as_str() == Some(key) && v.as_state_dict().is_some()) else {
            continue;
        };
        notes.push(format!("{name}: weights from its '{key}' entry"));
        return items
            .swap_remove(i)
            .1
            .into_state_dict()
            .map_err(|v| anyhow::anyhow!("{name}: '{key}' holds {}", v.type_name()));
    }
    let keys: Vec<String> = items.iter().take(12).map(|(k, _)| k.key_repr()).collect();
    bail!(
        "{name}: holds a dict that is neither a state dict nor a checkpoint with one under {} (keys: {}{})",
        CHECKPOINT_KEYS.map(|k| format!("'{k}'")).join(", "),
        keys.join(", "),
        if items.len() > keys.len() { ", …" } else { "" }
    )
}

/// libtorch errors carry a C++ backtrace (and TorchScript ones a script traceback) after
/// the reason; users need only the reason: the `...Error: ` line if there is one, else the
/// first line.
pub fn first_line(s: &str) -> &str {
    let reason = s.lines().rev().find_map(|l| l.split_once("Error: ").map(|(_, r)| r.trim()));
    reason
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| s.lines().find(|l| !l.trim().is_empty()).unwrap_or(s).trim())
        .trim_start_matches("Internal torch error: ")
}

/// Checks a whole state dict against `vs` and copies it in only if every tensor fits:
/// same names, same shapes, floating-point data (see [`check_state_dict`] for what it says
/// otherwise).
pub fn load_state_dict(vs: &mut VarStore, tensors: Vec<(String, Tensor)>, maps: &[KeyMap], source: &str) -> Result<()> {
    let given: BTreeMap<String, Tensor> = tensors.into_iter().map(|(k, t)| (rename(&k, maps), t)).collect();
    let wanted: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    let shapes: Vec<(String, Vec<i64>)> = wanted.iter().map(|(name, var)| (name.clone(), var.size())).collect();
    check_state_dict(&shapes, &given, true, source)?;
    tch::no_grad(|| {
        for (name, mut var) in wanted {
            var.copy_(&given[&name].to_kind(Kind::Float).to_device(var.device()));
        }
    });
    Ok(())
}

/// The names a state dict lacks and the names it has besides the model's, as
/// [`check_state_dict`] found them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateDictFit {
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
}

/// Checks a whole state dict (`given`) against the tensors a model wants (names and shapes)
/// before anything is copied. A tensor of the wrong shape or dtype (not floating point) is an
/// error, and so, when `strict`, is a missing or an unexpected one; the error says what does
/// not fit in a few lines: missing and unexpected tensors grouped, the first wrongly shaped or
/// typed ones in full. Otherwise it returns the missing and unexpected names (PyTorch's
/// `load_state_dict(strict=False)` reports them).
pub fn check_state_dict(
    wanted: &[(String, Vec<i64>)],
    given: &BTreeMap<String, Tensor>,
    strict: bool,
    source: &str,
) -> Result<StateDictFit> {
    let mut wanted: Vec<&(String, Vec<i64>)> = wanted.iter().collect();
    wanted.sort_by(|a, b| a.0.cmp(&b.0));
    let (mut missing, mut wrong) = (Vec::new(), Vec::new());
    for (name, shape) in &wanted {
        match given.get(name) {
            None => missing.push(name.clone()),
            Some(t) if t.size() != *shape => {
                wrong.push(format!("wrong shape for {name}: expected {shape:?}, got {:?}", t.size()))
            }
            Some(t) if !t.is_floating_point() => {
                wrong.push(format!("wrong dtype for {name}: {:?}, expected a floating-point tensor", t.kind()))
            }
            Some(_) => {}
        }
    }
    let unexpected: Vec<String> = given.keys().filter(|k| !wanted.iter().any(|(w, _)| w == *k)).cloned().collect();
    let fit = StateDictFit { missing, unexpected };
    if wrong.is_empty() && (!strict || (fit.missing.is_empty() && fit.unexpected.is_empty())) {
        return Ok(fit);
    }
    const SHOWN: usize = 4; // names per line, and wrongly shaped or typed tensors in full
    let mut lines = Vec::new();
    if strict && !fit.missing.is_empty() {
        let shown: Vec<String> = fit
            .missing
            .iter()
            .map(|k| format!("{k} {:?}", wanted.iter().find(|(w, _)| w == k).expect("a wanted name").1))
            .collect();
        lines.push(group("missing", &shown, SHOWN));
    }
    if strict && !fit.unexpected.is_empty() {
        let unexpected = &fit.unexpected;
        let shown: Vec<String> = unexpected.iter().map(|k| format!("{k} {:?}", given[k].size())).collect();
        let mut line = group("unexpected", &shown, SHOWN);
        let mut folders: Vec<&str> = unexpected.iter().filter_map(|k| k.split_once('.').map(|(p, _)| p)).collect();
        folders.dedup(); // sorted already: the keys come from a BTreeMap
        if unexpected.len() > SHOWN && !folders.is_empty() {
            let under: Vec<String> = folders.iter().take(SHOWN).map(|p| format!("{p}.*")).collect();
            line += &format!(" (under {}{})", under.join(", "), if folders.len() > SHOWN { ", …" } else { "" });
        }
        lines.push(line);
    }
    lines.extend(wrong.iter().take(SHOWN).cloned());
    if wrong.len() > SHOWN {
        lines.push(format!("and {} more of the wrong shape or dtype", wrong.len() - SHOWN));
    }
    let message = format!("{source}: the state dict does not fit LeNet-5:\n  {}", lines.join("\n  "));
    // The key-map suggestion answers missing names; a loose check reports those, not refuses them.
    match common_prefix(given.keys()).filter(|_| strict) {
        Some(p) => Err(anyhow::Error::new(crate::setting::Suggestion {
            name: "key_maps",
            value: format!("{p}="),
            reason: format!("every key starts with '{p}.'"),
        })
        .context(message)),
        None => Err(anyhow::anyhow!(message)),
    }
}

/// `missing fc2.bias [84]`, or `missing 6 tensors: a [..], b [..], … and 2 more`.
fn group(what: &str, items: &[String], shown: usize) -> String {
    match items {
        [one] => format!("{what} {one}"),
        _ => {
            let more =
                if items.len() > shown { format!(" … and {} more", items.len() - shown) } else { String::new() };
            format!("{what} {} tensors: {}{more}", items.len(), items[..items.len().min(shown)].join(", "))
        }
    }
}

/// The first component every key shares, like `model` or `module`, which a key map `P=` strips.
fn common_prefix<'a>(mut keys: impl Iterator<Item = &'a String>) -> Option<String> {
    let first = keys.next().and_then(|k| k.split_once('.')).map(|(p, _)| p.to_string());
    first.filter(|p| !p.starts_with("conv") && !p.starts_with("fc") && keys.all(|k| k.starts_with(&format!("{p}."))))
}

/// Writes the variables of `vs` as safetensors with their PyTorch names, atomically.
pub fn save_safetensors(vs: &VarStore, path: &Path) -> Result<()> {
    let mut named: Vec<(String, Tensor)> =
        vs.variables().into_iter().map(|(k, t)| (k, t.detach().to_device(Device::Cpu).contiguous())).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    crate::atomic::write_with(path, |tmp| {
        Tensor::write_safetensors(&named, tmp).with_context(|| format!("{}: cannot write safetensors", tmp.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Head, LeNet5, ModelConfig};

    #[test]
    fn key_maps_rename_whole_components() {
        let maps: Vec<KeyMap> =
            ["model=", "features.0=conv1", "classifier.4.=fc3"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(rename("model.conv1.weight", &maps), "conv1.weight");
        assert_eq!(rename("features.0.bias", &maps), "conv1.bias");
        assert_eq!(rename("features.01.bias", &maps), "features.01.bias");
        assert_eq!(rename("classifier.4.weight", &maps), "fc3.weight");
        assert_eq!(rename("modelx.weight", &maps), "modelx.weight");
        assert!("=x".parse::<KeyMap>().is_err());
        assert!("nothing".parse::<KeyMap>().is_err());
    }

    #[test]
    fn a_state_dict_that_does_not_fit_is_refused_whole_with_every_problem_named() {
        let config = ModelConfig { arch: crate::model::Arch::Modern, head: Head::Softmax };
        let mut vs = VarStore::new(Device::Cpu);
        let _net = LeNet5::new(&vs.root(), config);
        let before = vs.variables()["conv1.weight"].copy();
        let mut tensors: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(k, t)| (k, t.zeros_like())).collect();
        tensors.retain(|(k, _)| k != "fc2.bias");
        for (k, t) in tensors.iter_mut() {
            if k == "fc1.weight" {
                *t = Tensor::zeros([120, 256], (Kind::Float, Device::Cpu));
            }
            if k == "fc3.bias" {
                *t = Tensor::zeros([10], (Kind::Int64, Device::Cpu));
            }
        }
        tensors.push(("bn.running_mean".into(), Tensor::zeros([6], (Kind::Float, Device::Cpu))));
        let err = load_state_dict(&mut vs, tensors, &[], "f.pt").unwrap_err().to_string();
        for expected in [
            "missing fc2.bias [84]",
            "wrong shape for fc1.weight: expected [120, 400], got [120, 256]",
            "wrong dtype for fc3.bias: Int64",
            "unexpected bn.running_mean [6]",
        ] {
            assert!(err.contains(expected), "{expected:?} not in {err}");
        }
        assert!(err.starts_with("f.pt: "));
        // Nothing was half-loaded: conv1.weight (which did fit) still holds its old values.
        assert!(vs.variables()["conv1.weight"].equal(&before));
    }

    #[test]
    fn a_loose_check_reports_missing_and_unexpected_names_but_refuses_wrong_shapes() {
        let wanted: Vec<(String, Vec<i64>)> =
            crate::model::PARAMETERS.iter().map(|(n, s)| (n.to_string(), s.to_vec())).collect();
        let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
        let mut given: BTreeMap<String, Tensor> = wanted.iter().map(|(n, s)| (n.clone(), zeros(s))).collect();
        given.remove("fc2.bias");
        given.insert("extra.weight".into(), zeros(&[2]));
        let fit = check_state_dict(&wanted, &given, false, "d").unwrap();
        assert_eq!(fit, StateDictFit { missing: vec!["fc2.bias".into()], unexpected: vec!["extra.weight".into()] });
        let strict = check_state_dict(&wanted, &given, true, "d").unwrap_err().to_string();
        assert!(strict.contains("missing fc2.bias [84]") && strict.contains("unexpected extra.weight [2]"), "{strict}");
        given.insert("fc1.bias".into(), zeros(&[7]));
        let loose = check_state_dict(&wanted, &given, false, "d").unwrap_err().to_string();
        assert_eq!(
            loose,
            "d: the state dict does not fit LeNet-5:\n  wrong shape for fc1.bias: expected [120], got [7]"
        );
    }

    #[test]
    fn a_state_dict_of_another_layout_is_summed_up_in_a_few_lines() {
        let config = ModelConfig { arch: crate::model::Arch::Modern, head: Head::Softmax };
        let mut vs = VarStore::new(Device::Cpu);
        let _net = LeNet5::new(&vs.root(), config);
        let zeros = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu));
        // An nn.Sequential notebook model: 10 tensors, all under other names.
        let sequential: Vec<(String, Tensor)> = (0..5)
            .flat_map(|i| {
                [
                    (format!("{}.{i}.weight", if i < 2 { "features" } else { "classifier" }), zeros(3)),
                    (format!("classifier.{i}.bias"), zeros(3)),
                ]
            })
            .collect();
        let err = load_state_dict(&mut vs, sequential, &[], "seq.pt").unwrap_err().to_string();
        assert!(err.lines().count() <= 4, "{err}");
        assert!(err.contains("missing 10 tensors: conv1.bias [6], conv1.weight [6, 1, 5, 5], conv2.bias [16], conv2.weight [16, 6, 5, 5] … and 6 more"), "{err}");
        assert!(err.contains("unexpected 10 tensors: classifier.0.bias [3], classifier.1.bias [3], classifier.2.bias [3], classifier.2.weight [3] … and 6 more (under classifier.*, features.*)"), "{err}");
        // Every tensor there but of the wrong shape: the first few named in full, then a count.
        let shapes: Vec<(String, Tensor)> = vs.variables().into_keys().map(|k| (k, zeros(1))).collect();
        let err = load_state_dict(&mut vs, shapes, &[], "small.pt").unwrap_err().to_string();
        assert_eq!(err.lines().count(), 1 + 4 + 1, "{err}");
        assert!(
            err.contains("wrong shape for conv1.bias: expected [6], got [1]")
                && err.ends_with("and 6 more of the wrong shape or dtype"),
            "{err}"
        );
    }
}
