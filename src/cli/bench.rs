//! `lenet5 bench`: the Rust half of `scripts/bench`. Each call measures one thing (training
//! steps, evaluation, single-image latency, time to 99%, the machine's float32 peak) through
//! the library's own code paths and prints the figures, with the speed rows' GFLOP/s, as one
//! JSON object with `--json`, so the harness can compare them with PyTorch's and with the
//! peak. Its Python twin is the `--child` mode of `scripts/bench`.

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use lenet5::data::{self, Splits};
use lenet5::direct::peak;
use lenet5::inference::evaluate::evaluate;
use lenet5::inference::{Engine, LoadOptions, Model};
use lenet5::model::flops::{inference_flop, training_flop};
use lenet5::model::{Arch, LeNet5, ModelConfig};
use lenet5::training::{no_checkpoints, EpochMetrics, Outcome, TrainConfig, TrainState, Trainer, Watcher};

use super::{DataArgs, RuntimeArgs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Measure {
    /// Steady-state training throughput: `Trainer::run` on random batches, warm-up excluded.
    Train,
    /// Evaluation throughput of `--model` on the test set (`train::evaluate`).
    Eval,
    /// Single-image latency of `--model` (weights run by this crate's LeNet5), with the
    /// median time of each stage of the forward pass.
    Latency,
    /// Single-image latency of a TorchScript `--model` run by libtorch's interpreter.
    LatencyScript,
    /// Training seconds (evaluation excluded) until the test accuracy first reaches
    /// `--target`, with the default recipe of `lenet5 train`.
    #[value(name = "time-to-99")]
    TimeTo99,
    /// The machine's float32 FMA peak on `--threads` threads (and on one), measured by the
    /// best of `--steps` trials, beside the theoretical peak.
    Peak,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(long, value_enum)]
    pub what: Measure,
    /// Batch size [default: 256 train, 1000 eval, 1 latency; time-to-99: the recipe's 128].
    #[arg(long)]
    pub batch_size: Option<i64>,
    /// time-to-99: epochs the one-cycle schedule is planned for [default: the recipe's 8].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// time-to-99: peak learning rate [default: the recipe's 3e-3].
    #[arg(long)]
    pub lr: Option<f64>,
    /// time-to-99: the run's seed [default: the recipe's 1].
    #[arg(long)]
    pub seed: Option<i64>,
    /// train and time-to-99: the variant trained [default: modern].
    #[arg(long, value_parser = super::named::<Arch>(Arch::NAMES))]
    pub arch: Option<Arch>,
    /// Timed training steps, passes over the test set, calls, or peak trials [default: 200, 5,
    /// 2000, 5].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Untimed steps, passes or calls before timing starts [default: 20, 1, 200].
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Model file for eval and latency [default: models/mnist/lenet5.safetensors;
    /// models/mnist/lenet5.pt for latency-script].
    #[arg(long, value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// Test accuracy that time-to-99 waits for.
    #[arg(long, default_value_t = 0.99)]
    pub target: f64,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// The engine of eval and latency, and of the training steps of train and time-to-99.
    #[command(flatten)]
    pub compute: super::EngineArgs,
    /// Print the JSON object on one line (for scripts/bench) instead of indented.
    #[arg(long)]
    pub json: bool,
}

/// Single-image latency cycles through this many test images.
const LATENCY_IMAGES: i64 = 1000;

pub fn run(args: &BenchArgs) -> Result<()> {
    let device = args.runtime.apply()?;
    let threads = tch::get_num_threads(); // before the direct engine takes them from libtorch
    let (batch, steps, warmup) = match args.what {
        Measure::Train => (256, 200, 20),
        Measure::Eval => (1000, 5, 1),
        Measure::Latency | Measure::LatencyScript => (1, 2000, 200),
        Measure::TimeTo99 => (0, 0, 0), // the recipe decides
        Measure::Peak => (0, 5, 0),
    };
    ensure!(
        args.what == Measure::TimeTo99 || (args.epochs.is_none() && args.lr.is_none() && args.seed.is_none()),
        "--epochs, --lr and --seed change the recipe of time-to-99 only"
    );
    ensure!(
        args.what != Measure::Peak || (args.batch_size.is_none() && args.warmup.is_none() && args.model.is_none()),
        "--batch-size, --warmup and --model mean nothing to peak"
    );
    ensure!(
        matches!(args.what, Measure::Train | Measure::TimeTo99) || args.arch.is_none(),
        "--arch is for train and time-to-99; eval and latency take the variant from --model"
    );
    let batch = args.batch_size.unwrap_or(batch);
    let steps = args.steps.unwrap_or(steps);
    let warmup = args.warmup.unwrap_or(warmup);
    ensure!(
        batch > 0 || matches!(args.what, Measure::TimeTo99 | Measure::Peak),
        "--batch-size {batch}: must be at least 1"
    );
    ensure!(steps > 0 || args.what == Measure::TimeTo99, "--steps {steps}: must be at least 1");
    let mut out = match args.what {
        Measure::Train => train_throughput(args, device, batch, steps, warmup)?,
        Measure::Eval => eval_throughput(args, device, batch, steps, warmup)?,
        Measure::Latency | Measure::LatencyScript => latency(args, device, batch, steps, warmup)?,
        Measure::TimeTo99 => time_to_target(args, device)?,
        Measure::Peak => {
            ensure!(device == Device::Cpu, "--what peak measures the CPU: leave out --device");
            machine_peak(threads.max(1) as usize, steps)
        }
    };
    out["what"] = json!(args.what.to_possible_value().map(|v| v.get_name().to_string()));
    out["side"] = json!("rust");
    out["device"] = json!(lenet5::device::name(device));
    out["threads"] = json!(threads);
    out["libtorch"] = json!(lenet5::LIBTORCH_VERSION);
    out["peak_rss_mib"] = json!(peak_rss_mib());
    if args.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

/// GFLOP/s of `flop` done `per_second` times a second.
fn gflops(flop: i64, per_second: f64) -> f64 {
    flop as f64 * per_second / 1e9
}

/// The float32 FMA peak on `threads` threads and on one (what a single image gets from the
/// direct engine, which does not split it), beside the theoretical peak of `threads`.
fn machine_peak(threads: usize, trials: usize) -> Value {
    let measured = peak::measure(threads, trials);
    let one = if threads > 1 { peak::measure(1, trials) } else { measured.clone() };
    let theoretical = peak::theoretical(threads);
    json!({
        "gflops": measured.gflops, "one_thread_gflops": one.gflops, "theoretical_gflops": theoretical.gflops,
        "fma_per_cycle": theoretical.fma_per_cycle(&measured), "trials": trials,
        "measured": measured, "one_thread": one, "theoretical": theoretical,
    })
}

/// Waits for queued CUDA work, so a clock read afterwards includes it (CPU ops are synchronous).
fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// This process's peak resident memory (`VmHWM`, as the Python side reads it), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024.0)
}

/// Both splits on `device`, and a freshly initialised model (`--seed`, else 1; `--arch`) of the
/// default recipe.
fn setup_training(args: &BenchArgs, device: Device) -> Result<(TrainConfig, Splits, VarStore, LeNet5)> {
    let recipe = TrainConfig::DEFAULT;
    let data = data::load(args.data.dataset, args.data.data.as_deref())?;
    let data = data.to_device(device);
    tch::manual_seed(args.seed.unwrap_or(recipe.seed));
    let vs = VarStore::new(device);
    let net = LeNet5::new(
        &vs.root(),
        ModelConfig { arch: args.arch.unwrap_or(ModelConfig::DEFAULT.arch), ..ModelConfig::DEFAULT },
    );
    Ok((recipe, data, vs, net))
}

/// Clocks `Trainer::run` from the end of step `warmup` to the end of step `warmup + steps`,
/// then asks it to stop. `should_stop` is asked after every step.
struct StepClock {
    warmup: usize,
    steps: usize,
    device: Device,
    taken: usize,
    started: Option<Instant>,
    seconds: f64,
}

impl Watcher for StepClock {
    fn should_stop(&mut self) -> bool {
        self.taken += 1;
        if self.taken == self.warmup {
            sync(self.device);
            self.started = Some(Instant::now());
        }
        if self.taken == self.warmup + self.steps {
            sync(self.device);
            self.seconds = self.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
            return true;
        }
        false
    }
}

fn train_throughput(args: &BenchArgs, device: Device, batch: i64, steps: usize, warmup: usize) -> Result<Value> {
    ensure!(warmup > 0, "--warmup 0: training needs at least one untimed step");
    let (recipe, data, vs, net) = setup_training(args, device)?;
    let config = TrainConfig { batch_size: batch, engine: args.compute.engine, ..recipe };
    // Random batches given as a batch order, one row per step, plus one spare row so the
    // run stops before its epoch ends (and evaluates).
    let rows = (warmup + steps + 1) as i64;
    let order = Tensor::randint(data.train.len(), [rows, batch], (Kind::Int64, Device::Cpu));
    let norm = args.data.dataset.normalization();
    let trainer = Trainer {
        config: &config,
        head: net.config.head,
        background: norm.background(),
        batch_order: Some(order),
        checkpoint_every: None,
    };
    let mut clock = StepClock { warmup, steps, device, taken: 0, started: None, seconds: 0.0 };
    let mut opt = trainer.optimizer(&net, &vs)?;
    match trainer.run(&net, &vs, &mut opt, &data, TrainState::default(), &mut clock, &mut no_checkpoints)? {
        Outcome::Stopped(_) => {}
        Outcome::Finished { .. } => bail!("the run ended before {} steps", warmup + steps),
    }
    let seconds = clock.seconds;
    let (images_per_s, flop) = ((steps as f64 * batch as f64) / seconds, training_flop());
    Ok(json!({
        "batch_size": batch, "steps": steps, "warmup": warmup, "seconds": seconds, "images_per_s": images_per_s,
        "flop_per_image": flop, "gflops": gflops(flop, images_per_s),
        "arch": net.config.arch.as_str(), "recipe": config,
    }))
}

fn load_model(args: &BenchArgs, device: Device) -> Result<(PathBuf, Model)> {
    let default =
        if args.what == Measure::LatencyScript { "models/mnist/lenet5.pt" } else { "models/mnist/lenet5.safetensors" };
    let path = args.model.clone().unwrap_or_else(|| PathBuf::from(default));
    let classifier = Model::load(&path, &LoadOptions::default(), device)?.with_engine(args.compute.engine)?;
    if args.what == Measure::LatencyScript && classifier.lenet5().is_some() {
        bail!("{}: latency-script needs a TorchScript module (lenet5 export writes NAME.pt)", path.display());
    }
    Ok((path, classifier))
}

fn eval_throughput(args: &BenchArgs, device: Device, batch: i64, passes: usize, warmup: usize) -> Result<Value> {
    let (path, classifier) = load_model(args, device)?;
    let test = data::load_test(args.data.dataset, args.data.data.as_deref(), args.data.dataset.normalization())?
        .to_device(device);
    let forward = |xs: &Tensor| classifier.forward(xs);
    for _ in 0..warmup {
        evaluate(&forward, classifier.head(), &test, batch)?;
    }
    sync(device);
    let started = Instant::now();
    let mut metrics = None;
    for _ in 0..passes {
        // evaluate reads its counts back to the CPU, so each pass has finished when it returns.
        metrics = Some(evaluate(&forward, classifier.head(), &test, batch)?);
    }
    let seconds = started.elapsed().as_secs_f64();
    let accuracy = metrics.context("no pass was timed")?.accuracy();
    let (images_per_s, flop) = ((passes as f64 * test.len() as f64) / seconds, inference_flop());
    Ok(json!({
        "model": path, "engine": classifier.engine().as_str(), "batch_size": batch, "passes": passes, "warmup": warmup, "seconds": seconds,
        "images_per_s": images_per_s, "accuracy": accuracy,
        "flop_per_image": flop, "gflops": gflops(flop, images_per_s),
    }))
}

fn latency(args: &BenchArgs, device: Device, batch: i64, calls: usize, warmup: usize) -> Result<Value> {
    let (path, classifier) = load_model(args, device)?;
    let test = data::load_test(args.data.dataset, args.data.data.as_deref(), args.data.dataset.normalization())?
        .to_device(device);
    let inputs: Vec<Tensor> = (0..LATENCY_IMAGES.min(test.len() / batch).max(1))
        .map(|i| test.inputs_range(i * batch, batch)) // (batch, 1, 32, 32)
        .collect();
    let mut micros = Vec::with_capacity(calls);
    tch::no_grad(|| -> Result<()> {
        for i in 0..warmup + calls {
            let started = Instant::now();
            let _logits = classifier.forward(&inputs[i % inputs.len()])?;
            sync(device);
            if i >= warmup {
                micros.push(started.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(())
    })?;
    let (median_us, flop) = (quantile(&mut micros, 0.5), inference_flop());
    let mut out = json!({
        "model": path, "engine": classifier.engine().as_str(), "batch_size": batch, "calls": calls, "warmup": warmup,
        "median_us": median_us, "p99_us": quantile(&mut micros, 0.99), "min_us": quantile(&mut micros, 0.0),
        "flop_per_image": flop, "gflops": gflops(flop * batch, 1e6 / median_us),
    });
    if let (Some((_, net)), Engine::Libtorch) = (classifier.lenet5(), classifier.engine()) {
        out["stages_median_us"] = stage_medians(net, &inputs, calls, device);
    }
    Ok(out)
}

/// The `q` quantile of `values` (nearest rank), as the Python side computes it: Python's
/// `round` takes a half to the even neighbour.
fn quantile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * q).round_ties_even() as usize]
}

/// Median microseconds of each stage of the forward pass (C1 is conv1 and its activation,
/// F5 includes the flatten), timed through `forward_observed`: where a single image's time goes.
fn stage_medians(net: &LeNet5, inputs: &[Tensor], calls: usize, device: Device) -> Value {
    let stages = &lenet5::model::STAGES[1..];
    let mut micros = vec![Vec::with_capacity(calls); stages.len()];
    tch::no_grad(|| {
        for i in 0..calls {
            let (mut k, mut last) = (0, Instant::now());
            let _logits = net.forward_observed(&inputs[i % inputs.len()], &mut |stage, _| {
                if stage != "input" {
                    sync(device);
                    micros[k].push(last.elapsed().as_secs_f64() * 1e6);
                    k += 1;
                }
                last = Instant::now();
            });
        }
    });
    let medians: serde_json::Map<String, Value> =
        stages.iter().zip(micros.iter_mut()).map(|(name, m)| (name.to_string(), json!(quantile(m, 0.5)))).collect();
    Value::Object(medians)
}

/// Stops a run at the first epoch whose test accuracy reaches `target`.
struct StopAtAccuracy {
    target: f64,
    reached: Option<EpochMetrics>,
}

impl Watcher for StopAtAccuracy {
    fn epoch_done(&mut self, metrics: &EpochMetrics, _epochs: usize) {
        if self.reached.is_none() && metrics.test_accuracy.is_some_and(|a| a >= self.target) {
            self.reached = Some(metrics.clone());
        }
    }

    fn should_stop(&mut self) -> bool {
        self.reached.is_some()
    }
}

fn time_to_target(args: &BenchArgs, device: Device) -> Result<Value> {
    let (mut recipe, data, vs, net) = setup_training(args, device)?;
    recipe.epochs = args.epochs.unwrap_or(recipe.epochs);
    recipe.batch_size = args.batch_size.unwrap_or(recipe.batch_size);
    recipe.optimizer.lr = args.lr.unwrap_or(recipe.optimizer.lr);
    recipe.seed = args.seed.unwrap_or(recipe.seed);
    recipe.engine = args.compute.engine;
    recipe.validate()?;
    let config = recipe;
    let norm = args.data.dataset.normalization();
    let trainer = Trainer {
        config: &config,
        head: net.config.head,
        background: norm.background(),
        batch_order: None,
        checkpoint_every: None,
    };
    let mut observer = StopAtAccuracy { target: args.target, reached: None };
    let mut opt = trainer.optimizer(&net, &vs)?;
    let history =
        match trainer.run(&net, &vs, &mut opt, &data, TrainState::default(), &mut observer, &mut no_checkpoints)? {
            Outcome::Finished { history, .. } => history,
            Outcome::Stopped(state) => state.history,
        };
    let last = history.last().context("training ran no epoch")?;
    let row = observer.reached.as_ref().unwrap_or(last);
    Ok(json!({
        "target": args.target, "reached": observer.reached.is_some(),
        "seconds": row.seconds, "epochs": row.epoch, "test_accuracy": row.test_accuracy,
        "batch_size": config.batch_size, "arch": net.config.arch.as_str(), "recipe": config, "history": history,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank_as_in_python() {
        // scripts/bench: sorted(values)[round((len - 1) * q)]
        let mut values: Vec<f64> = (1..=101).rev().map(f64::from).collect();
        assert_eq!(quantile(&mut values, 0.5), 51.0);
        assert_eq!(quantile(&mut values, 0.99), 100.0);
        assert_eq!(quantile(&mut values, 0.0), 1.0);
        // Ten values: the median's rank is 4.5, which Python rounds to 4 (round half to even).
        let mut ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(quantile(&mut ten, 0.5), 5.0);
    }

    #[test]
    fn the_step_clock_times_exactly_the_steps_after_warm_up() {
        let mut clock = StepClock { warmup: 2, steps: 3, device: Device::Cpu, taken: 0, started: None, seconds: 0.0 };
        let stops: Vec<bool> = (0..5).map(|_| clock.should_stop()).collect();
        assert_eq!(stops, [false, false, false, false, true]);
        assert!(clock.started.is_some() && clock.seconds > 0.0);
    }

    #[test]
    fn peak_memory_is_read_from_proc() {
        assert!(peak_rss_mib().is_some_and(|mib| mib > 1.0));
    }
}
