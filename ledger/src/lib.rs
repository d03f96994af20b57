//! The durable privacy budget and audit log of cleanroom: one `Ledger` trait, two
//! backends — embedded on redb ([`redb::RedbLedger`], an ACID, copy-on-write
//! store whose commits are fsynced before they return) and etcd
//! ([`etcd::EtcdLedger`], for a cluster: each charge one compare-and-swap
//! transaction, committed by a quorum before it returns).
//!
//! ## Accountant: why (Σ ε, Σ δ) is the right total
//!
//! Every query's release is (ε_q, δ_q)-DP, as split by
//! [`cleanroom_dp::accountant`] and checked by OpenDP's privacy maps: Laplace noise
//! over public domains is pure (δ_q = 0); DP partition selection adds its own
//! (ε, δ); Gaussian noise is accounted in zCDP inside the query (ρ adds up
//! over its columns, which is where zCDP is tighter than adding ε) and
//! converted once to (ε, δ) at its share of the query's δ. Across queries, a party's
//! answers are an adaptive sequence of (ε_q, δ_q)-DP mechanisms on the same
//! data, so by the basic adaptive composition theorem the whole history is
//! (Σ ε_q, Σ δ_q)-DP. The ledger therefore keeps, per party, the plain sums of
//! ε and of δ of every admitted query, and admits a query only if both stay
//! within the party's budgets. Parties may collude and pool their answers, so
//! the people in the data lose the sums over all parties' queries; the ledger
//! keeps those totals too and, when the manifest sets `epsilon_cap` /
//! `delta_cap`, admits a query only if the collaboration stays within them.
//! (Composing the Gaussian queries of a history in zCDP would be tighter
//! still, but would need every query to be zCDP; Laplace and thresholded
//! queries are not, so the ledger composes in (ε, δ).)
//!
//! ## Durability
//!
//! A charge is one atomic write: read the party's and the collaboration's
//! totals, check the budgets, write the new totals, the charge record and the
//! charge's audit record, commit. Both backends return only once the commit
//! is durable (redb: fsynced; etcd: on a quorum's disks), so when `charge`
//! returns the charge survives a `kill -9`; the gateway only releases an
//! answer after that. A crash before the commit leaves no charge and no
//! answer; a crash after it keeps the charge even if the answer never left,
//! which errs on the side of privacy. Each charge carries a receipt id chosen
//! before its first attempt, and a write happens only if no charge with that
//! id exists, so retrying a write whose outcome was unknown (a timeout) never
//! charges twice.

use serde::{Deserialize, Serialize};


use crate::audit::{AuditEvent, AuditHead, Event, GrantEvent, ManifestEvent, QueryEvent};
pub use crate::error::{LedgerError, Result};
pub use cleanroom_dp::accountant::{round_for_display, BudgetRefusal, Charge, ChargeRecord, Receipt};

pub mod audit;
mod error;

pub mod etcd;
pub mod redb;

pub use self::etcd::EtcdLedger;
pub use self::redb::RedbLedger;

/// Budget totals are compared with this relative slack so that ten charges of
/// 0.1 fit a budget of 1.0 despite binary rounding (relative, because δ
/// budgets are tiny).
fn slack(budget: f64) -> f64 {
    budget.abs() * 1e-9
}

/// What a party may spend in total, and what the whole collaboration may.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub epsilon_budget: f64,
    pub delta_budget: f64,
    pub epsilon_cap: Option<f64>,
    pub delta_cap: Option<f64>,
}

impl Limits {
    /// A party's ε budget, no δ, no collaboration cap.
    pub fn epsilon(epsilon_budget: f64) -> Self {
        Limits { epsilon_budget, delta_budget: 0.0, epsilon_cap: None, delta_cap: None }
    }
}

/// What a party (or the whole collaboration) has spent, and what operators
/// granted it beyond the manifest's budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub epsilon: f64,
    #[serde(default)]
    pub delta: f64,
    #[serde(default)]
    pub granted_epsilon: f64,
    #[serde(default)]
    pub granted_delta: f64,
}

impl Totals {
    fn from_bytes(bytes: Option<&[u8]>) -> Result<Self> {
        match bytes {
            None => Ok(Totals::default()),
            Some(b) => serde_json::from_slice(b).map_err(|e| LedgerError::Storage(format!("unreadable budget totals: {e}"))),
        }
    }

    fn to_bytes(self) -> Vec<u8> {
        serde_json::to_vec(&self).expect("totals serialise")
    }
}

/// An operator's addition to a party's budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub party: String,
    pub epsilon: f64,
    pub delta: f64,
    /// Why, for the audit log.
    pub reason: String,
    /// Who granted it (the operator's user name).
    pub by: String,
}

impl Grant {
    fn check(&self) -> Result<()> {
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        if !(ok(self.epsilon) && ok(self.delta) && self.delta < 1.0 && (self.epsilon > 0.0 || self.delta > 0.0)) {
            return Err(LedgerError::Storage(format!(
                "a grant adds a positive epsilon and/or a delta in [0, 1) (got epsilon = {}, delta = {})",
                self.epsilon, self.delta
            )));
        }
        if self.reason.trim().is_empty() {
            return Err(LedgerError::Storage("a grant needs a reason, for the audit log".into()));
        }
        Ok(())
    }

    fn apply(&self, totals: Totals) -> Totals {
        Totals {
            granted_epsilon: totals.granted_epsilon + self.epsilon,
            granted_delta: totals.granted_delta + self.delta,
            ..totals
        }
    }

    fn event(&self, after: &Totals) -> AuditEvent {
        AuditEvent::new(
            Some(&self.party),
            Event::BudgetGrant(GrantEvent {
                epsilon: self.epsilon,
                delta: self.delta,
                reason: self.reason.clone(),
                by: self.by.clone(),
                granted_epsilon_total: after.granted_epsilon,
                granted_delta_total: after.granted_delta,
            }),
        )
    }
}

/// The durable per-party privacy budget and the audit log. All methods block:
/// call them off the async runtime.
pub trait Ledger: Send + Sync {
    /// Where the ledger lives, for messages.
    fn describe(&self) -> String;
    /// Durably record `charge` and its `query` audit record if it fits the
    /// party's budgets (plus grants) and the collaboration's caps in
    /// `limits`, or refuse it with the amount left.
    fn charge(&self, charge: &Charge, limits: &Limits) -> Result<Receipt>;
    /// What the party has spent and been granted.
    fn totals(&self, party: &str) -> Result<Totals>;
    /// What all parties together have spent.
    fn collaboration_totals(&self) -> Result<Totals>;
    /// Durably add `grant` to the party's budget, with its audit record.
    fn grant(&self, grant: &Grant) -> Result<Totals>;
    /// The party's charges, oldest first.
    fn history(&self, party: &str) -> Result<Vec<ChargeRecord>>;
    /// A released answer stored under `key`, if any.
    fn released_answer(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Durably keep a released answer under `key`.
    fn keep_released_answer(&self, key: &str, answer: &[u8]) -> Result<()>;
    /// Durably append a record to the audit log; returns its (seq, hash).
    fn append_audit(&self, event: &AuditEvent) -> Result<AuditHead>;
    /// Append a `manifest` record if `sha256` differs from the manifest last
    /// recorded (atomically with remembering it); true if it did.
    fn record_manifest(&self, sha256: &str, path: &str) -> Result<bool>;
    /// The stored audit records with sequence number ≥ `from`, in order, as
    /// stored (unchecked: see [`audit::verify`]).
    fn audit_records(&self, from: u64) -> Result<Vec<(u64, Vec<u8>)>>;
    /// The stored head of the audit log (None if nothing was ever appended).
    fn audit_head(&self) -> Result<Option<AuditHead>>;
    /// Every stored audit record and the head, as of one moment (so an
    /// append in between cannot look like tampering).
    fn audit_log(&self) -> Result<(Vec<(u64, Vec<u8>)>, Option<AuditHead>)>;

    /// ε the party has spent so far.
    fn spent(&self, party: &str) -> Result<f64> {
        Ok(self.totals(party)?.epsilon)
    }
    /// δ the party has spent so far.
    fn spent_delta(&self, party: &str) -> Result<f64> {
        Ok(self.totals(party)?.delta)
    }
}

fn check_charge(charge: &Charge) -> Result<()> {
    if !(charge.epsilon.is_finite() && charge.epsilon > 0.0) {
        return Err(LedgerError::Storage(format!("invalid charge of epsilon {}", charge.epsilon)));
    }
    if !(charge.delta.is_finite() && (0.0..1.0).contains(&charge.delta)) {
        return Err(LedgerError::Storage(format!("invalid charge of delta {}", charge.delta)));
    }
    Ok(())
}

/// Admit `charge` against the party's totals (its budget is the manifest's
/// plus what operators granted) and the collaboration's; return both new
/// totals. The collaboration's caps are not raised by grants: they bound what
/// the people in the data lose to all parties together.
fn admit(charge: &Charge, limits: &Limits, party: Totals, all: Totals) -> Result<(Totals, Totals)> {
    let budget_check = |what: &'static str, spent: f64, needed: f64, budget: f64| -> Result<()> {
        if needed > 0.0 && spent + needed > budget + slack(budget) {
            return Err(LedgerError::Budget(BudgetRefusal::Party {
                party: charge.party.clone(),
                what,
                needed,
                remaining: round_for_display((budget - spent).max(0.0)),
                budget: round_for_display(budget),
            }));
        }
        Ok(())
    };
    budget_check("epsilon", party.epsilon, charge.epsilon, limits.epsilon_budget + party.granted_epsilon)?;
    budget_check("delta", party.delta, charge.delta, limits.delta_budget + party.granted_delta)?;
    let cap_check = |what: &'static str, all: f64, needed: f64, cap: Option<f64>| -> Result<()> {
        match cap {
            Some(cap) if needed > 0.0 && all + needed > cap + slack(cap) => Err(LedgerError::Budget(BudgetRefusal::Collaboration {
                what,
                needed,
                remaining: round_for_display((cap - all).max(0.0)),
                cap,
            })),
            _ => Ok(()),
        }
    };
    cap_check("epsilon", all.epsilon, charge.epsilon, limits.epsilon_cap)?;
    cap_check("delta", all.delta, charge.delta, limits.delta_cap)?;
    let add = |t: Totals| Totals { epsilon: t.epsilon + charge.epsilon, delta: t.delta + charge.delta, ..t };
    Ok((add(party), add(all)))
}

/// A fresh, unguessable receipt id.
fn new_receipt_id() -> String {
    let mut id = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
    hex::encode(id)
}

/// The `query` audit record of a charge.
fn charge_event(charge: &Charge, receipt_id: &str) -> AuditEvent {
    AuditEvent::new(
        Some(&charge.party),
        Event::Query(QueryEvent {
            receipt: Some(receipt_id.to_string()),
            query_id: Some(charge.query_id.clone()),
            sql: charge.sql.clone(),
            statement: None,
            epsilon: charge.epsilon,
            delta: charge.delta,
            options: Some(charge.options.clone()),
            datasets: charge.datasets.clone(),
            columns: charge.columns.clone(),
            rows: None,
        }),
    )
}

/// The charge record (and so the receipt) of an admitted charge.
fn charge_record(charge: &Charge, limits: &Limits, after: &Totals, id: &str, at: u64, audit: &AuditHead) -> ChargeRecord {
    ChargeRecord {
        receipt_id: id.to_string(),
        query_id: charge.query_id.clone(),
        sql: charge.sql.clone(),
        epsilon: charge.epsilon,
        delta: charge.delta,
        at,
        spent: after.epsilon,
        spent_delta: after.delta,
        budget: limits.epsilon_budget + after.granted_epsilon,
        delta_budget: limits.delta_budget + after.granted_delta,
        audit_seq: audit.seq,
        audit_hash: audit.hash.clone(),
    }
}

/// The `manifest` audit record of a manifest (first seen or changed).
fn manifest_event(sha256: &str, previous: Option<&str>, path: &str) -> AuditEvent {
    AuditEvent::new(
        None,
        Event::Manifest(ManifestEvent {
            sha256: sha256.to_string(),
            previous_sha256: previous.map(str::to_string),
            path: Some(path.to_string()),
        }),
    )
}

fn now_secs() -> u64 {
    audit::now_ms() / 1000
}

/// The release kept under `key` ([`cleanroom_dp::release::release_key`]),
/// if the party already paid for one.
pub fn recall(ledger: &dyn Ledger, key: &str) -> cleanroom_dp::error::Result<Option<cleanroom_dp::release::NoisyAggregate>> {
    match ledger.released_answer(key)? {
        Some(bytes) => Ok(Some(cleanroom_dp::release::NoisyAggregate::from_stored(&bytes)?)),
        None => Ok(None),
    }
}

/// Keep `release` under `key`, so the same DP aggregate is never drawn twice
/// for the party.
pub fn remember(ledger: &dyn Ledger, key: &str, release: &cleanroom_dp::release::NoisyAggregate) -> cleanroom_dp::error::Result<()> {
    Ok(ledger.keep_released_answer(key, &release.to_stored()?)?)
}
