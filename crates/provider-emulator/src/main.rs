//! `comfyume-provider`: the serverless provider emulator (test support and demo).

use clap::Parser;
use comfyume_provider_emulator::Args;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    // One machine-readable line on stdout (logs go to stderr).
    println!(
        "comfyume-provider listening on http://{}",
        listener.local_addr()?
    );
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    comfyume_provider_emulator::run(args, listener, shutdown).await?;
    Ok(())
}
