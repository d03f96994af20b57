//! sqllogictest files of accepted and refused DP queries, `tests/slt/*.slt`,
//! run against the planner on the test collaboration of `fixtures`.
//!
//! An accepted query is recorded with its `EXPLAIN`: the privacy cost, the
//! rewritten (contribution-bounded) plan and the post-processing plan, so a
//! change to any of them shows up as a diff. The keyed-hash salt of the
//! rewrite is fresh per query and is shown as `<salt>`. A refused query is
//! recorded with its rule and message (`statement error`).
//!
//! `SET cleanroom.<option> = <value>` sets a session option, as over Flight
//! SQL. To regenerate the expected output after a deliberate change, run
//! `CLEANROOM_SLT_COMPLETE=1 cargo test -p cleanroom-dp --test sqllogic`
//! and review the diff.

use std::path::PathBuf;

use cleanroom_dp::options::QueryOptions;
use cleanroom_dp::release::{explain, without_data};
use cleanroom_dp::rewrite::PlannedQuery;
use cleanroom_dp::DpError;
use datafusion::prelude::SessionContext;
use sqllogictest::{
    default_column_validator, default_normalizer, default_validator, AsyncDB, DBOutput, DefaultColumnType, Runner,
};

#[allow(dead_code)]
mod fixtures;

struct Planner {
    ctx: SessionContext,
    session: QueryOptions,
}

impl Planner {
    fn rows(released: cleanroom_dp::release::Released) -> DBOutput<DefaultColumnType> {
        let mut rows = Vec::new();
        for batch in released.batches() {
            let columns: Vec<_> = batch
                .columns()
                .iter()
                .map(|c| arrow::compute::cast(c, &arrow::datatypes::DataType::Utf8).expect("text"))
                .collect();
            for row in 0..batch.num_rows() {
                let cells: Vec<String> = columns
                    .iter()
                    .map(|c| {
                        let c = c.as_any().downcast_ref::<arrow::array::StringArray>().expect("utf8");
                        if arrow::array::Array::is_null(c, row) { "NULL".to_string() } else { c.value(row).to_string() }
                    })
                    .collect();
                // Multi-line texts (plans) become one row per line.
                let lines: Vec<Vec<String>> = cells.iter().map(|c| c.lines().map(normalise).collect()).collect();
                let height = lines.iter().map(Vec::len).max().unwrap_or(0).max(1);
                for i in 0..height {
                    rows.push(lines.iter().map(|l| l.get(i).cloned().unwrap_or_else(|| l.first().cloned().unwrap_or_default())).collect());
                }
            }
        }
        let width = rows.first().map(Vec::len).unwrap_or(0);
        DBOutput::Rows { types: vec![DefaultColumnType::Text; width], rows }
    }
}

/// Replace the fresh salt of the contribution key with `<salt>`.
fn normalise(line: &str) -> String {
    let salt = regex::Regex::new(r"cleanroom_contribution_key\(Int64\(-?[0-9]+\)").expect("regex");
    salt.replace_all(line.trim_end(), "cleanroom_contribution_key(Int64(<salt>)").into_owned()
}

#[async_trait::async_trait]
impl AsyncDB for Planner {
    type Error = DpError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, DpError> {
        let trimmed = sql.trim().trim_end_matches(';');
        if let Some(rest) = trimmed.strip_prefix("SET cleanroom.") {
            let (name, value) = rest.split_once('=').ok_or_else(|| DpError::refused(cleanroom_dp::Rule::Statement, "SET needs a value"))?;
            self.session.set(name, value)?;
            return Ok(DBOutput::StatementComplete(0));
        }
        match cleanroom_dp::plan_sql(&self.ctx.state(), sql, &fixtures::policy(), &self.session).await? {
            PlannedQuery::Explain(e) => Ok(Self::rows(explain(&e)?)),
            PlannedQuery::NoData(q) => Ok(Self::rows(without_data(&q).await?)),
            // Accepted; its answer is noisy, so only its EXPLAIN is recorded.
            PlannedQuery::Dp(_) => Ok(DBOutput::StatementComplete(0)),
        }
    }

    async fn shutdown(&mut self) {}
}

#[tokio::test]
async fn sqllogictest_files() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/slt");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .slt files in {}", dir.display());
    let complete = std::env::var_os("CLEANROOM_SLT_COMPLETE").is_some();
    for file in files {
        let mut runner = Runner::new(|| async {
            Ok::<_, DpError>(Planner { ctx: fixtures::context(), session: QueryOptions::default() })
        });
        if complete {
            runner
                .update_test_file(&file, " ", default_validator, default_normalizer, default_column_validator)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        } else {
            runner.run_file_async(&file).await.unwrap_or_else(|e| panic!("{}: {}", file.display(), e.display(false)));
        }
    }
}
