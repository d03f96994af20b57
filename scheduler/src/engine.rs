//! Where a checked, rewritten plan runs: the execution seam.
//!
//! The release path ([`crate::pipeline`]) hands the DP planner's exact plan
//! to an [`Engine`] and gets its (small, exact) result back on the trusted
//! side. The engine never sees anything but plans the planner produced, so
//! the privacy argument does not depend on which one runs them: it rests on
//! the rewritten plan and the release, and both engines run the same plans.
//!
//! - [`InProcess`]: DataFusion in the server's own process.
//! - [`crate::cluster::EmbeddedCluster`]: a Ballista job on the cluster's
//!   executors (embedded ones for `serve`, remote ones for `scheduler`).

use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use async_trait::async_trait;
use datafusion::error::DataFusionError;
use datafusion::execution::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;

/// Why a run gave no result.
#[derive(Debug)]
pub enum RunError {
    /// It was stopped at the deadline.
    Deadline,
    /// It failed (the error's text may quote data: never sent to a party).
    Failed(DataFusionError),
}

impl From<DataFusionError> for RunError {
    fn from(e: DataFusionError) -> Self {
        RunError::Failed(e)
    }
}

/// Runs checked plans.
#[async_trait]
pub trait Engine: Send + Sync {
    /// A session context on `state` for one party's session: its statements
    /// are planned in it, and run through [`Engine::run`] with it.
    async fn context(&self, state: SessionState) -> Result<SessionContext, DataFusionError>;

    /// Wait up to `patience` until the engine can run a query; false if it
    /// cannot (a query is then turned away before anything is charged).
    async fn ready(&self, patience: Duration) -> bool;

    /// Run `plan` in `ctx` and collect its result, giving up at `deadline`
    /// (measured from the call).
    async fn run(&self, ctx: &SessionContext, query_id: &str, plan: LogicalPlan, deadline: Duration) -> Result<Vec<RecordBatch>, RunError>;

    /// After a failed run: whether the engine has nothing left to run on (a
    /// fact about the engine, not the data, so a party may be told).
    async fn lost(&self) -> bool;
}

/// DataFusion in this process: no job submission, no shuffle files, no
/// result fetch; memory and spilling as the session's runtime sets them.
#[derive(Debug, Clone, Default)]
pub struct InProcess;

#[async_trait]
impl Engine for InProcess {
    async fn context(&self, state: SessionState) -> Result<SessionContext, DataFusionError> {
        Ok(SessionContext::new_with_state(state))
    }

    async fn ready(&self, _patience: Duration) -> bool {
        true
    }

    async fn run(&self, ctx: &SessionContext, query_id: &str, plan: LogicalPlan, deadline: Duration) -> Result<Vec<RecordBatch>, RunError> {
        let started = Instant::now();
        // Dropping the collecting future stops the run: DataFusion's tasks
        // are aborted with the streams that own them.
        let run = async { ctx.execute_logical_plan(plan).await?.collect().await };
        // The deadline is checked first: a run is never given time past it.
        let batches = tokio::select! {
            biased;
            () = tokio::time::sleep(deadline) => return Err(RunError::Deadline),
            batches = run => batches?,
        };
        tracing::info!(query = %query_id, seconds = started.elapsed().as_secs_f64(), "query ran in process");
        Ok(batches)
    }

    async fn lost(&self) -> bool {
        false
    }
}
