//! The differential-privacy planner of cleanroom.
//!
//! A pure library: a DataFusion [`LogicalPlan`](datafusion::logical_expr::LogicalPlan)
//! and the querying party's [`policy::Policy`] go in; a checked, rewritten plan
//! that computes contribution-bounded exact aggregates, plus the privacy cost of
//! releasing them, comes out. It knows nothing about Flight or Ballista, so every
//! rule can be tested on a local `SessionContext`.
//!
//! How the parts fit:
//! - [`options`] reads the `WITH DIFFERENTIAL_PRIVACY OPTIONS (…)` clause and
//!   validates the privacy parameters a query asks for;
//! - [`rewrite`] checks the plan against the policy (privacy-unit tracking, the
//!   allowed shapes, the column roles) and rewrites the DP aggregate so that every
//!   person's contribution is bounded;
//! - [`mechanism`] holds the OpenDP noise mechanisms and their privacy maps;
//! - [`accountant`] splits a query's (ε, δ) over its noisy columns and its
//!   partition selection (composing Gaussian columns in zCDP);
//! - [`release`] turns exact bounded aggregates into a [`release::Released`]
//!   answer: the only type the gateway may send to a party, and it can only be
//!   made with a [`accountant::Receipt`] for the query's charge (the
//!   `cleanroom-ledger` crate makes receipts once a charge is durable).
//! - [`total`] makes every function and operator below the DP aggregate
//!   total (NULL where it would fail on a value), so no query fails because
//!   of the data;
//! - [`udf`] holds the scalar functions the rewritten plans call; executors must
//!   register them.

pub mod accountant;
pub mod error;
pub mod exact;
pub mod limits;
pub mod mechanism;
pub mod options;
pub mod policy;
pub mod release;
pub mod rewrite;
pub mod studies;
pub mod tracking;
pub mod total;
pub mod udf;

pub use error::{DpError, Rule};

use datafusion::execution::SessionState;

/// Plan one statement a party sent: the one entry point from SQL text to a
/// [`rewrite::PlannedQuery`]. The text's size is checked, the
/// `WITH DIFFERENTIAL_PRIVACY OPTIONS (…)` clause cut out and its options
/// laid over `session_options` and the policy's defaults, the rest parsed in
/// `state`'s dialect, its shape checked before planning (so no nesting can
/// overflow the planner's stack), planned against `state`'s catalog, and
/// checked and rewritten against `policy`.
pub async fn plan_sql(
    state: &SessionState,
    sql: &str,
    policy: &policy::Policy,
    session_options: &options::QueryOptions,
) -> error::Result<rewrite::PlannedQuery> {
    limits::check_text(sql)?;
    let (sql, query_options) = options::split_dp_clause(sql)?;
    let asked = query_options.over(session_options);
    let dialect = state.config().options().sql_parser.dialect;
    let statement = state.sql_to_statement(&sql, &dialect).map_err(DpError::Sql)?;
    limits::check_statement(&statement)?;
    // A study call becomes the DP SQL that answers it; its own ε wins.
    let (statement, study_options) = studies::expand(state, statement, policy, &asked).await?;
    limits::check_statement(&statement)?;
    let options = study_options.over(&asked).resolve(&policy.defaults)?;
    let plan = state.statement_to_plan(statement).await.map_err(DpError::Sql)?;
    rewrite::plan_query(&plan, policy, &options)
}
