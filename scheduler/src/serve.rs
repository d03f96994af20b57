//! `cleanroom serve`: the standalone clean room in one process — the Flight
//! SQL gateway on the listen address, and an embedded Ballista scheduler and
//! executors on loopback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use arrow_flight::flight_service_server::FlightServiceServer;
use cleanroom_dp::ledger::{EtcdLedger, Ledger, RedbLedger};
use sha2::{Digest, Sha256};
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
    /// How often expired rows are looked for (also once at start).
    pub retention_interval: std::time::Duration,
    /// The ledger on etcd instead: endpoints, and the key prefix.
    pub etcd: Option<String>,
    pub etcd_prefix: String,
}

/// Where the ledger and audit log are: the embedded store in a directory, or etcd.
#[derive(Debug, Clone)]
pub enum LedgerLocation {
    StateDir(PathBuf),
    Etcd { endpoints: String, prefix: String },
}

impl LedgerLocation {
    /// Open the ledger (blocking: etcd is asked until it answers or a deadline passes).
    pub fn open(&self) -> anyhow::Result<Arc<dyn Ledger>> {
        Ok(match self {
            LedgerLocation::StateDir(dir) => Arc::new(RedbLedger::open(dir)?),
            LedgerLocation::Etcd { endpoints, prefix } => Arc::new(EtcdLedger::connect(&[endpoints.clone()], prefix)?),
        })
    }
}

/// The `--etcd-prefix` default.
pub const DEFAULT_ETCD_PREFIX: &str = "/cleanroom/";

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
    let location = match (&options.etcd, &options.state_dir) {
        (Some(_), Some(_)) => anyhow::bail!("give either --etcd or --state-dir, not both: the ledger lives in one place"),
        (Some(endpoints), None) => LedgerLocation::Etcd { endpoints: endpoints.clone(), prefix: options.etcd_prefix.clone() },
        (None, Some(dir)) => LedgerLocation::StateDir(dir.clone()),
        (None, None) => LedgerLocation::StateDir(manifest.base_dir.join("state")),
    };
    let ledger = {
        let location = location.clone();
        tokio::task::spawn_blocking(move || location.open()).await.context("opening the ledger")??
    };
    // The manifest in force is on the audit log: a changed manifest is recorded at start.
    let manifest_bytes = std::fs::read(&options.manifest).with_context(|| format!("cannot read {}", options.manifest.display()))?;
    let sha = hex::encode(Sha256::digest(&manifest_bytes));
    let (l, path) = (ledger.clone(), options.manifest.display().to_string());
    let changed = tokio::task::spawn_blocking(move || l.record_manifest(&sha, serde_json::json!({ "path": path })))
        .await
        .context("recording the manifest")??;
    if changed {
        tracing::info!(manifest = %options.manifest.display(), "manifest recorded in the audit log");
    }
    let partitions = (options.executors * options.executor_slots).max(1);
    let state = cleanroom_executor::session_state(partitions);
    let catalog = Arc::new(Catalog::open(manifest.clone(), &state).await?);
    // Expired rows go before the first query, then on a schedule.
    crate::retention::enforce_all(&catalog, &ledger).await;
    if manifest.datasets.iter().any(|d| d.retention.is_some()) {
        let (catalog, ledger, every) = (catalog.clone(), ledger.clone(), options.retention_interval);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                crate::retention::enforce_all(&catalog, &ledger).await;
            }
        });
    }
    let cluster = EmbeddedCluster::start(&state, options.executors.max(1), options.executor_slots.max(1)).await?;
    let gateway = FlightSqlGateway::new(catalog, cluster.clone(), ledger.clone(), partitions);

    let listener = TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("cannot listen on {}", options.listen))?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(crate::stream_end::layer())
            .add_service(FlightServiceServer::new(gateway))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown),
    );
    tracing::info!(
        %addr,
        scheduler = %cluster.scheduler_addr,
        executors = cluster.executors,
        ledger = %ledger.describe(),
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
