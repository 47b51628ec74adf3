//! Export of Carina's results to PACS destinations: DIMSE C-STORE SCU (dicom-ul) or a DICOMweb
//! STOW-RS client, with retries and exponential backoff. Each (instance, destination) is a row
//! in the store, so a destination that is down or rejecting costs one attempt per backoff step
//! (never a loop), survives restarts, and shows in `GET /v1/exports`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use dicom_ul::association::client::ClientAssociationOptions;
use dicom_ul::pdu::{PDataValueType, PresentationContextResultReason};
use dicom_ul::Pdu;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

use super::Outbound;
use crate::dicom::dimse::{command_pdu, command_set, Command};
use crate::dicom::status;
use crate::store::{ExportRow, Store};

/// How results reach a destination.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DestinationKind {
    /// DIMSE C-STORE to `address` (`host:port`), called AE `ae_title`.
    Dimse,
    /// STOW-RS to `url` (the DICOMweb base, e.g. `http://pacs:8042/dicom-web`).
    Stow,
}

/// A PACS destination (`[[dicom.destinations]]`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// Name shown in export statuses.
    pub name: String,
    /// `dimse` or `stow`.
    pub kind: DestinationKind,
    /// DIMSE: `host:port`.
    #[serde(default)]
    pub address: Option<String>,
    /// DIMSE: the destination's AE title.
    #[serde(default)]
    pub ae_title: Option<String>,
    /// STOW: DICOMweb base URL (`http://` or `https://`).
    #[serde(default)]
    pub url: Option<String>,
    /// Attempts before the export is marked failed (default 6).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// First retry delay in seconds, doubled per attempt, capped at 1 hour (default 10).
    #[serde(default)]
    pub backoff_secs: Option<u64>,
}

/// Why an attempt failed; `retry` is false for refusals that will not change.
#[derive(Debug)]
struct Failure {
    message: String,
    retry: bool,
}

fn transient(message: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        retry: true,
    }
}

/// The export service.
#[derive(Clone)]
pub struct Exporter {
    store: Store,
    destinations: Arc<Vec<Destination>>,
    calling_ae: String,
    wake: Arc<Notify>,
    /// The outbound client; its allow-list is the STOW-RS destinations' URLs.
    outbound: Result<Outbound, String>,
}

impl Exporter {
    /// Builds the service.
    pub fn new(store: Store, destinations: Vec<Destination>, calling_ae: String) -> Self {
        let urls: Vec<String> = destinations
            .iter()
            .filter_map(|d| d.url.as_deref())
            .map(|u| u.trim_end_matches('/').to_string())
            .collect();
        Self {
            store,
            destinations: Arc::new(destinations),
            calling_ae,
            wake: Arc::new(Notify::new()),
            outbound: Outbound::with_configured(&urls),
        }
    }

    /// Queues `sop` for every destination.
    ///
    /// # Errors
    /// When the queue cannot be written.
    pub async fn enqueue(&self, sop: &str) -> Result<(), crate::store::StoreError> {
        if self.destinations.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = self.destinations.iter().map(|d| d.name.clone()).collect();
        self.store.enqueue_exports(sop, &names).await?;
        self.wake.notify_one();
        Ok(())
    }

    /// Sends due exports until `stop` resolves.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let due = match self
                .store
                .due_exports(Utc::now(), 16, chrono::Duration::minutes(2))
                .await
            {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the export queue");
                    Vec::new()
                }
            };
            for row in &due {
                self.attempt(row).await;
            }
            if !due.is_empty() {
                continue;
            }
            let wait = match self.store.next_export_due().await {
                Ok(Some(t)) => (t - Utc::now())
                    .to_std()
                    .unwrap_or(Duration::ZERO)
                    .min(Duration::from_secs(30)),
                _ => Duration::from_secs(30),
            };
            tokio::select! {
                () = &mut stop => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn attempt(&self, row: &ExportRow) {
        let Some(dest) = self.destinations.iter().find(|d| d.name == row.destination) else {
            let _ = self
                .store
                .record_export(
                    &row.sop_instance_uid,
                    &row.destination,
                    "failed",
                    row.attempts,
                    Utc::now(),
                    Some("destination no longer configured"),
                )
                .await;
            return;
        };
        let outcome = self.send(dest, &row.sop_instance_uid).await;
        let attempts = row.attempts + 1;
        let max = i64::from(dest.max_attempts.unwrap_or(6).max(1));
        let (state, next, error) = match outcome {
            Ok(()) => ("sent", Utc::now(), None),
            Err(f) if f.retry && attempts < max => {
                let base = dest.backoff_secs.unwrap_or(10).max(1);
                let delay = base
                    .saturating_mul(1u64 << (attempts - 1).clamp(0, 20) as u32)
                    .min(3600);
                (
                    "pending",
                    Utc::now() + chrono::Duration::seconds(delay as i64),
                    Some(f.message),
                )
            }
            Err(f) => ("failed", Utc::now(), Some(f.message)),
        };
        if state != "pending" {
            // the export (or its final failure) goes into the audit trail
            let event = crate::audit::Event {
                kind: crate::audit::Kind::InstancesTransferred,
                action: crate::audit::Action::Execute,
                outcome: if error.is_none() { 0 } else { 8 },
                outcome_text: Some(format!("export to {}: {state}", dest.name)),
                entities: vec![crate::audit::Entity::Instance(row.sop_instance_uid.clone())],
            };
            if let Err(e) = self
                .store
                .audit(&event, &crate::audit::Actor::carina())
                .await
            {
                tracing::warn!(error = %e, "cannot record an AuditEvent");
            }
        }
        match &error {
            None => tracing::info!(destination = %dest.name, "result exported"),
            Some(e) => {
                tracing::warn!(destination = %dest.name, attempt = attempts, state, error = %e, "export attempt failed")
            }
        }
        if let Err(e) = self
            .store
            .record_export(
                &row.sop_instance_uid,
                &dest.name,
                state,
                attempts,
                next,
                error.as_deref(),
            )
            .await
        {
            tracing::error!(error = %e, "cannot record an export attempt");
        }
    }

    async fn send(&self, dest: &Destination, sop: &str) -> Result<(), Failure> {
        let ix = self
            .store
            .instance(sop)
            .await
            .map_err(|e| transient(e.to_string()))?
            .ok_or_else(|| Failure {
                message: "instance no longer stored".into(),
                retry: false,
            })?;
        let file = self
            .store
            .instance_file(&ix)
            .await
            .map_err(|e| transient(e.to_string()))?
            .ok_or_else(|| Failure {
                message: "instance file missing".into(),
                retry: false,
            })?;
        match dest.kind {
            DestinationKind::Dimse => {
                let addr = dest.address.as_deref().ok_or_else(|| Failure {
                    message: "no address configured".into(),
                    retry: false,
                })?;
                let aet = dest.ae_title.as_deref().unwrap_or("ANY-SCP");
                tokio::time::timeout(
                    Duration::from_secs(60),
                    c_store(
                        &self.calling_ae,
                        aet,
                        addr,
                        &ix.sop_class_uid,
                        &ix.sop_instance_uid,
                        &ix.transfer_syntax,
                        &file,
                    ),
                )
                .await
                .map_err(|_| transient("C-STORE timed out"))?
            }
            DestinationKind::Stow => {
                let url = dest.url.as_deref().ok_or_else(|| Failure {
                    message: "no url configured".into(),
                    retry: false,
                })?;
                let outbound = self.outbound.as_ref().map_err(|e| Failure {
                    message: e.clone(),
                    retry: false,
                })?;
                stow(outbound, url, Bytes::from(file)).await
            }
        }
    }
}

/// The data set bytes of a Part 10 file (after the file meta group).
fn data_set(part10: &[u8]) -> Option<&[u8]> {
    crate::dicom::parse::data_set_of(part10)
}

/// One C-STORE over a new association; the instance goes in its stored transfer syntax.
async fn c_store(
    calling: &str,
    called: &str,
    addr: &str,
    sop_class: &str,
    sop_instance: &str,
    ts: &str,
    file: &[u8],
) -> Result<(), Failure> {
    let data = data_set(file).ok_or_else(|| Failure {
        message: "stored file has no data set".into(),
        retry: false,
    })?;
    let mut assoc = ClientAssociationOptions::new()
        .calling_ae_title(calling)
        .called_ae_title(called)
        .with_presentation_context(sop_class, vec![ts])
        .connection_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(30))
        .establish_async(addr)
        .await
        .map_err(|e| transient(format!("association with {called}@{addr} failed: {e}")))?;
    let pc = assoc
        .presentation_contexts()
        .iter()
        .find(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .map(|pc| pc.id);
    let Some(pc) = pc else {
        let _ = assoc.abort().await;
        return Err(Failure {
            message: format!(
                "{called} accepts neither SOP class {sop_class} nor transfer syntax {ts}"
            ),
            retry: false,
        });
    };
    let cmd = command_set(0x0001, 1, sop_class, Some(sop_instance), None, true);
    assoc
        .send(&command_pdu(pc, cmd))
        .await
        .map_err(|e| transient(e.to_string()))?;
    {
        let mut w = assoc.send_pdata(pc);
        w.write_all(data)
            .await
            .map_err(|e| transient(e.to_string()))?;
        w.finish().await.map_err(|e| transient(e.to_string()))?;
    }
    let mut reply = Vec::new();
    let st = loop {
        match assoc
            .receive()
            .await
            .map_err(|e| transient(e.to_string()))?
        {
            Pdu::PData { data } => {
                for pdv in data {
                    if pdv.value_type == PDataValueType::Command {
                        reply.extend_from_slice(&pdv.data);
                    }
                    if pdv.is_last && pdv.value_type == PDataValueType::Command {
                        break;
                    }
                }
                if let Some(s) = Command::parse(&reply).status {
                    break s;
                }
            }
            Pdu::AbortRQ { .. } => {
                return Err(transient("the destination aborted the association"))
            }
            _ => {}
        }
    };
    let _ = assoc.release().await;
    match st {
        status::SUCCESS => Ok(()),
        s if s & 0xF000 == 0xB000 => Ok(()), // warning: stored
        s if s & 0xFF00 == 0xA700 => Err(transient(format!(
            "C-STORE status {s:04X} (out of resources)"
        ))),
        s => Err(Failure {
            message: format!("C-STORE refused with status {s:04X}"),
            retry: false,
        }),
    }
}

/// One STOW-RS request with one instance, through the outbound client (the configured
/// destinations are its allow-list). A refusal's text names the status, not the peer's body.
async fn stow(outbound: &Outbound, base: &str, file: Bytes) -> Result<(), Failure> {
    let url = format!("{}/studies", base.trim_end_matches('/'));
    let boundary = format!("carina-{}", uuid::Uuid::new_v4().simple());
    let mut body = format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").into_bytes();
    body.extend_from_slice(&file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let ct = format!("multipart/related; type=\"application/dicom\"; boundary={boundary}");
    let answer = outbound
        .post(
            &url,
            &[("content-type", &ct), ("accept", "application/dicom+json")],
            body,
            Duration::from_secs(60),
        )
        .await
        .map_err(|e| Failure {
            retry: e.transient(),
            message: e.to_string(),
        })?;
    let code = answer.status;
    if code.is_success() && code != reqwest::StatusCode::ACCEPTED {
        Ok(())
    } else if code.is_server_error()
        || code == reqwest::StatusCode::TOO_MANY_REQUESTS
        || code == reqwest::StatusCode::REQUEST_TIMEOUT
    {
        Err(transient(format!("STOW-RS answered {}", code.as_u16())))
    } else {
        Err(Failure {
            message: format!("STOW-RS answered {}", code.as_u16()),
            retry: false,
        })
    }
}
