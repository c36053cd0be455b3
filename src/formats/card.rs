//! The model card: the JSON file saved beside every set of weights, saying what the model is
//! (so it can be rebuilt from the card alone), how well it did, and where it came from.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::data::{DatasetKind, Normalization, PAD};
use crate::model::{ModelConfig, INPUT_SIZE};

/// Bumped whenever a field changes meaning; readers refuse versions they do not know.
pub const CARD_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelCard {
    pub format: String,
    pub format_version: u32,
    pub model: ModelConfig,
    pub dataset: DatasetKind,
    pub classes: Vec<String>,
    pub input: InputSpec,
    pub parameters: i64,
    /// Test-set metrics of these weights, when they were measured.
    pub metrics: Option<CardMetrics>,
    /// The training recipe, when this program trained the weights.
    pub training: Option<serde_json::Value>,
    pub provenance: Provenance,
    /// Files written with the card, by role (`weights`, `torchscript`, `check`), with checksums.
    #[serde(default)]
    pub files: std::collections::BTreeMap<String, FileEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InputSpec {
    /// `[channels, height, width]` of one normalised input.
    pub shape: [i64; 3],
    /// Zero padding added around each 28x28 image before normalising.
    pub pad: i64,
    pub normalization: Normalization,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CardMetrics {
    pub test_accuracy: f64,
    pub test_loss: f64,
    pub test_correct: i64,
    pub test_total: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Provenance {
    pub lenet5_version: String,
    pub tch_version: String,
    pub libtorch_version: String,
    /// The invocation its shell handed in: the CLI's argv, or the Python call as one string.
    pub command_line: Vec<String>,
    /// Seconds since the Unix epoch when the card was written.
    pub created_unix: u64,
    pub seed: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    pub name: String,
    pub sha256: String,
}

impl Provenance {
    /// This build's versions and the time, for a card written on `invocation`.
    pub fn here(seed: Option<i64>, invocation: Vec<String>) -> Provenance {
        Provenance {
            lenet5_version: env!("CARGO_PKG_VERSION").to_string(),
            tch_version: crate::TCH_VERSION.to_string(),
            libtorch_version: crate::LIBTORCH_VERSION.to_string(),
            command_line: invocation,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            seed,
        }
    }
}

impl ModelCard {
    pub fn new(
        model: ModelConfig,
        dataset: DatasetKind,
        parameters: i64,
        seed: Option<i64>,
        invocation: Vec<String>,
    ) -> ModelCard {
        ModelCard {
            format: "lenet5-model".into(),
            format_version: CARD_VERSION,
            model,
            dataset,
            classes: dataset.class_names(),
            input: InputSpec { shape: [1, INPUT_SIZE, INPUT_SIZE], pad: PAD, normalization: dataset.normalization() },
            parameters,
            metrics: None,
            training: None,
            provenance: Provenance::here(seed, invocation),
            files: Default::default(),
        }
    }

    pub fn read(path: &Path) -> Result<ModelCard> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let card: ModelCard =
            serde_json::from_str(&text).with_context(|| format!("{}: not a lenet5 model card", path.display()))?;
        anyhow::ensure!(
            card.format == "lenet5-model" && card.format_version == CARD_VERSION,
            "{}: model card format {} v{} is not lenet5-model v{CARD_VERSION}",
            path.display(),
            card.format,
            card.format_version
        );
        Ok(card)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("a card always serialises");
        crate::atomic::write(path, text.as_bytes())
    }
}

/// Lower-case hex SHA-256 of a file's bytes.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}
