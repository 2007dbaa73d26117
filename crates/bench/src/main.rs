//! `comfyume-bench`: the benchmark programs behind docs/PERFORMANCE.md. Each
//! subcommand prints a small table and, last, a one-line JSON summary. Every
//! loop is bounded; everything runs on loopback.

mod browser_overhead;
mod common;
mod dashboard;
mod dispatch_latency;
mod export;
mod gpu_gap;
mod history_page;
mod instrumentation;
mod overhead;
mod pick;
mod save;
mod serverless;
mod submit;
mod ui_load;
mod workshop;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "comfyume-bench",
    about = "ComfyUMe benchmarks (run from the repository root after `cargo build --release -p comfyume-bench -p comfyume`)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start time and memory of `comfyume serve` while participants load the frontend.
    UiLoad(ui_load::Args),
    /// Latency and rate of POST /api/prompt on `comfyume serve` with no backend.
    Submit(submit::Args),
    /// In-process cost of picking the next job at a deep queue.
    Pick(pick::Args),
    /// Idle system: POST /api/prompt until the GPU server has the prompt.
    DispatchLatency(dispatch_latency::Args),
    /// With a backlog: how busy the GPU is, and the gap between jobs.
    GpuGap(gpu_gap::Args),
    /// The same jobs straight at the simulator and through `comfyume serve`.
    Overhead(overhead::Args),
    /// In-process: a participant's history page read, shaped and written as JSON.
    HistoryPage(history_page::Args),
    /// Run -> result in the stock frontend (Chromium), straight and through `comfyume serve`.
    BrowserOverhead(browser_overhead::Args),
    /// The worker path against the local path; replicas busy under a backlog; spot eviction.
    Serverless(serverless::Args),
    /// What metrics recording costs: submissions with COMFYUME_METRICS on and off, alternating.
    Instrumentation(instrumentation::Args),
    /// The instructor's dashboard during a busy workshop: its cost to serve, its latency.
    Dashboard(dashboard::Args),
    /// "Download my work" of gigabytes of outputs against `cp -r`, and the server's memory.
    Export(export::Args),
    /// A workshop day of faults: participants, several simulators, scripted failures.
    Workshop(workshop::Args),
    /// The download client `export` measures with (1 MiB reads): GET a URL into a file.
    Save(save::Args),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // A client process of its own (timed by `export`): no runtime, no threads.
    if let Command::Save(a) = cli.command {
        return save::run(a);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::UiLoad(a) => ui_load::run(a).await,
            Command::Submit(a) => submit::run(a).await,
            Command::Pick(a) => pick::run(a).await,
            Command::DispatchLatency(a) => dispatch_latency::run(a).await,
            Command::GpuGap(a) => gpu_gap::run(a).await,
            Command::Overhead(a) => overhead::run(a).await,
            Command::HistoryPage(a) => history_page::run(a).await,
            Command::BrowserOverhead(a) => browser_overhead::run(a).await,
            Command::Serverless(a) => serverless::run(a).await,
            Command::Instrumentation(a) => instrumentation::run(a).await,
            Command::Dashboard(a) => dashboard::run(a).await,
            Command::Export(a) => export::run(a).await,
            Command::Workshop(a) => workshop::run(a).await,
            Command::Save(_) => unreachable!("run before the runtime"),
        }
    })
}
