//! `cleanroom executor`: a Ballista executor process for cluster mode. It
//! pulls tasks from the scheduler inside `cleanroom scheduler`, runs them with
//! cleanroom's functions and codecs, reads datasets from the object stores
//! the manifest names, and keeps shuffle files in its work directory.
//!
//! Its Flight port serves shuffle partitions to anyone who can reach it
//! (Ballista's design), so it binds the internal address it is given and
//! must be reachable only by the scheduler and other executors.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use ballista_core::config::TaskSchedulingPolicy;
use ballista_core::registry::BallistaFunctionRegistry;
use ballista_executor::executor_process::{start_executor_process, ExecutorProcessConfig};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use object_store::ObjectStore;

use cleanroom_manifest::{Location, Manifest};
use cleanroom_storage::storage::DatasetStore;

#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// The scheduler's internal address, `host:port`.
    pub scheduler: String,
    /// Address the executor's Flight (shuffle) service binds.
    pub bind: IpAddr,
    /// The Flight port; the port after it is the executor's gRPC port.
    pub port: u16,
    /// The host name or address other executors and the scheduler use to
    /// reach this one [default: the bind address].
    pub external_host: Option<String>,
    /// Concurrent tasks.
    pub slots: usize,
    /// Shuffle and spill files [default: a temporary directory].
    pub work_dir: Option<PathBuf>,
    /// Memory for query execution in bytes, shared by the slots; operators
    /// spill to the work directory beyond it [default: 70 % of the host's or
    /// container's memory].
    pub memory_limit: Option<u64>,
    /// The collaboration manifest, for its `s3://` locations and `[s3]`
    /// settings (credentials may also come from the AWS environment
    /// variables). Without it, executors read local datasets only.
    pub manifest: Option<PathBuf>,
    /// Seconds between heartbeats to the scheduler.
    pub heartbeat_interval: u64,
}

/// Run the executor until SIGTERM or Ctrl-C.
pub async fn run(options: &ExecutorOptions) -> anyhow::Result<()> {
    let (host, port) = options
        .scheduler
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_start_matches('[').trim_end_matches(']').to_string(), p.parse::<u16>().ok()?)))
        .with_context(|| format!("--scheduler must be host:port, got `{}`", options.scheduler))?;
    if let Some(dir) = &options.work_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the work directory {}", dir.display()))?;
    }
    let stores = match &options.manifest {
        Some(path) => object_stores(path)?,
        None => Vec::new(),
    };
    // The same session (functions, Ballista settings) the scheduler plans with.
    let state = crate::session_state(options.slots.max(1));
    let config = state.config().clone();
    let work_dir = options.work_dir.clone();
    let runtime_producer = Arc::new(move |_: &datafusion::prelude::SessionConfig| {
        let mut builder = RuntimeEnvBuilder::new();
        if let Some(dir) = &work_dir {
            builder = builder.with_temp_file_path(dir);
        }
        let runtime = builder.build()?;
        for (url, store) in &stores {
            runtime.register_object_store(url, store.clone());
        }
        Ok(Arc::new(runtime))
    });
    // Other executors and the gateway dial the advertised host: a wildcard is no address.
    let external_host = match (&options.external_host, options.bind.is_unspecified()) {
        (Some(host), _) => host.clone(),
        (None, false) => options.bind.to_string(),
        (None, true) => anyhow::bail!("--bind {} listens everywhere: give --external-host, the address the scheduler and other executors reach this one at", options.bind),
    };
    // Ballista joins host and port with a colon: an IPv6 address needs brackets.
    let bracket = |host: String| if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host };
    let defaults = ExecutorProcessConfig::default();
    let config = ExecutorProcessConfig {
        bind_host: bracket(options.bind.to_string()),
        external_host: Some(bracket(external_host)),
        port: options.port,
        grpc_port: options.port.checked_add(1).context("--port must leave room for the gRPC port after it")?,
        scheduler_host: host,
        scheduler_port: port,
        // Keep trying while the scheduler starts (and restarts).
        scheduler_connect_timeout_seconds: 120,
        vcores: options.slots.max(1),
        task_scheduling_policy: TaskSchedulingPolicy::PullStaged,
        work_dir: options.work_dir.as_ref().map(|d| d.display().to_string()),
        memory_pool_size: options.memory_limit,
        executor_heartbeat_interval_seconds: options.heartbeat_interval.max(1),
        // Shuffle files of finished jobs go after an hour, checked every 5 minutes.
        job_data_ttl_seconds: 3600,
        job_data_clean_up_interval_seconds: 300,
        print_thread_info: false,
        override_function_registry: Some(Arc::new(BallistaFunctionRegistry::from(&state))),
        override_config_producer: Some(Arc::new(move || config.clone())),
        override_runtime_producer: Some(runtime_producer),
        ..defaults
    };
    start_executor_process(Arc::new(config)).await.map_err(|e| anyhow::anyhow!("the executor stopped: {e}"))
}

/// The stores of the manifest's `s3://` datasets, by bucket URL. Only the
/// storage parts of the manifest are read: executors need no party's
/// password hash (nor the files holding them).
fn object_stores(path: &std::path::Path) -> anyhow::Result<Vec<(url::Url, Arc<dyn ObjectStore>)>> {
    let (s3, locations) = Manifest::load_storage(path)?;
    let mut stores = Vec::new();
    for location in locations {
        if let Location::S3 { bucket, prefix } = location {
            let store = DatasetStore::s3(&bucket, &prefix, s3.as_ref())?;
            let mut base = store.url.clone();
            base.set_path("/");
            stores.push((base, store.store));
        }
    }
    Ok(stores)
}
