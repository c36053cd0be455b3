//! Training through the library: a few thousand MNIST images must take a fresh LeNet-5 from
//! chance to above 90% test accuracy (85% for the slower-learning classic variant with
//! sigmoid outputs). Needs MNIST in data/mnist (scripts/setup).

use lenet5::data::{self, DatasetKind};
use lenet5::model::{Arch, Head, LeNet5, ModelConfig};
use lenet5::schedule::ScheduleKind;
use lenet5::optim::{OptimizerConfig, OptimizerKind};
use lenet5::train::{evaluate, NoCheckpoints, Outcome, TrainConfig, TrainState, Trainer};
use tch::nn::{Module, VarStore};
use tch::{Device, Tensor};

fn recipe() -> TrainConfig {
    TrainConfig {
        epochs: 3,
        batch_size: 64,
        test_batch_size: 1000,
        optimizer: OptimizerConfig { weight_decay: 1e-4, ..OptimizerConfig::new(OptimizerKind::Adamw, 3e-3) },
        schedule: ScheduleKind::Onecycle,
        gamma: 0.7,
        cycle_momentum: true,
        shift: 0,
        seed: 3,
        limit_train: Some(5000),
        dry_run: false,
    }
}

#[test]
fn a_few_thousand_images_lift_accuracy_from_chance_to_above_90_percent() {
    tch::set_num_threads(1);
    let splits = data::load(DatasetKind::Mnist, None).expect("MNIST in data/mnist: run scripts/setup");
    // The 1998 variant with per-class sigmoids learns more slowly (tanh, averaged
    // subsampling, ten independent binary losses), so its bar after the same run is lower.
    for (arch, head, bar) in [(Arch::Modern, Head::Softmax, 0.9), (Arch::Classic, Head::Sigmoid, 0.85)] {
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let net = LeNet5::new(&vs.root(), ModelConfig { arch, head });
        let forward = |xs: &Tensor| -> anyhow::Result<Tensor> { Ok(net.forward(xs)) };
        let before = evaluate(&forward, head, &splits.test, 1000).unwrap().accuracy();
        assert!(before < 0.2, "{arch:?}/{head:?}: an untrained model scored {before}");
        let config = recipe();
        let trainer = Trainer { config: &config, head, background: DatasetKind::Mnist.normalization().background(), batch_order: None, checkpoint_every: None };
        let mut opt = trainer.optimizer(&net, &vs).unwrap();
        let Outcome::Finished(history) = trainer.run(&net, &vs, &mut opt, &splits, TrainState::default(), &mut NoCheckpoints).unwrap() else { panic!("nothing asked the run to stop") };
        let after = evaluate(&forward, head, &splits.test, 1000).unwrap().accuracy();
        assert!(after > bar, "{arch:?}/{head:?}: {after} after 3 epochs of 5,000 images");
        assert_eq!(history.len(), 3);
        assert_eq!(history[2].test_accuracy, after, "the history's last test accuracy is the final one");
    }
}
