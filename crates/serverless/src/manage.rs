//! The provider's management API (OAuth2 client credentials): a deployment's status,
//! its replicas and its request TTL. Never the public inference endpoint: a probe
//! there is queued as work and can start a replica.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::ManagementConfig;

/// Every call is bounded by this.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, thiserror::Error)]
pub enum ManageError {
    #[error("management API: {0}")]
    Http(String),
    #[error("management API answered HTTP {status} for {what}")]
    Status { what: String, status: u16 },
    #[error("management API answered something unexpected for {0}")]
    Shape(String),
}

/// A replica as the provider lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaInfo {
    pub id: String,
    pub status: String,
    /// Unix seconds, when the provider says.
    pub started_at: Option<i64>,
}

/// What one poll learnt about a deployment.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentView {
    pub status: String,
    pub replicas: Vec<ReplicaInfo>,
    /// `queue_message_ttl_seconds`, when the scaling options could be read.
    pub ttl_secs: Option<u64>,
}

struct Token {
    access: String,
    until: Instant,
}

pub struct ManagementApi {
    cfg: ManagementConfig,
    http: reqwest::Client,
    token: Mutex<Option<Token>>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl ManagementApi {
    pub fn new(cfg: ManagementConfig, http: reqwest::Client) -> Self {
        ManagementApi {
            cfg,
            http,
            token: Mutex::new(None),
        }
    }

    pub fn api_url(&self) -> &str {
        &self.cfg.api_url
    }

    async fn token(&self, renew: bool) -> Result<String, ManageError> {
        let mut t = self.token.lock().await;
        if !renew
            && let Some(tok) = t.as_ref()
            && tok.until > Instant::now()
        {
            return Ok(tok.access.clone());
        }
        let url = format!("{}/oauth2/token", self.cfg.api_url);
        let body = serde_json::json!({
            "grant_type": "client_credentials",
            "client_id": self.cfg.client_id,
            "client_secret": self.cfg.client_secret.expose(),
        });
        let resp = self
            .http
            .post(url)
            .json(&body)
            .timeout(CALL_TIMEOUT)
            .send()
            .await
            .map_err(|e| ManageError::Http(e.without_url().to_string()))?;
        if !resp.status().is_success() {
            return Err(ManageError::Status {
                what: "the token".into(),
                status: resp.status().as_u16(),
            });
        }
        let a: TokenAnswer = resp
            .json()
            .await
            .map_err(|_| ManageError::Shape("the token".into()))?;
        // Renewed a minute early so no call goes out with an expiring token.
        let life = a.expires_in.unwrap_or(3600).saturating_sub(60).max(10);
        *t = Some(Token {
            access: a.access_token.clone(),
            until: Instant::now() + Duration::from_secs(life),
        });
        Ok(a.access_token)
    }

    /// GET `<api>/<path>`, re-authenticating once on 400/401 (as the provider's SDK does).
    async fn get(&self, path: &str) -> Result<Value, ManageError> {
        let url = format!("{}/{path}", self.cfg.api_url);
        for renew in [false, true] {
            let token = self.token(renew).await?;
            let resp = self
                .http
                .get(&url)
                .bearer_auth(token)
                .timeout(CALL_TIMEOUT)
                .send()
                .await
                .map_err(|e| ManageError::Http(e.without_url().to_string()))?;
            let status = resp.status().as_u16();
            if (status == 401 || status == 400) && !renew {
                continue;
            }
            if !resp.status().is_success() {
                return Err(ManageError::Status {
                    what: path.to_owned(),
                    status,
                });
            }
            return resp
                .json()
                .await
                .map_err(|_| ManageError::Shape(path.to_owned()));
        }
        Err(ManageError::Status {
            what: path.to_owned(),
            status: 401,
        })
    }

    /// The deployment's status, replicas and TTL.
    pub async fn deployment(&self, name: &str) -> Result<DeploymentView, ManageError> {
        let status = self
            .get(&format!("container-deployments/{name}/status"))
            .await?;
        let replicas = self
            .get(&format!("container-deployments/{name}/replicas"))
            .await?;
        // Optional: older API versions or narrower tokens may not allow it.
        let ttl_secs = match self
            .get(&format!("container-deployments/{name}/scaling"))
            .await
        {
            Ok(v) => v.get("queue_message_ttl_seconds").and_then(Value::as_u64),
            Err(_) => None,
        };
        parse_view(&status, &replicas, ttl_secs)
            .ok_or_else(|| ManageError::Shape(format!("deployment {name}")))
    }
}

/// The status and replica documents as the provider sends them.
pub fn parse_view(
    status: &Value,
    replicas: &Value,
    ttl_secs: Option<u64>,
) -> Option<DeploymentView> {
    let status = status.get("status")?.as_str()?.to_owned();
    let list = replicas
        .get("list")
        .or(Some(replicas))
        .and_then(Value::as_array)?;
    let replicas = list
        .iter()
        .filter_map(|r| {
            Some(ReplicaInfo {
                id: match r.get("id")? {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                },
                status: r
                    .get("status")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown")
                    .to_owned(),
                started_at: r
                    .get("started_at")
                    .and_then(Value::as_str)
                    .and_then(parse_rfc3339),
            })
        })
        .collect();
    Some(DeploymentView {
        status,
        replicas,
        ttl_secs,
    })
}

fn parse_rfc3339(s: &str) -> Option<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

/// Whether a replica status counts as running (billed and able to serve). Replica
/// status values are not documented; anything not clearly gone or starting is.
pub fn replica_running(status: &str) -> bool {
    !matches!(
        status,
        "provisioning" | "starting" | "pending" | "terminated" | "deleted" | "failed"
    )
}

/// Whether a replica status counts as being started.
pub fn replica_starting(status: &str) -> bool {
    matches!(status, "provisioning" | "starting" | "pending")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn views_parse_from_the_documented_shapes() {
        let v = parse_view(
            &json!({"status": "healthy"}),
            &json!({"list": [
                {"id": "r1", "status": "running", "started_at": "2026-05-01T10:00:00Z"},
                {"id": 7, "status": "provisioning"}
            ]}),
            Some(900),
        )
        .unwrap();
        assert_eq!(v.status, "healthy");
        assert_eq!(v.replicas[0].started_at, Some(1_777_629_600));
        assert_eq!(v.replicas[1].id, "7");
        assert_eq!(v.replicas[1].started_at, None);
        assert!(replica_running("running") && !replica_running("provisioning"));
        assert!(replica_starting("provisioning"));
        assert!(parse_view(&json!({}), &json!({"list": []}), None).is_none());
        assert!(parse_view(&json!({"status": "x"}), &json!({"list": 3}), None).is_none());
    }
}
