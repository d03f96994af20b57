//! The join algorithm of each join on a Ballista cluster, chosen per join.
//!
//! DataFusion's hash join cannot spill, and on a cluster each task holds its
//! partition's build side in memory; a sort-merge join spills but sorts both
//! sides, which costs orders of magnitude more where one side is small.
//! Ballista's sessions therefore plan with hash joins preferred, let
//! DataFusion's join selection broadcast a build side that statistics show
//! to be small (`CollectLeft`, under Ballista's broadcast thresholds), and
//! [`SpillableJoins`] then turns every remaining partitioned hash join (both
//! sides large or of unknown size) into a sort-merge join, which spills.
//! The in-process engine keeps its hash joins: it reruns a query that runs
//! out of memory with sort-merge joins throughout.

use std::sync::Arc;

use datafusion::arrow::compute::SortOptions;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode};
use datafusion::config::ConfigOptions;
use datafusion::error::Result;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode, SortMergeJoinExec};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::ExecutionPlan;

/// The rule's name, to find it among a session's physical optimizer rules.
pub const SPILLABLE_JOINS: &str = "cleanroom_spillable_joins";

/// Partitioned hash joins become sort-merge joins; broadcast (`CollectLeft`)
/// hash joins of a small build side stay. Runs right after DataFusion's join
/// selection, so the sorts and shuffles a sort-merge join needs are added by
/// the requirement rules after it. Only the algorithm changes: the same rows
/// come out.
#[derive(Debug, Default)]
pub struct SpillableJoins;

impl PhysicalOptimizerRule for SpillableJoins {
    fn optimize(&self, plan: Arc<dyn ExecutionPlan>, _config: &ConfigOptions) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(join) = node.downcast_ref::<HashJoinExec>() else {
                return Ok(Transformed::no(node));
            };
            // Null-aware anti joins (`NOT IN`) need one build side: only the
            // hash join implements them.
            if join.mode != PartitionMode::Partitioned || join.null_aware {
                return Ok(Transformed::no(node));
            }
            let merge: Arc<dyn ExecutionPlan> = Arc::new(SortMergeJoinExec::try_new(
                Arc::clone(join.left()),
                Arc::clone(join.right()),
                join.on().to_vec(),
                join.filter().cloned(),
                *join.join_type(),
                vec![SortOptions::default(); join.on().len()],
                join.null_equality(),
            )?);
            let Some(projection) = &join.projection else {
                return Ok(Transformed::yes(merge));
            };
            let schema = merge.schema();
            let columns = projection
                .iter()
                .map(|&i| (Arc::new(Column::new(schema.field(i).name(), i)) as _, schema.field(i).name().to_string()))
                .collect::<Vec<_>>();
            Ok(Transformed::yes(Arc::new(ProjectionExec::try_new(columns, merge)?)))
        })
        .data()
    }

    fn name(&self) -> &str {
        SPILLABLE_JOINS
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// `rules` with [`SpillableJoins`] right after DataFusion's join selection
/// (at the end if there is none).
pub fn with_spillable_joins(mut rules: Vec<Arc<dyn PhysicalOptimizerRule + Send + Sync>>) -> Vec<Arc<dyn PhysicalOptimizerRule + Send + Sync>> {
    let at = rules.iter().position(|r| r.name() == "join_selection").map_or(rules.len(), |i| i + 1);
    rules.insert(at, Arc::new(SpillableJoins));
    rules
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Int64Array, RecordBatch};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::MemTable;
    use datafusion::physical_plan::{collect, displayable};
    use datafusion::prelude::SessionContext;

    use super::*;

    const QUERY: &str = "SELECT a.k, a.v, b.v AS w FROM a JOIN b ON a.k = b.k ORDER BY a.k, a.v, w";

    /// A session of the cluster (`crate::session_state`) with tables a and b
    /// of `rows` rows each; `broadcast_limit` as both broadcast thresholds.
    async fn cluster_session(rows: i64, broadcast_limit: u64) -> SessionContext {
        let mut state = crate::session_state(4);
        let optimizer = &mut state.config_mut().options_mut().optimizer;
        optimizer.hash_join_single_partition_threshold = broadcast_limit as usize;
        optimizer.hash_join_single_partition_threshold_rows = broadcast_limit as usize;
        let ctx = SessionContext::new_with_state(state);
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false), Field::new("v", DataType::Int64, false)]));
        for (name, step) in [("a", 3), ("b", 5)] {
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(Int64Array::from_iter_values((0..rows).map(|i| i % 97))), Arc::new(Int64Array::from_iter_values((0..rows).map(|i| i * step)))],
            )
            .unwrap();
            ctx.register_table(name, Arc::new(MemTable::try_new(schema.clone(), vec![vec![batch]]).unwrap())).unwrap();
        }
        ctx
    }

    async fn plan_and_rows(ctx: &SessionContext) -> (String, Vec<RecordBatch>) {
        let plan = ctx.sql(QUERY).await.unwrap().create_physical_plan().await.unwrap();
        let shown = displayable(plan.as_ref()).indent(true).to_string();
        (shown, collect(plan, ctx.task_ctx()).await.unwrap())
    }

    #[tokio::test]
    async fn large_joins_sort_and_merge_small_build_sides_are_broadcast() {
        // Both sides over the broadcast thresholds: a sort-merge join.
        let ctx = cluster_session(2_000, 10).await;
        let (large, merged) = plan_and_rows(&ctx).await;
        assert!(large.contains("SortMergeJoin") && !large.contains("HashJoinExec"), "{large}");
        // Under them: a broadcast hash join, and the same rows.
        let ctx = cluster_session(2_000, u64::MAX / 2).await;
        let (small, hashed) = plan_and_rows(&ctx).await;
        assert!(small.contains("HashJoinExec: mode=CollectLeft") && !small.contains("SortMergeJoin"), "{small}");
        let count: usize = merged.iter().map(|b| b.num_rows()).sum();
        assert!(count > 2_000, "{count} rows");
        assert_eq!(merged.iter().map(|b| b.num_rows()).sum::<usize>(), hashed.iter().map(|b| b.num_rows()).sum::<usize>());
        assert_eq!(datafusion::arrow::compute::concat_batches(&merged[0].schema(), &merged).unwrap(), datafusion::arrow::compute::concat_batches(&hashed[0].schema(), &hashed).unwrap());
    }
}
