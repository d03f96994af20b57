//! The serving side of cleanroom: the Flight SQL gateway parties talk to
//! (queries, uploads, metadata, system tables), operator metrics, and the
//! Ballista cluster (embedded scheduler and executors, or a remote
//! scheduler) that runs checked plans. The manifest, the data and the ledger
//! it serves come from `cleanroom-manifest`, `cleanroom-storage` and
//! `cleanroom-ledger`.

pub mod cluster;
pub mod engine;
pub mod flight;
pub mod gateway;
pub mod ingest;
pub mod metrics;
pub mod pipeline;
pub mod ranking;
pub mod serve;
pub mod stream_end;
pub mod system_tables;
