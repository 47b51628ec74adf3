//! The analysis stage: a stored DICOM instance → routing → the model (decode, infer,
//! Grad-CAM: [`pipeline`]) → its report and heatmap → a Secondary Capture result in the same
//! study → export. The stored file is parsed once here; the overlay goes on to the Secondary
//! Capture as pixels (never decoded back from its PNG) and the result is indexed from the object
//! built, not parsed again. Ids derive from the SOP Instance UID and the model, so running an
//! analysis twice (a re-send, a crash between steps) makes the same report and the same
//! Secondary Capture, never a second one. Ingest stores and queues; the jobs room calls this.

pub mod cpu;
pub mod pipeline;

use std::sync::Arc;

use bytes::Bytes;
use uuid::Uuid;

use crate::dicom::routing::{self, Decision, Route};
use crate::dicom::sc::{self, ScInput, ScResult};
use crate::dicom::{parse_instance, ParseError};
use crate::imaging::MediaType;
use crate::inference::engine::EngineError;
use crate::inference::{ImageModel, Registry};
use crate::outbound::export::Exporter;
use crate::store::{Source, Store, StoreError};
use pipeline::{AnalyseError, Analysis};

/// Why an analysis did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The instance is not stored.
    #[error("instance not found")]
    NotFound,
    /// The routing or the model refused it (stored as skipped).
    #[error("{0}")]
    Skipped(String),
    /// Analysis failed.
    #[error(transparent)]
    Analyse(#[from] AnalyseError),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored file no longer parses.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// The result instance could not be built.
    #[error(transparent)]
    Sc(#[from] sc::ScError),
}

impl ProcessError {
    /// Whether another attempt may succeed: storage trouble, or a remote inference pool that
    /// cannot be reached now; not a failed analysis.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Store(_) | Self::Analyse(AnalyseError::Engine(EngineError::Unavailable(_)))
        )
    }
}

/// The routes of `[dicom]`, or (none configured) the default chest X-ray route to the first
/// image model.
pub fn routes_or_default(routes: Vec<Route>, models: &Registry) -> Vec<Route> {
    if !routes.is_empty() {
        return routes;
    }
    models
        .image_model(None)
        .map(|m| routing::default_routes(&m.manifest.name))
        .unwrap_or_default()
}

/// Analyses stored instances. Cheap to clone.
#[derive(Clone)]
pub struct Analyser {
    store: Store,
    models: Arc<Registry>,
    routes: Arc<Vec<Route>>,
    public_url: Option<String>,
    exporter: Option<Exporter>,
}

impl Analyser {
    /// Analyses with `models` by `routes` (see [`routes_or_default`]); `public_url` makes the
    /// overlay links absolute.
    pub fn new(
        store: Store,
        models: Arc<Registry>,
        routes: Arc<Vec<Route>>,
        public_url: Option<String>,
    ) -> Self {
        Self {
            store,
            models,
            routes,
            public_url,
            exporter: None,
        }
    }

    /// The image model `name` names, or the first one.
    pub fn image_model(&self, name: Option<&str>) -> Option<&Arc<ImageModel>> {
        self.models.image_model(name)
    }

    /// Sends each Secondary Capture result to the exporter's destinations.
    #[must_use]
    pub fn with_exporter(mut self, exporter: Exporter) -> Self {
        self.exporter = Some(exporter);
        self
    }

    /// Analyses a stored instance now (routing decides the model unless `model` is given),
    /// stores the report and the Secondary Capture, and records the state. Idempotent.
    ///
    /// # Errors
    /// [`ProcessError`]; the instance's state records skips and failures.
    pub async fn process(&self, sop: &str, model: Option<&str>) -> Result<Analysis, ProcessError> {
        let result = self.analyse_stored(sop, model).await;
        let (state, reason, id) = match &result {
            Ok(a) => (
                "done",
                Some(format!("analysed by {}", a.model.manifest.name)),
                Some(a.id.to_string()),
            ),
            Err(ProcessError::NotFound) => return result,
            Err(ProcessError::Skipped(why)) => ("skipped", Some(why.clone()), None),
            Err(e) => ("failed", Some(e.to_string()), None),
        };
        self.store
            .set_analysis_state(sop, state, reason.as_deref(), id.as_deref())
            .await?;
        result
    }

    async fn analyse_stored(
        &self,
        sop: &str,
        model: Option<&str>,
    ) -> Result<Analysis, ProcessError> {
        let ix = self
            .store
            .instance(sop)
            .await?
            .ok_or(ProcessError::NotFound)?;
        let file = self
            .store
            .instance_file(&ix)
            .await?
            .ok_or(ProcessError::NotFound)?;
        let file = Bytes::from(file);
        let parsed = {
            let f = file.clone();
            cpu::run(move || parse_instance(&f))
                .await
                .map_err(|e| ParseError::Unreadable(e.to_string()))??
        };
        let (name, frame) = match (model, routing::route(&self.routes, &ix, parsed.has_pixels)) {
            (Some(m), _) => (m.to_string(), 0),
            (None, Decision::Analyse { model, frame }) => (model, frame),
            (None, Decision::Skip(why)) => return Err(ProcessError::Skipped(why)),
        };
        let model = self
            .models
            .image_model(Some(&name))
            .ok_or_else(|| ProcessError::Skipped(format!("model {name} is not loaded")))?
            .clone();
        let version = (model.manifest.name.clone(), model.manifest.version.clone());
        let id = Uuid::new_v5(
            &Uuid::NAMESPACE_OID,
            format!("carina/analysis/{sop}/{}/{}/{frame}", version.0, version.1).as_bytes(),
        );
        let base = self.public_url.clone();
        let mut analysis =
            pipeline::analyse_with(model, file, MediaType::Dicom, id, frame, move |id| {
                base.as_ref()
                    .map(|b| format!("{}/v1/results/{id}/overlay.png", b.trim_end_matches('/')))
            })
            .await?;
        self.store
            .save_analysis(&analysis.record(), "dicom")
            .await?;
        if let Some(overlay) = analysis.overlay.take() {
            let p = analysis.prediction.probabilities[analysis.prediction.class];
            let summary = format!("{} {:.1}%", analysis.label_display(), p * 100.0);
            let created = analysis.created;
            // building the Part 10 object copies the full-size picture: CPU work, off the runtime
            let (result, overlay) = cpu::run(move || {
                let r = sc::secondary_capture(&ScInput {
                    source: &parsed.object,
                    overlay: &overlay,
                    model: (&version.0, &version.1),
                    summary: &summary,
                    created,
                });
                (r, overlay)
            })
            .await
            .map_err(|e| sc::ScError::from_display(&e))?;
            analysis.overlay = Some(overlay);
            let result = result?;
            let result_sop = result.index.sop_instance_uid.clone();
            self.store_result(result, sop).await?;
            if let Some(x) = &self.exporter {
                // queued once per destination, whether this run or an earlier one stored it
                x.enqueue(&result_sop).await?;
            }
        }
        Ok(analysis)
    }

    /// Stores a Secondary Capture result of `source_sop` (kept even when intake is refusing
    /// work: refusing it would lose finished work); a re-run finds it stored already.
    async fn store_result(&self, result: ScResult, source_sop: &str) -> Result<(), StoreError> {
        let ScResult { part10, index } = result;
        if self
            .store
            .instance(&index.sop_instance_uid)
            .await?
            .is_some()
        {
            return Ok(());
        }
        let size = part10.len();
        self.store
            .put_instance_file(&index, Bytes::from(part10))
            .await?;
        let note = Some("Carina result (Secondary Capture): not analysed");
        self.store
            .insert_instance(
                &index,
                size,
                Source::Result,
                "skipped",
                note,
                Some(source_sop),
                None,
            )
            .await?;
        Ok(())
    }
}
