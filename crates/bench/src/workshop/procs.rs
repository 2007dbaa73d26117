//! The real parts a fault is made of: simulator processes (killed and
//! restarted on their port), a server answering garbage in a simulator's
//! place, a second process holding `comfyume.db` locked, a small tmpfs as the
//! data disk, and `comfyume serve` itself (SIGKILLed, restarted on its port).
//! Every child is killed by its own pid when its handle drops.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::common::{self, Serve};

/// Wall-clock ms since the Unix epoch (comparable with the simulators' logs).
pub fn epoch_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A free loopback port (bound, then released for the child to take).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn base_command(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env_clear();
    for k in ["PATH", "HOME", "TMPDIR"] {
        if let Ok(v) = std::env::var(k) {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

// ---- simulators -----------------------------------------------------------------------------

/// One `comfyume-sim` process on a fixed port, restartable there.
pub struct SimProc {
    pub index: usize,
    pub port: u16,
    bin: PathBuf,
    dir: PathBuf,
    step_ms: u64,
    child: Option<Child>,
    /// Starts so far; the current one is `incarnation - 1`.
    pub incarnation: usize,
    /// Each start's log file, by incarnation.
    pub logs: Vec<PathBuf>,
    /// When an incarnation was SIGKILLed (ms since the epoch).
    pub killed: Vec<(usize, i64)>,
}

impl SimProc {
    pub fn new(index: usize, bin: &Path, dir: &Path, step_ms: u64) -> Result<SimProc> {
        std::fs::create_dir_all(dir)?;
        Ok(SimProc {
            index,
            port: free_port()?,
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            step_ms,
            child: None,
            incarnation: 0,
            logs: Vec::new(),
            killed: Vec::new(),
        })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts it (again) on its port and waits until it answers; retried for a
    /// few seconds while the port is still held (by what stood in for it).
    pub async fn start(&mut self, client: &reqwest::Client) -> Result<()> {
        let mut tries = 0;
        loop {
            match self.start_once(client).await {
                Ok(()) => return Ok(()),
                Err(e) if tries < 20 && format!("{e:#}").contains("in use") => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn start_once(&mut self, client: &reqwest::Client) -> Result<()> {
        let log = self.dir.join(format!(
            "sim{}-{}.log",
            self.index + 1,
            self.incarnation + 1
        ));
        let mut cmd = base_command(&self.bin);
        cmd.args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--step-ms", &self.step_ms.to_string()])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        self.logs.push(log.clone());
        self.incarnation += 1;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = client
                .get(format!("{}/sim/state", self.url()))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                && r.status() == 200
            {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                bail!(
                    "simulator {} exited at start ({status}): {}",
                    self.index + 1,
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if tokio::time::Instant::now() > deadline {
                self.stop().await;
                bail!("simulator {} did not answer within 20 s", self.index + 1);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL; remembers when.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
            self.killed.push((self.incarnation - 1, epoch_ms()));
        }
    }

    /// Stops it at the end of the run (not a fault: not recorded as a kill).
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    pub async fn state(&self, client: &reqwest::Client) -> Result<Value> {
        Ok(client
            .get(format!("{}/sim/state", self.url()))
            .timeout(Duration::from_secs(2))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// Whether it has been idle for `quiet`: no job running or waiting at both ends of it,
    /// and none started in between. A job that ended just before is then no longer being
    /// collected by serve (its history and outputs read), so a fault that ends this process
    /// cannot take a finished job's results with it.
    pub async fn settled(&self, client: &reqwest::Client, quiet: Duration) -> bool {
        let idle = |s: &Value| s["current_job"].is_null() && s["queue_pending"] == 0;
        let Ok(before) = self.state(client).await else {
            return false;
        };
        if !idle(&before) {
            return false;
        }
        tokio::time::sleep(quiet).await;
        let Ok(after) = self.state(client).await else {
            return false;
        };
        idle(&after) && after["jobs_run"] == before["jobs_run"]
    }

    /// The job it runs now, if any.
    pub async fn current_job(&self, client: &reqwest::Client) -> Option<String> {
        let s = self.state(client).await.ok()?;
        s["current_job"]["prompt_id"].as_str().map(str::to_string)
    }

    /// `POST /sim/fault` (the control routes answer even while it hangs).
    pub async fn fault(&self, client: &reqwest::Client, fault: Value) -> Result<()> {
        client
            .post(format!("{}/sim/fault", self.url()))
            .timeout(Duration::from_secs(5))
            .json(&fault)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }
}

// ---- a backend answering garbage --------------------------------------------------------------

/// A server on a simulator's port that answers every request with 200 and a
/// body no ComfyUI would send (cut JSON, binary noise, an HTML error page),
/// WebSocket upgrades included.
pub struct Garbage {
    task: tokio::task::JoinHandle<()>,
    pub requests: Arc<AtomicU32>,
}

const GARBAGE: [&[u8]; 3] = [
    b"{\"prompt_id\": \"12",
    b"\x00\xff\xfe garbage \x13\x37",
    b"<html><body><h1>502 Bad Gateway</h1></body></html>",
];

impl Garbage {
    pub async fn start(port: u16) -> Result<Garbage> {
        // The killed simulator's port may take a moment to be free.
        let mut listener = None;
        let mut last = None;
        for _ in 0..50 {
            match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let listener =
            listener.ok_or_else(|| anyhow!("garbage server cannot bind port {port}: {last:?}"))?;
        let requests = Arc::new(AtomicU32::new(0));
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    continue;
                };
                let n = counter.fetch_add(1, Ordering::SeqCst) as usize;
                conns.spawn(async move {
                    // Read the request head (bounded), then answer garbage and close.
                    let mut buf = vec![0u8; 8192];
                    let mut got = 0;
                    let _ = tokio::time::timeout(Duration::from_secs(5), async {
                        while got < buf.len() {
                            match sock.read(&mut buf[got..]).await {
                                Ok(0) | Err(_) => break,
                                Ok(k) => got += k,
                            }
                            if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                    })
                    .await;
                    let body = GARBAGE[n % GARBAGE.len()];
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = sock.write_all(head.as_bytes()).await;
                    let _ = sock.write_all(body).await;
                    let _ = sock.shutdown().await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Garbage { task, requests })
    }

    /// Stops answering: the listener and every connection are closed when this returns.
    pub async fn stop(mut self) -> u32 {
        self.task.abort();
        let _ = (&mut self.task).await;
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Garbage {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---- the database locked by another process ---------------------------------------------------

/// A python3 process holding an exclusive transaction on the database.
pub struct DbLock {
    child: Child,
}

const LOCK_SCRIPT: &str = "import sqlite3, sys, time\n\
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n\
c.execute('BEGIN EXCLUSIVE')\n\
print('locked', flush=True)\n\
time.sleep(float(sys.argv[2]))\n\
c.execute('COMMIT')\n";

impl DbLock {
    /// Takes the lock (waits for it up to 30 s) and holds it for `hold`.
    pub async fn take(db: &Path, hold: Duration) -> Result<DbLock> {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(LOCK_SCRIPT)
            .arg(db)
            .arg(format!("{:.3}", hold.as_secs_f64()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("python3 (for the database lock) is not available")?;
        let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = BufReader::new(out).lines();
        match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
            Ok(Ok(Some(l))) if l == "locked" => Ok(DbLock { child }),
            other => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err).await;
                }
                bail!("could not lock the database ({other:?}): {err}")
            }
        }
    }

    /// Waits for the holder to commit and exit (bounded).
    pub async fn release(mut self, within: Duration) -> Result<()> {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(Ok(s)) if s.success() => Ok(()),
            Ok(Ok(s)) => bail!("the lock holder exited with {s}"),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => {
                let _ = self.child.start_kill();
                bail!("the lock holder did not finish in time")
            }
        }
    }
}

// ---- a small data disk ----------------------------------------------------------------------

/// A tmpfs mounted as the data directory, unmounted when dropped.
pub struct Tmpfs {
    pub dir: PathBuf,
    pub mib: u64,
}

impl Tmpfs {
    /// `mount -t tmpfs` (needs root or CAP_SYS_ADMIN); the reason when not permitted.
    pub fn mount(dir: &Path, mib: u64) -> std::result::Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
            mib,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a process that still has a file open there cannot keep it mounted.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// Fills the file system of `dir` with one file until it is full; the bytes written.
pub async fn fill_disk(file: &Path) -> Result<u64> {
    let file = file.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut f = std::fs::File::create(&file)?;
        let mut written = 0u64;
        for chunk in [1 << 20, 4096, 512] {
            let buf = vec![0x5au8; chunk];
            loop {
                match f.write(&buf) {
                    Ok(0) => break,
                    Ok(n) => written += n as u64,
                    Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                    Err(e) => return Err(anyhow::Error::from(e)),
                }
            }
        }
        let _ = f.sync_all();
        Ok(written)
    })
    .await?
}

// ---- comfyume serve -------------------------------------------------------------------------

/// `comfyume serve` across its restarts: the same data directory and port.
pub struct ServeCtl {
    bin: PathBuf,
    data: PathBuf,
    frontend: PathBuf,
    env: Vec<(&'static str, String)>,
    pub listen: String,
    current: Option<Serve>,
    /// The running process's pid (0 while down), for the sampler.
    pub pid: Arc<AtomicU32>,
    /// Every start's log.
    pub logs: Vec<PathBuf>,
    /// CPU time of the processes already gone (ms).
    pub cpu_gone_ms: f64,
    /// Peak resident size of the processes already gone (KiB).
    pub hwm_gone_kib: u64,
    pub restarts: usize,
}

impl ServeCtl {
    pub async fn start(
        bin: &Path,
        data: &Path,
        frontend: &Path,
        env: Vec<(&'static str, String)>,
    ) -> Result<ServeCtl> {
        let mut me = ServeCtl {
            bin: bin.to_path_buf(),
            data: data.to_path_buf(),
            frontend: frontend.to_path_buf(),
            env,
            listen: "127.0.0.1:0".into(),
            current: None,
            pid: Arc::new(AtomicU32::new(0)),
            logs: Vec::new(),
            cpu_gone_ms: 0.0,
            hwm_gone_kib: 0,
            restarts: 0,
        };
        me.up().await?;
        Ok(me)
    }

    async fn up(&mut self) -> Result<()> {
        let s = Serve::start_on(
            &self.bin,
            &self.data,
            &self.frontend,
            &self
                .env
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect::<Vec<_>>(),
            &self.listen,
        )
        .await?;
        self.listen = s.addr.to_string();
        self.pid.store(s.pid, Ordering::SeqCst);
        self.logs.push(s.log.clone());
        self.current = Some(s);
        Ok(())
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// The CPU and memory of the running process, read just before it goes.
    fn account(&mut self) {
        if let Some(s) = &self.current {
            if let Ok(c) = common::cpu_ms(s.pid) {
                self.cpu_gone_ms += c;
            }
            if let Ok(m) = s.mem() {
                self.hwm_gone_kib = self.hwm_gone_kib.max(m.hwm_kib);
            }
        }
    }

    /// SIGKILL.
    pub async fn kill(&mut self) {
        self.account();
        self.pid.store(0, Ordering::SeqCst);
        if let Some(s) = self.current.take() {
            s.stop().await;
        }
    }

    /// Starts it again where it was (retrying while the port is not yet free).
    pub async fn restart(&mut self) -> Result<()> {
        let mut last = None;
        for _ in 0..20 {
            match self.up().await {
                Ok(()) => {
                    self.restarts += 1;
                    return Ok(());
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("serve did not restart")))
    }

    /// Total CPU (ms) and peak RSS (KiB) over every start so far.
    pub fn totals(&self) -> (f64, u64) {
        let (mut cpu, mut hwm) = (self.cpu_gone_ms, self.hwm_gone_kib);
        if let Some(s) = &self.current {
            cpu += common::cpu_ms(s.pid).unwrap_or(0.0);
            hwm = hwm.max(s.mem().map(|m| m.hwm_kib).unwrap_or(0));
        }
        (cpu, hwm)
    }

    pub fn rss_kib(&self) -> Option<u64> {
        self.current
            .as_ref()
            .and_then(|s| s.mem().ok())
            .map(|m| m.rss_kib)
    }

    pub async fn stop(mut self) -> (f64, u64) {
        self.account();
        if let Some(s) = self.current.take() {
            s.stop().await;
        }
        (self.cpu_gone_ms, self.hwm_gone_kib)
    }
}
