//! The DIMSE message codec (PS3.7): command sets in Implicit VR Little Endian, read and
//! written for both sides Carina plays: the C-STORE/C-ECHO SCP ([`crate::ingest::dimse`]) and
//! the export SCU ([`crate::outbound::export`]). Only the elements Carina needs are read.

use dicom_ul::pdu::{PDataValue, PDataValueType};
use dicom_ul::Pdu;

/// Verification SOP Class (C-ECHO).
pub const VERIFICATION: &str = "1.2.840.10008.1.1";
/// C-STORE-RQ command field.
pub const C_STORE_RQ: u16 = 0x0001;
/// C-STORE-RSP command field.
pub const C_STORE_RSP: u16 = 0x8001;
/// C-ECHO-RQ command field.
pub const C_ECHO_RQ: u16 = 0x0030;
/// C-ECHO-RSP command field.
pub const C_ECHO_RSP: u16 = 0x8030;
/// Command Data Set Type: no data set follows.
const NO_DATA_SET: u16 = 0x0101;

/// A P-DATA-TF PDU carrying one whole command set on `context`.
pub fn command_pdu(context: u8, data: Vec<u8>) -> Pdu {
    Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: context,
            value_type: PDataValueType::Command,
            is_last: true,
            data,
        }],
    }
}

/// The elements of a DIMSE command set Carina reads (Implicit VR Little Endian, PS3.7 E).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Command {
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
pub fn command_set(
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
pub fn response(
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
}
