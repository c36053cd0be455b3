//! `import lenet5`: the Rust LeNet-5 as a Python module (PyO3 + pyo3-tch). A thin shell over
//! the library crate, like the CLI: it turns Python arguments into the library's values, maps
//! errors to Python exceptions, and passes `torch.Tensor`s through without copies (both sides
//! run on the one libtorch that `import torch` loaded). Stubs: python/lenet5/_native.pyi.

use pyo3::exceptions::{PyFileNotFoundError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3_tch::PyTensor;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use lenet5::card::ModelCard;
use lenet5::data::{self, Dataset, DatasetKind};
use lenet5::model::{Arch, Head, LeNet5, ModelConfig, INPUT_SIZE, NUM_CLASSES, STAGES};
use lenet5::weights::{self, Classifier, Engine, LoadOptions};

/// The library's error as the fitting Python exception, with the CLI's message.
fn py_err(e: anyhow::Error) -> PyErr {
    let message = format!("{e:#}");
    let io = e.chain().find_map(|c| c.downcast_ref::<std::io::Error>());
    if io.is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound) {
        return PyFileNotFoundError::new_err(message);
    }
    if e.chain().any(|c| c.downcast_ref::<tch::TchError>().is_some()) {
        return PyRuntimeError::new_err(message);
    }
    PyValueError::new_err(message)
}

trait OrPyErr<T> {
    fn py(self) -> PyResult<T>;
}

impl<T, E: Into<anyhow::Error>> OrPyErr<T> for Result<T, E> {
    fn py(self) -> PyResult<T> {
        self.map_err(|e| py_err(e.into()))
    }
}

/// A value of one of the library's lower-case enums (`"modern"`, `"fashion-mnist"`).
fn parse<T: serde::de::DeserializeOwned>(what: &str, value: &str, choices: &str) -> PyResult<T> {
    serde_json::from_value(serde_json::Value::from(value))
        .map_err(|_| PyValueError::new_err(format!("{what}={value:?}: must be one of {choices}")))
}

/// Checks a batch of inputs before libtorch sees it: shape `[N, 1, 32, 32]`, float32, on `device`.
fn check_batch(x: &Tensor, device: Device) -> PyResult<()> {
    let size = x.size();
    if size.len() != 4 || size[1..] != [1, INPUT_SIZE, INPUT_SIZE] {
        return Err(PyValueError::new_err(format!(
            "expected a batch of shape [N, 1, {INPUT_SIZE}, {INPUT_SIZE}] (MNIST padded to 32x32, normalised), got {size:?}"
        )));
    }
    if x.kind() != Kind::Float {
        return Err(PyTypeError::new_err(format!("expected float32 inputs, got {:?} (use x.float())", x.kind())));
    }
    if x.device() != device {
        return Err(PyValueError::new_err(format!(
            "the inputs are on {:?} and the model on {:?}: move one with .to()",
            x.device(),
            device
        )));
    }
    Ok(())
}

/// LeNet-5 in Rust: callable on a `[N, 1, 32, 32]` float tensor, returning logits `[N, 10]`.
#[pyclass(name = "LeNet5", module = "lenet5", unsendable)]
struct PyLeNet5 {
    model: Classifier,
}

impl PyLeNet5 {
    fn model(&self) -> &Classifier {
        &self.model
    }

    fn native(&self) -> PyResult<(&VarStore, &LeNet5, Option<&ModelCard>)> {
        match self.model() {
            Classifier::Native { vs, net, card, .. } => Ok((vs, net, card.as_ref())),
            Classifier::Script { .. } => {
                Err(PyTypeError::new_err("a TorchScript module: it runs as it is, but has no LeNet-5 weights to give or take"))
            }
        }
    }

    fn device(&self) -> Device {
        match self.model() {
            Classifier::Native { vs, .. } => vs.device(),
            Classifier::Script { .. } => Device::Cpu,
        }
    }

    /// Switches the engine (again after a weight change: the direct engine keeps its own copy).
    fn set_engine(&mut self, engine: Engine) -> PyResult<()> {
        let model = &mut self.model;
        model.set_engine(engine, Path::new("this model")).map_err(|e| PyValueError::new_err(format!("{e:#}")))
    }
}

#[pymethods]
impl PyLeNet5 {
    /// A freshly initialised LeNet-5, as PyTorch initialises nn.Conv2d and nn.Linear, from
    /// libtorch's generator (the one `torch.manual_seed` seeds); `seed` seeds it first.
    #[new]
    #[pyo3(signature = (arch = "modern", head = "softmax", seed = None, engine = "libtorch"))]
    fn new(arch: &str, head: &str, seed: Option<i64>, engine: &str) -> PyResult<PyLeNet5> {
        let config = ModelConfig {
            arch: parse::<Arch>("arch", arch, "'modern', 'classic'")?,
            head: parse::<Head>("head", head, "'softmax', 'sigmoid'")?,
        };
        let engine = parse::<Engine>("engine", engine, "'libtorch', 'direct'")?;
        if let Some(seed) = seed {
            tch::manual_seed(seed);
        }
        let vs = VarStore::new(Device::Cpu);
        let net = LeNet5::new(&vs.root(), config);
        let mut model = PyLeNet5 { model: Classifier::Native { vs, net, card: None, direct: None } };
        model.set_engine(engine)?;
        Ok(model)
    }

    /// Logits `[N, 10]` of a normalised batch `[N, 1, 32, 32]` (float32, on the model's device).
    fn __call__(&self, x: PyTensor) -> PyResult<PyTensor> {
        check_batch(&x, self.device())?;
        Ok(PyTensor(tch::no_grad(|| self.model().forward(&x)).py()?))
    }

    /// Class probabilities `[N, 10]`: softmax of the logits, or one sigmoid per class.
    fn probabilities(&self, x: PyTensor) -> PyResult<PyTensor> {
        let logits = self.__call__(x)?;
        Ok(PyTensor(self.model().head().probabilities(&logits)))
    }

    /// Every stage of the forward pass by name (input, C1, S2, C3, S4, F5, F6, output), as
    /// tensors; `input` is `x` itself.
    fn activations<'py>(&self, py: Python<'py>, x: PyTensor) -> PyResult<Bound<'py, PyDict>> {
        check_batch(&x, self.device())?;
        let (_, net, _) = self.native()?;
        let mut stages = vec![];
        let _ = tch::no_grad(|| net.forward_observed(&x, &mut |name, t| stages.push((name.to_string(), t.shallow_clone()))));
        let out = PyDict::new(py);
        for (name, t) in stages {
            // The input stage is the caller's tensor: hand back the same object's storage.
            let t = if name == STAGES[0] { x.shallow_clone() } else { t };
            out.set_item(name, PyTensor(t))?;
        }
        Ok(out)
    }

    /// The weights by PyTorch's names, in `model.parameters()` order. Like PyTorch's
    /// `state_dict()`, the tensors share memory with the model.
    fn state_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (_, net, _) = self.native()?;
        let out = PyDict::new(py);
        for (name, t) in net.parameters() {
            out.set_item(name, PyTensor(t.detach()))?;
        }
        Ok(out)
    }

    /// Copies the weights in, after checking the whole dict as the CLI does: every name
    /// present, shapes equal, floating point; nothing is copied if one does not fit.
    fn load_state_dict(&mut self, state_dict: &Bound<'_, PyDict>) -> PyResult<()> {
        let mut tensors = vec![];
        for (k, v) in state_dict.iter() {
            let name: String = k.extract().map_err(|_| PyTypeError::new_err(format!("state_dict key {k}: not a string")))?;
            let t: PyTensor = v.extract().map_err(|_| PyTypeError::new_err(format!("state_dict[{name:?}]: not a torch.Tensor")))?;
            tensors.push((name, t.0.to_device(Device::Cpu)));
        }
        let engine = self.model().engine();
        match &mut self.model {
            Classifier::Native { vs, .. } => weights::load_state_dict(vs, tensors, &[], "state_dict").py()?,
            Classifier::Script { .. } => return Err(PyTypeError::new_err("a TorchScript module takes no state_dict")),
        }
        self.set_engine(engine)
    }

    /// Moves the model to `device` ("cpu", "cuda", "cuda:N") and returns it, as nn.Module.to.
    fn to<'py>(mut slf: PyRefMut<'py, Self>, device: &str) -> PyResult<PyRefMut<'py, Self>> {
        let device = lenet5::device::parse(device).py()?;
        let engine = slf.model().engine();
        if engine == Engine::Direct && device != Device::Cpu {
            return Err(PyValueError::new_err("the direct engine runs on the CPU: load the model with engine='libtorch' to use a GPU"));
        }
        match &mut slf.model {
            Classifier::Native { vs, .. } => vs.set_device(device),
            Classifier::Script { module, .. } => module.to(device, Kind::Float, false),
        }
        Ok(slf)
    }

    /// Writes the files `lenet5 export` writes: PREFIX.pt (TorchScript), PREFIX.safetensors,
    /// PREFIX.check.safetensors and PREFIX.json (the card); returns their paths.
    #[pyo3(signature = (prefix, data = None))]
    fn save(&self, prefix: PathBuf, data: Option<PathBuf>) -> PyResult<Vec<PathBuf>> {
        let (vs, net, card) = self.native()?;
        let card = lenet5::export::export_loaded(vs, net, card, DatasetKind::Mnist, data.as_deref(), &prefix, false).py()?;
        let mut files: Vec<PathBuf> = card.files.values().map(|e| prefix.with_file_name(&e.name)).collect();
        files.push(lenet5::export::with_suffix(&prefix, ".json"));
        Ok(files)
    }

    /// "libtorch" or "direct": what runs the forward pass.
    #[getter]
    fn engine(&self) -> String {
        lenet5::flag_name(&self.model().engine())
    }

    #[getter]
    fn arch(&self) -> PyResult<String> {
        Ok(lenet5::flag_name(&self.native()?.1.config.arch))
    }

    #[getter]
    fn head(&self) -> String {
        lenet5::flag_name(&self.model().head())
    }

    /// The model card (JSON text parsed into a dict), or None.
    #[getter]
    fn card<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let Some(card) = self.model().card() else { return Ok(None) };
        let json = serde_json::to_string(card).expect("a card always serialises");
        Ok(Some(py.import("json")?.call_method1("loads", (json,))?))
    }

    fn __repr__(&self) -> String {
        match self.model() {
            Classifier::Native { vs, net, .. } => format!(
                "LeNet5(arch={:?}, head={:?}, engine={:?}, device={:?})",
                lenet5::flag_name(&net.config.arch),
                lenet5::flag_name(&net.config.head),
                lenet5::flag_name(&self.model().engine()),
                vs.device()
            ),
            Classifier::Script { .. } => format!("LeNet5(TorchScript, head={:?})", self.head()),
        }
    }
}

/// Loads any model file the CLI reads (run folder, safetensors + card, state dict `.pt`,
/// checkpoint dict, whole pickled module, TorchScript, tch `.ot`), recognised by content.
#[pyfunction]
#[pyo3(signature = (path, arch = None, head = None, engine = "libtorch", device = "cpu"))]
fn load(path: PathBuf, arch: Option<&str>, head: Option<&str>, engine: &str, device: &str) -> PyResult<PyLeNet5> {
    let options = LoadOptions {
        arch: arch.map(|a| parse::<Arch>("arch", a, "'modern', 'classic'")).transpose()?,
        head: head.map(|h| parse::<Head>("head", h, "'softmax', 'sigmoid'")).transpose()?,
        key_maps: vec![],
    };
    let engine = parse::<Engine>("engine", engine, "'libtorch', 'direct'")?;
    let path = if path.is_dir() { path.join(format!("{}.safetensors", lenet5::run::MODEL_NAME)) } else { path };
    let device = lenet5::device::parse(device).py()?;
    let mut model = PyLeNet5 { model: weights::load(&path, &options, device).py()? };
    model.set_engine(engine)?;
    Ok(model)
}

/// The test split of `data` (or the data set's default folder), or the caller's tensors.
fn dataset(
    images: Option<PyTensor>,
    labels: Option<PyTensor>,
    kind: DatasetKind,
    data: Option<&Path>,
    device: Device,
) -> PyResult<Dataset> {
    match (images, labels) {
        (Some(images), Some(labels)) => {
            let n = images.size().first().copied().unwrap_or(0);
            check_batch(&images, device)?;
            if labels.size() != [n] || labels.kind() != Kind::Int64 {
                return Err(PyValueError::new_err(format!(
                    "labels must be int64 of shape [{n}] (one per image), got {:?} {:?}",
                    labels.kind(),
                    labels.size()
                )));
            }
            let (lo, hi) = if n == 0 { (0, 0) } else { (labels.min().int64_value(&[]), labels.max().int64_value(&[])) };
            if lo < 0 || hi >= NUM_CLASSES {
                return Err(PyValueError::new_err(format!("labels must be classes 0..{NUM_CLASSES}, found {lo}..={hi}")));
            }
            Ok(Dataset { images: images.0, labels: labels.0.to_device(device) })
        }
        (None, None) => Ok(data::load_test(kind, data, kind.normalization()).py()?.to_device(device)),
        _ => Err(PyValueError::new_err("pass both images and labels, or neither (to use the test set)")),
    }
}

/// Loss, accuracy, correct and total counts, and the confusion matrix (`[10, 10]` int64,
/// `confusion[true][predicted]`) of `model` on the test set or on `images`/`labels`.
#[pyfunction]
#[pyo3(signature = (model, data = None, images = None, labels = None, batch_size = 1000))]
fn evaluate<'py>(
    py: Python<'py>,
    model: &PyLeNet5,
    data: Option<PathBuf>,
    images: Option<PyTensor>,
    labels: Option<PyTensor>,
    batch_size: i64,
) -> PyResult<Bound<'py, PyDict>> {
    if batch_size < 1 {
        return Err(PyValueError::new_err(format!("batch_size={batch_size}: must be at least 1")));
    }
    let kind = model.model().card().map(|c| c.dataset).unwrap_or(DatasetKind::Mnist);
    let test = dataset(images, labels, kind, data.as_deref(), model.device())?;
    let classifier = model.model();
    let forward = |xs: &Tensor| classifier.forward(xs);
    let m = lenet5::train::evaluate(&forward, classifier.head(), &test, batch_size).py()?;
    let confusion: Vec<i64> = m.confusion.iter().flatten().copied().collect();
    let out = PyDict::new(py);
    out.set_item("loss", m.loss)?;
    out.set_item("accuracy", m.accuracy())?;
    out.set_item("correct", m.correct)?;
    out.set_item("total", m.total)?;
    out.set_item("confusion", PyTensor(Tensor::from_slice(&confusion).view([NUM_CLASSES, NUM_CLASSES])))?;
    Ok(out)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyLeNet5>()?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
