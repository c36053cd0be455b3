//! `lenet5 serve`: its flags, and the shell around the library's router: the async runtime,
//! the listener, Ctrl-C and SIGTERM, and everything printed.

use anyhow::{Context, Result};
use clap::Args;
use std::io::Write;
use std::sync::Arc;

use lenet5::serve::{self, App, ServeConfig};

use super::{DataArgs, ModelArgs};

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Test images for the page's picker come from here (the server runs without them).
    #[command(flatten)]
    pub data: DataArgs,
    /// Host name or address to listen on: this machine only by default (0.0.0.0 opens it to
    /// the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
}

impl ServeArgs {
    fn config(&self) -> ServeConfig {
        ServeConfig {
            model: self.model.model.clone(),
            load: self.model.options(),
            dataset: self.data.dataset,
            data: self.data.data.clone(),
        }
    }
}

/// Loads the model, listens, prints the address and serves until Ctrl-C or SIGTERM, then
/// finishes the requests under way and returns.
pub fn run(args: &ServeArgs) -> Result<()> {
    let app = App::load(&args.config())?;
    for note in app.notes() {
        eprintln!("note: {note}");
    }
    let router = serve::router(Arc::new(app));
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async {
        let (host, port) = (args.host.as_str(), args.port);
        let listener = tokio::net::TcpListener::bind((host, port))
            .await
            .with_context(|| format!("cannot listen on {host} port {port}"))?;
        let address = listener.local_addr().context("the address listened on")?;
        let mut stdout = std::io::stdout();
        writeln!(stdout, "serving {} on http://{address}/ (Ctrl-C stops)", args.model.model.display())
            .context("printing the address")?;
        axum::serve(listener, router).with_graceful_shutdown(shutdown_signal()).await.context("the server failed")?;
        // The work is done; a stdout closed meanwhile (println! would panic) is no reason to fail.
        let _ = writeln!(stdout, "stopped");
        Ok(())
    })
}

/// Waits for Ctrl-C (or SIGTERM), the signals that stop the server.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            eprintln!("note: cannot listen for Ctrl-C ({e}); stop the server with SIGTERM");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                eprintln!("note: cannot listen for SIGTERM ({e}); stop the server with Ctrl-C");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
