//! The embedded ledger: one redb file under the state directory. redb
//! serialises write transactions and fsyncs each commit before it returns, so
//! a charge (totals, charge record, audit record) is atomic and durable.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{admit, charge_event, charge_record, check_charge, new_receipt_id, now_secs, Charge, ChargeRecord, Grant, Ledger, Limits, Receipt, Totals};
use crate::audit::{self, AuditEvent, AuditHead};
use crate::error::{LedgerError, Result};

const SPENT: TableDefinition<&str, f64> = TableDefinition::new("spent_epsilon");
const SPENT_DELTA: TableDefinition<&str, f64> = TableDefinition::new("spent_delta");
const GRANTED: TableDefinition<&str, f64> = TableDefinition::new("granted_epsilon");
const GRANTED_DELTA: TableDefinition<&str, f64> = TableDefinition::new("granted_delta");
/// Charge records keyed `party NUL time NUL receipt id`, so one party's
/// history is one ordered range.
const CHARGES: TableDefinition<&str, &str> = TableDefinition::new("charges");
/// Audit records by sequence number (see [`crate::audit`]).
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_log");
/// `audit_head` and `manifest_sha256`.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const HEAD: &str = "audit_head";
const MANIFEST: &str = "manifest_sha256";

/// The key of the whole collaboration's total in the totals tables (party
/// names cannot contain NUL).
const COLLABORATION: &str = "\0collaboration";

/// Releases of DP aggregates (Arrow IPC streams) by release key; see
/// [`cleanroom_dp::release::release_key`].
const RELEASED: TableDefinition<&str, &[u8]> = TableDefinition::new("released_answers");

/// The embedded ledger.
pub struct RedbLedger {
    db: Database,
    path: PathBuf,
}

fn ledger_err(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

fn get(t: &impl ReadableTable<&'static str, f64>, key: &str) -> Result<f64> {
    Ok(t.get(key).map_err(ledger_err)?.map(|v| v.value()).unwrap_or(0.0))
}

/// Totals of `key` (a party or [`COLLABORATION`]) inside a write transaction.
fn read_totals(txn: &redb::WriteTransaction, key: &str) -> Result<Totals> {
    Ok(Totals {
        epsilon: get(&txn.open_table(SPENT).map_err(ledger_err)?, key)?,
        delta: get(&txn.open_table(SPENT_DELTA).map_err(ledger_err)?, key)?,
        granted_epsilon: get(&txn.open_table(GRANTED).map_err(ledger_err)?, key)?,
        granted_delta: get(&txn.open_table(GRANTED_DELTA).map_err(ledger_err)?, key)?,
    })
}

fn write_totals(txn: &redb::WriteTransaction, key: &str, t: &Totals) -> Result<()> {
    for (table, value) in [(SPENT, t.epsilon), (SPENT_DELTA, t.delta), (GRANTED, t.granted_epsilon), (GRANTED_DELTA, t.granted_delta)] {
        let mut table = txn.open_table(table).map_err(ledger_err)?;
        if value != 0.0 || table.get(key).map_err(ledger_err)?.is_some() {
            table.insert(key, value).map_err(ledger_err)?;
        }
    }
    Ok(())
}

/// Append `event` to the audit log inside a write transaction.
fn append(txn: &redb::WriteTransaction, event: &AuditEvent) -> Result<AuditHead> {
    let mut meta = txn.open_table(META).map_err(ledger_err)?;
    let head = match meta.get(HEAD).map_err(ledger_err)? {
        Some(v) => AuditHead::from_bytes(v.value())?,
        None => AuditHead::default(),
    };
    let sealed = audit::seal(&head, event, audit::now_ms());
    txn.open_table(AUDIT).map_err(ledger_err)?.insert(sealed.seq, sealed.bytes.as_slice()).map_err(ledger_err)?;
    meta.insert(HEAD, sealed.head.to_bytes().as_slice()).map_err(ledger_err)?;
    Ok(sealed.head)
}

impl RedbLedger {
    /// Open (or create) `state_dir/ledger.redb`.
    pub fn open(state_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(state_dir).map_err(|e| {
            LedgerError::Storage(format!("cannot create state directory {}: {e}", state_dir.display()))
        })?;
        let path = state_dir.join("ledger.redb");
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => LedgerError::Storage(format!(
                "the ledger {} is in use by another process (a running `cleanroom serve`?): stop it first, or run the clean room on etcd, whose ledger operator commands can use while it serves",
                path.display()
            )),
            e => LedgerError::Storage(format!("cannot open ledger {}: {e}", path.display())),
        })?;
        let txn = db.begin_write().map_err(ledger_err)?;
        txn.open_table(SPENT).map_err(ledger_err)?;
        txn.open_table(SPENT_DELTA).map_err(ledger_err)?;
        txn.open_table(GRANTED).map_err(ledger_err)?;
        txn.open_table(GRANTED_DELTA).map_err(ledger_err)?;
        txn.open_table(CHARGES).map_err(ledger_err)?;
        txn.open_table(RELEASED).map_err(ledger_err)?;
        txn.open_table(AUDIT).map_err(ledger_err)?;
        txn.open_table(META).map_err(ledger_err)?;
        txn.commit().map_err(ledger_err)?;
        Ok(RedbLedger { db, path })
    }

    fn read_totals(&self, key: &str) -> Result<Totals> {
        let txn = self.db.begin_read().map_err(ledger_err)?;
        Ok(Totals {
            epsilon: get(&txn.open_table(SPENT).map_err(ledger_err)?, key)?,
            delta: get(&txn.open_table(SPENT_DELTA).map_err(ledger_err)?, key)?,
            granted_epsilon: get(&txn.open_table(GRANTED).map_err(ledger_err)?, key)?,
            granted_delta: get(&txn.open_table(GRANTED_DELTA).map_err(ledger_err)?, key)?,
        })
    }
}

impl Ledger for RedbLedger {
    fn describe(&self) -> String {
        format!("the embedded ledger {}", self.path.display())
    }

    fn charge(&self, charge: &Charge, limits: &Limits) -> Result<Receipt> {
        check_charge(charge)?;
        // redb serialises write transactions, so the checks and the updates
        // below are atomic with respect to concurrent charges.
        let txn = self.db.begin_write().map_err(ledger_err)?;
        // The whole collaboration's totals: parties may collude, so what
        // they spend together is what the people in the data lose.
        let (party, all) = admit(charge, limits, read_totals(&txn, &charge.party)?, read_totals(&txn, COLLABORATION)?)?;
        write_totals(&txn, &charge.party, &party)?;
        write_totals(&txn, COLLABORATION, &all)?;
        let (id, at) = (new_receipt_id(), now_secs());
        let head = append(&txn, &charge_event(charge, &id))?;
        let record = charge_record(charge, limits, &party, &id, at, &head);
        let key = format!("{}\0{:020}\0{}", charge.party, at, id);
        let json = serde_json::to_string(&record).map_err(ledger_err)?;
        txn.open_table(CHARGES).map_err(ledger_err)?.insert(key.as_str(), json.as_str()).map_err(ledger_err)?;
        txn.commit().map_err(ledger_err)?;
        Ok(Receipt::from_record(&charge.party, &record))
    }

    fn totals(&self, party: &str) -> Result<Totals> {
        self.read_totals(party)
    }

    fn collaboration_totals(&self) -> Result<Totals> {
        self.read_totals(COLLABORATION)
    }

    fn grant(&self, grant: &Grant) -> Result<Totals> {
        grant.check()?;
        let txn = self.db.begin_write().map_err(ledger_err)?;
        let after = grant.apply(read_totals(&txn, &grant.party)?);
        write_totals(&txn, &grant.party, &after)?;
        append(&txn, &grant.event(&after))?;
        txn.commit().map_err(ledger_err)?;
        Ok(after)
    }

    fn released_answer(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let txn = self.db.begin_read().map_err(ledger_err)?;
        let table = txn.open_table(RELEASED).map_err(ledger_err)?;
        Ok(table.get(key).map_err(ledger_err)?.map(|v| v.value().to_vec()))
    }

    fn keep_released_answer(&self, key: &str, answer: &[u8]) -> Result<()> {
        let txn = self.db.begin_write().map_err(ledger_err)?;
        txn.open_table(RELEASED)
            .map_err(ledger_err)?
            .insert(key, answer)
            .map_err(ledger_err)?;
        txn.commit().map_err(ledger_err)
    }

    fn history(&self, party: &str) -> Result<Vec<ChargeRecord>> {
        let txn = self.db.begin_read().map_err(ledger_err)?;
        let table = txn.open_table(CHARGES).map_err(ledger_err)?;
        let (from, to) = (format!("{party}\0"), format!("{party}\u{1}"));
        let mut records = Vec::new();
        for entry in table.range(from.as_str()..to.as_str()).map_err(ledger_err)? {
            let (_, value) = entry.map_err(ledger_err)?;
            records.push(serde_json::from_str(value.value()).map_err(ledger_err)?);
        }
        Ok(records)
    }

    fn append_audit(&self, event: &AuditEvent) -> Result<AuditHead> {
        let txn = self.db.begin_write().map_err(ledger_err)?;
        let head = append(&txn, event)?;
        txn.commit().map_err(ledger_err)?;
        Ok(head)
    }

    fn record_manifest(&self, sha256: &str, path: &str) -> Result<bool> {
        let txn = self.db.begin_write().map_err(ledger_err)?;
        let previous = txn
            .open_table(META)
            .map_err(ledger_err)?
            .get(MANIFEST)
            .map_err(ledger_err)?
            .map(|v| String::from_utf8_lossy(v.value()).into_owned());
        if previous.as_deref() == Some(sha256) {
            return Ok(false);
        }
        append(&txn, &super::manifest_event(sha256, previous.as_deref(), path))?;
        txn.open_table(META).map_err(ledger_err)?.insert(MANIFEST, sha256.as_bytes()).map_err(ledger_err)?;
        txn.commit().map_err(ledger_err)?;
        Ok(true)
    }

    fn audit_records(&self, from: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        let txn = self.db.begin_read().map_err(ledger_err)?;
        let table = txn.open_table(AUDIT).map_err(ledger_err)?;
        let mut out = Vec::with_capacity(table.len().map_err(ledger_err)? as usize);
        for entry in table.range(from..).map_err(ledger_err)? {
            let (k, v) = entry.map_err(ledger_err)?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn audit_log(&self) -> Result<(Vec<(u64, Vec<u8>)>, Option<AuditHead>)> {
        // One read transaction: one consistent snapshot.
        let txn = self.db.begin_read().map_err(ledger_err)?;
        let table = txn.open_table(AUDIT).map_err(ledger_err)?;
        let mut records = Vec::with_capacity(table.len().map_err(ledger_err)? as usize);
        for entry in table.iter().map_err(ledger_err)? {
            let (k, v) = entry.map_err(ledger_err)?;
            records.push((k.value(), v.value().to_vec()));
        }
        let meta = txn.open_table(META).map_err(ledger_err)?;
        let head = meta.get(HEAD).map_err(ledger_err)?.map(|v| AuditHead::from_bytes(v.value())).transpose()?;
        Ok((records, head))
    }

    fn audit_head(&self) -> Result<Option<AuditHead>> {
        let txn = self.db.begin_read().map_err(ledger_err)?;
        let meta = txn.open_table(META).map_err(ledger_err)?;
        let head = meta.get(HEAD).map_err(ledger_err)?;
        head.map(|v| AuditHead::from_bytes(v.value())).transpose()
    }
}
