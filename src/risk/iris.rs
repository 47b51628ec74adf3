//! InterSystems IRIS IntegratedML as a risk backend: one `SELECT PREDICT(model) …
//! PROBABILITY(model FOR 1) …` through IRIS's SQL-over-HTTP endpoint (`POST
//! /api/atelier/v1/{namespace}/action/query`, Basic auth, rows in `result.content`), with a
//! timeout, retries with exponential backoff, and a circuit breaker. Any failure is answered
//! by the caller's fallback (the local ONNX model) with the reason recorded.
//!
//! The same request shape is served by the small `%CSP.REST` class in `docker/iris/`
//! (`endpoint = "carina"`: `POST {url}/csp/carina/predict`), for sites that do not expose the
//! Atelier API.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Value};

/// `[risk.iris]` in `carina.toml`. The password comes from `CARINA_IRIS_PASSWORD` (or the
/// file, which should then be readable by Carina only); it is never logged or serialised.
#[derive(Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct IrisSettings {
    /// Base URL, e.g. `http://iris:52773`.
    pub url: String,
    /// Namespace holding the model (`USER`).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// User name.
    pub username: String,
    /// Password (prefer `CARINA_IRIS_PASSWORD`); never serialised.
    #[serde(default, skip_serializing)]
    pub password: Option<String>,
    /// IntegratedML model name.
    #[serde(default = "default_model")]
    pub model: String,
    /// Column names of the model's features, in the ONNX model's order.
    #[serde(default = "default_columns")]
    pub columns: Vec<String>,
    /// SQL template: `{model}` and `{features}` (`? AS Age, ? AS Ldh, …`) are filled in.
    #[serde(default = "default_sql")]
    pub sql: String,
    /// `atelier` (the SQL endpoint) or `carina` (the `%CSP.REST` class of `docker/iris/`).
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    /// Per-request timeout, milliseconds.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Retries after the first attempt (transient failures only).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// First backoff, milliseconds (doubles each retry).
    #[serde(default = "default_backoff")]
    pub backoff_ms: u64,
    /// Consecutive failed calls that open the circuit.
    #[serde(default = "default_breaker")]
    pub breaker_failures: u32,
    /// How long an open circuit skips IRIS, seconds.
    #[serde(default = "default_cooldown")]
    pub breaker_cooldown_secs: u64,
}

impl std::fmt::Debug for IrisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrisSettings")
            .field("url", &self.url)
            .field("namespace", &self.namespace)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("model", &self.model)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

fn default_namespace() -> String {
    "USER".into()
}
fn default_model() -> String {
    "IcuDeathRisk".into()
}
fn default_columns() -> Vec<String> {
    ["Age", "Ldh", "LymphocytesPct", "HsCrp"]
        .map(String::from)
        .to_vec()
}
fn default_sql() -> String {
    "SELECT PREDICT({model}) AS label, PROBABILITY({model} FOR 1) AS p FROM (SELECT {features})"
        .into()
}
fn default_endpoint() -> String {
    "atelier".into()
}
fn default_timeout() -> u64 {
    2000
}
fn default_retries() -> u32 {
    2
}
fn default_backoff() -> u64 {
    200
}
fn default_breaker() -> u32 {
    3
}
fn default_cooldown() -> u64 {
    30
}

/// Why IRIS gave no prediction (the text goes into the Provenance).
#[derive(Debug, Clone, thiserror::Error)]
pub enum IrisError {
    /// Credentials refused (401/403): not retried.
    #[error("IRIS refused the credentials (HTTP {0})")]
    Auth(u16),
    /// The SQL failed inside IRIS: not retried.
    #[error("IRIS SQL error: {0}")]
    Sql(String),
    /// Timeout, connection failure or 5xx, after the retries.
    #[error("IRIS unavailable: {0}")]
    Unavailable(String),
    /// An answer of an unexpected shape.
    #[error("IRIS answered something unexpected: {0}")]
    Protocol(String),
    /// The circuit is open after repeated failures.
    #[error("IRIS skipped: circuit open after {0} consecutive failures (retrying in {1} s)")]
    CircuitOpen(u32, u64),
}

impl IrisError {
    fn transient(&self) -> bool {
        matches!(self, IrisError::Unavailable(_))
    }
}

#[derive(Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

/// The IRIS backend.
pub struct Iris {
    settings: IrisSettings,
    password: String,
    breaker: Mutex<Breaker>,
    /// The outbound client, allowed to call the configured URL only.
    outbound: Result<crate::outbound::Outbound, String>,
}

impl Iris {
    /// A client; `password` from the environment overrides the file's.
    pub fn new(settings: IrisSettings, env_password: Option<String>) -> Self {
        let password = env_password
            .or_else(|| settings.password.clone())
            .unwrap_or_default();
        let outbound = crate::outbound::Outbound::with_configured(&[settings
            .url
            .trim_end_matches('/')
            .to_string()]);
        Self {
            settings,
            password,
            breaker: Mutex::new(Breaker::default()),
            outbound,
        }
    }

    /// The SQL sent for `n` features.
    pub fn sql(&self) -> String {
        let features: Vec<String> = self
            .settings
            .columns
            .iter()
            .map(|c| format!("? AS {c}"))
            .collect();
        self.settings
            .sql
            .replace("{model}", &self.settings.model)
            .replace("{features}", &features.join(", "))
    }

    /// Where requests go (for the Provenance).
    pub fn describe(&self) -> String {
        format!(
            "InterSystems IRIS IntegratedML model {} at {} (namespace {})",
            self.settings.model, self.settings.url, self.settings.namespace
        )
    }

    /// The probability of the positive outcome for `features`, or why there is none.
    ///
    /// # Errors
    /// [`IrisError`] after the retries, or at once when the circuit is open.
    pub async fn predict(&self, features: &[f32]) -> Result<f64, IrisError> {
        if let Ok(mut b) = self.breaker.lock() {
            if let Some(until) = b.open_until {
                if Instant::now() < until {
                    let left = until.saturating_duration_since(Instant::now()).as_secs() + 1;
                    return Err(IrisError::CircuitOpen(b.failures, left));
                }
                b.open_until = None; // half-open: one call decides
            }
        }
        let mut delay = Duration::from_millis(self.settings.backoff_ms);
        let mut attempt = 0;
        let result = loop {
            let r = self.call(features).await;
            match r {
                Err(e) if e.transient() && attempt < self.settings.retries => {
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                other => break other,
            }
        };
        if let Ok(mut b) = self.breaker.lock() {
            match &result {
                Ok(_) => *b = Breaker::default(),
                Err(_) => {
                    b.failures += 1;
                    if b.failures >= self.settings.breaker_failures {
                        b.open_until = Some(
                            Instant::now()
                                + Duration::from_secs(self.settings.breaker_cooldown_secs),
                        );
                    }
                }
            }
        }
        result
    }

    async fn call(&self, features: &[f32]) -> Result<f64, IrisError> {
        let base = self.settings.url.trim_end_matches('/');
        let (path, body) = if self.settings.endpoint == "carina" {
            (
                "/csp/carina/predict".to_string(),
                json!({"model": self.settings.model, "features": features}),
            )
        } else {
            (
                format!("/api/atelier/v1/{}/action/query", self.settings.namespace),
                json!({"query": self.sql(), "parameters": features}),
            )
        };
        let timeout = Duration::from_millis(self.settings.timeout_ms);
        let (status, text) = tokio::time::timeout(timeout, self.post(base, &path, body))
            .await
            .map_err(|_| {
                IrisError::Unavailable(format!("no answer within {} ms", self.settings.timeout_ms))
            })??;
        if status == 401 || status == 403 {
            return Err(IrisError::Auth(status));
        }
        let v: Value = serde_json::from_slice(&text).map_err(|_| {
            if status >= 500 {
                IrisError::Unavailable(format!("HTTP {status}"))
            } else {
                IrisError::Protocol(format!("HTTP {status}, not JSON"))
            }
        })?;
        if let Some(errors) = v.pointer("/status/errors").and_then(Value::as_array) {
            if let Some(e) = errors.first() {
                let msg = e
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error");
                return Err(IrisError::Sql(msg.chars().take(300).collect()));
            }
        }
        if status >= 500 {
            return Err(IrisError::Unavailable(format!("HTTP {status}")));
        }
        if status >= 400 {
            return Err(IrisError::Protocol(format!("HTTP {status}")));
        }
        let row = v
            .pointer("/result/content/0")
            .ok_or_else(|| IrisError::Protocol("no row in result.content".into()))?;
        let p = row
            .get("p")
            .and_then(|p| {
                p.as_f64()
                    .or_else(|| p.as_str().and_then(|s| s.parse().ok()))
            })
            .ok_or_else(|| IrisError::Protocol("the row has no numeric column p".into()))?;
        if !(0.0..=1.0).contains(&p) {
            return Err(IrisError::Protocol(format!("probability {p} outside 0..1")));
        }
        Ok(p)
    }

    /// POSTs through the outbound client (allow-list: the configured URL; a size cap and
    /// the call's deadline).
    async fn post(&self, base: &str, path: &str, body: Value) -> Result<(u16, Bytes), IrisError> {
        let outbound = self
            .outbound
            .as_ref()
            .map_err(|e| IrisError::Protocol(e.clone()))?;
        let auth = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", self.settings.username, self.password));
        let answer = outbound
            .post(
                &format!("{base}{path}"),
                &[
                    ("content-type", "application/json"),
                    ("authorization", &format!("Basic {auth}")),
                ],
                body.to_string(),
                // the call's own timeout (in `call`) answers first, with its message
                Duration::from_millis(self.settings.timeout_ms.saturating_add(1000)),
            )
            .await
            .map_err(|e| match e {
                crate::outbound::OutboundError::Guard(g) => IrisError::Protocol(g.to_string()),
                other => IrisError::Unavailable(other.to_string()),
            })?;
        Ok((answer.status.as_u16(), answer.body))
    }
}
