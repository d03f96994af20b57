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
/// result fetch. At most `slots` queries run at once (others wait for a
/// slot, within their deadline), and each runs with its own memory pool of
/// an equal share of the engine's memory, so what one query uses never
/// makes another fail or spill: whether a party's query fits depends on
/// that query alone. Every run shares the runtime's spill directory,
/// object stores and file metadata caches. Query work runs on its own
/// threads, so a busy query never delays the server's network I/O, timers
/// and deadlines.
#[derive(Debug, Clone)]
pub struct InProcess {
    runtime: Arc<RuntimeEnv>,
    threads: Arc<QueryThreads>,
    slots: Arc<tokio::sync::Semaphore>,
    slot_count: usize,
    /// Each run's memory, when the runtime's is limited.
    run_memory: Option<usize>,
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
    /// [`cleanroom_executor::in_process_runtime`]), at most `slots` at once,
    /// each with `1 / slots` of the runtime's memory limit.
    pub fn new(runtime: Arc<RuntimeEnv>, slots: usize) -> Self {
        let slots = slots.max(1);
        let run_memory = match runtime.memory_pool.memory_limit() {
            datafusion::execution::memory_pool::MemoryLimit::Finite(bytes) => Some(bytes / slots),
            _ => None,
        };
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cores)
            .thread_name("cleanroom-query")
            .enable_all()
            .build()
            .expect("a tokio runtime for query work");
        InProcess { runtime, threads: Arc::new(QueryThreads(Some(threads))), slots: Arc::new(tokio::sync::Semaphore::new(slots)), slot_count: slots, run_memory }
    }

    /// One run's runtime: the engine's, with a memory pool of its own.
    fn run_runtime(&self) -> Result<Arc<RuntimeEnv>, DataFusionError> {
        let pool = match self.run_memory {
            Some(bytes) => cleanroom_executor::query_pool(bytes),
            None => Arc::new(datafusion::execution::memory_pool::UnboundedMemoryPool::default()),
        };
        datafusion::execution::runtime_env::RuntimeEnvBuilder::from_runtime_env(&self.runtime).with_memory_pool(pool).build_arc()
    }

    /// `state` as this engine runs it: on the engine's runtime (its memory
    /// pool, spill directory and object stores), with joins that yield.
    ///
    /// The session starts from the one every cleanroom process uses, which
    /// carries Ballista's settings; those that only exist because Ballista
    /// cuts a plan into stages run by separate tasks are set back to
    /// DataFusion's own here: hash joins (a sort-merge join costs several
    /// times more; see [`InProcess::run`] for a build side that does not fit
    /// in memory), round-robin repartitioning, small build sides collected
    /// once, and dynamic filters from a join's build side or a top-k into the
    /// probe side's scan. These choose physical operators only: the logical
    /// plan, and so the answer, is the one Ballista runs.
    pub fn session_state(&self, state: SessionState) -> SessionState {
        let mut builder = SessionStateBuilder::new_from_existing(state);
        // In process, joins stay hash joins (a run out of memory is rerun
        // with sort-merge joins): no cluster join rule.
        if let Some(optimizer) = builder.physical_optimizers() {
            optimizer.rules.retain(|r| r.name() != cleanroom_executor::joins::SPILLABLE_JOINS);
        }
        let mut state = builder
            .with_runtime_env(self.runtime.clone())
            .with_physical_optimizer_rule(Arc::new(crate::ranking::RankPerPerson))
            .with_physical_optimizer_rule(Arc::new(YieldAfterJoins))
            .build();
        let defaults = datafusion::config::OptimizerOptions::default();
        let optimizer = &mut state.config_mut().options_mut().optimizer;
        optimizer.prefer_hash_join = true;
        optimizer.enable_round_robin_repartition = defaults.enable_round_robin_repartition;
        optimizer.hash_join_single_partition_threshold = defaults.hash_join_single_partition_threshold;
        optimizer.hash_join_single_partition_threshold_rows = defaults.hash_join_single_partition_threshold_rows;
        optimizer.enable_dynamic_filter_pushdown = defaults.enable_dynamic_filter_pushdown;
        optimizer.enable_join_dynamic_filter_pushdown = defaults.enable_join_dynamic_filter_pushdown;
        optimizer.enable_topk_dynamic_filter_pushdown = defaults.enable_topk_dynamic_filter_pushdown;
        optimizer.enable_aggregate_dynamic_filter_pushdown = defaults.enable_aggregate_dynamic_filter_pushdown;
        state
    }
}

/// Whether a run failed because the memory pool could not give an operator
/// what it asked for (as opposed to a failure a second plan would repeat).
fn out_of_memory(e: &DataFusionError) -> bool {
    matches!(e.find_root(), DataFusionError::ResourcesExhausted(_))
}

impl Default for InProcess {
    /// DataFusion's default runtime: no memory limit, spill files in a
    /// temporary directory.
    fn default() -> Self {
        InProcess::new(Arc::new(RuntimeEnv::default()), 4)
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
        // The deadline is checked first, here and below: a run is never
        // given time past it, waiting for a slot included.
        let stop = tokio::time::sleep(deadline);
        tokio::pin!(stop);
        let slot = tokio::select! {
            biased;
            () = &mut stop => return Err(RunError::Deadline),
            slot = self.slots.clone().acquire_owned() => slot.expect("the engine never closes its slots"),
        };
        let ctx = SessionContext::new_with_state(
            SessionStateBuilder::new_from_existing(ctx.state()).with_runtime_env(self.run_runtime()?).build(),
        );
        let threads = self.threads.0.as_ref().expect("the query threads live as long as the engine");
        // Aborted when this call is dropped too (a client that hangs up), so
        // a run never outlives its request; the slot is free when it ends.
        let mut run = AbortOnDrop(threads.spawn(async move {
            let _slot = slot;
            match ctx.execute_logical_plan(plan.clone()).await?.collect().await {
                // A hash join keeps its whole build side in memory and cannot
                // spill; sorts, aggregates and sort-merge joins can. A run
                // that ran out of memory runs once more with sort-merge joins
                // (same plan, same answer, slower), so a join too large for
                // the pool does not fail the query. Only memory decides
                // this, as it decides whether any run fits.
                Err(e) if out_of_memory(&e) => {
                    tracing::warn!(error = %e, "the query ran out of memory with hash joins; running it again with sort-merge joins, which spill");
                    let mut state = ctx.state();
                    state.config_mut().options_mut().optimizer.prefer_hash_join = false;
                    SessionContext::new_with_state(state).execute_logical_plan(plan).await?.collect().await
                }
                result => result,
            }
        }));
        // Aborting the run drops its streams, and with them the tasks
        // DataFusion spawned for it.
        let batches = tokio::select! {
            biased;
            () = &mut stop => return Err(RunError::Deadline),
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
        let gib = |bytes: usize| format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64);
        match (self.runtime.memory_pool.memory_limit(), self.run_memory) {
            (datafusion::execution::memory_pool::MemoryLimit::Finite(total), Some(each)) => format!(
                "in-process engine, {} query memory: {} queries at once, {} each",
                gib(total),
                self.slot_count,
                gib(each)
            ),
            _ => format!("in-process engine, unlimited query memory, {} queries at once", self.slot_count),
        }
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
