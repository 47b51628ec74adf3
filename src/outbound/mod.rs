//! Every outbound HTTP call goes through [`Outbound`]: one pooled client (reqwest with rustls,
//! the system's root certificates plus an optional CA bundle), an allow-list of destinations
//! (`[[outbound.allow]]` plus the destinations Carina's own configuration names), an address
//! guard applied to the resolved addresses (so DNS rebinding does not help), no redirects, a
//! size cap on every response and a deadline on the whole exchange. Errors name the status
//! only, never the peer's answer.

pub mod export;
pub mod guard;
pub mod wado;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use guard::{AllowEntry, AllowList, Allowed, GuardError};

/// `[outbound]` settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundSettings {
    /// Destinations an ImagingStudy Endpoint (or any other URL that arrives with data) may
    /// name. Destinations in Carina's own configuration (IRIS, STOW-RS export, the token
    /// issuer) are allowed without an entry.
    pub allow: Vec<AllowEntry>,
    /// Extra CA certificates (PEM) trusted for `https://`, besides the system's roots.
    pub ca_bundle: Option<PathBuf>,
    /// Largest response body accepted, in MiB.
    pub max_response_mb: usize,
    /// Seconds to connect.
    pub connect_timeout_secs: u64,
}

impl Default for OutboundSettings {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            ca_bundle: None,
            max_response_mb: 512,
            connect_timeout_secs: 10,
        }
    }
}

/// Why an outbound call failed. The text never carries the peer's answer.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    /// Refused before any connection: not allowed, bad URL, non-public address.
    #[error(transparent)]
    Guard(#[from] GuardError),
    /// No answer within the deadline.
    #[error("{0}: no complete answer within {1} ms")]
    Timeout(String, u128),
    /// The answer is larger than the cap.
    #[error("{0}: the answer is larger than {1} MiB")]
    TooLarge(String, usize),
    /// Connection or protocol failure.
    #[error("{0}: {1}")]
    Transport(String, String),
}

impl OutboundError {
    /// Whether trying again later may succeed (timeouts, refused connections).
    pub fn transient(&self) -> bool {
        matches!(self, Self::Timeout(..) | Self::Transport(..))
    }
}

/// An answer: status, headers, the whole body.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: reqwest::StatusCode,
    /// Response headers.
    pub headers: reqwest::header::HeaderMap,
    /// The body (at most the cap).
    pub body: Bytes,
}

impl Answer {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The one outbound HTTP client.
#[derive(Clone)]
pub struct Outbound {
    client: reqwest::Client,
    allow: Arc<std::sync::RwLock<AllowList>>,
    max_body: usize,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound").finish_non_exhaustive()
    }
}

/// Resolves names for the client and keeps only the addresses the guard permits.
struct GuardedResolver {
    allow: Arc<std::sync::RwLock<AllowList>>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let private_ok = allow.read().map(|a| a.private_ok(&host)).unwrap_or(false);
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addrs.is_empty() {
                return Err(Box::new(GuardError::Unresolved(host)) as _);
            }
            let kept: Vec<SocketAddr> = addrs
                .iter()
                .copied()
                .filter(|a| private_ok || guard::is_public(a.ip()))
                .collect();
            if kept.is_empty() {
                return Err(Box::new(GuardError::PrivateAddress(host, addrs[0].ip())) as _);
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl Outbound {
    /// The client for `settings`, with the configured destinations `configured` (base URLs
    /// from Carina's own settings) allowed too.
    ///
    /// # Errors
    /// A message when an entry, a configured URL or the CA bundle is unusable.
    pub fn new(settings: &OutboundSettings, configured: &[String]) -> Result<Self, String> {
        Self::build(settings, configured, false)
    }

    /// [`Self::new`] speaking HTTP/2 only, also over plain `http://` (h2c, prior knowledge):
    /// the client for gRPC calls ([`Self::grpc_unary`]).
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn new_http2(settings: &OutboundSettings, configured: &[String]) -> Result<Self, String> {
        Self::build(settings, configured, true)
    }

    fn build(
        settings: &OutboundSettings,
        configured: &[String],
        http2: bool,
    ) -> Result<Self, String> {
        let mut list = AllowList::default();
        for e in &settings.allow {
            list.push(Allowed::parse(e).map_err(|e| format!("[[outbound.allow]]: {e}"))?);
        }
        for u in configured {
            list.push(Allowed::configured(u).map_err(|e| e.to_string())?);
        }
        let allow = Arc::new(std::sync::RwLock::new(list));
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(settings.connect_timeout_secs.max(1)))
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("carina/", env!("CARGO_PKG_VERSION")))
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver {
                allow: allow.clone(),
            }));
        if let Some(path) = &settings.ca_bundle {
            let pem = std::fs::read(path)
                .map_err(|e| format!("outbound.ca_bundle {}: {e}", path.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("outbound.ca_bundle {}: {e}", path.display()))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        if http2 {
            builder = builder.http2_prior_knowledge();
        }
        let client = builder.build().map_err(|e| e.to_string())?;
        Ok(Self {
            client,
            allow,
            max_body: settings.max_response_mb.saturating_mul(1024 * 1024),
        })
    }

    /// A client that allows only the `configured` base URLs (tests, offline commands).
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn with_configured(configured: &[String]) -> Result<Self, String> {
        Self::new(&OutboundSettings::default(), configured)
    }

    /// Allows another configured destination (e.g. a JWKS URI found by discovery).
    ///
    /// # Errors
    /// [`GuardError`] for an unusable URL.
    pub fn allow_configured(&self, url: &str) -> Result<(), GuardError> {
        let entry = Allowed::configured(url)?;
        if let Ok(mut l) = self.allow.write() {
            l.push(entry);
        }
        Ok(())
    }

    /// Adds an `[[outbound.allow]]` entry at run time.
    ///
    /// # Errors
    /// [`GuardError`] for an unusable URL.
    pub fn allow(&self, entry: &AllowEntry) -> Result<(), GuardError> {
        let entry = Allowed::parse(entry)?;
        if let Ok(mut l) = self.allow.write() {
            l.push(entry);
        }
        Ok(())
    }

    /// Checks `url` against the allow-list and, when its host is an IP literal, against the
    /// address guard (names are checked on their resolved addresses at connect time).
    ///
    /// # Errors
    /// [`GuardError`] when the URL may not be called.
    pub fn check(&self, url: &str) -> Result<reqwest::Url, GuardError> {
        let parsed = reqwest::Url::parse(url).map_err(|e| GuardError::BadUrl(e.to_string()))?;
        let list = self
            .allow
            .read()
            .map_err(|_| GuardError::NotAllowed(guard::redact(&parsed)))?;
        let entry = list.check(&parsed)?;
        let ip = match parsed.host() {
            Some(url::Host::Ipv4(a)) => Some(std::net::IpAddr::V4(a)),
            Some(url::Host::Ipv6(a)) => Some(std::net::IpAddr::V6(a)),
            _ => None,
        };
        if let Some(ip) = ip {
            if !entry.allow_private && !guard::is_public(ip) {
                return Err(GuardError::PrivateAddress(
                    parsed.host_str().unwrap_or("").to_string(),
                    ip,
                ));
            }
        }
        Ok(parsed)
    }

    /// `GET url` with `headers`, the whole answer within `deadline`.
    ///
    /// # Errors
    /// [`OutboundError`].
    pub async fn get(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        deadline: Duration,
    ) -> Result<Answer, OutboundError> {
        let parsed = self.check(url)?;
        let mut req = self.client.get(parsed.clone());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(&parsed, req, deadline).await
    }

    /// `POST url` with `headers` and `body`, the whole answer within `deadline`.
    ///
    /// # Errors
    /// [`OutboundError`].
    pub async fn post(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<reqwest::Body>,
        deadline: Duration,
    ) -> Result<Answer, OutboundError> {
        let parsed = self.check(url)?;
        let mut req = self.client.post(parsed.clone()).body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(&parsed, req, deadline).await
    }

    /// One unary gRPC call: `POST url` (the method's full path) with `message` (an encoded
    /// protobuf message) framed as gRPC, on a client from [`Self::new_http2`]. The answer's one
    /// message and its `grpc-status` (from the trailers, or the headers of a trailers-only
    /// answer), all within `deadline` and the response cap.
    ///
    /// # Errors
    /// [`OutboundError`]; a gRPC failure status is an `Ok` [`GrpcAnswer`] with that status.
    pub async fn grpc_unary(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        message: &[u8],
        deadline: Duration,
    ) -> Result<GrpcAnswer, OutboundError> {
        use http_body_util::BodyExt;
        let parsed = self.check(url)?;
        let shown = guard::redact(&parsed);
        let len = u32::try_from(message.len())
            .map_err(|_| OutboundError::TooLarge(shown.clone(), u32::MAX as usize >> 20))?;
        let mut framed = Vec::with_capacity(message.len() + 5);
        framed.push(0); // not compressed
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(message);
        let mut req = self
            .client
            .post(parsed)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(framed);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let max = self.max_body;
        let exchange = async {
            let res = req.send().await.map_err(|e| describe(&shown, &e))?;
            if !res.status().is_success() {
                return Err(OutboundError::Transport(
                    shown.clone(),
                    format!("HTTP {}", res.status().as_u16()),
                ));
            }
            let res: axum::http::Response<reqwest::Body> = res.into();
            let (parts, mut body) = res.into_parts();
            let mut status = grpc_status(&parts.headers);
            let mut data = bytes::BytesMut::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| describe(&shown, &e))?;
                match frame.into_data() {
                    Ok(chunk) => {
                        if data.len() + chunk.len() > max {
                            return Err(OutboundError::TooLarge(shown.clone(), max >> 20));
                        }
                        data.extend_from_slice(&chunk);
                    }
                    Err(frame) => {
                        if let Some(t) = frame.trailers_ref() {
                            status = status.or_else(|| grpc_status(t));
                        }
                    }
                }
            }
            let message = match data.len() {
                0 => None,
                n if n >= 5 && data[0] == 0 => {
                    let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
                    Some(data.freeze().slice(5..(5 + len).min(n)))
                }
                _ => {
                    return Err(OutboundError::Transport(
                        shown.clone(),
                        "not a gRPC message (compressed or truncated)".into(),
                    ))
                }
            };
            Ok(GrpcAnswer {
                status: status.unwrap_or(2), // no status at all: UNKNOWN
                message,
            })
        };
        tokio::time::timeout(deadline, exchange)
            .await
            .map_err(|_| OutboundError::Timeout(shown.clone(), deadline.as_millis()))?
    }

    async fn send(
        &self,
        url: &reqwest::Url,
        req: reqwest::RequestBuilder,
        deadline: Duration,
    ) -> Result<Answer, OutboundError> {
        let shown = guard::redact(url);
        let max = self.max_body;
        let exchange = async {
            let mut res = req.send().await.map_err(|e| describe(&shown, &e))?;
            if res.content_length().is_some_and(|n| n > max as u64) {
                return Err(OutboundError::TooLarge(shown.clone(), max >> 20));
            }
            let status = res.status();
            let headers = res.headers().clone();
            let mut body = bytes::BytesMut::new();
            while let Some(chunk) = res.chunk().await.map_err(|e| describe(&shown, &e))? {
                if body.len() + chunk.len() > max {
                    return Err(OutboundError::TooLarge(shown.clone(), max >> 20));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Answer {
                status,
                headers,
                body: body.freeze(),
            })
        };
        tokio::time::timeout(deadline, exchange)
            .await
            .map_err(|_| OutboundError::Timeout(shown.clone(), deadline.as_millis()))?
    }
}

/// The answer of a unary gRPC call.
#[derive(Debug)]
pub struct GrpcAnswer {
    /// `grpc-status` (0 = OK, 4 = DEADLINE_EXCEEDED, 14 = UNAVAILABLE, ...).
    pub status: u32,
    /// The one response message, without its frame.
    pub message: Option<Bytes>,
}

fn grpc_status(headers: &reqwest::header::HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// A transport error as text: the guard's refusal when that was the cause, else the kind of
/// failure (reqwest's text does not include the peer's body).
fn describe(shown: &str, e: &reqwest::Error) -> OutboundError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(g) = s.downcast_ref::<GuardError>() {
            return OutboundError::Guard(g.clone());
        }
        source = s.source();
    }
    let kind = if e.is_connect() {
        "cannot connect"
    } else if e.is_timeout() {
        "timed out"
    } else if e.is_body() || e.is_decode() {
        "the answer broke off"
    } else {
        "request failed"
    };
    OutboundError::Transport(shown.to_string(), kind.to_string())
}
