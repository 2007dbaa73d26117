//! Where job events go: implemented by the gateway's WebSocket hub, so that
//! dispatch never depends on the HTTP layer.

use bytes::Bytes;

pub trait EventSink: Send + Sync {
    /// Whether `user` has any socket open (so a message for them is worth composing).
    fn listening(&self, user: &str) -> bool;
    /// To every open tab of `user` (ComfyUI's broadcasts).
    fn to_user(&self, user: &str, text: &str);
    /// To `user`'s socket with `client_id` (execution messages). Whether one was open.
    fn to_client(&self, user: &str, client_id: &str, text: &str) -> bool;
    /// A preview frame in both encodings; each socket gets the one it asked for.
    fn preview(&self, user: &str, client_id: &str, legacy: Bytes, with_meta: Bytes);
}

/// Drops everything: for tools and tests that run a queue without sockets.
pub struct NoEvents;

impl EventSink for NoEvents {
    fn listening(&self, _: &str) -> bool {
        false
    }
    fn to_user(&self, _: &str, _: &str) {}
    fn to_client(&self, _: &str, _: &str, _: &str) -> bool {
        false
    }
    fn preview(&self, _: &str, _: &str, _: Bytes, _: Bytes) {}
}
