//! The clean room's main process. `cleanroom serve`: the Flight SQL gateway
//! on the listen address, and an embedded Ballista scheduler and executors on
//! loopback. `cleanroom scheduler`: the same gateway and scheduler, with the
//! scheduler on an internal address for separate `cleanroom executor`
//! processes and no executors of its own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use arrow_flight::flight_service_server::FlightServiceServer;
use cleanroom_ledger::{EtcdLedger, Ledger, RedbLedger};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use cleanroom_storage::catalog::Catalog;
use crate::cluster::{ClusterOptions, EmbeddedCluster};
use crate::engine::{Engine, InProcess};
use crate::gateway::FlightSqlGateway;
use cleanroom_manifest::Manifest;

/// Where queries run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineChoice {
    /// DataFusion in the server's process, with a memory pool and spill
    /// directory: the least overhead per query on one machine.
    InProcess,
    /// A Ballista cluster: embedded executors for `serve`, executor
    /// processes joining the scheduler for `scheduler`.
    Ballista,
}

/// Queries the in-process engine runs at once unless told otherwise: enough
/// that a short query rarely waits behind long ones on a small machine,
/// few enough that each keeps a useful share of the memory.
pub const DEFAULT_QUERY_SLOTS: usize = 4;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub manifest: PathBuf,
    pub listen: SocketAddr,
    pub engine: EngineChoice,
    /// Query memory of the in-process engine (bytes) [default: 70 % of the
    /// host's or container's memory].
    pub memory_limit: Option<u64>,
    /// Spill files of the in-process engine [default: a temporary directory].
    pub spill_dir: Option<PathBuf>,
    /// Queries the in-process engine runs at once, each with an equal share
    /// of `memory_limit`.
    pub query_slots: usize,
    /// Executors inside this process (0 for `cleanroom scheduler`).
    pub executors: usize,
    /// Task slots per in-process executor.
    pub executor_slots: usize,
    /// The Ballista scheduler's address, for executors only.
    pub internal_bind: SocketAddr,
    /// Partitions a query's scans and shuffles are split into
    /// [default: executors × slots, or 8 without in-process executors].
    pub partitions: Option<usize>,
    /// See [`ClusterOptions::executor_timeout`].
    pub executor_timeout: std::time::Duration,
    /// Serve Flight SQL over TLS with this certificate chain and key (PEM).
    pub tls: Option<TlsFiles>,
    /// Prometheus metrics over HTTP on this (internal) address.
    pub metrics: Option<SocketAddr>,
    /// Where the budget ledger lives; defaults to `state/` beside the manifest.
    pub state_dir: Option<PathBuf>,
    /// How often expired rows are looked for (also once at start).
    pub retention_interval: std::time::Duration,
    /// The ledger on etcd instead: endpoints, and the key prefix.
    pub etcd: Option<String>,
    pub etcd_prefix: String,
}

/// The gateway's certificate chain and private key, PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ServeOptions {
    /// `cleanroom serve`'s defaults for `manifest`.
    pub fn standalone(manifest: PathBuf) -> ServeOptions {
        ServeOptions {
            manifest,
            listen: "127.0.0.1:50051".parse().expect("address"),
            engine: EngineChoice::InProcess,
            memory_limit: None,
            spill_dir: None,
            query_slots: DEFAULT_QUERY_SLOTS,
            executors: 2,
            executor_slots: 2,
            internal_bind: "127.0.0.1:0".parse().expect("address"),
            partitions: None,
            executor_timeout: std::time::Duration::from_secs(180),
            tls: None,
            metrics: None,
            state_dir: None,
            retention_interval: std::time::Duration::from_secs(3600),
            etcd: None,
            etcd_prefix: DEFAULT_ETCD_PREFIX.into(),
        }
    }
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
    /// The Ballista cluster, when queries run on one.
    pub cluster: Option<EmbeddedCluster>,
    /// Where queries run, in words.
    pub engine: String,
    /// Where Prometheus metrics are served, if asked for.
    pub metrics_addr: Option<SocketAddr>,
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
    let changed = tokio::task::spawn_blocking(move || l.record_manifest(&sha, &path))
        .await
        .context("recording the manifest")??;
    if changed {
        tracing::info!(manifest = %options.manifest.display(), "manifest recorded in the audit log");
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let partitions = options
        .partitions
        .unwrap_or(match options.engine {
            EngineChoice::InProcess => cores,
            EngineChoice::Ballista if options.executors == 0 => 8,
            EngineChoice::Ballista => options.executors * options.executor_slots,
        })
        .max(1);
    let in_process = match options.engine {
        EngineChoice::InProcess => {
            let limit = options.memory_limit.unwrap_or_else(cleanroom_executor::default_memory_limit);
            Some(InProcess::new(cleanroom_executor::in_process_runtime(limit, options.spill_dir.as_deref())?, options.query_slots))
        }
        EngineChoice::Ballista => None,
    };
    let state = match &in_process {
        // The catalog registers the datasets' object stores in the runtime
        // the engine runs every session on.
        Some(engine) => engine.session_state(cleanroom_executor::session_state(partitions)),
        None => cleanroom_executor::session_state(partitions),
    };
    let catalog = Arc::new(Catalog::open(manifest.clone(), &state).await?);
    // Expired rows, and files of replaced versions past their grace period,
    // go before the first query, then on a schedule.
    cleanroom_storage::retention::enforce_all(&catalog, &ledger).await;
    catalog.purge_superseded().await;
    {
        let (catalog, ledger, every) = (catalog.clone(), ledger.clone(), options.retention_interval);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                cleanroom_storage::retention::enforce_all(&catalog, &ledger).await;
                catalog.purge_superseded().await;
            }
        });
    }
    let (engine, cluster): (Arc<dyn Engine>, _) = match in_process {
        Some(engine) => (Arc::new(engine), None),
        None => {
            let cluster = EmbeddedCluster::start(
                &state,
                &ClusterOptions {
                    bind: options.internal_bind,
                    in_process_executors: options.executors,
                    slots: options.executor_slots.max(1),
                    executor_timeout: options.executor_timeout,
                },
            )
            .await?;
            (Arc::new(cluster.clone()), Some(cluster))
        }
    };
    let gateway = FlightSqlGateway::new(catalog, engine.clone(), ledger.clone(), partitions)?;
    let metrics_addr = match options.metrics {
        Some(addr) => Some(crate::metrics::serve(addr, gateway.metrics()).await?),
        None => None,
    };

    let listener = TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("cannot listen on {}", options.listen))?;
    let addr = listener.local_addr()?;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &options.tls {
        let read = |path: &PathBuf| std::fs::read(path).with_context(|| format!("cannot read {}", path.display()));
        let identity = tonic::transport::Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .context("the TLS certificate or key is not usable (both must be PEM)")?;
    }
    let server = tokio::spawn(
        builder
            .layer(crate::stream_end::layer())
            .add_service(FlightServiceServer::new(crate::flight::Door(gateway)))
            // Answers are small messages: without TCP_NODELAY each waits for
            // the client's delayed ACK (tens of milliseconds per call).
            .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown),
    );
    tracing::info!(
        %addr,
        tls = options.tls.is_some(),
        engine = %engine.describe(),
        partitions,
        metrics = ?metrics_addr,
        ledger = %ledger.describe(),
        "cleanroom started"
    );
    Ok(Running { addr, cluster, engine: engine.describe(), metrics_addr, server })
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
