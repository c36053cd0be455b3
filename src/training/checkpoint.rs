//! Training checkpoints: the weights, the optimizer's state and everything else needed to
//! continue the run, in one safetensors file (the run's state rides along as a JSON byte
//! tensor), so a checkpoint is replaced in a single atomic rename and can never disagree
//! with itself.

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::data::DatasetKind;
use crate::formats::card::Provenance;
use crate::model::ModelConfig;
use crate::training::optim::Optimizer;
use crate::training::{TrainConfig, TrainState};

/// The name of the tensor holding the JSON metadata.
const META_TENSOR: &str = "__lenet5_checkpoint__";
/// The prefix of the optimizer's state tensors (`optimizer.conv1.weight.exp_avg`).
const OPTIMIZER_PREFIX: &str = "optimizer.";
const FORMAT: &str = "lenet5-checkpoint";
/// 2: the optimizer's state and the schedule's position are saved.
const VERSION: u32 = 2;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: String,
    pub format_version: u32,
    pub model: ModelConfig,
    pub dataset: DatasetKind,
    pub data_dir: Option<PathBuf>,
    pub config: TrainConfig,
    pub checkpoint_every: Option<usize>,
    pub state: TrainState,
    pub provenance: Provenance,
}

impl CheckpointMeta {
    pub fn new(
        model: ModelConfig,
        dataset: DatasetKind,
        data_dir: Option<PathBuf>,
        config: TrainConfig,
        checkpoint_every: Option<usize>,
    ) -> CheckpointMeta {
        CheckpointMeta {
            format: FORMAT.into(),
            format_version: VERSION,
            model,
            dataset,
            data_dir,
            // The run fills in its invocation (see `run::train`).
            provenance: Provenance::here(Some(config.seed), vec![]),
            config,
            checkpoint_every,
            state: TrainState::default(),
        }
    }
}

/// What a checkpoint holds besides its metadata.
pub struct Saved {
    /// The model's weights, by PyTorch name.
    pub weights: Vec<(String, Tensor)>,
    /// The optimizer's state, as [`Optimizer::state_tensors`] names it.
    pub optimizer: Vec<(String, Tensor)>,
}

/// Writes the weights of `vs`, the state of `optimizer` and `meta` to `path`, atomically.
pub fn save(path: &Path, vs: &VarStore, optimizer: &Optimizer, meta: &CheckpointMeta) -> Result<()> {
    let json = serde_json::to_vec(meta).expect("checkpoint metadata always serialises");
    let state = optimizer.state_tensors().into_iter().map(|(k, t)| (format!("{OPTIMIZER_PREFIX}{k}"), t));
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .chain(state)
        .map(|(k, t)| (k, t.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named.push((META_TENSOR.into(), Tensor::from_slice(&json)));
    crate::atomic::write_with(path, |tmp| {
        Tensor::write_safetensors(&named, tmp).map_err(|e| anyhow::anyhow!("{}: {e}", tmp.display()))
    })
}

/// Reads a checkpoint: its metadata, the weights and the optimizer's state.
pub fn load(path: &Path) -> Result<(CheckpointMeta, Saved)> {
    let name = path.display();
    ensure!(path.is_file(), "{name}: no checkpoint there (train writes one at the end of every epoch)");
    let mut tensors = Tensor::read_safetensors(path).map_err(|e| {
        anyhow::anyhow!("{name}: not a readable checkpoint ({})", e.to_string().lines().next().unwrap_or(""))
    })?;
    let at = tensors
        .iter()
        .position(|(k, _)| k == META_TENSOR)
        .with_context(|| format!("{name}: safetensors without lenet5 checkpoint metadata"))?;
    let (_, meta) = tensors.swap_remove(at);
    ensure!(meta.kind() == Kind::Uint8 && meta.dim() == 1, "{name}: damaged checkpoint metadata");
    let bytes = Vec::<u8>::try_from(&meta).with_context(|| format!("{name}: damaged checkpoint metadata"))?;
    let meta: CheckpointMeta =
        serde_json::from_slice(&bytes).with_context(|| format!("{name}: damaged checkpoint metadata"))?;
    ensure!(
        meta.format == FORMAT && meta.format_version == VERSION,
        "{name}: checkpoint format {} v{} is not {FORMAT} v{VERSION}{}",
        meta.format,
        meta.format_version,
        if meta.format == FORMAT && meta.format_version < VERSION {
            " (written by an older lenet5 that could not save the optimizer's state; start the run afresh)"
        } else {
            ""
        }
    );
    let (optimizer, weights): (Vec<_>, Vec<_>) =
        tensors.into_iter().partition(|(k, _)| k.starts_with(OPTIMIZER_PREFIX));
    let optimizer = optimizer.into_iter().map(|(k, t)| (k[OPTIMIZER_PREFIX.len()..].to_string(), t)).collect();
    Ok((meta, Saved { weights, optimizer }))
}

#[cfg(test)]
mod tests {
    use crate::training::optim::Hyper;
    use crate::training::schedule::ScheduleState;

    /// OneCycleLR's last momentum of a 150-step run, which serde_json's default float parser
    /// reads back as 0.9499776216141752: the resumed run would go on with another beta1.
    #[test]
    fn the_schedules_position_reads_back_bit_for_bit() {
        let position =
            ScheduleState { last_epoch: 150, hyper: Hyper { lr: 6.83348889338717e-7, momentum: 0.9499776216141751 } };
        let back: ScheduleState = serde_json::from_slice(&serde_json::to_vec(&position).unwrap()).unwrap();
        assert_eq!(back.hyper.momentum.to_bits(), position.hyper.momentum.to_bits());
        assert_eq!(back, position);
    }
}
