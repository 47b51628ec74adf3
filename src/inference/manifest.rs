//! `model.toml`: what a model package declares about itself (task, input contract, labels and
//! their codings, outputs, Grad-CAM target, provenance). Parsing checks everything that can be
//! checked without the ONNX file; [`super::registry`] checks the rest against the graph.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A parsed `model.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Unique model name.
    pub name: String,
    /// Model version.
    pub version: String,
    /// What the model does.
    pub task: Task,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// ONNX file, relative to the manifest.
    #[serde(default = "default_file")]
    pub file: String,
    /// `[input]` as written; image models parse it into [`Manifest::input`].
    #[serde(rename = "input", default)]
    pub input_table: Option<toml::Value>,
    /// Input contract of image models (parsed from `[input]` by [`Manifest::load`]).
    #[serde(skip)]
    pub input: Option<ImageInput>,
    /// Output tensor names.
    #[serde(default)]
    pub output: Outputs,
    /// Labels in output order (image models).
    #[serde(default)]
    pub labels: Vec<Label>,
    /// How the winning label is chosen.
    #[serde(default)]
    pub decision: Decision,
    /// Grad-CAM settings.
    #[serde(default)]
    pub gradcam: GradCamSettings,
    /// Features (tabular models).
    #[serde(default)]
    pub features: Vec<toml::Value>,
    /// Outcome (tabular models).
    pub outcome: Option<toml::Value>,
    /// Risk thresholds (tabular models).
    pub thresholds: Option<toml::Value>,
    /// Where the model came from.
    #[serde(default)]
    pub provenance: Provenance,
    /// Where inference runs: in this process (default) or on a serving engine.
    #[serde(default)]
    pub backend: BackendSettings,
}

/// `[backend]`: where an image model's inference runs. Decoding, Grad-CAM (from the fetched
/// feature map and the head weights of the local ONNX file), reports and storage stay in Carina.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSettings {
    /// `local` (ONNX Runtime in this process) or `kserve-v2` (Open Inference Protocol).
    #[serde(default)]
    pub kind: BackendKind,
    /// `rest` (default) or `grpc`.
    #[serde(default)]
    pub protocol: BackendProtocol,
    /// Base URL of the serving engine (`kserve-v2`): its HTTP port for `rest`, e.g.
    /// `http://triton:8000`, its gRPC port for `grpc`, e.g. `http://triton:8001` (h2c).
    pub url: Option<String>,
    /// Model name on the serving engine (default: this manifest's `name`).
    pub model: Option<String>,
    /// Model version on the serving engine (default: the engine's choice).
    pub version: Option<String>,
    /// Deadline of one inference call, in milliseconds (default 30 000).
    pub timeout_ms: Option<u64>,
    /// Further attempts after a transient failure (default 2).
    pub retries: Option<u32>,
    /// Failures in a row that open the circuit breaker (default 5).
    pub breaker_failures: Option<u32>,
    /// Seconds the breaker stays open before one trial call (default 30).
    pub breaker_open_secs: Option<u64>,
    /// Name of an environment variable holding a bearer token for the engine.
    pub token_env: Option<String>,
}

/// How a `kserve-v2` backend is called.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendProtocol {
    /// HTTP/REST with JSON tensors.
    #[default]
    Rest,
    /// gRPC (HTTP/2) with protobuf tensors.
    Grpc,
}

/// Inference backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// ONNX Runtime in this process.
    #[default]
    Local,
    /// A KServe V2 / Open Inference Protocol server (Triton, KServe, MLServer).
    KserveV2,
}

fn default_file() -> String {
    "model.onnx".into()
}

/// Model task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// Image in, one label out of several.
    ImageClassification,
    /// Feature vector in, risk probability out.
    TabularRisk,
}

impl Task {
    /// The manifest spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::ImageClassification => "image-classification",
            Task::TabularRisk => "tabular-risk",
        }
    }
}

/// Image input contract.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImageInput {
    /// Input tensor name.
    pub name: String,
    /// Shape with the batch first, e.g. `[1, 1, 224, 224]`.
    pub shape: Vec<i64>,
    /// `NCHW` or `NHWC`.
    #[serde(default)]
    pub layout: Layout,
    /// Colour the model expects.
    pub colour: Colour,
    /// How the image is brought to the input size.
    pub resize: Resize,
    /// Letterbox padding (0-255 pixel value).
    #[serde(default)]
    pub pad_value: u8,
    /// `x = (v * scale - mean) / std`.
    pub normalise: Normalise,
}

/// Tensor layout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum Layout {
    /// Channels first.
    #[default]
    NCHW,
    /// Channels last.
    NHWC,
}

/// Colour space of the model input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    /// One channel.
    Grayscale,
    /// Three channels, R G B.
    Rgb,
}

/// Resize policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Resize {
    /// Keep the aspect ratio, pad to the input size, centred.
    Letterbox,
    /// Resize both axes to the input size.
    Stretch,
}

/// Normalisation constants, one per channel (or one for all).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Normalise {
    /// Multiplier applied to 0-255 values first.
    pub scale: f32,
    /// Per-channel mean.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation.
    pub std: Vec<f32>,
}

/// Output tensor names.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Outputs {
    /// Pre-softmax scores, when the graph exposes them.
    pub logits: Option<String>,
    /// Class probabilities (image) or outcome probabilities (tabular).
    pub probabilities: Option<String>,
    /// Tabular: alias of `probabilities`.
    pub probability: Option<String>,
    /// Tabular: index of the positive class in the probability output.
    pub positive_index: Option<usize>,
}

/// A label with its coding.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Label {
    /// Short key used in APIs (`covid`).
    pub key: String,
    /// Display text.
    pub display: String,
    /// Code system URI.
    pub system: String,
    /// Code.
    pub code: String,
}

/// Decision rule.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// `argmax` (default).
    #[serde(default)]
    pub rule: DecisionRule,
}

/// How the winning label is picked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DecisionRule {
    /// Highest probability wins.
    #[default]
    Argmax,
}

/// Grad-CAM settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GradCamSettings {
    /// Target tensor; auto-detected when absent.
    pub target: Option<String>,
    /// Layout of the target tensor (default NCHW).
    #[serde(default)]
    pub layout: Layout,
}

/// Provenance of the model.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Provenance {
    /// Training data summary.
    #[serde(default)]
    pub training_data: String,
    /// Model card file, relative to the manifest.
    #[serde(default)]
    pub card: Option<String>,
    /// Training script.
    #[serde(default)]
    pub trained_by: Option<String>,
    /// Metrics on held-out data.
    #[serde(default)]
    pub metrics: BTreeMap<String, toml::Value>,
    /// Anything else.
    #[serde(flatten)]
    pub extra: BTreeMap<String, toml::Value>,
}

/// A manifest that could not be used, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct ManifestError {
    /// The manifest file.
    pub path: PathBuf,
    /// What is wrong.
    pub message: String,
}

impl Manifest {
    /// Reads and checks `model.toml`.
    ///
    /// # Errors
    /// When the file cannot be read, is not valid TOML for this schema, or is inconsistent.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let err = |message: String| ManifestError {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let mut manifest: Manifest = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        if manifest.task == Task::ImageClassification {
            let table = manifest
                .input_table
                .clone()
                .ok_or_else(|| err("image models need an [input] table".into()))?;
            manifest.input = Some(
                table
                    .try_into()
                    .map_err(|e: toml::de::Error| err(format!("[input]: {e}")))?,
            );
        }
        manifest.check().map_err(err)?;
        Ok(manifest)
    }

    fn check(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("`name` is empty".into());
        }
        if self.task != Task::ImageClassification {
            return Ok(());
        }
        let input = self
            .input
            .as_ref()
            .ok_or("image models need an [input] table")?;
        input.check()?;
        if self.labels.len() < 2 {
            return Err("image models need at least two [[labels]]".into());
        }
        if self.output.probabilities.is_none() && self.output.logits.is_none() {
            return Err("[output] needs `probabilities` or `logits`".into());
        }
        self.backend.check()
    }

    /// The ONNX file path, resolved against the manifest's folder.
    pub fn model_path(&self, dir: &Path) -> PathBuf {
        dir.join(&self.file)
    }
}

impl BackendSettings {
    fn check(&self) -> Result<(), String> {
        if self.kind == BackendKind::Local {
            return match self.url {
                Some(_) => Err("[backend] url is only for kind = \"kserve-v2\"".into()),
                None => Ok(()),
            };
        }
        let url = self
            .url
            .as_deref()
            .ok_or("[backend] kind = \"kserve-v2\" needs `url`")?;
        match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
            _ => Err(format!("[backend] url '{url}' is not an http(s) URL")),
        }
    }
}

impl ImageInput {
    fn check(&self) -> Result<(), String> {
        if self.shape.len() != 4 {
            return Err(format!(
                "input.shape must have 4 dimensions, got {:?}",
                self.shape
            ));
        }
        let (c, h, w) = self.chw();
        if h <= 0 || w <= 0 {
            return Err(format!(
                "input.shape {:?} has no fixed height/width",
                self.shape
            ));
        }
        let want = match self.colour {
            Colour::Grayscale => 1,
            Colour::Rgb => 3,
        };
        if c != want {
            return Err(format!(
                "input.colour {:?} needs {want} channel(s), shape has {c}",
                self.colour
            ));
        }
        let n = self.normalise.mean.len();
        if !(n == 1 || n == want as usize) || self.normalise.std.len() != n {
            return Err("input.normalise mean/std need 1 or one value per channel".into());
        }
        if self.normalise.std.contains(&0.0) {
            return Err("input.normalise.std contains 0".into());
        }
        Ok(())
    }

    /// (channels, height, width) from the shape and layout.
    pub fn chw(&self) -> (i64, i64, i64) {
        let s = &self.shape;
        match self.layout {
            Layout::NCHW => (s[1], s[2], s[3]),
            Layout::NHWC => (s[3], s[1], s[2]),
        }
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        match self.colour {
            Colour::Grayscale => 1,
            Colour::Rgb => 3,
        }
    }

    /// Height and width in pixels.
    pub fn size(&self) -> (u32, u32) {
        let (_, h, w) = self.chw();
        (h as u32, w as u32)
    }
}
