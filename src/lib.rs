//! lenet5: LeNet-5 in Rust on libtorch (through tch), trained on MNIST and interchangeable
//! with PyTorch. The binary in `main.rs` is a thin shell over this library.

pub mod atomic;
pub mod card;
pub mod checkpoint;
pub mod conv;
pub mod data;
pub mod device;
pub mod direct;
pub mod export;
pub mod handwriting;
pub mod model;
pub mod optim;
pub mod pictures;
pub mod predict;
pub mod run;
pub mod schedule;
pub mod serve;
pub mod torch_checkpoint;
pub mod torch_pickle;
pub mod train;
pub mod visualize;
pub mod weights;

/// The tch crate this was built with (kept in step with Cargo.toml's `=` pin).
pub const TCH_VERSION: &str = "0.24.0";
/// The libtorch this was built against, read from the wheel by `build.rs`.
pub const LIBTORCH_VERSION: &str = env!("LENET5_LIBTORCH_VERSION");

/// The command-line spelling of a value enum (`modern`, `fashion-mnist`), for messages and
/// folder names.
pub fn flag_name(v: &impl clap::ValueEnum) -> String {
    v.to_possible_value().map(|p| p.get_name().to_string()).unwrap_or_default()
}
