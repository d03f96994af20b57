//! Errors of the DP planner. A refusal always names the rule it enforces and,
//! where there is one, what the analyst can write instead. Every message here is
//! derived from the SQL text, the policy and the ledger, never from protected data.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum DpError {
    /// The query breaks a privacy rule; it is refused at planning, before any data is read.
    #[error("query refused by rule `{rule}`: {detail}{}", alternative.as_ref().map(|a| format!(". Allowed instead: {a}")).unwrap_or_default())]
    Refused {
        rule: &'static str,
        detail: String,
        alternative: Option<String>,
    },
    /// A DP option is missing, malformed or out of its allowed range.
    #[error("invalid differential-privacy option `{option}`: {detail}")]
    InvalidOption { option: String, detail: String },
    /// The party's budget or the collaboration's cap does not cover the query.
    #[error(transparent)]
    Budget(#[from] crate::accountant::BudgetRefusal),
    /// The statement cannot be parsed or planned as SQL (before any DP rule).
    #[error("{0}")]
    Sql(datafusion::error::DataFusionError),
    #[error("planning error: {0}")]
    Plan(#[from] datafusion::error::DataFusionError),
    #[error("noise mechanism error: {0}")]
    Mechanism(String),
    #[error("budget ledger error: {0}")]
    Ledger(String),
    /// The ledger did not answer in time; nothing that needs it can go on.
    #[error("the budget ledger is unreachable: {0}")]
    LedgerUnavailable(String),
}

impl DpError {
    pub fn refused(rule: &'static str, detail: impl Into<String>) -> Self {
        DpError::Refused {
            rule,
            detail: detail.into(),
            alternative: None,
        }
    }

    pub fn refused_with(
        rule: &'static str,
        detail: impl Into<String>,
        alternative: impl Into<String>,
    ) -> Self {
        DpError::Refused {
            rule,
            detail: detail.into(),
            alternative: Some(alternative.into()),
        }
    }

    /// The rule a refusal names, if this is a refusal.
    pub fn rule(&self) -> Option<&'static str> {
        match self {
            DpError::Refused { rule, .. } => Some(rule),
            _ => None,
        }
    }
}

pub type Result<T, E = DpError> = std::result::Result<T, E>;
