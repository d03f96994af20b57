//! The Ballista scheduler inside the gateway's process, and (for `cleanroom
//! serve`) executors in the same process.
//!
//! Ballista's scheduler accepts raw physical plans and its executors serve any
//! shuffle partition to whoever asks, so neither is a security boundary. In
//! `serve` both bind 127.0.0.1 on ephemeral ports; in `cleanroom scheduler`
//! the scheduler binds the operator's `--internal-bind` address, which only
//! executors may reach (a NetworkPolicy on Kubernetes). Ballista's REST API
//! is never started, and only the gateway talks to the scheduler.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ballista_core::config::TaskSchedulingPolicy;
use ballista_core::extension::SessionConfigExt;
use ballista_core::serde::protobuf::scheduler_grpc_server::SchedulerGrpcServer;
use ballista_core::serde::protobuf::job_status::Status;
use ballista_core::serde::BallistaCodec;
use ballista_core::utils::{create_grpc_server, GrpcServerConfig};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::metrics::default_metrics_collector;
use ballista_scheduler::scheduler_server::SchedulerServer;
use datafusion::execution::SessionState;
use datafusion::prelude::SessionConfig;
use datafusion_proto::protobuf::{LogicalPlanNode, PhysicalPlanNode};
use tokio::net::TcpListener;

/// How the scheduler is started.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The scheduler's internal gRPC address (port 0 picks a free port).
    pub bind: SocketAddr,
    /// Executors started inside this process (0 in cluster mode).
    pub in_process_executors: usize,
    /// Task slots of each in-process executor.
    pub slots: usize,
    /// An executor not heard from for this long is lost: its running tasks and
    /// the shuffle output it held are scheduled again elsewhere. When the last
    /// executor is lost, running jobs fail after the same period.
    pub executor_timeout: Duration,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            bind: (Ipv4Addr::LOCALHOST, 0).into(),
            in_process_executors: 2,
            slots: 2,
            executor_timeout: Duration::from_secs(180),
        }
    }
}

/// A running scheduler (and any in-process executors).
#[derive(Clone)]
pub struct EmbeddedCluster {
    /// The scheduler's gRPC address as bound.
    pub scheduler_addr: SocketAddr,
    scheduler: SchedulerServer<LogicalPlanNode, PhysicalPlanNode>,
    /// Executors started in this process.
    pub executors: usize,
    executor_timeout: Duration,
}

/// One Ballista job as the scheduler records it.
#[derive(Debug, Clone)]
pub struct JobSummary {
    pub job_id: String,
    pub status: String,
    pub stages: usize,
    pub completed_stages: usize,
}

impl EmbeddedCluster {
    /// Start the scheduler and the in-process executors, all built from
    /// `state` (which registers cleanroom's functions).
    pub async fn start(state: &SessionState, options: &ClusterOptions) -> anyhow::Result<Self> {
        let logical = state.config().ballista_logical_extension_codec();
        let physical = state.config().ballista_physical_extension_codec();
        let codec = BallistaCodec::new(logical, physical);
        let session_config = state.config().clone();
        let builder_state = state.clone();
        let session_builder = Arc::new(move |_: SessionConfig| Ok(builder_state.clone()));
        let config_producer = Arc::new(move || session_config.clone());

        let listener = TcpListener::bind(options.bind)
            .await
            .with_context(|| format!("cannot bind the internal scheduler address {}", options.bind))?;
        let scheduler_addr = listener.local_addr()?;
        let endpoint = scheduler_addr.to_string();
        let cluster = BallistaCluster::new_memory(endpoint.clone(), session_builder, config_producer.clone());
        let metrics = default_metrics_collector().map_err(|e| anyhow::anyhow!("{e}"))?;
        let timeout = options.executor_timeout.as_secs().max(1);
        let mut config = SchedulerConfig::default().with_scheduler_policy(TaskSchedulingPolicy::PullStaged);
        config.executor_timeout_seconds = timeout;
        config.expire_dead_executor_interval_seconds = (timeout / 3).clamp(1, 15);
        config.no_executors_grace_period_seconds = timeout;
        let mut scheduler: SchedulerServer<LogicalPlanNode, PhysicalPlanNode> =
            SchedulerServer::new(endpoint, cluster, codec, Arc::new(config), metrics);
        scheduler.init().await.map_err(|e| anyhow::anyhow!("cannot start the scheduler: {e}"))?;
        let max_message = config_producer().ballista_grpc_client_max_message_size();
        let service = SchedulerGrpcServer::new(scheduler.clone())
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
        tokio::spawn(
            create_grpc_server(&GrpcServerConfig::default())
                .add_service(service)
                // Task status and job calls are small messages: TCP_NODELAY
                // keeps each from waiting for a delayed ACK.
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))),
        );
        let local = connect_addr(scheduler_addr);
        for _ in 0..options.in_process_executors {
            cleanroom_executor::start_in_process(local, options.slots.max(1), state).await?;
        }
        Ok(EmbeddedCluster {
            scheduler_addr,
            scheduler,
            executors: options.in_process_executors,
            executor_timeout: options.executor_timeout,
        })
    }

    /// The URL a Ballista client session in this process uses to reach the scheduler.
    pub fn scheduler_url(&self) -> String {
        format!("df://{}", connect_addr(self.scheduler_addr))
    }

    /// Executors that may be given work: active and heard from within the
    /// executor timeout (what Ballista schedules on).
    pub async fn live_executors(&self) -> usize {
        // `is_ready` is "at least min_ready_executors (1) alive"; the count
        // is read from the same executor states.
        if !self.scheduler.is_ready() {
            return 0;
        }
        let Ok(executors) = self.scheduler.state.executor_manager.get_executors_state().await else {
            return 0;
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        executors
            .iter()
            .filter(|(_, seen, _)| seen.is_some_and(|t| now.saturating_sub(t) <= self.executor_timeout))
            .count()
            .max(1)
    }

    /// Resolves once no executor has been live for a whole executor timeout.
    pub async fn until_no_executor_for_timeout(&self) {
        let mut since: Option<tokio::time::Instant> = None;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if self.scheduler.is_ready() {
                since = None;
            } else if since.get_or_insert_with(tokio::time::Instant::now).elapsed() >= self.executor_timeout {
                return;
            }
        }
    }

    /// Wait up to `patience` for at least one live executor.
    pub async fn wait_for_executor(&self, patience: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            if self.scheduler.is_ready() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stop a job: its tasks are cancelled on the executors.
    pub async fn cancel(&self, job_id: &str) {
        if let Err(e) = self.scheduler.cancel_job(job_id.to_string().into()).await {
            tracing::warn!(job = %job_id, error = %e, "could not cancel the job");
        }
    }

    /// Every job the scheduler has seen.
    pub async fn jobs(&self) -> anyhow::Result<Vec<JobSummary>> {
        let jobs = self
            .scheduler
            .state
            .task_manager
            .get_all_jobs()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(jobs
            .into_iter()
            .map(|j| JobSummary {
                job_id: j.job_id.to_string(),
                status: match j.status.status {
                    Some(Status::Queued(_)) => "queued",
                    Some(Status::Running(_)) => "running",
                    Some(Status::Failed(_)) => "failed",
                    Some(Status::Successful(_)) => "successful",
                    None => "unknown",
                }
                .to_string(),
                stages: j.num_stages,
                completed_stages: j.completed_stages,
            })
            .collect())
    }
}

/// The address to dial for a scheduler bound to `bound` (a wildcard bind is
/// dialled on loopback).
fn connect_addr(bound: SocketAddr) -> SocketAddr {
    if bound.ip().is_unspecified() {
        SocketAddr::new(if bound.is_ipv4() { Ipv4Addr::LOCALHOST.into() } else { std::net::Ipv6Addr::LOCALHOST.into() }, bound.port())
    } else {
        bound
    }
}

/// A Ballista job on the cluster's executors.
#[async_trait::async_trait]
impl crate::engine::Engine for EmbeddedCluster {
    async fn context(&self, state: SessionState) -> Result<datafusion::prelude::SessionContext, datafusion::error::DataFusionError> {
        <datafusion::prelude::SessionContext as ballista::prelude::SessionContextExt>::remote_with_state(&self.scheduler_url(), state).await
    }

    async fn ready(&self, patience: Duration) -> bool {
        self.wait_for_executor(patience).await
    }

    /// Submit `plan` as a Ballista job and collect its result here, on the
    /// trusted side (no executor address or partition ticket reaches a party).
    async fn run(
        &self,
        ctx: &datafusion::prelude::SessionContext,
        query_id: &str,
        plan: datafusion::logical_expr::LogicalPlan,
        deadline: Duration,
    ) -> Result<Vec<arrow::array::RecordBatch>, crate::engine::RunError> {
        use ballista_core::execution_plans::DistributedQueryExec;
        let started = std::time::Instant::now();
        let df = ctx.execute_logical_plan(plan).await?;
        let physical = df.create_physical_plan().await?;
        fn job_of(physical: &Arc<dyn datafusion::physical_plan::ExecutionPlan>) -> Option<String> {
            physical.downcast_ref::<DistributedQueryExec<LogicalPlanNode>>().and_then(|d| d.job_id()).map(|j| j.to_string())
        }
        // A job whose request goes away (a client that hangs up) is cancelled
        // too, so a run never outlives its request.
        struct CancelOnDrop {
            cluster: EmbeddedCluster,
            physical: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
            finished: bool,
        }
        impl Drop for CancelOnDrop {
            fn drop(&mut self) {
                if let (false, Some(job)) = (self.finished, job_of(&self.physical)) {
                    let cluster = self.cluster.clone();
                    tokio::spawn(async move { cluster.cancel(&job).await });
                }
            }
        }
        let mut guard = CancelOnDrop { cluster: self.clone(), physical: physical.clone(), finished: false };
        // Ballista fails a job whose executors are all lost, but not one
        // submitted just after the last was lost: the job is also given up
        // once no executor has been live for the executor timeout. A job
        // still running at the deadline is cancelled.
        let batches = tokio::select! {
            batches = datafusion::physical_plan::collect(physical.clone(), ctx.task_ctx()) => {
                guard.finished = true;
                batches?
            }
            () = self.until_no_executor_for_timeout() => {
                guard.finished = true;
                return Err(datafusion::error::DataFusionError::Execution("no executor is left in the cluster".into()).into());
            }
            () = tokio::time::sleep(deadline.saturating_sub(started.elapsed())) => {
                guard.finished = true;
                if let Some(job) = job_of(&physical) {
                    self.cancel(&job).await;
                }
                return Err(crate::engine::RunError::Deadline);
            }
        };
        match job_of(&physical) {
            Some(job) => tracing::info!(query = %query_id, job = %job, "query ran as Ballista job {job}"),
            None => tracing::warn!(query = %query_id, "query did not run as a Ballista job"),
        }
        Ok(batches)
    }

    async fn lost(&self) -> bool {
        self.live_executors().await == 0
    }

    async fn workers(&self) -> usize {
        self.live_executors().await
    }

    fn describe(&self) -> String {
        if self.executors > 0 {
            format!("Ballista, {} executors", self.executors)
        } else {
            format!("Ballista, executors join {}", self.scheduler_addr)
        }
    }
}
