//! End-to-end behaviour of `cleanroom serve --engine ballista`, driven by
//! arrow-flight's Flight SQL client exactly as an analyst's tool would: a
//! real server process with its embedded Ballista cluster, over real AdBench
//! Parquet files. The same tests run on the in-process engine in
//! `gateway_in_process.rs`.

/// The engine every server of this test binary runs queries on.
const ENGINE: &str = "ballista";

#[path = "support/server.rs"]
mod server;
use server::*;

include!("suites/gateway.rs");
