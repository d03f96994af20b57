//! The embedded Ballista cluster of `cleanroom serve`: one scheduler and N
//! executors in this process, all on loopback only.
//!
//! Ballista's scheduler accepts raw physical plans and its executors serve any
//! shuffle partition to whoever asks, so neither is a security boundary: both
//! bind 127.0.0.1 on ephemeral ports, Ballista's REST API is not started, and
//! only the gateway talks to them.

use std::net::SocketAddr;
use std::sync::Arc;

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

/// A running in-process cluster.
#[derive(Clone)]
pub struct EmbeddedCluster {
    /// The scheduler's gRPC address (loopback).
    pub scheduler_addr: SocketAddr,
    scheduler: SchedulerServer<LogicalPlanNode, PhysicalPlanNode>,
    pub executors: usize,
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
    /// Start the scheduler and `executors` executors, each with `vcores` task
    /// slots, all built from `state` (which registers cleanroom's functions).
    pub async fn start(state: &SessionState, executors: usize, vcores: usize) -> anyhow::Result<Self> {
        let logical = state.config().ballista_logical_extension_codec();
        let physical = state.config().ballista_physical_extension_codec();
        let codec = BallistaCodec::new(logical, physical);
        let session_config = state.config().clone();
        let builder_state = state.clone();
        let session_builder = Arc::new(move |_: SessionConfig| Ok(builder_state.clone()));
        let config_producer = Arc::new(move || session_config.clone());

        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot bind the internal scheduler port on 127.0.0.1")?;
        let scheduler_addr = listener.local_addr()?;
        let endpoint = scheduler_addr.to_string();
        let cluster = BallistaCluster::new_memory(endpoint.clone(), session_builder, config_producer.clone());
        let metrics = default_metrics_collector().map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut scheduler: SchedulerServer<LogicalPlanNode, PhysicalPlanNode> = SchedulerServer::new(
            endpoint,
            cluster,
            codec,
            Arc::new(SchedulerConfig::default().with_scheduler_policy(TaskSchedulingPolicy::PullStaged)),
            metrics,
        );
        scheduler.init().await.map_err(|e| anyhow::anyhow!("cannot start the scheduler: {e}"))?;
        let max_message = config_producer().ballista_grpc_client_max_message_size();
        let service = SchedulerGrpcServer::new(scheduler.clone())
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
        tokio::spawn(
            create_grpc_server(&GrpcServerConfig::default())
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        for _ in 0..executors {
            cleanroom_executor::start_in_process(scheduler_addr, vcores, state).await?;
        }
        Ok(EmbeddedCluster { scheduler_addr, scheduler, executors })
    }

    /// The URL a Ballista client session uses to reach the scheduler.
    pub fn scheduler_url(&self) -> String {
        format!("df://{}", self.scheduler_addr)
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
