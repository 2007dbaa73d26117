//! `history-page`: what serve does for `GET /api/history?max_items=N` once the request is
//! authenticated, in-process on a real SQLite store: the page read from the store, turned
//! into ComfyUI's history shape and written out as JSON (not the HTTP or the gzip). The way
//! it was done until the second change of 2026-12-07 (each job's prompt and workflow parsed
//! from the store into JSON values, then written again) against serve's way now (their stored
//! JSON text written out unparsed), alternating, in the same run; both write the page straight
//! from the records.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use comfyume_gateway::api::queue::{history_record_of_text, into_history_record};
use comfyume_store::{EnqueueLimits, JobOrder, JobPatch, JobQuery, JobState, JobStore, NewJob};
use comfyume_wire::shapes::queue::HistoryBody;
use serde_json::{Value, json};

use crate::common;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Finished jobs in the participant's history (the stock frontend asks for 64).
    #[arg(long, default_value_t = 64)]
    pub jobs: usize,
    /// Alternating rounds; each times both paths.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Pages built per path and round.
    #[arg(long, default_value_t = 100)]
    pub iters: usize,
}

/// The workshop's Flux.2 template as the frontend sends it with every Run (`extra_pnginfo`).
fn workflow() -> Value {
    serde_json::from_str(include_str!(
        "../../templates/workflows/Flux.2 Klein 4B - text to image.json"
    ))
    .expect("the template is JSON")
}

pub async fn run(a: Args) -> Result<()> {
    common::print_machine();
    let dir = tempfile::tempdir()?;
    let store = comfyume_store::sqlite::SqliteStore::open(&dir.path().join("comfyume.db"))
        .await
        .context("opening the store")?;
    let wf = workflow();
    for i in 0..a.jobs {
        let id = format!("00000000-0000-4000-8000-{i:012}");
        store
            .enqueue(
                NewJob {
                    id: id.clone(),
                    user: "user001".into(),
                    number: i as f64,
                    priority: None,
                    prompt: common::flux_prompt(4, i as u64, 512),
                    extra_data: json!({"client_id": "tab", "extra_pnginfo": {"workflow": wf}}),
                    outputs_to_execute: vec![],
                    client_id: Some("tab".into()),
                },
                EnqueueLimits::default(),
            )
            .await?;
        let image =
            json!({"filename": format!("flux2_{i:05}_.png"), "subfolder": "", "type": "output"});
        store
            .transition(
                &id,
                &[JobState::Queued],
                JobState::Succeeded,
                JobPatch {
                    attempts_inc: true,
                    started_at_ms: Some(1),
                    finished_at_ms: Some(2),
                    outputs: Some(json!({"15": {"images": [image]}})),
                    messages: Some(json!([
                        ["execution_start", {"prompt_id": id, "timestamp": 1}],
                        ["execution_cached", {"nodes": [], "prompt_id": id, "timestamp": 1}],
                        ["execution_success", {"prompt_id": id, "timestamp": 2}]
                    ])),
                    meta: Some(json!({"15": {"node_id": "15", "display_node": "15", "parent_node": null, "real_node_id": "15"}})),
                    ..Default::default()
                },
            )
            .await?;
    }
    let query = JobQuery {
        user: Some("user001".into()),
        states: vec![JobState::Succeeded, JobState::Failed, JobState::Interrupted],
        order: JobOrder::SeqAsc,
        limit: Some(a.jobs as u64),
        ..Default::default()
    };
    let (mut before, mut now, mut read) = (Vec::new(), Vec::new(), Vec::new());
    let mut pages = (Vec::new(), Vec::new());
    for _ in 0..a.rounds {
        let t = Instant::now();
        for _ in 0..a.iters {
            let (jobs, _) = store.list_jobs(&query).await?;
            let records = jobs.into_iter().map(into_history_record).collect();
            pages.0 = serde_json::to_vec(&HistoryBody(records))?;
        }
        before.push(t.elapsed() / a.iters as u32);
        let t = Instant::now();
        for _ in 0..a.iters {
            let jobs = store.list_jobs_text(&query).await?;
            let records = jobs.into_iter().map(history_record_of_text).collect();
            pages.1 = serde_json::to_vec(&HistoryBody(records))?;
        }
        now.push(t.elapsed() / a.iters as u32);
        let t = Instant::now();
        for _ in 0..a.iters {
            std::hint::black_box(store.list_jobs_text(&query).await?);
        }
        read.push(t.elapsed() / a.iters as u32);
    }
    anyhow::ensure!(pages.0 == pages.1, "the two paths wrote different pages");
    // What gzip adds to the page (serve compresses JSON answers for browsers that accept it),
    // at the two levels one would choose between.
    let mut gzip = Vec::new();
    for (name, level) in [
        ("default (6)", flate2::Compression::default()),
        ("fast (1)", flate2::Compression::fast()),
    ] {
        let t = Instant::now();
        let mut size = 0;
        for _ in 0..a.iters {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), level);
            std::io::Write::write_all(&mut enc, &pages.1)?;
            size = enc.finish()?.len();
        }
        gzip.push((name, t.elapsed() / a.iters as u32, size));
    }
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let median = |v: &[Duration]| {
        let mut s: Vec<f64> = v.iter().map(ms).collect();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    };
    let rows: Vec<Vec<String>> = (0..a.rounds)
        .map(|r| {
            vec![
                format!("{}", r + 1),
                format!("{:.2} ms", ms(&before[r])),
                format!("{:.2} ms", ms(&now[r])),
                format!("{:.2}x", ms(&now[r]) / ms(&before[r])),
                format!("{:.2} ms", ms(&read[r])),
            ]
        })
        .collect();
    common::print_table(
        &format!(
            "GET /api/history?max_items={}: a page of {} Flux.2 jobs ({} bytes of JSON), per page",
            a.jobs,
            a.jobs,
            pages.1.len()
        ),
        &[
            "round",
            "before",
            "now",
            "now / before",
            "of which the store read",
        ],
        &rows,
    );
    for (name, took, size) in &gzip {
        println!(
            "gzip of the page, level {name}: {:.2} ms, {size} bytes",
            ms(took)
        );
    }
    println!(
        "{}",
        json!({"bench": "history-page", "gzip": gzip.iter().map(|(n, t, b)| json!({"level": n, "ms": ms(t), "bytes": b})).collect::<Vec<_>>(), "jobs": a.jobs, "bytes": pages.1.len(), "before_ms_median": median(&before), "now_ms_median": median(&now), "store_read_ms_median": median(&read), "machine": common::machine()})
    );
    store.close().await;
    Ok(())
}
