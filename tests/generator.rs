//! libtorch's default generator is one per process, and the unit tests run in parallel threads
//! that draw from it, so what a build takes from it is checked here, in a test binary of its own.

use lenet5::model::{LeNet5, ModelConfig};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Four values drawn after `tch::manual_seed(11)` and `build`.
fn draw_after(build: &dyn Fn()) -> Vec<f32> {
    tch::manual_seed(11);
    build();
    Vec::<f32>::try_from(Tensor::rand([4], (Kind::Float, Device::Cpu))).unwrap()
}

#[test]
fn zeros_draws_nothing_from_the_generator_and_new_draws_from_it() {
    let untouched = draw_after(&|| {});
    let zeros = draw_after(&|| drop(LeNet5::zeros(&VarStore::new(Device::Cpu).root(), ModelConfig::DEFAULT)));
    let new = draw_after(&|| drop(LeNet5::new(&VarStore::new(Device::Cpu).root(), ModelConfig::DEFAULT)));
    assert_eq!(zeros, untouched);
    assert_ne!(new, untouched);
}
