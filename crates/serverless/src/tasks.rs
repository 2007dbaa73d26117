//! Background work: the management API poll (deployment status, replicas, billing),
//! the daily warm-up at `WARMUP_AT`, and warm-ups asked for by the instructor.

use std::sync::Arc;
use std::time::Duration;

use chrono::{Local, NaiveTime, TimeZone};
use comfyume_dispatch::supervise;
use serde_json::Value;
use tokio::time::Instant;

use crate::endpoint::{ColdStart, Endpoint, now_ms};
use crate::manage::{replica_running, replica_starting};
use crate::{META_USAGE, ReplicaSeen, ServerlessBackend, lock, policy};

/// A warm-up waits through a cold start: this long at most.
const WARMUP_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// One poll of one deployment (three calls) at most this long.
const POLL_TIMEOUT: Duration = Duration::from_secs(30);
/// Replica records older than this are dropped from the cost table.
const REPLICA_KEEP_SECS: i64 = 30 * 24 * 3600;

pub(crate) fn start(b: &Arc<ServerlessBackend>) {
    if b.manage.is_some() {
        let me = b.clone();
        supervise("serverless management poll", move || {
            let me = me.clone();
            async move { poll_loop(me).await }
        });
    }
    if let Some((h, m)) = b.cfg.warmup_at {
        let me = b.clone();
        supervise("serverless daily warm-up", move || {
            let me = me.clone();
            async move { warmup_loop(me, h, m).await }
        });
    }
}

async fn poll_loop(b: Arc<ServerlessBackend>) {
    loop {
        poll_once(&b).await;
        for ep in &b.endpoints {
            ep.publish_state();
        }
        tokio::time::sleep(b.cfg.poll_every).await;
    }
}

/// Asks the management API about every endpoint that has a deployment name.
pub(crate) async fn poll_once(b: &Arc<ServerlessBackend>) {
    let Some(api) = &b.manage else {
        return;
    };
    let mut usage_changed = false;
    for ep in &b.endpoints {
        let Some(dep) = ep.cfg.deployment.clone() else {
            continue;
        };
        let view = match tokio::time::timeout(POLL_TIMEOUT, api.deployment(&dep)).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::warn!(endpoint = %ep.name(), error = %e, "could not read the deployment's state");
                continue;
            }
            Err(_) => {
                tracing::warn!(endpoint = %ep.name(), "the management API did not answer in time");
                continue;
            }
        };
        let now = now_ms() / 1000;
        let announce = {
            let mut s = ep.st();
            // No capacity: passed over until the provider says otherwise.
            if policy::no_capacity(&view.status) {
                if s.passed_over.is_none() {
                    tracing::warn!(endpoint = %ep.name(), status = %view.status,
                        "serverless endpoint passed over: its deployment reports no capacity");
                }
                s.passed_over = Some((format!("deployment status {}", view.status), now_ms()));
                s.retry_after = None;
            } else if s
                .passed_over
                .as_ref()
                .is_some_and(|(why, _)| why.starts_with("deployment status"))
            {
                tracing::info!(endpoint = %ep.name(), status = %view.status, "serverless endpoint has capacity again");
                s.passed_over = None;
            }
            let running = view
                .replicas
                .iter()
                .filter(|r| replica_running(&r.status))
                .count();
            let starting = view
                .replicas
                .iter()
                .filter(|r| replica_starting(&r.status))
                .count();
            s.deployment_status = Some(view.status.clone());
            s.replicas = Some(view.replicas.clone());
            s.ttl_secs = view.ttl_secs;
            s.polled_at_ms = Some(now_ms());
            // Jobs of ours wait and nothing serves yet: a cold start, seen from here.
            let waiting = s.in_flight > s.accepted;
            if waiting
                && s.cold.is_none()
                && s.accepted == 0
                && running == 0
                && (starting > 0
                    || policy::status_is_starting(&view.status)
                    || view.replicas.is_empty())
            {
                // From the longest-waiting request: that is when the GPU was first wanted.
                let began = s.waiting_since().unwrap_or_else(Instant::now);
                s.cold = Some(ColdStart {
                    began,
                    began_ms: now_ms() - began.elapsed().as_millis() as i64,
                });
                let est = policy::cold_start_estimate(
                    &s.cold_starts,
                    b.cfg.cold_start_estimate.as_secs(),
                );
                Some((
                    s.waiting_users(),
                    policy::cold_start_text(est, began.elapsed().as_secs()),
                ))
            } else {
                None
            }
        };
        if let Some((users, text)) = announce {
            tracing::info!(endpoint = %ep.name(), "cold start (management API: no replica serving)");
            b.host.announce(&users, &text);
        }
        // Billing: every listed replica counts from its start to now.
        let mut u = lock(&b.usage);
        let table = u.replicas.entry(ep.name().to_owned()).or_default();
        for r in &view.replicas {
            if matches!(r.status.as_str(), "terminated" | "deleted") {
                continue;
            }
            let e = table.entry(r.id.clone()).or_insert(ReplicaSeen {
                started: r.started_at.unwrap_or(now),
                last_seen: now,
            });
            e.last_seen = now;
            usage_changed = true;
        }
        table.retain(|_, r| now - r.last_seen < REPLICA_KEEP_SECS);
    }
    if usage_changed {
        let snapshot = lock(&b.usage).clone();
        b.save_meta(META_USAGE, &snapshot).await;
    }
}

async fn warmup_loop(b: Arc<ServerlessBackend>, h: u8, m: u8) {
    loop {
        let wait = until_next(h, m);
        tracing::info!(at = %format!("{h:02}:{m:02}"), in_secs = wait.as_secs(), "next serverless warm-up");
        tokio::time::sleep(wait).await;
        let active = b.routing().active;
        if let Some(ep) = b.endpoint(&active).cloned() {
            tracing::info!(endpoint = %active, "WARMUP_AT: warming the active endpoint");
            warmup(&b, &ep).await;
        }
        // Past the minute, so the same time is not hit twice.
        tokio::time::sleep(Duration::from_secs(61)).await;
    }
}

/// Time until the next `h:m` local time.
fn until_next(h: u8, m: u8) -> Duration {
    let now = Local::now();
    let Some(t) = NaiveTime::from_hms_opt(h.into(), m.into(), 0) else {
        return Duration::from_secs(24 * 3600);
    };
    let mut day = now.date_naive();
    for _ in 0..3 {
        if let Some(at) = Local.from_local_datetime(&day.and_time(t)).earliest()
            && at > now
        {
            return (at - now).to_std().unwrap_or(Duration::from_secs(60));
        }
        day = day.succ_opt().unwrap_or(day);
    }
    Duration::from_secs(24 * 3600)
}

pub(crate) fn spawn_warmup(b: Arc<ServerlessBackend>, ep: Arc<Endpoint>) {
    tokio::spawn(async move {
        let task = tokio::spawn({
            let (b, ep) = (b.clone(), ep.clone());
            async move { warmup(&b, &ep).await }
        });
        if let Err(e) = task.await {
            tracing::error!(endpoint = %ep.name(), error = %e, "warm-up task crashed");
            ep.st().warming = false;
        }
    });
}

/// `GET <base>/object_info` through the provider (a queued request that starts a
/// replica if none runs): the GPU is warm afterwards, and its node definitions known.
async fn warmup(b: &Arc<ServerlessBackend>, ep: &Arc<Endpoint>) {
    {
        let mut s = ep.st();
        if s.warming {
            return;
        }
        s.warming = true;
    }
    let sent = Instant::now();
    let url = format!("{}/object_info", ep.cfg.url);
    let req = b
        .authorize(b.http.get(url))
        .header("x-inference-id", format!("warmup-{}", now_ms()))
        .timeout(WARMUP_TIMEOUT);
    tracing::info!(endpoint = %ep.name(), "warming up");
    let res: Result<Value, String> = async {
        let r = req.send().await.map_err(|e| e.without_url().to_string())?;
        if !r.status().is_success() {
            return Err(format!("HTTP {}", r.status().as_u16()));
        }
        r.json::<Value>()
            .await
            .map_err(|e| e.without_url().to_string())
    }
    .await;
    let secs = sent.elapsed().as_secs();
    match res {
        Ok(info) if info.as_object().is_some_and(|m| !m.is_empty()) => {
            tracing::info!(endpoint = %ep.name(), secs, nodes = info.as_object().map(|m| m.len()).unwrap_or(0), "warm-up done");
            {
                let mut s = ep.st();
                // Longer than a few seconds: it included a cold start, worth learning.
                if secs >= b.cfg.cold_start_after.as_secs() {
                    policy::push_sample(&mut s.cold_starts, secs);
                }
                s.cold = None;
                s.last_served_ms = now_ms();
                s.warmed_at_ms = Some(now_ms());
            }
            b.save_cold_starts().await;
            *lock(&b.object_info) = Some(info.clone());
            b.host.node_definitions(info).await;
        }
        Ok(_) => {
            tracing::warn!(endpoint = %ep.name(), "warm-up answered without node definitions");
            ep.record_error("warm-up answered without node definitions");
        }
        Err(e) => {
            tracing::warn!(endpoint = %ep.name(), error = %e, "warm-up failed");
            ep.record_error(&format!("warm-up failed: {e}"));
        }
    }
    ep.st().warming = false;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_warmup_is_within_a_day() {
        let d = until_next(7, 30);
        assert!(d <= Duration::from_secs(24 * 3600 + 3600), "{d:?}");
        assert!(d > Duration::ZERO);
    }
}
