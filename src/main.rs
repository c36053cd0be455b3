//! `lenet5`: parse the command line, run it, print the error chain and exit non-zero on failure.

mod cli;

use clap::Parser;

fn main() {
    if let Err(err) = lenet5::device::load_cuda() {
        eprintln!("warning: {err:#}");
    }
    let args = cli::Cli::parse();
    let code = match cli::run(args) {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("error: {}", cli::describe(&err));
            // A run stopped by a signal exits as a shell expects: 130 for SIGINT, 143 for SIGTERM.
            err.downcast_ref::<cli::Interrupted>().map_or(1, |i| i.exit_code)
        }
    };
    exit_now(code)
}

/// Ends the process once stdout is flushed, without the C++ static destructors: libtorch's
/// deregister every one of its operators and the CUDA libraries' finalisers page in their code,
/// about 0.2 s and 100 MiB of the peak memory at the end of every command, undoing nothing the
/// kernel does not undo at exit. Every file was written and closed (renamed into place) before.
fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let code = match std::io::stdout().flush() {
        Ok(()) => code,
        Err(_) => code.max(1), // stdout went away (a closed pipe): the output did not arrive
    };
    // SAFETY: _exit only ends the process; nothing runs after it that could see a torn state.
    unsafe { libc::_exit(code) }
}
