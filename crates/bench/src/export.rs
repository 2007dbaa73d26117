//! `export`: "Download my work" of a participant with gigabytes of outputs, through the real
//! `comfyume serve`, against `cp -r` of the same files in the same run (alternating). The
//! zip is read by the client as a browser would save it (written to a file on the same
//! disk as cp's copy), the server's resident memory sampled every 20 ms while it streams.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::common::{self, Serve};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output files of the participant.
    #[arg(long, default_value_t = 20)]
    pub files: usize,
    /// Size of each, in MiB (20 x 100 MiB: 2 GiB in all by default).
    #[arg(long, default_value_t = 100)]
    pub file_mib: usize,
    /// Rounds, each one `cp -r` and one zip download (alternating which goes first).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// The `comfyume` binary to measure.
    #[arg(long, default_value = "target/release/comfyume")]
    pub bin: PathBuf,
    /// The installed frontend (serve wants one; this benchmark loads no page).
    #[arg(long, default_value = "target/test-data/frontend/1.37.11")]
    pub frontend: PathBuf,
    /// Where the data directory, cp's copies and the downloaded zips go (one disk for all;
    /// default: the system's temporary directory). Needs about 2x the data free.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Fills `path` with `size` bytes no compressor would shrink (outputs are PNG and MP4).
fn write_noise(path: &Path, size: usize, seed: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut x = seed | 1;
    let mut block = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for chunk in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(block.len());
        f.write_all(&block[..n])?;
        left -= n;
    }
    f.flush()?;
    Ok(())
}

/// The server's resident memory while `f` runs: (before, peak, after) in KiB.
async fn sampled<T>(
    pid: u32,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<(T, u64, u64, u64)> {
    let before = common::mem_of(pid)?.rss_kib;
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        loop {
            if let Ok(m) = common::mem_of(pid) {
                peak = peak.max(m.rss_kib);
            }
            tokio::select! {
                _ = &mut stop_rx => return peak,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    });
    let out = f.await;
    let _ = stop_tx.send(());
    let peak = sampler.await.unwrap_or(0);
    let after = common::mem_of(pid)?.rss_kib;
    Ok((out?, before, peak.max(before).max(after), after))
}

/// Downloads the participant's zip into `to`; its size in bytes.
async fn download(client: &reqwest::Client, url: &str, cookie: &str, to: &Path) -> Result<u64> {
    let resp = client
        .get(url)
        .header("cookie", cookie)
        .timeout(Duration::from_secs(3600))
        .send()
        .await?;
    if resp.status() != 200 {
        bail!("GET {url}: {}", resp.status());
    }
    let mut file = tokio::fs::File::create(to).await?;
    let mut body = resp.bytes_stream();
    let mut n = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("the zip stream broke off")?;
        n += chunk.len() as u64;
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    Ok(n)
}

/// The end of central directory record: its entry count (the zip is complete).
fn zip_entries(path: &Path) -> Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::End(-22))?;
    let mut end = [0u8; 22];
    f.read_exact(&mut end)?;
    if end[..4] != 0x0605_4b50u32.to_le_bytes() {
        bail!("{} has no end of central directory record", path.display());
    }
    Ok(u64::from(u16::from_le_bytes([end[10], end[11]])))
}

pub async fn run(a: Args) -> Result<()> {
    common::print_machine();
    let bin = common::absolute(&a.bin)?;
    let frontend = common::absolute(&a.frontend)?;
    let root = match &a.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let data = root.path().join("data");
    let users = common::create_workshop(&bin, &data, 1).await?;
    let (user, pw) = &users[0];
    let outputs = data.join("outputs").join(user);
    std::fs::create_dir_all(outputs.join("video"))?;
    let size = a.file_mib * 1024 * 1024;
    let total = (size * a.files) as u64;
    println!(
        "writing {} files of {} MiB ({:.2} GiB) into {}",
        a.files,
        a.file_mib,
        total as f64 / (1u64 << 30) as f64,
        outputs.display()
    );
    for i in 0..a.files {
        // Half in a subfolder, as a video workflow leaves them.
        let sub = if i % 2 == 0 { "" } else { "video" };
        write_noise(
            &outputs.join(sub).join(format!("out_{i:05}_.bin")),
            size,
            i as u64 + 1,
        )?;
    }
    let serve = Serve::start(&bin, &data, &frontend, &[("INFERENCE_MODE", "none".into())]).await?;
    let client = common::http_client()?;
    let cookie = common::login(&client, &serve.base, user, pw).await?;
    let url = format!("{}/api/comfyume/export.zip", serve.base);

    let mut rows = Vec::new();
    let mut cp_s = Vec::new();
    let mut zip_s = Vec::new();
    let mut peaks = Vec::new();
    let mut growth = Vec::new();
    let idle = serve.mem()?.rss_kib;
    for round in 0..a.rounds {
        let copy = root.path().join(format!("copy-{round}"));
        let zip = root.path().join(format!("work-{round}.zip"));
        let cp = || async {
            let t = Instant::now();
            let st = tokio::process::Command::new("cp")
                .arg("-r")
                .arg(&outputs)
                .arg(&copy)
                .status()
                .await?;
            if !st.success() {
                bail!("cp failed: {st}");
            }
            // The copy's bytes are on disk, as the zip's are after its download.
            let st = tokio::process::Command::new("sync").status().await?;
            if !st.success() {
                bail!("sync failed: {st}");
            }
            Ok(t.elapsed())
        };
        let dl = || async {
            let t = Instant::now();
            let n = download(&client, &url, &cookie, &zip).await?;
            let st = tokio::process::Command::new("sync").status().await?;
            if !st.success() {
                bail!("sync failed: {st}");
            }
            Ok((t.elapsed(), n))
        };
        let (cp_t, (zip_t, bytes), before, peak, after) = if round % 2 == 0 {
            let c = cp().await?;
            let ((z, n), b, p, af) = sampled(serve.pid, dl()).await?;
            (c, (z, n), b, p, af)
        } else {
            let ((z, n), b, p, af) = sampled(serve.pid, dl()).await?;
            let c = cp().await?;
            (c, (z, n), b, p, af)
        };
        let entries = zip_entries(&zip)?;
        // The outputs, and the workflows every new participant gets.
        if entries < a.files as u64 || bytes < total {
            bail!(
                "the zip has {entries} entries and {bytes} bytes; wanted {}+ files, {total}+ bytes",
                a.files
            );
        }
        let _ = std::fs::remove_dir_all(&copy);
        let _ = std::fs::remove_file(&zip);
        let mbs = |t: Duration| total as f64 / (1u64 << 20) as f64 / t.as_secs_f64();
        rows.push(vec![
            format!("{}", round + 1),
            format!("{:.2} s ({:.0} MiB/s)", cp_t.as_secs_f64(), mbs(cp_t)),
            format!("{:.2} s ({:.0} MiB/s)", zip_t.as_secs_f64(), mbs(zip_t)),
            format!("{:.2}", zip_t.as_secs_f64() / cp_t.as_secs_f64()),
            format!(
                "{:.1} / {:.1} / {:.1}",
                before as f64 / 1024.0,
                peak as f64 / 1024.0,
                after as f64 / 1024.0
            ),
        ]);
        cp_s.push(cp_t.as_secs_f64());
        zip_s.push(zip_t.as_secs_f64());
        peaks.push(peak as f64 / 1024.0);
        growth.push((peak as f64 - before as f64) / 1024.0);
    }
    let hwm = serve.mem()?.hwm_kib;
    serve.stop().await;
    common::print_table(
        &format!(
            "export: {} files, {:.2} GiB, cp -r vs GET /api/comfyume/export.zip (saved to a file), each then sync",
            a.files,
            total as f64 / (1u64 << 30) as f64
        ),
        &[
            "round",
            "cp -r",
            "zip download",
            "zip / cp",
            "server RSS MiB before / peak / after",
        ],
        &rows,
    );
    let cp_med = common::median(&mut cp_s.clone());
    let zip_med = common::median(&mut zip_s.clone());
    let ratio = zip_med / cp_med;
    println!(
        "median: cp {cp_med:.2} s, zip {zip_med:.2} s, ratio {ratio:.2} (goal <= 1.5); server RSS idle {:.1} MiB, peak while streaming {:.1} MiB (+{:.1}), VmHWM {:.1} MiB",
        idle as f64 / 1024.0,
        peaks.iter().cloned().fold(0.0, f64::max),
        growth.iter().cloned().fold(0.0, f64::max),
        hwm as f64 / 1024.0
    );
    println!(
        "{}",
        json!({
            "bench": "export",
            "machine": common::machine(),
            "files": a.files,
            "bytes": total,
            "cp_s": cp_s,
            "zip_s": zip_s,
            "ratio_median": ratio,
            "rss_idle_mib": idle as f64 / 1024.0,
            "rss_peak_mib": peaks,
            "rss_growth_mib": growth,
            "vm_hwm_mib": hwm as f64 / 1024.0,
        })
    );
    Ok(())
}
