//! Learning-rate schedules as torch.optim.lr_scheduler's classes compute them, with their stock
//! defaults and stepped as those classes are used, so a recipe means the same run on both
//! sides. Most of torch's formulas are recursive (each value from the last), so the state is
//! what torch keeps: the scheduler's `last_epoch` and the optimizer's current lr and momentum.

use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

use crate::training::optim::Hyper;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    /// The learning rate never changes (no scheduler).
    Constant,
    /// `StepLR(step_size=1, gamma)`, stepped after every epoch, as in PyTorch's MNIST example.
    Step,
    /// `CosineAnnealingLR(T_max=total steps)`: from `lr` to 0, stepped after every batch.
    Cosine,
    /// `OneCycleLR(max_lr=lr, total_steps)` with its defaults, stepped after every batch: lr
    /// from lr/25 up to `lr` over 30% of the steps, then down to lr/25e4; momentum (SGD's, or
    /// Adam's beta1) from 0.95 down to 0.85 and back, unless momentum cycling is off.
    Onecycle,
}

crate::named_values!(ScheduleKind { Constant => "constant", Step => "step", Cosine => "cosine", Onecycle => "onecycle" });

/// OneCycleLR's defaults (torch_checkpoint.rs writes them into its state dict).
pub const PCT_START: f64 = 0.3;
const DIV_FACTOR: f64 = 25.0;
const FINAL_DIV_FACTOR: f64 = 1e4;
pub const BASE_MOMENTUM: f64 = 0.85;
pub const MAX_MOMENTUM: f64 = 0.95;

/// A schedule's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    /// The optimizer's lr (OneCycleLR's max_lr).
    pub base_lr: f64,
    /// StepLR's factor.
    pub gamma: f64,
    /// Optimizer steps in the whole run (CosineAnnealingLR's T_max, OneCycleLR's total_steps).
    pub total_steps: usize,
    /// OneCycleLR's `cycle_momentum`.
    pub cycle_momentum: bool,
}

/// Where a schedule stands: torch's `scheduler.last_epoch` and the values it last wrote into
/// the optimizer's param group.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScheduleState {
    pub last_epoch: i64,
    pub hyper: Hyper,
}

/// OneCycleLR's `initial_lr` and `min_lr` for a peak of `max_lr`.
pub fn onecycle_lrs(max_lr: f64) -> (f64, f64) {
    let initial = max_lr / DIV_FACTOR;
    (initial, initial / FINAL_DIV_FACTOR)
}

/// OneCycleLR's `_annealing_cos`.
fn annealing_cos(start: f64, end: f64, pct: f64) -> f64 {
    let cos_out = (PI * pct).cos() + 1.0;
    end + (start - end) / 2.0 * cos_out
}

impl Schedule {
    /// True when the scheduler steps after every batch, false after every epoch.
    pub fn per_batch(&self) -> bool {
        self.kind != ScheduleKind::Step
    }

    /// The state once the scheduler is built on an optimizer set to `initial`: torch's
    /// constructors write into the param group and take an initial step.
    pub fn start(&self, initial: Hyper) -> ScheduleState {
        let mut state = ScheduleState { last_epoch: 0, hyper: initial };
        if self.kind == ScheduleKind::Onecycle {
            if self.cycle_momentum {
                state.hyper.momentum = MAX_MOMENTUM;
            }
            self.onecycle(&mut state);
        }
        state
    }

    /// `scheduler.step()`.
    pub fn step(&self, state: &mut ScheduleState) {
        state.last_epoch += 1;
        let epoch = state.last_epoch;
        let lr = &mut state.hyper.lr;
        match self.kind {
            ScheduleKind::Constant => {}
            ScheduleKind::Step => {
                if epoch != 0 {
                    *lr *= self.gamma; // step_size 1: every epoch
                }
            }
            ScheduleKind::Cosine => {
                let t_max = self.total_steps as f64;
                let eta_min = 0.0;
                *lr = if (epoch - 1 - self.total_steps as i64).rem_euclid(2 * self.total_steps as i64) == 0 {
                    *lr + (self.base_lr - eta_min) * (1.0 - (PI / t_max).cos()) / 2.0
                } else {
                    (1.0 + (PI * epoch as f64 / t_max).cos()) / (1.0 + (PI * (epoch - 1) as f64 / t_max).cos())
                        * (*lr - eta_min)
                        + eta_min
                };
            }
            ScheduleKind::Onecycle => self.onecycle(state),
        }
    }

    /// OneCycleLR's `get_lr` at `state.last_epoch`, with its side effect on the momentum.
    fn onecycle(&self, state: &mut ScheduleState) {
        let total = self.total_steps as f64;
        let (initial_lr, min_lr) = onecycle_lrs(self.base_lr);
        // (end_step, start_lr, end_lr, start_momentum, end_momentum) of the two phases.
        let phases = [
            (PCT_START * total - 1.0, initial_lr, self.base_lr, MAX_MOMENTUM, BASE_MOMENTUM),
            (total - 1.0, self.base_lr, min_lr, BASE_MOMENTUM, MAX_MOMENTUM),
        ];
        let step = state.last_epoch as f64;
        let mut start_step = 0.0;
        for (i, &(end_step, start_lr, end_lr, start_m, end_m)) in phases.iter().enumerate() {
            if step <= end_step || i == phases.len() - 1 {
                let pct = (step - start_step) / (end_step - start_step);
                state.hyper.lr = annealing_cos(start_lr, end_lr, pct);
                if self.cycle_momentum {
                    state.hyper.momentum = annealing_cos(start_m, end_m, pct);
                }
                return;
            }
            start_step = end_step;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(kind: ScheduleKind, steps: usize) -> Vec<Hyper> {
        let s = Schedule { kind, base_lr: 0.1, gamma: 0.7, total_steps: 100, cycle_momentum: true };
        let mut state = s.start(Hyper { lr: 0.1, momentum: 0.9 });
        let mut out = vec![state.hyper];
        for _ in 0..steps {
            s.step(&mut state);
            out.push(state.hyper);
        }
        out
    }

    // Exact values are checked against torch.optim.lr_scheduler in tests/python/test_schedules.py;
    // these pin the shapes.
    #[test]
    fn step_multiplies_by_gamma_at_each_step() {
        let lrs: Vec<f64> = run(ScheduleKind::Step, 2).iter().map(|h| h.lr).collect();
        assert_eq!(lrs, [0.1, 0.1 * 0.7, 0.1 * 0.7 * 0.7]);
    }

    #[test]
    fn cosine_halves_at_the_midpoint_and_ends_at_zero() {
        let h = run(ScheduleKind::Cosine, 100);
        assert_eq!(h[0].lr, 0.1);
        assert!((h[50].lr - 0.05).abs() < 1e-12);
        assert!(h[100].lr.abs() < 1e-12);
    }

    #[test]
    fn onecycle_rises_to_the_peak_then_falls_while_momentum_does_the_opposite() {
        let h = run(ScheduleKind::Onecycle, 99);
        assert!((h[0].lr - 0.004).abs() < 1e-12 && (h[0].momentum - MAX_MOMENTUM).abs() < 1e-12);
        assert!((h[29].lr - 0.1).abs() < 1e-12 && (h[29].momentum - BASE_MOMENTUM).abs() < 1e-12);
        assert!((h[99].lr - 4e-7).abs() < 1e-12 && (h[99].momentum - MAX_MOMENTUM).abs() < 1e-12);
    }
}
