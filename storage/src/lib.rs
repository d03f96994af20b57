//! Where a collaboration's data lives and which of it queries read: every
//! dataset as a sequence of committed data versions ([`storage`]: local
//! directories or S3, uploads all or nothing), the tables each party may
//! query at their current versions ([`catalog`]), the retention passes that
//! drop expired rows ([`retention`]), and the checks and commit of an upload
//! ([`upload`]).

pub mod catalog;
pub mod retention;
pub mod storage;
pub mod upload;

/// Catalog and schema under which every party sees its datasets.
pub const CATALOG: &str = "cleanroom";
pub const SCHEMA: &str = "public";
