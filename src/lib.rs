//! lenet5: LeNet-5 in Rust on libtorch (through tch), trained on MNIST and interchangeable
//! with PyTorch. The binary (`main.rs`, `cli/`) and the Python binding are thin shells over it.

pub mod atomic;
pub mod data;
pub mod device;
pub mod direct;
pub mod explain;
pub mod formats;
pub mod inference;
pub mod model;
pub mod serve;
pub mod setting;
pub mod training;
pub mod values;

/// The tch crate this was built with (kept in step with Cargo.toml's `=` pin).
pub const TCH_VERSION: &str = "0.24.0";
/// The libtorch this was built against, read from the wheel by `build.rs`.
pub const LIBTORCH_VERSION: &str = env!("LENET5_LIBTORCH_VERSION");
