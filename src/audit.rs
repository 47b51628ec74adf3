//! The audit trail: FHIR R4 AuditEvents with DICOM / IHE ATNA codes, for every access to
//! patient data. Who is acting travels with the request as a task-local [`Actor`] (set by the
//! HTTP authorization layer, the DIMSE handler and the job worker), so the store writes the
//! AuditEvent of a change in the same database transaction as the change itself; reads,
//! searches, retrievals and refusals are recorded after the answer. Events may also be sent as
//! RFC 5424 syslog over TCP to a collector (ATNA style). Identities go here, never into the
//! server log.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Who acts.
#[derive(Debug, Clone)]
pub struct Actor {
    /// The token's `sub` (or `client_id`), the calling AE title, `anonymous`, or `carina`.
    pub who: String,
    /// The OAuth2 client, when there is one.
    pub client_id: Option<String>,
    /// The network address of the requestor.
    pub address: Option<String>,
    /// Whether this is Carina itself (a job worker) rather than a requestor.
    pub system: bool,
}

impl Actor {
    /// Carina's own job workers (analysis, export, risk).
    pub fn carina() -> Self {
        Self {
            who: "carina".into(),
            client_id: None,
            address: None,
            system: true,
        }
    }
}

tokio::task_local! {
    /// The actor of the request or job this task serves.
    pub static ACTOR: Actor;
}

/// The actor of the current task, when it serves a request or a job.
pub fn current() -> Option<Actor> {
    ACTOR.try_with(Clone::clone).ok()
}

/// What was done (AuditEvent.action).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// C: create.
    Create,
    /// R: read, view, search, retrieve.
    Read,
    /// U: update.
    Update,
    /// D: delete.
    Delete,
    /// E: execute (an operation, an analysis, an association).
    Execute,
}

impl Action {
    fn code(self) -> &'static str {
        match self {
            Self::Create => "C",
            Self::Read => "R",
            Self::Update => "U",
            Self::Delete => "D",
            Self::Execute => "E",
        }
    }
}

/// The kind of event (AuditEvent.type, DICOM audit event ids from DCM, PS3.15 A.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// FHIR REST interaction (`rest`, with the interaction as subtype).
    Rest(&'static str),
    /// DICOM Instances Transferred (110104).
    InstancesTransferred,
    /// DICOM Query (110112).
    Query,
    /// DICOM Instances Accessed (110103).
    InstancesAccessed,
    /// Network entry: an association (110108 Network Entry).
    Association,
    /// Security alert (110113): a refused request.
    SecurityAlert,
    /// Application activity (110100): analysis, export, risk assessment by Carina.
    Application,
}

impl Kind {
    fn coding(self) -> (Value, Option<Value>) {
        let dcm = |code: &str, display: &str| json!({"system": "http://dicom.nema.org/resources/ontology/DCM", "code": code, "display": display});
        match self {
            Kind::Rest(interaction) => (
                json!({"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation"}),
                Some(
                    json!({"system": "http://hl7.org/fhir/restful-interaction", "code": interaction}),
                ),
            ),
            Kind::InstancesTransferred => (dcm("110104", "DICOM Instances Transferred"), None),
            Kind::Query => (dcm("110112", "Query"), None),
            Kind::InstancesAccessed => (dcm("110103", "DICOM Instances Accessed"), None),
            Kind::Association => (dcm("110108", "Network Entry"), None),
            Kind::SecurityAlert => (dcm("110113", "Security Alert"), None),
            Kind::Application => (dcm("110100", "Application Activity"), None),
        }
    }
}

/// What an event is about: a FHIR reference (`Patient/1`), or a DICOM study / instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entity {
    /// A FHIR resource.
    Fhir(String),
    /// A DICOM study (Study Instance UID).
    Study(String),
    /// A DICOM instance (SOP Instance UID).
    Instance(String),
    /// A query (its text: the path and query string).
    Query(String),
}

/// One event to record.
#[derive(Debug, Clone)]
pub struct Event {
    /// Kind.
    pub kind: Kind,
    /// Action.
    pub action: Action,
    /// `0` success, `4` minor failure (a refused or bad request), `8` serious failure.
    pub outcome: u8,
    /// A description of the outcome (e.g. why it was refused).
    pub outcome_text: Option<String>,
    /// What it is about.
    pub entities: Vec<Entity>,
}

/// Builds the AuditEvent resource of `event` by `actor`, now.
pub fn resource(event: &Event, actor: &Actor) -> Value {
    let (ty, subtype) = event.kind.coding();
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut agent = json!({
        "type": {"coding": [{
            "system": "http://dicom.nema.org/resources/ontology/DCM",
            "code": if actor.system { "110150" } else { "110153" },
            "display": if actor.system { "Application" } else { "Source Role ID" }
        }]},
        "who": {"identifier": {"value": actor.who}},
        "requestor": !actor.system,
    });
    if let Some(c) = &actor.client_id {
        agent["altId"] = json!(c);
    }
    if let Some(a) = &actor.address {
        agent["network"] = json!({"address": a, "type": "2"});
    }
    let entities: Vec<Value> = event
        .entities
        .iter()
        .map(|e| match e {
            Entity::Fhir(r) => json!({"what": {"reference": r}}),
            Entity::Study(uid) => json!({
                "what": {"identifier": {"system": "urn:dicom:uid", "value": format!("urn:oid:{uid}")}},
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "3", "display": "Report"},
                "name": "study"
            }),
            Entity::Instance(uid) => json!({
                "what": {"identifier": {"system": "urn:dicom:uid", "value": format!("urn:oid:{uid}")}},
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
                "name": "instance"
            }),
            Entity::Query(q) => json!({
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "24", "display": "Query"},
                "description": q
            }),
        })
        .collect();
    let mut r = json!({
        "resourceType": "AuditEvent",
        "type": ty,
        "action": event.action.code(),
        "recorded": now,
        "outcome": event.outcome.to_string(),
        "agent": [agent],
        "source": {
            "observer": {"display": "Carina"},
            "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server"}]
        },
    });
    if let Some(s) = subtype {
        r["subtype"] = json!([s]);
    }
    if let Some(t) = &event.outcome_text {
        r["outcomeDesc"] = json!(t);
    }
    if !entities.is_empty() {
        r["entity"] = json!(entities);
    }
    r
}

/// `[audit]` settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditSettings {
    /// RFC 5424 syslog collector over TCP (`host:port`), ATNA style; off when absent.
    pub syslog: Option<String>,
}

/// Sends AuditEvents to a syslog collector over TCP (RFC 5424 messages, octet-counted
/// framing as RFC 6587 and ATNA's RFC 5425 use). Sending never blocks a request: events go
/// through a bounded queue; when it is full they are counted and dropped from the feed (the
/// database copy is the record).
#[derive(Clone, Debug)]
pub struct Syslog {
    tx: tokio::sync::mpsc::Sender<String>,
    host: String,
}

impl Syslog {
    /// Starts the sender task for `addr`.
    pub fn start(addr: String) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(10_000);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut conn: Option<tokio::net::TcpStream> = None;
            while let Some(msg) = rx.recv().await {
                let framed = format!("{} {msg}", msg.len());
                for _ in 0..2 {
                    if conn.is_none() {
                        conn = tokio::net::TcpStream::connect(&addr).await.ok();
                    }
                    let Some(c) = conn.as_mut() else {
                        tracing::warn!(
                            "audit syslog collector unreachable; event kept in the database only"
                        );
                        break;
                    };
                    if c.write_all(framed.as_bytes()).await.is_ok() {
                        break;
                    }
                    conn = None;
                }
            }
        });
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "-".into());
        Self { tx, host }
    }

    /// Queues one AuditEvent.
    pub fn send(&self, event: &Value) {
        let host = &self.host;
        let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        // facility 10 (authpriv) × 8 + severity 5 (notice) = 85; MSGID IHE+RFC-3881 style
        let msg = format!(
            "<85>1 {ts} {host} carina {} AuditEvent - {}",
            std::process::id(),
            event
        );
        if self.tx.try_send(msg).is_err() {
            tracing::warn!("audit syslog queue full; event kept in the database only");
        }
    }
}

/// The process-wide syslog feed, when configured.
static FEED: std::sync::OnceLock<Arc<Syslog>> = std::sync::OnceLock::new();

/// Turns on the syslog feed (once, at start).
pub fn set_feed(s: Syslog) {
    let _ = FEED.set(Arc::new(s));
}

/// Sends a stored AuditEvent to the feed, when there is one.
pub fn forward(event: &Value) {
    if let Some(f) = FEED.get() {
        f.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_who_what_action_outcome_and_time() {
        let actor = Actor {
            who: "svc".into(),
            client_id: Some("carina-backend".into()),
            address: Some("10.0.0.5".into()),
            system: false,
        };
        let e = Event {
            kind: Kind::Rest("read"),
            action: Action::Read,
            outcome: 0,
            outcome_text: None,
            entities: vec![
                Entity::Fhir("Patient/1".into()),
                Entity::Study("1.2.3".into()),
            ],
        };
        let r = resource(&e, &actor);
        assert_eq!(r["resourceType"], "AuditEvent");
        assert_eq!(r["action"], "R");
        assert_eq!(r["outcome"], "0");
        assert_eq!(r["subtype"][0]["code"], "read");
        assert_eq!(r["agent"][0]["who"]["identifier"]["value"], "svc");
        assert_eq!(r["agent"][0]["network"]["address"], "10.0.0.5");
        assert_eq!(r["entity"][0]["what"]["reference"], "Patient/1");
        assert_eq!(
            r["entity"][1]["what"]["identifier"]["value"],
            "urn:oid:1.2.3"
        );
        crate::fhir::validate::check_resource(&r, "").unwrap();
    }
}
