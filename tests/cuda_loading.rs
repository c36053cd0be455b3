//! The binaries link libtorch without its CUDA half and load it at run time
//! (`device::load_cuda`). A test binary of its own: libtorch settles whether it has CUDA once
//! per process, at the first question.

use tch::{Device, Kind, Tensor};

fn cuda_tensor_error() -> String {
    match Tensor::f_zeros([1], (Kind::Float, Device::Cuda(0))) {
        Ok(_) => "made a CUDA tensor".into(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn loading_libtorch_cuda_at_run_time_registers_its_cuda_kernels() {
    // Before, the call fails with "Could not run 'aten::empty.memory_format' with arguments from
    // the 'CUDA' backend"; after, CUDA's own kernel runs (and, without a GPU, finds no driver).
    lenet5::device::load_torch_cuda().expect("the project's libtorch (the PyPI wheel) has libtorch_cuda.so");
    let err = cuda_tensor_error();
    assert!(!err.contains("'CUDA' backend"), "libtorch has no CUDA kernels after loading libtorch_cuda: {err}");
    // libtorch's CUDA hooks, which `Cuda::device_count` asks, are CUDA's and not the stub
    // that cannot tell cuDNN's version.
    assert!(tch::utils::version_cudnn() > 0);
}
