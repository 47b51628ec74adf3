//! Settings: defaults, then `carina.toml` (or `--config FILE`), then `CARINA_*` environment
//! variables, then command-line flags. Secrets (none yet) are never printed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dicom::routing::Route;
use crate::inference::ExecutionProvider;
use crate::outbound::export::Destination;

/// Every setting of `carina serve` / `carina predict`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// HTTP listen address.
    pub http: SocketAddr,
    /// Data folder (database, blobs).
    pub data_dir: PathBuf,
    /// Model packages folder.
    pub models: PathBuf,
    /// Where sessions run.
    pub execution_provider: ExecutionProvider,
    /// ONNX Runtime intra-op threads per session (0 = cores / sessions).
    pub intra_threads: usize,
    /// Sessions per model on CPU sharing one request queue (0 = one per core).
    pub sessions_per_model: usize,
    /// Largest batch formed from concurrent requests.
    pub max_batch: usize,
    /// How long, in microseconds, a batch stays open for more requests after its first
    /// (0 = take only what is already queued; no added latency).
    pub max_wait_us: u64,
    /// Images whose pixel work (decode, resize, overlay, PNG) runs at once (0 = one per core);
    /// the rest wait their turn instead of taking the cores from inference.
    pub cpu_workers: usize,
    /// Explicit `libonnxruntime.so` path (else found automatically).
    pub onnxruntime: Option<PathBuf>,
    /// Largest accepted request body, in MiB.
    pub max_body_mb: usize,
    /// Largest accepted FHIR JSON body, in MiB (checked for depth, array lengths and value
    /// count before it is parsed).
    pub fhir_max_body_mb: usize,
    /// How long a FHIR request waits for the imaging analysis it triggers, in seconds (the
    /// analysis goes on after that; `Prefer: respond-async` does not wait at all).
    pub fhir_sync_wait_secs: u64,
    /// Public base URL used in links (else taken from the request's Host header).
    pub public_url: Option<String>,
    /// The DICOM node (`[dicom]`).
    pub dicom: DicomSettings,
    /// ICU-risk assessment (`[risk]`).
    pub risk: crate::risk::RiskSettings,
    /// Database URL: `postgres://…` for a database shared by replicas; unset = the embedded
    /// SQLite file `carina.db` in the data folder.
    pub database_url: Option<String>,
    /// The job queue (`[jobs]`).
    pub jobs: JobsSettings,
    /// Authorization (`[auth]`): bearer tokens from an OAuth2 / SMART authorization server.
    pub auth: crate::auth::AuthSettings,
    /// Outbound calls (`[outbound]`): allow-list, CA bundle, response cap.
    pub outbound: crate::outbound::OutboundSettings,
    /// The audit trail (`[audit]`): syslog feed.
    pub audit: crate::audit::AuditSettings,
    /// HTTP server limits (`[http_limits]`): head and body deadlines, connections, requests in
    /// flight.
    pub http_limits: HttpLimits,
    /// Host header values links may be built from when `public_url` is unset (loopback names
    /// are always allowed).
    pub allowed_hosts: Vec<String>,
}

/// `[jobs]`: workers, leases, retries and backpressure.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsSettings {
    /// Worker loops in this process (0: accept work, run no jobs: an ingest-only replica).
    pub workers: usize,
    /// Lease length in seconds (renewed while a job runs; a crashed replica's jobs are taken
    /// over after it).
    pub lease_secs: u64,
    /// Attempts before a job is dead.
    pub max_attempts: i64,
    /// First retry delay in seconds (doubles per attempt, at most 10 minutes).
    pub backoff_secs: u64,
    /// Unfinished jobs above which new work is refused (503 + Retry-After, DIMSE A700).
    pub max_backlog: i64,
    /// Seconds a running job may go on after a shutdown signal before its lease is released.
    pub shutdown_grace_secs: u64,
    /// Days finished jobs are kept before they are pruned (0: forever; dead jobs are kept).
    pub keep_done_days: u64,
    /// Seconds one attempt of a job may run before it fails and is retried with backoff.
    pub deadline_secs: u64,
}

impl Default for JobsSettings {
    fn default() -> Self {
        Self {
            workers: 2,
            lease_secs: 60,
            max_attempts: 5,
            backoff_secs: 2,
            max_backlog: 10_000,
            shutdown_grace_secs: 20,
            keep_done_days: 7,
            deadline_secs: 600,
        }
    }
}

impl JobsSettings {
    /// Worker settings with a fresh lease owner name.
    pub fn worker(&self) -> crate::jobs::JobSettings {
        crate::jobs::JobSettings {
            owner: crate::jobs::default_owner(),
            concurrency: self.workers,
            lease: std::time::Duration::from_secs(self.lease_secs.max(3)),
            poll: std::time::Duration::from_millis(500),
            backoff: std::time::Duration::from_secs(self.backoff_secs.max(1)),
            max_attempts: self.max_attempts.max(1),
            grace: std::time::Duration::from_secs(self.shutdown_grace_secs),
            keep_done: (self.keep_done_days > 0).then(|| {
                std::time::Duration::from_secs(self.keep_done_days.saturating_mul(86_400))
            }),
            deadline: std::time::Duration::from_secs(self.deadline_secs.max(1)),
        }
    }
}

/// `[http_limits]`: what the HTTP server ([`crate::api::serve`]) gives each client.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLimits {
    /// Seconds a client has to send a request's head (request line and headers).
    pub header_timeout_secs: u64,
    /// Seconds a request body may pause between chunks before the request answers 408.
    pub body_idle_secs: u64,
    /// Open connections; more wait in the listen queue.
    pub max_connections: usize,
    /// Requests handled at once; more answer 503 + `Retry-After`.
    pub max_in_flight: usize,
    /// Seconds in-flight requests may go on after a shutdown signal.
    pub shutdown_grace_secs: u64,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_timeout_secs: 10,
            body_idle_secs: 30,
            max_connections: 1024,
            max_in_flight: 256,
            shutdown_grace_secs: 30,
        }
    }
}

/// `[dicom]`: DIMSE service, storage limits and routing.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DicomSettings {
    /// DIMSE C-ECHO/C-STORE SCP listen address (`--dimse`); off when absent.
    pub dimse: Option<SocketAddr>,
    /// Carina's AE title.
    pub ae_title: String,
    /// Refuse associations whose called AE title is not `ae_title`.
    pub check_called_ae: bool,
    /// Calling AE titles allowed to associate (empty: any): `AE` from any address, or
    /// `AE@host` (an address or a name) from that host only, as PACS configurations pair them.
    /// Required when authorization is on.
    pub allowed_calling_aes: Vec<String>,
    /// Concurrent associations; more are refused.
    pub max_associations: usize,
    /// Transfer syntaxes accepted in presentation contexts (empty: every syntax dicom-rs
    /// knows, compressed ones included).
    pub transfer_syntaxes: Vec<String>,
    /// Largest PDU Carina receives, in bytes.
    pub max_pdu: u32,
    /// Seconds an association may stay silent before it is closed.
    pub idle_timeout_secs: u64,
    /// Refuse associations and STOW/C-STORE instances when the data folder has less free space
    /// than this, in MiB.
    pub min_free_mb: u64,
    /// Routing rules (first match wins); none configured: CR/DX chest → the first image model.
    pub routes: Vec<Route>,
    /// PACS destinations that receive Carina's Secondary Capture results.
    pub destinations: Vec<Destination>,
}

impl Default for DicomSettings {
    fn default() -> Self {
        Self {
            dimse: None,
            ae_title: "CARINA".into(),
            check_called_ae: true,
            allowed_calling_aes: Vec::new(),
            max_associations: 16,
            transfer_syntaxes: Vec::new(),
            max_pdu: 65536,
            idle_timeout_secs: 30,
            min_free_mb: 512,
            routes: Vec::new(),
            destinations: Vec::new(),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            models: PathBuf::from("./models"),
            execution_provider: ExecutionProvider::Auto,
            intra_threads: 0,
            sessions_per_model: 0,
            max_batch: 4,
            max_wait_us: 0,
            cpu_workers: 0,
            onnxruntime: None,
            max_body_mb: 64,
            fhir_max_body_mb: 32,
            fhir_sync_wait_secs: 60,
            public_url: None,
            dicom: DicomSettings::default(),
            risk: crate::risk::RiskSettings::default(),
            database_url: None,
            jobs: JobsSettings::default(),
            auth: crate::auth::AuthSettings::default(),
            outbound: crate::outbound::OutboundSettings::default(),
            allowed_hosts: Vec::new(),
            http_limits: HttpLimits::default(),
            audit: crate::audit::AuditSettings::default(),
        }
    }
}

/// Problems with the configuration (stop start-up).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// File unreadable or invalid.
    #[error("{}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Environment variable invalid.
    #[error("environment variable {name}: {message}")]
    Env {
        /// Variable name.
        name: String,
        /// What is wrong.
        message: String,
    },
}

impl Settings {
    /// Loads defaults ← file ← environment. `file` is the `--config` flag; without it
    /// `./carina.toml` is read when present.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file or variable at fault.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let path = file.map(Path::to_path_buf).or_else(|| {
            let p = PathBuf::from("carina.toml");
            p.is_file().then_some(p)
        });
        let mut s = match &path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError::File {
                    path: p.clone(),
                    message: e.to_string(),
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::File {
                    path: p.clone(),
                    message: e.to_string(),
                })?
            }
            None => Settings::default(),
        };
        s.apply_env(|k| std::env::var(k).ok())?;
        Ok(s)
    }

    /// Applies `CARINA_*` variables read through `get`.
    ///
    /// # Errors
    /// [`ConfigError::Env`] for an unparsable value.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            v.parse().map_err(|e: T::Err| ConfigError::Env {
                name: name.into(),
                message: e.to_string(),
            })
        }
        if let Some(v) = get("CARINA_HTTP") {
            self.http = parse("CARINA_HTTP", &v)?;
        }
        if let Some(v) = get("CARINA_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = get("CARINA_MODELS") {
            self.models = v.into();
        }
        if let Some(v) = get("CARINA_EXECUTION_PROVIDER") {
            self.execution_provider = match v.to_ascii_lowercase().as_str() {
                "auto" => ExecutionProvider::Auto,
                "cuda" => ExecutionProvider::Cuda,
                "cpu" => ExecutionProvider::Cpu,
                _ => {
                    return Err(ConfigError::Env {
                        name: "CARINA_EXECUTION_PROVIDER".into(),
                        message: format!("'{v}' is not auto, cuda or cpu"),
                    })
                }
            };
        }
        if let Some(v) = get("CARINA_INTRA_THREADS") {
            self.intra_threads = parse("CARINA_INTRA_THREADS", &v)?;
        }
        if let Some(v) = get("CARINA_SESSIONS_PER_MODEL") {
            self.sessions_per_model = parse("CARINA_SESSIONS_PER_MODEL", &v)?;
        }
        if let Some(v) = get("CARINA_MAX_BATCH") {
            self.max_batch = parse("CARINA_MAX_BATCH", &v)?;
        }
        if let Some(v) = get("CARINA_MAX_WAIT_US") {
            self.max_wait_us = parse("CARINA_MAX_WAIT_US", &v)?;
        }
        if let Some(v) = get("CARINA_CPU_WORKERS") {
            self.cpu_workers = parse("CARINA_CPU_WORKERS", &v)?;
        }
        if let Some(v) = get("CARINA_ONNXRUNTIME") {
            self.onnxruntime = Some(v.into());
        }
        if let Some(v) = get("CARINA_FHIR_SYNC_WAIT_SECS") {
            self.fhir_sync_wait_secs = parse("CARINA_FHIR_SYNC_WAIT_SECS", &v)?;
        }
        if let Some(v) = get("CARINA_MAX_BODY_MB") {
            self.max_body_mb = parse("CARINA_MAX_BODY_MB", &v)?;
        }
        if let Some(v) = get("CARINA_FHIR_MAX_BODY_MB") {
            self.fhir_max_body_mb = parse("CARINA_FHIR_MAX_BODY_MB", &v)?;
        }
        if let Some(v) = get("CARINA_PUBLIC_URL") {
            self.public_url = Some(v);
        }
        if let Some(v) = get("CARINA_DIMSE") {
            self.dicom.dimse = Some(parse("CARINA_DIMSE", &v)?);
        }
        if let Some(v) = get("CARINA_AE_TITLE") {
            self.dicom.ae_title = v;
        }
        if let Some(v) = get("CARINA_DATABASE_URL") {
            self.database_url = Some(v).filter(|v| !v.is_empty());
        }
        if let Some(v) = get("CARINA_WORKERS") {
            self.jobs.workers = parse("CARINA_WORKERS", &v)?;
        }
        if let Some(v) = get("CARINA_JOB_LEASE_SECS") {
            self.jobs.lease_secs = parse("CARINA_JOB_LEASE_SECS", &v)?;
        }
        if let Some(v) = get("CARINA_JOB_MAX_ATTEMPTS") {
            self.jobs.max_attempts = parse("CARINA_JOB_MAX_ATTEMPTS", &v)?;
        }
        if let Some(v) = get("CARINA_JOB_BACKOFF_SECS") {
            self.jobs.backoff_secs = parse("CARINA_JOB_BACKOFF_SECS", &v)?;
        }
        if let Some(v) = get("CARINA_MAX_BACKLOG") {
            self.jobs.max_backlog = parse("CARINA_MAX_BACKLOG", &v)?;
        }
        if let Some(v) = get("CARINA_AUTH_MODE") {
            self.auth.mode = Some(match v.to_ascii_lowercase().as_str() {
                "smart" => crate::auth::AuthMode::Smart,
                "none" => crate::auth::AuthMode::None,
                _ => {
                    return Err(ConfigError::Env {
                        name: "CARINA_AUTH_MODE".into(),
                        message: format!("'{v}' is not smart or none"),
                    })
                }
            });
        }
        if let Some(v) = get("CARINA_AUTH_ISSUER") {
            self.auth.issuer = Some(v);
        }
        if let Some(v) = get("CARINA_AUTH_AUDIENCE") {
            self.auth.audience = Some(v);
        }
        if let Some(v) = get("CARINA_MIN_FREE_MB") {
            self.dicom.min_free_mb = parse("CARINA_MIN_FREE_MB", &v)?;
        }
        Ok(())
    }

    /// Refuses an unsafe combination at start: HTTP on a non-loopback address with no
    /// authorization, unless `auth.mode = "none"` says so explicitly (then a warning). With
    /// authorization on and DIMSE enabled, the calling-AE allow-list must not be empty.
    ///
    /// # Errors
    /// A message saying what to configure.
    pub fn check_security(&self) -> Result<(), String> {
        use crate::auth::AuthMode;
        let mode = self.auth.effective_mode();
        if mode == AuthMode::None && !self.http.ip().is_loopback() {
            if self.auth.mode != Some(AuthMode::None) {
                return Err(format!(
                    "refusing to listen on {} without authorization: configure [auth] issuer (SMART on FHIR), \
                     or set auth.mode = \"none\" (CARINA_AUTH_MODE=none) to run open on purpose",
                    self.http
                ));
            }
            tracing::warn!(http = %self.http, "authorization is OFF on a non-loopback address (auth.mode = \"none\"): anyone who can reach it can read and write patient data");
        }
        if mode == AuthMode::Smart
            && self.dicom.dimse.is_some()
            && self.dicom.allowed_calling_aes.is_empty()
        {
            return Err("with [auth] on, [dicom] allowed_calling_aes must name the peers allowed to associate (e.g. [\"PACS@10.0.0.5\"])".into());
        }
        Ok(())
    }

    /// Body limit in bytes.
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_mb.saturating_mul(1024 * 1024)
    }

    /// The DIMSE SCP's options (instances up to the body limit).
    pub fn scp_options(&self) -> crate::ingest::dimse::ScpOptions {
        self.dicom.scp_options(self.max_body_bytes())
    }
}

impl DicomSettings {
    /// The DIMSE SCP's options, accepting instances up to `max_instance` bytes.
    pub fn scp_options(&self, max_instance: usize) -> crate::ingest::dimse::ScpOptions {
        crate::ingest::dimse::ScpOptions {
            ae_title: self.ae_title.clone(),
            check_called_ae: self.check_called_ae,
            allowed_calling_aes: self.allowed_calling_aes.clone(),
            max_associations: self.max_associations,
            max_pdu: self.max_pdu,
            idle_timeout: std::time::Duration::from_secs(self.idle_timeout_secs.max(1)),
            transfer_syntaxes: self.transfer_syntaxes.clone(),
            max_instance,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_file_values_and_bad_values_are_named() {
        let mut s: Settings = toml::from_str("http = \"127.0.0.1:9000\"\nmax_batch = 2").unwrap();
        assert_eq!(s.max_batch, 2);
        s.apply_env(|k| (k == "CARINA_MAX_BATCH").then(|| "8".to_string()))
            .unwrap();
        assert_eq!(s.max_batch, 8);
        assert_eq!(s.http.port(), 9000);
        assert_eq!(s.cpu_workers, 0, "one per core unless set");
        s.apply_env(|k| (k == "CARINA_CPU_WORKERS").then(|| "3".to_string()))
            .unwrap();
        assert_eq!(s.cpu_workers, 3);
        assert_eq!(s.max_wait_us, 0, "no added latency unless set");
        s.apply_env(|k| (k == "CARINA_MAX_WAIT_US").then(|| "2000".to_string()))
            .unwrap();
        assert_eq!(s.max_wait_us, 2000);
        let e = s
            .apply_env(|k| (k == "CARINA_CPU_WORKERS").then(|| "many".to_string()))
            .unwrap_err();
        assert!(e.to_string().contains("CARINA_CPU_WORKERS"));
        let e = s
            .apply_env(|k| (k == "CARINA_EXECUTION_PROVIDER").then(|| "tpu".to_string()))
            .unwrap_err();
        assert!(e.to_string().contains("CARINA_EXECUTION_PROVIDER"));
        assert!(
            toml::from_str::<Settings>("htp = 1").is_err(),
            "unknown keys are rejected"
        );
    }
}
