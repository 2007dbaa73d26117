//! What the instructor set survives a restart of `serve`: the queue settings (policy,
//! limits, pause, participants' levels, the front list), the broadcast and the room view's
//! pinned result live in the store's metadata. Jobs' own levels are in the jobs table.

use comfyume_dispatch::QueueSettings;
use comfyume_gateway::AppState;
use serde::{Serialize, de::DeserializeOwned};

pub const QUEUE_KEY: &str = "admin.queue_settings";
pub const BROADCAST_KEY: &str = "admin.broadcast";
pub const ROOM_KEY: &str = "admin.room";

/// Saves the queue's current settings (after every change the instructor makes).
pub async fn save_queue(state: &AppState) -> Result<(), comfyume_store::StoreError> {
    save(state, QUEUE_KEY, &state.queue.settings()).await
}

pub async fn save<T: Serialize>(
    state: &AppState,
    key: &str,
    v: &T,
) -> Result<(), comfyume_store::StoreError> {
    let text =
        serde_json::to_string(v).map_err(|e| comfyume_store::StoreError::Other(e.to_string()))?;
    state.store.put_meta(key, &text, "admin").await
}

pub async fn load<T: DeserializeOwned>(state: &AppState, key: &str) -> Option<T> {
    match state.store.get_meta(key).await {
        Ok(Some(e)) => match serde_json::from_str(&e.value) {
            Ok(v) => Some(v),
            Err(err) => {
                tracing::warn!(key, error = %err, "ignoring unreadable saved admin setting");
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            tracing::error!(key, error = %e, "could not read a saved admin setting");
            None
        }
    }
}

/// At start: the queue settings the instructor last chose win over the configured defaults
/// (QUEUE_MODE, MAX_*), as they were changed at run time on purpose.
pub async fn restore(state: &AppState) {
    if let Some(s) = load::<QueueSettings>(state, QUEUE_KEY).await {
        tracing::info!(
            policy = %s.policy,
            paused = s.paused,
            max_running_per_user = s.max_running_per_user,
            max_queued_per_user = s.max_queued_per_user,
            max_queue_depth = s.max_queue_depth,
            levels = s.user_priorities.len(),
            "queue settings as the instructor last set them (they override QUEUE_MODE and MAX_*)"
        );
        state.queue.apply_settings(&s);
    }
}
