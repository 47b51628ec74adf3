//! WADO-RS retrieve (PS3.18 §10.4) of DICOM instances from a study's DICOMweb Endpoint,
//! through the one outbound client: its allow-list and address guard decide whether the
//! Endpoint may be called at all, its size cap bounds the answer.

use bytes::Bytes;

use super::{Outbound, OutboundError};

/// How long one WADO-RS retrieve may take, whole body included.
const WADO_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

/// Why a retrieve gave no instances.
#[derive(Debug, thiserror::Error)]
pub enum WadoError {
    /// The Endpoint's address does not parse.
    #[error("the Endpoint address is not a URL")]
    NotUrl,
    /// The Endpoint's address has a query or fragment (a path is appended to it).
    #[error("the Endpoint address has a query or fragment; not fetched")]
    QueryOrFragment,
    /// The call was refused or failed (allow-list, guard, network, size cap).
    #[error("WADO-RS not fetched: {0}")]
    Outbound(#[from] OutboundError),
    /// The server answered an error status.
    #[error("WADO-RS {url} answered {status}")]
    Status {
        /// The URL, credentials and query redacted.
        url: String,
        /// HTTP status.
        status: u16,
    },
    /// The answer is not `multipart/related` with a boundary.
    #[error("WADO-RS answered something other than multipart/related with a boundary")]
    NotMultipart,
    /// The multipart body does not parse.
    #[error("WADO-RS answer: malformed multipart")]
    Malformed,
}

/// Retrieves `{base}{path}` (`/studies/{study}[/series/{series}/instances/{sop}]`) as
/// `multipart/related; type="application/dicom"` and returns its parts.
///
/// # Errors
/// [`WadoError`].
pub async fn retrieve(
    outbound: &Outbound,
    base: &str,
    path: &str,
) -> Result<Vec<Bytes>, WadoError> {
    let base_url = reqwest::Url::parse(base).map_err(|_| WadoError::NotUrl)?;
    if base_url.query().is_some() || base_url.fragment().is_some() {
        return Err(WadoError::QueryOrFragment);
    }
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let answer = outbound
        .get(
            &url,
            &[("accept", "multipart/related; type=\"application/dicom\"")],
            WADO_DEADLINE,
        )
        .await?;
    if !answer.status.is_success() {
        let shown = reqwest::Url::parse(&url)
            .map_or_else(|_| base.to_string(), |u| super::guard::redact(&u));
        return Err(WadoError::Status {
            url: shown,
            status: answer.status.as_u16(),
        });
    }
    let ct = answer.header("content-type").unwrap_or("").to_string();
    let (essence, params) = crate::dicom::media_params(&ct);
    let boundary = match (essence.as_str(), params.get("boundary")) {
        ("multipart/related", Some(b)) => b.clone(),
        _ => return Err(WadoError::NotMultipart),
    };
    let body = answer.body;
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let mut parts = multer::Multipart::new(stream, boundary);
    let mut out = Vec::new();
    while let Some(part) = parts.next_field().await.map_err(|_| WadoError::Malformed)? {
        out.push(part.bytes().await.map_err(|_| WadoError::Malformed)?);
    }
    Ok(out)
}
