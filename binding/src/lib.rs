//! `import lenet5`: the Rust LeNet-5 as a Python module (PyO3 + pyo3-tch). A thin shell over
//! the library crate, like the CLI: it turns Python arguments into the library's values, maps
//! errors to Python exceptions, and passes `torch.Tensor`s through without copies (both sides
//! run on the one libtorch that `import torch` loaded). Stubs: python/lenet5/_native.pyi.

use pyo3::exceptions::{PyFileNotFoundError, PyKeyboardInterrupt, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use pyo3_tch::PyTensor;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use lenet5::data::{self, Dataset, DatasetKind, Splits};
use lenet5::explain::conv as walkthrough;
use lenet5::inference::evaluate::evaluate as evaluate_model;
use lenet5::inference::{Engine, LoadOptions, Model};
use lenet5::model::{Arch, Head, LeNet5, ModelConfig, INPUT_SIZE, NUM_CLASSES, STAGES};
use lenet5::training::checkpoint::CheckpointMeta;
use lenet5::training::run::{self, RunEnd, RunPlan, Start, CHECKPOINT_FILE};
use lenet5::training::{EpochMetrics, EpochProgress, TrainConfig, Watcher};

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

/// What loading or training noticed ("weights from its 'model' entry"), as Python warnings.
fn warn_notes(py: Python<'_>, notes: &[String]) -> PyResult<()> {
    let warnings = py.import("warnings")?;
    for note in notes {
        warnings.call_method1("warn", (note.as_str(), py.get_type::<pyo3::exceptions::PyUserWarning>(), 2))?;
    }
    Ok(())
}

/// A serde value (a card, a recipe, metrics) as the Python object `json.loads` makes of it.
fn to_python<'py>(py: Python<'py>, value: &impl serde::Serialize) -> PyResult<Bound<'py, PyAny>> {
    let json = serde_json::to_string(value).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    py.import("json")?.call_method1("loads", (json,))
}

/// A value of one of the library's lower-case enums (`"modern"`, `"fashion-mnist"`).
fn parse<T: serde::de::DeserializeOwned>(what: &str, value: &str, choices: &str) -> PyResult<T> {
    serde_json::from_value(serde_json::Value::from(value))
        .map_err(|_| PyValueError::new_err(format!("{what}={value:?}: must be one of {choices}")))
}

/// A `torch.Tensor` argument that libtorch can compute on here: dense (strided) and on the CPU
/// or a CUDA device. Anything else is refused before libtorch sees it, which would fail on it
/// inside a kernel (and tch would panic).
struct Dense(Tensor);

impl<'py> FromPyObject<'py> for Dense {
    fn extract_bound(obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        let tensor: PyTensor = obj
            .extract()
            .map_err(|_| PyTypeError::new_err(format!("expected a torch.Tensor, got {}", obj.get_type().name().map(|n| n.to_string()).unwrap_or_default())))?;
        let layout = obj.getattr("layout")?.str()?.to_string();
        if layout != "torch.strided" {
            return Err(PyValueError::new_err(format!("a {layout} tensor: pass a dense one (.to_dense())")));
        }
        let device: String = obj.getattr("device")?.getattr("type")?.extract()?;
        if device != "cpu" && device != "cuda" {
            return Err(PyValueError::new_err(format!("a tensor on the {device} device: lenet5 computes on cpu or cuda")));
        }
        Ok(Dense(tensor.0))
    }
}

impl std::ops::Deref for Dense {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        &self.0
    }
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
    model: Model,
}

impl PyLeNet5 {
    fn model(&self) -> &Model {
        &self.model
    }

    fn native(&self) -> PyResult<(&VarStore, &LeNet5)> {
        self.model
            .lenet5()
            .ok_or_else(|| PyTypeError::new_err("a TorchScript module: it runs as it is, but has no LeNet-5 weights to give or take"))
    }

    fn device(&self) -> Device {
        self.model.device()
    }

    /// Switches the engine (again after a weight change: the direct engine keeps its own copy).
    /// The CLI's direct engine takes libtorch's threads for itself; here libtorch is also the
    /// notebook's torch, whose thread count stays what its user set.
    fn set_engine(&mut self, engine: Engine) -> PyResult<()> {
        let threads = tch::get_num_threads();
        let switched = self.model.set_engine(engine);
        tch::set_num_threads(threads);
        switched.map_err(|e| PyValueError::new_err(format!("{e:#}")))
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
        let mut model = PyLeNet5 { model: Model::native(vs, net, None) };
        model.set_engine(engine)?;
        Ok(model)
    }

    /// Logits `[N, 10]` of a normalised batch `[N, 1, 32, 32]` (float32, on the model's device).
    fn __call__(&self, x: Dense) -> PyResult<PyTensor> {
        check_batch(&x, self.device())?;
        Ok(PyTensor(tch::no_grad(|| self.model().forward(&x)).py()?))
    }

    /// Class probabilities `[N, 10]`: softmax of the logits, or one sigmoid per class.
    fn probabilities(&self, x: Dense) -> PyResult<PyTensor> {
        let logits = self.__call__(x)?;
        Ok(PyTensor(self.model().head().probabilities(&logits)))
    }

    /// Every stage of the forward pass by name (input, C1, S2, C3, S4, F5, F6, output), as
    /// tensors; `input` is `x` itself.
    fn activations<'py>(&self, py: Python<'py>, x: Dense) -> PyResult<Bound<'py, PyDict>> {
        check_batch(&x, self.device())?;
        let (_, net) = self.native()?;
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
        let (_, net) = self.native()?;
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
            let t: Dense = v.extract().map_err(|e| {
                let kind = if e.is_instance_of::<PyValueError>(v.py()) { PyValueError::new_err } else { PyTypeError::new_err };
                kind(format!("state_dict[{name:?}]: {}", e.value(v.py())))
            })?;
            tensors.push((name, t.0.to_device(Device::Cpu)));
        }
        if self.model.lenet5().is_none() {
            return Err(PyTypeError::new_err("a TorchScript module takes no state_dict"));
        }
        // The direct engine's copy of the weights follows inside; it sizes its threads from
        // libtorch's, which stay the notebook's.
        let threads = tch::get_num_threads();
        let loaded = self.model.load_state_dict(tensors, &[], "state_dict");
        tch::set_num_threads(threads);
        loaded.py()
    }

    /// Moves the model to `device` ("cpu", "cuda", "cuda:N") and returns it, as nn.Module.to.
    fn to<'py>(mut slf: PyRefMut<'py, Self>, device: &str) -> PyResult<PyRefMut<'py, Self>> {
        let device = lenet5::device::parse(device).py()?;
        if slf.model().engine() == Engine::Direct && device != Device::Cpu {
            return Err(PyValueError::new_err("the direct engine runs on the CPU: load the model with engine='libtorch' to use a GPU"));
        }
        slf.model.to_device(device).py()?;
        Ok(slf)
    }

    /// Writes the files `lenet5 export` writes: PREFIX.pt (TorchScript), PREFIX.safetensors,
    /// PREFIX.check.safetensors, PREFIX.onnx and PREFIX.json (the card); returns their paths.
    #[pyo3(signature = (prefix, data = None))]
    fn save(&self, prefix: PathBuf, data: Option<PathBuf>) -> PyResult<Vec<PathBuf>> {
        self.native()?;
        let invocation = vec![format!("LeNet5.save({:?})", prefix.display().to_string())];
        let card = lenet5::formats::export::export_loaded(&self.model, DatasetKind::Mnist, data.as_deref(), &prefix, false, invocation).py()?;
        let mut files: Vec<PathBuf> = card.files.values().map(|e| prefix.with_file_name(&e.name)).collect();
        files.push(lenet5::formats::export::with_suffix(&prefix, ".json"));
        Ok(files)
    }

    /// "libtorch" or "direct": what runs the forward pass.
    #[getter]
    fn engine(&self) -> String {
        self.model().engine().to_string()
    }

    #[getter]
    fn arch(&self) -> PyResult<String> {
        Ok(self.native()?.1.config.arch.to_string())
    }

    #[getter]
    fn head(&self) -> String {
        self.model().head().to_string()
    }

    /// The model card (JSON text parsed into a dict), or None.
    #[getter]
    fn card<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.model().card().map(|card| to_python(py, card)).transpose()
    }

    fn __repr__(&self) -> String {
        match self.model().lenet5() {
            Some((vs, net)) => format!(
                "LeNet5(arch={:?}, head={:?}, engine={:?}, device={:?})",
                net.config.arch.as_str(),
                net.config.head.as_str(),
                self.model().engine().as_str(),
                vs.device()
            ),
            None => format!("LeNet5(TorchScript, head={:?})", self.head()),
        }
    }
}

/// Loads any model file the CLI reads (run folder, safetensors + card, state dict `.pt`,
/// checkpoint dict, whole pickled module, TorchScript, tch `.ot`), recognised by content.
#[pyfunction]
#[pyo3(signature = (path, arch = None, head = None, engine = "libtorch", device = "cpu"))]
fn load(py: Python<'_>, path: PathBuf, arch: Option<&str>, head: Option<&str>, engine: &str, device: &str) -> PyResult<PyLeNet5> {
    let options = LoadOptions {
        arch: arch.map(|a| parse::<Arch>("arch", a, "'modern', 'classic'")).transpose()?,
        head: head.map(|h| parse::<Head>("head", h, "'softmax', 'sigmoid'")).transpose()?,
        key_maps: vec![],
    };
    let engine = parse::<Engine>("engine", engine, "'libtorch', 'direct'")?;
    let device = lenet5::device::parse(device).py()?;
    let mut model = PyLeNet5 { model: Model::load(&path, &options, device).py()? };
    warn_notes(py, model.model.notes())?;
    model.set_engine(engine)?;
    Ok(model)
}

/// The caller's `images` `[N, 1, 32, 32]` (network inputs) and `labels` `[N]` as a data set,
/// checked; `what` names them in messages ("images", "test_images").
fn tensors_dataset(images: Dense, labels: Dense, what: &str, device: Device) -> PyResult<Dataset> {
    let n = images.size().first().copied().unwrap_or(0);
    check_batch(&images, device).map_err(|e| Python::with_gil(|py| PyValueError::new_err(format!("{what}: {}", e.value(py)))))?;
    let labels_name = what.replace("images", "labels");
    if labels.size() != [n] || labels.kind() != Kind::Int64 {
        return Err(PyValueError::new_err(format!(
            "{labels_name} must be int64 of shape [{n}] (one per image), got {:?} {:?}",
            labels.kind(),
            labels.size()
        )));
    }
    if n == 0 {
        return Err(PyValueError::new_err(format!("{what}: no images")));
    }
    let (lo, hi) = (labels.min().int64_value(&[]), labels.max().int64_value(&[]));
    if lo < 0 || hi >= NUM_CLASSES {
        return Err(PyValueError::new_err(format!("{labels_name} must be classes 0..{NUM_CLASSES}, found {lo}..={hi}")));
    }
    Ok(Dataset { images: images.0, labels: labels.0.to_device(device) })
}

/// The test split of `data` (or the data set's default folder), or the caller's tensors.
fn dataset(
    images: Option<Dense>,
    labels: Option<Dense>,
    kind: DatasetKind,
    data: Option<&Path>,
    device: Device,
) -> PyResult<Dataset> {
    match (images, labels) {
        (Some(images), Some(labels)) => tensors_dataset(images, labels, "images", device),
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
    images: Option<Dense>,
    labels: Option<Dense>,
    batch_size: i64,
) -> PyResult<Bound<'py, PyDict>> {
    if batch_size < 1 {
        return Err(PyValueError::new_err(format!("batch_size={batch_size}: must be at least 1")));
    }
    let kind = model.model().card().map(|c| c.dataset).unwrap_or(DatasetKind::Mnist);
    let test = dataset(images, labels, kind, data.as_deref(), model.device())?;
    let classifier = model.model();
    let forward = |xs: &Tensor| classifier.forward(xs);
    let m = evaluate_model(&forward, classifier.head(), &test, batch_size).py()?;
    let confusion: Vec<i64> = m.confusion.iter().flatten().copied().collect();
    let out = PyDict::new(py);
    out.set_item("loss", m.loss)?;
    out.set_item("accuracy", m.accuracy())?;
    out.set_item("correct", m.correct)?;
    out.set_item("total", m.total)?;
    out.set_item("confusion", PyTensor(Tensor::from_slice(&confusion).view([NUM_CLASSES, NUM_CLASSES])))?;
    Ok(out)
}

/// `recipe` (keyword arguments named as `TrainConfig` serialises: `epochs`, `lr`, `betas`,
/// `optimizer`, `schedule`, ...) over [`TrainConfig::DEFAULT`], checked as the CLI checks flags.
fn recipe(overrides: Option<&Bound<'_, PyDict>>) -> PyResult<TrainConfig> {
    let mut json = serde_json::to_value(TrainConfig::DEFAULT).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    let fields = json.as_object_mut().expect("a recipe serialises as an object");
    let json_module = overrides.map(|d| d.py().import("json")).transpose()?;
    for (key, value) in overrides.into_iter().flat_map(|d| d.iter()) {
        let key: String = key.extract()?;
        if !fields.contains_key(&key) {
            let mut known: Vec<&String> = fields.keys().collect();
            known.sort();
            let known: Vec<&str> = known.iter().map(|k| k.as_str()).collect();
            return Err(PyTypeError::new_err(format!("train() got an unexpected keyword argument {key:?}; the recipe's are {}", known.join(", "))));
        }
        let text: String = json_module.as_ref().expect("set when there are overrides").call_method1("dumps", (&value,))
            .and_then(|t| t.extract())
            .map_err(|_| PyTypeError::new_err(format!("{key}={value}: not a number, string, bool, list or None")))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let default = &fields[&key];
        let fits = match (default, &value) {
            (serde_json::Value::Null, v) => v.is_null() || v.is_u64(), // optional counts (limit_train)
            (serde_json::Value::Number(_), v) => v.is_number(),
            (serde_json::Value::Bool(_), v) => v.is_boolean(),
            (serde_json::Value::String(_), v) => v.is_string(),
            (serde_json::Value::Array(d), serde_json::Value::Array(v)) => d.len() == v.len() && v.iter().all(|x| x.is_number()),
            _ => false,
        };
        if !fits {
            return Err(PyTypeError::new_err(format!("{key}={text}: expected {} like the default {default}", kind_of(default))));
        }
        fields.insert(key, value);
    }
    let config: TrainConfig = serde_json::from_value(json).map_err(|e| PyValueError::new_err(format!("recipe: {e}")))?;
    config.validate().py()?;
    Ok(config)
}

/// What a recipe value must be, in words.
fn kind_of(default: &serde_json::Value) -> &'static str {
    match default {
        serde_json::Value::Null => "None or a count",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::Bool(_) => "True or False",
        serde_json::Value::String(_) => "a string",
        _ => "a pair of numbers",
    }
}

/// Runs Python's progress callback and notices Ctrl-C (the notebook's stop button) between
/// steps: both need the interpreter, taken for a moment from the training thread.
struct NotebookWatcher {
    progress: Option<PyObject>,
    /// Notes of the run, shown as warnings once it has returned.
    notes: Vec<String>,
    /// The exception to raise once the run has stopped: the KeyboardInterrupt, or whatever
    /// the progress callback raised.
    raised: Option<PyErr>,
}

impl NotebookWatcher {
    fn call(&mut self, event: &str, value: &impl serde::Serialize) {
        let Some(callback) = &self.progress else { return };
        if self.raised.is_some() {
            return;
        }
        Python::with_gil(|py| {
            if let Err(e) = to_python(py, value).and_then(|v| callback.call1(py, (event, v))) {
                self.raised = Some(e);
            }
        });
    }
}

impl Watcher for NotebookWatcher {
    fn progress(&mut self, p: &EpochProgress) {
        self.call("progress", p);
    }

    fn epoch_done(&mut self, metrics: &EpochMetrics, epochs: usize) {
        self.call("epoch", &serde_json::json!({ "metrics": metrics, "epochs": epochs, "line": metrics.line(epochs) }));
    }

    fn note(&mut self, note: &str) {
        self.notes.push(note.to_string());
    }

    fn should_stop(&mut self) -> bool {
        if self.raised.is_none() {
            self.raised = Python::with_gil(|py| py.check_signals().err());
        }
        self.raised.is_some()
    }
}

/// Trains LeNet-5 as `lenet5 train` does (see `lenet5.train` in `__init__.py`, which adds
/// the progress display) and returns `(model, history)`.
#[pyfunction]
#[pyo3(signature = (
    recipe_overrides = None, *, arch = "modern", head = "softmax", dataset = "mnist", data = None,
    images = None, labels = None, test_images = None, test_labels = None, out = None, resume = None,
    init = None, checkpoint_every = None, device = "auto", threads = None, progress = None, invocation = None,
))]
#[allow(clippy::too_many_arguments)]
fn train<'py>(
    py: Python<'py>,
    recipe_overrides: Option<&Bound<'py, PyDict>>,
    arch: &str,
    head: &str,
    dataset: &str,
    data: Option<PathBuf>,
    images: Option<Dense>,
    labels: Option<Dense>,
    test_images: Option<Dense>,
    test_labels: Option<Dense>,
    out: Option<PathBuf>,
    resume: Option<PathBuf>,
    init: Option<PathBuf>,
    checkpoint_every: Option<usize>,
    device: &str,
    threads: Option<i32>,
    progress: Option<PyObject>,
    invocation: Option<String>,
) -> PyResult<(PyLeNet5, Bound<'py, PyAny>)> {
    let device = lenet5::device::parse(device).py()?;
    if let Some(n) = threads {
        if n < 1 {
            return Err(PyValueError::new_err(format!("threads={n}: must be at least 1")));
        }
        tch::set_num_threads(n);
    }
    let mut plan = match &resume {
        Some(path) => {
            if recipe_overrides.is_some_and(|d| !d.is_empty()) || init.is_some() {
                return Err(PyValueError::new_err("resume= continues a run with its saved recipe; it takes no recipe arguments or init="));
            }
            RunPlan::resume(path, out).py()?
        }
        None => {
            let model = ModelConfig { arch: parse("arch", arch, "'modern', 'classic'")?, head: parse("head", head, "'softmax', 'sigmoid'")? };
            let dataset: DatasetKind = parse("dataset", dataset, "'mnist', 'fashion-mnist'")?;
            let meta = CheckpointMeta::new(model, dataset, data.clone(), recipe(recipe_overrides)?, checkpoint_every);
            RunPlan::new(meta, init.map_or(Start::Fresh, Start::Init), out).py()?
        }
    };
    // The caller's tensors, checked here; else the plan's data set is read from disk.
    let splits = match (images, labels, test_images, test_labels) {
        (None, None, None, None) => None,
        (Some(images), Some(labels), Some(test_images), Some(test_labels)) => Some(Splits {
            train: tensors_dataset(images, labels, "images", device)?,
            test: tensors_dataset(test_images, test_labels, "test_images", device)?,
        }),
        _ => {
            return Err(PyValueError::new_err(
                "pass images, labels, test_images and test_labels together (the run evaluates on the test tensors after every epoch), or none to use the data set",
            ))
        }
    };
    plan.invocation = invocation.into_iter().collect();
    let mut watcher = NotebookWatcher { progress, notes: vec![], raised: None };
    let end = py.allow_threads(|| run::train(plan, device, splits, &mut watcher)).py()?;
    warn_notes(py, &watcher.notes)?;
    match end {
        RunEnd::Finished(trained) => {
            let history = to_python(py, &trained.history)?;
            let trained = *trained;
            let model = PyLeNet5 { model: Model::native(trained.vs, trained.net, Some(trained.card)) };
            match watcher.raised {
                Some(e) => Err(e),
                None => Ok((model, history)),
            }
        }
        RunEnd::Stopped { state, dir } => {
            let message = format!(
                "stopped after step {} (epoch {}); checkpoint saved in {}; resume with lenet5.train(resume={:?})",
                state.step,
                state.epoch,
                dir.join(CHECKPOINT_FILE).display(),
                dir.display().to_string()
            );
            match watcher.raised {
                Some(e) if e.is_instance_of::<PyKeyboardInterrupt>(py) => Err(PyKeyboardInterrupt::new_err(message)),
                Some(e) => Err(e),
                None => Err(PyRuntimeError::new_err(message)),
            }
        }
    }
}

/// A matrix from a string (`"11100/01110/..."` or rows of numbers), a list of rows or a 2-D
/// tensor, checked as `lenet5 conv` checks its files.
fn matrix(value: &Bound<'_, PyAny>, what: &str) -> PyResult<walkthrough::Matrix> {
    let text = if let Ok(s) = value.downcast::<PyString>() {
        s.to_string()
    } else {
        let rows: Vec<Vec<f64>> = match value.extract::<Dense>() {
            Ok(t) if t.dim() == 2 => Vec::<Vec<f64>>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Double)).py()?,
            Ok(t) => return Err(PyValueError::new_err(format!("{what}: a 2-D tensor is needed, got shape {:?}", t.size()))),
            Err(e) if e.is_instance_of::<PyValueError>(value.py()) => return Err(PyValueError::new_err(format!("{what}: {}", e.value(value.py())))),
            Err(_) => value.extract().map_err(|_| PyTypeError::new_err(format!("{what}: expected a string, a list of rows of numbers or a 2-D tensor")))?,
        };
        // Through the text form, so every check (and its message) is `lenet5 conv`'s own;
        // Rust prints floats so that they parse back exactly.
        rows.iter().map(|r| r.iter().map(|v| format!("{v:?}")).collect::<Vec<_>>().join(" ")).collect::<Vec<_>>().join("\n")
    };
    walkthrough::parse_matrix(&text, what).py()
}

/// The convolution walkthrough as data: each window's `(input, filter)` terms and sum, and
/// the output by the plain loop and by libtorch's conv2d (the numbers `lenet5 conv` prints).
#[pyfunction]
#[pyo3(signature = (input = None, filter = None, stride = 1, padding = 0))]
fn conv<'py>(
    py: Python<'py>,
    input: Option<&Bound<'py, PyAny>>,
    filter: Option<&Bound<'py, PyAny>>,
    stride: usize,
    padding: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let input = match input {
        Some(v) => matrix(v, "input")?,
        None => walkthrough::parse_compact(walkthrough::CLASSIC_INPUT),
    };
    let filter = match filter {
        Some(v) => matrix(v, "filter")?,
        None => walkthrough::parse_compact(walkthrough::CLASSIC_FILTER),
    };
    walkthrough::check_shapes(&input, &filter, stride, padding).py()?;
    let windows = walkthrough::windows(&input, &filter, stride, padding);
    let ow = walkthrough::output_size(input[0].len(), filter[0].len(), stride, padding);
    let out = PyDict::new(py);
    out.set_item("windows", to_python(py, &windows)?)?;
    out.set_item("output", walkthrough::sums(&windows, ow))?;
    out.set_item("libtorch", walkthrough::torch_conv2d(&input, &filter, stride, padding).py()?)?;
    Ok(out)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyLeNet5>()?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(conv, m)?)?;
    m.add("DEFAULT_RECIPE", to_python(m.py(), &TrainConfig::DEFAULT)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
