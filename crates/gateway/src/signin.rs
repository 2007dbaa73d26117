//! Signing in with a name and a password, by the login form or by Basic Auth on a request:
//! throttled per client (see [`crate::throttle`]), checked by the store, and on success the
//! participant's workspace is made ready (folders, and the workshop's workflows the first
//! time).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use comfyume_store::{StoreError, User};

use crate::state::AppState;

#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    /// Too many failures from this client: try again after this long.
    #[error("too many failed sign-ins; try again in {0:?}")]
    Throttled(Duration),
    /// Unknown account, wrong password or disabled account: one answer for all three.
    #[error("wrong username or password")]
    Rejected,
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The password was right but the participant's folders could not be made.
    #[error("could not prepare the workspace: {0}")]
    Workspace(std::io::Error),
}

impl SignInError {
    /// Seconds for a `Retry-After` header (at least 1).
    pub fn retry_after_secs(wait: Duration) -> u64 {
        wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
    }
}

/// Checks `name`'s `password` for a request from `client`.
pub async fn sign_in(
    state: &AppState,
    client: IpAddr,
    name: &str,
    password: &str,
) -> Result<User, SignInError> {
    let attempt = state
        .throttle
        .begin(client, name, Instant::now())
        .map_err(|wait| {
            metrics::counter!(crate::telemetry::LOGIN_THROTTLED).increment(1);
            SignInError::Throttled(wait)
        })?;
    let user = match state.store.verify_password(name, password).await {
        Ok(Some(u)) => {
            state.throttle.succeeded(attempt);
            u
        }
        Ok(None) => {
            // The attempt stays counted.
            drop(attempt);
            metrics::counter!(crate::telemetry::LOGIN_FAILURES).increment(1);
            return Err(SignInError::Rejected);
        }
        Err(e) => {
            state.throttle.abandoned(attempt);
            return Err(SignInError::Store(e));
        }
    };
    if let Err(e) = crate::provision::ensure_user(state, &user.name).await {
        tracing::error!(user = %user.name, error = %e, "could not prepare the participant's folders");
        return Err(SignInError::Workspace(e));
    }
    Ok(user)
}
