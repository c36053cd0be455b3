//! Ctrl-C and SIGTERM during training: the first asks the run to stop after the current
//! step and checkpoint; a second Ctrl-C ends the process at once.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Set by a signal to the exit status the process should end with (128 + signal number).
#[derive(Clone)]
pub struct StopRequest(Arc<AtomicUsize>);

/// The error a stopped run returns, carrying its exit status.
#[derive(Debug)]
pub struct Interrupted {
    pub exit_code: i32,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted by signal {}", self.exit_code - 128)
    }
}

impl std::error::Error for Interrupted {}

impl StopRequest {
    /// Installs the handlers for SIGINT and SIGTERM.
    pub fn install() -> anyhow::Result<StopRequest> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let code = Arc::new(AtomicUsize::new(0));
        let pending = Arc::new(AtomicBool::new(false));
        for signal in [SIGINT, SIGTERM] {
            // Registered first, so it sees the flag as it was before this signal: a second
            // signal while a stop is pending exits at once.
            signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, Arc::clone(&pending))?;
            signal_hook::flag::register(signal, Arc::clone(&pending))?;
            signal_hook::flag::register_usize(signal, Arc::clone(&code), 128 + signal as usize)?;
        }
        Ok(StopRequest(code))
    }

    /// The exit status to end with, once a signal has arrived.
    pub fn requested(&self) -> Option<i32> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            code => Some(code as i32),
        }
    }
}
