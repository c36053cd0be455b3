//! `lenet5`: parse the command line, run it, print the error chain and exit non-zero on failure.

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    if let Err(err) = cli::run(args) {
        eprintln!("error: {}", cli::describe(&err));
        // A run stopped by a signal exits as a shell expects: 130 for SIGINT, 143 for SIGTERM.
        let code = err.downcast_ref::<cli::Interrupted>().map_or(1, |i| i.exit_code);
        std::process::exit(code);
    }
}
