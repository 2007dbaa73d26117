//! `comfyume-worker`: the agent beside ComfyUI in a serverless GPU container.

use clap::Parser;
use comfyume_worker::Args;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    if args.log_format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    // Before anything slow: a SIGTERM during start-up still stops the worker cleanly.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    // One machine-readable line on stdout (logs go to stderr): the provider emulator and
    // scripts read the address from it when listening on port 0.
    println!("comfyume-worker listening on http://{addr}");
    tracing::info!(%addr, "listening");
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    comfyume_worker::serve(args, listener, shutdown).await?;
    Ok(())
}
