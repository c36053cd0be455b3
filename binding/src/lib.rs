//! `import lenet5`: the Rust LeNet-5 as a Python module (PyO3 + pyo3-tch). A thin shell over
//! the library crate, like the CLI: it turns Python arguments into the library's values, maps
//! errors to Python exceptions, and passes `torch.Tensor`s through without copies (both sides
//! run on the one libtorch that `import torch` loaded). The model object itself is Python's
//! (`python/lenet5/model.py`, an `nn.Module` holding `nn.Parameter`s); it hands its tensors
//! to the functions here on every call, and the libtorch engine keeps none of them between
//! calls. Stubs: python/lenet5/_native.pyi.

use pyo3::exceptions::{PyFileNotFoundError, PyKeyboardInterrupt, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use pyo3_tch::PyTensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use lenet5::data::{self, Dataset, DatasetKind, Splits};
use lenet5::direct::{DirectNet, DirectTraining};
use lenet5::explain::conv as walkthrough;
use lenet5::formats::card::ModelCard;
use lenet5::formats::weights::{self, detect, first_line, Format};
use lenet5::inference::evaluate::evaluate as evaluate_model;
use lenet5::inference::{card_beside, model_file, Engine, LoadOptions, Model};
use lenet5::model::{
    forward_with, parameter_names, Arch, Head, LeNet5, ModelConfig, INPUT_SIZE, NUM_CLASSES, PARAMETERS,
};
use lenet5::setting::Suggestion;
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
        // libtorch's own message ends in a C++ backtrace: its reason is enough.
        return PyRuntimeError::new_err(first_line(&message).to_string());
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
fn parse<T: std::str::FromStr<Err = lenet5::setting::UnknownName>>(what: &str, value: &str) -> PyResult<T> {
    value.parse().map_err(|e: lenet5::setting::UnknownName| {
        let choices: Vec<String> = e.expected.iter().map(|n| format!("{n:?}")).collect();
        PyValueError::new_err(format!("{what}={value:?}: must be one of {}", choices.join(", ")))
    })
}

fn parse_config(arch: &str, head: &str) -> PyResult<ModelConfig> {
    Ok(ModelConfig { arch: parse("arch", arch)?, head: parse("head", head)? })
}

/// A `torch.Tensor` argument that libtorch can compute on here: dense (strided) and on the CPU
/// or a CUDA device. Anything else is refused before libtorch sees it, which would fail on it
/// inside a kernel (and tch would panic).
struct Dense(Tensor);

impl<'py> FromPyObject<'py> for Dense {
    fn extract_bound(obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        let tensor: PyTensor = obj.extract().map_err(|_| {
            PyTypeError::new_err(format!(
                "expected a torch.Tensor, got {}",
                obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
            ))
        })?;
        let layout = obj.getattr("layout")?.str()?.to_string();
        if layout != "torch.strided" {
            return Err(PyValueError::new_err(format!("a {layout} tensor: pass a dense one (.to_dense())")));
        }
        let device: String = obj.getattr("device")?.getattr("type")?.extract()?;
        if device != "cpu" && device != "cuda" {
            return Err(PyValueError::new_err(format!(
                "a tensor on the {device} device: lenet5 computes on cpu or cuda"
            )));
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

/// `e` with `what: ` in front of its message, of the same Python type (TypeError, ValueError).
fn named_err(py: Python<'_>, e: PyErr, what: &str) -> PyErr {
    let message = format!("{what}: {}", e.value(py));
    if e.is_instance_of::<PyTypeError>(py) {
        PyTypeError::new_err(message)
    } else {
        PyValueError::new_err(message)
    }
}

/// A dense tensor argument, named `what` in its errors (`fc3.bias: a tensor on the meta device`).
fn named_tensor(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Tensor> {
    obj.extract::<Dense>().map(|d| d.0).map_err(|e| named_err(obj.py(), e, what))
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
            "the inputs are on {} and the model on {}: move one with .to()",
            lenet5::device::name(x.device()),
            lenet5::device::name(device)
        )));
    }
    Ok(())
}

/// The Python model's ten parameters (`conv1.weight` ... `fc3.bias`, in [`PARAMETERS`] order)
/// as tensors sharing their TensorImpl (so autograd records what is computed with them),
/// checked before libtorch sees them: dense, float32, LeNet-5's shapes, all on one device.
fn model_parameters(params: &[Bound<'_, PyAny>]) -> PyResult<Vec<Tensor>> {
    if params.len() != PARAMETERS.len() {
        return Err(PyValueError::new_err(format!(
            "expected LeNet-5's {} parameters, got {}",
            PARAMETERS.len(),
            params.len()
        )));
    }
    let mut tensors: Vec<Tensor> = Vec::with_capacity(PARAMETERS.len());
    for (obj, (name, shape)) in params.iter().zip(PARAMETERS) {
        let t = named_tensor(obj, name)?;
        if t.kind() != Kind::Float {
            return Err(PyTypeError::new_err(format!(
                "{name} is {:?}: lenet5 computes in float32 (model.float())",
                t.kind()
            )));
        }
        if t.size() != shape {
            return Err(PyValueError::new_err(format!("{name} has shape {:?}; LeNet-5's is {shape:?}", t.size())));
        }
        if let Some(first) = tensors.first().filter(|f| f.device() != t.device()) {
            return Err(PyValueError::new_err(format!(
                "{name} is on {} and conv1.weight on {}: move the whole model with .to()",
                lenet5::device::name(t.device()),
                lenet5::device::name(first.device())
            )));
        }
        tensors.push(t);
    }
    Ok(tensors)
}

/// The ten tensors as [`forward_with`] takes them.
fn refs(tensors: &[Tensor]) -> [&Tensor; 10] {
    std::array::from_fn(|i| &tensors[i])
}

/// What a packed copy of the weights was made from; when any of it differs, it is made again.
#[derive(Debug, Clone, PartialEq)]
struct PackKey {
    arch: Arch,
    threads: usize,
    /// Each parameter's data pointer and version counter (`_version`, which every in-place
    /// change bumps: `opt.step()`, `load_state_dict`, `p.add_()` under no_grad). A change
    /// through `p.data` bypasses the counter; replacing a Parameter moves the pointer.
    tensors: [(usize, i64); 10],
}

impl PackKey {
    fn new(arch: Arch, params: &[Bound<'_, PyAny>], tensors: &[Tensor]) -> PyResult<PackKey> {
        let mut key = [(0, 0); 10];
        for ((slot, obj), t) in key.iter_mut().zip(params).zip(tensors) {
            *slot = (t.data_ptr() as usize, obj.getattr("_version")?.extract()?);
        }
        Ok(PackKey { arch, threads: tch::get_num_threads().max(1) as usize, tensors: key })
    }
}

/// The direct engine's weights for one Python model, in its own layouts (a copy: the loops
/// want the weights transposed and padded). Python's `LeNet5` keeps one per process: in a
/// child forked while another thread of the parent held its lock, the lock stays held.
#[pyclass(module = "lenet5._native", frozen)]
struct DirectEngine {
    /// Locked for the whole of a forward pass, repack included, so that no pass reads weights
    /// half repacked: Python threads may call one model at once (the GIL is released while it
    /// runs). A Mutex rather than a RwLock: each pass already spreads its batch over
    /// OpenMP's team. It is taken only with the GIL released, and the GIL is never taken
    /// while it is held, so the two locks cannot deadlock.
    packed: Mutex<Option<Packed>>,
}

struct Packed {
    /// The loops and their buffers for the backward pass.
    engine: DirectTraining,
    key: PackKey,
}

#[pymethods]
impl DirectEngine {
    #[new]
    fn new() -> DirectEngine {
        DirectEngine { packed: Mutex::new(None) }
    }
}

impl DirectEngine {
    /// `work` on the engine with the weights of `tensors`, repacked first if `key` says they
    /// changed since the last call.
    fn with_weights<T>(
        &self,
        key: PackKey,
        tensors: &[Tensor],
        work: impl FnOnce(&mut DirectTraining) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        // A pass that panicked leaves nothing half done that the key would not catch.
        let mut packed = self.packed.lock().unwrap_or_else(PoisonError::into_inner);
        if packed.as_ref().is_none_or(|p| p.key != key) {
            // The direct loops compute logits; the head is the caller's.
            let config = ModelConfig { arch: key.arch, head: Head::Softmax };
            let engine = match packed.take() {
                Some(Packed { mut engine, key: old }) if old.threads == key.threads => {
                    engine.net_mut().config = config;
                    engine.net_mut().reload(refs(tensors))?;
                    engine
                }
                _ => DirectNet::from_tensors(refs(tensors), config, key.threads)?.into(),
            };
            *packed = Some(Packed { engine, key });
        }
        work(&mut packed.as_mut().expect("packed above").engine)
    }

    /// Logits of `x`.
    fn forward(&self, key: PackKey, tensors: &[Tensor], x: &Tensor) -> anyhow::Result<Tensor> {
        self.with_weights(key, tensors, |engine| engine.net_mut().forward(x))
    }
}

/// How a forward pass runs: libtorch on the tensors themselves, or the direct engine on its
/// packed copy of them.
enum Runner<'a> {
    Libtorch(Arch),
    Direct(&'a DirectEngine, PackKey),
}

impl Runner<'_> {
    /// The runner for `direct` (None: libtorch), checking that the direct engine's model is on the CPU.
    fn new<'a>(
        arch: Arch,
        params: &[Bound<'_, PyAny>],
        tensors: &[Tensor],
        direct: Option<&'a Bound<'_, DirectEngine>>,
    ) -> PyResult<Runner<'a>> {
        let Some(engine) = direct else { return Ok(Runner::Libtorch(arch)) };
        if tensors[0].device() != Device::Cpu {
            return Err(PyValueError::new_err(format!(
                "the direct engine runs on the CPU and the model is on {}: set model.engine = 'libtorch' or call model.cpu()",
                lenet5::device::name(tensors[0].device())
            )));
        }
        Ok(Runner::Direct(engine.get(), PackKey::new(arch, params, tensors)?))
    }

    fn forward(&self, tensors: &[Tensor], x: &Tensor) -> anyhow::Result<Tensor> {
        match self {
            Runner::Libtorch(arch) => Ok(forward_with(*arch, refs(tensors), x, &mut |_, _| {})?),
            Runner::Direct(engine, key) => engine.forward(key.clone(), tensors, x),
        }
    }
}

/// Logits `[N, 10]` of `x` `[N, 1, 32, 32]` (float32, on the parameters' device) by the
/// model of `arch` with `params`: libtorch's ops on those very tensors (autograd records
/// them), or the direct engine's loops on its copy of them.
#[pyfunction]
#[pyo3(signature = (x, arch, params, direct = None))]
fn forward(
    py: Python<'_>,
    x: Dense,
    arch: &str,
    params: Vec<Bound<'_, PyAny>>,
    direct: Option<Bound<'_, DirectEngine>>,
) -> PyResult<PyTensor> {
    let arch = parse("arch", arch)?;
    let tensors = model_parameters(&params)?;
    check_batch(&x, tensors[0].device())?;
    let runner = Runner::new(arch, &params, &tensors, direct.as_ref())?;
    let x = x.0;
    py.allow_threads(move || runner.forward(&tensors, &x)).py().map(PyTensor)
}

/// The gradients of the ten parameters (`PARAMETERS` order and shapes) of the model of
/// `arch` with `params`, computed by the direct engine's loops from `d_logits`, the gradient
/// of some loss with respect to the logits of `x`: the backward pass of the Python twin's
/// autograd function (model.py `_DirectForward`).
#[pyfunction]
fn direct_backward(
    py: Python<'_>,
    x: Dense,
    arch: &str,
    params: Vec<Bound<'_, PyAny>>,
    direct: Bound<'_, DirectEngine>,
    d_logits: Dense,
) -> PyResult<Vec<PyTensor>> {
    let arch = parse("arch", arch)?;
    let tensors = model_parameters(&params)?;
    check_batch(&x, tensors[0].device())?;
    let Runner::Direct(engine, key) = Runner::new(arch, &params, &tensors, Some(&direct))? else {
        unreachable!("a direct engine was given")
    };
    let (x, d_logits) = (x.0, d_logits.0);
    let gradients =
        py.allow_threads(move || engine.with_weights(key, &tensors, |engine| engine.backward(&x, &d_logits))).py()?;
    Ok(gradients.into_iter().map(PyTensor).collect())
}

/// Every stage of the libtorch forward pass (input, C1, S2, C3, S4, F5, F6, output), by name.
#[pyfunction]
fn activations(
    py: Python<'_>,
    x: Dense,
    arch: &str,
    params: Vec<Bound<'_, PyAny>>,
) -> PyResult<Vec<(String, PyTensor)>> {
    let arch = parse("arch", arch)?;
    let tensors = model_parameters(&params)?;
    check_batch(&x, tensors[0].device())?;
    let x = x.0;
    let stages = py
        .allow_threads(move || {
            let mut stages = vec![];
            forward_with(arch, refs(&tensors), &x, &mut |name, t| stages.push((name.to_string(), t.shallow_clone())))
                .map(|_| stages)
        })
        .py()?;
    Ok(stages.into_iter().map(|(name, t)| (name, PyTensor(t))).collect())
}

/// Checks a state dict's `(name, tensor)` items whole against LeNet-5, as the CLI checks a
/// file's: RuntimeError (nn.Module's) with the CLI's grouped message when a tensor has the
/// wrong shape or dtype or, `strict`, when one is missing or unexpected. Returns the missing
/// and unexpected names.
#[pyfunction]
fn check_state_dict(
    items: Vec<(Bound<'_, PyAny>, Bound<'_, PyAny>)>,
    strict: bool,
) -> PyResult<(Vec<String>, Vec<String>)> {
    let mut given = BTreeMap::new();
    for (k, v) in items {
        let name: String =
            k.extract().map_err(|_| PyTypeError::new_err(format!("state_dict key {k}: not a string")))?;
        let t = named_tensor(&v, &format!("state_dict[{name:?}]"))?;
        given.insert(name, t);
    }
    let wanted: Vec<(String, Vec<i64>)> = PARAMETERS.iter().map(|(n, s)| (n.to_string(), s.to_vec())).collect();
    let fit = weights::check_state_dict(&wanted, &given, strict, "state_dict").map_err(|e| {
        // The check's own lines; its suggestion is the CLI's flag, so say it in Python's terms.
        let mut message = e.to_string();
        if let Some(s) = e.chain().find_map(|c| c.downcast_ref::<Suggestion>()) {
            message += &format!("\n({}: strip that prefix from the keys)", s.reason);
        }
        PyRuntimeError::new_err(message)
    })?;
    Ok((fit.missing, fit.unexpected))
}

/// A model as Python's `LeNet5` is built from it: arch, head, card, device and its tensors.
fn model_parts<'py>(
    py: Python<'py>,
    config: ModelConfig,
    card: Option<&ModelCard>,
    net: &LeNet5,
    device: Device,
) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    out.set_item("arch", config.arch.to_string())?;
    out.set_item("head", config.head.to_string())?;
    out.set_item("card", card.map(|c| to_python(py, c)).transpose()?)?;
    out.set_item("device", lenet5::device::name(device))?;
    let tensors: Vec<(String, PyTensor)> =
        net.parameters().into_iter().map(|(n, t)| (n, PyTensor(t.detach()))).collect();
    out.set_item("tensors", tensors)?;
    out.set_item("torchscript", false)?;
    Ok(out)
}

/// Reads any model file the CLI reads (run folder, safetensors + card, state dict `.pt`,
/// checkpoint dict, whole pickled module, tch `.ot`), recognised by content, into the parts
/// `lenet5.load` builds its model from. A TorchScript module is only recognised here (with its
/// card, if one is beside it): Python reads its tensors.
#[pyfunction]
#[pyo3(signature = (path, arch = None, head = None, engine = "libtorch", device = "cpu"))]
fn read<'py>(
    py: Python<'py>,
    path: PathBuf,
    arch: Option<&str>,
    head: Option<&str>,
    engine: &str,
    device: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let options = LoadOptions {
        arch: arch.map(|a| parse::<Arch>("arch", a)).transpose()?,
        head: head.map(|h| parse::<Head>("head", h)).transpose()?,
        key_maps: vec![],
    };
    let engine = parse::<Engine>("engine", engine)?;
    let device = lenet5::device::parse(device).py()?;
    if engine == Engine::Direct && device != Device::Cpu {
        return Err(PyValueError::new_err(format!(
            "engine='direct' runs on the CPU, not on {}: load the model with engine='libtorch' to use a GPU",
            lenet5::device::name(device)
        )));
    }
    let file = model_file(&path).py()?;
    if detect(&file).py()? == Format::TorchScript {
        let card = card_beside(&file).py()?;
        let out = PyDict::new(py);
        out.set_item("torchscript", true)?;
        out.set_item("path", &file)?;
        out.set_item("device", lenet5::device::name(device))?;
        out.set_item("arch", options.arch.or(card.as_ref().map(|c| c.model.arch)).map(|a| a.to_string()))?;
        let head = options.head.or(card.as_ref().map(|c| c.model.head));
        out.set_item("head", head.unwrap_or(Head::Softmax).to_string())?;
        let mut notes = vec![];
        if head.is_none() {
            notes.push(format!(
                "no model card {} beside {}; taking head softmax (a TorchScript module does not say)",
                lenet5::inference::card_path(&file).display(),
                file.display()
            ));
        }
        out.set_item("notes", notes)?;
        out.set_item("card", card.map(|c| to_python(py, &c)).transpose()?)?;
        return Ok(out);
    }
    let model = py.allow_threads(|| Model::load(&file, &options, device)).py()?;
    let card = model.card().cloned();
    let notes = model.notes().to_vec();
    let parts = model.into_parts().expect("not TorchScript: recognised above");
    let out = model_parts(py, parts.net.config, card.as_ref(), &parts.net, device)?;
    out.set_item("path", &file)?;
    out.set_item("notes", notes)?;
    Ok(out)
}

/// Writes the files `lenet5 export` writes for the model of `arch`/`head` with `params` and
/// `card` (JSON text, or None): PREFIX.pt (TorchScript), PREFIX.safetensors,
/// PREFIX.check.safetensors, PREFIX.onnx, PREFIX.pt2 (torch.export) and PREFIX.json (the card);
/// returns their paths.
#[pyfunction]
#[pyo3(signature = (prefix, data, arch, head, card, params))]
fn save(
    py: Python<'_>,
    prefix: PathBuf,
    data: Option<PathBuf>,
    arch: &str,
    head: &str,
    card: Option<String>,
    params: Vec<Bound<'_, PyAny>>,
) -> PyResult<Vec<PathBuf>> {
    let config = parse_config(arch, head)?;
    let card: Option<ModelCard> = card
        .map(|json| serde_json::from_str(&json))
        .transpose()
        .map_err(|e| PyValueError::new_err(format!("model.card: not a model card this program reads ({e})")))?;
    let tensors = model_parameters(&params)?;
    let invocation = vec![format!("LeNet5.save({:?})", prefix.display().to_string())];
    let at = prefix.clone();
    let card = py
        .allow_threads(move || -> anyhow::Result<ModelCard> {
            let mut vs = VarStore::new(Device::Cpu);
            let net = LeNet5::zeros(&vs.root(), config);
            let named = parameter_names().into_iter().zip(tensors.iter().map(Tensor::detach)).collect();
            weights::load_state_dict(&mut vs, named, &[], "the model's parameters")?;
            let model = Model::native(vs, net, card);
            lenet5::formats::export::export_loaded(&model, DatasetKind::Mnist, data.as_deref(), &at, false, invocation)
        })
        .py()?;
    let mut files: Vec<PathBuf> = card.files.values().map(|e| prefix.with_file_name(&e.name)).collect();
    files.push(lenet5::formats::export::with_suffix(&prefix, ".json"));
    Ok(files)
}

/// The caller's `images` `[N, 1, 32, 32]` (network inputs) and `labels` `[N]` as a data set,
/// checked; `what` names them in messages ("images", "test_images").
fn tensors_dataset(images: Dense, labels: Dense, what: &str, device: Device) -> PyResult<Dataset> {
    let n = images.size().first().copied().unwrap_or(0);
    check_batch(&images, device)
        .map_err(|e| Python::with_gil(|py| PyValueError::new_err(format!("{what}: {}", e.value(py)))))?;
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
        return Err(PyValueError::new_err(format!(
            "{labels_name} must be classes 0..{NUM_CLASSES}, found {lo}..={hi}"
        )));
    }
    Ok(Dataset::of_inputs(images.0, labels.0.to_device(device)))
}

/// The test split of `data` (or the data set's default folder), or the caller's tensors.
fn dataset_of(
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
/// `confusion[true][predicted]`) of the model of `arch`/`head` with `params` (run by the
/// `direct` engine, or libtorch when None) on the test set of `dataset` or on `images`/`labels`.
#[pyfunction]
#[pyo3(signature = (arch, head, dataset, params, direct = None, data = None, images = None, labels = None, batch_size = 1000))]
#[allow(clippy::too_many_arguments)]
fn evaluate<'py>(
    py: Python<'py>,
    arch: &str,
    head: &str,
    dataset: &str,
    params: Vec<Bound<'py, PyAny>>,
    direct: Option<Bound<'py, DirectEngine>>,
    data: Option<PathBuf>,
    images: Option<Dense>,
    labels: Option<Dense>,
    batch_size: i64,
) -> PyResult<Bound<'py, PyDict>> {
    if batch_size < 1 {
        return Err(PyValueError::new_err(format!("batch_size={batch_size}: must be at least 1")));
    }
    let config = parse_config(arch, head)?;
    let kind: DatasetKind = parse("dataset", dataset)?;
    let tensors = model_parameters(&params)?;
    let runner = Runner::new(config.arch, &params, &tensors, direct.as_ref())?;
    let test = dataset_of(images, labels, kind, data.as_deref(), tensors[0].device())?;
    let m = py
        .allow_threads(move || {
            let forward = |xs: &Tensor| runner.forward(&tensors, xs);
            evaluate_model(&forward, config.head, &test, batch_size)
        })
        .py()?;
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
/// `optimizer`, `schedule`, ...) over the named recipe `recipe="fast"` (by default "default":
/// [`TrainConfig::DEFAULT`]), checked as the CLI checks flags.
fn recipe(overrides: Option<&Bound<'_, PyDict>>) -> PyResult<TrainConfig> {
    use lenet5::training::recipe::Recipe;
    let named = match overrides.map(|d| d.get_item("recipe")).transpose()?.flatten() {
        Some(name) => {
            let name: String =
                name.extract().map_err(|_| PyTypeError::new_err(format!("recipe={name}: not a string")))?;
            parse::<Recipe>("recipe", &name)?
        }
        None => Recipe::Default,
    };
    let mut json = serde_json::to_value(named.config()).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    let fields = json.as_object_mut().expect("a recipe serialises as an object");
    let json_module = overrides.map(|d| d.py().import("json")).transpose()?;
    for (key, value) in overrides.into_iter().flat_map(|d| d.iter()) {
        let key: String = key.extract()?;
        if key == "recipe" {
            continue; // the starting point, taken above
        }
        if !fields.contains_key(&key) {
            let mut known: Vec<&String> = fields.keys().collect();
            known.sort();
            let known: Vec<&str> = known.iter().map(|k| k.as_str()).collect();
            return Err(PyTypeError::new_err(format!(
                "train() got an unexpected keyword argument {key:?}; the recipe's are {}",
                known.join(", ")
            )));
        }
        let text: String = json_module
            .as_ref()
            .expect("set when there are overrides")
            .call_method1("dumps", (&value,))
            .and_then(|t| t.extract())
            .map_err(|_| PyTypeError::new_err(format!("{key}={value}: not a number, string, bool, list or None")))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let default = &fields[&key];
        let fits = match (default, &value) {
            (serde_json::Value::Null, v) => v.is_null() || v.is_u64(), // optional counts (limit_train)
            (serde_json::Value::Number(_), v) => v.is_number(),
            (serde_json::Value::Bool(_), v) => v.is_boolean(),
            (serde_json::Value::String(_), v) => v.is_string(),
            (serde_json::Value::Array(d), serde_json::Value::Array(v)) => {
                d.len() == v.len() && v.iter().all(|x| x.is_number())
            }
            _ => false,
        };
        if !fits {
            return Err(PyTypeError::new_err(format!(
                "{key}={text}: expected {} like the default {default}",
                kind_of(default)
            )));
        }
        fields.insert(key, value);
    }
    let config: TrainConfig =
        serde_json::from_value(json).map_err(|e| PyValueError::new_err(format!("recipe: {e}")))?;
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
) -> PyResult<(Bound<'py, PyDict>, Bound<'py, PyAny>)> {
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
                return Err(PyValueError::new_err(
                    "resume= continues a run with its saved recipe; it takes no recipe arguments or init=",
                ));
            }
            RunPlan::resume(path, out).py()?
        }
        None => {
            let model = parse_config(arch, head)?;
            let dataset: DatasetKind = parse("dataset", dataset)?;
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
            let model = model_parts(py, trained.net.config, Some(&trained.card), &trained.net, trained.vs.device())?;
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
            Ok(t) => {
                return Err(PyValueError::new_err(format!("{what}: a 2-D tensor is needed, got shape {:?}", t.size())))
            }
            Err(e) if e.is_instance_of::<PyValueError>(value.py()) => {
                return Err(PyValueError::new_err(format!("{what}: {}", e.value(value.py()))))
            }
            Err(_) => value.extract().map_err(|_| {
                PyTypeError::new_err(format!("{what}: expected a string, a list of rows of numbers or a 2-D tensor"))
            })?,
        };
        // Through the text form, so every check (and its message) is `lenet5 conv`'s own;
        // Rust prints floats so that they parse back exactly.
        rows.iter()
            .map(|r| r.iter().map(|v| format!("{v:?}")).collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join("\n")
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
    m.add_class::<DirectEngine>()?;
    m.add_function(wrap_pyfunction!(forward, m)?)?;
    m.add_function(wrap_pyfunction!(direct_backward, m)?)?;
    m.add_function(wrap_pyfunction!(activations, m)?)?;
    m.add_function(wrap_pyfunction!(check_state_dict, m)?)?;
    m.add_function(wrap_pyfunction!(read, m)?)?;
    m.add_function(wrap_pyfunction!(save, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(conv, m)?)?;
    m.add("DEFAULT_RECIPE", to_python(m.py(), &TrainConfig::DEFAULT)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
