//! What `/health` says, from the worker's state (pure).

use serde_json::{Value, json};

/// Where ComfyUI is, as the worker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Comfy {
    /// Not answering yet (first start, or restarting after a crash).
    Starting,
    /// Answers; node definitions and the warm-up workflow are being fetched and run.
    WarmingUp,
    /// The warm-up failed; it is retried.
    WarmupFailed(String),
    /// Answers and is warm.
    Ready,
    /// Stopped answering after it was up.
    Down(String),
}

/// The worker's state that health depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub comfy: Comfy,
    /// The job id running now.
    pub job: Option<String>,
    /// SIGTERM was received.
    pub stopping: bool,
}

/// Why a job cannot be taken now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Stopping,
    NotReady(Value),
    SameJobRunning,
    Busy(String),
}

impl State {
    pub fn new() -> Self {
        State {
            comfy: Comfy::Starting,
            job: None,
            stopping: false,
        }
    }

    /// `(HTTP status, body)` of `GET /health`. Stopping wins over everything, an
    /// unhealthy ComfyUI over a running job.
    pub fn health(&self) -> (u16, Value) {
        if self.stopping {
            return (503, json!({"status": "stopping"}));
        }
        match &self.comfy {
            Comfy::Starting => (503, json!({"status": "starting"})),
            Comfy::WarmingUp => (503, json!({"status": "warming_up"})),
            Comfy::WarmupFailed(why) => (
                503,
                json!({"status": "unhealthy", "reason": format!("warm-up failed: {why}")}),
            ),
            Comfy::Down(why) => (503, json!({"status": "unhealthy", "reason": why})),
            Comfy::Ready if self.job.is_some() => (200, json!({"status": "busy"})),
            Comfy::Ready => (200, json!({"status": "ready"})),
        }
    }

    /// Whether a new job `id` may start now.
    pub fn admit(&self, id: &str) -> Result<(), Refusal> {
        if self.stopping {
            return Err(Refusal::Stopping);
        }
        match &self.job {
            Some(running) if running == id => return Err(Refusal::SameJobRunning),
            Some(running) => return Err(Refusal::Busy(running.clone())),
            None => {}
        }
        match self.health() {
            (200, _) => Ok(()),
            (_, body) => Err(Refusal::NotReady(body)),
        }
    }
}

impl Default for State {
    fn default() -> Self {
        State::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(comfy: Comfy, job: Option<&str>, stopping: bool) -> State {
        State {
            comfy,
            job: job.map(str::to_owned),
            stopping,
        }
    }

    #[test]
    fn health_in_the_providers_terms() {
        let h = |s: State| s.health();
        assert_eq!(h(state(Comfy::Starting, None, false)).0, 503);
        assert_eq!(
            h(state(Comfy::WarmingUp, None, false)).1["status"],
            "warming_up"
        );
        assert_eq!(
            h(state(Comfy::Ready, None, false)),
            (200, json!({"status": "ready"}))
        );
        assert_eq!(
            h(state(Comfy::Ready, Some("j"), false)),
            (200, json!({"status": "busy"}))
        );
        // ComfyUI down wins over busy; stopping wins over everything.
        assert_eq!(h(state(Comfy::Down("x".into()), Some("j"), false)).0, 503);
        assert_eq!(
            h(state(Comfy::Ready, Some("j"), true)),
            (503, json!({"status": "stopping"}))
        );
        assert_eq!(
            h(state(Comfy::WarmupFailed("boom".into()), None, false)).1["reason"],
            "warm-up failed: boom"
        );
    }

    #[test]
    fn admission() {
        assert_eq!(state(Comfy::Ready, None, false).admit("a"), Ok(()));
        assert_eq!(
            state(Comfy::Ready, Some("a"), false).admit("a"),
            Err(Refusal::SameJobRunning)
        );
        assert_eq!(
            state(Comfy::Ready, Some("a"), false).admit("b"),
            Err(Refusal::Busy("a".into()))
        );
        assert_eq!(
            state(Comfy::Ready, None, true).admit("a"),
            Err(Refusal::Stopping)
        );
        assert!(matches!(
            state(Comfy::Starting, None, false).admit("a"),
            Err(Refusal::NotReady(_))
        ));
    }
}
