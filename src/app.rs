//! [`App::build`]: the one way Carina is wired from its settings (used by `main` and by the
//! tests' `TestApp`), and [`AppState`]: the handles HTTP handlers reach, cloned per request.

use std::sync::Arc;

use crate::analysis::{routes_or_default, Analyser};
use crate::auth::{AuthMode, Authorizer};
use crate::config::Settings;
use crate::inference::Registry;
use crate::ingest::Ingest;
use crate::jobs::Jobs;
use crate::outbound::export::Exporter;
use crate::outbound::Outbound;
use crate::risk::RiskService;
use crate::store::Store;

/// Carina wired from its settings: the handler state and the background services `carina
/// serve` runs beside the HTTP server (job workers from [`Jobs::worker`], the export queue,
/// the DIMSE listener fed by [`AppState::ingest`]).
pub struct App {
    /// What handlers reach (store, ingest, jobs, models, auth, outbound client).
    pub state: AppState,
    /// The DICOM export queue (its loop runs beside the server).
    pub exporter: Exporter,
}

impl App {
    /// Opens the store and wires every room from `settings`, with `models` loaded already
    /// (loading blocks; `main` does it before the runtime starts, tests share one registry).
    ///
    /// # Errors
    /// When the database cannot be opened or migrated, or a setting is unusable (outbound
    /// allow-list, authorization issuer, risk model).
    pub async fn build(settings: &Settings, models: Arc<Registry>) -> anyhow::Result<Self> {
        let store = Store::connect(settings.database_url.as_deref(), &settings.data_dir).await?;
        // the one outbound client: the destinations this configuration names are allowed
        let configured: Vec<String> = settings
            .dicom
            .destinations
            .iter()
            .filter_map(|d| d.url.clone())
            .chain(settings.risk.iris.iter().map(|i| i.url.clone()))
            .collect();
        let outbound =
            Outbound::new(&settings.outbound, &configured).map_err(anyhow::Error::msg)?;
        let auth = match settings.auth.effective_mode() {
            AuthMode::Smart => {
                let fhir_base = settings
                    .public_url
                    .as_deref()
                    .map(|u| format!("{}/fhir", u.trim_end_matches('/')));
                let a = Authorizer::new(&settings.auth, fhir_base.as_deref(), outbound.clone())
                    .map_err(anyhow::Error::msg)?;
                a.warm().await;
                Some(Arc::new(a))
            }
            AuthMode::None => None,
        };
        let exporter = Exporter::new(
            store.clone(),
            settings.dicom.destinations.clone(),
            settings.dicom.ae_title.clone(),
        );
        // one lease owner name for this process: ingest's claimed jobs and the workers' are alike
        let job_settings = settings.jobs.worker();
        let routes = Arc::new(routes_or_default(settings.dicom.routes.clone(), &models));
        let ingest = Ingest::new(store.clone(), routes.clone(), settings.dicom.min_free_mb)
            .with_queue(job_settings.queue_options(), settings.jobs.max_backlog);
        let risk = RiskService::new(&models.tabular, &settings.risk)
            .map_err(anyhow::Error::msg)?
            .map(Arc::new);
        let analyser = Analyser::new(
            store.clone(),
            models.clone(),
            routes,
            settings.public_url.clone(),
        )
        .with_exporter(exporter.clone());
        let jobs = Jobs::new(
            store.clone(),
            ingest.clone(),
            analyser,
            risk.clone(),
            outbound.clone(),
            job_settings,
        );
        let max_body = settings.max_body_bytes();
        let state = AppState {
            models,
            store,
            public_url: settings.public_url.clone(),
            max_body,
            fhir_max_body: settings.fhir_max_body_mb.saturating_mul(1 << 20),
            ingest,
            jobs,
            risk,
            sync_wait: std::time::Duration::from_secs(settings.fhir_sync_wait_secs),
            auth,
            outbound,
            allowed_hosts: Arc::new(settings.allowed_hosts.clone()),
        };
        Ok(Self { state, exporter })
    }
}

/// What handlers can reach: handles, and the few settings handlers apply. Built by
/// [`App::build`] only.
#[derive(Clone)]
pub struct AppState {
    /// Loaded models.
    pub models: Arc<Registry>,
    /// Database and blobs.
    pub store: Store,
    /// Public base URL for links, when configured.
    pub public_url: Option<String>,
    /// Body limit in bytes.
    pub max_body: usize,
    /// Body limit of FHIR JSON requests in bytes (below the DICOM one).
    pub fhir_max_body: usize,
    /// Where received DICOM goes (store + analysis queue).
    pub ingest: Ingest,
    /// Plans, runs and waits for the work writes start.
    pub jobs: Jobs,
    /// ICU-risk assessment (None when no tabular model is loaded).
    pub risk: Option<Arc<RiskService>>,
    /// How long a FHIR request waits for the analysis it triggers before answering (the
    /// analysis goes on after that).
    pub sync_wait: std::time::Duration,
    /// Token verification; `None` when authorization is off.
    pub auth: Option<Arc<Authorizer>>,
    /// The one outbound HTTP client.
    pub outbound: Outbound,
    /// Host header values links may be built from when `public_url` is not set (besides
    /// loopback names).
    pub allowed_hosts: Arc<Vec<String>>,
}
