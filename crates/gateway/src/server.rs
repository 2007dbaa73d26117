//! The listener: HTTP/1.1 connections with a header-read timeout, an idle timeout and a cap
//! on open connections. A client that sends half a request, or opens a socket and says
//! nothing, or stops mid-body, is disconnected instead of holding a task and a file
//! descriptor for ever. WebSockets keep their connection's place until they close (the
//! connection's I/O moves into the WebSocket); their own idle rule is in [`crate::ws`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tower::ServiceExt;

/// The connection rules (see the `*_TIMEOUT_SECS` and `MAX_CONNECTIONS` settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// A request's headers must arrive within this from when the server starts waiting for
    /// them: from the connection's start, and after each answer on a kept-alive connection.
    pub header_read_timeout: Duration,
    /// A connection on which no byte moves either way for this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once; past it a new one gets `503` and is closed.
    pub max_connections: usize,
}

/// When a byte last moved on a connection, in ms after it opened (the tokio clock, so tests
/// can run the production timeouts in virtual time).
struct Activity {
    opened: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
    fn touch(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }
    fn last(&self) -> Instant {
        self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// The socket, noting every byte that moves, and holding the connection's place under
/// `MAX_CONNECTIONS` for as long as it lives (into a WebSocket, after an upgrade).
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
    _place: OwnedSemaphorePermit,
    /// Bytes moved (handles taken once per connection: each count is one atomic add).
    sent: metrics::Counter,
    received: metrics::Counter,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.activity.touch();
            self.received.increment(n as u64);
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.activity.touch();
            self.sent.increment(n as u64);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.activity.touch();
            self.sent.increment(n as u64);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What a connection past `MAX_CONNECTIONS` is told before it is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 52\r\nConnection: close\r\n\r\nThe server has too many open connections; try again.";

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting, lets the open
/// requests finish (WebSockets are not waited for) and returns.
pub async fn serve<S>(
    listener: TcpListener,
    app: S,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()>
where
    S: tower::Service<
            Request,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let places = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Dropped to tell connections to finish; each holds a receiver until it ends.
    let (stop_tx, stop_rx) = watch::channel(());
    let (done_tx, done_rx) = watch::channel(());
    drop(stop_rx);
    let mut shutdown = pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            metrics::counter!(crate::telemetry::CONNECTIONS_REFUSED).increment(1);
            tracing::warn!(%peer, max = limits.max_connections, "too many open connections; refusing one");
            tokio::spawn(async move {
                let mut tcp = tcp;
                let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(BUSY)).await;
            });
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let conn = connection(
            tcp,
            peer,
            place,
            app.clone(),
            limits,
            stop_tx.subscribe(),
            done_rx.clone(),
        );
        tokio::spawn(conn);
    }
    drop(listener);
    drop(stop_tx);
    drop(done_rx);
    // Every connection task holds a clone of `done_rx`: closed once all have ended.
    done_tx.closed().await;
    Ok(())
}

async fn connection<S>(
    tcp: TcpStream,
    peer: SocketAddr,
    place: OwnedSemaphorePermit,
    app: S,
    limits: ConnLimits,
    mut stop: watch::Receiver<()>,
    _done: watch::Receiver<()>,
) where
    S: tower::Service<
            Request,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked {
        inner: tcp,
        activity: activity.clone(),
        _place: place,
        sent: metrics::counter!(crate::telemetry::HTTP_SENT_BYTES),
        received: metrics::counter!(crate::telemetry::HTTP_RECEIVED_BYTES),
    });
    let svc = app.map_request(move |req: hyper::Request<Incoming>| {
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(ConnectInfo(peer));
        req
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let conn = builder
        .serve_connection(io, TowerToHyperService::new(svc))
        .with_upgrades();
    let mut conn = pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                break;
            }
            _ = tokio::time::sleep_until(activity.last() + limits.idle_timeout) => {
                if activity.last() + limits.idle_timeout <= Instant::now() {
                    tracing::debug!(%peer, "closing an idle connection");
                    metrics::counter!(crate::telemetry::CONNECTIONS_TIMED_OUT).increment(1);
                    // Dropping the connection closes the socket.
                    break;
                }
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Accept errors are mostly about one connection (reset before accept) or temporary (out of
/// file descriptors): log, wait a moment if it is not about one connection, go on.
async fn accept_error(e: io::Error) {
    use io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed; retrying in a second");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    //! The production timeouts, in virtual time: a real socket on 127.0.0.1, a paused clock
    //! that jumps whenever every task waits.
    use super::*;
    use crate::state::{DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_IDLE_TIMEOUT};
    use axum::Router;
    use axum::routing::{get, post};
    use tokio::io::AsyncReadExt;

    fn limits() -> ConnLimits {
        ConnLimits {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: 3,
        }
    }

    async fn start(limits: ConnLimits) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let app = Router::new()
            .route("/ok", get(|| async { "ok" }))
            .route("/echo", post(|body: String| async move { body }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, app, limits, async {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    /// Reads until the server closes; how long that took on the (virtual) clock. Fails if
    /// the server keeps the connection open for ten minutes.
    async fn closed_after(s: &mut TcpStream) -> (Duration, Vec<u8>) {
        let start = Instant::now();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(600), s.read_to_end(&mut buf))
            .await
            .expect("the server closes the connection within 10 minutes")
            .ok();
        (start.elapsed(), buf)
    }

    /// Closed at `limit`, within the second after it (virtual time).
    fn assert_closed_at(waited: Duration, limit: Duration) {
        assert!(waited >= limit, "{waited:?}");
        assert!(waited < limit + Duration::from_secs(1), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn half_sent_headers_are_cut_off_at_the_header_timeout() {
        let (addr, _stop) = start(limits()).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        let (waited, answer) = closed_after(&mut s).await;
        assert!(
            answer.is_empty() || answer.starts_with(b"HTTP/1.1 408"),
            "{answer:?}"
        );
        assert_closed_at(waited, DEFAULT_HEADER_READ_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_socket_is_closed_at_the_header_timeout() {
        let (addr, _stop) = start(limits()).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let (waited, _) = closed_after(&mut s).await;
        assert_closed_at(waited, DEFAULT_HEADER_READ_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_alive_connection_is_closed_when_no_next_request_comes() {
        let (addr, _stop) = start(limits()).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (waited, answer) = closed_after(&mut s).await;
        assert!(answer.starts_with(b"HTTP/1.1 200"), "answered first");
        assert_closed_at(waited, DEFAULT_HEADER_READ_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_coming_is_cut_off_at_the_idle_timeout() {
        let (addr, _stop) = start(limits()).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nfirst bytes")
            .await
            .unwrap();
        let (waited, answer) = closed_after(&mut s).await;
        assert!(
            !answer.starts_with(b"HTTP/1.1 200"),
            "never answered as complete"
        );
        assert_closed_at(waited, DEFAULT_IDLE_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_body_that_keeps_moving_is_not_cut_off() {
        let (addr, _stop) = start(limits()).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        // One byte every 100 s: slow, but never idle for 120 s.
        for b in b"hello" {
            tokio::time::sleep(Duration::from_secs(100)).await;
            s.write_all(&[*b]).await.unwrap();
        }
        let (_, answer) = closed_after(&mut s).await;
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("hello"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_connection_cap_new_connections_get_503() {
        let (addr, _stop) = start(limits()).await;
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        // Let the server accept those three first.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let (_, answer) = closed_after(&mut s).await;
        assert!(
            answer.starts_with(b"HTTP/1.1 503"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        // One leaves (closed at the header timeout, or by its client): room again.
        drop(held.pop());
        tokio::time::sleep(Duration::from_millis(10)).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let (_, answer) = closed_after(&mut s).await;
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }

    #[tokio::test]
    async fn shutdown_lets_an_open_request_finish() {
        let app = Router::new().route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                "done"
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, limits(), async {
            let _ = rx.await;
        }));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(()).unwrap();
        let (_, answer) = closed_after(&mut s).await;
        assert!(String::from_utf8_lossy(&answer).ends_with("done"));
        server.await.unwrap().unwrap();
    }
}
