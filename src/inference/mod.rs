//! Models: manifests, ONNX Runtime sessions, preprocessing and heatmaps. Everything from a
//! decoded image to probabilities and a class activation map; nothing about HTTP or FHIR.

pub mod engine;
pub mod gradcam;
pub mod head;
pub mod manifest;
pub mod model;
pub mod onnx;
pub mod preprocess;
pub mod remote;
pub mod runtime;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

pub use engine::{BatchStats, Batching};
pub use manifest::{Manifest, Task};
pub use model::{ImageModel, LoadError, Prediction};
pub use runtime::{ExecutionProvider, SessionOptions};

/// A tabular model (loaded and checked; served by the FHIR risk routes).
pub struct TabularModel {
    /// The manifest.
    pub manifest: Manifest,
    /// Provider running it.
    pub provider: &'static str,
    /// Graph input names.
    pub inputs: Vec<String>,
    /// The package folder.
    pub dir: PathBuf,
    /// The session (tabular models are tiny: one, serialised).
    session: std::sync::Mutex<ort::session::Session>,
}

impl TabularModel {
    /// Runs the model on one feature vector (manifest order) and returns the probability of
    /// the positive outcome.
    ///
    /// # Errors
    /// [`engine::EngineError`] when the run fails or the output is not as declared.
    pub fn predict(&self, features: &[f32]) -> Result<f32, engine::EngineError> {
        let input = self
            .inputs
            .first()
            .cloned()
            .unwrap_or_else(|| "input".into());
        let output = self
            .manifest
            .output
            .probability
            .clone()
            .or_else(|| self.manifest.output.probabilities.clone())
            .unwrap_or_else(|| "probabilities".into());
        let tensor = engine::FloatTensor {
            shape: vec![1, features.len()],
            data: features.to_vec(),
        };
        let mut session = self
            .session
            .lock()
            .map_err(|_| engine::EngineError::Run("session lock poisoned".into()))?;
        let mut out = engine::run_batch(
            &mut session,
            &input,
            std::slice::from_ref(&output),
            &[&tensor],
        )?;
        let probs = out
            .pop()
            .and_then(|mut m| m.remove(&output))
            .ok_or_else(|| engine::EngineError::Run(format!("no output '{output}'")))?;
        let k = self.manifest.output.positive_index.unwrap_or(1);
        probs
            .data
            .get(k)
            .copied()
            .ok_or_else(|| engine::EngineError::Run(format!("output '{output}' has no index {k}")))
    }
}

/// Every model found under the models folder.
pub struct Registry {
    /// Image classifiers, sorted by name.
    pub image: Vec<Arc<ImageModel>>,
    /// Tabular risk models.
    pub tabular: Vec<Arc<TabularModel>>,
}

/// One line of `carina models` / `GET /v1/models`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelInfo {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Task.
    pub task: &'static str,
    /// Inputs with shapes.
    pub inputs: Vec<InputInfo>,
    /// Labels (image models).
    pub labels: Vec<LabelInfo>,
    /// Heatmap method (image models).
    pub cam_method: Option<&'static str>,
    /// Grad-CAM target tensor.
    pub cam_target: Option<String>,
    /// Execution provider.
    pub provider: &'static str,
    /// Folder.
    #[schema(value_type = String)]
    pub path: PathBuf,
}

/// An input tensor.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InputInfo {
    /// Name.
    pub name: String,
    /// Shape (batch first).
    pub shape: Vec<i64>,
}

/// A label.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LabelInfo {
    /// Key.
    pub key: String,
    /// Display text.
    pub display: String,
    /// Code system.
    pub system: String,
    /// Code.
    pub code: String,
}

/// Settings for loading.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Session options.
    pub session: SessionOptions,
    /// How each model's engine forms batches.
    pub batching: Batching,
    /// Explicit library path.
    pub onnxruntime: Option<PathBuf>,
    /// The outbound client's settings, for models whose `[backend]` is a serving engine.
    pub outbound: crate::outbound::OutboundSettings,
}

impl Registry {
    /// Loads every `*/model.toml` below `dir`. Must run off the async runtime (it warms models up).
    ///
    /// # Errors
    /// The first broken manifest or model, naming its file; or no model at all.
    pub fn load(dir: &Path, opts: &LoadOptions) -> anyhow::Result<Self> {
        let env = runtime::environment(opts.onnxruntime.as_deref())?;
        let mut manifests = Vec::new();
        let entries = std::fs::read_dir(dir)
            .map_err(|e| anyhow::anyhow!("{}: cannot read models folder: {e}", dir.display()))?;
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path().join("model.toml");
            if path.is_file() {
                manifests.push((entry.path(), Manifest::load(&path)?));
            }
        }
        manifests.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        if manifests.is_empty() {
            anyhow::bail!("{}: no model packages (*/model.toml) found", dir.display());
        }
        let mut image = Vec::new();
        let mut tabular = Vec::new();
        for (i, (pkg, m)) in manifests.iter().enumerate() {
            if manifests[..i].iter().any(|(_, o)| o.name == m.name) {
                anyhow::bail!(
                    "{}: model name '{}' is used twice",
                    pkg.join("model.toml").display(),
                    m.name
                );
            }
        }
        for (pkg, m) in manifests {
            match m.task {
                Task::ImageClassification => {
                    let model = ImageModel::load(&pkg, m, env, opts)?;
                    tracing::info!(model = %model.manifest.name, version = %model.manifest.version, provider = model.provider, cam = model.cam_method().as_str(), "model loaded");
                    image.push(Arc::new(model));
                }
                Task::TabularRisk => {
                    tabular.push(Arc::new(load_tabular(&pkg, m, env, opts.session)?))
                }
            }
        }
        Ok(Self { image, tabular })
    }

    /// The image model named `name`, or the default (first by name) when `None`.
    pub fn image_model(&self, name: Option<&str>) -> Option<&Arc<ImageModel>> {
        match name {
            Some(n) => self.image.iter().find(|m| m.manifest.name == n),
            None => self.image.first(),
        }
    }

    /// Descriptions of every model.
    pub fn describe(&self) -> Vec<ModelInfo> {
        let mut out: Vec<ModelInfo> = self
            .image
            .iter()
            .map(|m| {
                let man = &m.manifest;
                ModelInfo {
                    name: man.name.clone(),
                    version: man.version.clone(),
                    task: man.task.as_str(),
                    inputs: man
                        .input
                        .iter()
                        .map(|i| InputInfo {
                            name: i.name.clone(),
                            shape: i.shape.clone(),
                        })
                        .collect(),
                    labels: man
                        .labels
                        .iter()
                        .map(|l| LabelInfo {
                            key: l.key.clone(),
                            display: l.display.clone(),
                            system: l.system.clone(),
                            code: l.code.clone(),
                        })
                        .collect(),
                    cam_method: Some(m.cam_method().as_str()),
                    cam_target: m.cam_target().map(str::to_string),
                    provider: m.provider,
                    path: m.dir.clone(),
                }
            })
            .collect();
        out.extend(self.tabular.iter().map(|t| {
            ModelInfo {
                name: t.manifest.name.clone(),
                version: t.manifest.version.clone(),
                task: t.manifest.task.as_str(),
                inputs: t
                    .inputs
                    .iter()
                    .map(|n| InputInfo {
                        name: n.clone(),
                        shape: vec![-1, t.manifest.features.len() as i64],
                    })
                    .collect(),
                labels: Vec::new(),
                cam_method: None,
                cam_target: None,
                provider: t.provider,
                path: t.dir.clone(),
            }
        }));
        out
    }
}

fn load_tabular(
    dir: &Path,
    manifest: Manifest,
    env: &ort::environment::Environment,
    opts: SessionOptions,
) -> Result<TabularModel, LoadError> {
    let path = manifest.model_path(dir);
    let fail = |message: String| LoadError {
        path: path.clone(),
        message,
    };
    let bytes = std::fs::read(&path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let cpu = SessionOptions {
        provider: ExecutionProvider::Cpu,
        ..opts
    };
    let (session, provider) =
        runtime::session(env, &bytes, cpu, &manifest.name).map_err(|e| fail(e.to_string()))?;
    let inputs = session
        .inputs()
        .iter()
        .map(|o| o.name().to_string())
        .collect();
    Ok(TabularModel {
        manifest,
        provider,
        inputs,
        dir: dir.to_path_buf(),
        session: std::sync::Mutex::new(session),
    })
}
