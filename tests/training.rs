//! Training through the library: a few thousand MNIST images must take a fresh LeNet-5 from
//! chance to above 90% test accuracy (85% for the slower-learning classic variant with
//! sigmoid outputs). Needs MNIST in data/mnist (scripts/setup).

use lenet5::data::{self, DatasetKind, Splits};
use lenet5::inference::evaluate::{evaluate, Metrics};
use lenet5::inference::Engine;
use lenet5::model::{Arch, Head, LeNet5, ModelConfig};
use lenet5::training::optim::{OptimizerConfig, OptimizerKind};
use lenet5::training::schedule::ScheduleKind;
use lenet5::training::{no_checkpoints, EpochMetrics, Evaluate, Outcome, TrainConfig, TrainState, Trainer, Unwatched};
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
        engine: Engine::Libtorch,
        ..TrainConfig::DEFAULT
    }
}

/// A trainer for `config` on MNIST's own normalisation, with the shuffled order and no checkpoints.
fn trainer(config: &TrainConfig, head: Head) -> Trainer<'_> {
    Trainer {
        config,
        head,
        background: DatasetKind::Mnist.normalization().background(),
        batch_order: None,
        checkpoint_every: None,
    }
}

/// `trainer`'s whole run of `net` (its weights in `vs`) from a fresh state: the epochs'
/// metrics and the final test.
fn run_to_the_end(trainer: &Trainer, net: &LeNet5, vs: &VarStore, splits: &Splits) -> (Vec<EpochMetrics>, Metrics) {
    let mut opt = trainer.optimizer(net, vs).unwrap();
    match trainer.run(net, vs, &mut opt, splits, TrainState::default(), &mut Unwatched, &mut no_checkpoints).unwrap() {
        Outcome::Finished { history, test } => (history, test),
        Outcome::Stopped(_) => panic!("nothing asked the run to stop"),
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
        let trainer = trainer(&config, head);
        let (history, test) = run_to_the_end(&trainer, &net, &vs, &splits);
        let after = evaluate(&forward, head, &splits.test, 1000).unwrap().accuracy();
        assert!(after > bar, "{arch:?}/{head:?}: {after} after 3 epochs of 5,000 images");
        assert_eq!(history.len(), 3);
        assert_eq!(history[2].test_accuracy, Some(after), "the history's last test accuracy is the final one");
        assert_eq!(test.accuracy(), after, "and so are the run's final metrics");
    }
}

/// Asks for a stop at one step: `should_stop` is asked once after every step.
struct StopAt {
    step: usize,
    asked: usize,
}

impl lenet5::training::Watcher for StopAt {
    fn should_stop(&mut self) -> bool {
        self.asked += 1;
        self.asked == self.step
    }
}

#[test]
fn a_stop_at_an_epochs_last_batch_takes_effect_after_the_epoch_and_one_inside_it_at_once() {
    tch::set_num_threads(1);
    let splits = data::load(DatasetKind::Mnist, None).expect("MNIST in data/mnist: run scripts/setup");
    let config = TrainConfig { limit_train: Some(640), batch_size: 64, test_batch_size: 1000, ..recipe() }; // 10 steps an epoch
    for (stop_at, epoch, batch, epochs_done) in [(10, 2, 0, 1), (13, 2, 3, 1)] {
        let vs = VarStore::new(Device::Cpu);
        let net = LeNet5::new(&vs.root(), ModelConfig { arch: Arch::Modern, head: Head::Softmax });
        let trainer = trainer(&config, Head::Softmax);
        let mut opt = trainer.optimizer(&net, &vs).unwrap();
        let mut observer = StopAt { step: stop_at, asked: 0 };
        let Outcome::Stopped(state) = trainer
            .run(&net, &vs, &mut opt, &splits, TrainState::default(), &mut observer, &mut no_checkpoints)
            .unwrap()
        else {
            panic!("a stop was asked for at step {stop_at}")
        };
        assert_eq!((state.step, state.epoch, state.batch, state.history.len()), (stop_at, epoch, batch, epochs_done));
    }
}

#[test]
fn evaluating_only_at_the_end_tests_the_last_epoch_alone_and_trains_the_same_weights() {
    tch::set_num_threads(1);
    let splits = data::load(DatasetKind::Mnist, None).expect("MNIST in data/mnist: run scripts/setup");
    let train = |evaluate: Evaluate| {
        let config = TrainConfig { limit_train: Some(640), epochs: 3, evaluate, ..recipe() };
        tch::manual_seed(config.seed);
        let vs = VarStore::new(Device::Cpu);
        let net = LeNet5::new(&vs.root(), ModelConfig { arch: Arch::Modern, head: Head::Softmax });
        let trainer = trainer(&config, Head::Softmax);
        let (history, test) = run_to_the_end(&trainer, &net, &vs, &splits);
        let mut weights: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        weights.sort_by(|a, b| a.0.cmp(&b.0));
        (history, test, weights)
    };
    let (every, every_test, every_weights) = train(Evaluate::EveryEpoch);
    let (end, end_test, end_weights) = train(Evaluate::End);
    assert!(every.iter().all(|m| m.test_accuracy.is_some() && m.test_loss.is_some()));
    let tested: Vec<bool> = end.iter().map(|m| m.test_accuracy.is_some()).collect();
    assert_eq!(tested, [false, false, true], "only the last epoch is tested");
    assert_eq!(end[2].test_accuracy, Some(end_test.accuracy()));
    assert_eq!((end_test.correct, end_test.total), (every_test.correct, 10_000));
    // Evaluation draws nothing from the random streams: the runs' weights agree bit for bit.
    for ((name, a), (other, b)) in every_weights.iter().zip(&end_weights) {
        assert!(name == other && a.equal(b), "{name}");
    }
    assert_eq!(
        end.iter().map(|m| m.train_loss).collect::<Vec<_>>(),
        every.iter().map(|m| m.train_loss).collect::<Vec<_>>()
    );
}
