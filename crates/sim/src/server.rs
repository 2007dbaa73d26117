//! Serving: a listener that can refuse and cut connections on demand, and the handle.

use axum::serve::Listener;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::catalog::Catalog;
use crate::config::{ActiveFaults, Fault, SimConfig};
use crate::state::{Dirs, Shared, SimState, lock};
use crate::{SimError, exec, http};

/// A connection that errors out (and so gets closed) as soon as its token is cancelled.
pub struct SimStream {
    inner: TcpStream,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
    dead: bool,
}

impl SimStream {
    fn new(inner: TcpStream, token: CancellationToken) -> Self {
        Self {
            inner,
            killed: Box::pin(token.cancelled_owned()),
            dead: false,
        }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if !self.dead && self.killed.as_mut().poll(cx).is_ready() {
            self.dead = true;
        }
        self.dead.then(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "comfyume-sim cut the connection",
            )
        })
    }
}

impl AsyncRead for SimStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Accepts like a `TcpListener`, except while the `refuse_connections` fault is on: then the
/// socket is closed (connects are refused) and reopened on the same address afterwards.
pub struct SimListener {
    inner: Option<TcpListener>,
    addr: SocketAddr,
    shared: Arc<Shared>,
    faults: watch::Receiver<ActiveFaults>,
}

impl Listener for SimListener {
    type Io = SimStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            if self.faults.borrow_and_update().refuse_connections {
                if self.inner.take().is_some() {
                    tracing::warn!(addr = %self.addr, "refusing connections: listener closed");
                    self.shared.cut_connections();
                }
                if self.faults.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                continue;
            }
            if self.inner.is_none() {
                match TcpListener::bind(self.addr).await {
                    Ok(l) => {
                        tracing::info!(addr = %self.addr, "accepting connections again");
                        self.inner = Some(l);
                    }
                    Err(e) => {
                        tracing::warn!(addr = %self.addr, error = %e, "cannot reopen listener, retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
            let Some(listener) = self.inner.as_ref() else {
                continue;
            };
            tokio::select! {
                res = listener.accept() => match res {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        return (SimStream::new(stream, self.shared.connection_token()), peer);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                changed = self.faults.changed() => {
                    if changed.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// A running simulator. Stop it with [`SimHandle::shutdown`] (graceful) or [`SimHandle::kill`]
/// (abrupt). Dropping the handle stops it abruptly too and removes a data directory the
/// simulator created itself, so tests leave nothing running or on disk.
pub struct SimHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// The path prefix every route lives under (`""` for none).
    base: String,
    server: Option<tokio::task::JoinHandle<()>>,
    worker: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if !self.shared.shutdown.is_cancelled() {
            self.shared.halt();
        }
        if self.shared.dirs.owned {
            let _ = std::fs::remove_dir_all(&self.shared.dirs.root);
        }
    }
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn make_dirs(config: &SimConfig) -> Result<Dirs, SimError> {
    let (root, owned) = match &config.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("comfyume-sim-{}", uuid::Uuid::new_v4().simple())),
            true,
        ),
    };
    let dirs = Dirs {
        input: root.join("input"),
        output: root.join("output"),
        temp: root.join("temp"),
        root,
        owned,
    };
    // ComfyUI empties temp/ at start.
    let _ = std::fs::remove_dir_all(&dirs.temp);
    // The default user's folder, with the workflows folder the frontend lists at start.
    let workflows = dirs.root.join("user").join("default").join("workflows");
    for d in [&dirs.input, &dirs.output, &dirs.temp, &workflows] {
        std::fs::create_dir_all(d).map_err(|e| SimError::DataDir {
            path: d.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(dirs)
}

/// Start a simulator on `listener`.
///
/// # Panics
/// If the configuration cannot be used (unreadable `object_info` file, data directory that
/// cannot be created); [`try_spawn`] reports that as an error instead.
pub async fn spawn(config: SimConfig, listener: TcpListener) -> SimHandle {
    match try_spawn(config, listener).await {
        Ok(h) => h,
        Err(e) => panic!("comfyume-sim cannot start: {e}"),
    }
}

/// Start a simulator on `listener`, reporting configuration problems.
pub async fn try_spawn(config: SimConfig, listener: TcpListener) -> Result<SimHandle, SimError> {
    let catalog = Catalog::load(config.object_info.as_ref())?;
    let base_path = match &config.base_path {
        Some(b) => crate::config::normalize_base_path(b)?,
        None => None,
    };
    if let Some(root) = &config.front_end_root
        && !root.is_dir()
    {
        return Err(SimError::FrontEndRoot {
            path: root.clone(),
            reason: "not a directory".into(),
        });
    }
    let dirs = make_dirs(&config)?;
    let addr = listener.local_addr().map_err(SimError::Io)?;
    let shared = Arc::new(Shared::new(
        catalog,
        dirs,
        config.step_ms,
        config.cache,
        config.max_upload_size,
        config.front_end_root.clone(),
    ));
    for fault in config.faults {
        shared.apply_fault(fault);
    }
    let sim_listener = SimListener {
        inner: Some(listener),
        addr,
        faults: shared.faults.subscribe(),
        shared: shared.clone(),
    };
    let app = http::router(shared.clone(), base_path.clone());
    let shutdown = shared.shutdown.clone();
    let server = tokio::spawn(async move {
        let _ = axum::serve(sim_listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    let worker = tokio::spawn(exec::worker(shared.clone()));
    lock(&shared.tasks).extend([server.abort_handle(), worker.abort_handle()]);
    tracing::info!(
        %addr,
        base_path = if base_path.is_some() { "(set)" } else { "" },
        frontend = ?shared.front_end_root,
        node_set = %shared.catalog.source,
        nodes = shared.catalog.len(),
        step_ms = shared.step_ms,
        "comfyume-sim (simulated ComfyUI, no GPU) listening"
    );
    Ok(SimHandle {
        shared,
        addr,
        base: base_path.unwrap_or_default(),
        server: Some(server),
        worker: Some(worker),
    })
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>` plus the base path, if any (keep it secret when it is the token that
    /// guards the simulator).
    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, self.base)
    }

    /// `ws://<addr>/ws`, under the base path if any.
    pub fn ws_url(&self) -> String {
        format!("ws://{}{}/ws", self.addr, self.base)
    }

    /// Switch a fault on (or everything off with [`Fault::Clear`]).
    pub fn set_fault(&self, fault: Fault) {
        self.shared.apply_fault(fault);
    }

    pub fn clear_faults(&self) {
        self.shared.apply_fault(Fault::Clear);
    }

    /// Counters, faults and the current job (same as `GET /sim/state`).
    pub fn state(&self) -> SimState {
        self.shared.state()
    }

    /// Root of `input/`, `output/` and `temp/`.
    pub fn data_dir(&self) -> &Path {
        &self.shared.dirs.root
    }

    pub fn output_dir(&self) -> PathBuf {
        self.shared.dirs.output.clone()
    }

    pub fn input_dir(&self) -> PathBuf {
        self.shared.dirs.input.clone()
    }

    /// True once the server died (fault or [`SimHandle::kill`]).
    pub fn is_dead(&self) -> bool {
        self.shared.died.load(Ordering::SeqCst)
    }

    /// Resolves when the server stopped serving: it died, or it was shut down.
    pub async fn stopped(&self) {
        tokio::select! {
            _ = self.shared.root.cancelled() => {}
            _ = self.shared.shutdown.cancelled() => {}
        }
    }

    /// Stop abruptly, like a killed process: listener closed, every connection cut at once,
    /// the running job abandoned.
    pub fn kill(&self) {
        self.shared.die();
    }

    /// Graceful stop: no new connections, WebSockets get a close frame, in-flight requests
    /// finish (for up to 5 s), the worker stops. A data directory the simulator created itself
    /// is removed.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.cancel();
        if let Some(mut server) = self.server.take()
            && tokio::time::timeout(Duration::from_secs(5), &mut server)
                .await
                .is_err()
        {
            self.shared.halt();
            let _ = server.await;
        }
        if let Some(worker) = self.worker.take() {
            worker.abort();
            let _ = worker.await;
        }
        // The data directory goes with the handle (see Drop).
        tracing::info!(addr = %self.addr, "comfyume-sim stopped");
    }

    /// Serve only the `/sim/*` control routes on another listener (stays reachable while the
    /// main listener refuses connections or hangs). Stops when the simulator stops.
    pub fn serve_control(&self, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let app = http::control_router(self.shared.clone());
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    tokio::select! {
                        _ = shared.root.cancelled() => {}
                        _ = shared.shutdown.cancelled() => {}
                    }
                })
                .await;
        })
    }
}
