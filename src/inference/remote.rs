//! Inference on a serving engine over the Open Inference Protocol (KServe V2 REST: Triton,
//! KServe, MLServer): `POST {url}/v2/models/{model}[/versions/{v}]/infer` with the model input
//! as an FP32 tensor and the outputs Carina needs (probabilities or logits, and the Grad-CAM
//! feature map) asked for by name. Calls go through the one outbound client (allow-list,
//! address guard, response cap, deadline); transient failures are retried with backoff, and a
//! circuit breaker fails calls fast while the pool is down, so analyses fail clearly (503 for
//! requests, a retried job for queued work) instead of piling up.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::engine::{BatchStats, EngineError, FloatTensor, Outputs};
use super::manifest::BackendSettings;
use crate::outbound::{Outbound, OutboundSettings};

/// A KServe V2 model endpoint.
pub struct RemoteEngine {
    outbound: Outbound,
    infer_url: String,
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

#[derive(Serialize)]
struct InferRequest<'a> {
    inputs: [RequestInput<'a>; 1],
    outputs: Vec<RequestOutput<'a>>,
}

#[derive(Serialize)]
struct RequestInput<'a> {
    name: &'a str,
    shape: &'a [usize],
    datatype: &'static str,
    data: &'a [f32],
}

#[derive(Serialize)]
struct RequestOutput<'a> {
    name: &'a str,
}

#[derive(Deserialize)]
struct InferResponse {
    outputs: Vec<ResponseOutput>,
}

#[derive(Deserialize)]
struct ResponseOutput {
    name: String,
    shape: Vec<usize>,
    datatype: String,
    data: Flat,
}

/// Tensor data as the protocol allows it in JSON: row-major, flat or nested.
struct Flat(Vec<f32>);

impl<'de> Deserialize<'de> for Flat {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut out = Vec::new();
        d.deserialize_seq(Sink(&mut out))?;
        Ok(Flat(out))
    }
}

/// Appends every number of a (nested) array, without buffering the elements.
struct Sink<'v>(&'v mut Vec<f32>);

impl<'de> DeserializeSeed<'de> for Sink<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Sink<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of numbers, flat or nested")
    }
    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.0.push(v as f32);
        Ok(())
    }
    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.0.push(v as f32);
        Ok(())
    }
    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.0.push(v as f32);
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Sink(self.0))?.is_some() {}
        Ok(())
    }
    /// serde_json with `arbitrary_precision` (a dependency turns it on) hands numbers to
    /// `deserialize_any` as a one-entry map holding the number's text.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((_, text)) = map.next_entry::<serde::de::IgnoredAny, String>()? else {
            return Err(serde::de::Error::custom("an empty object is not a number"));
        };
        let v: f64 = text
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("'{text}' is not a number")))?;
        self.0.push(v as f32);
        Ok(())
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
        let client = Outbound::new(outbound, &[base.to_string()])?;
        let model = settings.model.as_deref().unwrap_or(name);
        let path = match &settings.version {
            Some(v) => format!("/v2/models/{model}/versions/{v}/infer"),
            None => format!("/v2/models/{model}/infer"),
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
            infer_url: format!("{base}{path}"),
            shown: format!("kserve-v2 model '{model}' at {base}"),
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
        let body = serde_json::to_vec(&InferRequest {
            inputs: [RequestInput {
                name: &self.input_name,
                shape: &input.shape,
                datatype: "FP32",
                data: &input.data,
            }],
            outputs: self
                .outputs
                .iter()
                .map(|name| RequestOutput { name })
                .collect(),
        })
        .map_err(|e| EngineError::Run(e.to_string()))?;
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
        let mut headers = vec![("content-type", "application/json")];
        if let Some(b) = &bearer {
            headers.push(("authorization", b.as_str()));
        }
        let answer = match self
            .outbound
            .post(&self.infer_url, &headers, body, self.timeout)
            .await
        {
            Ok(a) => a,
            Err(e) if e.transient() => return Attempt::Transient(e.to_string()),
            Err(e) => return Attempt::Fatal(e.to_string()),
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
        match self.decode(&answer.body) {
            Ok(out) => Attempt::Done(out),
            Err(why) => Attempt::Fatal(why),
        }
    }

    /// The outputs asked for, checked for datatype and shape.
    fn decode(&self, body: &[u8]) -> Result<Outputs, String> {
        let res: InferResponse =
            serde_json::from_slice(body).map_err(|e| format!("not a V2 inference answer: {e}"))?;
        let mut out = Outputs::new();
        for o in res.outputs {
            if !self.outputs.contains(&o.name) {
                continue;
            }
            if !matches!(o.datatype.as_str(), "FP32" | "FP64" | "FP16") {
                return Err(format!(
                    "output '{}' is {}, not a float",
                    o.name, o.datatype
                ));
            }
            let n: usize = o.shape.iter().product();
            if n != o.data.0.len() {
                return Err(format!(
                    "output '{}' has shape {:?} but {} values",
                    o.name,
                    o.shape,
                    o.data.0.len()
                ));
            }
            out.insert(
                o.name,
                FloatTensor {
                    shape: o.shape,
                    data: o.data.0,
                },
            );
        }
        if let Some(missing) = self.outputs.iter().find(|n| !out.contains_key(*n)) {
            return Err(format!("the answer lacks output '{missing}'"));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_data_may_be_flat_or_nested() {
        let flat: Flat = serde_json::from_str("[1, 2.5, -3]").unwrap();
        assert_eq!(flat.0, vec![1.0, 2.5, -3.0]);
        let nested: Flat = serde_json::from_str("[[1, 2], [3, [4, 5]]]").unwrap();
        assert_eq!(nested.0, vec![1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!(serde_json::from_str::<Flat>("[1, \"x\"]").is_err());
    }

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
