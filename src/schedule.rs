//! Learning-rate schedules, stepped once per optimizer step, each matching the PyTorch
//! scheduler of the same name so a recipe means the same thing on both sides.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// The learning rate never changes.
    Constant,
    /// Multiplied by `gamma` after every epoch (`StepLR(step_size=1)`, as in PyTorch's MNIST example).
    Step,
    /// Cosine decay from `lr` to 0 over the whole run (`CosineAnnealingLR(T_max=steps)`).
    Cosine,
    /// Warm up from lr/25 to `lr` over the first 30% of steps, then cosine down to lr/25e4
    /// (`OneCycleLR` defaults, without its momentum cycling).
    Onecycle,
}

#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub gamma: f64,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
}

/// Cosine interpolation from `start` (at pct 0) to `end` (at pct 1), as in `OneCycleLR`.
fn cosine(start: f64, end: f64, pct: f64) -> f64 {
    end + (start - end) / 2.0 * (1.0 + (std::f64::consts::PI * pct).cos())
}

impl Schedule {
    /// The learning rate for optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        let total = self.total_steps.max(1) as f64;
        match self.kind {
            ScheduleKind::Constant => self.base_lr,
            ScheduleKind::Step => self.base_lr * self.gamma.powi((step / self.steps_per_epoch.max(1)) as i32),
            ScheduleKind::Cosine => cosine(self.base_lr, 0.0, step as f64 / total),
            ScheduleKind::Onecycle => {
                let initial = self.base_lr / 25.0; // div_factor
                let min = initial / 1e4; // final_div_factor
                let warm_end = 0.3 * total - 1.0; // pct_start
                let step = step as f64;
                if step <= warm_end {
                    cosine(initial, self.base_lr, step / warm_end)
                } else {
                    cosine(self.base_lr, min, (step - warm_end) / (total - 1.0 - warm_end))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind) -> Schedule {
        Schedule { kind, base_lr: 0.1, gamma: 0.7, steps_per_epoch: 10, total_steps: 100 }
    }

    #[test]
    fn step_decays_once_per_epoch() {
        let s = schedule(ScheduleKind::Step);
        assert_eq!(s.lr_at(9), 0.1);
        assert!((s.lr_at(10) - 0.07).abs() < 1e-12);
        assert!((s.lr_at(25) - 0.049).abs() < 1e-12);
    }

    #[test]
    fn cosine_halves_at_the_midpoint() {
        let s = schedule(ScheduleKind::Cosine);
        assert_eq!(s.lr_at(0), 0.1);
        assert!((s.lr_at(50) - 0.05).abs() < 1e-12);
    }

    #[test]
    fn onecycle_rises_to_the_peak_then_falls_to_its_floor() {
        let s = schedule(ScheduleKind::Onecycle);
        // Values of torch.optim.lr_scheduler.OneCycleLR(max_lr=0.1, total_steps=100):
        // step 0 -> 0.004, step 29 -> 0.1 (end of warm-up), step 99 -> 4e-7.
        assert!((s.lr_at(0) - 0.004).abs() < 1e-12);
        assert!((s.lr_at(29) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(99) - 4e-7).abs() < 1e-12);
        assert!(s.lr_at(10) < s.lr_at(20) && s.lr_at(60) > s.lr_at(80));
    }
}
