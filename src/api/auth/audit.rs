//! What the authorization layer records after a request: reads, searches and retrievals of
//! patient data, failed writes, and every refused request (successful writes were recorded by
//! the store in their own transaction).

use axum::http::{Method, StatusCode, Uri};

use crate::app::AppState;
use crate::audit::{Action, Actor, Entity, Event, Kind};

/// Records the request `method uri` by `actor`, answered `status`, when it is worth recording.
pub(super) async fn after(
    state: &AppState,
    actor: &Actor,
    method: &Method,
    uri: &Uri,
    status: StatusCode,
) {
    let Some(event) = event(method, uri, status) else {
        return;
    };
    if let Err(e) = state.store.audit(&event, actor).await {
        tracing::warn!(error = %e, "cannot record an AuditEvent");
    }
}

/// The event of a request, or `None` for requests that touch no patient data and were not
/// refused (health, metrics, the page) and for successful writes (audited in their
/// transaction).
fn event(method: &Method, uri: &Uri, status: StatusCode) -> Option<Event> {
    let path = uri.path();
    let query = uri
        .path_and_query()
        .map_or(path, axum::http::uri::PathAndQuery::as_str)
        .to_string();
    let seg: Vec<&str> = path.trim_matches('/').split('/').collect();
    let read = method == Method::GET || method == Method::HEAD;
    let refused = status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN;
    if !read && status.is_success() {
        return None;
    }
    let action = match *method {
        Method::GET | Method::HEAD => Action::Read,
        Method::PUT | Method::PATCH => Action::Update,
        Method::DELETE => Action::Delete,
        _ => Action::Create,
    };
    let (kind, entities) = match seg.as_slice() {
        ["fhir", "metadata"] | ["fhir", ".well-known", ..] => (None, vec![]),
        ["fhir", t, id, ..] if read && !id.starts_with('$') => (
            Some(Kind::Rest("read")),
            vec![Entity::Fhir(format!("{t}/{id}"))],
        ),
        ["fhir", _] if read => (Some(Kind::Rest("search-type")), vec![Entity::Query(query)]),
        ["fhir", ..] => (
            Some(Kind::Rest(if action == Action::Update {
                "update"
            } else {
                "create"
            })),
            vec![Entity::Query(query)],
        ),
        ["dicomweb", .., "studies" | "series" | "instances"] if read => {
            (Some(Kind::Query), vec![Entity::Query(query)])
        }
        ["dicomweb", "studies", study, ..] if read => (
            Some(Kind::InstancesAccessed),
            vec![Entity::Study((*study).to_string())],
        ),
        ["dicomweb", ..] => (Some(Kind::InstancesTransferred), vec![Entity::Query(query)]),
        ["v1", "analyze" | "results" | "instances" | "studies", ..] => {
            (Some(Kind::InstancesAccessed), vec![Entity::Query(query)])
        }
        ["covid19", ..] | ["static", ..] => (Some(Kind::Application), vec![Entity::Query(query)]),
        _ => (None, vec![Entity::Query(query)]),
    };
    let kind = match (refused, kind) {
        (true, _) => Kind::SecurityAlert,
        (false, Some(k)) => k,
        (false, None) => return None,
    };
    Some(Event {
        kind,
        action,
        outcome: if status.is_success() {
            0
        } else if status.is_client_error() {
            4
        } else {
            8
        },
        outcome_text: (!status.is_success()).then(|| format!("HTTP {}", status.as_u16())),
        entities,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_refusals_and_failed_writes_are_recorded_successful_writes_not_here() {
        let e = |m: &str, u: &str, s: u16| {
            event(
                &Method::from_bytes(m.as_bytes()).unwrap(),
                &u.parse().unwrap(),
                StatusCode::from_u16(s).unwrap(),
            )
        };
        let r = e("GET", "/fhir/Patient/1", 200).unwrap();
        assert_eq!(r.kind, Kind::Rest("read"));
        assert_eq!(r.entities, vec![Entity::Fhir("Patient/1".into())]);
        assert_eq!(
            e("GET", "/dicomweb/studies?PatientID=*", 200).unwrap().kind,
            Kind::Query
        );
        assert_eq!(
            e("GET", "/dicomweb/studies/1.2/series/3/instances/4", 200)
                .unwrap()
                .kind,
            Kind::InstancesAccessed
        );
        assert!(
            e("POST", "/fhir/Patient", 201).is_none(),
            "audited in its transaction"
        );
        let failed = e("POST", "/fhir/Patient", 400).unwrap();
        assert_eq!((failed.action, failed.outcome), (Action::Create, 4));
        assert_eq!(e("GET", "/metrics", 403).unwrap().kind, Kind::SecurityAlert);
        assert!(e("GET", "/metrics", 200).is_none());
        assert!(e("GET", "/healthz", 200).is_none());
    }
}
