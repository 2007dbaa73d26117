//! `export`: "Download my work" of a participant with gigabytes of outputs, through the real
//! `comfyume serve`, against `cp -r` of the same files in the same run (in rotating order).
//! The zip is saved to a file on the same disk as cp's copy by two clients: curl, and
//! `comfyume-bench save` (1 MiB reads and writes; curl writes its output 8 KiB at a time and
//! spends more CPU than the server, on the same two cores). The control: the same bytes as a
//! static file from Debian's nginx (`sendfile on`, no zip to make), saved by the same two
//! clients, so each client's own ceiling is measured in the same run. The server's resident
//! memory is sampled every 20 ms while it streams, and the CPU time of cp, the server (and
//! nginx) and each client is taken.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::json;

use crate::common::{self, Serve};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output files of the participant.
    #[arg(long, default_value_t = 20)]
    pub files: usize,
    /// Size of each, in MiB (20 x 100 MiB: 2 GiB in all by default).
    #[arg(long, default_value_t = 100)]
    pub file_mib: usize,
    /// Rounds, each one `cp -r`, two zip downloads (curl, `save`) and two of the control
    /// (nginx's file, by the same clients), in rotating order.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// The `comfyume` binary to measure.
    #[arg(long, default_value = "target/release/comfyume")]
    pub bin: PathBuf,
    /// The installed frontend (serve wants one; this benchmark loads no page).
    #[arg(long, default_value = "target/test-data/frontend/1.37.11")]
    pub frontend: PathBuf,
    /// `sync` after each copy and each download, so both count the time their bytes take to
    /// reach the disk (`false`: both end in the page cache, which leaves the CPU cost).
    /// Either way each starts after an untimed `sync` and a read of the files.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub sync: bool,
    /// Where the data directory, cp's copies and the downloaded zips go (one disk for all;
    /// default: the system's temporary directory). Needs about 3x the data free.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// nginx for the control (the zip's bytes as a static file); `none` leaves it out.
    #[arg(long, default_value = "/usr/sbin/nginx")]
    pub nginx: String,
}

/// Debian's nginx serving one directory as static files on `port`, in the foreground and in
/// one process (its CPU time is that process's); killed when dropped (`kill_on_drop`).
struct Nginx {
    _child: tokio::process::Child,
    pid: u32,
    base: String,
}

impl Nginx {
    async fn start(bin: &str, root: &Path, www: &Path) -> Result<Nginx> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = root.join("nginx");
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
                 error_log {d}/error.log;\nevents {{ worker_connections 16; }}\n\
                 http {{ access_log off; sendfile on; tcp_nopush on; \
                 client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; \
                 uwsgi_temp_path {d}; scgi_temp_path {d}; \
                 server {{ listen 127.0.0.1:{port}; root {w}; }} }}\n",
                d = dir.display(),
                w = www.display(),
            ),
        )?;
        let child = tokio::process::Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&dir)
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().unwrap_or(0);
        let base = format!("http://127.0.0.1:{port}");
        let client = common::http_client()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.head(&base).send().await.is_err() {
            common::check_deadline(deadline, "nginx to answer")?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Nginx {
            _child: child,
            pid,
            base,
        })
    }
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

/// Runs `program args…` to completion; its CPU time (user + system, through GNU time where
/// there is one).
async fn run_timed(program: &str, args: &[&std::ffi::OsStr], times: &Path) -> Result<Option<f64>> {
    let gnu_time = Path::new("/usr/bin/time").exists();
    let mut cmd = if gnu_time {
        let mut c = tokio::process::Command::new("/usr/bin/time");
        c.args(["-f", "%U %S", "-o"]).arg(times).arg(program);
        c
    } else {
        tokio::process::Command::new(program)
    };
    let st = cmd.args(args).status().await?;
    if !st.success() {
        bail!("{program} failed: {st}");
    }
    Ok(std::fs::read_to_string(times).ok().and_then(|s| {
        let v: Vec<f64> = s
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        (v.len() == 2).then(|| v[0] + v[1])
    }))
}

/// The client a download is saved with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    Curl,
    /// `comfyume-bench save`.
    Save,
}

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::Curl => "curl",
            Client::Save => "save",
        }
    }
}

/// What one timed step of a round does.
#[derive(Debug, Clone, Copy)]
enum Side {
    Cp,
    /// serve's zip, saved by this client.
    Zip(Client),
    /// The same bytes as nginx's static file, saved by this client.
    Static(Client),
}

/// Downloads the participant's zip into `to` with `client`; the client's CPU time.
async fn download(
    client: Client,
    url: &str,
    cookie: &str,
    to: &Path,
    times: &Path,
) -> Result<Option<f64>> {
    match client {
        Client::Curl => {
            let header = format!("Cookie: {cookie}");
            run_timed(
                "curl",
                &[
                    "--silent".as_ref(),
                    "--show-error".as_ref(),
                    "--fail".as_ref(),
                    "--max-time".as_ref(),
                    "3600".as_ref(),
                    "-H".as_ref(),
                    header.as_ref(),
                    "-o".as_ref(),
                    to.as_os_str(),
                    url.as_ref(),
                ],
                times,
            )
            .await
        }
        Client::Save => {
            let me = std::env::current_exe()?;
            run_timed(
                &me.to_string_lossy(),
                &[
                    "save".as_ref(),
                    url.as_ref(),
                    "--cookie".as_ref(),
                    cookie.as_ref(),
                    "--out".as_ref(),
                    to.as_os_str(),
                ],
                times,
            )
            .await
        }
    }
}

/// `sync`, then every file under `dir` read once (so both sides start from the page cache).
async fn settle(dir: &Path) -> Result<()> {
    sync().await?;
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<()> {
        fn read_all(d: &Path) -> Result<()> {
            for e in std::fs::read_dir(d)? {
                let p = e?.path();
                if p.is_dir() {
                    read_all(&p)?;
                } else {
                    std::io::copy(&mut std::fs::File::open(&p)?, &mut std::io::sink())?;
                }
            }
            Ok(())
        }
        read_all(&dir)
    })
    .await??;
    Ok(())
}

fn secs(v: Option<f64>) -> String {
    v.map(|c| format!("{c:.2}")).unwrap_or_else(|| "-".into())
}

async fn sync() -> Result<()> {
    let st = tokio::process::Command::new("sync").status().await?;
    if !st.success() {
        bail!("sync failed: {st}");
    }
    Ok(())
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

    // The control's file: the zip's own bytes, saved once (untimed) where nginx serves them.
    let nginx = if a.nginx == "none" {
        None
    } else if !Path::new(&a.nginx).is_file() {
        println!("no nginx at {}: the control is left out", a.nginx);
        None
    } else {
        let www = root.path().join("www");
        std::fs::create_dir_all(&www)?;
        let times = root.path().join("client-times");
        download(Client::Save, &url, &cookie, &www.join("work.zip"), &times).await?;
        Some(Nginx::start(&a.nginx, root.path(), &www).await?)
    };
    let static_url = nginx.as_ref().map(|n| format!("{}/work.zip", n.base));

    let clients = [Client::Curl, Client::Save];
    let mut sides = vec![Side::Cp, Side::Zip(Client::Curl), Side::Zip(Client::Save)];
    if nginx.is_some() {
        sides.extend([Side::Static(Client::Curl), Side::Static(Client::Save)]);
    }
    let mut rows = Vec::new();
    let mut cp_s = Vec::new();
    // Seconds per round, by client: serve's zip, and nginx's file.
    let mut zip_s: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut static_s: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut cpu = Vec::new();
    let mut peaks = Vec::new();
    let mut growth = Vec::new();
    let idle = serve.mem()?.rss_kib;
    for round in 0..a.rounds {
        let copy = root.path().join(format!("copy-{round}"));
        let zip = root.path().join(format!("work-{round}.zip"));
        // Each timed operation starts alike, untimed: the disk settled (the previous one's
        // writes flushed) and the files just read (in the page cache; else the second of a
        // pair pays for the first one's writes having pushed them out).
        let cp = || async {
            settle(&outputs).await?;
            let times = root.path().join("cp-times");
            let t = Instant::now();
            let cpu = run_timed(
                "cp",
                &["-r".as_ref(), outputs.as_os_str(), copy.as_os_str()],
                &times,
            )
            .await?;
            // The copy's bytes are on disk, as the zip's are after its download.
            if a.sync {
                sync().await?;
            }
            let took = t.elapsed();
            // Gone before the other side runs, so both meet the same free memory.
            std::fs::remove_dir_all(&copy)?;
            anyhow::Ok((took, cpu))
        };
        // One download: its time, the server's CPU seconds, the client's.
        let dl = |client: Client, url: String, server_pid: u32| {
            let (zip, cookie, outputs) = (&zip, &cookie, &outputs);
            let times = root.path().join("client-times");
            async move {
                settle(outputs).await?;
                let server0 = common::cpu_ms(server_pid)?;
                let t = Instant::now();
                let client_cpu = download(client, &url, cookie, zip, &times).await?;
                let server_cpu = (common::cpu_ms(server_pid)? - server0) / 1000.0;
                let n = std::fs::metadata(zip)?.len();
                if a.sync {
                    sync().await?;
                }
                let took = t.elapsed();
                // The outputs, and the workflows every new participant gets.
                let entries = zip_entries(zip)?;
                if entries < a.files as u64 || n < total {
                    bail!(
                        "{}: the zip has {entries} entries and {n} bytes; wanted {}+ files, {total}+ bytes",
                        client.name(),
                        a.files
                    );
                }
                std::fs::remove_file(zip)?;
                Ok((took, server_cpu, client_cpu))
            }
        };
        // Every side once, in rotating order shifted by the round.
        let mut cp_side = None;
        let mut zip_side: [Option<(Duration, f64, Option<f64>)>; 2] = [None, None];
        let mut static_side: [Option<(Duration, f64, Option<f64>)>; 2] = [None, None];
        for k in 0..sides.len() {
            match sides[(round + k) % sides.len()] {
                Side::Cp => cp_side = Some(cp().await?),
                Side::Zip(c) => {
                    let (z, before, peak, _) =
                        sampled(serve.pid, dl(c, url.clone(), serve.pid)).await?;
                    peaks.push(peak as f64 / 1024.0);
                    growth.push((peak as f64 - before as f64) / 1024.0);
                    zip_side[c as usize] = Some(z);
                }
                Side::Static(c) => {
                    let (Some(n), Some(u)) = (&nginx, &static_url) else {
                        bail!("no nginx for the control");
                    };
                    static_side[c as usize] = Some(dl(c, u.clone(), n.pid).await?);
                }
            }
        }
        let (Some((cp_t, cp_cpu)), [Some(curl), Some(save)]) = (cp_side, zip_side) else {
            bail!("round {round}: a side did not run");
        };
        let mbs = |t: Duration| total as f64 / (1u64 << 20) as f64 / t.as_secs_f64();
        let mut row = vec![
            format!("{}", round + 1),
            format!("{:.2} s ({:.0} MiB/s)", cp_t.as_secs_f64(), mbs(cp_t)),
        ];
        let measured: Vec<_> = [Some(curl), Some(save)]
            .into_iter()
            .chain(static_side)
            .flatten()
            .collect();
        for (t, _, _) in &measured {
            row.push(format!(
                "{:.2} s ({:.0} MiB/s), {:.2}x",
                t.as_secs_f64(),
                mbs(*t),
                t.as_secs_f64() / cp_t.as_secs_f64()
            ));
        }
        let mut cpu_cell = secs(cp_cpu);
        for (_, server, client) in &measured {
            cpu_cell.push_str(&format!(" / {server:.2} + {}", secs(*client)));
        }
        row.push(cpu_cell);
        rows.push(row);
        cp_s.push(cp_t.as_secs_f64());
        let side_cpu = |s: &Option<(Duration, f64, Option<f64>)>| {
            s.map(|(_, server, client)| json!({"server": server, "client": client}))
        };
        cpu.push(json!({
            "cp": cp_cpu,
            "curl": {"server": curl.1, "client": curl.2},
            "save": {"server": save.1, "client": save.2},
            "nginx_curl": side_cpu(&static_side[0]),
            "nginx_save": side_cpu(&static_side[1]),
        }));
        zip_s[0].push(curl.0.as_secs_f64());
        zip_s[1].push(save.0.as_secs_f64());
        for (i, s) in static_side.iter().enumerate() {
            if let Some((t, _, _)) = s {
                static_s[i].push(t.as_secs_f64());
            }
        }
    }
    let hwm = serve.mem()?.hwm_kib;
    serve.stop().await;
    drop(nginx);
    let mut header = vec!["round", "cp -r", "zip, curl (/ cp)", "zip, save (/ cp)"];
    if static_url.is_some() {
        header.extend(["nginx file, curl (/ cp)", "nginx file, save (/ cp)"]);
        header.push("CPU s: cp / serve + curl / serve + save / nginx + curl / nginx + save");
    } else {
        header.push("CPU s: cp / serve + curl / serve + save");
    }
    common::print_table(
        &format!(
            "export: {} files, {:.2} GiB, cp -r vs GET /api/comfyume/export.zip saved to a file by curl and by `comfyume-bench save`{}",
            a.files,
            total as f64 / (1u64 << 30) as f64,
            if a.sync {
                ", each then sync"
            } else {
                ", no sync"
            }
        ),
        &header,
        &rows,
    );
    let cp_med = common::median(&mut cp_s.clone());
    let mut ratios = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        let zip_med = common::median(&mut zip_s[i].clone());
        let mut per_round: Vec<f64> = zip_s[i].iter().zip(&cp_s).map(|(z, c)| z / c).collect();
        let round_med = common::median(&mut per_round);
        println!(
            "{}: median cp {cp_med:.2} s, zip {zip_med:.2} s, ratio {:.2} (median of the rounds' ratios {round_med:.2}; goal <= 1.5)",
            client.name(),
            zip_med / cp_med
        );
        let mut entry = json!({"client": client.name(), "zip_s": zip_s[i], "ratio_median": zip_med / cp_med, "ratio_median_of_rounds": round_med});
        if !static_s[i].is_empty() {
            let mut file_cp: Vec<f64> = static_s[i].iter().zip(&cp_s).map(|(f, c)| f / c).collect();
            let mut zip_file: Vec<f64> = zip_s[i]
                .iter()
                .zip(&static_s[i])
                .map(|(z, f)| z / f)
                .collect();
            let (file_cp, zip_file) = (common::median(&mut file_cp), common::median(&mut zip_file));
            println!(
                "{}: the same bytes as nginx's static file: {file_cp:.2}x cp; serve's zip / nginx's file {zip_file:.2}x (medians of the rounds)",
                client.name()
            );
            entry["nginx_file_s"] = json!(static_s[i]);
            entry["nginx_file_over_cp"] = json!(file_cp);
            entry["zip_over_nginx_file"] = json!(zip_file);
        }
        ratios.push(entry);
    }
    println!(
        "server RSS idle {:.1} MiB, peak while streaming {:.1} MiB (+{:.1}), VmHWM {:.1} MiB",
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
            "zip": ratios,
            "cpu_s": cpu,
            "sync": a.sync,
            "rss_idle_mib": idle as f64 / 1024.0,
            "rss_peak_mib": peaks,
            "rss_growth_mib": growth,
            "vm_hwm_mib": hwm as f64 / 1024.0,
        })
    );
    Ok(())
}
