//! `comfyume-sim`: run the ComfyUI simulator as its own process.

use clap::Parser;
use comfyume_sim::{Fault, SimConfig};
use std::net::SocketAddr;
use std::path::PathBuf;

/// A ComfyUI v0.11.0 server double (simulated, no GPU).
///
/// Settings come from SIMULATOR_* environment variables (see `SimConfig::from_env`);
/// flags given here win.
#[derive(Debug, Parser)]
#[command(name = "comfyume-sim", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8188")]
    listen: SocketAddr,
    /// Serve this object_info.json instead of the built-in node set [env: SIMULATOR_OBJECT_INFO].
    #[arg(long)]
    object_info: Option<PathBuf>,
    /// Simulated milliseconds per sampler step [env: SIMULATOR_STEP_MS; default 50].
    #[arg(long)]
    step_ms: Option<u64>,
    /// Directory for input/, output/ and temp/ [env: SIMULATOR_DATA_DIR; default: a fresh
    /// temporary directory].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Fault active from the start, repeatable [env: SIMULATOR_FAULTS, comma-separated]:
    /// refuse-connections[:MS], prompt-error, drop-websocket, hang[:MS], forget-history,
    /// forget-next-history, slow-view:MS, slow-ws-register:MS, die-mid-job.
    #[arg(long = "fault", value_name = "SPEC")]
    faults: Vec<Fault>,
    /// Disable ComfyUI's classic result cache, like ComfyUI's --cache-none [env: SIMULATOR_CACHE=none].
    #[arg(long)]
    cache_none: bool,
    /// Also serve the /sim/* control routes here (reachable while the main port refuses or hangs).
    #[arg(long)]
    control_listen: Option<SocketAddr>,
    /// Serve the ComfyUI frontend from this folder (index.html at /), like ComfyUI's own flag
    /// [env: SIMULATOR_FRONT_END_ROOT].
    #[arg(long, value_name = "DIR")]
    front_end_root: Option<PathBuf>,
    /// Serve every route under this path prefix (e.g. /<random token>); other paths answer 404.
    /// The simulator has no login (like ComfyUI): a secret prefix keeps other local users out
    /// [env: SIMULATOR_BASE_PATH].
    #[arg(long, value_name = "PATH")]
    base_path: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let mut config = SimConfig::from_env()?;
    if let Some(path) = args.object_info {
        config.object_info = Some(path);
    }
    if let Some(ms) = args.step_ms {
        config.step_ms = ms;
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = Some(dir);
    }
    config.faults.extend(args.faults);
    if args.cache_none {
        config.cache = false;
    }
    if let Some(dir) = args.front_end_root {
        config.front_end_root = Some(dir);
    }
    if let Some(base) = args.base_path {
        config.base_path = comfyume_sim::normalize_base_path(&base)?;
    }
    let config_has_frontend = config.front_end_root.is_some();
    // Before anything answers: a SIGTERM that follows the first answer must find the
    // handler in place (not the default action, which kills the process).
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let sim = comfyume_sim::try_spawn(config, listener).await?;
    if let Some(addr) = args.control_listen {
        let control = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(%addr, "control routes (/sim/*) listening");
        sim.serve_control(control);
    }
    eprintln!("comfyume-sim: simulated ComfyUI (no GPU) at {}", sim.url());
    if config_has_frontend {
        eprintln!("comfyume-sim: open {}/ in a browser", sim.url());
    }

    tokio::select! {
        _ = interrupt.recv() => {}
        _ = term.recv() => {}
        _ = sim.stopped() => {}
    }
    if sim.is_dead() {
        // The die-mid-job fault: the process ends the way a killed server would.
        tracing::error!("die-mid-job fault: exiting abruptly");
        std::process::exit(137);
    }
    tracing::info!("shutting down");
    sim.shutdown().await;
    Ok(())
}
