//! The 2020 demo's API, drop-in: `/covid19/api/v1/...` with the form field `b64` (urlencoded or
//! multipart), the demo's JSON keys (typo `Classfication` included) and label names, and the
//! `/static/source|result/...` URLs it links to (served from stored results).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Form, Json};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::base_url;
use super::doc::{Binary, LegacyProblem};
use super::error::{ApiError, LegacyError};
use crate::analysis::pipeline::{self, Analysis};
use crate::app::AppState;
use crate::imaging::MediaType;
use crate::inference::ImageModel;

/// The demo's form: field `b64` holds a base64-encoded PNG or JPEG file (urlencoded or
/// multipart).
#[derive(ToSchema)]
pub struct LegacyForm {
    /// Base64 of a PNG or JPEG file.
    pub b64: String,
}

/// The demo's classification answer (its key spellings kept).
#[derive(Serialize, ToSchema)]
pub struct LegacyPrediction {
    /// The model's name.
    pub model_name: String,
    /// Predicted label, in the demo's words.
    #[serde(rename = "X-Ray_Classification_Result")]
    pub result: String,
    /// Raw probabilities `[[p0, p1, p2]]` (key spelling `Classfication` kept from the 2020 API).
    #[serde(rename = "X-Ray_Classfication_Raw_Result")]
    pub raw: Vec<Vec<f64>>,
}

/// The demo's heatmap answer: the classification, the COVID-19 probability and where the
/// input and heatmap images are.
#[derive(Serialize, ToSchema)]
pub struct LegacyHeatmapPrediction {
    /// The classification.
    #[serde(flatten)]
    pub prediction: LegacyPrediction,
    /// COVID-19 probability, rounded to two decimals.
    #[serde(rename = "X-Ray_Classification_Covid19_Probability")]
    pub covid19_probability: f64,
    /// URL under `/static/source/`.
    #[serde(rename = "Input_Image")]
    pub input_image: String,
    /// URL under `/static/result/`.
    #[serde(rename = "Output_Heatmap")]
    pub output_heatmap: String,
}

const COVID: &str = "840539006";
const PNEUMONIA: &str = "233604007";
const NORMAL: &str = "281900007";

/// `GET /covid19/api/v1/healthcheck`.
#[utoipa::path(get, path = "/covid19/api/v1/healthcheck", tag = "legacy covid19 demo", operation_id = "legacyHealthcheck",
    summary = "Legacy health check",
    description = "2020 demo API. Returns a JSON string.",
    responses((status = 200, description = "Live.", body = String, content_type = "application/json"))
)]
pub async fn healthcheck() -> Json<&'static str> {
    Json("Covid19 detector API is live!\n\n")
}

/// Reads field `b64` from an urlencoded or multipart form and decodes it.
async fn b64_field(req: Request) -> Result<Bytes, LegacyError> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let text: Vec<u8> = if ct.starts_with("multipart/form-data") {
        let mut mp = Multipart::from_request(req, &())
            .await
            .map_err(|e| LegacyError(e.status(), e.body_text()))?;
        let mut found = None;
        while let Some(field) = mp
            .next_field()
            .await
            .map_err(|e| LegacyError(e.status(), e.body_text()))?
        {
            if field.name() == Some("b64") {
                found = Some(
                    field
                        .bytes()
                        .await
                        .map_err(|e| LegacyError(e.status(), e.body_text()))?
                        .to_vec(),
                );
                break;
            }
        }
        found.ok_or_else(|| {
            LegacyError(StatusCode::BAD_REQUEST, "missing form field 'b64'".into())
        })?
    } else {
        let Form(mut map) = Form::<HashMap<String, String>>::from_request(req, &())
            .await
            .map_err(|e| LegacyError(e.status(), e.body_text()))?;
        map.remove("b64")
            .ok_or_else(|| LegacyError(StatusCode::BAD_REQUEST, "missing form field 'b64'".into()))?
            .into_bytes()
    };
    decode_b64(&text).map(Bytes::from).ok_or_else(|| {
        LegacyError(
            StatusCode::BAD_REQUEST,
            "field b64 is not valid base64".into(),
        )
    })
}

/// Lenient base64: whitespace ignored, padding optional, standard or URL-safe alphabet.
pub fn decode_b64(text: &[u8]) -> Option<Vec<u8>> {
    // the copy without whitespace only when there is some (a radiograph is ~1 MB of text)
    let clean: std::borrow::Cow<'_, [u8]> = if text.iter().any(u8::is_ascii_whitespace) {
        text.iter()
            .copied()
            .filter(|c| !c.is_ascii_whitespace())
            .collect::<Vec<u8>>()
            .into()
    } else {
        text.into()
    };
    if clean.is_empty() {
        return None;
    }
    let e = &base64::engine::general_purpose::STANDARD;
    e.decode(&clean)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(&clean))
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(&clean))
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&clean))
        .ok()
}

fn model(state: &AppState) -> Result<std::sync::Arc<ImageModel>, LegacyError> {
    state.models.image_model(None).cloned().ok_or_else(|| {
        LegacyError(
            StatusCode::SERVICE_UNAVAILABLE,
            "no image model loaded".into(),
        )
    })
}

fn media(bytes: &[u8]) -> Result<MediaType, LegacyError> {
    MediaType::sniff(bytes).ok_or_else(|| {
        LegacyError(
            StatusCode::BAD_REQUEST,
            "b64 does not hold a PNG, JPEG or DICOM file".into(),
        )
    })
}

/// The demo's label names, by SNOMED code.
fn legacy_label(model: &ImageModel, class: usize) -> String {
    let l = &model.labels()[class];
    match l.code.as_str() {
        COVID => "Covid19".into(),
        NORMAL => "Normal_Lung".into(),
        PNEUMONIA => "Pneumonia_Bacterial_Lung".into(),
        _ => l.display.clone(),
    }
}

fn index_of(model: &ImageModel, code: &str) -> Option<usize> {
    model.labels().iter().position(|l| l.code == code)
}

async fn run(state: &AppState, req: Request) -> Result<(Analysis, HeaderMap), LegacyError> {
    let headers = req.headers().clone();
    let bytes = b64_field(req).await?;
    let media = media(&bytes)?;
    let model = model(state)?;
    let base = base_url(state, &headers);
    let a = pipeline::analyse(model, bytes, media, move |id| {
        Some(format!("{base}/v1/results/{id}/overlay.png"))
    })
    .await
    .map_err(|e| LegacyError::from(ApiError::from(e)))?;
    Ok((a, headers))
}

fn raw(a: &Analysis) -> Vec<Vec<f64>> {
    vec![a
        .prediction
        .probabilities
        .iter()
        .map(|p| f64::from(*p))
        .collect()]
}

fn timed(a: &Analysis, body: impl Serialize) -> Response {
    ([("server-timing", a.server_timing())], Json(body)).into_response()
}

/// `POST /covid19/api/v1/predict/`: class and raw probabilities.
#[utoipa::path(post, path = "/covid19/api/v1/predict/", tag = "legacy covid19 demo", operation_id = "legacyPredict",
    summary = "Legacy classification",
    description = "2020 demo API: classify a base64-encoded PNG/JPEG sent in form field `b64`.",
    request_body(content((LegacyForm = "application/x-www-form-urlencoded"), (LegacyForm = "multipart/form-data")), description = "Form with a field `b64` holding a base64-encoded PNG/JPEG file."),
    responses((status = 200, description = "Classification.", body = LegacyPrediction, content_type = "application/json"), (status = 400, response = LegacyProblem), (status = 413, response = LegacyProblem), (status = 503, response = LegacyProblem)))]
pub async fn predict(State(state): State<AppState>, req: Request) -> Result<Response, LegacyError> {
    let bytes = b64_field(req).await?;
    let media = media(&bytes)?;
    let model = model(&state)?;
    let (p, class, timings) = pipeline::classify(model.clone(), bytes, media)
        .await
        .map_err(|e| LegacyError::from(ApiError::from(e)))?;
    let body = LegacyPrediction {
        model_name: model.manifest.name.clone(),
        result: legacy_label(&model, class),
        raw: vec![p.iter().map(|v| f64::from(*v)).collect()],
    };
    let timing = pipeline::server_timing(&timings);
    Ok(([("server-timing", timing)], Json(body)).into_response())
}

/// `POST /covid19/api/v1/predict/heatmap`: the demo's wording, plus URLs of the stored input and
/// heatmap overlay.
#[utoipa::path(post, path = "/covid19/api/v1/predict/heatmap", tag = "legacy covid19 demo", operation_id = "legacyPredictHeatmap",
    summary = "Legacy classification with heatmap",
    description = "2020 demo API: like `/predict/`, plus the COVID-19 probability and URLs of the input image and heatmap under `/static/`.",
    request_body(content((LegacyForm = "application/x-www-form-urlencoded"), (LegacyForm = "multipart/form-data")), description = "Form with a field `b64` holding a base64-encoded PNG/JPEG file."),
    responses((status = 200, description = "Classification with heatmap URLs.", body = LegacyHeatmapPrediction, content_type = "application/json"), (status = 400, response = LegacyProblem), (status = 413, response = LegacyProblem), (status = 503, response = LegacyProblem)))]
pub async fn predict_heatmap(
    State(state): State<AppState>,
    req: Request,
) -> Result<Response, LegacyError> {
    let (a, headers) = run(&state, req).await?;
    state
        .store
        .save_analysis(&a.record(), "legacy")
        .await
        .map_err(|e| LegacyError::from(ApiError::from(e)))?;
    let body = LegacyHeatmapPrediction::of(&a, &base_url(&state, &headers));
    Ok(timed(&a, body))
}

impl LegacyHeatmapPrediction {
    /// The demo's verdict on an analysis (COVID-19 positive above 65 %), with the URLs of its
    /// images under `base`.
    fn of(a: &Analysis, base: &str) -> Self {
        let p = &a.prediction.probabilities;
        let covid = index_of(&a.model, COVID);
        let pos = covid.map_or(0, |i| (p[i] * 100.0).round() as i64);
        let (text, prefix) = if Some(a.prediction.class) == covid && pos > 65 {
            ("Covid-19 POSITIVE", "Covid19")
        } else if Some(a.prediction.class) == index_of(&a.model, PNEUMONIA) {
            let text = "Covid-19 Negative; Bacterial Penumonia Positive";
            (text, "BacPenumonia")
        } else {
            ("Covid-19 Negative; Bacterial Penumonia Negative", "Normal")
        };
        LegacyHeatmapPrediction {
            prediction: LegacyPrediction {
                model_name: a.model.manifest.name.clone(),
                result: text.to_string(),
                raw: raw(a),
            },
            covid19_probability: pos as f64 / 100.0,
            input_image: format!("{base}/static/source/{}.png", a.id),
            output_heatmap: format!("{base}/static/result/{prefix}_{pos}_{}_png.png", a.id),
        }
    }
}

/// A file under `/static/...` in the URL.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct LegacyFile {
    /// File name, e.g. `<id>.png`.
    pub file: String,
}

fn id_in(file: &str) -> Option<Uuid> {
    let stem = file.strip_suffix(".png")?;
    stem.split('_').find_map(|part| Uuid::parse_str(part).ok())
}

async fn legacy_blob(
    state: &AppState,
    file: &str,
    name: &'static str,
) -> Result<Response, LegacyError> {
    let not_found = || LegacyError(StatusCode::NOT_FOUND, "Not Found".into());
    let id = id_in(file).ok_or_else(not_found)?;
    let data = state
        .store
        .analysis_blob(&id, name)
        .await
        .map_err(|e| LegacyError::from(ApiError::from(e)))?
        .ok_or_else(not_found)?;
    // the input is kept as uploaded (PNG or JPEG): its bytes say which
    let content_type = MediaType::sniff(&data).map_or("image/png", MediaType::as_str);
    Ok(([(header::CONTENT_TYPE, content_type)], data).into_response())
}

/// `GET /static/source/{file}`: the input of a heatmap request, as uploaded.
#[utoipa::path(get, path = "/static/source/{file}", tag = "legacy covid19 demo", operation_id = "legacyStaticSource",
    summary = "Legacy input image",
    description = "The image the legacy input image (`Input_Image`) URL names, as it was uploaded (PNG or JPEG; Content-Type says which).",
    params(LegacyFile),
    responses((status = 200, description = "The image as uploaded.", content((Binary = "image/png"), (Binary = "image/jpeg"))), (status = 404, response = LegacyProblem))
)]
pub async fn source_image(
    State(state): State<AppState>,
    Path(LegacyFile { file }): Path<LegacyFile>,
) -> Result<Response, LegacyError> {
    legacy_blob(&state, &file, "input.png").await
}

/// `GET /static/result/{file}`: the heatmap overlay of a heatmap request.
#[utoipa::path(get, path = "/static/result/{file}", tag = "legacy covid19 demo", operation_id = "legacyStaticResult",
    summary = "Legacy heatmap",
    description = "PNG referenced by the legacy heatmap (`Output_Heatmap`) URL.",
    params(LegacyFile),
    responses((status = 200, description = "PNG image.", body = Binary, content_type = "image/png"), (status = 404, response = LegacyProblem)))]
pub async fn result_image(
    s: State<AppState>,
    Path(p): Path<LegacyFile>,
) -> Result<Response, LegacyError> {
    legacy_blob(&s, &p.file, "overlay.png").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_lenient_like_the_demo() {
        assert_eq!(decode_b64(b"aGVs\nbG8=").as_deref(), Some(&b"hello"[..]));
        assert_eq!(decode_b64(b"aGVsbG8").as_deref(), Some(&b"hello"[..]));
        assert_eq!(decode_b64(b"!!!"), None);
        assert_eq!(decode_b64(b""), None);
    }

    #[test]
    fn finds_the_id_in_legacy_file_names() {
        let id = Uuid::new_v4();
        assert_eq!(id_in(&format!("Covid19_93_{id}_png.png")), Some(id));
        assert_eq!(id_in(&format!("{id}.png")), Some(id));
        assert_eq!(id_in("../../etc/passwd"), None);
    }
}
