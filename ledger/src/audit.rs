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

/// What happened, one variant per kind of record. It is stored as the
/// record's `kind` (the variant's snake-case name) and `detail` (its fields):
/// every writer of the log builds one of these, so a kind and its facts are
/// checked by the compiler, and a reader can get the same type back with
/// [`AuditRecord::event`]. No variant holds a value of an answer or of the data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum Event {
    /// A party authenticated from `peer`.
    Auth { peer: String },
    /// A handshake with wrong credentials; `user` is the name sent (at most
    /// 64 characters: it is the client's text, not a known party).
    AuthFailure { user: String, peer: String },
    /// A statement was admitted: a charge (with its receipt, written in the
    /// same atomic step as the charge) or a statement that reads no data.
    Query(QueryEvent),
    /// An answer left for the party (its shape only).
    Answer(AnswerEvent),
    /// A charged query failed while running; its charge is kept. The cause
    /// may depend on the data and is not recorded.
    QueryFailure { receipt: String, query_id: String },
    /// A statement or upload was turned away by `rule`.
    Refusal(RefusalEvent),
    /// An operator granted a party more budget.
    BudgetGrant(GrantEvent),
    /// The server started with a manifest it had not seen last.
    Manifest(ManifestEvent),
    /// An upload was committed as a dataset's next data version.
    Upload(UploadEvent),
    /// An upload failed and left nothing behind.
    UploadFailure { dataset: String, upload: String, message: String },
    /// A retention pass deleted expired rows.
    Retention(RetentionEvent),
}

impl Event {
    /// Every kind, as stored (for `audit list --kind`).
    pub const KINDS: &'static [&'static str] = &[
        "auth", "auth_failure", "query", "answer", "query_failure", "refusal", "budget_grant", "manifest", "upload",
        "upload_failure", "retention",
    ];

    /// The kind this event is stored under.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Auth { .. } => "auth",
            Event::AuthFailure { .. } => "auth_failure",
            Event::Query(_) => "query",
            Event::Answer(_) => "answer",
            Event::QueryFailure { .. } => "query_failure",
            Event::Refusal(_) => "refusal",
            Event::BudgetGrant(_) => "budget_grant",
            Event::Manifest(_) => "manifest",
            Event::Upload(_) => "upload",
            Event::UploadFailure { .. } => "upload_failure",
            Event::Retention(_) => "retention",
        }
    }

    /// The (kind, detail) pair a record stores.
    fn to_parts(&self) -> (String, Value) {
        let mut tagged = serde_json::to_value(self).expect("an event serialises");
        let detail = tagged.get_mut("detail").map(Value::take).unwrap_or(Value::Null);
        (self.kind().to_string(), detail)
    }
}

/// A statement admitted: what was asked, on what, at what price.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueryEvent {
    /// The receipt of its charge (none for a statement that reads no data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_id: Option<String>,
    pub sql: String,
    /// For a statement that reads no data: `no_data` or `explain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement: Option<String>,
    pub epsilon: f64,
    pub delta: f64,
    /// The options the query ran with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datasets: Vec<String>,
    /// Column names and types of the answer (`name: type`).
    #[serde(default)]
    pub columns: Vec<String>,
    /// Rows of the answer, when known at this point (free statements).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<usize>,
}

/// An answer that left: its receipt and shape.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AnswerEvent {
    pub receipt: String,
    pub query_id: String,
    /// The statement, for an answer given again from the released-answer
    /// cache (it has no `query` record of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cached: bool,
    pub rows: usize,
    pub columns: Vec<String>,
}

/// A refusal: the rule, the message the party got, and what was refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RefusalEvent {
    pub rule: String,
    pub message: String,
    /// The refused statement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    /// The dataset name a refused upload named (at most 128 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<String>,
}

/// A budget grant and the party's granted totals after it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GrantEvent {
    pub epsilon: f64,
    pub delta: f64,
    pub reason: String,
    pub by: String,
    pub granted_epsilon_total: f64,
    pub granted_delta_total: f64,
}

/// A manifest the server started with, and the one it replaces.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ManifestEvent {
    pub sha256: String,
    pub previous_sha256: Option<String>,
    /// Where it was read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// A committed upload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UploadEvent {
    pub dataset: String,
    /// `append` or `replace`.
    pub mode: String,
    pub rows: u64,
    pub files: usize,
    pub version: u64,
    pub upload: String,
}

/// A committed retention pass over one dataset.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RetentionEvent {
    pub dataset: String,
    pub column: String,
    pub days: u64,
    pub rows_deleted: u64,
    pub files_rewritten: usize,
    pub files_dropped: usize,
    pub version: u64,
}

/// Something to record: an event, and the party that did it (none for the
/// operator, the server, or an unknown client).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub party: Option<String>,
    pub event: Event,
}

impl AuditEvent {
    pub fn new(party: Option<&str>, event: Event) -> Self {
        AuditEvent { party: party.map(str::to_string), event }
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

impl AuditRecord {
    /// The record's event, typed; `None` for a record this version cannot
    /// read as one (a kind or fields from another version).
    pub fn event(&self) -> Option<Event> {
        serde_json::from_value(serde_json::json!({ "kind": self.kind, "detail": self.detail })).ok()
    }
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
    let (kind, detail) = event.event.to_parts();
    let record = AuditRecord {
        seq: head.seq + 1,
        at_ms,
        kind,
        party: event.party.clone(),
        detail,
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

    /// One event of each kind.
    fn one_of_each() -> Vec<Event> {
        vec![
            Event::Auth { peer: "127.0.0.1:1".into() },
            Event::AuthFailure { user: "x".into(), peer: String::new() },
            Event::Query(QueryEvent { receipt: Some("r".into()), sql: "SELECT 1".into(), epsilon: 0.5, ..Default::default() }),
            Event::Answer(AnswerEvent { receipt: "r".into(), cached: true, ..Default::default() }),
            Event::QueryFailure { receipt: "r".into(), query_id: "q".into() },
            Event::Refusal(RefusalEvent { rule: "budget".into(), ..Default::default() }),
            Event::BudgetGrant(GrantEvent { epsilon: 1.0, ..Default::default() }),
            Event::Manifest(ManifestEvent { sha256: "aa".into(), ..Default::default() }),
            Event::Upload(UploadEvent { dataset: "d".into(), mode: "append".into(), ..Default::default() }),
            Event::UploadFailure { dataset: "d".into(), upload: "u".into(), message: "m".into() },
            Event::Retention(RetentionEvent { dataset: "d".into(), days: 30, ..Default::default() }),
        ]
    }

    #[test]
    fn every_kind_is_stored_under_its_name_and_read_back_typed() {
        let events = one_of_each();
        let kinds: Vec<&str> = events.iter().map(Event::kind).collect();
        assert_eq!(kinds, Event::KINDS, "one event of each kind, in the order of KINDS");
        let mut head = AuditHead::default();
        for event in events {
            let sealed = seal(&head, &AuditEvent::new(Some("a"), event.clone()), 1);
            let record = parse(&sealed.bytes).unwrap();
            assert_eq!(record.kind, event.kind());
            assert!(record.detail.is_object(), "{record:?}");
            assert_eq!(record.event(), Some(event));
            head = sealed.head;
        }
        // The fields readers rely on keep their stored names.
        let refusal = seal(&head, &AuditEvent::new(None, Event::Refusal(RefusalEvent { rule: "budget".into(), message: "m".into(), sql: Some("s".into()), upload: None })), 1);
        assert_eq!(parse(&refusal.bytes).unwrap().detail, json!({ "rule": "budget", "message": "m", "sql": "s" }));
    }

    #[test]
    fn a_record_of_an_unknown_kind_is_still_a_record() {
        let record = AuditRecord { seq: 1, at_ms: 0, kind: "export".into(), party: None, detail: json!({}), prev: GENESIS.into() };
        assert_eq!(record.event(), None);
    }

    fn log(n: u64) -> (Vec<(u64, Vec<u8>)>, AuditHead) {
        let mut head = AuditHead::default();
        let mut records = Vec::new();
        for i in 0..n {
            let sealed = seal(&head, &AuditEvent::new(Some("a"), Event::Auth { peer: format!("10.0.0.{i}") }), 1000 + i);
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
        let text = String::from_utf8(edited[2].1.clone()).unwrap().replace("10.0.0.2", "10.0.0.7");
        edited[2].1 = text.into_bytes();
        let p = verify(&edited, Some(&head), &[]).problems;
        assert_eq!(p, vec!["record 3 was edited: its content no longer matches its hash ".to_string() + &String::from_utf8(records[2].1[..64].to_vec()).unwrap()]);
        // Edited, hash recomputed: the next record no longer follows it.
        let mut rehashed = records.clone();
        let forged = seal(&AuditHead { seq: 2, hash: parse_hash(&records[1].1) }, &AuditEvent::new(Some("a"), Event::Auth { peer: "10.0.0.9".into() }), 1002);
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
        let extra = seal(&AuditHead { seq: 3, hash: parse_hash(&records[2].1) }, &AuditEvent::new(Some("b"), Event::Auth { peer: String::new() }), 1003);
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
