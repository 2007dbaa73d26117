//! `browser-overhead`: Run -> result in the stock frontend in headless Chromium,
//! straight at a ComfyUI (the simulator serving the frontend itself, as
//! ComfyUI's `--front-end-root` does) against the same workflow through the real
//! `comfyume serve` in front of a second simulator of the same build and settings;
//! alternating pairs, in the same run (tests/browser/overhead.mjs does the clicking
//! and the timing; `TRACE=1` prints every request and WebSocket frame of each run, and
//! `RUST_LOG` reaches serve's log).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::common::{self, Serve};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Alternating pairs per run (each pair: one run straight, one through serve).
    #[arg(long, default_value_t = 5)]
    pub pairs: usize,
    /// Independent runs (a fresh browser, simulator and serve each).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Simulated time per sampler step (the Flux.2 Klein 4B template has 4 steps).
    #[arg(long, default_value_t = 50)]
    pub step_ms: u64,
    #[arg(long, default_value = "Flux.2 Klein 4B - text to image")]
    pub template: String,
    #[arg(long, default_value = "target/release/comfyume")]
    pub bin: PathBuf,
    #[arg(long, default_value = "target/test-data/frontend/1.37.11")]
    pub frontend: PathBuf,
    #[arg(long, default_value = "tests/browser/overhead.mjs")]
    pub script: PathBuf,
    /// Keep serve's log of each run here (`PATH.1`, `PATH.2`, ...), e.g. with `RUST_LOG=debug`.
    #[arg(long)]
    pub serve_log: Option<PathBuf>,
    /// The control (A/A): the second tab opens serve's simulator straight instead of serve,
    /// so both tabs take the same path and the ratios show the measurement's own spread.
    #[arg(long)]
    pub control: bool,
}

pub async fn run(a: Args) -> Result<()> {
    let bin = common::absolute(&a.bin)?;
    let frontend = common::absolute(&a.frontend)?;
    let script = common::absolute(&a.script)?;
    common::print_machine();
    let mut rows = Vec::new();
    let mut phase_rows = Vec::new();
    let mut runs = Vec::new();
    for r in 0..a.runs {
        let out = one_run(&a, &bin, &frontend, &script, r + 1).await?;
        let ratio = out["median_ratio"].as_f64().context("no median_ratio")?;
        let direct = out["median_direct_ms"].as_f64().unwrap_or(0.0);
        let through = out["median_comfyume_ms"].as_f64().unwrap_or(0.0);
        let pairs: Vec<String> = out["pairs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| format!("{:.3}", p["ratio"].as_f64().unwrap_or(0.0)))
            .collect();
        rows.push(vec![
            format!("{}", r + 1),
            format!("{direct:.1} ms"),
            format!("{through:.1} ms"),
            format!("{ratio:.3}x"),
            format!("{:+.1} ms", through - direct),
            pairs.join(" "),
        ]);
        let phase = |path: &str| {
            let p = &out["phases"][path];
            let f = |k: &str| p[k].as_f64().unwrap_or(0.0);
            format!(
                "{:.0} / {:.0} / {:.0}",
                f("to_start"),
                f("to_executed"),
                f("to_shown")
            )
        };
        phase_rows.push(vec![
            format!("{}", r + 1),
            phase("direct"),
            phase("comfyume"),
        ]);
        runs.push(json!({"median_ratio": ratio, "median_direct_ms": direct, "median_comfyume_ms": through, "pairs": out["pairs"], "phases": out["phases"]}));
    }
    common::print_table(
        &format!(
            "Run -> result on Save Image, {} ({} pairs a run, {} ms a step){}",
            a.template,
            a.pairs,
            a.step_ms,
            if a.control {
                "; CONTROL: the \"through serve\" tab is straight at the other simulator"
            } else {
                ""
            }
        ),
        &[
            "run",
            "straight (median)",
            "through serve (median)",
            "ratio (median of pairs)",
            "added",
            "pair ratios",
        ],
        &rows,
    );
    common::print_table(
        "Where the time goes (medians, ms): Run -> execution_start / -> executed / -> image shown",
        &["run", "straight", "through serve"],
        &phase_rows,
    );
    println!(
        "{}",
        json!({"bench": "browser-overhead", "control": a.control, "template": a.template, "step_ms": a.step_ms, "runs": runs, "machine": common::machine()})
    );
    Ok(())
}

async fn one_run(
    a: &Args,
    bin: &Path,
    frontend: &Path,
    script: &Path,
    run: usize,
) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    // Two simulators of one build and configuration: the straight tab's, and serve's. On one
    // shared ComfyUI the idle straight tab would react to every job serve runs (ComfyUI sends
    // its queue `status` to every socket, and the frontend then fetches the queue, the history
    // and the newest result's image), loading this machine during the through-serve runs only.
    let sim_with = || async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        comfyume_sim::try_spawn(
            comfyume_sim::SimConfig {
                step_ms: a.step_ms,
                front_end_root: Some(frontend.to_path_buf()),
                ..Default::default()
            },
            listener,
        )
        .await
    };
    let sim = sim_with().await?;
    let direct = sim_with().await?;
    let data = dir.path().join("data");
    let users = common::create_workshop(bin, &data, 1).await?;
    let (user, pass) = users[0].clone();
    let serve = Serve::start(
        bin,
        &data,
        frontend,
        &[
            ("INFERENCE_MODE", "local".into()),
            ("COMFYUI_URLS", sim.url()),
        ],
    )
    .await?;
    let out = tokio::process::Command::new("node")
        .arg(script)
        .env("DIRECT_URL", direct.url())
        .env(
            "CONTROL_URL",
            if a.control { sim.url() } else { String::new() },
        )
        .env("BASE_URL", &serve.base)
        .env("USER1", &user)
        .env("PASS1", &pass)
        .env("PAIRS", a.pairs.to_string())
        .env("TEMPLATE", &a.template)
        .env("OUT_DIR", dir.path().join("shots"))
        // A ComfyUI without the templates package answers these with 404 too.
        .env("ALLOW_FAILED", r"/templates/(index|fuse_options)\.json$")
        .kill_on_drop(true)
        .output()
        .await
        .context(
            "running node (tests/browser must have its npm packages: scripts/install-test-deps.sh)",
        )?;
    let log = serve.log.clone();
    serve.stop().await;
    if let Some(keep) = &a.serve_log {
        let to = PathBuf::from(format!("{}.{run}", keep.display()));
        std::fs::copy(&log, &to)
            .with_context(|| format!("keeping serve's log as {}", to.display()))?;
    }
    sim.shutdown().await;
    direct.shutdown().await;
    // Its log (with TRACE=1, every request and frame of each run), on stderr.
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("the browser run failed ({}); its log is above", out.status);
    }
    serde_json::from_slice(&out.stdout).context("the browser run printed no JSON summary")
}
