//! Inference on a serving engine over the Open Inference Protocol (KServe V2: Triton, KServe,
//! MLServer), over HTTP/REST (`POST {url}/v2/models/{model}[/versions/{v}]/infer`, JSON,
//! [`rest`]) or gRPC (`inference.GRPCInferenceService/ModelInfer`, protobuf, [`grpc`]): the
//! model input as an FP32 tensor, the outputs Carina needs (probabilities or logits, and the
//! Grad-CAM feature map) asked for by name. Calls go through the one outbound client
//! (allow-list, address guard, response cap, deadline); transient failures are retried with
//! backoff, and a circuit breaker fails calls fast while the pool is down, so analyses fail
//! clearly (503 for requests, a retried job for queued work) instead of piling up.

mod grpc;
mod rest;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::engine::{BatchStats, EngineError, FloatTensor, Outputs};
use super::manifest::{BackendProtocol, BackendSettings};
use crate::outbound::{Outbound, OutboundSettings};

/// An output tensor as a protocol decoded it, before the checks.
pub(super) struct Tensor {
    name: String,
    datatype: String,
    shape: Vec<usize>,
    data: Vec<f32>,
}

/// Where and how calls go.
enum Protocol {
    /// The REST endpoint's full URL.
    Rest { url: String },
    /// The gRPC method's full URL, and the model as the request names it.
    Grpc {
        url: String,
        model: String,
        version: String,
    },
}

/// A KServe V2 model endpoint.
pub struct RemoteEngine {
    outbound: Outbound,
    protocol: Protocol,
    shown: String,
    input_name: String,
    outputs: Vec<String>,
    token: Option<String>,
    timeout: Duration,
    retries: u32,
    breaker: Breaker,
    calls: AtomicU64,
}

impl fmt::Debug for RemoteEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteEngine")
            .field("endpoint", &self.shown)
            .finish_non_exhaustive()
    }
}

/// Consecutive failures open the breaker for a while; then one trial call decides.
#[derive(Debug)]
struct Breaker {
    threshold: u32,
    open_for: Duration,
    state: Mutex<BreakerState>,
}

#[derive(Debug, Default)]
struct BreakerState {
    failures: u32,
    open_until: Option<Instant>,
}

impl Breaker {
    /// `Err(seconds left)` while open; a call past the open period is the trial.
    fn admit(&self) -> Result<(), u64> {
        let Ok(mut s) = self.state.lock() else {
            return Ok(());
        };
        match s.open_until {
            Some(t) if t > Instant::now() => Err((t - Instant::now()).as_secs() + 1),
            Some(_) => {
                // half-open: this call is the trial; others wait for its outcome by failing fast
                s.open_until = Some(Instant::now() + self.open_for);
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn record(&self, ok: bool) {
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        if ok {
            *s = BreakerState::default();
            return;
        }
        s.failures += 1;
        if s.failures >= self.threshold {
            s.open_until = Some(Instant::now() + self.open_for);
        }
    }
}

/// What one attempt gave.
enum Attempt {
    Done(Outputs),
    /// Worth another try (connection, deadline, 429/502/503/504).
    Transient(String),
    /// Not worth another try (4xx, a malformed answer).
    Fatal(String),
}

impl RemoteEngine {
    /// The endpoint for `settings` (a `kserve-v2` backend; `name` is the manifest's model name),
    /// asking for `outputs` on every call. The URL is allowed on the outbound client as part
    /// of Carina's own configuration.
    ///
    /// # Errors
    /// A message when the outbound client cannot be built for the URL.
    pub fn new(
        settings: &BackendSettings,
        outbound: &OutboundSettings,
        name: &str,
        input_name: &str,
        outputs: Vec<String>,
    ) -> Result<Self, String> {
        let base = settings
            .url
            .as_deref()
            .ok_or("[backend] needs `url`")?
            .trim_end_matches('/');
        let model = settings.model.as_deref().unwrap_or(name);
        let (client, protocol) = match settings.protocol {
            BackendProtocol::Rest => {
                let path = match &settings.version {
                    Some(v) => format!("/v2/models/{model}/versions/{v}/infer"),
                    None => format!("/v2/models/{model}/infer"),
                };
                let url = format!("{base}{path}");
                (
                    Outbound::new(outbound, &[base.to_string()])?,
                    Protocol::Rest { url },
                )
            }
            BackendProtocol::Grpc => (
                Outbound::new_http2(outbound, &[base.to_string()])?,
                Protocol::Grpc {
                    url: format!("{base}{}", grpc::MODEL_INFER),
                    model: model.to_string(),
                    version: settings.version.clone().unwrap_or_default(),
                },
            ),
        };
        let how = match settings.protocol {
            BackendProtocol::Rest => "REST",
            BackendProtocol::Grpc => "gRPC",
        };
        let token = match &settings.token_env {
            Some(var) => Some(
                std::env::var(var)
                    .map_err(|_| format!("[backend] token_env: ${var} is not set"))?,
            ),
            None => None,
        };
        Ok(Self {
            outbound: client,
            protocol,
            shown: format!("kserve-v2 model '{model}' at {base} ({how})"),
            input_name: input_name.to_string(),
            outputs,
            token,
            timeout: Duration::from_millis(settings.timeout_ms.unwrap_or(30_000).max(1)),
            retries: settings.retries.unwrap_or(2),
            breaker: Breaker {
                threshold: settings.breaker_failures.unwrap_or(5).max(1),
                open_for: Duration::from_secs(settings.breaker_open_secs.unwrap_or(30)),
                state: Mutex::new(BreakerState::default()),
            },
            calls: AtomicU64::new(0),
        })
    }

    /// Where it sends requests, for logs and `/v1/models`.
    pub fn endpoint(&self) -> &str {
        &self.shown
    }

    /// Calls answered so far (each one sample).
    pub fn stats(&self) -> BatchStats {
        let n = self.calls.load(Ordering::Relaxed);
        BatchStats {
            batches: n,
            samples: n,
        }
    }

    /// Runs one sample on the serving engine.
    ///
    /// # Errors
    /// [`EngineError::Unavailable`] when the engine cannot be reached after the retries or the
    /// breaker is open; [`EngineError::Run`] when it refuses the request or answers nonsense.
    pub async fn run(&self, input: FloatTensor) -> Result<Outputs, EngineError> {
        if let Err(secs) = self.breaker.admit() {
            return Err(EngineError::Unavailable(format!(
                "{}: failing fast for {secs} s more after repeated failures",
                self.shown
            )));
        }
        let body = match &self.protocol {
            Protocol::Rest { .. } => rest::encode(&self.input_name, &input, &self.outputs)
                .map_err(|e| EngineError::Run(format!("{}: {e}", self.shown)))?,
            Protocol::Grpc { model, version, .. } => {
                grpc::encode(model, version, &self.input_name, &input, &self.outputs)
            }
        };
        let body = bytes::Bytes::from(body);
        let mut delay = Duration::from_millis(100);
        let mut attempt = 0;
        loop {
            match self.attempt(body.clone()).await {
                Attempt::Done(out) => {
                    self.breaker.record(true);
                    self.calls.fetch_add(1, Ordering::Relaxed);
                    return Ok(out);
                }
                Attempt::Fatal(why) => {
                    self.breaker.record(true); // it answered: the pool is up
                    return Err(EngineError::Run(format!("{}: {why}", self.shown)));
                }
                Attempt::Transient(why) if attempt >= self.retries => {
                    self.breaker.record(false);
                    return Err(EngineError::Unavailable(format!(
                        "{}: {why} (after {} attempts)",
                        self.shown,
                        attempt + 1
                    )));
                }
                Attempt::Transient(why) => {
                    tracing::warn!(endpoint = %self.shown, attempt, "inference call failed, retrying: {why}");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
            }
        }
    }

    async fn attempt(&self, body: bytes::Bytes) -> Attempt {
        let bearer = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers = Vec::new();
        if let Some(b) = &bearer {
            headers.push(("authorization", b.as_str()));
        }
        let decoded = match &self.protocol {
            Protocol::Rest { url } => {
                headers.push(("content-type", "application/json"));
                let answer = match self.outbound.post(url, &headers, body, self.timeout).await {
                    Ok(a) => a,
                    Err(e) => return failed(&e),
                };
                let status = answer.status.as_u16();
                if !answer.status.is_success() {
                    let why = format!("HTTP {status}");
                    return if matches!(status, 429 | 502 | 503 | 504) {
                        Attempt::Transient(why)
                    } else {
                        Attempt::Fatal(why)
                    };
                }
                rest::decode(&answer.body)
            }
            Protocol::Grpc { url, .. } => {
                let answer = match self
                    .outbound
                    .grpc_unary(url, &headers, &body, self.timeout)
                    .await
                {
                    Ok(a) => a,
                    Err(e) => return failed(&e),
                };
                match (answer.status, answer.message) {
                    (0, Some(m)) => grpc::decode(&m),
                    (0, None) => Err("gRPC status OK without a message".into()),
                    // DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNAVAILABLE
                    (s @ (4 | 8 | 14), _) => return Attempt::Transient(format!("gRPC status {s}")),
                    (s, _) => return Attempt::Fatal(format!("gRPC status {s}")),
                }
            }
        };
        match decoded.and_then(|tensors| self.check(tensors)) {
            Ok(out) => Attempt::Done(out),
            Err(why) => Attempt::Fatal(why),
        }
    }

    /// The outputs asked for, checked for datatype and shape.
    fn check(&self, tensors: Vec<Tensor>) -> Result<Outputs, String> {
        let mut out = Outputs::new();
        for t in tensors {
            if !self.outputs.contains(&t.name) {
                continue;
            }
            if !matches!(t.datatype.as_str(), "FP32" | "FP64" | "FP16") {
                return Err(format!(
                    "output '{}' is {}, not a float",
                    t.name, t.datatype
                ));
            }
            // a server's shape may be anything: an overflowing product is a mismatch, not a panic
            let n = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            if n != Some(t.data.len()) {
                return Err(format!(
                    "output '{}' has shape {:?} but {} values",
                    t.name,
                    t.shape,
                    t.data.len()
                ));
            }
            out.insert(
                t.name,
                FloatTensor {
                    shape: t.shape,
                    data: t.data,
                },
            );
        }
        if let Some(missing) = self.outputs.iter().find(|n| !out.contains_key(*n)) {
            return Err(format!("the answer lacks output '{missing}'"));
        }
        Ok(out)
    }
}

/// An outbound failure as an attempt's outcome.
fn failed(e: &crate::outbound::OutboundError) -> Attempt {
    if e.transient() {
        Attempt::Transient(e.to_string())
    } else {
        Attempt::Fatal(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_repeated_failures_and_a_success_closes_it() {
        let b = Breaker {
            threshold: 2,
            open_for: Duration::from_secs(60),
            state: Mutex::new(BreakerState::default()),
        };
        assert!(b.admit().is_ok());
        b.record(false);
        assert!(b.admit().is_ok(), "one failure is not enough");
        b.record(false);
        assert!(b.admit().is_err(), "two in a row open it");
        b.state.lock().unwrap().open_until = Some(Instant::now());
        assert!(
            b.admit().is_ok(),
            "after the open period one trial goes through"
        );
        assert!(b.admit().is_err(), "others fail fast while the trial runs");
        b.record(true);
        assert!(b.admit().is_ok(), "a success closes it");
    }
}
