//! Training progress on a terminal: a bar with loss, accuracy, images/s and ETA, or a plain
//! line at each quarter of an epoch when stderr is not a terminal, so logs stay readable.
//! The training loop only reports ([`lenet5::training::run::Watcher::progress`]); this shows it.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Instant;

use lenet5::training::EpochProgress;

pub struct TerminalProgress {
    tty: bool,
    bar: ProgressBar,
    epoch: usize,
    next_quarter: u64,
    started: Instant,
}

impl Default for TerminalProgress {
    fn default() -> Self {
        TerminalProgress {
            tty: std::io::stderr().is_terminal(),
            bar: ProgressBar::hidden(),
            epoch: 0,
            next_quarter: 1,
            started: Instant::now(),
        }
    }
}

impl TerminalProgress {
    pub fn show(&mut self, p: &EpochProgress) {
        if p.epoch != self.epoch {
            self.bar.finish_and_clear();
            self.bar = if self.tty { ProgressBar::new(p.total) } else { ProgressBar::hidden() };
            self.bar.set_style(
                ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} img  {per_sec}  ETA {eta}  {msg}")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            self.bar.set_prefix(format!("{}/{}", p.epoch, p.epochs));
            (self.epoch, self.next_quarter, self.started) = (p.epoch, 1, Instant::now());
        }
        self.bar.set_position(p.seen);
        self.bar.set_message(format!("loss {:.4} acc {:.2}%", p.loss, 100.0 * p.accuracy));
        if !self.tty && p.seen * 4 >= self.next_quarter * p.total && self.next_quarter < 4 {
            let rate = p.seen as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            eprintln!(
                "epoch {}/{} {:>3}%  {}/{} img  {rate:.0} img/s  loss {:.4} acc {:.2}%",
                p.epoch,
                p.epochs,
                25 * self.next_quarter,
                p.seen,
                p.total,
                p.loss,
                100.0 * p.accuracy
            );
            self.next_quarter += 1;
        }
        if p.seen >= p.total {
            self.bar.finish_and_clear();
        }
    }
}

impl Drop for TerminalProgress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
