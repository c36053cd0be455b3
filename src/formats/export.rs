//! Export for PyTorch users: `NAME.pt` (TorchScript traced from the Rust model),
//! `NAME.safetensors` (the state dict), `NAME.check.safetensors` (inputs and the logits Rust
//! computed for them), `NAME.onnx` (for onnxruntime and viewers), `NAME.pt2` (a torch.export
//! archive) and `NAME.json` (the model card, with the files' SHA-256).

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use tch::nn::{Module, VarStore};
use tch::{CModule, Device, Kind, Tensor};

use crate::data::DatasetKind;
use crate::formats::card::{sha256_file, FileEntry, ModelCard, Provenance};
use crate::formats::weights::save_safetensors;
use crate::inference::Model;
use crate::model::{parameter_count, LeNet5, INPUT_SIZE};

/// `DIR/NAME` + `.ext`, keeping any dots already in NAME.
pub fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// A CPU, frozen copy of the model: what gets traced and what computes the check logits.
fn cpu_copy(vs: &VarStore, net: &LeNet5) -> Result<(VarStore, LeNet5)> {
    let mut cpu = VarStore::new(Device::Cpu);
    let copy = LeNet5::zeros(&cpu.root(), net.config); // copied in next; draws nothing
    cpu.copy(vs).context("copying the weights to the CPU")?;
    cpu.freeze();
    Ok((cpu, copy))
}

/// Exports a loaded model as `lenet5 export` does: its card (or a new one for `dataset`, the
/// card's data set otherwise) with the provenance of `invocation`, checked on the first
/// [`CHECK_BATCH`] test images from `data_dir` (the data set's default folder if None).
pub fn export_loaded(
    model: &Model,
    dataset: DatasetKind,
    data_dir: Option<&Path>,
    prefix: &Path,
    ot: bool,
    invocation: Vec<String>,
) -> Result<ModelCard> {
    let (vs, net) = model.require_lenet5("export needs weights (safetensors, state dict or .ot)")?;
    // Checked before any work, so a typo in the folder makes nothing, not a new folder.
    let folder = prefix.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    crate::check_setting!(folder.is_dir(), "out", prefix.display(), "the folder {} does not exist", folder.display());
    let card = model.card();
    let dataset = card.map(|c| c.dataset).unwrap_or(dataset);
    let check_inputs = crate::data::load_test(dataset, data_dir, dataset.normalization())?.inputs_range(0, CHECK_BATCH);
    let mut card =
        card.cloned().unwrap_or_else(|| ModelCard::new(net.config, dataset, parameter_count(vs), None, vec![]));
    card.provenance = Provenance { seed: card.provenance.seed, ..Provenance::here(None, invocation) };
    card.files.clear();
    export(vs, net, &card, prefix, &check_inputs, ot)
}

/// The first test images: the fixed batch whose logits every export records.
pub const CHECK_BATCH: i64 = 64;

/// Writes the export files for `prefix` and returns the card, which it also writes.
/// `check_inputs` is a normalised batch `(B, 1, 32, 32)` whose logits go into the check file.
pub fn export(
    vs: &VarStore,
    net: &LeNet5,
    card: &ModelCard,
    prefix: &Path,
    check_inputs: &Tensor,
    ot: bool,
) -> Result<ModelCard> {
    let (cpu_vs, cpu_net) = cpu_copy(vs, net)?;
    let mut card = card.clone();
    // Collected apart from `card`, which writers read (the ONNX file's metadata).
    let mut files = std::mem::take(&mut card.files);
    let mut record = |role: &str, path: &Path| -> Result<()> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        files.insert(role.into(), FileEntry { name, sha256: sha256_file(path)? });
        Ok(())
    };

    let weights = with_suffix(prefix, ".safetensors");
    save_safetensors(&cpu_vs, &weights)?;
    record("weights", &weights)?;

    let torchscript = with_suffix(prefix, ".pt");
    let example = Tensor::zeros([1, 1, INPUT_SIZE, INPUT_SIZE], (Kind::Float, Device::Cpu));
    // Traced in eval mode on CPU: the weights become constants of the graph, which is
    // independent of the batch size (`flatten` and `linear` are traced as ops, not shapes).
    let module = tch::no_grad(|| {
        CModule::create_by_tracing("LeNet5", "forward", &[example], &mut |xs| vec![cpu_net.forward(&xs[0])])
    })
    .context("tracing the model to TorchScript")?;
    crate::atomic::write_with(&torchscript, |tmp| module.save(tmp).map_err(|e| anyhow::anyhow!("{e}")))?;
    record("torchscript", &torchscript)?;

    let check = with_suffix(prefix, ".check.safetensors");
    let inputs = check_inputs.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    let logits = tch::no_grad(|| cpu_net.forward(&inputs));
    crate::atomic::write_with(&check, |tmp| {
        Tensor::write_safetensors(&[("inputs", &inputs), ("logits", &logits)], tmp).map_err(|e| anyhow::anyhow!("{e}"))
    })?;
    record("check", &check)?;

    let onnx = with_suffix(prefix, ".onnx");
    crate::formats::onnx::write(&cpu_net, &card, &onnx)?;
    record("onnx", &onnx)?;

    let torch_export = with_suffix(prefix, ".pt2");
    // Two of the check images as its sample inputs: torch.export's own smallest dynamic batch.
    crate::formats::pt2::write(&torch_export, &cpu_net, &inputs.narrow(0, 0, inputs.size()[0].min(2)))?;
    record("torch_export", &torch_export)?;

    if ot {
        let archive = with_suffix(prefix, ".ot");
        crate::atomic::write_with(&archive, |tmp| cpu_vs.save(tmp).map_err(|e| anyhow::anyhow!("{e}")))?;
        record("tch_archive", &archive)?;
    }

    card.files = files;
    card.write(&with_suffix(prefix, ".json"))?;
    Ok(card)
}
