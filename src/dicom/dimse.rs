//! DIMSE service class provider over DICOM Upper Layer (dicom-ul): C-ECHO and C-STORE.
//! Associations are refused (A-ASSOCIATE-RJ, transient) when free space is below the
//! watermark or the association limit is reached, and by AE title rules. Each received instance
//! goes through [`crate::ingest`]; the C-STORE-RSP status is 0000 only once it is durably
//! stored.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dicom_object::FileMetaTableBuilder;
use dicom_ul::association::server::{AccessControl, ServerAssociationOptions};
use dicom_ul::association::Association;
use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJServiceUserReason, AssociationRJSource, PDataValue, PDataValueType, UserIdentity,
};
use dicom_ul::Pdu;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::sc::IMPLEMENTATION_CLASS_UID;
use super::status;
use crate::config::DicomSettings;
use crate::ingest::Ingest;
use crate::store::Source;

/// Verification SOP Class (C-ECHO).
pub const VERIFICATION: &str = "1.2.840.10008.1.1";

const C_STORE_RQ: u16 = 0x0001;
const C_STORE_RSP: u16 = 0x8001;
const C_ECHO_RQ: u16 = 0x0030;
const C_ECHO_RSP: u16 = 0x8030;
const NO_DATA_SET: u16 = 0x0101;

/// AE title rules applied to A-ASSOCIATE-RQ.
#[derive(Debug, Clone)]
struct AeRules {
    check_called: bool,
    /// Whether an allow-list is configured at all.
    restricted: bool,
    /// The calling AE titles allowed from this peer's address.
    allowed: Vec<String>,
}

/// The calling AE titles of `allowed_calling_aes` that this peer may use: `AE` from any
/// address, `AE@host` only when `host` (an address or a name, resolved now) is the peer's.
async fn allowed_for(entries: &[String], peer: std::net::IpAddr) -> Vec<String> {
    let mut out = Vec::new();
    for e in entries {
        match e.rsplit_once('@') {
            None => out.push(e.trim().to_string()),
            Some((ae, host)) => {
                let host = host.trim().trim_start_matches('[').trim_end_matches(']');
                let matches = match host.parse::<std::net::IpAddr>() {
                    Ok(ip) => ip == peer,
                    Err(_) => tokio::net::lookup_host((host, 0))
                        .await
                        .map(|mut a| a.any(|a| a.ip() == peer))
                        .unwrap_or(false),
                };
                if matches {
                    out.push(ae.trim().to_string());
                }
            }
        }
    }
    out
}

impl AccessControl for AeRules {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        if self.check_called && called_ae_title.trim() != this_ae_title.trim() {
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        if self.restricted
            && !self
                .allowed
                .iter()
                .any(|a| a.trim() == calling_ae_title.trim())
        {
            return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
        }
        Ok(())
    }
}

/// Runs the SCP on `listener` until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    settings: DicomSettings,
    ingest: Ingest,
    max_instance: usize,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let slots = Arc::new(Semaphore::new(settings.max_associations.max(1)));
    let waiting = Arc::new(Semaphore::new(settings.max_associations.max(1) * 4));
    let settings = Arc::new(settings);
    loop {
        let (socket, peer) = tokio::select! {
            () = &mut stop => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "DIMSE accept failed");
                    continue;
                }
            },
        };
        if !ingest.has_space() {
            crate::metrics::global().dimse_association("rejected");
            tracing::warn!(%peer, "association refused: free space below the watermark");
            tokio::spawn(reject(
                socket,
                AssociationRJServiceProviderPresentationReason::TemporaryCongestion,
            ));
            continue;
        }
        // connections that have not sent an A-ASSOCIATE-RQ yet are bounded too
        let Ok(pending) = waiting.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection dropped: too many connections without an association");
            continue;
        };
        let (settings, ingest, slots) = (settings.clone(), ingest.clone(), slots.clone());
        tokio::spawn(async move {
            if let Err(e) =
                association(socket, &settings, &ingest, max_instance, slots, pending).await
            {
                tracing::info!(%peer, error = %e, "association ended");
            }
        });
    }
}

/// Reads the A-ASSOCIATE-RQ and answers A-ASSOCIATE-RJ (transient, service provider).
async fn reject(socket: TcpStream, reason: AssociationRJServiceProviderPresentationReason) {
    reject_with(
        socket,
        AssociationRJResult::Transient,
        AssociationRJSource::ServiceProviderPresentation(reason),
    )
    .await;
}

/// The called and calling AE titles of the A-ASSOCIATE-RQ waiting on `socket`, read without
/// consuming it (PS3.8 9.3.2: called AE at bytes 10..26, calling AE at 26..42).
async fn peek_ae_titles(socket: &TcpStream) -> Option<(String, String)> {
    let mut buf = [0u8; 42];
    let peeked = async {
        loop {
            let n = socket.peek(&mut buf).await.ok()?;
            if n >= 42 || n == 0 {
                return (n >= 42 && buf[0] == 0x01).then_some(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), peeked)
        .await
        .ok()??;
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
    Some((text(&buf[10..26]), text(&buf[26..42])))
}

/// Reads the A-ASSOCIATE-RQ, answers A-ASSOCIATE-RJ, and lets the requestor close first
/// (closing with unread input would reset the connection and could discard the RJ).
async fn reject_with(
    mut socket: TcpStream,
    result: AssociationRJResult,
    source: AssociationRJSource,
) {
    let mut header = [0u8; 6];
    let read = async {
        socket.read_exact(&mut header).await?;
        let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]).min(1 << 20);
        let mut rest = vec![0u8; len as usize];
        socket.read_exact(&mut rest).await?;
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .is_err()
    {
        return;
    }
    let pdu = Pdu::AssociationRJ(AssociationRJ { result, source });
    let mut out = Vec::new();
    if dicom_ul::pdu::write_pdu(&mut out, &pdu).is_ok() {
        let _ = socket.write_all(&out).await;
        let _ = socket.flush().await;
        let mut sink = [0u8; 512];
        let drain = async { while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {} };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    }
}

/// A C-STORE whose data set is being received.
struct PendingStore {
    message_id: u16,
    sop_class: String,
    sop_instance: String,
    context: u8,
    data: Vec<u8>,
    overflow: bool,
}

/// Largest DIMSE command set accepted (a C-STORE-RQ is a few hundred bytes).
const MAX_COMMAND_SET: usize = 64 * 1024;

async fn association(
    socket: TcpStream,
    settings: &DicomSettings,
    ingest: &Ingest,
    max_instance: usize,
    slots: Arc<Semaphore>,
    pending: tokio::sync::OwnedSemaphorePermit,
) -> Result<(), dicom_ul::association::Error> {
    let peer = socket.peer_addr().map(|a| a.ip()).ok();
    let allowed = match peer {
        Some(ip) => allowed_for(&settings.allowed_calling_aes, ip).await,
        None => Vec::new(),
    };
    let rules = AeRules {
        check_called: settings.check_called_ae,
        restricted: !settings.allowed_calling_aes.is_empty(),
        allowed,
    };
    // AE title rules are checked here, so the rejection is sent like the others (dicom-ul
    // closes right after its own RJ, which some requestors then miss)
    // no A-ASSOCIATE-RQ within 10 s (or something else): the connection is dropped
    let Some((called, calling)) = peek_ae_titles(&socket).await else {
        tracing::info!("connection dropped: no A-ASSOCIATE-RQ");
        return Ok(());
    };
    let actor = crate::audit::Actor {
        who: format!("AE:{calling}"),
        client_id: None,
        address: peer.map(|p| p.to_string()),
        system: false,
    };
    if let Err(reason) = rules.check_access(&settings.ae_title, &calling, &called, None) {
        crate::metrics::global().dimse_association("rejected");
        tracing::warn!(calling = %calling, "association refused by AE title rules");
        audit_association(ingest, &actor, false).await;
        reject_with(
            socket,
            AssociationRJResult::Permanent,
            AssociationRJSource::ServiceUser(reason),
        )
        .await;
        return Ok(());
    }
    // the A-ASSOCIATE-RQ arrived and passed the AE rules: now it may take an association slot
    let Ok(_slot) = slots.try_acquire_owned() else {
        crate::metrics::global().dimse_association("rejected");
        tracing::warn!("association refused: association limit reached");
        reject(
            socket,
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        )
        .await;
        return Ok(());
    };
    drop(pending);
    let idle = Duration::from_secs(settings.idle_timeout_secs.max(1));
    let mut options = ServerAssociationOptions::new()
        .ae_access_control(rules)
        .ae_title(settings.ae_title.clone())
        .max_pdu_length(settings.max_pdu)
        .read_timeout(idle)
        .write_timeout(idle)
        // any storage SOP class is accepted (stored, analysed when routed)
        .promiscuous(true)
        .with_abstract_syntax(VERIFICATION);
    for ts in &settings.transfer_syntaxes {
        options = options.with_transfer_syntax(ts.clone());
    }
    let mut assoc = options.establish_async(socket).await?;
    tracing::info!(calling = assoc.peer_ae_title(), "association accepted");
    crate::metrics::global().dimse_association("accepted");
    audit_association(ingest, &actor, true).await;
    let mut command: Vec<u8> = Vec::new();
    let mut pending: Option<PendingStore> = None;
    loop {
        match assoc.receive().await? {
            Pdu::PData { data } => {
                for pdv in data {
                    match pdv.value_type {
                        PDataValueType::Command => {
                            if command.len() + pdv.data.len() > MAX_COMMAND_SET {
                                tracing::warn!("association aborted: command set larger than {MAX_COMMAND_SET} bytes");
                                let _ = assoc.abort().await;
                                return Ok(());
                            }
                            command.extend_from_slice(&pdv.data);
                            if !pdv.is_last {
                                continue;
                            }
                            let cmd = Command::parse(&command);
                            command.clear();
                            let reply = match cmd.field {
                                Some(C_ECHO_RQ) => Some(response(
                                    C_ECHO_RSP,
                                    cmd.message_id,
                                    &cmd.sop_class.clone().unwrap_or_else(|| VERIFICATION.into()),
                                    None,
                                    status::SUCCESS,
                                )),
                                Some(C_STORE_RQ) if cmd.has_data_set => {
                                    pending = Some(PendingStore {
                                        message_id: cmd.message_id,
                                        sop_class: cmd.sop_class.unwrap_or_default(),
                                        sop_instance: cmd.sop_instance.unwrap_or_default(),
                                        context: pdv.presentation_context_id,
                                        data: Vec::new(),
                                        overflow: false,
                                    });
                                    None
                                }
                                Some(field) => Some(response(
                                    field | 0x8000,
                                    cmd.message_id,
                                    &cmd.sop_class.unwrap_or_default(),
                                    None,
                                    status::UNRECOGNIZED_OPERATION,
                                )),
                                None => None,
                            };
                            if let Some(r) = reply {
                                send_command(&mut assoc, pdv.presentation_context_id, r).await?;
                            }
                        }
                        PDataValueType::Data => {
                            let Some(p) = pending.as_mut() else { continue };
                            if p.data.len() + pdv.data.len() > max_instance {
                                p.overflow = true;
                                p.data = Vec::new();
                            } else if !p.overflow {
                                p.data.extend_from_slice(&pdv.data);
                            }
                            if pdv.is_last {
                                if let Some(p) = pending.take() {
                                    let ts = assoc
                                        .presentation_contexts()
                                        .iter()
                                        .find(|pc| pc.id == p.context)
                                        .map(|pc| pc.transfer_syntax.clone())
                                        .unwrap_or_default();
                                    // stored and audited as this peer, in one transaction
                                    let st = crate::audit::ACTOR
                                        .scope(actor.clone(), store(ingest, &p, &ts))
                                        .await;
                                    let r = response(
                                        C_STORE_RSP,
                                        p.message_id,
                                        &p.sop_class,
                                        Some(&p.sop_instance),
                                        st,
                                    );
                                    send_command(&mut assoc, p.context, r).await?;
                                }
                            }
                        }
                    }
                }
            }
            Pdu::ReleaseRQ => {
                assoc.send(&Pdu::ReleaseRP).await?;
                tracing::info!("association released");
                return Ok(());
            }
            Pdu::AbortRQ { .. } => {
                tracing::info!("association aborted by the peer");
                return Ok(());
            }
            _ => {}
        }
    }
}

/// Records an association (accepted, or refused by the AE rules: a security alert).
async fn audit_association(ingest: &Ingest, actor: &crate::audit::Actor, accepted: bool) {
    let event = crate::audit::Event {
        kind: if accepted {
            crate::audit::Kind::Association
        } else {
            crate::audit::Kind::SecurityAlert
        },
        action: crate::audit::Action::Execute,
        outcome: if accepted { 0 } else { 4 },
        outcome_text: Some(
            if accepted {
                "DIMSE association accepted"
            } else {
                "DIMSE association refused by the AE title rules"
            }
            .into(),
        ),
        entities: Vec::new(),
    };
    if let Err(e) = ingest.store().audit(&event, actor).await {
        tracing::warn!(error = %e, "cannot record an AuditEvent");
    }
}

/// Stores one received data set; returns the C-STORE-RSP status (counted in `/metrics`).
async fn store(ingest: &Ingest, p: &PendingStore, ts: &str) -> u16 {
    let status = store_inner(ingest, p, ts).await;
    crate::metrics::global().dimse_store(status);
    status
}

async fn store_inner(ingest: &Ingest, p: &PendingStore, ts: &str) -> u16 {
    if p.overflow {
        tracing::warn!("C-STORE refused: instance larger than the configured limit");
        return status::OUT_OF_RESOURCES;
    }
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(p.sop_class.as_str())
        .media_storage_sop_instance_uid(p.sop_instance.as_str())
        .transfer_syntax(ts)
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name("CARINA")
        .build();
    let Ok(meta) = meta else {
        return status::CANNOT_UNDERSTAND;
    };
    let mut file = vec![0u8; 128];
    file.extend_from_slice(b"DICM");
    if meta.write(&mut file).is_err() {
        return status::PROCESSING_FAILURE;
    }
    file.extend_from_slice(&p.data);
    match ingest.receive(Bytes::from(file), Source::Dimse, None).await {
        Ok(a) => {
            if a.index.sop_instance_uid != p.sop_instance.trim_end_matches('\0') {
                tracing::warn!("C-STORE: Affected SOP Instance UID differs from the data set's");
            }
            status::SUCCESS
        }
        Err(e) => {
            tracing::warn!(error = %e, status = format!("{:04X}", e.status()), "C-STORE refused");
            e.status()
        }
    }
}

async fn send_command(
    assoc: &mut dicom_ul::association::AsyncServerAssociation<TcpStream>,
    context: u8,
    data: Vec<u8>,
) -> Result<(), dicom_ul::association::Error> {
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: context,
                value_type: PDataValueType::Command,
                is_last: true,
                data,
            }],
        })
        .await
}

/// The elements of a DIMSE command set Carina reads (Implicit VR Little Endian, PS3.7 E).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Command {
    /// Command Field.
    pub field: Option<u16>,
    /// Message ID.
    pub message_id: u16,
    /// Affected SOP Class UID.
    pub sop_class: Option<String>,
    /// Affected SOP Instance UID.
    pub sop_instance: Option<String>,
    /// Whether a data set follows.
    pub has_data_set: bool,
    /// Status (responses).
    pub status: Option<u16>,
}

impl Command {
    /// Reads the elements Carina needs; unknown ones are skipped.
    pub fn parse(b: &[u8]) -> Self {
        let mut c = Command::default();
        let mut i = 0;
        while i + 8 <= b.len() {
            let group = u16::from_le_bytes([b[i], b[i + 1]]);
            let elem = u16::from_le_bytes([b[i + 2], b[i + 3]]);
            let len = u32::from_le_bytes([b[i + 4], b[i + 5], b[i + 6], b[i + 7]]) as usize;
            let Some(v) = b.get(i + 8..i + 8 + len) else {
                break;
            };
            let us = || (v.len() >= 2).then(|| u16::from_le_bytes([v[0], v[1]]));
            let ui = || {
                String::from_utf8_lossy(v)
                    .trim_end_matches(['\0', ' '])
                    .to_string()
            };
            if group == 0 {
                match elem {
                    0x0002 => c.sop_class = Some(ui()),
                    0x0100 => c.field = us(),
                    0x0110 => c.message_id = us().unwrap_or(0),
                    0x0800 => c.has_data_set = us().is_some_and(|t| t != NO_DATA_SET),
                    0x0900 => c.status = us(),
                    0x1000 => c.sop_instance = Some(ui()),
                    _ => {}
                }
            }
            i += 8 + len;
        }
        c
    }
}

/// A DIMSE command set (Implicit VR Little Endian, with its group length): a request when
/// `field` has no 0x8000 bit (Message ID, priority), a response otherwise (Message ID Being
/// Responded To, Status).
pub(super) fn command_set(
    field: u16,
    message_id: u16,
    sop_class: &str,
    sop_instance: Option<&str>,
    status: Option<u16>,
    data_set: bool,
) -> Vec<u8> {
    fn put(out: &mut Vec<u8>, elem: u16, v: &[u8]) {
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&elem.to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
    }
    fn uid(s: &str) -> Vec<u8> {
        let mut v = s.trim_end_matches('\0').as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        v
    }
    let response = field & 0x8000 != 0;
    let mut body = Vec::new();
    put(&mut body, 0x0002, &uid(sop_class));
    put(&mut body, 0x0100, &field.to_le_bytes());
    if response {
        put(&mut body, 0x0120, &message_id.to_le_bytes());
    } else {
        put(&mut body, 0x0110, &message_id.to_le_bytes());
        put(&mut body, 0x0700, &0u16.to_le_bytes()); // priority: medium
    }
    let data_set_type = if data_set { 0x0000u16 } else { NO_DATA_SET };
    put(&mut body, 0x0800, &data_set_type.to_le_bytes());
    if let Some(st) = status {
        put(&mut body, 0x0900, &st.to_le_bytes());
    }
    if let Some(i) = sop_instance {
        put(&mut body, 0x1000, &uid(i));
    }
    let mut out = Vec::with_capacity(body.len() + 12);
    put(&mut out, 0x0000, &(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// A response command set with its status.
fn response(
    field: u16,
    responding_to: u16,
    sop_class: &str,
    sop_instance: Option<&str>,
    st: u16,
) -> Vec<u8> {
    command_set(
        field,
        responding_to,
        sop_class,
        sop_instance,
        Some(st),
        false,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_round_trips_through_the_command_parser() {
        let r = response(
            C_STORE_RSP,
            7,
            "1.2.840.10008.5.1.4.1.1.7",
            Some("1.2.3"),
            0xA700,
        );
        let c = Command::parse(&r);
        assert_eq!(c.field, Some(C_STORE_RSP));
        assert_eq!(c.sop_class.as_deref(), Some("1.2.840.10008.5.1.4.1.1.7"));
        assert_eq!(c.sop_instance.as_deref(), Some("1.2.3"));
        assert!(!c.has_data_set);
        assert_eq!(c.status, Some(0xA700));
        let rq = Command::parse(&command_set(
            C_STORE_RQ,
            3,
            "1.2",
            Some("1.2.3"),
            None,
            true,
        ));
        assert_eq!(
            (rq.field, rq.message_id, rq.has_data_set),
            (Some(C_STORE_RQ), 3, true)
        );
        let gl = u32::from_le_bytes([r[8], r[9], r[10], r[11]]) as usize;
        assert_eq!(gl, r.len() - 12, "group length covers the rest");
        assert_eq!(r.len() % 2, 0);
    }

    #[test]
    fn ae_rules() {
        let open = AeRules {
            check_called: true,
            restricted: false,
            allowed: vec![],
        };
        assert!(open.check_access("CARINA", "ANY", "CARINA", None).is_ok());
        assert!(open.check_access("CARINA", "ANY", "OTHER", None).is_err());
        let closed = AeRules {
            check_called: false,
            restricted: true,
            allowed: vec!["PACS".into()],
        };
        assert!(closed.check_access("CARINA", "PACS", "X", None).is_ok());
        assert!(closed
            .check_access("CARINA", "ROGUE", "CARINA", None)
            .is_err());
        let nobody = AeRules {
            check_called: false,
            restricted: true,
            allowed: vec![],
        };
        assert!(
            nobody
                .check_access("CARINA", "PACS", "CARINA", None)
                .is_err(),
            "an allow-list none of whose entries match this peer refuses"
        );
    }

    #[tokio::test]
    async fn calling_aes_pair_with_the_peer_host() {
        let entries = vec![
            "ANY".to_string(),
            "PACS@10.0.0.5".to_string(),
            "LOCAL@localhost".to_string(),
            "V6@[::1]".to_string(),
        ];
        let from = |ip: &str| allowed_for(&entries, ip.parse().unwrap());
        assert_eq!(from("10.0.0.5").await, vec!["ANY", "PACS"]);
        assert_eq!(from("10.0.0.6").await, vec!["ANY"]);
        assert_eq!(from("127.0.0.1").await, vec!["ANY", "LOCAL"]);
        assert!(from("::1").await.contains(&"V6".to_string()));
    }
}
