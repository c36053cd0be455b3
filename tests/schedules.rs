//! Every learning rate and momentum of every schedule, step by step, against PyTorch's own
//! lr_scheduler classes run in the project's venv: equal to the last bit (tolerance 0).

use lenet5::training::optim::Hyper;
use lenet5::training::schedule::{Schedule, ScheduleKind};
use std::process::Command;

struct Case {
    schedule: ScheduleKind,
    optimizer: &'static str,
    lr: f64,
    gamma: f64,
    cycle_momentum: bool,
    steps_per_epoch: usize,
    epochs: usize,
}

/// Python: (lr, momentum) bit patterns after construction and after every scheduler step, for
/// each case, from torch.optim.lr_scheduler through lenet5_ref.make_schedule.
const TORCH_SIDE: &str = r#"
import json, struct, sys
sys.path.insert(0, "scripts")
import torch
import lenet5_ref as L

bits = lambda x: struct.unpack("<Q", struct.pack("<d", x))[0]
out = []
for c in json.loads(sys.argv[1]):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = L.make_optimizer(c["optimizer"], [p], c["lr"], momentum=0.9)
    sched, per_batch = L.make_schedule(c["schedule"], opt, c["steps_per_epoch"], c["epochs"], c["gamma"], c["cycle"])
    def now():
        g = opt.param_groups[0]
        return [bits(g["lr"]), bits(g["momentum"] if "momentum" in g else g["betas"][0])]
    seq = [now()]
    for _ in range(c["steps_per_epoch"] * c["epochs"] if per_batch else c["epochs"]):
        opt.step()  # no gradient: nothing moves, but the scheduler sees the order it expects
        if sched is not None:
            sched.step()
        seq.append(now())
    out.append(seq)
print(json.dumps(out))
"#;

fn torch_sequences(cases: &[Case]) -> Vec<Vec<[u64; 2]>> {
    let json: Vec<serde_json::Value> = cases
        .iter()
        .map(|c| {
            serde_json::json!({
                "schedule": c.schedule.as_str(), "optimizer": c.optimizer, "lr": c.lr, "gamma": c.gamma,
                "cycle": c.cycle_momentum, "steps_per_epoch": c.steps_per_epoch, "epochs": c.epochs,
            })
        })
        .collect();
    let python = std::path::Path::new(".venv/bin/python");
    assert!(python.exists(), "no .venv/bin/python: run scripts/setup");
    let out = Command::new(python).args(["-c", TORCH_SIDE, &serde_json::to_string(&json).unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn rust_sequence(c: &Case) -> Vec<[u64; 2]> {
    let schedule = Schedule {
        kind: c.schedule,
        base_lr: c.lr,
        gamma: c.gamma,
        total_steps: c.steps_per_epoch * c.epochs,
        cycle_momentum: c.cycle_momentum,
    };
    // SGD's momentum and Adam's beta1 both start at 0.9 on the Python side too.
    let mut state = schedule.start(Hyper { lr: c.lr, momentum: 0.9 });
    let bits = |h: Hyper| [h.lr.to_bits(), h.momentum.to_bits()];
    let mut seq = vec![bits(state.hyper)];
    let steps = if schedule.per_batch() { schedule.total_steps } else { c.epochs };
    for _ in 0..steps {
        schedule.step(&mut state);
        seq.push(bits(state.hyper));
    }
    seq
}

#[test]
fn every_rate_and_momentum_equals_torchs_to_the_last_bit() {
    use ScheduleKind::*;
    let case = |schedule, optimizer, lr, cycle_momentum, steps_per_epoch, epochs| Case {
        schedule,
        optimizer,
        lr,
        gamma: 0.7,
        cycle_momentum,
        steps_per_epoch,
        epochs,
    };
    let cases = [
        case(Onecycle, "adamw", 3e-3, true, 469, 8), // the default recipe on all of MNIST
        case(Onecycle, "adamw", 1.5e-2, true, 235, 3),
        case(Onecycle, "adam", 1e-3, false, 100, 3),
        case(Onecycle, "sgd", 0.05, true, 7, 3),
        case(Cosine, "sgd", 0.05, true, 469, 4),
        case(Cosine, "adamw", 3e-3, true, 1, 1),
        case(Step, "sgd", 1.0, true, 938, 14), // pytorch/examples' MNIST: Adadelta lr 1, gamma 0.7
        case(Step, "adam", 3e-3, true, 5, 30),
        case(Constant, "adamw", 3e-3, true, 10, 2),
    ];
    let torch = torch_sequences(&cases);
    for (c, torch) in cases.iter().zip(&torch) {
        let rust = rust_sequence(c);
        assert_eq!(rust.len(), torch.len(), "{:?}: number of steps", c.schedule);
        for (i, (r, t)) in rust.iter().zip(torch).enumerate() {
            assert_eq!(
                r,
                t,
                "{:?} {} lr {}: step {i}: Rust (lr, momentum) ({}, {}) vs torch ({}, {})",
                c.schedule,
                c.optimizer,
                c.lr,
                f64::from_bits(r[0]),
                f64::from_bits(r[1]),
                f64::from_bits(t[0]),
                f64::from_bits(t[1])
            );
        }
    }
}
