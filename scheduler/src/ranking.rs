//! Step 2 of the DP rewrite, ranking each person's groups, without a window
//! operator.
//!
//! The rewritten plan keeps each person's `max_groups_contributed` groups
//! with the smallest keyed hash: `ROW_NUMBER() OVER (PARTITION BY __uid
//! ORDER BY __key)` and a filter on it. DataFusion runs that window as a
//! `BoundedWindowAggExec` whose bookkeeping per window partition (here one per
//! person) costs more than the rest of the step. [`RankPerPerson`] replaces
//! exactly that window, once its input is sorted by (`__uid`, `__key`) within
//! each partition and hash-partitioned by `__uid`, with [`RankPerPersonExec`]:
//! a streaming pass that numbers the rows of each run of equal `__uid`.
//!
//! Why it is private: it computes the same column as the window it replaces
//! (row numbers restarting at each person, in the order of the sorted input
//! the window would read), so the contribution bound the filter above
//! enforces is the rewrite's; only the cost changes.

use std::fmt;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, UInt64Array};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::ScalarValue;
use datafusion::config::ConfigOptions;
use datafusion::error::Result;
use datafusion::execution::TaskContext;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_expr::window::StandardWindowExpr;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::execution_plan::PlanProperties;
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::windows::{BoundedWindowAggExec, WindowUDFExpr};
use datafusion::physical_plan::distribution_requirements::InputDistributionRequirements;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, InputOrderMode, SendableRecordBatchStream,
};
use datafusion::physical_expr::OrderingRequirements;
use futures::StreamExt;

use cleanroom_dp::rewrite::{KEY, RANK, UNIT};

/// Physical optimizer rule: the rewrite's ranking window becomes a
/// [`RankPerPersonExec`]. Runs after DataFusion's rules, when the window's
/// input is already sorted and partitioned as the window requires.
#[derive(Debug, Default)]
pub struct RankPerPerson;

impl PhysicalOptimizerRule for RankPerPerson {
    fn optimize(&self, plan: Arc<dyn ExecutionPlan>, _config: &ConfigOptions) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(window) = node.downcast_ref::<BoundedWindowAggExec>() else {
                return Ok(Transformed::no(node));
            };
            match ranking_input(window) {
                Some(unit) => Ok(Transformed::yes(Arc::new(RankPerPersonExec::new(window, unit)) as Arc<dyn ExecutionPlan>)),
                None => Ok(Transformed::no(node)),
            }
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "cleanroom_rank_per_person"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// The index of `__uid` in the window's input, when `window` is exactly the
/// rewrite's ranking: one `ROW_NUMBER()` named `__rank`, partitioned by the
/// column `__uid`, ordered by the column `__key` ascending, on input sorted
/// that way.
fn ranking_input(window: &BoundedWindowAggExec) -> Option<usize> {
    let [expr] = window.window_expr() else { return None };
    if expr.name() != RANK || window.input_order_mode != InputOrderMode::Sorted {
        return None;
    }
    let standard = expr.as_any().downcast_ref::<StandardWindowExpr>()?;
    let function = standard.get_standard_func_expr().as_any().downcast_ref::<WindowUDFExpr>()?;
    if function.fun().name() != "row_number" {
        return None;
    }
    let column = |e: &Arc<dyn PhysicalExpr>| e.downcast_ref::<Column>().map(|c| (c.name().to_string(), c.index()));
    let [partition] = expr.partition_by() else { return None };
    let (name, unit) = column(partition)?;
    let [order] = expr.order_by() else { return None };
    let (key, _) = column(&order.expr)?;
    (name == UNIT && key == KEY && !order.options.descending).then_some(unit)
}

/// Numbers the rows of each run of equal `__uid` values (1, 2, …) and
/// appends the numbers as `__rank`, batch by batch, carrying the last run
/// across batches. Its input must be hash-partitioned by `__uid` and sorted by
/// (`__uid`, `__key`) in each partition, as the window it replaces required.
#[derive(Debug)]
pub struct RankPerPersonExec {
    input: Arc<dyn ExecutionPlan>,
    unit: usize,
    properties: Arc<PlanProperties>,
    distribution: InputDistributionRequirements,
    ordering: Vec<Option<OrderingRequirements>>,
    metrics: ExecutionPlanMetricsSet,
}

impl RankPerPersonExec {
    fn new(window: &BoundedWindowAggExec, unit: usize) -> Self {
        RankPerPersonExec {
            input: window.input().clone(),
            unit,
            properties: window.properties().clone(),
            distribution: window.input_distribution_requirements(),
            ordering: window.required_input_ordering(),
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }
}

impl DisplayAs for RankPerPersonExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "RankPerPersonExec: {RANK} = row number per {UNIT} in {KEY} order")
    }
}

impl ExecutionPlan for RankPerPersonExec {
    fn name(&self) -> &str {
        "RankPerPersonExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn input_distribution_requirements(&self) -> InputDistributionRequirements {
        self.distribution.clone()
    }

    fn required_input_ordering(&self) -> Vec<Option<OrderingRequirements>> {
        self.ordering.clone()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    #[allow(deprecated)]
    fn with_new_children(self: Arc<Self>, mut children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        let input = children.pop().filter(|_| children.is_empty()).ok_or_else(|| {
            datafusion::error::DataFusionError::Internal("RankPerPersonExec has one input".to_string())
        })?;
        Ok(Arc::new(RankPerPersonExec {
            input,
            unit: self.unit,
            properties: self.properties.clone(),
            distribution: self.distribution.clone(),
            ordering: self.ordering.clone(),
            metrics: ExecutionPlanMetricsSet::new(),
        }))
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let schema = self.schema();
        let unit = self.unit;
        let metrics = BaselineMetrics::new(&self.metrics, partition);
        let mut last: Option<(ScalarValue, u64)> = None;
        let output = schema.clone();
        let stream = input.map(move |batch| {
            let batch = batch?;
            let _timer = metrics.elapsed_compute().timer();
            let ranks = rank(batch.column(unit), &mut last)?;
            let mut columns = batch.columns().to_vec();
            columns.push(Arc::new(ranks) as ArrayRef);
            let out = RecordBatch::try_new(output.clone(), columns)?;
            metrics.record_output(out.num_rows());
            Ok(out)
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}

/// Row numbers restarting at each new value of `units` (sorted, so each
/// person's rows are one run); `last` is the previous batch's last person and
/// how many rows of theirs came before.
fn rank(units: &ArrayRef, last: &mut Option<(ScalarValue, u64)>) -> Result<UInt64Array> {
    let mut ranks = Vec::with_capacity(units.len());
    if units.is_empty() {
        return Ok(UInt64Array::from(ranks));
    }
    let runs = arrow::compute::partition(std::slice::from_ref(units))?.ranges();
    let count = runs.len();
    for (i, run) in runs.into_iter().enumerate() {
        let before = match last {
            Some((person, seen)) if i == 0 && *person == ScalarValue::try_from_array(units, run.start)? => *seen,
            _ => 0,
        };
        ranks.extend((1..=(run.end - run.start) as u64).map(|r| before + r));
        if i + 1 == count {
            *last = Some((ScalarValue::try_from_array(units, run.start)?, before + (run.end - run.start) as u64));
        }
    }
    Ok(UInt64Array::from(ranks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::StringArray;

    #[test]
    fn numbers_each_persons_rows_across_batches() {
        let mut last = None;
        let a: ArrayRef = Arc::new(StringArray::from(vec!["p1", "p1", "p2"]));
        let b: ArrayRef = Arc::new(StringArray::from(vec!["p2", "p2", "p3", "p4", "p4"]));
        let c: ArrayRef = Arc::new(StringArray::from(vec!["p5"]));
        assert_eq!(rank(&a, &mut last).unwrap().values().to_vec(), vec![1, 2, 1]);
        assert_eq!(rank(&b, &mut last).unwrap().values().to_vec(), vec![2, 3, 1, 1, 2]);
        assert_eq!(rank(&c, &mut last).unwrap().values().to_vec(), vec![1]);
    }
}
