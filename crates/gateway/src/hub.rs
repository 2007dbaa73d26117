//! Open WebSockets by participant. Every message for a participant goes
//! through here, so one participant's events can never reach another's socket:
//! client ids are looked up only among the owner's own connections.
//!
//! Each socket has a bounded buffer. A client that stops reading loses previews and
//! progress first, then other step messages; a job's end (`executing` with no node,
//! `execution_success`/`_error`/`_interrupted`) and `status` are never dropped: when even one
//! of those no longer fits, the socket is closed, so the frontend reconnects and re-syncs
//! instead of waiting forever for an end it missed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use axum::body::Bytes;
use tokio::sync::{Notify, mpsc};

/// A message for one socket.
#[derive(Debug, Clone)]
pub enum Outbound {
    Text(Arc<str>),
    Binary(Bytes),
}

/// How much a message matters to a client that has fallen behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// Previews, progress: the next one replaces it.
    Low,
    /// Step messages (`executing` a node, `executed`, `execution_start`, ...).
    Normal,
    /// A job's end, `status`, and our own notices: never dropped.
    Critical,
}

/// What a text message means to a client that has fallen behind, from its `type` (and, for
/// `executing`, whether it names a node).
pub fn text_priority(text: &str) -> Priority {
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(borrow, rename = "type")]
        kind: std::borrow::Cow<'a, str>,
        #[serde(default)]
        data: Option<Data>,
    }
    #[derive(serde::Deserialize)]
    struct Data {
        #[serde(default)]
        node: serde_json::Value,
    }
    let Ok(head) = serde_json::from_str::<Head>(text) else {
        return Priority::Normal;
    };
    match head.kind.as_ref() {
        "progress" | "progress_state" | "logs" | "b_preview" => Priority::Low,
        "status"
        | "execution_success"
        | "execution_error"
        | "execution_interrupted"
        | "comfyume" => Priority::Critical,
        "executing" if head.data.is_none_or(|d| d.node.is_null()) => Priority::Critical,
        _ => Priority::Normal,
    }
}

/// Socket buffer, in messages.
const SOCKET_BUFFER: usize = 1024;
/// Low-priority messages are queued only while fewer than this are waiting, so there is
/// always room for the messages that matter.
const LOW_MARK: usize = SOCKET_BUFFER * 3 / 4;
/// The same for normal messages: the rest is kept for the critical ones.
const NORMAL_MARK: usize = SOCKET_BUFFER * 15 / 16;

/// Why the server closes a socket; sent to the client in the close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// A newer socket with the same client id took its place (ComfyUI does the same).
    Replaced,
    /// The client fell so far behind that a message it needs could not be queued.
    Overflow,
    /// `/logout` of the session it was opened with.
    SignedOut,
    /// The account was disabled or removed, or its password changed.
    AccountChanged,
    /// Nothing heard from the client (not even a pong) for the idle timeout.
    Idle,
}

impl CloseReason {
    /// The WebSocket close code and reason.
    pub fn frame(self) -> (u16, &'static str) {
        match self {
            CloseReason::Replaced => (1000, "replaced by a newer connection"),
            CloseReason::Overflow => (1013, "too far behind; reconnect to catch up"),
            CloseReason::SignedOut => (1008, "signed out"),
            CloseReason::AccountChanged => (1008, "account changed; sign in again"),
            CloseReason::Idle => (1001, "idle"),
        }
    }
}

/// SHA-256 of a session token (never the token itself).
pub type SessionKey = [u8; 32];

/// Who a socket belongs to.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Whose events it receives (the participant of the workspace).
    pub user: String,
    /// Who opened it (the participant, or the instructor on `/userNNN/`).
    pub account: String,
    /// The session it was opened with, if a cookie opened it.
    pub session: Option<SessionKey>,
    pub client_id: String,
}

pub struct Conn {
    pub conn_id: u64,
    pub client_id: String,
    pub account: String,
    pub session: Option<SessionKey>,
    pub preview_metadata: AtomicBool,
    tx: mpsc::Sender<Outbound>,
    close: Mutex<Option<CloseReason>>,
    closed: Notify,
}

impl Conn {
    fn push(&self, msg: Outbound, priority: Priority) {
        let waiting = self.tx.max_capacity() - self.tx.capacity();
        let room = match priority {
            Priority::Low => waiting < LOW_MARK,
            Priority::Normal => waiting < NORMAL_MARK,
            Priority::Critical => true,
        };
        let queued = room
            && match self.tx.try_send(msg) {
                Ok(()) => true,
                // The socket's task is gone: nothing to deliver to.
                Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(_)) => false,
            };
        if queued {
            return;
        }
        let label = match priority {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::Critical => "critical",
        };
        metrics::counter!(crate::telemetry::WS_DROPPED, "priority" => label).increment(1);
        if priority == Priority::Critical {
            tracing::warn!(
                conn = self.conn_id,
                account = %self.account,
                "a WebSocket client stopped reading; closing it so it reconnects and catches up"
            );
            self.close(CloseReason::Overflow);
        }
    }

    /// Asks the socket's task to close it (the first reason wins).
    pub fn close(&self, reason: CloseReason) {
        let mut r = self.close.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
            // notify_one keeps a permit: a task not yet waiting still sees it.
            self.closed.notify_one();
        }
    }

    /// Resolves when the socket is to be closed, with the reason.
    pub async fn closing(&self) -> CloseReason {
        loop {
            if let Some(r) = *self.close.lock().unwrap_or_else(|p| p.into_inner()) {
                return r;
            }
            self.closed.notified().await;
        }
    }
}

/// A place for one more socket of a participant, taken before the upgrade is answered;
/// given back when dropped (the upgrade failed, or the socket closed).
pub struct SocketPermit {
    hub: Arc<Hub>,
    user: String,
}

impl Drop for SocketPermit {
    fn drop(&mut self) {
        let mut users = self.hub.lock();
        if let Some(u) = users.get_mut(&self.user) {
            u.permits = u.permits.saturating_sub(1);
            if u.permits == 0 && u.conns.is_empty() {
                users.remove(&self.user);
            }
        }
    }
}

#[derive(Default)]
struct UserSockets {
    conns: Vec<Arc<Conn>>,
    /// Sockets open or being opened.
    permits: usize,
}

/// `max` sockets of this participant are already open or opening.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("at most {max} connections per participant")]
pub struct TooManySockets {
    pub max: usize,
}

#[derive(Default)]
pub struct Hub {
    users: Mutex<HashMap<String, UserSockets>>,
    next_id: AtomicU64,
    /// Bumped whenever a socket opens or closes (the dashboard's "online now").
    changes: tokio::sync::watch::Sender<u64>,
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, UserSockets>> {
        self.users.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place for a socket of `user`, unless `max` are open or opening. A socket that
    /// will replace one with the same client id always gets a place.
    pub fn reserve(
        self: &Arc<Self>,
        user: &str,
        client_id: &str,
        max: usize,
    ) -> Result<SocketPermit, TooManySockets> {
        let mut users = self.lock();
        let u = users.entry(user.to_string()).or_default();
        let replaces = u.conns.iter().any(|c| c.client_id == client_id);
        if u.permits >= max && !replaces {
            if u.permits == 0 && u.conns.is_empty() {
                users.remove(user);
            }
            return Err(TooManySockets { max });
        }
        u.permits += 1;
        Ok(SocketPermit {
            hub: self.clone(),
            user: user.to_string(),
        })
    }

    /// Registers a socket; an existing socket of the same participant with the
    /// same client id is told to close (ComfyUI replaces it too).
    pub fn register(&self, reg: Registration) -> (Arc<Conn>, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(SOCKET_BUFFER);
        let conn = Arc::new(Conn {
            conn_id: self.next_id.fetch_add(1, Ordering::Relaxed),
            client_id: reg.client_id.clone(),
            account: reg.account,
            session: reg.session,
            preview_metadata: AtomicBool::new(false),
            tx,
            close: Mutex::new(None),
            closed: Notify::new(),
        });
        let mut users = self.lock();
        let u = users.entry(reg.user).or_default();
        u.conns.retain(|c| {
            if c.client_id == reg.client_id {
                c.close(CloseReason::Replaced);
                false
            } else {
                true
            }
        });
        u.conns.push(conn.clone());
        Self::gauges(&users);
        drop(users);
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        (conn, rx)
    }

    /// A receiver that sees sockets open and close (coalesced).
    pub fn subscribe_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Open sockets per participant (whose workspace they show).
    pub fn sockets_by_user(&self) -> HashMap<String, usize> {
        self.lock()
            .iter()
            .filter(|(_, u)| !u.conns.is_empty())
            .map(|(k, u)| (k.clone(), u.conns.len()))
            .collect()
    }

    /// To every open socket of every participant (the instructor's broadcast), never dropped.
    pub fn send_all(&self, text: &str) -> usize {
        let msg: Arc<str> = Arc::from(text);
        let conns = self.all_conns();
        for c in &conns {
            c.push(Outbound::Text(msg.clone()), Priority::Critical);
        }
        conns.len()
    }

    fn count(users: &HashMap<String, UserSockets>) -> usize {
        users.values().map(|u| u.conns.len()).sum()
    }

    /// Open sockets, and participants with at least one open.
    fn gauges(users: &HashMap<String, UserSockets>) {
        metrics::gauge!(crate::telemetry::WS_OPEN).set(Self::count(users) as f64);
        let online = users.values().filter(|u| !u.conns.is_empty()).count();
        metrics::gauge!(crate::telemetry::PARTICIPANTS_ONLINE).set(online as f64);
    }

    pub fn unregister(&self, user: &str, conn_id: u64) {
        let mut users = self.lock();
        if let Some(u) = users.get_mut(user) {
            u.conns.retain(|c| c.conn_id != conn_id);
            if u.conns.is_empty() && u.permits == 0 {
                users.remove(user);
            }
        }
        Self::gauges(&users);
        drop(users);
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn conns(&self, user: &str) -> Vec<Arc<Conn>> {
        self.lock()
            .get(user)
            .map(|u| u.conns.clone())
            .unwrap_or_default()
    }

    fn all_conns(&self) -> Vec<Arc<Conn>> {
        self.lock()
            .values()
            .flat_map(|u| u.conns.iter().cloned())
            .collect()
    }

    /// To every open tab of the participant (ComfyUI's broadcasts: `status`,
    /// `progress_state`).
    pub fn send_user(&self, user: &str, text: &str) {
        let priority = text_priority(text);
        let msg: Arc<str> = Arc::from(text);
        for c in self.conns(user) {
            c.push(Outbound::Text(msg.clone()), priority);
        }
    }

    /// To the participant's socket with this client id (execution messages).
    /// Returns whether such a socket was open.
    pub fn send_client(&self, user: &str, client_id: &str, text: &str) -> bool {
        let mut hit = false;
        let priority = text_priority(text);
        for c in self
            .conns(user)
            .into_iter()
            .filter(|c| c.client_id == client_id)
        {
            c.push(Outbound::Text(Arc::from(text)), priority);
            hit = true;
        }
        hit
    }

    /// A preview frame: `legacy` (type 1) or `with_meta` (type 4) per socket,
    /// as each client announced in its feature flags.
    pub fn send_preview(&self, user: &str, client_id: &str, legacy: Bytes, with_meta: Bytes) {
        for c in self
            .conns(user)
            .into_iter()
            .filter(|c| c.client_id == client_id)
        {
            let frame = if c.preview_metadata.load(Ordering::Relaxed) {
                with_meta.clone()
            } else {
                legacy.clone()
            };
            c.push(Outbound::Binary(frame), Priority::Low);
        }
    }

    /// A message to every socket `account` opened (wherever it looks), never dropped.
    pub fn send_account(&self, account: &str, text: &str) -> usize {
        let msg: Arc<str> = Arc::from(text);
        let mut n = 0;
        for c in self
            .all_conns()
            .into_iter()
            .filter(|c| c.account == account)
        {
            c.push(Outbound::Text(msg.clone()), Priority::Critical);
            n += 1;
        }
        n
    }

    /// Closes every socket `account` opened; returns how many.
    pub fn close_account(&self, account: &str, reason: CloseReason) -> usize {
        let mut n = 0;
        for c in self
            .all_conns()
            .into_iter()
            .filter(|c| c.account == account)
        {
            c.close(reason);
            n += 1;
        }
        n
    }

    /// Closes every socket opened with this session; returns how many.
    pub fn close_session(&self, session: &SessionKey, reason: CloseReason) -> usize {
        let mut n = 0;
        for c in self
            .all_conns()
            .into_iter()
            .filter(|c| c.session.as_ref() == Some(session))
        {
            c.close(reason);
            n += 1;
        }
        n
    }

    pub fn open_sockets(&self) -> usize {
        Self::count(&self.lock())
    }

    pub fn connected_users(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, u)| !u.conns.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }
}

impl comfyume_dispatch::EventSink for Hub {
    fn listening(&self, user: &str) -> bool {
        self.lock().get(user).is_some_and(|u| !u.conns.is_empty())
    }
    fn to_user(&self, user: &str, text: &str) {
        self.send_user(user, text);
    }
    fn to_client(&self, user: &str, client_id: &str, text: &str) -> bool {
        self.send_client(user, client_id, text)
    }
    fn preview(&self, user: &str, client_id: &str, legacy: Bytes, with_meta: Bytes) {
        self.send_preview(user, client_id, legacy, with_meta);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(user: &str, client_id: &str) -> Registration {
        Registration {
            user: user.into(),
            account: user.into(),
            session: None,
            client_id: client_id.into(),
        }
    }

    fn texts(rx: &mut mpsc::Receiver<Outbound>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            if let Outbound::Text(t) = m {
                out.push(t.to_string());
            }
        }
        out
    }

    const END: &str = r#"{"type":"executing","data":{"node":null,"prompt_id":"p"}}"#;

    #[test]
    fn client_ids_are_per_participant() {
        let hub = Hub::new();
        let (_a, mut rx_a) = hub.register(reg("user001", "tab"));
        let (_b, mut rx_b) = hub.register(reg("user002", "tab"));
        assert!(hub.send_client("user001", "tab", "x"));
        assert!(matches!(rx_a.try_recv(), Ok(Outbound::Text(_))));
        assert!(rx_b.try_recv().is_err());
        hub.send_user("user002", "y");
        assert!(rx_a.try_recv().is_err());
        assert!(matches!(rx_b.try_recv(), Ok(Outbound::Text(t)) if &*t == "y"));
    }

    #[tokio::test]
    async fn same_client_id_replaces_the_old_socket() {
        let hub = Hub::new();
        let (a, _rx_a) = hub.register(reg("u", "same"));
        let (_b, _rx_b) = hub.register(reg("u", "same"));
        assert_eq!(a.closing().await, CloseReason::Replaced);
        assert_eq!(hub.open_sockets(), 1);
    }

    #[test]
    fn priorities_follow_the_message_type() {
        use Priority::*;
        for (text, p) in [
            (END, Critical),
            (
                r#"{"type":"executing","data":{"node":"3","prompt_id":"p"}}"#,
                Normal,
            ),
            (
                r#"{"type":"execution_success","data":{"prompt_id":"p"}}"#,
                Critical,
            ),
            (r#"{"type":"execution_error","data":{}}"#, Critical),
            (r#"{"type":"execution_interrupted","data":{}}"#, Critical),
            (r#"{"type":"status","data":{"status":{}}}"#, Critical),
            (r#"{"type":"comfyume","data":{"message":"m"}}"#, Critical),
            (r#"{"type":"progress","data":{"value":1,"max":2}}"#, Low),
            (r#"{"type":"progress_state","data":{"nodes":{}}}"#, Low),
            (
                r#"{"type":"executed","data":{"node":"3","output":{}}}"#,
                Normal,
            ),
            (r#"{"data":{"node":null},"type":"executing"}"#, Critical),
            ("not json", Normal),
        ] {
            assert_eq!(text_priority(text), p, "{text}");
        }
    }

    /// A client that stops reading: previews and progress fill only part of its buffer,
    /// so the job's end still gets in, in order after what was queued.
    #[test]
    fn a_stalled_client_loses_previews_and_progress_not_the_end() {
        let hub = Hub::new();
        let (conn, mut rx) = hub.register(reg("u", "tab"));
        for _ in 0..5_000 {
            hub.send_preview(
                "u",
                "tab",
                Bytes::from_static(b"p"),
                Bytes::from_static(b"m"),
            );
            hub.send_client(
                "u",
                "tab",
                r#"{"type":"progress","data":{"value":1,"max":9}}"#,
            );
        }
        hub.send_client(
            "u",
            "tab",
            r#"{"type":"executed","data":{"node":"9","output":{}}}"#,
        );
        hub.send_client(
            "u",
            "tab",
            r#"{"type":"execution_success","data":{"prompt_id":"p"}}"#,
        );
        hub.send_user("u", r#"{"type":"status","data":{"status":{}}}"#);
        hub.send_client("u", "tab", END);
        let got = texts(&mut rx);
        let tail: Vec<&str> = got.iter().rev().take(4).rev().map(String::as_str).collect();
        assert!(tail[0].contains("executed"), "{tail:?}");
        assert!(tail[1].contains("execution_success"));
        assert!(tail[2].contains("status"));
        assert_eq!(tail[3], END);
        assert!(got.len() < 5_000, "progress was dropped");
        assert!(
            conn.close.lock().unwrap().is_none(),
            "no need to close: everything that matters got in"
        );
    }

    /// When even a job's end cannot be queued, the socket is closed (the frontend reconnects
    /// and re-syncs) rather than silently missing it.
    #[tokio::test]
    async fn a_full_buffer_closes_the_socket_instead_of_dropping_the_end() {
        let hub = Hub::new();
        let (conn, mut rx) = hub.register(reg("u", "tab"));
        for i in 0..SOCKET_BUFFER {
            hub.send_user("u", &format!(r#"{{"type":"status","data":{{"n":{i}}}}}"#));
        }
        assert!(conn.close.lock().unwrap().is_none());
        hub.send_client("u", "tab", END);
        assert_eq!(conn.closing().await, CloseReason::Overflow);
        assert_eq!(texts(&mut rx).len(), SOCKET_BUFFER);
    }

    #[test]
    fn sockets_per_participant_are_capped_before_the_upgrade() {
        let hub = Arc::new(Hub::new());
        let p1 = hub.reserve("u", "a", 2).unwrap();
        let p2 = hub.reserve("u", "b", 2).unwrap();
        assert_eq!(
            hub.reserve("u", "c", 2).err(),
            Some(TooManySockets { max: 2 })
        );
        assert!(hub.reserve("other", "c", 2).is_ok(), "per participant");
        let (_c, _rx) = hub.register(reg("u", "a"));
        assert!(
            hub.reserve("u", "a", 2).is_ok(),
            "a reconnect with the same client id replaces, so it fits"
        );
        drop(p2);
        let p3 = hub.reserve("u", "c", 2).unwrap();
        drop((p1, p3));
        assert_eq!(hub.lock().get("u").map(|u| u.permits), Some(0));
    }

    #[tokio::test]
    async fn sockets_close_by_account_and_by_session() {
        let hub = Hub::new();
        let mut by_admin = reg("user001", "t1");
        by_admin.account = "teacher".into();
        let (admin_conn, _r1) = hub.register(by_admin);
        let mut with_session = reg("user001", "t2");
        with_session.session = Some([7; 32]);
        let (s_conn, _r2) = hub.register(with_session);
        let (other, _r3) = hub.register(reg("user001", "t3"));

        assert_eq!(hub.close_session(&[7; 32], CloseReason::SignedOut), 1);
        assert_eq!(s_conn.closing().await, CloseReason::SignedOut);
        assert_eq!(hub.close_account("user001", CloseReason::AccountChanged), 2);
        assert_eq!(other.closing().await, CloseReason::AccountChanged);
        assert!(
            admin_conn.close.lock().unwrap().is_none(),
            "the instructor's socket on the workspace stays"
        );
        assert_eq!(hub.send_account("teacher", r#"{"type":"comfyume"}"#), 1);
    }

    #[test]
    fn broadcast_reaches_every_socket_and_changes_are_seen() {
        let hub = Hub::new();
        let changes = hub.subscribe_changes();
        let (_a, mut rx_a) = hub.register(reg("user001", "t1"));
        let (b, mut rx_b) = hub.register(reg("user002", "t2"));
        assert!(changes.has_changed().unwrap());
        assert_eq!(
            hub.sockets_by_user(),
            HashMap::from([("user001".to_string(), 1), ("user002".to_string(), 1)])
        );
        assert_eq!(hub.send_all(r#"{"type":"comfyume","data":{}}"#), 2);
        assert_eq!(texts(&mut rx_a).len(), 1);
        assert_eq!(texts(&mut rx_b).len(), 1);
        hub.unregister("user002", b.conn_id);
        assert_eq!(hub.sockets_by_user().len(), 1);
    }
}
