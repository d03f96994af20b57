//! The path of a planned statement to its answer, in one function:
//! recall → charge → run → release → post-process → audit → remember.
//!
//! [`Pipeline::answer`] speaks the planner's and the ledger's types and runs
//! plans on any [`Engine`]; the Flight SQL gateway only translates requests
//! into an [`Ask`] and a [`QueryError`] into a status. Why the order keeps
//! the guarantee:
//!
//! - **recall** first: a question whose DP aggregate was already released to
//!   this party on the same data versions — the same question, or the same
//!   one with another `LIMIT`, `ORDER BY`, projection, filter or outer
//!   aggregate around it, as BI tools add — is answered from the kept
//!   release, at no new cost: its post-processing runs again on the kept
//!   noisy values, which is post-processing of an ε-DP release (and a new
//!   draw would give an averaging attack more samples).
//! - **charge** before any protected row is read, durably, with the query's
//!   `query` audit record in the same atomic write; a budget or cap refusal
//!   reads nothing. Nothing is charged for a query no engine could run.
//! - **run** the exact plan the planner checked; its result (per-group exact
//!   aggregates) stays here.
//! - **release** with the mechanisms the planner calibrated (the only place
//!   noise is drawn), then **post-process** (outer projection, ORDER BY,
//!   LIMIT over released values: free by post-processing).
//! - **audit** the answer's shape before it leaves; an answer whose record
//!   cannot be written does not leave.
//! - a failure after the charge keeps the charge: its cause may depend on the
//!   data, and refunding it would make failure a free oracle. Answers and
//!   failures alike leave no sooner than the minimum response time.
//! - **remember** the release (before its post-processing runs: it is paid
//!   for whatever happens next), for the next recall.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cleanroom_dp::accountant::shape;
use cleanroom_dp::policy::Policy;
use cleanroom_dp::release::{self, Released};
use cleanroom_dp::rewrite::PlannedQuery;
use cleanroom_dp::DpError;
use cleanroom_ledger::audit::{AnswerEvent, AuditEvent, Event, QueryEvent, RefusalEvent};
use cleanroom_ledger::{Charge, Ledger, LedgerError, Limits};
use datafusion::prelude::SessionContext;
use tracing::{info, warn};

use crate::engine::{Engine, RunError};

/// How long a query waits for an engine that can run it before it is turned
/// away (uncharged).
pub const ENGINE_WAIT: Duration = Duration::from_secs(10);

/// The release path: a ledger and an engine.
#[derive(Clone)]
pub struct Pipeline {
    pub ledger: Arc<dyn Ledger>,
    pub engine: Arc<dyn Engine>,
}

/// One statement to answer, planned earlier in the party's session.
pub struct Ask<'a> {
    pub party: &'a str,
    /// The statement as the party sent it.
    pub sql: &'a str,
    /// The session's context (the plan runs in it).
    pub ctx: &'a SessionContext,
    pub policy: &'a Policy,
    /// The data versions the statement was planned on.
    pub versions: &'a str,
    /// The party's budget and the collaboration's cap.
    pub limits: Limits,
    /// A run still going after this is stopped (its charge kept).
    pub deadline: Duration,
    /// No answer or failure after a charge leaves sooner than this.
    pub min_response: Duration,
}

/// How an answer was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// A statement that reads no protected data: free.
    Free,
    /// The answer already released for the same question: free.
    Cached,
    /// Charged, run and released now.
    Answered,
}

/// A released answer and how it was served.
#[derive(Debug)]
pub struct Answer {
    pub released: Released,
    pub served: Served,
    /// How long the engine ran (for a charged answer).
    pub ran: Option<Duration>,
}

/// What happened to a charged query that gave no answer.
#[derive(Debug)]
pub enum Failure {
    /// It was stopped at the collaboration's deadline.
    Deadline(Duration),
    /// The run failed; `engine_lost` when the engine had nothing left to run
    /// on (a fact about the cluster, which a party may be told).
    Run { engine_lost: bool },
    /// The release, post-processing or the answer's audit record failed.
    Release(DpError),
}

/// Why a statement gave no answer.
#[derive(Debug)]
pub enum QueryError {
    /// Turned away by a budget or cap rule before anything was read or
    /// charged; on the audit log.
    Refused { rule: &'static str, error: DpError },
    /// No engine could run it within [`ENGINE_WAIT`]: not run, not charged;
    /// on the audit log under rule `no_executor`.
    NoEngine { waited: Duration },
    /// Charged, then failed; the charge is kept and the failure is on the
    /// audit log (without its cause).
    Failed { receipt: String, epsilon: f64, failure: Failure },
    /// A planner or ledger error before any charge (or the audit record of a
    /// refusal could not be written).
    Dp(DpError),
}

impl QueryError {
    /// The text a party is given for the engine-related outcomes (the
    /// others carry a [`DpError`], whose text is the planner's).
    pub fn message(&self) -> Option<String> {
        match self {
            QueryError::NoEngine { waited } => Some(format!(
                "no executor is available to run the query (none joined the cluster within {} s): it was not run and nothing was charged; try again when executors are up",
                waited.as_secs()
            )),
            QueryError::Failed { epsilon, failure: Failure::Deadline(deadline), .. } => Some(format!(
                "the query did not finish within the collaboration's deadline of {} s and was stopped; its charge of epsilon = {epsilon} is kept",
                deadline.as_secs_f64()
            )),
            QueryError::Failed { epsilon, failure: Failure::Run { engine_lost: true }, .. } => Some(format!(
                "the query failed while running: no executor is left in the cluster; its charge of epsilon = {epsilon} is kept"
            )),
            QueryError::Failed { epsilon, failure: Failure::Run { engine_lost: false }, .. } => {
                Some(format!("the query failed while running; its charge of epsilon = {epsilon} is kept"))
            }
            QueryError::Refused { .. } | QueryError::Dp(_) | QueryError::Failed { failure: Failure::Release(_), .. } => None,
        }
    }
}

impl From<DpError> for QueryError {
    fn from(e: DpError) -> Self {
        QueryError::Dp(e)
    }
}

impl Pipeline {
    pub fn new(ledger: Arc<dyn Ledger>, engine: Arc<dyn Engine>) -> Self {
        Pipeline { ledger, engine }
    }

    /// Durably append `event` by `party` to the audit log (off the async
    /// runtime). An action whose record cannot be written does not happen.
    pub async fn audit(&self, party: Option<&str>, event: Event) -> Result<(), DpError> {
        let (ledger, event) = (self.ledger.clone(), AuditEvent::new(party, event));
        blocking(move || ledger.append_audit(&event)).await??;
        Ok(())
    }

    /// Record that `party` was refused by `rule` with `message` (what it was
    /// told), for `sql` or an upload of `upload`.
    pub async fn refused(&self, party: &str, rule: &str, message: &str, sql: Option<&str>, upload: Option<&str>) -> Result<(), DpError> {
        let event = RefusalEvent {
            rule: rule.to_string(),
            message: message.to_string(),
            sql: sql.map(str::to_string),
            upload: upload.map(str::to_string),
        };
        self.audit(Some(party), Event::Refusal(event)).await
    }

    /// Answer a planned statement: the whole release path.
    pub async fn answer(&self, ask: &Ask<'_>, planned: Arc<PlannedQuery>) -> Result<Answer, QueryError> {
        let query = match planned.as_ref() {
            PlannedQuery::Dp(query) => query.as_ref(),
            PlannedQuery::NoData(q) => return self.free(ask, release::without_data(q).await?, "no_data").await,
            PlannedQuery::Explain(q) => return self.free(ask, release::explain(q)?, "explain").await,
        };

        // recall
        let key = release::release_key(query, ask.party, ask.policy, ask.versions);
        let (ledger, lookup) = (self.ledger.clone(), key.clone());
        if let Some(noisy) = blocking(move || cleanroom_ledger::recall(ledger.as_ref(), &lookup)).await?? {
            info!(party = %ask.party, query = %query.id, "answered from the released-answer cache");
            let receipt = noisy.receipt().to_string();
            // Post-processing of the kept release: free, whatever it computes.
            let answer = release::finish(query, noisy).await?;
            let event = AnswerEvent {
                receipt,
                query_id: query.id.clone(),
                sql: Some(ask.sql.to_string()),
                cached: true,
                rows: answer.num_rows(),
                columns: shape(&answer.schema()),
            };
            self.audit(Some(ask.party), Event::Answer(event)).await?;
            return Ok(Answer { released: answer, served: Served::Cached, ran: None });
        }

        // Nothing is charged for a query no engine could run.
        if !self.engine.ready(ENGINE_WAIT).await {
            warn!(party = %ask.party, query = %query.id, "no engine available; query turned away uncharged");
            let refusal = QueryError::NoEngine { waited: ENGINE_WAIT };
            let message = refusal.message().expect("an engine refusal has a message");
            self.refused(ask.party, "no_executor", &message, Some(ask.sql), None).await?;
            return Err(refusal);
        }

        // charge: durable before any protected data is read.
        let charge = Charge::for_query(ask.party, query, ask.sql);
        let (ledger, limits) = (self.ledger.clone(), ask.limits);
        let receipt = match blocking(move || ledger.charge(&charge, &limits)).await? {
            Ok(receipt) => receipt,
            Err(LedgerError::Budget(refusal)) => {
                let (rule, error) = (refusal.rule(), DpError::Budget(refusal));
                self.refused(ask.party, rule, &error.to_string(), Some(ask.sql), None).await?;
                return Err(QueryError::Refused { rule, error });
            }
            Err(e) => return Err(QueryError::Dp(e.into())),
        };
        info!(party = %ask.party, query = %query.id, receipt = %receipt.id(), epsilon = receipt.epsilon(), delta = receipt.delta(), "budget charged");

        // run → release → post-process → audit; a failure keeps the charge.
        let started = Instant::now();
        let outcome = self.run_and_release(ask, planned.clone(), &receipt, key).await;
        if let Some(rest) = ask.min_response.checked_sub(started.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        let (released, ran) = match outcome {
            Ok(released) => released,
            Err(failure) => {
                // The cause may depend on the data: the record says only that it failed.
                let event = Event::QueryFailure { receipt: receipt.id().to_string(), query_id: query.id.clone() };
                if let Err(e) = self.audit(Some(ask.party), event).await {
                    warn!(error = %e, "could not record the failure in the audit log");
                }
                return Err(QueryError::Failed { receipt: receipt.id().to_string(), epsilon: receipt.epsilon(), failure });
            }
        };

        Ok(Answer { released, served: Served::Answered, ran: Some(ran) })
    }

    /// A statement that reads no protected data: costs nothing, recorded all the same.
    async fn free(&self, ask: &Ask<'_>, answer: Released, statement: &str) -> Result<Answer, QueryError> {
        let event = QueryEvent {
            sql: ask.sql.to_string(),
            statement: Some(statement.to_string()),
            rows: Some(answer.num_rows()),
            columns: shape(&answer.schema()),
            ..QueryEvent::default()
        };
        self.audit(Some(ask.party), Event::Query(event)).await?;
        Ok(Answer { released: answer, served: Served::Free, ran: None })
    }

    /// Run the exact plan, release it with the planned mechanisms, keep the
    /// release under `key`, finish it, and audit its shape.
    async fn run_and_release(&self, ask: &Ask<'_>, planned: Arc<PlannedQuery>, receipt: &cleanroom_ledger::Receipt, key: String) -> Result<(Released, Duration), Failure> {
        let PlannedQuery::Dp(query) = planned.as_ref() else { unreachable!("only DP queries are charged") };
        let started = Instant::now();
        let exact = match self.engine.run(ask.ctx, &query.id, query.exact_plan.clone(), ask.deadline).await {
            Ok(batches) => batches,
            Err(RunError::Deadline) => {
                warn!(party = %ask.party, query = %query.id, "query stopped at its deadline");
                return Err(Failure::Deadline(ask.deadline));
            }
            Err(RunError::Failed(e)) => {
                // Only the kind of error: its text may quote the data.
                warn!(party = %ask.party, query = %query.id, kind = error_kind(&e), "execution failed");
                return Err(Failure::Run { engine_lost: self.engine.lost().await });
            }
        };
        let ran = started.elapsed();
        // OpenDP sampling is CPU work: off the async runtime.
        let (for_release, receipt_for_release) = (planned.clone(), receipt.clone());
        let noisy = blocking(move || {
            let PlannedQuery::Dp(query) = for_release.as_ref() else { unreachable!("only DP queries are charged") };
            release::release(query, &exact, &receipt_for_release)
        })
            .await
            .map_err(Failure::Release)?
            .map_err(Failure::Release)?;
        // remember the release before its post-processing runs: it is paid
        // for, whatever the post-processing does.
        let (ledger, kept) = (self.ledger.clone(), noisy.clone());
        if !matches!(blocking(move || cleanroom_ledger::remember(ledger.as_ref(), &key, &kept)).await, Ok(Ok(()))) {
            // Failing to keep it only means a re-run pays again.
            warn!(party = %ask.party, query = %query.id, "could not keep the release");
        }
        let released = release::finish(query, noisy).await.map_err(Failure::Release)?;
        // The answer leaves only once its shape is on the audit log.
        let event = AnswerEvent {
            receipt: receipt.id().to_string(),
            query_id: query.id.clone(),
            sql: None,
            cached: false,
            rows: released.num_rows(),
            columns: shape(&released.schema()),
        };
        self.audit(Some(ask.party), Event::Answer(event)).await.map_err(Failure::Release)?;
        Ok((released, ran))
    }
}

/// Run blocking work (ledger I/O, OpenDP sampling) off the async runtime.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, DpError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| DpError::Ledger(format!("background task failed: {e}")))
}

/// The variant of a DataFusion error, for logs (its message may quote values).
pub fn error_kind(e: &datafusion::error::DataFusionError) -> &'static str {
    use datafusion::error::DataFusionError as E;
    match e {
        E::ArrowError(..) => "arrow",
        E::ParquetError(..) => "parquet",
        E::ObjectStore(..) => "object_store",
        E::IoError(..) => "io",
        E::SQL(..) => "sql",
        E::NotImplemented(..) => "not_implemented",
        E::Internal(..) => "internal",
        E::Plan(..) => "plan",
        E::Configuration(..) => "configuration",
        E::SchemaError(..) => "schema",
        E::Execution(..) => "execution",
        E::ExecutionJoin(..) => "join",
        E::ResourcesExhausted(..) => "resources_exhausted",
        E::External(..) => "external",
        E::Context(_, inner) => error_kind(inner),
        E::Substrait(..) => "substrait",
        E::Diagnostic(_, inner) => error_kind(inner),
        E::Collection(..) => "collection",
        E::Shared(inner) => error_kind(inner),
        _ => "other",
    }
}
