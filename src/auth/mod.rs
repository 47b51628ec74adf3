//! The trust boundary. Carina is an OAuth2 resource server: it verifies bearer JWT access
//! tokens issued by a configured authorization server (signature against the issuer's JWKS,
//! `iss`, `aud`, `exp`, `nbf`, algorithm) and turns their SMART scopes and `patient` claim into
//! an [`Access`] that the API layer checks per interaction. It issues no tokens.

pub mod scope;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, RwLock};

pub use scope::{Context, Interaction, Missing, Scopes};

use crate::outbound::Outbound;

/// Whether requests need a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Bearer tokens from the configured issuer (SMART on FHIR).
    Smart,
    /// No authorization: every request is allowed. Only for a loopback address, or when set
    /// explicitly (a warning is logged at start).
    None,
}

/// `[auth]` settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// `smart` when an issuer is set, else `none`; unset with no issuer: no authorization and
    /// the HTTP server may bind loopback addresses only.
    pub mode: Option<AuthMode>,
    /// The authorization server's issuer URL (`iss` of its tokens; discovery at
    /// `{issuer}/.well-known/openid-configuration`).
    pub issuer: Option<String>,
    /// JWKS URL, when the issuer has no discovery document.
    pub jwks_uri: Option<String>,
    /// Expected `aud`: default Carina's public FHIR base URL (`{public_url}/fhir`).
    pub audience: Option<String>,
    /// Accepted signature algorithms.
    pub algorithms: Vec<String>,
    /// Clock leeway for `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Keep the 2020 demo API (`/covid19`, `/static`) open while authorization is on: its
    /// clients cannot send tokens. Off by default.
    pub legacy_api: bool,
    /// Token endpoint for `/.well-known/smart-configuration` (default: from discovery).
    pub token_endpoint: Option<String>,
    /// Authorization endpoint for `/.well-known/smart-configuration` (default: from
    /// discovery).
    pub authorization_endpoint: Option<String>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            mode: None,
            issuer: None,
            jwks_uri: None,
            audience: None,
            algorithms: ["RS256", "RS384", "ES256", "ES384"]
                .iter()
                .map(|s| (*s).to_string())
                .collect(),
            leeway_secs: 30,
            legacy_api: false,
            token_endpoint: None,
            authorization_endpoint: None,
        }
    }
}

impl AuthSettings {
    /// The effective mode.
    pub fn effective_mode(&self) -> AuthMode {
        self.mode.unwrap_or(if self.issuer.is_some() {
            AuthMode::Smart
        } else {
            AuthMode::None
        })
    }
}

/// Who is asking and what they may do.
#[derive(Debug, Clone)]
pub struct Principal {
    /// `sub`, else `client_id` (for the audit trail; never logged with patient data).
    pub subject: String,
    /// `client_id`.
    pub client_id: Option<String>,
    /// Granted scopes.
    pub scopes: Scopes,
    /// The `patient` launch-context claim.
    pub patient: Option<String>,
}

/// What a request may do: everything (authorization off), or what its token allows.
#[derive(Debug, Clone)]
pub enum Access {
    /// Authorization is off.
    Open,
    /// A verified token.
    Token(Arc<Principal>),
}

/// What an interaction is allowed on: everything, or one patient's compartment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Every resource of the type.
    All,
    /// Only resources in `Patient/{id}`'s compartment.
    Patient(String),
}

/// A refused request.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// 401: no token, or a token that does not verify.
    #[error("{0}")]
    InvalidToken(String),
    /// 403: the token lacks the scope.
    #[error("insufficient scope: this request needs {0}")]
    InsufficientScope(Missing),
    /// 403: the request is not open to this kind of token.
    #[error("{0}")]
    Forbidden(String),
}

impl Access {
    /// What `interaction` on `resource_type` is allowed on.
    ///
    /// # Errors
    /// [`AuthError::InsufficientScope`] when no scope allows it, or a `patient/` scope
    /// allows it but the token has no `patient` claim.
    pub fn fhir(&self, resource_type: &str, interaction: Interaction) -> Result<Grant, AuthError> {
        let p = match self {
            Access::Open => return Ok(Grant::All),
            Access::Token(p) => p,
        };
        match p.scopes.grant(resource_type, interaction) {
            Some(Context::System | Context::User) => Ok(Grant::All),
            Some(Context::Patient) => match &p.patient {
                Some(id) => Ok(Grant::Patient(id.clone())),
                None => Err(AuthError::Forbidden(
                    "a patient/ scope without a 'patient' claim in the token".into(),
                )),
            },
            None => Err(AuthError::InsufficientScope(Missing::of(
                resource_type,
                interaction,
            ))),
        }
    }

    /// Like [`Self::fhir`] for routes that cannot be limited to a compartment (DICOMweb,
    /// `/v1`): a patient-level grant is refused.
    ///
    /// # Errors
    /// [`AuthError`].
    pub fn whole(&self, resource_type: &str, interaction: Interaction) -> Result<(), AuthError> {
        match self.fhir(resource_type, interaction)? {
            Grant::All => Ok(()),
            Grant::Patient(_) => Err(AuthError::Forbidden(format!(
                "patient-level tokens cannot use this route; it needs user/ or system/{resource_type}.{}",
                interaction.letter()
            ))),
        }
    }

    /// The operator scope (jobs, exports, metrics).
    ///
    /// # Errors
    /// [`AuthError::InsufficientScope`].
    pub fn operator(&self) -> Result<(), AuthError> {
        match self {
            Access::Open => Ok(()),
            Access::Token(p) if p.scopes.operator() => Ok(()),
            Access::Token(_) => Err(AuthError::InsufficientScope(Missing::operator())),
        }
    }

    /// The principal, when there is a token.
    pub fn principal(&self) -> Option<&Principal> {
        match self {
            Access::Open => None,
            Access::Token(p) => Some(p),
        }
    }
}

/// Claims Carina reads.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    client_id: Option<String>,
    #[serde(default)]
    scope: ScopeClaim,
    scp: Option<Vec<String>>,
    patient: Option<String>,
}

/// `scope` as a space-separated string (RFC 9068) or an array.
#[derive(Debug, Deserialize, Default)]
#[serde(untagged)]
enum ScopeClaim {
    Text(String),
    List(Vec<String>),
    #[default]
    Missing,
}

/// Keys by `kid`, with when they were fetched.
#[derive(Default)]
struct KeyCache {
    keys: HashMap<String, (DecodingKey, Option<Algorithm>)>,
    /// The only key, for tokens without `kid` when the set has one key.
    single: Option<String>,
    fetched: Option<Instant>,
}

/// What discovery found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Endpoints {
    /// JWKS URL.
    pub jwks_uri: Option<String>,
    /// Token endpoint.
    pub token_endpoint: Option<String>,
    /// Authorization endpoint.
    pub authorization_endpoint: Option<String>,
}

/// Verifies tokens against the issuer's keys.
pub struct Authorizer {
    issuer: String,
    audience: String,
    algorithms: Vec<Algorithm>,
    leeway: u64,
    outbound: Outbound,
    endpoints: RwLock<Endpoints>,
    keys: RwLock<KeyCache>,
    refreshing: Mutex<()>,
    /// Whether the legacy API stays open.
    pub legacy_api: bool,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

/// Keys are fetched again after this long, and on an unknown `kid` at most this often.
const KEYS_MAX_AGE: Duration = Duration::from_secs(3600);
const UNKNOWN_KID_REFETCH: Duration = Duration::from_secs(5);
/// A request waits at most this long for the issuer.
const FETCH_DEADLINE: Duration = Duration::from_secs(3);

impl Authorizer {
    /// An authorizer for `settings`; `public_fhir_base` is the default audience. Nothing is
    /// fetched yet (see [`Self::warm`]).
    ///
    /// # Errors
    /// A message for missing or unusable settings.
    pub fn new(
        settings: &AuthSettings,
        public_fhir_base: Option<&str>,
        outbound: Outbound,
    ) -> Result<Self, String> {
        let issuer = settings
            .issuer
            .clone()
            .ok_or("[auth] issuer is required when auth.mode = \"smart\"")?;
        let audience = settings
            .audience
            .clone()
            .or_else(|| public_fhir_base.map(str::to_string))
            .ok_or("[auth] needs audience, or public_url to derive it ({public_url}/fhir)")?;
        let mut algorithms = Vec::new();
        for a in &settings.algorithms {
            let alg = match a.as_str() {
                "RS256" => Algorithm::RS256,
                "RS384" => Algorithm::RS384,
                "RS512" => Algorithm::RS512,
                "ES256" => Algorithm::ES256,
                "ES384" => Algorithm::ES384,
                "PS256" => Algorithm::PS256,
                "PS384" => Algorithm::PS384,
                "EdDSA" => Algorithm::EdDSA,
                other => {
                    return Err(format!(
                        "[auth] algorithms: '{other}' is not an asymmetric JWS algorithm Carina accepts"
                    ))
                }
            };
            algorithms.push(alg);
        }
        if algorithms.is_empty() {
            return Err("[auth] algorithms is empty".into());
        }
        outbound
            .allow_configured(issuer.trim_end_matches('/'))
            .map_err(|e| format!("[auth] issuer: {e}"))?;
        if let Some(j) = &settings.jwks_uri {
            outbound
                .allow_configured(j)
                .map_err(|e| format!("[auth] jwks_uri: {e}"))?;
        }
        Ok(Self {
            issuer,
            audience,
            algorithms,
            leeway: settings.leeway_secs,
            outbound,
            endpoints: RwLock::new(Endpoints {
                jwks_uri: settings.jwks_uri.clone(),
                token_endpoint: settings.token_endpoint.clone(),
                authorization_endpoint: settings.authorization_endpoint.clone(),
            }),
            keys: RwLock::new(KeyCache::default()),
            refreshing: Mutex::new(()),
            legacy_api: settings.legacy_api,
        })
    }

    /// The issuer.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The expected audience.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// The endpoints known (configured or discovered).
    pub async fn endpoints(&self) -> Endpoints {
        if self.endpoints.read().await.token_endpoint.is_none() {
            let _ = self.discover().await;
        }
        self.endpoints.read().await.clone()
    }

    /// Fetches discovery and keys now (at start-up). A failure is logged, not fatal: keys are
    /// fetched again when a token arrives.
    pub async fn warm(&self) {
        match self.refresh().await {
            Ok(n) => {
                tracing::info!(keys = n, issuer = %self.issuer, "authorization server keys loaded")
            }
            Err(e) => {
                tracing::warn!(issuer = %self.issuer, "authorization server keys not loaded yet: {e}")
            }
        }
    }

    async fn discover(&self) -> Result<(), String> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        );
        let answer = self
            .outbound
            .get(&url, &[("accept", "application/json")], FETCH_DEADLINE)
            .await
            .map_err(|e| e.to_string())?;
        if !answer.status.is_success() {
            return Err(format!("discovery answered {}", answer.status));
        }
        let doc: serde_json::Value =
            serde_json::from_slice(&answer.body).map_err(|_| "discovery is not JSON")?;
        if doc["issuer"].as_str().map(|i| i.trim_end_matches('/'))
            != Some(self.issuer.trim_end_matches('/'))
        {
            return Err("discovery names another issuer".into());
        }
        let mut e = self.endpoints.write().await;
        let text = |k: &str| doc[k].as_str().map(str::to_string);
        if e.jwks_uri.is_none() {
            if let Some(j) = text("jwks_uri") {
                self.outbound
                    .allow_configured(&j)
                    .map_err(|e| format!("jwks_uri: {e}"))?;
                e.jwks_uri = Some(j);
            }
        }
        if e.token_endpoint.is_none() {
            e.token_endpoint = text("token_endpoint");
        }
        if e.authorization_endpoint.is_none() {
            e.authorization_endpoint = text("authorization_endpoint");
        }
        Ok(())
    }

    /// Fetches the JWKS (after discovery when needed); returns the number of usable keys.
    async fn refresh(&self) -> Result<usize, String> {
        let _one = self.refreshing.lock().await;
        if self.endpoints.read().await.jwks_uri.is_none() {
            self.discover().await?;
        }
        let uri = self
            .endpoints
            .read()
            .await
            .jwks_uri
            .clone()
            .ok_or("the issuer's discovery has no jwks_uri")?;
        let answer = self
            .outbound
            .get(&uri, &[("accept", "application/json")], FETCH_DEADLINE)
            .await
            .map_err(|e| e.to_string())?;
        if !answer.status.is_success() {
            return Err(format!("JWKS answered {}", answer.status));
        }
        let set: JwkSet = serde_json::from_slice(&answer.body).map_err(|e| format!("JWKS: {e}"))?;
        let mut cache = KeyCache {
            fetched: Some(Instant::now()),
            ..KeyCache::default()
        };
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            if matches!(
                jwk.common.public_key_use,
                Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
            ) {
                continue;
            }
            if let Ok(key) = DecodingKey::from_jwk(jwk) {
                let alg = jwk
                    .common
                    .key_algorithm
                    .and_then(|a| a.to_string().parse::<Algorithm>().ok());
                cache.keys.insert(kid, (key, alg));
            }
        }
        if cache.keys.len() == 1 {
            cache.single = cache.keys.keys().next().cloned();
        }
        let n = cache.keys.len();
        *self.keys.write().await = cache;
        Ok(n)
    }

    /// The key for `kid`, fetching the JWKS again when the key is unknown (at most every few
    /// seconds) or the keys are old.
    async fn key(&self, kid: Option<&str>) -> Result<(DecodingKey, Option<Algorithm>), AuthError> {
        let lookup = |c: &KeyCache| {
            let k = kid.map(str::to_string).or_else(|| c.single.clone())?;
            c.keys.get(&k).cloned()
        };
        let (found, fetched) = {
            let c = self.keys.read().await;
            (lookup(&c), c.fetched)
        };
        let stale = fetched.is_none_or(|t| t.elapsed() > KEYS_MAX_AGE);
        let may_refetch = fetched.is_none_or(|t| t.elapsed() > UNKNOWN_KID_REFETCH);
        if let Some(k) = found.as_ref().filter(|_| !stale) {
            return Ok(k.clone());
        }
        if may_refetch {
            if let Err(e) = self.refresh().await {
                tracing::warn!(issuer = %self.issuer, "cannot fetch the issuer's keys: {e}");
            }
        }
        let c = self.keys.read().await;
        lookup(&c).or(found).ok_or_else(|| {
            AuthError::InvalidToken(if c.fetched.is_none() {
                "the authorization server's keys are not available; try again".into()
            } else {
                "the token's key (kid) is not in the issuer's JWKS".into()
            })
        })
    }

    /// Verifies a bearer token.
    ///
    /// # Errors
    /// [`AuthError::InvalidToken`] saying why.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let bad = |m: &str| AuthError::InvalidToken(m.to_string());
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| bad("the token is not a signed JWT with an accepted algorithm"))?;
        if !self.algorithms.contains(&header.alg) {
            return Err(bad(&format!("algorithm {:?} is not accepted", header.alg)));
        }
        let (key, key_alg) = self.key(header.kid.as_deref()).await?;
        if key_alg.is_some_and(|a| a != header.alg) {
            return Err(bad("the token's algorithm does not match its key"));
        }
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[self.issuer.as_str()]);
        v.set_audience(&[self.audience.as_str()]);
        v.leeway = self.leeway;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            bad(match e.kind() {
                K::ExpiredSignature => "the token has expired",
                K::ImmatureSignature => "the token is not valid yet (nbf)",
                K::InvalidAudience => "the token is for another audience",
                K::InvalidIssuer => "the token is from another issuer",
                K::InvalidSignature => "the token's signature does not verify",
                K::MissingRequiredClaim(_) => "the token lacks exp, iss or aud",
                K::InvalidAlgorithm => "the token's algorithm does not match its key",
                _ => "the token cannot be verified",
            })
        })?;
        let c = data.claims;
        let scopes = match (&c.scope, &c.scp) {
            (ScopeClaim::Text(s), _) => Scopes::parse(s.split_whitespace()),
            (ScopeClaim::List(l), _) => Scopes::parse(l.iter().map(String::as_str)),
            (ScopeClaim::Missing, Some(l)) => Scopes::parse(l.iter().map(String::as_str)),
            (ScopeClaim::Missing, None) => Scopes::default(),
        };
        Ok(Principal {
            subject: c
                .sub
                .clone()
                .or_else(|| c.client_id.clone())
                .unwrap_or_else(|| "unknown".into()),
            client_id: c.client_id,
            scopes,
            patient: c.patient,
        })
    }
}
