//! Link-time glue for libtorch: an rpath so binaries and tests run without LD_LIBRARY_PATH,
//! the folder of libtorch's libraries (for loading its CUDA half where a GPU is), and the small
//! C++ file of ATen calls that tch does not bind (src/training/aten_ops.cpp); and the Rust types
//! of ONNX's protobuf messages (src/formats/onnx/onnx.proto), for NAME.onnx.

fn main() {
    onnx_messages();
    // torch-sys (`links = "tch"`) tells its direct dependents where libtorch's libraries are.
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        println!("cargo:rustc-env=LENET5_LIBTORCH_LIB={lib}");
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
        // The few ATen calls tch does not bind (see the file's comment), built against the
        // same libtorch headers torch-sys uses.
        let include = std::path::Path::new(&lib).join("../include");
        cc::Build::new()
            .cpp(true)
            .file("src/training/aten_ops.cpp")
            .include(&include)
            .flag("-std=c++17")
            .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
            .flag("-DGLOG_USE_GLOG_EXPORT")
            .warnings(false)
            .compile("lenet5_aten_ops");
        println!("cargo:rerun-if-changed=src/training/aten_ops.cpp");
    }
    // Nothing in our code references libtorch_cuda's symbols, so the linker (--as-needed)
    // leaves it and the CUDA libraries under it out: `device::load_cuda` loads them at run
    // time where there is a driver.
    println!("cargo:rerun-if-changed=build.rs");
}

/// prost-build's Rust types for onnx.proto into OUT_DIR/onnx.rs, the .proto parsed by protox
/// (pure Rust), so a fresh machine needs no `protoc`.
fn onnx_messages() {
    const PROTO: &str = "src/formats/onnx/onnx.proto";
    let descriptors = protox::compile([PROTO], ["src/formats/onnx"]).unwrap_or_else(|e| panic!("{PROTO}: {e}"));
    prost_build::Config::new()
        .disable_comments(["."]) // onnx.proto's comments are no Rust docs (rustdoc would run their examples)
        .compile_fds(descriptors)
        .unwrap_or_else(|e| panic!("{PROTO}: generating Rust types: {e}"));
    println!("cargo:rerun-if-changed={PROTO}");
}
