//! The AdBench workload as plain SQL: the queries whose exact answers `cleanroom generate`
//! records in `truth.json`, and the table registration they expect.
//!
//! `queries.sql` is the single source of truth; this module only splits it into named
//! queries so the generator, the benchmark runner and tests all run the same text.

use std::path::Path;

use datafusion::error::{DataFusionError, Result};
use datafusion::prelude::{ParquetReadOptions, SessionContext};

/// The whole workload file, embedded so the binary needs no checkout to run it.
pub const ADBENCH_SQL: &str = include_str!("../queries.sql");

/// The same questions as an analyst asks them of cleanroom, in DP SQL.
pub const ADBENCH_DP_SQL: &str = include_str!("../dp-queries.sql");

/// The tables the workload reads, each stored as Parquet parts under `DIR/data/<table>/`.
pub const ADBENCH_TABLES: [&str; 2] = ["impressions", "conversions"];

const NAME_MARKER: &str = "-- name:";

/// (name, sql) for each query, in file order. A query starts at a line "-- name: <id>".
///
/// The returned SQL drops the descriptive comment lines right after the name line and the
/// trailing `;`, so it can be handed as-is to engines that accept a single statement.
pub fn adbench_queries() -> Vec<(String, String)> {
    named_queries(ADBENCH_SQL)
}

/// (name, sql) for each DP query of `dp-queries.sql`, named as in `queries.sql`.
pub fn adbench_dp_queries() -> Vec<(String, String)> {
    named_queries(ADBENCH_DP_SQL)
}

fn named_queries(text: &str) -> Vec<(String, String)> {
    let mut queries: Vec<(String, Vec<&str>)> = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.trim_start().strip_prefix(NAME_MARKER) {
            queries.push((name.trim().to_string(), Vec::new()));
        } else if let Some((_, body)) = queries.last_mut() {
            let trimmed = line.trim_start();
            let is_preamble = body.is_empty() && (trimmed.is_empty() || trimmed.starts_with("--"));
            if !is_preamble {
                body.push(line);
            }
        }
    }
    queries
        .into_iter()
        .map(|(name, body)| {
            let sql = body.join("\n");
            let sql = sql.trim_end();
            let sql = sql.strip_suffix(';').unwrap_or(sql).trim_end();
            (name, sql.to_string())
        })
        .collect()
}

/// Registers `impressions` and `conversions` as Parquet listing tables over DIR/data/<table>/ on ctx.
pub async fn register_adbench_tables(ctx: &SessionContext, dir: &Path) -> Result<()> {
    for table in ADBENCH_TABLES {
        let table_dir = dir.join("data").join(table);
        let table_dir = table_dir.to_str().ok_or_else(|| {
            DataFusionError::Plan(format!("path is not valid UTF-8: {}", table_dir.display()))
        })?;
        // The trailing slash makes the listing table treat the location as a directory of
        // parts rather than a single file.
        let location = format!("{}/", table_dir.trim_end_matches('/'));
        ctx.register_parquet(table, &location, ParquetReadOptions::default())
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_the_workload_into_named_queries() {
        let queries = adbench_queries();
        let names: Vec<&str> = queries.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "Q1_match_rate",
                "Q2_affiliate_ltv",
                "Q3_incrementality",
                "Q4_reach_frequency",
                "Q5_last_touch"
            ]
        );
        for (name, sql) in &queries {
            assert!(
                sql.starts_with("SELECT") || sql.starts_with("WITH"),
                "{name}: {sql}"
            );
            assert!(!sql.ends_with(';'), "{name}");
            assert!(!sql.contains(NAME_MARKER), "{name}");
        }
    }
}
