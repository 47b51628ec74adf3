//! The authorization layer every route passes through: it works out what the route needs
//! ([`need`]: open, a token, a FHIR interaction, the operator scope), verifies the bearer token
//! ([`crate::auth::Authorizer`]), answers 401/403 with `WWW-Authenticate` and an
//! OperationOutcome, and hands the [`Access`] to the handlers, which check FHIR interactions
//! per entry and the patient compartment. Unknown routes need the operator scope: deny by
//! default. Also `/.well-known/smart-configuration`.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::error::ApiError;
use crate::app::AppState;
use crate::audit::Actor;
use crate::auth::{Access, AuthError, Interaction};

mod audit;

/// What a route needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// Nothing: health, readiness, the page and the docs, discovery.
    Open,
    /// Any verified token (`/v1/models`).
    Token,
    /// A FHIR interaction on a type, for the whole type (DICOMweb and `/v1`: no compartment).
    Whole(&'static str, Interaction),
    /// A FHIR interaction on a type; the handler applies the compartment of patient tokens.
    Fhir(String, Interaction),
    /// `POST /fhir`: the handler checks each entry.
    Entries,
    /// The operator scope (jobs, exports, metrics, anything not listed).
    Operator,
    /// The 2020 demo API (no tokens; off unless `auth.legacy_api`).
    Legacy,
}

/// What `method path` needs.
pub fn need(method: &Method, path: &str) -> Need {
    use Interaction::{Create, Read, Search, Update};
    let seg: Vec<&str> = path.trim_matches('/').split('/').collect();
    let get = method == Method::GET || method == Method::HEAD;
    match seg.as_slice() {
        [""] | ["docs"] | ["docs", _] | ["openapi.json"] | ["healthz"] | ["readyz"] => Need::Open,
        [".well-known", "smart-configuration"]
        | ["fhir", ".well-known", "smart-configuration"]
        | ["fhir", "metadata"] => Need::Open,
        // the audit trail: operators only (and read-only for everyone)
        ["fhir", "AuditEvent", ..] => Need::Operator,
        ["covid19", ..] | ["static", ..] => Need::Legacy,
        ["v1", "models"] => Need::Token,
        ["v1", "analyze"] => Need::Whole("DiagnosticReport", Create),
        ["v1", "results", ..] => Need::Whole("DiagnosticReport", Read),
        ["v1", "instances", ..] | ["v1", "studies", ..] => Need::Whole("ImagingStudy", Read),
        ["dicomweb", ..] if !get => Need::Whole("ImagingStudy", Create),
        ["dicomweb", .., "studies" | "series" | "instances"] => Need::Whole("ImagingStudy", Search),
        ["dicomweb", ..] => Need::Whole("ImagingStudy", Read),
        ["fhir"] if method == Method::POST => Need::Entries,
        ["fhir", "_async", _] => Need::Fhir("DiagnosticReport".into(), Read),
        ["fhir", t] if get => Need::Fhir((*t).into(), Search),
        ["fhir", t] if method == Method::POST => Need::Fhir((*t).into(), Create),
        ["fhir", t, op] if method == Method::POST && op.starts_with('$') => {
            // $predict stores a RiskAssessment
            Need::Fhir((*t).into(), Create)
        }
        ["fhir", t, _] if method == Method::PUT => Need::Fhir((*t).into(), Update),
        ["fhir", t, _] | ["fhir", t, _, "_history", _] if get => Need::Fhir((*t).into(), Read),
        _ => Need::Operator,
    }
}

/// The middleware: verifies the token the route needs, puts the [`Access`] into the
/// request's extensions, runs the request as its [`Actor`] (so the store audits changes in
/// their transaction), then audits reads and refusals.
pub async fn authorize(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let need = need(req.method(), req.uri().path());
    let address = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let anonymous = Actor {
        who: "anonymous".into(),
        client_id: None,
        address: address.clone(),
        system: false,
    };
    let (method, path) = (req.method().clone(), req.uri().clone());
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, t) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| t.trim().to_string())
        });
    let (access, actor) = match check(&state, &need, token).await {
        Ok(Some(p)) => {
            let actor = Actor {
                who: p.subject.clone(),
                client_id: p.client_id.clone(),
                address,
                system: false,
            };
            (Access::Token(std::sync::Arc::new(p)), actor)
        }
        Ok(None) => (Access::Open, anonymous),
        Err(e) => {
            let r = refused(&e);
            audit::after(&state, &anonymous, &method, &path, r.status()).await;
            return r;
        }
    };
    let mut req = req;
    req.extensions_mut().insert(access);
    let r = crate::audit::ACTOR
        .scope(actor.clone(), next.run(req))
        .await;
    if need != Need::Open {
        audit::after(&state, &actor, &method, &path, r.status()).await;
    }
    r
}

/// What the request may do: `None` when it needs no token (authorization off, an open route,
/// the legacy API when kept), the verified principal otherwise.
async fn check(
    state: &AppState,
    need: &Need,
    token: Option<String>,
) -> Result<Option<crate::auth::Principal>, AuthError> {
    let Some(auth) = state.auth.clone() else {
        return Ok(None);
    };
    match need {
        Need::Open => return Ok(None),
        Need::Legacy if auth.legacy_api => return Ok(None),
        Need::Legacy => {
            return Err(AuthError::Forbidden(
                "the 2020 demo API is off while authorization is on (its clients cannot send tokens; set auth.legacy_api = true to keep it)".into(),
            ))
        }
        _ => {}
    }
    let Some(token) = token else {
        return Err(AuthError::InvalidToken(String::new()));
    };
    let principal = auth.verify(&token).await?;
    let access = Access::Token(std::sync::Arc::new(principal));
    match need {
        Need::Whole(t, i) => access.whole(t, *i)?,
        Need::Fhir(t, i) => access.fhir(t, *i).map(|_| ())?,
        Need::Operator => access.operator()?,
        Need::Token | Need::Entries | Need::Open | Need::Legacy => {}
    }
    match access {
        Access::Token(p) => Ok(Some((*p).clone())),
        Access::Open => Ok(None),
    }
}

/// 401 or 403 with `WWW-Authenticate` (RFC 6750) and an OperationOutcome.
pub fn refused(e: &AuthError) -> Response {
    let (status, code, challenge, text) = match e {
        AuthError::InvalidToken(m) if m.is_empty() => (
            StatusCode::UNAUTHORIZED,
            "login",
            "Bearer realm=\"carina\"".to_string(),
            "this request needs a bearer access token".to_string(),
        ),
        AuthError::InvalidToken(m) => (
            StatusCode::UNAUTHORIZED,
            "login",
            format!(
                "Bearer realm=\"carina\", error=\"invalid_token\", error_description=\"{}\"",
                m.replace('"', "'")
            ),
            m.clone(),
        ),
        AuthError::InsufficientScope(missing) => (
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "Bearer realm=\"carina\", error=\"insufficient_scope\", scope=\"{}\"",
                missing.token()
            ),
            e.to_string(),
        ),
        AuthError::Forbidden(m) => (
            StatusCode::FORBIDDEN,
            "forbidden",
            "Bearer realm=\"carina\", error=\"insufficient_scope\"".to_string(),
            m.clone(),
        ),
    };
    let mut r = ApiError::new(status, code, text).into_response();
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match &e {
            AuthError::InvalidToken(_) => {
                ApiError::new(StatusCode::UNAUTHORIZED, "login", e.to_string())
            }
            _ => ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string()),
        }
    }
}

/// The SMART configuration's description in the API docs.
const SMART_DOC: &str = "SMART App Launch 2.x discovery: issuer, token and authorization endpoints (from the issuer's OpenID discovery), supported scopes and capabilities. Open (no token). 404 when authorization is off.";

/// `GET /fhir/.well-known/smart-configuration`: the same document under the FHIR base, where
/// SMART clients look for it.
#[utoipa::path(get, path = "/fhir/.well-known/smart-configuration", tag = "ops", operation_id = "smartConfigurationFhir",
    summary = "SMART configuration (under the FHIR base)", description = SMART_DOC,
    responses((status = 200, description = "The SMART configuration.", body = serde_json::Value, content_type = "application/json"), (status = 404, description = "Authorization is off on this server.")))]
pub async fn fhir_smart_configuration(state: State<AppState>) -> Response {
    smart_configuration(state).await
}

/// `GET /.well-known/smart-configuration` (SMART App Launch 2.x): where to get tokens and
/// what Carina understands. 404 when authorization is off.
#[utoipa::path(get, path = "/.well-known/smart-configuration", tag = "ops", operation_id = "smartConfiguration",
    summary = "SMART configuration",
    description = SMART_DOC,
    responses(
        (status = 200, description = "The SMART configuration.", body = serde_json::Value, content_type = "application/json"),
        (status = 404, description = "Authorization is off on this server.")
    )
)]
pub async fn smart_configuration(State(state): State<AppState>) -> Response {
    let Some(auth) = state.auth.clone() else {
        return ApiError::not_found("authorization is off on this server").into_response();
    };
    let e = auth.endpoints().await;
    Json(smart_document(auth.issuer(), e)).into_response()
}

/// The SMART configuration document: `issuer`'s endpoints and what Carina supports.
fn smart_document(issuer: &str, e: crate::auth::Endpoints) -> serde_json::Value {
    json!({
        "issuer": issuer,
        "jwks_uri": e.jwks_uri,
        "token_endpoint": e.token_endpoint,
        "authorization_endpoint": e.authorization_endpoint,
        "grant_types_supported": ["client_credentials", "authorization_code"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": [
            "system/*.cruds", "system/*.rs", "user/*.cruds", "user/*.rs", "patient/*.cruds",
            "patient/*.rs", "system/*.read", "system/*.write", "user/*.read", "patient/*.read"
        ],
        "code_challenge_methods_supported": ["S256"],
        "capabilities": [
            "client-confidential-asymmetric", "launch-standalone", "client-public",
            "context-standalone-patient", "permission-v1", "permission-v2", "permission-patient",
            "permission-user"
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_has_a_need_and_unknown_ones_need_the_operator() {
        use Interaction::*;
        let n = |m: &str, p: &str| need(&Method::from_bytes(m.as_bytes()).unwrap(), p);
        assert_eq!(n("GET", "/healthz"), Need::Open);
        assert_eq!(n("GET", "/fhir/metadata"), Need::Open);
        assert_eq!(n("GET", "/metrics"), Need::Operator);
        assert_eq!(n("GET", "/v1/jobs/x"), Need::Operator);
        assert_eq!(n("GET", "/v1/exports"), Need::Operator);
        assert_eq!(n("GET", "/something/new"), Need::Operator);
        assert_eq!(n("POST", "/fhir"), Need::Entries);
        for (method, path, t, interaction) in [
            ("GET", "/fhir/Patient", "Patient", Search),
            ("GET", "/fhir/Patient/1/_history/2", "Patient", Read),
            ("PUT", "/fhir/Patient/1", "Patient", Update),
            (
                "POST",
                "/fhir/RiskAssessment/$predict",
                "RiskAssessment",
                Create,
            ),
        ] {
            let want = Need::Fhir(t.into(), interaction);
            assert_eq!(n(method, path), want, "{method} {path}");
        }
        assert_eq!(n("DELETE", "/fhir/Patient/1"), Need::Operator);
        for (method, path, interaction) in [
            ("GET", "/dicomweb/studies", Search),
            ("GET", "/dicomweb/studies/1/series/2/instances", Search),
            (
                "GET",
                "/dicomweb/studies/1/series/2/instances/3/rendered",
                Read,
            ),
            ("POST", "/dicomweb/studies", Create),
        ] {
            let want = Need::Whole("ImagingStudy", interaction);
            assert_eq!(n(method, path), want, "{method} {path}");
        }
        assert_eq!(n("POST", "/covid19/api/v1/predict/"), Need::Legacy);
        assert_eq!(n("GET", "/static/result/x.png"), Need::Legacy);
    }
}
