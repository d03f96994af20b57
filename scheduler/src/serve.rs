//! `cleanroom serve`: the standalone clean room in one process — the Flight
//! SQL gateway on the listen address, and an embedded Ballista scheduler and
//! executors on loopback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use arrow_flight::flight_service_server::FlightServiceServer;
use cleanroom_dp::ledger::RedbLedger;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::catalog::Catalog;
use crate::cluster::EmbeddedCluster;
use crate::gateway::FlightSqlGateway;
use crate::manifest::Manifest;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub manifest: PathBuf,
    pub listen: SocketAddr,
    pub executors: usize,
    /// Task slots per executor.
    pub executor_slots: usize,
    /// Where the budget ledger lives; defaults to `state/` beside the manifest.
    pub state_dir: Option<PathBuf>,
}

/// A started server.
pub struct Running {
    pub addr: SocketAddr,
    pub cluster: EmbeddedCluster,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Running {
    /// Wait until the server stops (after `shutdown` resolves).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.server.await.context("server task failed")??;
        Ok(())
    }
}

/// Start the clean room; it stops when `shutdown` resolves.
pub async fn start(
    options: &ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Running> {
    let manifest = Arc::new(Manifest::load(&options.manifest)?);
    let state_dir = match &options.state_dir {
        Some(dir) => dir.clone(),
        None => manifest.base_dir.join("state"),
    };
    let ledger = Arc::new(RedbLedger::open(&state_dir)?);
    let partitions = (options.executors * options.executor_slots).max(1);
    let state = cleanroom_executor::session_state(partitions);
    let catalog = Arc::new(Catalog::open(manifest.clone(), &state).await?);
    let cluster = EmbeddedCluster::start(&state, options.executors.max(1), options.executor_slots.max(1)).await?;
    let gateway = FlightSqlGateway::new(catalog, cluster.clone(), ledger, partitions);

    let listener = TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("cannot listen on {}", options.listen))?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(FlightServiceServer::new(gateway))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown),
    );
    tracing::info!(
        %addr,
        scheduler = %cluster.scheduler_addr,
        executors = cluster.executors,
        state_dir = %state_dir.display(),
        "cleanroom started"
    );
    Ok(Running { addr, cluster, server })
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
