//! Application state shared by handlers: handles to the model registry and the store, plus the
//! few HTTP settings handlers need. Built once in `main`, cloned per request.

use std::sync::Arc;

use crate::inference::Registry;
use crate::ingest::Ingest;
use crate::store::Store;

/// What handlers can reach.
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
    /// Where received DICOM goes (store + analysis queue).
    pub ingest: Ingest,
}
