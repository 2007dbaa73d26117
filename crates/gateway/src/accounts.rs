//! Acts on changes to who may sign in, wherever they were made: by this server, or by
//! `comfyume users passwd|disable|remove` in another process. Twice a second it reads the
//! store's numbered account changes after the last one it saw (one indexed read) and, for
//! each: forgets the account's cached Basic credentials, closes the WebSockets it opened, and
//! for a disabled or removed participant cancels their waiting jobs and stops the running one,
//! telling their tabs why before they close.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use comfyume_store::{AccountChange, AccountChangeKind, JobPatch, JobState};
use futures_util::FutureExt;
use serde_json::json;

use crate::hub::CloseReason;
use crate::state::AppState;

/// How often the store is asked for account changes: a change by another process takes
/// effect within this (plus the round's own work), well inside the 2 s promised.
pub const POLL_EVERY: Duration = Duration::from_millis(500);
/// A disabled or removed participant's jobs are swept again on this many later rounds (2 s):
/// the dispatcher may have been handing one of them to a GPU at the moment of the change, or
/// re-attaching one after a restart.
const SWEEPS: u32 = 4;
/// Changes read per store call.
const PAGE: u32 = 500;

/// Starts the watcher; it runs until the returned handle is aborted. A round that fails is
/// logged and the next one runs; a round that panics too.
pub fn spawn(state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut w = Watcher::new(state);
        let mut tick = tokio::time::interval(POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(panic) = AssertUnwindSafe(w.round()).catch_unwind().await {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(panic = %what, "the account watcher's round panicked; it goes on");
            }
        }
    })
}

pub struct Watcher {
    state: AppState,
    /// The newest change acted on; `None` until the store first answered.
    cursor: Option<i64>,
    /// Participants whose jobs are swept again, with the rounds left.
    sweeps: HashMap<String, (u32, AccountChangeKind)>,
}

impl Watcher {
    pub fn new(state: AppState) -> Self {
        Watcher {
            state,
            cursor: None,
            sweeps: HashMap::new(),
        }
    }

    /// One poll: acts on every change since the last round.
    pub async fn round(&mut self) {
        let mut cursor = match self.cursor {
            Some(c) => c,
            // Start at the newest change: what happened before this server started has no
            // sockets or cached credentials to end here.
            None => match self.state.store.last_account_change().await {
                Ok(c) => {
                    self.cursor = Some(c);
                    self.settle_at_start().await;
                    c
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not read account changes; trying again");
                    return;
                }
            },
        };
        loop {
            let changes = match self.state.store.account_changes(cursor, PAGE).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "could not read account changes; trying again");
                    break;
                }
            };
            for c in &changes {
                self.apply(c).await;
                cursor = c.seq;
                self.cursor = Some(cursor);
            }
            if changes.len() < PAGE as usize {
                break;
            }
        }
        let again: Vec<(String, AccountChangeKind)> = self
            .sweeps
            .iter()
            .map(|(u, (_, k))| (u.clone(), *k))
            .collect();
        for (user, kind) in again {
            self.stop_jobs(&user, kind).await;
            if let Some((left, _)) = self.sweeps.get_mut(&user) {
                *left -= 1;
                if *left == 0 {
                    self.sweeps.remove(&user);
                }
            }
        }
    }

    /// Jobs from before this server started (waiting, or on a GPU) whose owner was disabled
    /// or removed meanwhile (the CLI works while the server is down too) are stopped as if
    /// the change had happened now.
    async fn settle_at_start(&mut self) {
        let users: HashMap<String, bool> = match self.state.store.list_users().await {
            Ok(list) => list.into_iter().map(|u| (u.name, u.disabled)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "could not list the accounts at start");
                return;
            }
        };
        let mut owners: Vec<String> = match self.state.store.unfinished_jobs().await {
            Ok(jobs) => jobs.into_iter().map(|j| j.user).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "could not list the unfinished jobs at start");
                return;
            }
        };
        owners.sort();
        owners.dedup();
        for user in owners {
            let kind = match users.get(&user) {
                Some(false) => continue,
                Some(true) => AccountChangeKind::Disabled,
                None => AccountChangeKind::Removed,
            };
            self.stop_jobs(&user, kind).await;
            self.sweeps.insert(user, (SWEEPS, kind));
        }
    }

    async fn apply(&mut self, c: &AccountChange) {
        let st = &self.state;
        st.basic_cache.forget_user(&c.user);
        let notice = match c.kind {
            AccountChangeKind::Enabled => {
                self.sweeps.remove(&c.user);
                return;
            }
            AccountChangeKind::Password => {
                "Your password was changed. Please sign in again.".to_string()
            }
            AccountChangeKind::Disabled | AccountChangeKind::Removed => {
                let (cancelled, stopped) = self.stop_jobs(&c.user, c.kind).await;
                self.sweeps.insert(c.user.clone(), (SWEEPS, c.kind));
                format!(
                    "{}{}",
                    account_gone(c.kind),
                    jobs_summary(cancelled, stopped)
                )
            }
        };
        let msg = json!({"type": "comfyume", "data": {"message": notice}}).to_string();
        st.hub.send_account(&c.user, &msg);
        let closed = st.hub.close_account(&c.user, CloseReason::AccountChanged);
        tracing::info!(
            user = %c.user,
            change = c.kind.as_str(),
            sockets_closed = closed,
            "account changed; its sessions end"
        );
    }

    /// Cancels the participant's waiting jobs (recording why) and stops their running and
    /// handed-over ones. Returns (cancelled, stopped).
    async fn stop_jobs(&self, user: &str, kind: AccountChangeKind) -> (usize, usize) {
        let st = &self.state;
        let cancelled = match st.queue.clear_queued(user).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!(user, error = %e, "could not cancel the waiting jobs of an account that changed");
                Vec::new()
            }
        };
        let reason = json!({
            "type": format!("account_{}", kind.as_str()),
            "message": format!("Cancelled: {}", account_gone(kind).trim_end()),
        });
        for id in &cancelled {
            let patch = JobPatch {
                error: Some(reason.clone()),
                ..Default::default()
            };
            if let Err(e) = st
                .store
                .transition(id, &[JobState::Cancelled], JobState::Cancelled, patch)
                .await
            {
                tracing::warn!(job_id = %id, user, error = %e, "could not record why a job was cancelled");
            }
        }
        let stopped = st.queue.interrupt(user, None);
        if !cancelled.is_empty() || stopped > 0 {
            tracing::info!(
                user,
                change = kind.as_str(),
                cancelled = cancelled.len(),
                stopped,
                "stopped the jobs of an account that may no longer sign in"
            );
        }
        (cancelled.len(), stopped)
    }
}

fn account_gone(kind: AccountChangeKind) -> &'static str {
    match kind {
        AccountChangeKind::Removed => "Your account was removed by the instructor. ",
        _ => "Your account was disabled by the instructor. ",
    }
}

fn jobs_summary(cancelled: usize, stopped: usize) -> String {
    let mut parts = Vec::new();
    if cancelled > 0 {
        parts.push(format!(
            "{cancelled} waiting job{} cancelled",
            if cancelled == 1 { " was" } else { "s were" }
        ));
    }
    if stopped > 0 {
        parts.push(format!(
            "{stopped} running job{} stopped",
            if stopped == 1 { " was" } else { "s were" }
        ));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{}.", parts.join(" and "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_notice_says_what_happened_to_the_jobs() {
        assert_eq!(jobs_summary(0, 0), "");
        assert_eq!(jobs_summary(1, 0), "1 waiting job was cancelled.");
        assert_eq!(
            jobs_summary(3, 1),
            "3 waiting jobs were cancelled and 1 running job was stopped."
        );
        assert!(account_gone(AccountChangeKind::Removed).contains("removed"));
    }
}
