//! The durable privacy budget: one `Ledger` trait, and the embedded backend on
//! redb (an ACID, copy-on-write store whose commits are fsynced before they
//! return).
//!
//! ## Accountant: why (Σ ε, Σ δ) is the right total
//!
//! Every query's release is (ε_q, δ_q)-DP, as split by
//! [`crate::accountant`] and checked by OpenDP's privacy maps: Laplace noise
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
//! A charge is one write transaction: read the party's totals, check the
//! budgets, write the new totals and the charge record, commit. redb commits
//! with immediate durability, so when `charge` returns the charge survives a
//! `kill -9`; the gateway only releases an answer after that. A crash before
//! the commit leaves no charge and no answer; a crash after it keeps the
//! charge even if the answer never left, which errs on the side of privacy.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{DpError, Result};

const SPENT: TableDefinition<&str, f64> = TableDefinition::new("spent_epsilon");
const SPENT_DELTA: TableDefinition<&str, f64> = TableDefinition::new("spent_delta");
/// Charge records keyed `party NUL time NUL receipt id`, so one party's
/// history is one ordered range.
const CHARGES: TableDefinition<&str, &str> = TableDefinition::new("charges");

/// The key of the whole collaboration's total in `SPENT` (party names cannot
/// contain NUL).
const COLLABORATION: &str = "\0collaboration";

/// Released answers (Arrow IPC streams) by answer key; see
/// [`crate::release::answer_key`].
const RELEASED: TableDefinition<&str, &[u8]> = TableDefinition::new("released_answers");

/// Budget totals are compared with this relative slack so that ten charges of
/// 0.1 fit a budget of 1.0 despite binary rounding (relative, because δ
/// budgets are tiny).
fn slack(budget: f64) -> f64 {
    budget.abs() * 1e-9
}

/// What a query asks to spend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Charge {
    pub party: String,
    /// The [`crate::rewrite::DpQuery::id`] this charge pays for.
    pub query_id: String,
    pub epsilon: f64,
    /// δ the query spends (0 for pure ε-DP queries).
    #[serde(default)]
    pub delta: f64,
    /// The statement as the party sent it, for its query history.
    pub sql: String,
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

/// One entry of a party's history: what it ran and what it paid.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ChargeRecord {
    pub receipt_id: String,
    pub query_id: String,
    pub sql: String,
    pub epsilon: f64,
    #[serde(default)]
    pub delta: f64,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

/// Proof that a charge is durably recorded. Only a ledger makes one (its
/// fields are private and it cannot be deserialised), and the release path
/// requires one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Receipt {
    id: String,
    party: String,
    query_id: String,
    epsilon: f64,
    delta: f64,
    /// The party's totals after this charge.
    spent: f64,
    spent_delta: f64,
    budget: f64,
    delta_budget: f64,
    /// Seconds since the Unix epoch.
    at: u64,
}

impl Receipt {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn party(&self) -> &str {
        &self.party
    }

    pub fn query_id(&self) -> &str {
        &self.query_id
    }

    pub fn epsilon(&self) -> f64 {
        self.epsilon
    }

    /// The party's total spent ε after this charge.
    pub fn spent(&self) -> f64 {
        self.spent
    }

    pub fn budget(&self) -> f64 {
        self.budget
    }

    pub fn remaining(&self) -> f64 {
        (self.budget - self.spent).max(0.0)
    }

    pub fn delta(&self) -> f64 {
        self.delta
    }

    /// δ the party has left after this charge.
    pub fn remaining_delta(&self) -> f64 {
        (self.delta_budget - self.spent_delta).max(0.0)
    }
}

/// The per-party privacy budget.
pub trait Ledger: Send + Sync {
    /// Durably record `charge` if it fits the party's budgets and the
    /// collaboration's caps in `limits`, or refuse it with the amount left.
    /// Blocking: call it off the async runtime.
    fn charge(&self, charge: &Charge, limits: &Limits) -> Result<Receipt>;
    /// ε the party has spent so far.
    fn spent(&self, party: &str) -> Result<f64>;
    /// δ the party has spent so far.
    fn spent_delta(&self, party: &str) -> Result<f64>;
    /// The party's charges, oldest first.
    fn history(&self, party: &str) -> Result<Vec<ChargeRecord>>;
    /// A released answer stored under `key`, if any.
    fn released_answer(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Durably keep a released answer under `key`.
    fn keep_released_answer(&self, key: &str, answer: &[u8]) -> Result<()>;
}

/// The embedded ledger: one redb file under the state directory.
pub struct RedbLedger {
    db: Database,
}

fn ledger_err(e: impl std::fmt::Display) -> DpError {
    DpError::Ledger(e.to_string())
}

impl RedbLedger {
    /// Open (or create) `state_dir/ledger.redb`.
    pub fn open(state_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(state_dir).map_err(|e| {
            DpError::Ledger(format!("cannot create state directory {}: {e}", state_dir.display()))
        })?;
        let path = state_dir.join("ledger.redb");
        let db = Database::create(&path)
            .map_err(|e| DpError::Ledger(format!("cannot open ledger {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(ledger_err)?;
        txn.open_table(SPENT).map_err(ledger_err)?;
        txn.open_table(SPENT_DELTA).map_err(ledger_err)?;
        txn.open_table(CHARGES).map_err(ledger_err)?;
        txn.open_table(RELEASED).map_err(ledger_err)?;
        txn.commit().map_err(ledger_err)?;
        Ok(RedbLedger { db })
    }
}

impl Ledger for RedbLedger {
    fn charge(&self, charge: &Charge, limits: &Limits) -> Result<Receipt> {
        if !(charge.epsilon.is_finite() && charge.epsilon > 0.0) {
            return Err(DpError::Ledger(format!("invalid charge of epsilon {}", charge.epsilon)));
        }
        if !(charge.delta.is_finite() && (0.0..1.0).contains(&charge.delta)) {
            return Err(DpError::Ledger(format!("invalid charge of delta {}", charge.delta)));
        }
        // redb serialises write transactions, so the checks and the updates
        // below are atomic with respect to concurrent charges.
        let txn = self.db.begin_write().map_err(ledger_err)?;
        let receipt = {
            let mut spent_epsilon = txn.open_table(SPENT).map_err(ledger_err)?;
            let mut spent_delta = txn.open_table(SPENT_DELTA).map_err(ledger_err)?;
            let get = |t: &redb::Table<&str, f64>, key: &str| -> Result<f64> {
                Ok(t.get(key).map_err(ledger_err)?.map(|v| v.value()).unwrap_or(0.0))
            };
            let (spent, spent_d) = (get(&spent_epsilon, &charge.party)?, get(&spent_delta, &charge.party)?);
            // The whole collaboration's totals: parties may collude, so what
            // they spend together is what the people in the data lose.
            let (all, all_d) = (get(&spent_epsilon, COLLABORATION)?, get(&spent_delta, COLLABORATION)?);
            let budget_check = |what: &'static str, spent: f64, needed: f64, budget: f64| -> Result<()> {
                if needed > 0.0 && spent + needed > budget + slack(budget) {
                    return Err(DpError::BudgetExceeded {
                        party: charge.party.clone(),
                        what,
                        needed,
                        remaining: round_for_display((budget - spent).max(0.0)),
                        budget,
                    });
                }
                Ok(())
            };
            budget_check("epsilon", spent, charge.epsilon, limits.epsilon_budget)?;
            budget_check("delta", spent_d, charge.delta, limits.delta_budget)?;
            let cap_check = |what: &'static str, all: f64, needed: f64, cap: Option<f64>| -> Result<()> {
                match cap {
                    Some(cap) if needed > 0.0 && all + needed > cap + slack(cap) => Err(DpError::CollaborationCapExceeded {
                        what,
                        needed,
                        remaining: round_for_display((cap - all).max(0.0)),
                        cap,
                    }),
                    _ => Ok(()),
                }
            };
            cap_check("epsilon", all, charge.epsilon, limits.epsilon_cap)?;
            cap_check("delta", all_d, charge.delta, limits.delta_cap)?;
            let (total, total_d) = (spent + charge.epsilon, spent_d + charge.delta);
            spent_epsilon.insert(charge.party.as_str(), total).map_err(ledger_err)?;
            spent_epsilon.insert(COLLABORATION, all + charge.epsilon).map_err(ledger_err)?;
            if charge.delta > 0.0 {
                spent_delta.insert(charge.party.as_str(), total_d).map_err(ledger_err)?;
                spent_delta.insert(COLLABORATION, all_d + charge.delta).map_err(ledger_err)?;
            }
            let mut id = [0u8; 16];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
            let receipt = Receipt {
                id: hex::encode(id),
                party: charge.party.clone(),
                query_id: charge.query_id.clone(),
                epsilon: charge.epsilon,
                delta: charge.delta,
                spent: total,
                spent_delta: total_d,
                budget: limits.epsilon_budget,
                delta_budget: limits.delta_budget,
                at: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            };
            let record = serde_json::to_string(&ChargeRecord {
                receipt_id: receipt.id.clone(),
                query_id: receipt.query_id.clone(),
                sql: charge.sql.clone(),
                epsilon: receipt.epsilon,
                delta: receipt.delta,
                at: receipt.at,
            })
            .map_err(ledger_err)?;
            let key = format!("{}\0{:020}\0{}", receipt.party, receipt.at, receipt.id);
            let mut charges = txn.open_table(CHARGES).map_err(ledger_err)?;
            charges.insert(key.as_str(), record.as_str()).map_err(ledger_err)?;
            receipt
        };
        txn.commit().map_err(ledger_err)?;
        Ok(receipt)
    }

    fn spent_delta(&self, party: &str) -> Result<f64> {
        let txn = self.db.begin_read().map_err(ledger_err)?;
        let table = txn.open_table(SPENT_DELTA).map_err(ledger_err)?;
        Ok(table.get(party).map_err(ledger_err)?.map(|v| v.value()).unwrap_or(0.0))
    }

    fn spent(&self, party: &str) -> Result<f64> {
        let txn = self.db.begin_read().map_err(ledger_err)?;
        let table = txn.open_table(SPENT).map_err(ledger_err)?;
        Ok(table
            .get(party)
            .map_err(ledger_err)?
            .map(|v| v.value())
            .unwrap_or(0.0))
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
}

/// Budget figures shown to people are rounded to 9 decimals so binary
/// rounding noise (0.30000000000000004) does not leak into messages.
pub fn round_for_display(x: f64) -> f64 {
    (x * 1e9).round() / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(party: &str, epsilon: f64) -> Charge {
        Charge { party: party.into(), query_id: "q".into(), epsilon, delta: 0.0, sql: "SELECT 1".into() }
    }

    #[test]
    fn charges_add_up_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let l = RedbLedger::open(dir.path()).unwrap();
            for _ in 0..10 {
                l.charge(&charge("a", 0.1), &Limits::epsilon(1.0)).unwrap();
            }
            assert!((l.spent("a").unwrap() - 1.0).abs() < 1e-9);
        }
        let l = RedbLedger::open(dir.path()).unwrap();
        assert!((l.spent("a").unwrap() - 1.0).abs() < 1e-9);
        assert_eq!(l.spent("b").unwrap(), 0.0);
        assert_eq!(l.history("a").unwrap().len(), 10);
        assert!(l.history("b").unwrap().is_empty());
    }

    #[test]
    fn charge_over_budget_is_refused_with_what_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let l = RedbLedger::open(dir.path()).unwrap();
        l.charge(&charge("a", 0.75), &Limits::epsilon(1.0)).unwrap();
        let err = l.charge(&charge("a", 0.5), &Limits::epsilon(1.0)).unwrap_err();
        assert!(err.to_string().contains("0.25 left"), "{err}");
        assert!((l.spent("a").unwrap() - 0.75).abs() < 1e-12);
    }

    #[test]
    fn collaboration_cap_bounds_what_all_parties_spend_together() {
        let dir = tempfile::tempdir().unwrap();
        let l = RedbLedger::open(dir.path()).unwrap();
        let limits = Limits { epsilon_cap: Some(3.0), ..Limits::epsilon(5.0) };
        l.charge(&charge("a", 2.0), &limits).unwrap();
        let err = l.charge(&charge("b", 1.5), &limits).unwrap_err();
        assert!(err.to_string().contains("1 left of its cap of 3"), "{err}");
        assert_eq!(l.spent("b").unwrap(), 0.0);
        l.charge(&charge("b", 1.0), &limits).unwrap();
    }

    #[test]
    fn delta_is_charged_against_its_own_budget_and_cap() {
        let dir = tempfile::tempdir().unwrap();
        let l = RedbLedger::open(dir.path()).unwrap();
        let limits = Limits { delta_budget: 1e-6, delta_cap: Some(1.5e-6), ..Limits::epsilon(10.0) };
        let with_delta = |party: &str, delta: f64| Charge { delta, ..charge(party, 0.5) };
        // A pure query needs no δ budget at all.
        l.charge(&charge("a", 0.5), &Limits::epsilon(10.0)).unwrap();
        let err = l.charge(&with_delta("a", 1e-7), &Limits::epsilon(10.0)).unwrap_err();
        assert!(err.to_string().contains("needs delta = 0.0000001"), "{err}");
        for _ in 0..10 {
            l.charge(&with_delta("a", 1e-7), &limits).unwrap();
        }
        let err = l.charge(&with_delta("a", 1e-7), &limits).unwrap_err();
        assert!(err.to_string().contains("has only delta = 0 left"), "{err}");
        assert!((l.spent_delta("a").unwrap() - 1e-6).abs() < 1e-15);
        assert!((l.spent("a").unwrap() - 5.5).abs() < 1e-9, "the refused charge took no epsilon");
        let err = l.charge(&with_delta("b", 6e-7), &limits).unwrap_err();
        assert!(err.to_string().contains("collaboration has only delta = 0.0000005 left"), "{err}");
        l.charge(&with_delta("b", 5e-7), &limits).unwrap();
    }
}
