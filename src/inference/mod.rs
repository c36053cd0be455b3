//! Running a trained LeNet-5: one model type that loads any supported file and runs it in
//! either engine, its evaluation on a test set, and ranked predictions.

pub mod evaluate;
pub mod predict;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tch::nn::{Module, VarStore};
use tch::{CModule, Device, Tensor};

use crate::direct::{DirectNet, LentThreads};
use crate::formats::card::ModelCard;
use crate::formats::weights::{detect, first_line, load_state_dict, read_tensors, Format, KeyMap};
use crate::model::{Arch, Head, LeNet5, ModelConfig};
use crate::setting;
use crate::training::run::MODEL_NAME;

/// What runs LeNet-5: the forward pass of a loaded model, or a training run's steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// libtorch: the same numbers as PyTorch, bit for bit.
    #[default]
    Libtorch,
    /// Plain Rust loops on the CPU (`direct`): many times faster for single images and small
    /// batches; logits within 1e-5 (relative) of libtorch's, and so are its gradients.
    Direct,
}

crate::named_values!(Engine { Libtorch => "libtorch", Direct => "direct" });

/// What computes a loaded model's forward pass.
#[expect(clippy::large_enum_variant, reason = "one per model, moved rarely: a box would buy nothing")]
enum Runner {
    /// Our LeNet-5; `direct` holds its weights in the direct engine's layouts while that
    /// engine runs it (a Model's weights do not change after loading), and libtorch's threads
    /// lent to it.
    Native { vs: VarStore, net: LeNet5, direct: Option<(DirectNet, LentThreads)> },
    /// A TorchScript module, run as it is.
    Script(CModule),
}

/// A model ready to run: our LeNet-5 with its weights, or a TorchScript module as it is.
pub struct Model {
    runner: Runner,
    head: Head,
    card: Option<ModelCard>,
    /// The file it was read from, if any.
    path: Option<PathBuf>,
    /// What loading noticed and the user may want to know ("weights from its 'model' entry").
    notes: Vec<String>,
}

/// The parts of a native model, for callers that run them their own way (the web server).
pub struct NativeParts {
    pub vs: VarStore,
    pub net: LeNet5,
    /// The direct engine, and libtorch's threads lent to it until it is dropped.
    pub direct: Option<(DirectNet, LentThreads)>,
}

impl Model {
    /// Our LeNet-5 with the weights in `vs`, run by libtorch.
    pub fn native(vs: VarStore, net: LeNet5, card: Option<ModelCard>) -> Model {
        let head = net.config.head;
        Model { runner: Runner::Native { vs, net, direct: None }, head, card, path: None, notes: vec![] }
    }

    /// Loads any supported model file onto `device` (see [`model_file`] for what `path` may
    /// name), run by libtorch.
    pub fn load(path: &Path, options: &LoadOptions, device: Device) -> Result<Model> {
        let path = model_file(path)?;
        let format = detect(&path)?;
        if format == Format::TorchScript {
            let mut module = CModule::load_on_device(&path, device).map_err(|e| {
                anyhow::anyhow!(
                    "{}: cannot load the TorchScript module ({})",
                    path.display(),
                    first_line(&e.to_string())
                )
            })?;
            module.set_eval();
            let head = options.head.unwrap_or(Head::Softmax);
            return Ok(Model { runner: Runner::Script(module), head, card: None, path: Some(path), notes: vec![] });
        }
        let card_file = card_path(&path);
        let card = card_beside(&path)?;
        let config = ModelConfig {
            arch: options.arch.or(card.as_ref().map(|c| c.model.arch)).unwrap_or(Arch::Modern),
            head: options.head.or(card.as_ref().map(|c| c.model.head)).unwrap_or(Head::Softmax),
        };
        let mut vs = VarStore::new(device);
        let net = LeNet5::zeros(&vs.root(), config); // every weight is copied in next
        let (tensors, mut notes) = read_tensors(&path, format)?;
        load_state_dict(&mut vs, tensors, &options.key_maps, &path.display().to_string())?;
        if card.is_none() && (options.arch.is_none() || options.head.is_none()) {
            notes.push(format!(
                "no model card {} beside {}; taking arch {} and head {}",
                card_file.display(),
                path.display(),
                config.arch,
                config.head
            ));
        }
        let mut model = Model::native(vs, net, card);
        model.path = Some(path);
        model.notes = notes;
        Ok(model)
    }

    /// The same model run by `engine`.
    pub fn with_engine(mut self, engine: Engine) -> Result<Model> {
        self.set_engine(engine)?;
        Ok(self)
    }

    /// Switches the engine in place; the direct engine needs our LeNet-5 on the CPU. On an
    /// error the model is left as it was.
    pub fn set_engine(&mut self, engine: Engine) -> Result<()> {
        let name = self.name();
        match (&mut self.runner, engine) {
            (Runner::Native { direct, .. }, Engine::Libtorch) => *direct = None,
            (Runner::Script(_), Engine::Libtorch) => {}
            (Runner::Script(_), Engine::Direct) => {
                bail!("engine = direct: {name} is a TorchScript module, which only libtorch runs; the direct engine runs LeNet-5 weights")
            }
            (Runner::Native { vs, net, direct }, Engine::Direct) => {
                if vs.device() != Device::Cpu {
                    bail!(setting::invalid(
                        "engine",
                        "direct",
                        format!("runs on the CPU, and {name} is on {:?}", vs.device())
                    ));
                }
                if direct.is_none() {
                    *direct = Some((DirectNet::new(vs, net.config, LentThreads::available())?, LentThreads::lend()));
                }
            }
        }
        Ok(())
    }

    /// Logits `(B, 10)` for a normalised batch `(B, 1, 32, 32)`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match &self.runner {
            Runner::Native { direct: Some((direct, _)), .. } => direct.forward(xs),
            Runner::Native { net, .. } => Ok(net.forward(xs)),
            Runner::Script(module) => module
                .forward_ts(&[xs])
                .map_err(|e| anyhow::anyhow!("the TorchScript module failed: {}", first_line(&e.to_string()))),
        }
    }

    /// The predicted class of every image of `images` `(N, 1, 32, 32)`, in batches, without
    /// gradients.
    pub fn predicted_classes(&self, images: &Tensor) -> Result<Vec<i64>> {
        let mut out = Vec::with_capacity(images.size()[0] as usize);
        tch::no_grad(|| -> Result<()> {
            for batch in images.split(1000, 0) {
                let logits = self.forward(&batch)?; // (B, 10)
                out.extend(Vec::<i64>::try_from(logits.argmax(-1, false).to_device(Device::Cpu))?);
            }
            Ok(())
        })?;
        Ok(out)
    }

    pub fn device(&self) -> Device {
        match &self.runner {
            Runner::Native { vs, .. } => vs.device(),
            Runner::Script(_) => Device::Cpu,
        }
    }

    pub fn head(&self) -> Head {
        self.head
    }

    /// The engine that runs the forward pass.
    pub fn engine(&self) -> Engine {
        match &self.runner {
            Runner::Native { direct: Some(_), .. } => Engine::Direct,
            _ => Engine::Libtorch,
        }
    }

    pub fn card(&self) -> Option<&ModelCard> {
        self.card.as_ref()
    }

    /// The file the model was loaded from.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// What loading noticed, one line each, for the shell to show.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Our LeNet-5 and its weights; None for a TorchScript module.
    pub fn lenet5(&self) -> Option<(&VarStore, &LeNet5)> {
        match &self.runner {
            Runner::Native { vs, net, .. } => Some((vs, net)),
            Runner::Script(_) => None,
        }
    }

    /// Our LeNet-5 and its weights, or an error naming the model and why `what` needs them.
    pub fn require_lenet5(&self, what: &str) -> Result<(&VarStore, &LeNet5)> {
        self.lenet5().with_context(|| {
            format!("{}: a TorchScript module keeps its layers inside a compiled graph; {what}", self.name())
        })
    }

    /// The native parts, taken apart; None for a TorchScript module.
    pub fn into_parts(self) -> Option<NativeParts> {
        match self.runner {
            Runner::Native { vs, net, direct } => Some(NativeParts { vs, net, direct }),
            Runner::Script(_) => None,
        }
    }

    /// How messages name the model: its file, or "this model".
    fn name(&self) -> String {
        self.path.as_ref().map_or_else(|| "this model".to_string(), |p| p.display().to_string())
    }
}

/// The model file `path` names: a file as it is; a run folder's model (`DIR/lenet5.safetensors`);
/// a prefix `DIR/NAME` of an export (`DIR/NAME.safetensors`). The one reading of a model path
/// that the CLI, the binding and the web server share.
pub fn model_file(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        let file = path.join(format!("{MODEL_NAME}.safetensors"));
        if file.is_file() {
            return Ok(file);
        }
        bail!("{}: a folder without {MODEL_NAME}.safetensors in it, so not a run folder", path.display());
    }
    let prefixed = crate::formats::export::with_suffix(path, ".safetensors");
    if path.extension().is_none() && prefixed.is_file() {
        return Ok(prefixed);
    }
    match std::fs::metadata(path) {
        // The io error's kind survives, so Python raises FileNotFoundError.
        Err(e) => Err(e).with_context(|| format!("{}: no such model file or run folder", path.display())),
        Ok(_) => bail!("{}: neither a file nor a folder", path.display()),
    }
}

/// The model card beside a weights file: `NAME.json` for `NAME.safetensors` (or any extension).
pub fn card_path(weights: &Path) -> PathBuf {
    weights.with_extension("json")
}

/// The model card beside the model file `path` ([`card_path`]), checked against it, if there
/// is one.
pub fn card_beside(path: &Path) -> Result<Option<ModelCard>> {
    let card_file = card_path(path);
    if !card_file.is_file() {
        return Ok(None);
    }
    let card = ModelCard::read(&card_file)?;
    check_card_matches(&card, &card_file, path)?;
    Ok(Some(card))
}

/// How to load a model file: overrides for what its card (if any) says.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub arch: Option<Arch>,
    pub head: Option<Head>,
    pub key_maps: Vec<KeyMap>,
}

/// A card that names this weights file must carry its checksum: otherwise the card
/// describes other weights (a stale copy, a file renamed over another).
fn check_card_matches(card: &ModelCard, card_file: &Path, weights: &Path) -> Result<()> {
    let name = weights.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if let Some(entry) = card.files.values().find(|e| e.name == name) {
        let actual = crate::formats::card::sha256_file(weights)?;
        if actual != entry.sha256 {
            bail!(
                "{}: does not match {} (its SHA-256 is {}…, the card records {}…): the card describes other weights",
                card_file.display(),
                weights.display(),
                &actual[..12],
                &entry.sha256[..entry.sha256.len().min(12)]
            );
        }
    }
    Ok(())
}
