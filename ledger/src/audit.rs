//! The tamper-evident audit log: every action in the clean room, as an
//! append-only chain of records each holding the hash of the one before.
//!
//! A record is a JSON body `{seq, at_ms, kind, party, detail, prev}` where
//! `prev` is the SHA-256 of the previous record's body (64 zeros before the
//! first). It is stored under its sequence number as `<hash>\n<body>`, with
//! `hash` = SHA-256 of `body`, beside a head `{seq, hash}` naming the last
//! record. Both ledger backends append a record in the same atomic write as
//! the action it records (a charge and its `query` record, a grant and its
//! `budget_grant` record), so the log and the budget never disagree.
//!
//! [`verify`] walks the chain and names each record that was edited (its body
//! no longer matches its hash), removed (a gap in the sequence, or a head
//! beyond the last record), moved or reordered (a record stored under another
//! sequence number than its own), or inserted (a record whose `prev` is not
//! its predecessor's hash). Someone who can rewrite the whole store can
//! rebuild a consistent chain from the point they changed; what they cannot do
//! is keep it consistent with a record's hash known outside the store: every
//! answer carries its `query` record's sequence number and hash
//! (`cleanroom.audit.record`), and `cleanroom audit verify --expect SEQ:HASH`
//! checks that the log still holds that record.
//!
//! Records hold who did what, the SQL text, options, charges and the shape of
//! results (column names and types, number of rows): never a value of an
//! answer or of the data.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{LedgerError, Result};

/// `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The kinds of records.
pub mod kind {
    pub const AUTH: &str = "auth";
    pub const AUTH_FAILURE: &str = "auth_failure";
    pub const QUERY: &str = "query";
    pub const ANSWER: &str = "answer";
    pub const QUERY_FAILURE: &str = "query_failure";
    pub const REFUSAL: &str = "refusal";
    pub const BUDGET_GRANT: &str = "budget_grant";
    pub const MANIFEST: &str = "manifest";
    pub const UPLOAD: &str = "upload";
    pub const UPLOAD_FAILURE: &str = "upload_failure";
    pub const EXPORT: &str = "export";
    pub const RETENTION: &str = "retention";
    pub const ALL: &[&str] = &[AUTH, AUTH_FAILURE, QUERY, ANSWER, QUERY_FAILURE, REFUSAL, BUDGET_GRANT, MANIFEST, UPLOAD, UPLOAD_FAILURE, EXPORT, RETENTION];
}

/// Something to record.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub kind: &'static str,
    pub party: Option<String>,
    /// A JSON object of the event's facts (never protected values).
    pub detail: Value,
}

impl AuditEvent {
    pub fn new(kind: &'static str, party: Option<&str>, detail: Value) -> Self {
        AuditEvent { kind, party: party.map(str::to_string), detail }
    }
}

/// One record of the log, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub party: Option<String>,
    pub detail: Value,
    /// Hash of the previous record's body.
    pub prev: String,
}

/// The last record of the log: its sequence number (0 for an empty log) and hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditHead {
    pub seq: u64,
    pub hash: String,
}

impl Default for AuditHead {
    fn default() -> Self {
        AuditHead { seq: 0, hash: GENESIS.to_string() }
    }
}

impl AuditHead {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a head serialises")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| LedgerError::Storage(format!("unreadable audit head: {e}")))
    }
}

/// A record ready to store: its key, the stored bytes, and the new head.
pub struct Sealed {
    pub seq: u64,
    pub hash: String,
    pub bytes: Vec<u8>,
    pub head: AuditHead,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The record that follows `head`.
pub fn seal(head: &AuditHead, event: &AuditEvent, at_ms: u64) -> Sealed {
    let record = AuditRecord {
        seq: head.seq + 1,
        at_ms,
        kind: event.kind.to_string(),
        party: event.party.clone(),
        detail: event.detail.clone(),
        prev: head.hash.clone(),
    };
    let body = serde_json::to_vec(&record).expect("a record serialises");
    let hash = sha256_hex(&body);
    let mut bytes = Vec::with_capacity(hash.len() + 1 + body.len());
    bytes.extend_from_slice(hash.as_bytes());
    bytes.push(b'\n');
    bytes.extend_from_slice(&body);
    Sealed { seq: record.seq, head: AuditHead { seq: record.seq, hash: hash.clone() }, hash, bytes }
}

/// Split stored bytes into (stated hash, body).
fn split(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let (hash, body) = (bytes.get(..64)?, bytes.get(65..)?);
    (bytes.get(64) == Some(&b'\n')).then_some(())?;
    Some((std::str::from_utf8(hash).ok()?, body))
}

/// Parse a stored record (without checking it).
pub fn parse(bytes: &[u8]) -> Result<AuditRecord> {
    let (_, body) = split(bytes).ok_or_else(|| LedgerError::Storage("malformed audit record".into()))?;
    serde_json::from_slice(body).map_err(|e| LedgerError::Storage(format!("malformed audit record: {e}")))
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq)]
pub struct Verification {
    pub records: u64,
    pub head: AuditHead,
    /// Each problem names the record(s) concerned; empty when the log is intact.
    pub problems: Vec<String>,
}

/// Check a log: `records` are (stored sequence number, stored bytes) in
/// ascending order, `head` the stored head. `expect` lists (seq, hash) pairs
/// known from outside the store (receipts), each of which must still be there.
pub fn verify(records: &[(u64, Vec<u8>)], head: Option<&AuditHead>, expect: &[(u64, String)]) -> Verification {
    let mut problems = Vec::new();
    let mut expected_seq = 1u64;
    let mut prev_hash = GENESIS.to_string();
    let mut hashes: std::collections::HashMap<u64, String> = std::collections::HashMap::new();
    // (sequence number, offset) of the last record found under another number.
    let mut shifted: Option<(u64, i128)> = None;
    for (key, bytes) in records {
        let key = *key;
        if key == 0 {
            problems.push("a record was inserted before record 1 (stored as record 0)".to_string());
            continue;
        }
        if key > expected_seq {
            problems.push(if key == expected_seq + 1 {
                format!("record {expected_seq} was removed (the log jumps from record {} to {key})", expected_seq.saturating_sub(1))
            } else {
                format!("records {expected_seq} to {} were removed (the log jumps from record {} to {key})", key - 1, expected_seq.saturating_sub(1))
            });
        }
        let gap = key > expected_seq;
        expected_seq = key + 1;
        let Some((stated, body)) = split(bytes) else {
            problems.push(format!("record {key} was edited: it is no longer a hash and a record"));
            prev_hash = String::new();
            continue;
        };
        let actual = sha256_hex(body);
        let record: Option<AuditRecord> = serde_json::from_slice(body).ok();
        if actual != stated {
            problems.push(format!("record {key} was edited: its content no longer matches its hash {stated}"));
        }
        match &record {
            None => problems.push(format!("record {key} was edited: its content is not a record")),
            Some(r) if r.seq != key => {
                // A run of records shifted by the same offset is one insertion
                // or removal: report its first record only.
                let offset = key as i128 - r.seq as i128;
                if shifted != Some((key.wrapping_sub(1), offset)) {
                    problems.push(format!(
                        "record {key} holds the record numbered {}: a record was inserted before it, or records were reordered",
                        r.seq
                    ));
                }
                shifted = Some((key, offset));
            }
            Some(r) if r.prev != prev_hash && !gap && !prev_hash.is_empty() && actual == stated => {
                problems.push(if key == 1 {
                    format!("record 1 does not start the log: a record was inserted before it, or it replaced the first")
                } else {
                    format!(
                        "record {key} does not follow record {}: a record was inserted before it, or record {} was rewritten",
                        key.saturating_sub(1),
                        key.saturating_sub(1)
                    )
                })
            }
            Some(_) => {}
        }
        // Link the next record to the hash this record states: an edit that
        // kept the stated hash is reported once, above, not again at the next.
        prev_hash = stated.to_string();
        hashes.insert(key, stated.to_string());
    }
    let last = records.last().map(|(k, _)| *k).unwrap_or(0);
    match head {
        Some(head) if head.seq > last => problems.push(if head.seq == last + 1 {
            format!("record {} was removed from the end of the log (the head names it, the log ends at record {last})", head.seq)
        } else {
            format!("records {} to {} were removed from the end of the log (the head names record {}, the log ends at record {last})", last + 1, head.seq, head.seq)
        }),
        Some(head) if head.seq < last => problems.push(format!(
            "records {} to {last} were appended without updating the head (it names record {})",
            head.seq + 1,
            head.seq
        )),
        Some(head) if last > 0 && hashes.get(&last).is_some_and(|h| *h != head.hash) => {
            problems.push(format!("record {last} was rewritten: its hash differs from the head's"))
        }
        None if last > 0 => problems.push("the log's head is missing".to_string()),
        _ => {}
    }
    for (seq, hash) in expect {
        match hashes.get(seq) {
            Some(h) if h == hash => {}
            Some(_) => problems.push(format!("record {seq} was rewritten: its hash is not the expected {hash}")),
            None => problems.push(format!("record {seq} (expected with hash {hash}) is not in the log")),
        }
    }
    Verification {
        records: records.len() as u64,
        head: AuditHead { seq: last, hash: hashes.get(&last).cloned().unwrap_or_else(|| GENESIS.to_string()) },
        problems,
    }
}

/// `2026-11-23T09:14:03.120Z`.
pub fn format_time(at_ms: u64) -> String {
    match chrono::DateTime::from_timestamp_millis(at_ms as i64) {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        None => format!("{at_ms} ms after 1970-01-01"),
    }
}

/// Parse `--since`: `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM[:SS][Z]` (UTC), or Unix seconds.
pub fn parse_time(text: &str) -> std::result::Result<u64, String> {
    use chrono::{NaiveDate, NaiveDateTime};
    let bad = || format!("cannot read the time {text:?}: write 2026-11-23, 2026-11-23T09:30:00Z or Unix seconds");
    let t = text.trim();
    if let Ok(secs) = t.parse::<u64>() {
        return secs.checked_mul(1000).ok_or_else(bad);
    }
    let t = t.strip_suffix('Z').unwrap_or(t);
    let at = ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(t, f).ok())
        .or_else(|| NaiveDate::parse_from_str(t, "%Y-%m-%d").ok().and_then(|d| d.and_hms_opt(0, 0, 0)))
        .ok_or_else(bad)?;
    if !(1970..=9999).contains(&chrono::Datelike::year(&at)) {
        return Err(bad());
    }
    u64::try_from(at.and_utc().timestamp_millis()).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn log(n: u64) -> (Vec<(u64, Vec<u8>)>, AuditHead) {
        let mut head = AuditHead::default();
        let mut records = Vec::new();
        for i in 0..n {
            let sealed = seal(&head, &AuditEvent::new(kind::QUERY, Some("a"), json!({"i": i})), 1000 + i);
            records.push((sealed.seq, sealed.bytes));
            head = sealed.head;
        }
        (records, head)
    }

    #[test]
    fn an_intact_log_verifies() {
        let (records, head) = log(5);
        let v = verify(&records, Some(&head), &[]);
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!((v.records, v.head.seq), (5, 5));
        assert!(verify(&[], None, &[]).problems.is_empty());
    }

    #[test]
    fn each_kind_of_tampering_is_named() {
        let (records, head) = log(6);
        // Edited, hash kept.
        let mut edited = records.clone();
        let text = String::from_utf8(edited[2].1.clone()).unwrap().replace("\"i\":2", "\"i\":7");
        edited[2].1 = text.into_bytes();
        let p = verify(&edited, Some(&head), &[]).problems;
        assert_eq!(p, vec!["record 3 was edited: its content no longer matches its hash ".to_string() + &String::from_utf8(records[2].1[..64].to_vec()).unwrap()]);
        // Edited, hash recomputed: the next record no longer follows it.
        let mut rehashed = records.clone();
        let forged = seal(&AuditHead { seq: 2, hash: parse_hash(&records[1].1) }, &AuditEvent::new(kind::QUERY, Some("a"), json!({"i": 9})), 1002);
        rehashed[2].1 = forged.bytes;
        let p = verify(&rehashed, Some(&head), &[]).problems;
        assert_eq!(p, vec!["record 4 does not follow record 3: a record was inserted before it, or record 3 was rewritten"]);
        // Removed from the middle and from the end.
        let mut removed = records.clone();
        removed.remove(3);
        assert_eq!(verify(&removed, Some(&head), &[]).problems, vec!["record 4 was removed (the log jumps from record 3 to 5)"]);
        let p = verify(&records[..4], Some(&head), &[]).problems;
        assert_eq!(p, vec!["records 5 to 6 were removed from the end of the log (the head names record 6, the log ends at record 4)"]);
        // Reordered.
        let mut swapped = records.clone();
        let (a, b) = (swapped[1].1.clone(), swapped[4].1.clone());
        swapped[1].1 = b;
        swapped[4].1 = a;
        let p = verify(&swapped, Some(&head), &[]).problems;
        assert!(p.contains(&"record 2 holds the record numbered 5: a record was inserted before it, or records were reordered".to_string()), "{p:?}");
        assert!(p.contains(&"record 5 holds the record numbered 2: a record was inserted before it, or records were reordered".to_string()), "{p:?}");
        // Inserted in the middle: later records shifted up one place, head moved.
        let mut inserted: Vec<(u64, Vec<u8>)> = records[..3].to_vec();
        let extra = seal(&AuditHead { seq: 3, hash: parse_hash(&records[2].1) }, &AuditEvent::new(kind::QUERY, Some("b"), json!({})), 1003);
        inserted.push((4, extra.bytes));
        inserted.extend(records[3..].iter().map(|(k, b)| (k + 1, b.clone())));
        let moved_head = AuditHead { seq: 7, hash: head.hash.clone() };
        let p = verify(&inserted, Some(&moved_head), &[]).problems;
        assert_eq!(p, vec!["record 5 holds the record numbered 4: a record was inserted before it, or records were reordered"]);
        // Appended without a head, and a head that names another hash.
        let p = verify(&records, Some(&AuditHead { seq: 4, hash: parse_hash(&records[3].1) }), &[]).problems;
        assert_eq!(p, vec!["records 5 to 6 were appended without updating the head (it names record 4)"]);
        // A record known from a receipt.
        let p = verify(&records, Some(&head), &[(3, "ab".repeat(32))]).problems;
        assert_eq!(p, vec![format!("record 3 was rewritten: its hash is not the expected {}", "ab".repeat(32))]);
        assert!(verify(&records, Some(&head), &[(3, parse_hash(&records[2].1))]).problems.is_empty());
    }

    fn parse_hash(bytes: &[u8]) -> String {
        String::from_utf8(bytes[..64].to_vec()).unwrap()
    }

    #[test]
    fn times_round_trip() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000Z");
        let t = parse_time("2026-11-23T09:14:03Z").unwrap();
        assert_eq!(format_time(t + 120), "2026-11-23T09:14:03.120Z");
        assert_eq!(parse_time("2026-11-23").unwrap(), parse_time("2026-11-23T00:00").unwrap());
        assert_eq!(parse_time("1700000000").unwrap(), 1_700_000_000_000);
        assert_eq!(format_time(1_700_000_000_000), "2023-11-14T22:13:20.000Z");
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("2026-13-01").is_err());
        assert!(parse_time("2026-02-31").is_err());
        assert!(parse_time("2028-02-29").is_ok());
        assert!(parse_time("99999999999999999999").is_err());
        assert!(verify(&[(0, b"x".to_vec())], None, &[]).problems[0].contains("record 0"));
    }
}
