//! The image analysis use case, shared by `carina predict` and the HTTP routes:
//! decode → preprocess → infer (batched engine) → Grad-CAM → overlay PNG → FHIR bundle.
//! CPU stages run off the async runtime in the caller's lane ([`super::cpu`]); each stage's duration is recorded for `Server-Timing`.
//! An uploaded PNG or JPEG is kept as it came (never re-encoded); only a DICOM frame is encoded
//! to PNG for viewing.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use image::DynamicImage;
use serde_json::Value;
use uuid::Uuid;

use crate::imaging::{self, DecodeError, DecodedImage, DicomMeta, MediaType};
use crate::inference::engine::EngineError;
use crate::inference::gradcam::CamMethod;
use crate::inference::preprocess::{Geometry, InputTensor};
use crate::inference::{ImageModel, Prediction};
use crate::render::overlay;
use crate::report::{self, ReportInput};

/// Weight of the heat colour in the overlay.
pub const OVERLAY_ALPHA: f32 = 0.45;

/// A finished analysis.
pub struct Analysis {
    /// Id (also the DiagnosticReport id).
    pub id: Uuid,
    /// Finish time.
    pub created: DateTime<Utc>,
    /// The model used.
    pub model: Arc<ImageModel>,
    /// Probabilities, winner, input tensor, map.
    pub prediction: Prediction,
    /// The input as an image file: the uploaded PNG or JPEG bytes themselves, or a PNG of the
    /// decoded DICOM frame.
    pub input_image: bytes::Bytes,
    /// The overlay PNG, when a map was made.
    pub overlay_png: Option<bytes::Bytes>,
    /// The overlay's pixels (for a DICOM result made from it: never decoded back from PNG).
    pub overlay: Option<image::RgbImage>,
    /// The FHIR Bundle.
    pub bundle: Value,
    /// DICOM identifiers when the input was DICOM.
    pub dicom: Option<DicomMeta>,
    /// Stage durations in ms.
    pub timings: Vec<(&'static str, f64)>,
}

impl Analysis {
    /// Key of the winning label.
    pub fn label_key(&self) -> &str {
        &self.model.labels()[self.prediction.class].key
    }

    /// Display text of the winning label.
    pub fn label_display(&self) -> &str {
        &self.model.labels()[self.prediction.class].display
    }

    /// Heatmap method actually used.
    pub fn cam_method(&self) -> CamMethod {
        self.prediction
            .cam
            .as_ref()
            .map_or(CamMethod::None, |c| c.method)
    }

    /// What the store keeps of it.
    pub fn record(&self) -> crate::store::NewAnalysis<'_> {
        crate::store::NewAnalysis {
            id: self.id,
            created: self.created,
            model: (&self.model.manifest.name, &self.model.manifest.version),
            label: (self.label_key(), self.label_display()),
            probabilities: serde_json::Value::Object(self.probabilities_json()),
            cam_method: self.cam_method().as_str(),
            bundle: &self.bundle,
            input_image: self.input_image.clone(),
            overlay_png: self.overlay_png.clone(),
        }
    }

    /// `{label key: probability}`.
    pub fn probabilities_json(&self) -> serde_json::Map<String, Value> {
        self.model
            .labels()
            .iter()
            .zip(&self.prediction.probabilities)
            .map(|(l, p)| (l.key.clone(), Value::from(f64::from(*p))))
            .collect()
    }

    /// `Server-Timing` header value.
    pub fn server_timing(&self) -> String {
        server_timing(&self.timings)
    }
}

/// Formats stage durations (ms) as a `Server-Timing` header value.
pub fn server_timing(timings: &[(&'static str, f64)]) -> String {
    let parts: Vec<String> = timings
        .iter()
        .map(|(k, v)| format!("{k};dur={v:.2}"))
        .collect();
    parts.join(", ")
}

/// Why an analysis failed.
#[derive(Debug, thiserror::Error)]
pub enum AnalyseError {
    /// The input is not a decodable image (client error).
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Inference failed (server error).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Report generation failed (server error).
    #[error(transparent)]
    Report(#[from] report::fhir::ReportError),
    /// A background task died.
    #[error("internal task failed: {0}")]
    Task(String),
}

/// Runs CPU pixel work `f` off the runtime, in the calling task's lane (see [`super::cpu`]).
async fn cpu<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, AnalyseError> {
    super::cpu::run(f)
        .await
        .map_err(|e| AnalyseError::Task(e.to_string()))
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

type Timings = Vec<(&'static str, f64)>;

/// Decodes frame `frame` of `bytes` and builds the model input (CPU work), timing both stages.
fn prepare(
    model: &ImageModel,
    bytes: &[u8],
    media: MediaType,
    frame: u32,
) -> Result<(DecodedImage, InputTensor, Timings), AnalyseError> {
    let t = Instant::now();
    let decoded = imaging::decode_frame(bytes, media, frame)?;
    let decode_ms = ms(t);
    let t = Instant::now();
    let input = model.prepare(&decoded.image)?;
    Ok((
        decoded,
        input,
        vec![("decode", decode_ms), ("preprocess", ms(t))],
    ))
}

/// [`prepare`] on the blocking pool.
async fn prepare_off_runtime(
    model: Arc<ImageModel>,
    bytes: bytes::Bytes,
    media: MediaType,
    frame: u32,
) -> Result<(DecodedImage, InputTensor, Timings), AnalyseError> {
    cpu(move || prepare(&model, &bytes, media, frame)).await?
}

/// Runs the whole pipeline on `bytes`. `overlay_url` maps the analysis id to the URL where the
/// overlay will be served (written into the Media resource).
///
/// # Errors
/// [`AnalyseError::Decode`] for bad input, the other variants for server-side failures.
pub async fn analyse(
    model: Arc<ImageModel>,
    bytes: bytes::Bytes,
    media: MediaType,
    overlay_url: impl Fn(&Uuid) -> Option<String> + Send + 'static,
) -> Result<Analysis, AnalyseError> {
    analyse_with(model, bytes, media, Uuid::new_v4(), 0, overlay_url).await
}

/// [`analyse`] with a given analysis id (stable ids make re-runs idempotent) and frame
/// (0-based, for multi-frame DICOM).
///
/// # Errors
/// As [`analyse`].
pub async fn analyse_with(
    model: Arc<ImageModel>,
    bytes: bytes::Bytes,
    media: MediaType,
    id: Uuid,
    frame: u32,
    overlay_url: impl Fn(&Uuid) -> Option<String> + Send + 'static,
) -> Result<Analysis, AnalyseError> {
    let t0 = Instant::now();
    let original = (media != MediaType::Dicom).then(|| bytes.clone());
    let (decoded, input, mut timings) =
        prepare_off_runtime(model.clone(), bytes, media, frame).await?;
    let t = Instant::now();
    let outputs = model.infer(&input).await?;
    timings.push(("infer", ms(t)));
    let m = model.clone();
    let mut analysis = cpu(move || {
        finish(
            id,
            m,
            (decoded.image, original),
            decoded.dicom,
            input,
            &outputs,
            &overlay_url,
            timings,
        )
    })
    .await??;
    analysis.timings.push(("total", ms(t0)));
    Ok(analysis)
}

/// Classification only (no heatmap, no report): probabilities in label order, the winner, and
/// stage durations in ms.
///
/// # Errors
/// As [`analyse`].
pub async fn classify(
    model: Arc<ImageModel>,
    bytes: bytes::Bytes,
    media: MediaType,
) -> Result<(Vec<f32>, usize, Vec<(&'static str, f64)>), AnalyseError> {
    let t0 = Instant::now();
    let (_, input, mut timings) = prepare_off_runtime(model.clone(), bytes, media, 0).await?;
    let t = Instant::now();
    let outputs = model.infer(&input).await?;
    timings.push(("infer", ms(t)));
    let (p, class) = model.classify(&outputs)?;
    timings.push(("total", ms(t0)));
    Ok((p, class, timings))
}

/// The same pipeline for callers outside the async runtime (the CLI's worker threads).
///
/// # Errors
/// As [`analyse`].
pub fn analyse_blocking(
    model: &Arc<ImageModel>,
    bytes: &[u8],
    media: MediaType,
    overlay_url: &dyn Fn(&Uuid) -> Option<String>,
) -> Result<Analysis, AnalyseError> {
    let t0 = Instant::now();
    let (decoded, input, timings) = prepare(model, bytes, media, 0)?;
    let outputs = model.infer_blocking(&input)?;
    let original = (media != MediaType::Dicom).then(|| bytes::Bytes::copy_from_slice(bytes));
    let mut a = finish(
        Uuid::new_v4(),
        model.clone(),
        (decoded.image, original),
        decoded.dicom,
        input,
        &outputs,
        overlay_url,
        timings,
    )?;
    a.timings.push(("total", ms(t0)));
    Ok(a)
}

#[allow(clippy::too_many_arguments)]
fn finish(
    id: Uuid,
    model: Arc<ImageModel>,
    (image, original): (DynamicImage, Option<bytes::Bytes>),
    dicom: Option<DicomMeta>,
    input: crate::inference::preprocess::InputTensor,
    outputs: &crate::inference::engine::Outputs,
    overlay_url: &dyn Fn(&Uuid) -> Option<String>,
    mut timings: Vec<(&'static str, f64)>,
) -> Result<Analysis, AnalyseError> {
    let t = Instant::now();
    let geometry: Geometry = input.geometry;
    let prediction = model.interpret(input, outputs)?;
    timings.push(("gradcam", ms(t)));
    crate::metrics::global().observe_gradcam(&model.manifest.name, t.elapsed().as_secs_f64());
    let t = Instant::now();
    let (overlay_png, overlay_rgb) = match &prediction.cam {
        Some(cam) => {
            let blended =
                DynamicImage::ImageRgb8(overlay::render(cam, &geometry, &image, OVERLAY_ALPHA));
            let png =
                overlay::encode_png(&blended).map_err(|e| AnalyseError::Task(e.to_string()))?;
            (Some(bytes::Bytes::from(png)), Some(blended.into_rgb8()))
        }
        None => (None, None),
    };
    timings.push(("overlay", ms(t)));
    let input_image = match original {
        Some(file) => file,
        None => {
            let t = Instant::now();
            let png = overlay::encode_png(&image).map_err(|e| AnalyseError::Task(e.to_string()))?;
            timings.push(("input_png", ms(t)));
            bytes::Bytes::from(png)
        }
    };
    let t = Instant::now();
    let created = Utc::now();
    let method = prediction
        .cam
        .as_ref()
        .map_or(CamMethod::None, |c| c.method);
    let url = overlay_url(&id);
    let bundle = report::analysis_bundle(&ReportInput {
        id,
        issued: created,
        model: (&model.manifest.name, &model.manifest.version),
        labels: model.labels(),
        probabilities: &prediction.probabilities,
        class: prediction.class,
        cam_method: method.as_str(),
        overlay_png: overlay_png.as_deref().map(|p| (p, url)),
        dicom: dicom.as_ref(),
    })?;
    timings.push(("report", ms(t)));
    Ok(Analysis {
        id,
        created,
        model,
        prediction,
        input_image,
        overlay_png,
        overlay: overlay_rgb,
        bundle,
        dicom,
        timings,
    })
}
