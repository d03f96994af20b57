//! End-to-end behaviour of `cleanroom serve` on its default engine
//! (in-process DataFusion), through the same tests as `gateway.rs` runs on
//! Ballista.

/// The engine every server of this test binary runs queries on.
const ENGINE: &str = "in-process";

#[path = "support/server.rs"]
mod server;
use server::*;

include!("suites/gateway.rs");
