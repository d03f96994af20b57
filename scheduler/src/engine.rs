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

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use async_trait::async_trait;
use datafusion::error::DataFusionError;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::execution::{SessionState, SessionStateBuilder};
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

    /// Processes that may be given work now (the server itself for the
    /// in-process engine), for metrics and readiness.
    async fn workers(&self) -> usize;

    /// The engine, for the start banner and logs.
    fn describe(&self) -> String;
}

/// DataFusion in this process: no job submission, no shuffle files, no
/// result fetch. Every session runs on one DataFusion runtime, so all
/// queries share its memory pool and spill directory; query work runs on
/// its own threads, so a busy query never delays the server's network
/// I/O, timers and deadlines.
#[derive(Debug, Clone)]
pub struct InProcess {
    runtime: Arc<RuntimeEnv>,
    threads: Arc<QueryThreads>,
}

/// A spawned run, aborted when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        if !self.0.is_finished() {
            tracing::info!("query run stopped before it finished");
            self.0.abort();
        }
    }
}

/// The tokio runtime query work runs on (one thread per core).
#[derive(Debug)]
struct QueryThreads(Option<tokio::runtime::Runtime>);

impl Drop for QueryThreads {
    fn drop(&mut self) {
        // Without waiting: the engine may be dropped on an async thread.
        if let Some(threads) = self.0.take() {
            threads.shutdown_background();
        }
    }
}

impl InProcess {
    /// An engine whose queries run on `runtime` (see
    /// [`cleanroom_executor::in_process_runtime`]).
    pub fn new(runtime: Arc<RuntimeEnv>) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cores)
            .thread_name("cleanroom-query")
            .enable_all()
            .build()
            .expect("a tokio runtime for query work");
        InProcess { runtime, threads: Arc::new(QueryThreads(Some(threads))) }
    }

    /// `state` as this engine runs it: on the engine's runtime (its memory
    /// pool, spill directory and object stores), with joins that yield.
    pub fn session_state(&self, state: SessionState) -> SessionState {
        SessionStateBuilder::new_from_existing(state)
            .with_runtime_env(self.runtime.clone())
            .with_physical_optimizer_rule(Arc::new(YieldAfterJoins))
            .build()
    }
}

impl Default for InProcess {
    /// DataFusion's default runtime: no memory limit, spill files in a
    /// temporary directory.
    fn default() -> Self {
        InProcess::new(Arc::new(RuntimeEnv::default()))
    }
}

#[async_trait]
impl Engine for InProcess {
    async fn context(&self, state: SessionState) -> Result<SessionContext, DataFusionError> {
        Ok(SessionContext::new_with_state(self.session_state(state)))
    }

    async fn ready(&self, _patience: Duration) -> bool {
        true
    }

    async fn run(&self, ctx: &SessionContext, query_id: &str, plan: LogicalPlan, deadline: Duration) -> Result<Vec<RecordBatch>, RunError> {
        let started = Instant::now();
        let ctx = ctx.clone();
        let threads = self.threads.0.as_ref().expect("the query threads live as long as the engine");
        // Aborted when this call is dropped too (a client that hangs up), so
        // a run never outlives its request.
        let mut run = AbortOnDrop(threads.spawn(async move { ctx.execute_logical_plan(plan).await?.collect().await }));
        // The deadline is checked first: a run is never given time past it.
        // Aborting the run drops its streams, and with them the tasks
        // DataFusion spawned for it.
        let batches = tokio::select! {
            biased;
            () = tokio::time::sleep(deadline) => return Err(RunError::Deadline),
            batches = &mut run.0 => batches.map_err(|e| DataFusionError::Execution(format!("the query task failed: {e}")))??,
        };
        tracing::info!(query = %query_id, seconds = started.elapsed().as_secs_f64(), "query ran in process");
        Ok(batches)
    }

    async fn lost(&self) -> bool {
        false
    }

    async fn workers(&self) -> usize {
        1
    }

    fn describe(&self) -> String {
        let limit = match self.runtime.memory_pool.memory_limit() {
            datafusion::execution::memory_pool::MemoryLimit::Finite(bytes) => format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64),
            _ => "unlimited".to_string(),
        };
        format!("in-process engine, {limit} query memory")
    }
}

/// Wraps every operator that combines inputs (joins) in DataFusion's
/// `CooperativeExec`, so a task producing a join's output yields to the
/// runtime every few batches. Without it, a join whose output is large for
/// few input rows (a self-join of one person's rows) keeps its thread for as
/// long as that output takes, and a run stopped at its deadline or by a
/// client that hung up goes on using the CPU until then. The plan computes
/// the same rows.
#[derive(Debug, Default)]
struct YieldAfterJoins;

impl datafusion::physical_optimizer::PhysicalOptimizerRule for YieldAfterJoins {
    fn optimize(
        &self,
        plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
        _config: &datafusion::config::ConfigOptions,
    ) -> Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>, DataFusionError> {
        use datafusion::common::tree_node::{Transformed, TreeNode};
        use datafusion::physical_plan::coop::CooperativeExec;
        plan.transform_up(|node| {
            if node.children().len() >= 2 {
                Ok(Transformed::yes(Arc::new(CooperativeExec::new(node)) as Arc<dyn datafusion::physical_plan::ExecutionPlan>))
            } else {
                Ok(Transformed::no(node))
            }
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "yield_after_joins"
    }

    fn schema_check(&self) -> bool {
        true
    }
}
