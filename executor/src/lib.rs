//! The cleanroom executor: a Ballista executor that knows the functions
//! rewritten DP plans call.
//!
//! Ballista ships plans between processes as protobuf and resolves functions
//! by name on arrival, so the scheduler and every executor must be built from
//! a session state that registers [`cleanroom_dp::udf::all`]. [`session_state`]
//! is that state; the standalone cluster and the `cleanroom executor` process
//! both start from it; [`process`] is the `cleanroom executor` process.

use std::net::SocketAddr;

use ballista_core::extension::SessionConfigExt;
use ballista_core::serde::protobuf::scheduler_grpc_client::SchedulerGrpcClient;
use datafusion::execution::{SessionState, SessionStateBuilder};
use datafusion::physical_optimizer::optimizer::PhysicalOptimizer;
use datafusion::prelude::SessionConfig;

pub mod joins;
pub mod process;

/// Catalog and schema under which every party sees its datasets.
pub use cleanroom_storage::{CATALOG, SCHEMA};

/// The session every cleanroom process plans and executes with: DataFusion's
/// defaults, Ballista's settings, and cleanroom's functions.
pub fn session_state(target_partitions: usize) -> SessionState {
    let config = SessionConfig::new_with_ballista()
        .with_target_partitions(target_partitions.max(1))
        .with_information_schema(false)
        .with_default_catalog_and_schema(CATALOG, SCHEMA)
        // Ballista's adaptive planner leaves a job whose input turns out
        // empty waiting forever (a grouped DP query ranking each person's
        // groups over an empty filtered input never finished, also without
        // its propagate-empty rule): a hang that depends on the data is an
        // answer about it. The static planner runs the same plans.
        .set_str("ballista.planner.adaptive.enabled", "false")
        // Hash joins are planned, small build sides are broadcast, and
        // joins::SpillableJoins makes every other join a sort-merge join.
        .set_bool("datafusion.optimizer.prefer_hash_join", true);
    let mut builder = SessionStateBuilder::new()
        .with_config(config)
        .with_default_features();
    *builder.physical_optimizers() = Some(PhysicalOptimizer::with_rules(joins::with_spillable_joins(PhysicalOptimizer::new().rules)));
    let functions = builder.scalar_functions().get_or_insert_with(Vec::new);
    functions.extend(cleanroom_dp::udf::all());
    // Plans that run on protected rows call the total form of every function
    // (NULL where the function fails on a value); they travel by name.
    let totals = cleanroom_dp::total::total_versions(functions);
    functions.extend(totals);
    // Per-person float sums and averages run in their exact form.
    builder.aggregate_functions().get_or_insert_with(Vec::new).extend(cleanroom_dp::exact::all());
    builder.build()
}

/// Start one in-process executor that pulls tasks from the scheduler at
/// `scheduler`. Its Flight service listens on an ephemeral loopback port.
pub async fn start_in_process(
    scheduler: SocketAddr,
    vcores: usize,
    state: &SessionState,
) -> anyhow::Result<()> {
    let url = format!("http://{scheduler}");
    let client = loop {
        match SchedulerGrpcClient::connect(url.clone()).await {
            Ok(client) => break client,
            Err(e) => {
                tracing::debug!("waiting for the scheduler at {url}: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    };
    ballista_executor::new_standalone_executor_from_state(client, vcores, state)
        .await
        .map_err(|e| anyhow::anyhow!("cannot start executor: {e}"))
}

/// Memory for query execution when none is given: 70 % of the container's
/// memory limit (cgroup v2 `memory.max` or v1 `memory.limit_in_bytes`) or else of the host's memory, as
/// Ballista's executors default to; 4 GiB where neither can be read.
pub fn default_memory_limit() -> u64 {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let host = read("/proc/meminfo").and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    });
    // cgroup v2, else v1 ("max" or a huge number when unlimited).
    let container = read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
        .and_then(|t| t.trim().parse::<u64>().ok());
    match host.into_iter().chain(container).min() {
        Some(total) => total / 10 * 7,
        None => 4 << 30,
    }
}

/// A memory pool of `bytes` for query work: fair among the operators that
/// can spill; one that cannot spill fails its query when the pool is full
/// rather than grow the process. Errors name the largest consumers.
pub fn query_pool(bytes: usize) -> std::sync::Arc<dyn datafusion::execution::memory_pool::MemoryPool> {
    use datafusion::execution::memory_pool::{FairSpillPool, TrackConsumersPool};
    std::sync::Arc::new(TrackConsumersPool::new(FairSpillPool::new(bytes), std::num::NonZeroUsize::new(5).expect("non-zero")))
}

/// The runtime of the in-process engine: a [`query_pool`] of `memory_limit`
/// bytes (the engine's total; each running query gets its own pool of a
/// share of it), and spill files in `spill_dir` (a temporary directory when
/// `None`).
pub fn in_process_runtime(memory_limit: u64, spill_dir: Option<&std::path::Path>) -> anyhow::Result<std::sync::Arc<datafusion::execution::runtime_env::RuntimeEnv>> {
    let mut builder = datafusion::execution::runtime_env::RuntimeEnvBuilder::new().with_memory_pool(query_pool(memory_limit as usize));
    if let Some(dir) = spill_dir {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create the spill directory {}: {e}", dir.display()))?;
        builder = builder.with_temp_file_path(dir);
    }
    builder.build_arc().map_err(|e| anyhow::anyhow!("cannot set up query execution: {e}"))
}
