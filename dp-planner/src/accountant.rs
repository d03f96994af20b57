//! The accountant of one query: how its (ε, δ) is split between its noisy
//! columns and its partition selection, and what it is charged.
//!
//! ## Composition argument
//!
//! A query releases `m` noisy columns (an `AVG` counts as one, itself a
//! noisy sum and a noisy count with half of the column's share each) and,
//! when a group key has no public domain, one DP partition selection.
//!
//! - **Laplace** (`noise = 'laplace'`, the default): ε is split evenly over
//!   the `m` columns and the selection; column `j` is ε_j-DP by OpenDP's
//!   Laplace map, the selection (ε_s, δ_s)-DP by OpenDP's threshold map
//!   (corrected for opendp#2922, see [`crate::mechanism::Threshold`]).
//!   Sequential composition: the query is (Σ ε_j + ε_s, δ_s)-DP, at most the
//!   query's (ε, δ).
//! - **Gaussian** (`noise = 'gaussian'`): the selection, if any, takes the
//!   same ε share as above and half of δ; the columns share the rest,
//!   (ε_g, δ_g). They are composed in zCDP, where composition is additive in
//!   ρ and tighter than adding ε: the largest ρ whose (ε, δ) conversion
//!   (OpenDP's, at least as tight as ρ + 2√(ρ ln 1/δ)) is at most ε_g at δ_g
//!   is split evenly, ρ_j = ρ/m; column `j` is ρ_j-zCDP by OpenDP's Gaussian
//!   map with its L2 sensitivity (a person reaches k groups, each by at most
//!   the per-group bound, so √k × that bound), the columns together
//!   ρ-zCDP, hence (ε_g, δ_g)-DP. With the selection, the query is
//!   (ε_s + ε_g, δ_s + δ_g)-DP by sequential composition.
//!
//! Either way the query is charged its (ε, δ) — ε as asked, δ as used — and
//! the ledger (the `cleanroom-ledger` crate) composes the charges of all
//! queries and makes each charge durable before it hands back a [`Receipt`].

use serde::{Deserialize, Serialize};

use crate::error::{DpError, Result, Rule};
use crate::mechanism::{rho_for, Share};
use crate::options::{NoiseKind, ResolvedOptions};

/// One query's budget, split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Split {
    /// What each noisy column may spend.
    pub column: Share,
    /// ε and δ the partition selection may spend, when there is one.
    pub selection: Option<(f64, f64)>,
    /// δ the Gaussian columns spend (0 for Laplace).
    pub gaussian_delta: f64,
}

/// Why a charge was refused: which limit it would pass, and what is left.
/// Decided by the ledger, which holds the totals.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BudgetRefusal {
    /// The party's remaining budget does not cover the charge.
    #[error("privacy budget exceeded: the query needs {what} = {needed}, but party `{party}` has only {what} = {remaining} left of its budget of {budget}")]
    Party {
        party: String,
        /// `epsilon` or `delta`.
        what: &'static str,
        needed: f64,
        remaining: f64,
        budget: f64,
    },
    /// The whole collaboration's cap does not cover the charge.
    #[error("collaboration privacy cap reached: the query needs {what} = {needed}, but the collaboration has only {what} = {remaining} left of its cap of {cap} (shared by all parties)")]
    Collaboration { what: &'static str, needed: f64, remaining: f64, cap: f64 },
}

impl BudgetRefusal {
    /// The rule the refusal names in the audit log.
    pub fn rule(&self) -> &'static str {
        match self {
            BudgetRefusal::Party { .. } => "budget",
            BudgetRefusal::Collaboration { .. } => "collaboration_cap",
        }
    }
}

/// Split `options`' ε and δ over `columns` noisy columns and, if `select`, a
/// partition selection.
pub fn split(options: &ResolvedOptions, columns: usize, select: bool) -> Result<Split> {
    let parts = (columns + usize::from(select)) as f64;
    let selection_epsilon = options.epsilon / parts;
    match options.noise {
        NoiseKind::Laplace => Ok(Split {
            column: Share::Epsilon(options.epsilon / parts),
            selection: select.then_some((selection_epsilon, options.delta)),
            gaussian_delta: 0.0,
        }),
        NoiseKind::Gaussian => {
            if options.delta <= 0.0 {
                return Err(DpError::refused_with(
                    Rule::GaussianDelta,
                    "Gaussian noise is (epsilon, delta)-DP and needs delta > 0 (the query has delta = 0)",
                    "OPTIONS (noise = 'gaussian', delta = 1e-7), or Laplace noise (the default)",
                ));
            }
            let (epsilon, delta) = if select {
                (options.epsilon - selection_epsilon, options.delta / 2.0)
            } else {
                (options.epsilon, options.delta)
            };
            let rho = rho_for(epsilon, delta)?;
            Ok(Split {
                column: Share::Rho(rho / columns as f64),
                selection: select.then_some((selection_epsilon, options.delta / 2.0)),
                gaussian_delta: delta,
            })
        }
    }
}

/// What a query asks to spend.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// The options the query runs with, for its audit record.
    #[serde(default)]
    pub options: String,
    /// The datasets it reads.
    #[serde(default)]
    pub datasets: Vec<String>,
    /// Its answer's columns (`name: type`): the shape, never values.
    #[serde(default)]
    pub columns: Vec<String>,
}

impl Charge {
    /// The charge for running `query` for `party` (`sql` as the party sent it).
    pub fn for_query(party: &str, query: &crate::rewrite::DpQuery, sql: &str) -> Self {
        Charge {
            party: party.to_string(),
            query_id: query.id.clone(),
            epsilon: query.epsilon,
            delta: query.delta,
            sql: sql.to_string(),
            options: format!("{:?}", query.options),
            datasets: query.datasets.clone(),
            columns: crate::release::announced_dp_schema(query).map(|s| shape(&s)).unwrap_or_default(),
        }
    }
}

/// Column names and types of a schema (`name: type`), for audit records.
pub fn shape(schema: &arrow::datatypes::Schema) -> Vec<String> {
    schema.fields().iter().map(|f| format!("{}: {}", f.name(), f.data_type())).collect()
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
    /// The party's totals and budgets right after this charge.
    #[serde(default)]
    pub spent: f64,
    #[serde(default)]
    pub spent_delta: f64,
    #[serde(default)]
    pub budget: f64,
    #[serde(default)]
    pub delta_budget: f64,
    /// The charge's record in the audit log.
    #[serde(default)]
    pub audit_seq: u64,
    #[serde(default)]
    pub audit_hash: String,
}

/// Proof that a charge is durably recorded. Only a ledger makes one (its
/// fields are private, it cannot be deserialised, and its one constructor
/// takes the ledger's charge record), and the release path requires one.
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
    /// The charge's record in the audit log.
    audit_seq: u64,
    audit_hash: String,
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

    /// `SEQ:HASH` of the charge's record in the audit log.
    pub fn audit_record(&self) -> String {
        format!("{}:{}", self.audit_seq, self.audit_hash)
    }

    /// The receipt of a charge record a ledger has made durable. A ledger
    /// calls this once the record has been committed; the release path
    /// trusts it, so nothing else should.
    pub fn from_record(party: &str, r: &ChargeRecord) -> Receipt {
        Receipt {
            id: r.receipt_id.clone(),
            party: party.to_string(),
            query_id: r.query_id.clone(),
            epsilon: r.epsilon,
            delta: r.delta,
            spent: r.spent,
            spent_delta: r.spent_delta,
            budget: r.budget,
            delta_budget: r.delta_budget,
            at: r.at,
            audit_seq: r.audit_seq,
            audit_hash: r.audit_hash.clone(),
        }
    }
}

/// Budget figures shown to people are rounded to 9 decimals so binary
/// rounding noise (0.30000000000000004) does not leak into messages.
pub fn round_for_display(x: f64) -> f64 {
    (x * 1e9).round() / 1e9
}
