//! `lenet5`: parse the command line, run it, print the error chain and exit non-zero on failure.

use clap::Parser;

fn main() {
    let cli = lenet5::cli::Cli::parse();
    if let Err(err) = lenet5::cli::run(cli) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
