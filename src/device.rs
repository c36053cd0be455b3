//! Choosing where tensors live (`--device auto|cpu|cuda|cuda:N`), loading libtorch's CUDA
//! half where there is a GPU, and reporting what this libtorch can see, for `lenet5 info`.

use std::ffi::CString;

use anyhow::{bail, Result};
use tch::{Cuda, Device};

use crate::setting;

/// Loads libtorch's CUDA half (libtorch_cuda.so, with cuDNN, cuBLAS and the rest of the
/// wheel's CUDA libraries) where an NVIDIA driver is. The binaries do not link it: linked,
/// it was loaded on machines without a GPU too, more than half of every command's memory
/// and a third of its start-up (docs/speed.md). Call it before anything asks libtorch about
/// CUDA: libtorch settles whether it has CUDA once, at the first such question
/// (`at::detail::getCUDAHooks`).
/// Without a driver, or with a libtorch built without CUDA, it does nothing. The Python
/// binding does not need it: `import torch` loads libtorch_cuda itself.
pub fn load_cuda() -> Result<()> {
    if !torch_cuda_path().exists() || !dlopen("libcuda.so.1", libc::RTLD_LAZY | libc::RTLD_LOCAL) {
        return Ok(()); // a CPU-only libtorch, or no driver: no CUDA to be had
    }
    load_torch_cuda()
}

/// Where libtorch_cuda.so would be: beside the libtorch the binaries were built against.
fn torch_cuda_path() -> std::path::PathBuf {
    std::path::Path::new(option_env!("LENET5_LIBTORCH_LIB").unwrap_or("")).join("libtorch_cuda.so")
}

/// Loads libtorch_cuda.so into the process, whether or not there is a driver: its
/// initialisers register libtorch's CUDA kernels and hooks ([`load_cuda`]).
pub fn load_torch_cuda() -> Result<()> {
    let path = torch_cuda_path();
    if !dlopen(&path.to_string_lossy(), libc::RTLD_NOW | libc::RTLD_GLOBAL) {
        // SAFETY: dlerror returns the calling thread's last dl error, a C string or NULL.
        let why = unsafe { libc::dlerror() };
        let why = match why.is_null() {
            true => "unknown error".into(),
            // SAFETY: non-NULL: a NUL-terminated string dlerror owns until the next dl call.
            false => unsafe { std::ffi::CStr::from_ptr(why) }.to_string_lossy().into_owned(),
        };
        bail!("{}: cannot load libtorch's CUDA half, so CUDA is off: {why}", path.display());
    }
    Ok(())
}

/// Whether `dlopen(path, flags)` loaded the library.
fn dlopen(path: &str, flags: libc::c_int) -> bool {
    let path = CString::new(path).expect("a library path has no NUL");
    // SAFETY: dlopen runs the library's initialisers, which is what loading it is for.
    !unsafe { libc::dlopen(path.as_ptr(), flags) }.is_null()
}

/// Parses a `--device` value, refusing CUDA devices that libtorch cannot see.
pub fn parse(spec: &str) -> Result<Device> {
    let gpus = Cuda::device_count();
    let cuda = |index: usize| -> Result<Device> {
        if gpus == 0 {
            bail!(setting::invalid("device", spec, "CUDA was asked for but libtorch sees no CUDA device (use cpu)"));
        }
        if index as i64 >= gpus {
            bail!(setting::invalid("device", spec, format!("there is no CUDA device {index}; libtorch sees {gpus}")));
        }
        Ok(Device::Cuda(index))
    };
    match spec {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        _ => match spec.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(index)) => cuda(index),
            _ => bail!(setting::invalid("device", spec, "unknown device; expected auto, cpu, cuda or cuda:N")),
        },
    }
}

/// A human name for a device, for logs and result files.
pub fn name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// What `lenet5 info` prints: versions, threads, CUDA and cuDNN.
pub fn report() -> String {
    let gpus = Cuda::device_count();
    let mut lines = vec![
        format!("lenet5      {}", env!("CARGO_PKG_VERSION")),
        format!("tch         {}", crate::TCH_VERSION),
        format!("libtorch    {} (built against)", crate::LIBTORCH_VERSION),
        format!("threads     {} (intra-op)", tch::get_num_threads()),
        format!("mkldnn      {}", tch::utils::has_mkldnn()),
        format!("direct      {} (the direct engine)", crate::direct::instruction_set()),
        format!("cuda        {} ({} device{})", Cuda::is_available(), gpus, if gpus == 1 { "" } else { "s" }),
    ];
    if gpus > 0 {
        lines.push(format!("cudnn       {} (version {})", Cuda::cudnn_is_available(), tch::utils::version_cudnn()));
        lines.push(format!("cuda rt     {}", tch::utils::version_cudart()));
        for i in 0..gpus {
            lines.push(format!("device {i}    {}", gpu_name(i)));
        }
    }
    lines.join("\n")
}

/// tch has no binding for a GPU's name, so read the NVIDIA driver's own description
/// (`/proc/driver/nvidia/gpus/*/information`, in PCI bus order, which matches CUDA's order
/// on single-GPU machines and whenever CUDA_DEVICE_ORDER=PCI_BUS_ID).
fn gpu_name(index: i64) -> String {
    let mut dirs: Vec<_> = std::fs::read_dir("/proc/driver/nvidia/gpus")
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs.get(index as usize)
        .and_then(|d| std::fs::read_to_string(d.join("information")).ok())
        .and_then(|info| info.lines().find_map(|l| l.strip_prefix("Model:").map(|m| m.trim().to_string())))
        .unwrap_or_else(|| "(name not reported by the driver)".into())
}
