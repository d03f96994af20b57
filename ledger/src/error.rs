//! Errors of the ledger. Messages name parties, amounts and the ledger's
//! own records, never protected data.

use cleanroom_dp::accountant::BudgetRefusal;
use cleanroom_dp::DpError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LedgerError {
    /// The party's budget or the collaboration's cap does not cover the charge.
    #[error(transparent)]
    Budget(#[from] BudgetRefusal),
    /// The ledger's store failed or holds something unreadable.
    #[error("budget ledger error: {0}")]
    Storage(String),
    /// The ledger did not answer in time; nothing that needs it can go on.
    #[error("the budget ledger is unreachable: {0}")]
    Unavailable(String),
}

pub type Result<T, E = LedgerError> = std::result::Result<T, E>;

/// The planner's error for the same outcome, with the same message, for code
/// that reports planning and charging failures alike.
impl From<LedgerError> for DpError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::Budget(refusal) => DpError::Budget(refusal),
            LedgerError::Storage(m) => DpError::Ledger(m),
            LedgerError::Unavailable(m) => DpError::LedgerUnavailable(m),
        }
    }
}
