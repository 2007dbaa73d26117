//! Open WebSockets by participant. Every message for a participant goes
//! through here, so one participant's events can never reach another's socket:
//! client ids are looked up only among the owner's own connections.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use axum::body::Bytes;
use tokio::sync::mpsc;

/// A message for one socket.
#[derive(Debug, Clone)]
pub enum Outbound {
    Text(Arc<str>),
    Binary(Bytes),
    /// Replaced by a newer socket with the same client id.
    Close,
}

/// Socket buffer: a client that stops reading loses messages past this, rather
/// than holding memory or blocking everyone else.
const SOCKET_BUFFER: usize = 1024;

pub struct Conn {
    pub conn_id: u64,
    pub client_id: String,
    pub preview_metadata: AtomicBool,
    tx: mpsc::Sender<Outbound>,
}

impl Conn {
    fn send(&self, msg: Outbound) {
        if self.tx.try_send(msg).is_err() {
            metrics::counter!(crate::telemetry::WS_DROPPED).increment(1);
        }
    }
}

#[derive(Default)]
pub struct Hub {
    users: Mutex<HashMap<String, Vec<Arc<Conn>>>>,
    next_id: AtomicU64,
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a socket; an existing socket of the same participant with the
    /// same client id is told to close (ComfyUI replaces it too).
    pub fn register(&self, user: &str, client_id: &str) -> (Arc<Conn>, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(SOCKET_BUFFER);
        let conn = Arc::new(Conn {
            conn_id: self.next_id.fetch_add(1, Ordering::Relaxed),
            client_id: client_id.to_string(),
            preview_metadata: AtomicBool::new(false),
            tx,
        });
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let list = users.entry(user.to_string()).or_default();
        list.retain(|c| {
            if c.client_id == client_id {
                c.send(Outbound::Close);
                false
            } else {
                true
            }
        });
        list.push(conn.clone());
        metrics::gauge!(crate::telemetry::WS_OPEN).increment(1.0);
        (conn, rx)
    }

    pub fn unregister(&self, user: &str, conn_id: u64) {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = users.get_mut(user) {
            let before = list.len();
            list.retain(|c| c.conn_id != conn_id);
            if list.len() < before {
                metrics::gauge!(crate::telemetry::WS_OPEN).decrement(1.0);
            }
            if list.is_empty() {
                users.remove(user);
            }
        }
    }

    fn conns(&self, user: &str) -> Vec<Arc<Conn>> {
        self.users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(user)
            .cloned()
            .unwrap_or_default()
    }

    /// To every open tab of the participant (ComfyUI's broadcasts: `status`,
    /// `progress_state`).
    pub fn send_user(&self, user: &str, text: &str) {
        let msg: Arc<str> = Arc::from(text);
        for c in self.conns(user) {
            c.send(Outbound::Text(msg.clone()));
        }
    }

    /// To the participant's socket with this client id (execution messages).
    /// Returns whether such a socket was open.
    pub fn send_client(&self, user: &str, client_id: &str, text: &str) -> bool {
        let mut hit = false;
        for c in self
            .conns(user)
            .into_iter()
            .filter(|c| c.client_id == client_id)
        {
            c.send(Outbound::Text(Arc::from(text)));
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
            c.send(Outbound::Binary(frame));
        }
    }

    pub fn open_sockets(&self) -> usize {
        self.users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }

    pub fn connected_users(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }
}

impl comfyume_dispatch::EventSink for Hub {
    fn listening(&self, user: &str) -> bool {
        self.users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(user)
            .is_some_and(|c| !c.is_empty())
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

    #[test]
    fn client_ids_are_per_participant() {
        let hub = Hub::new();
        let (_a, mut rx_a) = hub.register("user001", "tab");
        let (_b, mut rx_b) = hub.register("user002", "tab");
        assert!(hub.send_client("user001", "tab", "x"));
        assert!(matches!(rx_a.try_recv(), Ok(Outbound::Text(_))));
        assert!(rx_b.try_recv().is_err());
        hub.send_user("user002", "y");
        assert!(rx_a.try_recv().is_err());
        assert!(matches!(rx_b.try_recv(), Ok(Outbound::Text(t)) if &*t == "y"));
    }

    #[test]
    fn same_client_id_replaces_the_old_socket() {
        let hub = Hub::new();
        let (_a, mut rx_a) = hub.register("u", "same");
        let (_b, _rx_b) = hub.register("u", "same");
        assert!(matches!(rx_a.try_recv(), Ok(Outbound::Close)));
        assert_eq!(hub.open_sockets(), 1);
    }
}
