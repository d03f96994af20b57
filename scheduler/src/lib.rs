//! The cleanroom scheduler process: the collaboration manifest, the catalog
//! built from it, the Flight SQL gateway parties talk to, and the embedded
//! Ballista cluster that executes checked plans.

pub mod catalog;
pub mod cluster;
pub mod executor_process;
pub mod gateway;
pub mod ingest;
pub mod manifest;
pub mod metrics;
pub mod retention;
pub mod serve;
pub mod storage;
pub mod stream_end;
pub mod system_tables;
