//! Link-time glue for libtorch: an rpath so binaries and tests run without LD_LIBRARY_PATH,
//! and libtorch linked unconditionally so its CUDA half is loaded on GPU machines.

fn main() {
    // torch-sys (`links = "tch"`) tells its direct dependents where libtorch's libraries are.
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        // The wheel's `torch/version.py` says which libtorch we build against, for `lenet5 info`.
        let version_py = std::path::Path::new(&lib).join("../version.py");
        let version = std::fs::read_to_string(&version_py)
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("__version__ = ").map(|v| v.trim_matches(['\'', '"']).to_string()))
            })
            .unwrap_or_else(|| "unknown".into());
        println!("cargo:rustc-env=LENET5_LIBTORCH_VERSION={version}");
        println!("cargo:rerun-if-changed={}", version_py.display());
    }
    // Nothing in our code references libtorch_cuda's symbols, so with --as-needed the linker
    // would drop it and `Cuda::is_available()` would be false even on a GPU machine
    // (tch-rs issues #907, #830). `-ltorch` pulls libtorch_cuda in through libtorch.so.
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rerun-if-changed=build.rs");
}
