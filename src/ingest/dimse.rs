//! The DIMSE transport into ingest: a C-ECHO/C-STORE service class provider over the DICOM
//! Upper Layer (dicom-ul), in the shape of mini-redis: [`serve`] is the listener (admission:
//! free space, connections waiting for an A-ASSOCIATE-RQ), [`admit`] applies the AE title rules
//! and the association limit, and a [`Handler`] per association turns each message into one
//! small method call until release, abort, idle timeout or the shutdown signal. Each received
//! instance goes through [`Ingest::receive`]; the C-STORE-RSP status is 0000 only once it is
//! durably stored. Command sets are read and written by the codec in [`crate::dicom::dimse`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dicom_object::FileMetaTableBuilder;
use dicom_ul::association::server::{AccessControl, ServerAssociationOptions};
use dicom_ul::association::{Association, AsyncServerAssociation};
use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJServiceUserReason, AssociationRJSource, PDataValue, PDataValueType, UserIdentity,
};
use dicom_ul::Pdu;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::Ingest;
use crate::dicom::dimse::{
    command_pdu, response, Command, C_ECHO_RQ, C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP, VERIFICATION,
};
use crate::dicom::sc::IMPLEMENTATION_CLASS_UID;
use crate::dicom::status;
use crate::store::Source;

/// How the SCP admits and serves associations (from the `[dicom]` settings).
#[derive(Debug, Clone)]
pub struct ScpOptions {
    /// This SCP's AE title.
    pub ae_title: String,
    /// Whether the called AE title must be ours.
    pub check_called_ae: bool,
    /// Calling AE titles allowed (`AE` or `AE@host`); empty: any.
    pub allowed_calling_aes: Vec<String>,
    /// Concurrent associations.
    pub max_associations: usize,
    /// Largest PDU accepted.
    pub max_pdu: u32,
    /// An association idle this long is dropped.
    pub idle_timeout: Duration,
    /// Transfer syntaxes accepted.
    pub transfer_syntaxes: Vec<String>,
    /// Largest instance accepted, in bytes (a larger one answers A700).
    pub max_instance: usize,
}

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

/// Runs the SCP on `listener` until `stop` resolves: accepts connections, refuses them while
/// free space is short, bounds those still without an A-ASSOCIATE-RQ, and hands each to
/// [`admit`] and a [`Handler`]. Associations in progress end at their next message after
/// `stop` (A-ABORT; an unacknowledged C-STORE is sent again by the peer).
pub async fn serve(
    listener: TcpListener,
    options: ScpOptions,
    ingest: Ingest,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let slots = Arc::new(Semaphore::new(options.max_associations.max(1)));
    let waiting = Arc::new(Semaphore::new(options.max_associations.max(1) * 4));
    let options = Arc::new(options);
    let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
    loop {
        let (socket, peer) = tokio::select! {
            () = &mut stop => {
                let _ = shutdown_tx.send(true);
                return;
            }
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
        let (options, ingest, slots) = (options.clone(), ingest.clone(), slots.clone());
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let Some((handler, _slot)) = admit(socket, &options, &ingest, slots, pending).await
            else {
                return;
            };
            if let Err(e) = handler.run(shutdown).await {
                tracing::info!(%peer, error = %e, "association ended");
            }
        });
    }
}

/// Reads the A-ASSOCIATE-RQ, applies the AE title rules (refused: A-ASSOCIATE-RJ and a
/// security AuditEvent) and the association limit, and establishes the association. Returns
/// its handler and the association slot it holds, or `None` when refused or dropped.
pub async fn admit(
    socket: TcpStream,
    options: &ScpOptions,
    ingest: &Ingest,
    slots: Arc<Semaphore>,
    pending: tokio::sync::OwnedSemaphorePermit,
) -> Option<(Handler, tokio::sync::OwnedSemaphorePermit)> {
    let peer = socket.peer_addr().map(|a| a.ip()).ok();
    let allowed = match peer {
        Some(ip) => allowed_for(&options.allowed_calling_aes, ip).await,
        None => Vec::new(),
    };
    let rules = AeRules {
        check_called: options.check_called_ae,
        restricted: !options.allowed_calling_aes.is_empty(),
        allowed,
    };
    // AE title rules are checked here, so the rejection is sent like the others (dicom-ul
    // closes right after its own RJ, which some requestors then miss); no A-ASSOCIATE-RQ
    // within 10 s (or something else): the connection is dropped
    let Some((called, calling)) = peek_ae_titles(&socket).await else {
        tracing::info!("connection dropped: no A-ASSOCIATE-RQ");
        return None;
    };
    let actor = crate::audit::Actor {
        who: format!("AE:{calling}"),
        client_id: None,
        address: peer.map(|p| p.to_string()),
        system: false,
    };
    if let Err(reason) = rules.check_access(&options.ae_title, &calling, &called, None) {
        crate::metrics::global().dimse_association("rejected");
        tracing::warn!(calling = %calling, "association refused by AE title rules");
        audit_association(ingest, &actor, false).await;
        let source = AssociationRJSource::ServiceUser(reason);
        reject_with(socket, AssociationRJResult::Permanent, source).await;
        return None;
    }
    // the A-ASSOCIATE-RQ arrived and passed the AE rules: now it may take an association slot
    let Ok(slot) = slots.try_acquire_owned() else {
        crate::metrics::global().dimse_association("rejected");
        tracing::warn!("association refused: association limit reached");
        let reason = AssociationRJServiceProviderPresentationReason::LocalLimitExceeded;
        reject(socket, reason).await;
        return None;
    };
    drop(pending);
    let mut scp = ServerAssociationOptions::new()
        .ae_access_control(rules)
        .ae_title(options.ae_title.clone())
        .max_pdu_length(options.max_pdu)
        .read_timeout(options.idle_timeout)
        .write_timeout(options.idle_timeout)
        // any storage SOP class is accepted (stored, analysed when routed)
        .promiscuous(true)
        .with_abstract_syntax(VERIFICATION);
    for ts in &options.transfer_syntaxes {
        scp = scp.with_transfer_syntax(ts.clone());
    }
    let assoc = match scp.establish_async(socket).await {
        Ok(a) => a,
        Err(e) => {
            tracing::info!(error = %e, "association not established");
            return None;
        }
    };
    tracing::info!(calling = assoc.peer_ae_title(), "association accepted");
    crate::metrics::global().dimse_association("accepted");
    audit_association(ingest, &actor, true).await;
    let handler = Handler {
        assoc,
        ingest: ingest.clone(),
        actor,
        max_instance: options.max_instance,
        command: Vec::new(),
        pending: None,
    };
    Some((handler, slot))
}

/// One established association: reassembles command sets and data sets from P-DATA-TF and
/// answers each message.
pub struct Handler {
    assoc: AsyncServerAssociation<TcpStream>,
    ingest: Ingest,
    /// The peer as the audit trail names it (`AE:<calling AE title>`, its address).
    actor: crate::audit::Actor,
    max_instance: usize,
    /// The command set being received.
    command: Vec<u8>,
    /// The C-STORE whose data set is being received.
    pending: Option<PendingStore>,
}

/// Whether a [`Handler`] goes on after a message.
enum Flow {
    Continue,
    /// Released or aborted by the peer.
    Done,
    /// A protocol limit was broken: Carina aborts.
    Abort,
}

type UlResult<T> = Result<T, dicom_ul::association::Error>;

/// Resolves once `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|v| *v).await;
}

impl Handler {
    /// Serves the association until the peer releases or aborts it, it idles out, a protocol
    /// limit is broken (A-ABORT), or `shutdown` turns true (A-ABORT).
    ///
    /// # Errors
    /// The Upper Layer's error when reading or writing fails.
    pub async fn run(mut self, mut shutdown: tokio::sync::watch::Receiver<bool>) -> UlResult<()> {
        loop {
            let pdu = tokio::select! {
                r = self.assoc.receive() => Some(r?),
                () = stopped(&mut shutdown) => None,
            };
            let flow = match pdu {
                Some(pdu) => self.on_pdu(pdu).await?,
                None => {
                    tracing::info!("association aborted: shutting down");
                    Flow::Abort
                }
            };
            match flow {
                Flow::Continue => {}
                Flow::Done => return Ok(()),
                Flow::Abort => {
                    let _ = self.assoc.abort().await;
                    return Ok(());
                }
            }
        }
    }

    async fn on_pdu(&mut self, pdu: Pdu) -> UlResult<Flow> {
        match pdu {
            Pdu::PData { data } => {
                for pdv in data {
                    let flow = match pdv.value_type {
                        PDataValueType::Command => self.on_command(pdv).await?,
                        PDataValueType::Data => self.on_data(pdv).await?,
                    };
                    if !matches!(flow, Flow::Continue) {
                        return Ok(flow);
                    }
                }
                Ok(Flow::Continue)
            }
            Pdu::ReleaseRQ => {
                self.assoc.send(&Pdu::ReleaseRP).await?;
                tracing::info!("association released");
                Ok(Flow::Done)
            }
            Pdu::AbortRQ { .. } => {
                tracing::info!("association aborted by the peer");
                Ok(Flow::Done)
            }
            _ => Ok(Flow::Continue),
        }
    }

    /// A command set fragment; a whole one is answered (C-ECHO, unknown operations) or opens
    /// a C-STORE whose data set follows.
    async fn on_command(&mut self, pdv: PDataValue) -> UlResult<Flow> {
        if self.command.len() + pdv.data.len() > MAX_COMMAND_SET {
            tracing::warn!("association aborted: command set larger than {MAX_COMMAND_SET} bytes");
            return Ok(Flow::Abort);
        }
        self.command.extend_from_slice(&pdv.data);
        if !pdv.is_last {
            return Ok(Flow::Continue);
        }
        let cmd = Command::parse(&std::mem::take(&mut self.command));
        let context = pdv.presentation_context_id;
        let reply = match cmd.field {
            Some(C_ECHO_RQ) => {
                let class = cmd.sop_class.as_deref().unwrap_or(VERIFICATION);
                response(C_ECHO_RSP, cmd.message_id, class, None, status::SUCCESS)
            }
            Some(C_STORE_RQ) if cmd.has_data_set => {
                self.pending = Some(PendingStore {
                    message_id: cmd.message_id,
                    sop_class: cmd.sop_class.unwrap_or_default(),
                    sop_instance: cmd.sop_instance.unwrap_or_default(),
                    context,
                    data: Vec::new(),
                    overflow: false,
                });
                return Ok(Flow::Continue);
            }
            Some(field) => {
                let class = cmd.sop_class.unwrap_or_default();
                let st = status::UNRECOGNIZED_OPERATION;
                response(field | 0x8000, cmd.message_id, &class, None, st)
            }
            None => return Ok(Flow::Continue),
        };
        self.assoc.send(&command_pdu(context, reply)).await?;
        Ok(Flow::Continue)
    }

    /// A data set fragment of the open C-STORE; the last one stores the instance and answers.
    async fn on_data(&mut self, pdv: PDataValue) -> UlResult<Flow> {
        let Some(p) = self.pending.as_mut() else {
            return Ok(Flow::Continue);
        };
        if p.data.len() + pdv.data.len() > self.max_instance {
            p.overflow = true;
            p.data = Vec::new();
        } else if !p.overflow {
            p.data.extend_from_slice(&pdv.data);
        }
        if !pdv.is_last {
            return Ok(Flow::Continue);
        }
        if let Some(p) = self.pending.take() {
            let status = self.on_store(&p).await;
            let rsp = response(
                C_STORE_RSP,
                p.message_id,
                &p.sop_class,
                Some(&p.sop_instance),
                status,
            );
            self.assoc.send(&command_pdu(p.context, rsp)).await?;
        }
        Ok(Flow::Continue)
    }

    /// Stores one received instance as this peer (stored and audited in one transaction);
    /// the C-STORE-RSP status, counted in `/metrics`.
    async fn on_store(&self, p: &PendingStore) -> u16 {
        let ts = self
            .assoc
            .presentation_contexts()
            .iter()
            .find(|pc| pc.id == p.context)
            .map(|pc| pc.transfer_syntax.clone())
            .unwrap_or_default();
        let status = crate::audit::ACTOR
            .scope(self.actor.clone(), store(&self.ingest, p, &ts))
            .await;
        crate::metrics::global().dimse_store(status);
        status
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

/// Stores one received data set as a Part 10 file; the C-STORE-RSP status.
async fn store(ingest: &Ingest, p: &PendingStore, ts: &str) -> u16 {
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

#[cfg(test)]
mod tests {
    use super::*;

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
