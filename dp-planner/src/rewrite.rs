//! The DP aggregate: finding it, checking it and rewriting it.
//!
//! A DP query has the shape
//!
//! ```text
//! [post-processing: Projection | Filter (HAVING) | Sort | Limit | SubqueryAlias]*
//!   Aggregate  (the DP aggregate: the outermost one, not grouped by the privacy unit)
//!     any plan that [`crate::tracking`] can track: joins on the privacy unit,
//!     per-person aggregates and windows, CTEs, UNION ALL, filters …
//! ```
//!
//! Everything else is refused with the rule it breaks. The DP aggregate is
//! rewritten into a plan of exact, *contribution-bounded* aggregates:
//!
//! 1. per person and group, partial aggregates: rows counted, measures clamped
//!    to the manifest's bounds and summed; each partial clamped to what
//!    `max_contributions_per_group` rows can contribute;
//! 2. per person, only the `max_groups_contributed` groups with the smallest
//!    [`crate::udf::ContributionKey`] are kept;
//! 3. partials summed per group.
//!
//! After step 2 adding or removing one person changes each aggregate column
//! (as a vector over all groups) by at most its L1 sensitivity
//! `max_groups_contributed × per-group bound`; [`crate::release`] adds noise
//! calibrated to exactly that. The post-processing above the aggregate later
//! runs on the released (noisy) values only.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchemaRef, ScalarValue, TableReference};
use datafusion::datasource::{provider_as_source, MemTable};
use datafusion::functions_aggregate::expr_fn::{count, max, sum};
use datafusion::functions_window::expr_fn::row_number;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{
    col, lit, try_cast, when, Aggregate, Expr, ExprFunctionExt, ExprSchemable, LogicalPlan,
    LogicalPlanBuilder,
};
use rand::RngCore;

use crate::error::{DpError, Result, Rule};
use crate::accountant;
use crate::mechanism::{Share, Threshold};
use crate::options::ResolvedOptions;
use crate::policy::{Domain, Policy};
use crate::tracking::{carry_unit, lineage, make_total, strip_casts, node_name, refuse_grouping_sets, track, Lineage, Tracked};
use crate::udf::ContributionKey;

/// What the gateway does with a planned statement.
#[derive(Debug)]
pub enum PlannedQuery {
    /// The statement reads no dataset (`SELECT 1`, a client's probe, or the
    /// party's own system tables): it reveals nothing about anyone else and
    /// costs nothing.
    NoData(NoDataQuery),
    /// A DP query: run [`DpQuery::exact_plan`], then release it.
    Dp(Box<DpQuery>),
    /// `EXPLAIN <query>`: the checked and rewritten plan and its privacy
    /// cost, computed from the SQL and the policy only; nothing runs and
    /// nothing is charged.
    Explain(ExplainQuery),
}

/// A checked `EXPLAIN`.
#[derive(Debug)]
pub struct ExplainQuery {
    pub inner: Box<PlannedQuery>,
}

/// A statement that reads no dataset.
#[derive(Debug)]
pub struct NoDataQuery {
    pub(crate) plan: LogicalPlan,
    /// For a probe around a DP query (`SELECT * FROM (<DP query>) WHERE 1 =
    /// 0`): the schema that DP query announces — its interval columns, its
    /// noise and contribution metadata — with a charge of 0, so a client
    /// sees the columns the real answer will have.
    pub(crate) probed: Option<Schema>,
}

impl NoDataQuery {
    pub fn output_schema(&self) -> SchemaRef {
        Arc::new(self.plan.schema().as_arrow().clone())
    }

    /// The schema announced for the answer (and the answer's own).
    pub fn announced_schema(&self) -> Schema {
        match &self.probed {
            Some(schema) => schema.clone(),
            None => crate::release::announced_schema(&self.output_schema()),
        }
    }
}

/// The kinds of aggregate this slice can release.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AggregateKind {
    /// `COUNT(*)`
    CountRows,
    /// `COUNT(col)`: rows where `col` is not null.
    CountValues,
    /// `COUNT(DISTINCT <privacy unit>)`: people.
    CountPeople,
    /// `SUM(measure)`, each value clamped to the measure's bounds.
    Sum,
    /// `AVG(measure)`: a noisy sum of clamped values over a noisy count of
    /// values, each with half of the aggregate's budget, clamped to the bounds.
    Avg,
    /// `VAR`/`VAR_POP`/`STDDEV`/`STDDEV_POP` of a bounded value: noisy count,
    /// sum and sum of squares of the values centred on the bounds' midpoint,
    /// a third of the aggregate's budget each.
    Variance { sample: bool, root: bool },
    /// `MEDIAN(x)`, `APPROX_PERCENTILE_CONT(p) WITHIN GROUP (ORDER BY x)` of a
    /// bounded value: per group, the candidate (of [`QUANTILE_CANDIDATES`]
    /// evenly spaced over the bounds) chosen by OpenDP's noisy max over
    /// rank-distance scores; the quantile is `permille` / 1000.
    Quantile { permille: u32 },
}

/// How many evenly spaced candidates a DP quantile chooses from: its
/// resolution is (upper − lower) / (candidates − 1).
pub const QUANTILE_CANDIDATES: usize = 101;

/// A DP quantile's candidates and score parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantileSpec {
    pub candidates: Vec<f64>,
    /// The quantile as permille / 1000.
    pub permille: u32,
    /// Groups one person reaches: each group's selection gets the column's
    /// ε divided by this.
    pub groups_per_person: f64,
}

/// One noisy column of the DP aggregate.
#[derive(Debug, Clone)]
pub struct DpAggregate {
    pub kind: AggregateKind,
    /// The column's name in the DP aggregate's output.
    pub output_name: String,
    /// L1 sensitivity of this column over all groups.
    pub sensitivity: f64,
    /// L2 sensitivity of this column over all groups (for Gaussian noise).
    pub l2_sensitivity: f64,
    /// What this column may spend: its share of the query's ε, or of its ρ.
    pub share: Share,
    /// The exact column holds whole numbers (counts, sums of an integer
    /// measure with integer bounds): noise it with the discrete Laplace or
    /// discrete Gaussian.
    pub integral: bool,
    /// For `AVG` and the variances: the L1 and L2 sensitivities of the count
    /// of values (the exact plan's `__b<j>` column) and the value's bounds.
    pub average: Option<(f64, f64, (f64, f64))>,
    /// For the variances: the L1 and L2 sensitivities of the sum of squared
    /// centred values (`__c<j>`); `__a<j>` is then the sum of centred values.
    pub squares: Option<(f64, f64)>,
    /// The exact column `__a<j>` counts steps of this size (1 for counts and
    /// sums of whole numbers; a power of two for other sums, see
    /// [`FixedPoint`]); `sensitivity` and `l2_sensitivity` are in steps.
    pub unit: f64,
    /// The step of `__c<j>` (the sum of squares of a variance).
    pub squares_unit: f64,
    /// For quantiles: the candidates; `__a<j>` is the count of values and
    /// `__k<j>_<i>` the count of values ≤ candidate i, and `sensitivity` the
    /// score vector's L∞ sensitivity.
    pub quantile: Option<QuantileSpec>,
}

/// One group column with its public domain, or `None` when its keys are
/// chosen by DP partition selection.
#[derive(Debug, Clone)]
pub struct GroupKey {
    pub name: String,
    pub domain: Option<Domain>,
    /// The most keys one person has, as the manifest declares for the
    /// column(s) it is computed from (`groups_per_person`), when it does.
    pub per_person: Option<u32>,
}

/// A column of a DP query's exact plan: how the rewrite names what it
/// computes and how the release finds it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExactColumn {
    /// Group key `i`.
    Group(usize),
    /// Aggregate `j`'s bounded total: a count, or a sum in steps of its grid
    /// (of centred values for a variance); for a quantile, the number of
    /// values.
    Total(usize),
    /// Aggregate `j`'s count of values (an AVG or a variance).
    Count(usize),
    /// Aggregate `j`'s sum of squared centred values (a variance).
    Squares(usize),
    /// Aggregate `j`'s count of values at or below quantile candidate `i`.
    AtMost(usize, usize),
    /// People per group, for partition selection.
    People,
}

impl ExactColumn {
    /// The column's name in the exact plan (never shown to a party).
    pub fn name(self) -> String {
        match self {
            ExactColumn::Group(i) => format!("__g{i}"),
            ExactColumn::Total(j) => format!("__a{j}"),
            ExactColumn::Count(j) => format!("__b{j}"),
            ExactColumn::Squares(j) => format!("__c{j}"),
            ExactColumn::AtMost(j, i) => format!("__k{j}_{i}"),
            ExactColumn::People => "__n".to_string(),
        }
    }

    /// The exact columns of `aggregate` (number `j`), in plan order.
    pub fn of_aggregate(j: usize, aggregate: &DpAggregate) -> Vec<ExactColumn> {
        let mut columns = vec![ExactColumn::Total(j)];
        if aggregate.average.is_some() {
            columns.push(ExactColumn::Count(j));
        }
        if aggregate.squares.is_some() {
            columns.push(ExactColumn::Squares(j));
        }
        if let Some(q) = &aggregate.quantile {
            columns.extend((0..q.candidates.len()).map(|i| ExactColumn::AtMost(j, i)));
        }
        columns
    }
}

/// A checked DP query.
#[derive(Debug)]
pub struct DpQuery {
    /// A fresh random id; the budget charge for this query names it, and the
    /// release step refuses a receipt for any other query.
    pub id: String,
    /// Exact, contribution-bounded aggregates: the group keys, then each
    /// [`DpAggregate`]'s [`ExactColumn`]s, and the people per group when keys
    /// are selected. Never sent to a party.
    pub exact_plan: LogicalPlan,
    pub groups: Vec<GroupKey>,
    pub aggregates: Vec<DpAggregate>,
    /// DP partition selection of the released keys, when a group key has no
    /// public domain.
    pub selection: Option<Threshold>,
    /// Each aggregate's noise, calibrated at planning (one per aggregate).
    pub mechanisms: Vec<crate::mechanism::Mechanism>,
    /// ε this query costs: the aggregates' and the selection's.
    pub epsilon: f64,
    /// δ this query costs: the selection's plus the Gaussian columns' (0 for
    /// Laplace noise over public domains).
    pub delta: f64,
    /// The datasets read (sorted, each once).
    pub datasets: Vec<String>,
    /// The privacy options the query was planned with.
    pub options: ResolvedOptions,
    /// The analyst's plan; the DP aggregate in it is replaced by the released
    /// values before the post-processing above it runs.
    pub(crate) original: LogicalPlan,
    pub(crate) aggregate_schema: DFSchemaRef,
    /// What the contribution bounds may drop; announced with the answer.
    pub clipping: Clipping,
    /// How many aggregates of the analyst's plan stand above the DP
    /// aggregate (post-processing of its release).
    pub(crate) post_aggregates: usize,
    /// The DP aggregate as checked (its structural form): with the options
    /// and mechanisms, what the noisy release depends on, whatever
    /// post-processing surrounds it.
    pub(crate) core: String,
}

/// The contribution bounds a DP query runs with and whether they can drop
/// anything, from the plan's shape and the manifest alone (public).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clipping {
    /// Groups one person contributes to at most (k after tightening).
    pub groups_per_person: u32,
    /// Rows one person contributes to one group at most.
    pub rows_per_group: u32,
    /// A person may reach more groups than k: the rest are dropped.
    pub groups: bool,
    /// A person may have more rows in a group than the bound: the rest are
    /// dropped (counts and sums may come out low).
    pub rows: bool,
    /// A bound came from the manifest rather than the query or session.
    pub derived: bool,
}

/// The contribution bounds of a query whose options, session and connection
/// set none: `max_groups_contributed` is the product over the group keys of
/// the groups each lets one person have (`groups_per_person` in the
/// manifest, at most the key's domain), when every key declares it — so no
/// group of a person who keeps to the declarations is dropped, and the
/// answer is not biased; `max_contributions_per_group` is the largest
/// default of the protected datasets read (a dataset's own, else the
/// collaboration's).
///
/// Why it is private: both are functions of the SQL and the manifest, never
/// of the data, and the plan enforces them exactly as it enforces bounds a
/// query sets (ranking drops a person's groups beyond k, clipping their rows
/// beyond the per-group bound), and the noise is calibrated to them.
fn derived_bounds(options: &ResolvedOptions, groups: &[(Expr, GroupKey)], datasets: &[String], policy: &Policy) -> ResolvedOptions {
    let mut out = options.clone();
    if !options.bounds_chosen.groups && !groups.is_empty() {
        let declared: Option<Vec<u64>> = groups
            .iter()
            .map(|(_, g)| g.per_person.map(|p| g.domain.as_ref().map_or(p as u64, |d| (p as u64).min(d.len() as u64))))
            .collect();
        if let Some(per_key) = declared {
            let k = per_key.iter().fold(1u64, |k, p| k.saturating_mul(*p));
            out.max_groups_contributed = k.clamp(1, crate::options::MAX_CONTRIBUTION_BOUND as u64) as u32;
        }
    }
    if !options.bounds_chosen.rows {
        let declared = datasets
            .iter()
            .filter_map(|d| policy.dataset(d))
            .filter(|d| d.privacy_unit.is_some())
            .map(|d| d.max_contributions_per_group.unwrap_or(policy.defaults.max_contributions_per_group))
            .max();
        if let Some(m) = declared {
            out.max_contributions_per_group = m.clamp(1, crate::options::MAX_CONTRIBUTION_BOUND);
        }
    }
    out
}

impl DpQuery {
    /// The analyst's plan, as checked.
    pub fn original_plan(&self) -> &LogicalPlan {
        &self.original
    }

    /// The Arrow schema of the answer, before the release metadata is attached.
    pub fn output_schema(&self) -> SchemaRef {
        Arc::new(self.original.schema().as_arrow().clone())
    }

    /// Replace the DP aggregate of the analyst's plan by a scan of `released`
    /// (already noisy) values, shaped exactly like the aggregate's output.
    pub(crate) fn post_processing_plan(&self, released: Arc<MemTable>) -> Result<LogicalPlan> {
        let source = provider_as_source(released);
        let projection: Vec<Expr> = self
            .aggregate_schema
            .iter()
            .enumerate()
            .map(|(i, (qualifier, field))| {
                col(Column::new(Some(RELEASE_TABLE), format!("c{i}")))
                    .alias_qualified(qualifier.cloned(), field.name())
            })
            .collect();
        let substitute = LogicalPlanBuilder::scan(RELEASE_TABLE, source, None)?
            .project(projection)?
            .build()?;
        let mut seen = 0;
        let plan = self
            .original
            .clone()
            .transform_down(|node| {
                if !matches!(node, LogicalPlan::Aggregate(_)) {
                    return Ok(Transformed::no(node));
                }
                // The aggregates above the DP aggregate are post-processing
                // and stay; the DP aggregate is replaced and nothing below
                // it is kept.
                seen += 1;
                if seen <= self.post_aggregates {
                    Ok(Transformed::no(node))
                } else {
                    Ok(Transformed::new(substitute.clone(), true, TreeNodeRecursion::Jump))
                }
            })?
            .data;
        // Post-processing reads the released values and nothing else: a
        // plan that would still scan a dataset (anywhere, subqueries
        // included) is not run.
        let mut reads_data = false;
        let _ = plan.apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                reads_data |= scan.table_name.table() != RELEASE_TABLE || scan.table_name.schema().is_some();
            }
            Ok(TreeNodeRecursion::Continue)
        });
        if reads_data {
            return Err(DpError::refused_with(
                Rule::Subquery,
                "subqueries in expressions are not supported",
                "a JOIN on the privacy unit, or a CTE",
            ));
        }
        Ok(plan)
    }
}

pub(crate) const RELEASE_TABLE: &str = "__dp_release";

/// Check `plan` against `policy` and rewrite its DP aggregate.
pub fn plan_query(
    plan: &LogicalPlan,
    policy: &Policy,
    options: &ResolvedOptions,
) -> Result<PlannedQuery> {
    if let LogicalPlan::Explain(explain) = plan {
        return Ok(PlannedQuery::Explain(ExplainQuery {
            inner: Box::new(plan_query(&explain.plan, policy, options)?),
        }));
    }
    refuse_statements(plan)?;
    if let Some(empty) = provably_empty(plan) {
        // What the statement would announce if it had rows: planned like
        // any statement (from the SQL and the policy only), nothing run.
        let probed = match plan_rows(plan, policy, options) {
            Ok(PlannedQuery::Dp(q)) => crate::release::announced_dp_schema(&q).ok().map(|schema| {
                let mut metadata = schema.metadata().clone();
                metadata.insert(crate::release::META_CHARGE.to_string(), "0".to_string());
                metadata.insert(crate::release::META_CHARGE_DELTA.to_string(), "0".to_string());
                schema.with_metadata(metadata)
            }),
            _ => None,
        };
        return Ok(PlannedQuery::NoData(NoDataQuery { plan: empty, probed }));
    }
    plan_rows(plan, policy, options)
}

/// [`plan_query`] of a statement that is neither an EXPLAIN nor a probe.
fn plan_rows(plan: &LogicalPlan, policy: &Policy, options: &ResolvedOptions) -> Result<PlannedQuery> {
    let all_scans = table_scans(plan)?;
    let system = all_scans.iter().filter(|t| t.schema() == Some(SYSTEM_SCHEMA)).count();
    if system > 0 && system < all_scans.len() {
        return Err(DpError::refused_with(
            Rule::SystemTablesAlone,
            "system tables cannot be combined with datasets in one query",
            "query system.budget or system.queries on their own",
        ));
    }
    // Only the party's own system tables, or nothing at all: no protected
    // data is read, so the answer is exact and free.
    // Functions that could exhaust memory on a value are refused anywhere,
    // also where no protected row reaches them.
    crate::tracking::check_functions(plan)?;
    if system == all_scans.len() {
        return Ok(PlannedQuery::NoData(NoDataQuery { plan: plan.clone(), probed: None }));
    }
    let mut datasets: Vec<String> = all_scans.iter().map(|t| t.table().to_string()).collect();
    datasets.sort();
    datasets.dedup();
    for name in &datasets {
        if policy.dataset(name).is_none() {
            return Err(DpError::refused(Rule::UnknownDataset, format!("dataset `{name}` is not in the collaboration")));
        }
    }
    let plan = analyze(plan)?;
    let (aggregate, post_aggregates) = find_dp_aggregate(&plan, policy)?;
    // The unit carried through projections that leave it out; the DP
    // aggregate is rebuilt over that input (same output schema).
    let carried = carry_unit(aggregate.input.as_ref().clone(), policy)?;
    let aggregate =
        &Aggregate::try_new(Arc::new(carried), aggregate.group_expr.clone(), aggregate.aggr_expr.clone())?;
    let input = track(&aggregate.input, policy)?;
    if !input.protected {
        return Err(DpError::refused(
            Rule::PublicDataset,
            "queries that read only public datasets are not supported yet",
        ));
    }
    let groups = check_group_keys(aggregate, &input, policy, options)?;
    let kinds = check_aggregates(aggregate, &input)?;
    rewrite(&plan, aggregate, post_aggregates, &input, datasets, groups, kinds, policy, options)
}

/// A statement that answers no row whatever the data — a client's probe for
/// a result's columns (`SELECT * FROM (…) WHERE 1 = 0`, `… LIMIT 0`) — as
/// the plan that answers just that: no rows, the statement's schema.
///
/// Why it is private and free: whether [`no_rows`] holds depends on the
/// plan's shape and literals only (nothing is evaluated, no data or
/// statistics read), and the answer holds no value, only the column names
/// and types the party's catalog already shows.
fn provably_empty(plan: &LogicalPlan) -> Option<LogicalPlan> {
    no_rows(plan).then(|| LogicalPlan::EmptyRelation(datafusion::logical_expr::EmptyRelation { produce_one_row: false, schema: plan.schema().clone() }))
}

/// Whether `plan` yields no row on any data: a `LIMIT 0`, a filter that is
/// false by its literals alone, or an empty input under operators that make
/// no row out of none (an aggregate only with `GROUP BY`).
fn no_rows(plan: &LogicalPlan) -> bool {
    use datafusion::logical_expr::{FetchType, JoinType};
    match plan {
        LogicalPlan::EmptyRelation(e) => !e.produce_one_row,
        LogicalPlan::Limit(limit) => matches!(limit.get_fetch_type(), Ok(FetchType::Literal(Some(0)))) || no_rows(&limit.input),
        LogicalPlan::Filter(filter) => always_false(&filter.predicate) || no_rows(&filter.input),
        LogicalPlan::Projection(_)
        | LogicalPlan::Sort(_)
        | LogicalPlan::SubqueryAlias(_)
        | LogicalPlan::Window(_)
        | LogicalPlan::Distinct(_) => no_rows(plan.inputs()[0]),
        // Grouping sets may hold the empty set, which answers one row of
        // nothing: only plain GROUP BY keys make no row out of none.
        LogicalPlan::Aggregate(a) => {
            !a.group_expr.is_empty() && !a.group_expr.iter().any(|g| matches!(g, Expr::GroupingSet(_))) && no_rows(&a.input)
        }
        LogicalPlan::Join(j) => match j.join_type {
            JoinType::Inner | JoinType::LeftSemi | JoinType::RightSemi => no_rows(&j.left) || no_rows(&j.right),
            JoinType::Left | JoinType::LeftAnti | JoinType::LeftMark => no_rows(&j.left),
            JoinType::Right | JoinType::RightAnti | JoinType::RightMark => no_rows(&j.right),
            JoinType::Full => no_rows(&j.left) && no_rows(&j.right),
        },
        _ => false,
    }
}

/// Whether a condition is false (or NULL) by its literals alone: `false`,
/// `NULL`, a comparison of two literals of one type that fails (`1 = 0`),
/// `NOT true`, and `AND`/`OR` of such. Nothing is evaluated but literal
/// comparisons.
fn always_false(e: &Expr) -> bool {
    use datafusion::logical_expr::{BinaryExpr, Operator};
    use std::cmp::Ordering;
    match e {
        Expr::Literal(ScalarValue::Boolean(Some(false) | None), _) => true,
        Expr::Literal(v, _) if v.is_null() => true,
        Expr::Not(inner) => matches!(inner.as_ref(), Expr::Literal(ScalarValue::Boolean(Some(true)), _)),
        Expr::BinaryExpr(BinaryExpr { left, op: Operator::And, right }) => always_false(left) || always_false(right),
        Expr::BinaryExpr(BinaryExpr { left, op: Operator::Or, right }) => always_false(left) && always_false(right),
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let (Expr::Literal(l, _), Expr::Literal(r, _)) = (left.as_ref(), right.as_ref()) else { return false };
            if l.is_null() || r.is_null() {
                return matches!(op, Operator::Eq | Operator::NotEq | Operator::Lt | Operator::LtEq | Operator::Gt | Operator::GtEq);
            }
            if l.data_type() != r.data_type() {
                return false;
            }
            let Some(order) = l.partial_cmp(r) else { return false };
            match op {
                Operator::Eq => order != Ordering::Equal,
                Operator::NotEq => order == Ordering::Equal,
                Operator::Lt => order != Ordering::Less,
                Operator::LtEq => order == Ordering::Greater,
                Operator::Gt => order != Ordering::Greater,
                Operator::GtEq => order == Ordering::Less,
                _ => false,
            }
        }
        _ => false,
    }
}

/// Type coercion (the casts DataFusion would add before running the plan),
/// then every cast made a `TRY_CAST`, so that what is checked is what runs
/// and no cast fails on a value.
fn analyze(plan: &LogicalPlan) -> Result<LogicalPlan> {
    let analyzed = datafusion::optimizer::Analyzer::new().execute_and_check(
        plan.clone(),
        &datafusion::config::ConfigOptions::default(),
        |_, _| {},
    )?;
    make_total(analyzed)
}

/// Statements other than queries never reach data through the planner.
fn refuse_statements(plan: &LogicalPlan) -> Result<()> {
    match plan {
        LogicalPlan::DescribeTable(_) => Err(DpError::refused_with(
            Rule::Describe,
            "DESCRIBE is not supported",
            "the table schemas of the Flight SQL metadata calls (GetTables with include_schema)",
        )),
        LogicalPlan::Analyze(_) => Err(DpError::refused_with(
            Rule::ExplainAnalyze,
            "EXPLAIN ANALYZE would show row counts and timings of protected data",
            "EXPLAIN, which shows the rewritten plan and the privacy cost",
        )),
        LogicalPlan::Dml(_) | LogicalPlan::Ddl(_) | LogicalPlan::Copy(_) => Err(DpError::refused_with(
            Rule::ReadOnly,
            "parties can only run queries; data changes go through the dataset owner's upload",
            "SELECT … GROUP BY …",
        )),
        LogicalPlan::Statement(_) => Err(DpError::refused_with(
            Rule::Statement,
            "this statement is not supported",
            "SET cleanroom.<option> = <value> to change a DP option for the session",
        )),
        _ => Ok(()),
    }
}

/// The dataset names of every table scan, subqueries included.
fn table_scans(plan: &LogicalPlan) -> Result<Vec<TableReference>> {
    let mut scans = Vec::new();
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            scans.push(scan.table_name.clone());
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(scans)
}

/// The schema of the per-party system tables (`system.budget`,
/// `system.queries`): each party sees only its own figures there.
pub const SYSTEM_SCHEMA: &str = "system";

/// Walk down through post-processing nodes to the first aggregate.
/// The DP aggregate of `plan` and how many aggregates above it are
/// post-processing of its release.
///
/// Above the DP aggregate only nodes that compute on its released rows may
/// stand, one input each: projections, filters, sorts, limits, aliases, and
/// — when a DP aggregate lies below them — further aggregates, windows and
/// DISTINCT (a BI tool's `SELECT SUM(n) FROM (<DP query>)`, a share of the
/// total). The DP aggregate is the deepest aggregate of that chain that mixes
/// people: its input is protected and it is not grouped by the privacy unit
/// (an aggregate grouped by the unit is per-person logic below it).
///
/// Why it is private: nothing above the DP aggregate reads a dataset (each
/// node has the one input of the chain, and expressions with subqueries
/// are refused there), so everything above it is post-processing of the
/// noisy release and costs nothing more; which aggregate is the DP one is
/// decided from the plan and the manifest alone.
fn find_dp_aggregate<'a>(plan: &'a LogicalPlan, policy: &Policy) -> Result<(&'a Aggregate, usize)> {
    // The chain of single-input nodes from the top.
    let mut chain: Vec<&LogicalPlan> = Vec::new();
    let mut node = plan;
    loop {
        chain.push(node);
        match node {
            LogicalPlan::Projection(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::Sort(_)
            | LogicalPlan::Limit(_)
            | LogicalPlan::SubqueryAlias(_)
            | LogicalPlan::Aggregate(_)
            | LogicalPlan::Window(_)
            | LogicalPlan::Distinct(_) => node = node.inputs()[0],
            _ => break,
        }
    }
    let mixes_people = |a: &Aggregate| -> bool {
        let Ok(carried) = carry_unit(a.input.as_ref().clone(), policy) else { return false };
        let Ok(input) = track(&carried, policy) else { return false };
        let schema = carried.schema();
        input.protected
            && !a.group_expr.iter().any(|g| matches!(g, Expr::Column(_)) && matches!(crate::tracking::lineage(g, schema, &input.columns), Ok(Lineage::Unit)))
    };
    let aggregates: Vec<usize> = chain.iter().enumerate().filter(|(_, n)| matches!(n, LogicalPlan::Aggregate(_))).map(|(i, _)| i).collect();
    let mixing = aggregates.iter().rev().copied().find(|&i| matches!(chain[i], LogicalPlan::Aggregate(a) if mixes_people(a)));
    // Without an aggregate that mixes people, the first aggregate is taken
    // (its input is then checked, and refused, as any DP aggregate's), with
    // only projections, filters, sorts, limits and aliases above it.
    let dp_at = mixing.or(aggregates.first().copied());
    for (i, node) in chain.iter().enumerate() {
        if Some(i) == dp_at {
            break;
        }
        let post_processing = match node {
            LogicalPlan::Projection(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::Sort(_)
            | LogicalPlan::Limit(_)
            | LogicalPlan::SubqueryAlias(_) => true,
            LogicalPlan::Aggregate(_) | LogicalPlan::Window(_) | LogicalPlan::Distinct(_) => mixing.is_some(),
            _ => false,
        };
        if post_processing && contains_subquery(node) {
            return Err(DpError::refused_with(
                Rule::Subquery,
                "subqueries in expressions are not supported",
                "a JOIN on the privacy unit, or a CTE",
            ));
        }
        if !post_processing {
            return Err(match node {
                LogicalPlan::TableScan(_)
                | LogicalPlan::Join(_)
                | LogicalPlan::Window(_)
                | LogicalPlan::Union(_)
                | LogicalPlan::Distinct(_) => DpError::refused_with(
                    Rule::DpAggregateRequired,
                    "a protected dataset can only be released as an aggregate; this query would return its rows",
                    "SELECT <dimension>, COUNT(*) FROM <dataset> GROUP BY <dimension>",
                ),
                other => DpError::refused(Rule::UnsupportedShape, format!("`{}` is not supported in DP queries yet", node_name(other))),
            });
        }
    }
    match dp_at.map(|i| (i, chain[i])) {
        Some((i, LogicalPlan::Aggregate(a))) => Ok((a, aggregates.iter().filter(|&&j| j < i).count())),
        _ => Err(DpError::refused_with(
            Rule::DpAggregateRequired,
            "a protected dataset can only be released as an aggregate; this query would return its rows",
            "SELECT <dimension>, COUNT(*) FROM <dataset> GROUP BY <dimension>",
        )),
    }
}

/// Whether an expression of `node` holds a subquery of any kind (scalar,
/// EXISTS, IN, and `op ANY/ALL`), which could read a dataset.
fn contains_subquery(node: &LogicalPlan) -> bool {
    let mut found = false;
    let _ = node.apply_subqueries(|_| {
        found = true;
        Ok(TreeNodeRecursion::Stop)
    });
    found
}

fn check_group_keys(aggregate: &Aggregate, input: &Tracked, policy: &Policy, options: &ResolvedOptions) -> Result<Vec<(Expr, GroupKey)>> {
    let schema = aggregate.input.schema();
    let mut keys = Vec::new();
    let mut cells: usize = 1;
    refuse_grouping_sets(&aggregate.group_expr)?;
    for (i, expr) in aggregate.group_expr.iter().enumerate() {
        let name = aggregate.schema.field(i).name().clone();
        let key_lineage = lineage(expr, schema, &input.columns)?;
        let per_person = match &key_lineage {
            Lineage::Dimension(_, p) => *p,
            _ => None,
        };
        let domain = match key_lineage {
            Lineage::Dimension(Some(domain), _) => Some(domain),
            Lineage::Unit | Lineage::UnitOrNull | Lineage::Key => {
                return Err(DpError::refused_with(
                    Rule::PrivacyUnitInOutput,
                    format!("GROUP BY `{name}` would release one row per person or join key"),
                    "COUNT(DISTINCT <privacy unit>) to count people",
                ))
            }
            // Any other value: its keys are released by DP partition
            // selection, which needs δ.
            _ => {
                if options.delta <= 0.0 {
                    return Err(DpError::refused_with(
                        Rule::PartitionSelectionDelta,
                        format!(
                            "GROUP BY `{name}`: the column has no public domain in the manifest, so only keys chosen by DP partition selection can be released, and that needs delta > 0 (the query has delta = 0)"
                        ),
                        "OPTIONS (delta = 1e-7) (or SET cleanroom.delta = 1e-7), or GROUP BY dimensions whose manifest entry lists a domain",
                    ));
                }
                let data_type = expr.get_type(schema)?;
                if !selectable_key_type(&data_type) {
                    return Err(DpError::refused_with(
                        Rule::GroupKeyType,
                        format!("GROUP BY `{name}`: keys of type {data_type} cannot be selected by DP partition selection"),
                        format!("GROUP BY CAST({name} AS VARCHAR), or a dimension with a public domain"),
                    ));
                }
                None
            }
        };
        let domain = domain.map(|d| narrowed(d, expr, &aggregate.input));
        if let Some(domain) = &domain {
            // A day range keys dates; periods (DATE_TRUNC) also their
            // timestamps, which fall on the periods' first midnights.
            let key_type = expr.get_type(schema)?;
            let periods_as_timestamps = matches!(domain, Domain::Periods { .. }) && crate::policy::utc_timestamp(&key_type);
            if domain.is_dates() && key_type != DataType::Date32 && !periods_as_timestamps {
                return Err(DpError::refused_with(
                    Rule::GroupKeyPublicDomain,
                    format!("GROUP BY `{name}`: the public domain is a range of days, and a timestamp has many values per day"),
                    format!("GROUP BY CAST({name} AS DATE)"),
                ));
            }
            cells = cells.saturating_mul(domain.len());
        }
        keys.push((expr.clone(), GroupKey { name, domain, per_person }));
    }
    if keys.iter().all(|(_, k)| k.domain.is_some()) && cells > policy.defaults.max_output_groups {
        return Err(DpError::refused_with(
            Rule::MaxOutputGroups,
            format!(
                "the group keys' public domains have {cells} combinations, above the collaboration's limit of {}",
                policy.defaults.max_output_groups
            ),
            "fewer or coarser group keys",
        ));
    }
    Ok(keys)
}

/// The public domain of group key `key`, narrowed to the values the query's
/// own filter allows: conjuncts of the `WHERE` directly below the DP
/// aggregate of the form `key = v` or `key IN (v, …)` (text and integer
/// domains), `key <, <=, >, >= v` and `BETWEEN` (integer domains). A key the
/// filter rules out could only ever be released as noise around zero.
///
/// Why it is private: the narrowed domain is a function of the SQL text and
/// the manifest only, so the released rows are still the same on any two
/// neighbouring databases.
fn narrowed(domain: Domain, key: &Expr, input: &LogicalPlan) -> Domain {
    use datafusion::logical_expr::{BinaryExpr, Between, Operator, TryCast};
    // The key itself, not a cast of it: a comparison in another type (text
    // order, a narrower integer) may let other keys through.
    let key = key.clone().unalias();
    let is_key = |e: &Expr| e.clone().unalias() == key;
    let is_text = |t: &DataType| matches!(t, DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8);
    // A literal as written; text may be cast between text types (the
    // value stays the same).
    let literal = |e: &Expr| match e {
        Expr::Literal(v, _) if !v.is_null() => Some(v.clone()),
        Expr::Cast(datafusion::logical_expr::Cast { expr, field }) | Expr::TryCast(TryCast { expr, field }) if is_text(field.data_type()) => match expr.as_ref() {
            Expr::Literal(v, _) if !v.is_null() && is_text(&v.data_type()) => Some(v.clone()),
            _ => None,
        },
        _ => None,
    };
    // Only integer literals bound an integer range (a fraction would be
    // truncated).
    let integer = |v: &ScalarValue| {
        if !v.data_type().is_integer() {
            return None;
        }
        v.cast_to(&DataType::Int64).ok().and_then(|v| match v {
            ScalarValue::Int64(Some(i)) => Some(i),
            _ => None,
        })
    };
    let text = |v: &ScalarValue| crate::tracking::text_of(v).map(str::to_string);
    let mut domain = domain;
    let mut node = input;
    while let LogicalPlan::Filter(filter) = node {
        for conjunct in datafusion::logical_expr::utils::split_conjunction(&filter.predicate) {
            // The literals `key` must equal, or the integer range it must lie in.
            let mut values: Option<Vec<ScalarValue>> = None;
            let mut range: Option<(i64, i64)> = None;
            match conjunct {
                Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                    let (op, v) = match (is_key(left), is_key(right), literal(left), literal(right)) {
                        (true, _, _, Some(v)) => (*op, v),
                        (_, true, Some(v), _) => match op.swap() {
                            Some(op) => (op, v),
                            None => continue,
                        },
                        _ => continue,
                    };
                    match (op, integer(&v)) {
                        (Operator::Eq, _) => values = Some(vec![v]),
                        (Operator::Lt, Some(i)) => range = Some((i64::MIN, i.saturating_sub(1))),
                        (Operator::LtEq, Some(i)) => range = Some((i64::MIN, i)),
                        (Operator::Gt, Some(i)) => range = Some((i.saturating_add(1), i64::MAX)),
                        (Operator::GtEq, Some(i)) => range = Some((i, i64::MAX)),
                        _ => continue,
                    }
                }
                Expr::InList(list) if !list.negated && is_key(&list.expr) => {
                    let Some(listed) = list.list.iter().map(literal).collect::<Option<Vec<_>>>() else { continue };
                    values = Some(listed);
                }
                Expr::Between(Between { expr, negated: false, low, high }) if is_key(expr) => {
                    if let (Some(lo), Some(hi)) = (literal(low).as_ref().and_then(integer), literal(high).as_ref().and_then(integer)) {
                        range = Some((lo, hi));
                    }
                }
                _ => continue,
            }
            domain = match (domain, values, range) {
                (Domain::Strings(keys), Some(values), _) => {
                    let allowed: Vec<String> = values.iter().filter_map(text).collect();
                    if allowed.len() < values.len() {
                        Domain::Strings(keys)
                    } else {
                        Domain::Strings(keys.into_iter().filter(|k| allowed.contains(k)).collect())
                    }
                }
                (Domain::IntRange { min, max }, Some(values), _) => {
                    match values.iter().map(integer).collect::<Option<Vec<i64>>>() {
                        // Still a range: from the least to the greatest listed value.
                        Some(listed) if !listed.is_empty() => Domain::IntRange {
                            min: min.max(*listed.iter().min().expect("not empty")),
                            max: max.min(*listed.iter().max().expect("not empty")),
                        },
                        _ => Domain::IntRange { min, max },
                    }
                }
                (Domain::IntRange { min, max }, None, Some((lo, hi))) => Domain::IntRange { min: min.max(lo), max: max.min(hi) },
                (other, _, _) => other,
            };
        }
        node = filter.input.as_ref();
    }
    domain
}

/// Key types that survive the release's round trip through text exactly.
fn selectable_key_type(t: &DataType) -> bool {
    t.is_integer() || matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Boolean | DataType::Date32)
}

/// An aggregate of the DP aggregate with what it reads.
struct Requested {
    kind: AggregateKind,
    /// The value aggregated (over the DP aggregate's input).
    arg: Option<Expr>,
    /// For `COUNT(DISTINCT x)`: `x` is the row's person itself (not the
    /// possibly-NULL unit of an outer join's optional side).
    of_unit: bool,
    bounds: (f64, f64),
}

fn check_aggregates(aggregate: &Aggregate, input: &Tracked) -> Result<Vec<Requested>> {
    if aggregate.aggr_expr.is_empty() {
        return Err(DpError::refused_with(
            Rule::DpAggregateRequired,
            "GROUP BY without an aggregate would release the group keys present in the data",
            "add COUNT(*), COUNT(DISTINCT <privacy unit>) or SUM(<measure>)",
        ));
    }
    let schema = aggregate.input.schema();
    let allowed = "COUNT(*), COUNT(<column>), COUNT(DISTINCT <privacy unit>), SUM, AVG, VAR, VAR_POP, STDDEV, STDDEV_POP (of a bounded value)";
    let rows = || Requested { kind: AggregateKind::CountRows, arg: None, of_unit: false, bounds: (0.0, 0.0) };
    aggregate
        .aggr_expr
        .iter()
        .map(|expr| {
            let Expr::AggregateFunction(AggregateFunction { func, params }) = expr.clone().unalias() else {
                return Err(DpError::refused_with(Rule::SupportedAggregates, format!("`{expr}` is not an aggregate function"), allowed));
            };
            if let Some(permille) = quantile_of(expr, func.name(), &params)? {
                let arg = params.args[0].clone();
                return match lineage(&arg, schema, &input.columns)?.bounds() {
                    Some(bounds) => Ok(Requested { kind: AggregateKind::Quantile { permille }, arg: Some(arg), of_unit: false, bounds }),
                    None => Err(DpError::refused_with(
                        Rule::SumOfMeasure,
                        format!("`{expr}`: the value has no bounds, so the quantile's candidates cannot be fixed without looking at the data"),
                        "the quantile of a measure the manifest bounds, or of a clamped value: LEAST(GREATEST(x, <low>), <high>)",
                    )),
                };
            }
            if params.filter.is_some() || !params.order_by.is_empty() {
                return Err(DpError::refused_with(Rule::SupportedAggregates, format!("`{expr}`: FILTER and ORDER BY inside aggregates are not supported yet"), allowed));
            }
            let name = func.name().to_ascii_lowercase();
            if params.args.len() > 1 {
                return Err(DpError::refused_with(Rule::SupportedAggregates, format!("`{expr}`: aggregates of several arguments are not supported"), allowed));
            }
            let Some(arg) = params.args.first() else {
                return match name.as_str() {
                    "count" => Ok(rows()),
                    _ => Err(DpError::refused_with(Rule::SupportedAggregates, format!("`{expr}` is not supported yet"), allowed)),
                };
            };
            if name == "count" && !params.distinct && matches!(arg, Expr::Literal(v, _) if !v.is_null()) {
                return Ok(rows());
            }
            let l = lineage(arg, schema, &input.columns)?;
            let bounded = |kind| match l.bounds() {
                Some(bounds) => Ok(Requested { kind, arg: Some(arg.clone()), of_unit: false, bounds }),
                None => Err(DpError::refused_with(
                    Rule::SumOfMeasure,
                    format!("`{expr}`: the value has no bounds, so one person could change the sum without limit"),
                    "SUM/AVG of a measure the manifest bounds, or of a clamped value: LEAST(GREATEST(x, <low>), <high>)",
                )),
            };
            match (name.as_str(), params.distinct) {
                ("count", true) => match l {
                    Lineage::Unit | Lineage::UnitOrNull => Ok(Requested {
                        kind: AggregateKind::CountPeople,
                        arg: Some(arg.clone()),
                        of_unit: l == Lineage::Unit,
                        bounds: (0.0, 0.0),
                    }),
                    _ => Err(DpError::refused_with(Rule::SupportedAggregates, format!("`{expr}`: COUNT(DISTINCT) is only supported on the privacy unit"), allowed)),
                },
                // Every row the DP aggregate keeps has a person.
                ("count", false) if l == Lineage::Unit => Ok(rows()),
                ("count", false) => Ok(Requested { kind: AggregateKind::CountValues, arg: Some(arg.clone()), of_unit: false, bounds: (0.0, 0.0) }),
                ("sum", false) => bounded(AggregateKind::Sum),
                ("avg", false) => bounded(AggregateKind::Avg),
                ("var" | "var_samp" | "var_sample", false) => bounded(AggregateKind::Variance { sample: true, root: false }),
                ("var_pop" | "var_population", false) => bounded(AggregateKind::Variance { sample: false, root: false }),
                ("stddev" | "stddev_samp", false) => bounded(AggregateKind::Variance { sample: true, root: true }),
                ("stddev_pop", false) => bounded(AggregateKind::Variance { sample: false, root: true }),
                _ => Err(DpError::refused_with(Rule::SupportedAggregates, format!("`{expr}` is not supported yet"), allowed)),
            }
        })
        .collect()
}

/// For `MEDIAN(x)` or `APPROX_PERCENTILE_CONT(p) WITHIN GROUP (ORDER BY x)`
/// (also written `APPROX_PERCENTILE_CONT(x, p)`), the quantile in permille;
/// `None` for other aggregates.
fn quantile_of(expr: &Expr, name: &str, params: &datafusion::logical_expr::expr::AggregateFunctionParams) -> Result<Option<u32>> {
    let allowed = "MEDIAN(x), APPROX_PERCENTILE_CONT(p) WITHIN GROUP (ORDER BY x) with p a literal between 0 and 1";
    let name = name.to_ascii_lowercase();
    if name != "median" && name != "approx_percentile_cont" {
        return Ok(None);
    }
    let refuse = |why: &str| Err(DpError::refused_with(Rule::SupportedAggregates, format!("`{expr}`: {why}"), allowed));
    if params.filter.is_some() || params.distinct {
        return refuse("FILTER and DISTINCT are not supported in quantiles");
    }
    // Type coercion may have cast the value in the arguments but not in the
    // ORDER BY: compare them without casts.
    if let Some(sort) = params.order_by.first() {
        let same = params.args.first().map(strip_casts) == Some(strip_casts(&sort.expr));
        if params.order_by.len() != 1 || !sort.asc || !same {
            return refuse("only an ascending ORDER BY of the value itself is supported");
        }
    }
    if name == "median" {
        return if params.args.len() == 1 { Ok(Some(500)) } else { refuse("MEDIAN takes one value") };
    }
    if params.args.len() != 2 {
        return refuse("the number of centroids cannot be set");
    }
    let q = match strip_casts(&params.args[1]) {
        Expr::Literal(v, _) => match v {
            ScalarValue::Float64(Some(q)) => *q,
            ScalarValue::Float32(Some(q)) => *q as f64,
            _ => return refuse("the percentile must be a number"),
        },
        _ => return refuse("the percentile must be a literal"),
    };
    if !(q > 0.0 && q < 1.0) {
        return refuse("the percentile must be above 0 and below 1");
    }
    Ok(Some((q * 1000.0).round().clamp(1.0, 999.0) as u32))
}

#[allow(clippy::too_many_arguments)]
fn rewrite(
    original: &LogicalPlan,
    aggregate: &Aggregate,
    post_aggregates: usize,
    input: &Tracked,
    datasets: Vec<String>,
    groups: Vec<(Expr, GroupKey)>,
    requested: Vec<Requested>,
    policy: &Policy,
    options: &ResolvedOptions,
) -> Result<PlannedQuery> {
    let options = &derived_bounds(options, &groups, &datasets, policy);
    let input_schema = aggregate.input.schema();
    let unit_index = input
        .unit_index()
        .ok_or_else(|| {
            DpError::refused_with(
                Rule::PrivacyUnit,
                "the input of the DP aggregate does not carry the privacy unit (a SELECT DISTINCT or a UNION left it out, so its rows are no longer one person's)",
                "keep the privacy unit column (uid) in the SELECT list under DISTINCT or UNION, or count people with COUNT(DISTINCT uid)",
            )
        })?;
    let unit_column = Column::from(input_schema.qualified_field(unit_index));
    if let Some(asked) = &options.privacy_unit_column {
        if !asked.eq_ignore_ascii_case(&unit_column.name) {
            return Err(DpError::refused_with(
                Rule::PrivacyUnit,
                format!(
                    "privacy_unit_column = {asked}: the privacy unit is `{}`, set by the collaboration manifest",
                    unit_column.name
                ),
                format!("privacy_unit_column = {}, or leave the option out", unit_column.name),
            ));
        }
    }
    let unit = col(unit_column);
    // Rows per person and group: the option, or fewer when the plan's shape
    // guarantees it: one row per person after GROUP BY uid, or one per
    // person and group when the input is unique per person and columns that
    // the DP aggregate groups by (after GROUP BY uid, affiliate_id).
    let grouped_columns: Vec<usize> = groups
        .iter()
        .filter_map(|(e, _)| match e.clone().unalias() {
            Expr::Column(c) => input_schema.index_of_column(&c).ok(),
            _ => None,
        })
        .collect();
    let one_per_group = input.unique_by.as_ref().is_some_and(|by| by.iter().all(|i| grouped_columns.contains(i)));
    let per_group_rows = (options.max_contributions_per_group as u64)
        .min(input.rows_per_person.unwrap_or(u64::MAX))
        .min(if one_per_group { 1 } else { u64::MAX }) as f64;
    // A person can reach no more groups than the domain has cells (no
    // bound when keys are selected from the data), nor more than the rows
    // the plan's shape gives them.
    let select = groups.iter().any(|(_, g)| g.domain.is_none());
    let cells = groups.iter().fold(1usize, |n, (_, g)| {
        n.saturating_mul(g.domain.as_ref().map(Domain::len).unwrap_or(usize::MAX))
    });
    let reachable = (cells as u64).min(input.rows_per_person.unwrap_or(u64::MAX)).max(1);
    let k = (options.max_groups_contributed as u64).min(reachable) as f64;
    // Whether each (person, group) already has at most one input row, so the
    // per-person aggregate of step 1 would hand every row on unchanged and
    // can be skipped: one row per person at all, or rows unique per person
    // and columns the DP aggregate groups by as they are (a key computed
    // from a column, even a cast, may map two of a person's rows to one
    // group, which the aggregate then must merge).
    let keys_as_is = groups.iter().all(|(e, g)| match e.clone().unalias() {
        Expr::Column(c) => input_schema.qualified_field_from_column(&c).is_ok_and(|(_, f)| match &g.domain {
            None => true,
            Some(Domain::Strings(_)) => f.data_type() == &DataType::Utf8,
            Some(Domain::IntRange { .. }) => f.data_type() == &DataType::Int64,
            Some(Domain::DateRange { .. }) => f.data_type() == &DataType::Date32,
            Some(Domain::Periods { .. }) => false,
        }),
        _ => false,
    });
    let single_rows = input.rows_per_person == Some(1) || (one_per_group && keys_as_is);
    // Whether the bounds can drop anything (announced with the answer): a
    // person's groups beyond k (ranking runs), or rows beyond the per-group
    // bound where an aggregate counts or adds rows.
    let by_rows = requested.iter().any(|r| !matches!(r.kind, AggregateKind::CountPeople));
    let clipping = Clipping {
        groups_per_person: k as u32,
        rows_per_group: per_group_rows as u32,
        groups: (options.max_groups_contributed as u64) < reachable,
        rows: by_rows
            && (options.max_contributions_per_group as u64)
                < input.rows_per_person.unwrap_or(u64::MAX).min(if one_per_group { 1 } else { u64::MAX }),
        derived: !options.bounds_chosen.groups || !options.bounds_chosen.rows,
    };

    // Every cast below is a TRY_CAST: a value that does not convert becomes
    // NULL instead of failing the query, so whether a query fails never
    // depends on the data.
    //
    // Rows without a person are dropped (a NULL identifier would lump several
    // people into one "person" and break the contribution bound), and so are
    // rows whose group key is outside the public domain (they could never be
    // released, and would use up a person's `max_groups_contributed`).
    let mut keep = unit.clone().is_not_null();
    let mut group_by = vec![unit.alias(UNIT)];
    let mut group_cols = Vec::new();
    for (i, (expr, key)) in groups.iter().enumerate() {
        let Some(domain) = &key.domain else {
            // A selected key: any value but NULL may be released.
            keep = keep.and(expr.clone().is_not_null());
            group_by.push(expr.clone().alias(ExactColumn::Group(i).name()));
            group_cols.push(col(ExactColumn::Group(i).name()));
            continue;
        };
        let (as_type, in_domain): (DataType, Box<dyn Fn(Expr) -> Expr>) = match domain {
            Domain::Strings(values) => {
                let values: Vec<Expr> = values.iter().map(|v| lit(v.as_str())).collect();
                // A domain the query's filter narrowed to nothing keeps no row.
                (DataType::Utf8, Box::new(move |e: Expr| if values.is_empty() { lit(false) } else { e.in_list(values.clone(), false) }))
            }
            Domain::IntRange { min, max } => {
                let (min, max) = (*min, *max);
                (DataType::Int64, Box::new(move |e: Expr| e.between(lit(min), lit(max))))
            }
            Domain::DateRange { .. } | Domain::Periods { .. } => {
                let days = domain.days();
                let (from, to) = (days.first().copied().unwrap_or(0), days.last().copied().unwrap_or(-1));
                (
                    DataType::Date32,
                    Box::new(move |e: Expr| {
                        e.between(lit(ScalarValue::Date32(Some(from))), lit(ScalarValue::Date32(Some(to))))
                    }),
                )
            }
        };
        let key_expr = try_cast(expr.clone(), as_type);
        keep = keep.and(in_domain(key_expr.clone()));
        group_by.push(key_expr.alias(ExactColumn::Group(i).name()));
        group_cols.push(col(ExactColumn::Group(i).name()));
    }

    // 1. Per person and group: partial aggregates. Every sum is exact:
    // each row's clamped value is put on a fixed grid (`FixedPoint`: whole
    // numbers for an integer measure with small whole bounds, else steps of
    // a power of two) as a 64-bit integer, and added up in 128-bit decimals,
    // so no sum wraps, rounds or depends on the order of addition.
    let mut partials = Vec::new();
    let mut integral = Vec::new();
    let mut grids: Vec<(FixedPoint, Option<FixedPoint>)> = Vec::new();
    for (j, r) in requested.iter().enumerate() {
        let name = format!("__p{j}");
        let field_type = aggregate.schema.field(groups.len() + j).data_type().clone();
        let whole_bounds = r.bounds.0.fract() == 0.0 && r.bounds.1.fract() == 0.0;
        let half_width = (r.bounds.1 - r.bounds.0) / 2.0;
        let (grid, squares_grid) = match r.kind {
            AggregateKind::Sum => (FixedPoint::new(r, r.bounds, field_type.is_integer() && whole_bounds)?, None),
            AggregateKind::Avg => (FixedPoint::new(r, r.bounds, false)?, None),
            AggregateKind::Variance { .. } => (
                FixedPoint::new(r, (-half_width, half_width), false)?,
                Some(FixedPoint::new(r, (0.0, half_width * half_width), false)?),
            ),
            _ => (FixedPoint::counts(), None),
        };
        integral.push(!matches!(r.kind, AggregateKind::Avg | AggregateKind::Variance { .. } | AggregateKind::Quantile { .. }) && grid.unit == 1.0);
        let arg = || r.arg.clone().expect("an aggregate with an argument");
        // Each partial as an aggregate over a (person, group)'s rows, and
        // as what that aggregate gives for a single row (see `single_rows`).
        let on_decimal = |e: Expr| try_cast(e, DataType::Decimal128(38, 0));
        let exact_sum = |e: Expr, name: String| Partial { rows: sum(on_decimal(e.clone())).alias(&name), row: on_decimal(e).alias(name) };
        let count_of = |e: Expr, name: String| -> Result<Partial> {
            Ok(Partial {
                rows: count(e.clone()).alias(&name),
                row: when(e.is_not_null(), lit(1i64)).otherwise(lit(0i64))?.alias(name),
            })
        };
        match r.kind {
            AggregateKind::CountRows => partials.push(Partial { rows: count(lit(1i64)).alias(&name), row: lit(1i64).alias(name) }),
            AggregateKind::CountValues => partials.push(count_of(arg(), name)?),
            // Each kept row has a person: one per (person, group).
            AggregateKind::CountPeople if r.of_unit => {}
            // The unit of an outer join's optional side: this person, or NULL.
            AggregateKind::CountPeople => {
                let present = when(arg().is_not_null(), lit(1i64)).otherwise(lit(0i64))?;
                partials.push(Partial { rows: max(present.clone()).alias(&name), row: present.alias(name) });
            }
            AggregateKind::Sum => partials.push(exact_sum(grid.per_row(arg(), r.bounds), name)),
            AggregateKind::Avg => {
                partials.push(exact_sum(grid.per_row(arg(), r.bounds), name));
                partials.push(count_of(arg(), format!("__q{j}"))?);
            }
            AggregateKind::Variance { .. } => {
                // Centred on the midpoint, each value is within ±half-width.
                let mid = (r.bounds.0 + r.bounds.1) / 2.0;
                let centred = clamp(arg(), r.bounds.0, r.bounds.1, false) - lit(mid);
                let squares = squares_grid.as_ref().expect("a variance has a grid for its squares");
                partials.push(exact_sum(grid.per_row(centred.clone(), (-half_width, half_width)), name));
                partials.push(count_of(arg(), format!("__q{j}"))?);
                partials.push(exact_sum(squares.per_row(centred.clone() * centred, (0.0, half_width * half_width)), format!("__r{j}")));
            }
            AggregateKind::Quantile { .. } => {
                // Per person and group: values, and values ≤ each candidate.
                partials.push(count_of(arg(), name)?);
                for (i, c) in quantile_candidates(r.bounds).iter().enumerate() {
                    let at_most = when(clamp(arg(), r.bounds.0, r.bounds.1, false).lt_eq(lit(*c)), lit(1i64)).otherwise(lit(0i64))?;
                    let name = format!("__k{j}_{i}");
                    partials.push(Partial { rows: sum(at_most.clone()).alias(&name), row: at_most.alias(name) });
                }
            }
        }
        grids.push((grid, squares_grid));
    }
    // Per-person operators below see one person's rows, in a total order;
    // with joins, each person's rows per scan are capped when the
    // collaboration sets `max_rows_per_person`.
    let input_plan = crate::tracking::guard_per_person(aggregate.input.as_ref().clone(), policy)?;
    let input_plan = crate::tracking::cap_rows_per_person(
        input_plan,
        policy,
        policy.defaults.max_rows_per_person,
        rand::rngs::OsRng.next_u64() as i64,
    )?;
    let builder = LogicalPlanBuilder::from(input_plan).filter(keep)?;
    let builder = if single_rows {
        // Every (person, group) has one row: its partials are that row's
        // values, exactly what the aggregate would compute, bounded below
        // as any partial is.
        builder.project(group_by.into_iter().chain(partials.into_iter().map(|p| p.row)))?
    } else {
        builder.aggregate(group_by, partials.into_iter().map(|p| p.rows))?
    };

    // Each partial bounded to what `max_contributions_per_group` rows give.
    let salt = rand::rngs::OsRng.next_u64() as i64;
    let mut key_args = vec![lit(salt), col(UNIT)];
    key_args.extend(group_cols.iter().cloned());
    let key_fn = datafusion::logical_expr::ScalarUDF::new_from_impl(ContributionKey::new());
    let mut bounded = vec![col(UNIT)];
    bounded.extend(group_cols.iter().cloned());
    let mut aggregates = Vec::new();
    let mut finals = Vec::new();
    // The budget split over the noisy columns and the selection; see the
    // composition argument in `accountant`.
    let split = accountant::split(options, requested.len(), select)?;
    // Each column's part of the columns' budget: even, or as a study asked
    // (weights normalised to the columns' total, so the shares still add
    // up to what `split` gives the columns: sequential composition).
    let weights: Vec<f64> = match &options.column_split {
        Some(s) if s.weights.len() == requested.len() && s.weights.iter().all(|w| w.is_finite() && *w > 0.0) => {
            let total: f64 = s.weights.iter().sum();
            s.weights.iter().map(|w| w * requested.len() as f64 / total).collect()
        }
        Some(_) => {
            return Err(DpError::refused(Rule::UnsupportedShape, "the study's budget split does not match its aggregates"))
        }
        None => vec![1.0; requested.len()],
    };
    for (j, r) in requested.iter().enumerate() {
        let p = col(format!("__p{j}"));
        let (grid, squares_grid) = &grids[j];
        let exact_total = |name: String| sum(try_cast(col(name), DataType::Decimal128(38, 0)));
        // Sensitivities below are in steps of the column's grid (1 for
        // counts): the partials are whole numbers of steps.
        let (partial, per_group, final_expr) = match r.kind {
            AggregateKind::CountRows | AggregateKind::CountValues => (
                Some(clamp(p, 0.0, per_group_rows, true)),
                per_group_rows,
                sum(col(format!("__p{j}"))),
            ),
            AggregateKind::CountPeople if r.of_unit => (None, 1.0, count(lit(1i64))),
            AggregateKind::CountPeople => (Some(p), 1.0, sum(col(format!("__p{j}")))),
            AggregateKind::Sum | AggregateKind::Avg | AggregateKind::Variance { .. } => {
                let low = per_group_rows * grid.low.min(0.0);
                let high = per_group_rows * grid.high.max(0.0);
                (Some(clamp_exact(p, low, high)), low.abs().max(high.abs()), exact_total(format!("__p{j}")))
            }
            // Each person's values and values ≤ each candidate, at most m
            // each; the score |1000·C − permille·N| moves by at most 1000·m.
            AggregateKind::Quantile { .. } => {
                for i in 0..QUANTILE_CANDIDATES {
                    bounded.push(clamp(col(format!("__k{j}_{i}")), 0.0, per_group_rows, true).alias(format!("__k{j}_{i}")));
                    finals.push(sum(col(format!("__k{j}_{i}"))).alias(ExactColumn::AtMost(j, i).name()));
                }
                (Some(clamp(p, 0.0, per_group_rows, true)), 1000.0 * per_group_rows, sum(col(format!("__p{j}"))))
            }
        };
        let squares = squares_grid.as_ref().map(|g| per_group_rows * g.high);
        if let Some(bound) = squares {
            // Squared centred values per person and group: at most
            // `max_contributions_per_group` × half-width² (in grid steps).
            bounded.push(clamp_exact(col(format!("__r{j}")), 0.0, bound).alias(format!("__r{j}")));
            finals.push(exact_total(format!("__r{j}")).alias(ExactColumn::Squares(j).name()));
        }
        if matches!(r.kind, AggregateKind::Avg | AggregateKind::Variance { .. }) {
            // The denominator: values counted per person and group, at most
            // `max_contributions_per_group`.
            bounded.push(clamp(col(format!("__q{j}")), 0.0, per_group_rows, true).alias(format!("__q{j}")));
            finals.push(sum(col(format!("__q{j}"))).alias(ExactColumn::Count(j).name()));
        }
        if let Some(partial) = partial {
            bounded.push(partial.alias(format!("__p{j}")));
        }
        finals.push(final_expr.alias(ExactColumn::Total(j).name()));
        let field = aggregate.schema.field(groups.len() + j);
        aggregates.push(DpAggregate {
            kind: r.kind,
            output_name: field.name().clone(),
            // A person reaches at most k groups, changing each by at most
            // `per_group`: L1 k × that, L2 √k × that. A quantile is chosen per
            // group (with ε / k each), so its sensitivity is one group's.
            sensitivity: if matches!(r.kind, AggregateKind::Quantile { .. }) { per_group } else { k * per_group },
            l2_sensitivity: k.sqrt() * per_group,
            share: split.column.scaled(weights[j]),
            integral: integral[j],
            average: matches!(r.kind, AggregateKind::Avg | AggregateKind::Variance { .. })
                .then_some((k * per_group_rows, k.sqrt() * per_group_rows, r.bounds)),
            squares: squares.map(|b| (k * b, k.sqrt() * b)),
            unit: grid.unit,
            squares_unit: squares_grid.as_ref().map(|g| g.unit).unwrap_or(1.0),
            quantile: match r.kind {
                AggregateKind::Quantile { permille } => {
                    if let Share::Rho(_) = split.column {
                        return Err(DpError::refused_with(
                            Rule::QuantileNoise,
                            "quantiles are chosen by a pure-DP selection and cannot be composed in zCDP with Gaussian noise",
                            "noise = 'laplace' (the default) for queries with MEDIAN or APPROX_PERCENTILE_CONT",
                        ));
                    }
                    Some(QuantileSpec { candidates: quantile_candidates(r.bounds), permille, groups_per_person: k })
                }
                _ => None,
            },
        });
    }
    // 2. At most k groups per person, the ones with the smallest keyed hash.
    // Rows outside the public domain were dropped above, so a person reaches
    // at most `cells` groups, and no more than their rows: when k covers
    // them all, nothing needs dropping and the (costly) ranking is skipped.
    let builder = if (options.max_groups_contributed as u64) < reachable {
        bounded.push(key_fn.call(key_args).alias(KEY));
        let rank = row_number()
            .partition_by(vec![col(UNIT)])
            .order_by(vec![col(KEY).sort(true, false)])
            .build()?
            .alias(RANK);
        builder
            .project(bounded)?
            .window(vec![rank])?
            .filter(col(RANK).lt_eq(lit(options.max_groups_contributed as u64)))?
    } else {
        builder.project(bounded)?
    };
    // 3. Sum the partials per group; with selection, count each group's
    // people too (one bounded row per person and group).
    if select {
        finals.push(count(lit(1i64)).alias(ExactColumn::People.name()));
    }
    let exact_plan = builder.aggregate(group_cols, finals)?.build()?;
    // Every function and operator in it evaluated totally: NULL where it
    // would fail on a value (see `crate::total`).
    let exact_plan = crate::total::make_fallible_total(exact_plan)?;
    let selection = match split.selection {
        Some((epsilon, delta)) => Some(Threshold::calibrate(k as u32, epsilon, delta)?),
        None => None,
    };
    // The shares add up to the option's ε, which is charged (each mechanism
    // spends at most its share); δ is charged as used.
    let delta = selection.map(|t| t.delta).unwrap_or(0.0) + split.gaussian_delta;

    let mut id = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut id);
    let mut query = DpQuery {
        id: hex::encode(id),
        exact_plan,
        groups: groups.into_iter().map(|(_, g)| g).collect(),
        aggregates,
        selection,
        epsilon: options.epsilon,
        delta,
        datasets,
        options: options.clone(),
        original: original.clone(),
        aggregate_schema: aggregate.schema.clone(),
        mechanisms: Vec::new(),
        clipping,
        post_aggregates,
        core: format!("{:?}", LogicalPlan::Aggregate(aggregate.clone())),
    };
    // Every mechanism calibrated once, now: the release, the announced
    // schema and the audit record use these, and a failure refuses the
    // query before any charge.
    query.mechanisms = crate::release::calibrate(&query).map_err(|e| match e {
        DpError::Mechanism(detail) => DpError::refused_with(
            Rule::NoiseCalibration,
            format!("no noise can be calibrated for this query: {detail}"),
            "narrower bounds, fewer groups per person or a larger epsilon",
        ),
        other => other,
    })?;
    Ok(PlannedQuery::Dp(Box::new(query)))
}

/// The exact plan's column of the person (step 1 groups by it), of each
/// (person, group)'s keyed hash, and of its rank among the person's groups
/// (`ROW_NUMBER() OVER (PARTITION BY UNIT ORDER BY KEY)`, step 2). An engine
/// may compute that window by another operator with the same result.
pub const UNIT: &str = "__uid";
pub const KEY: &str = "__key";
pub const RANK: &str = "__rank";

/// One partial of step 1, as an aggregate over a (person, group)'s rows and
/// as its value for a single row.
struct Partial {
    rows: Expr,
    row: Expr,
}

/// The quantile candidates: evenly spaced over the bounds, ends included.
fn quantile_candidates((low, high): (f64, f64)) -> Vec<f64> {
    let step = (high - low) / (QUANTILE_CANDIDATES - 1) as f64;
    (0..QUANTILE_CANDIDATES).map(|i| if i + 1 == QUANTILE_CANDIDATES { high } else { low + step * i as f64 }).collect()
}

/// Most steps of its grid one row's value may take: sums of up to
/// `max_contributions_per_group` (10 000) rows per person stay below 2^44
/// steps, sensitivities below 2^58 steps (they fit OpenDP's 64-bit integer
/// maps), and totals fit 128 bits for any number of rows.
const GRID_STEPS: f64 = (1u64 << 30) as f64;

/// Largest magnitude a bound of a summed value may have: beyond it no
/// answer could be told apart from its noise, and the released values
/// (steps × step size) could overflow a double.
const MAX_BOUND: f64 = 1e15;

/// A fixed-point grid for the values of one sum.
///
/// Why it is exact: each row's clamped value v becomes the whole number
/// round(v / unit), a function of that row alone; sums of whole numbers in
/// 128 bits are exact and do not depend on the order of addition, so one
/// person changes a group's sum by at most the person's clamped steps —
/// the sensitivity, counted in steps (which accounts for the rounding: a
/// rounded value lies within [round(low/unit), round(high/unit)]). The
/// released value is the noisy number of steps × unit, post-processing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FixedPoint {
    /// Size of one step: 1, or a power of two.
    pub unit: f64,
    /// The bounds in steps: round(low / unit), round(high / unit).
    pub low: f64,
    pub high: f64,
}

impl FixedPoint {
    /// The grid of a count: whole numbers.
    fn counts() -> Self {
        FixedPoint { unit: 1.0, low: 0.0, high: 1.0 }
    }

    /// The grid of values within `(low, high)`: whole numbers when `whole`
    /// and the bounds are at most `GRID_STEPS`, else the finest power of two
    /// that keeps every value within `GRID_STEPS` steps.
    fn new(r: &Requested, (low, high): (f64, f64), whole: bool) -> Result<Self> {
        let magnitude = low.abs().max(high.abs());
        if !(magnitude <= MAX_BOUND) {
            return Err(DpError::refused_with(
                Rule::MeasureBounds,
                format!(
                    "the bounds [{}, {}] of a summed value are above {MAX_BOUND:e} in magnitude, so the sum could overflow",
                    r.bounds.0, r.bounds.1
                ),
                "clamp the value to narrower bounds: LEAST(GREATEST(x, <low>), <high>)",
            ));
        }
        // The finest grid is 2^-60: below it a value's steps would not fit
        // a double's range.
        let exponent = if magnitude == 0.0 { 0 } else { ((magnitude / GRID_STEPS).log2().ceil() as i32).max(-60) };
        let exponent = if whole { exponent.max(0) } else { exponent };
        let unit = 2f64.powi(exponent);
        Ok(FixedPoint { unit, low: (low / unit).round(), high: (high / unit).round() })
    }

    /// One row's value in steps of the grid, as Int64 (NULL stays NULL).
    fn per_row(&self, value: Expr, (low, high): (f64, f64)) -> Expr {
        if self.unit == 1.0 && low.fract() == 0.0 && high.fract() == 0.0 {
            return clamp(value, low, high, true);
        }
        // Scaling by a power of two is exact; `round` is a function of the row.
        let scaled = clamp(value, low, high, false) * lit(1.0 / self.unit);
        try_cast(datafusion::functions::math::expr_fn::round(vec![scaled]), DataType::Int64)
    }
}

/// `value` (a 128-bit decimal of whole steps) clamped to `[low, high]`.
fn clamp_exact(value: Expr, low: f64, high: f64) -> Expr {
    let decimal = |v: f64| lit(ScalarValue::Decimal128(Some(v as i128), 38, 0));
    let value = try_cast(value, DataType::Decimal128(38, 0));
    when(value.clone().lt(decimal(low)), decimal(low))
        .when(value.clone().gt(decimal(high)), decimal(high))
        .otherwise(value)
        .expect("a CASE with WHEN branches")
}

/// `value` clamped to `[low, high]` as Int64 (`integral`, bounds are whole
/// numbers) or Float64; NULL and values that do not convert become NULL,
/// which no aggregate counts.
fn clamp(value: Expr, low: f64, high: f64, integral: bool) -> Expr {
    let (value, low, high) = if integral {
        (try_cast(value, DataType::Int64), lit(low as i64), lit(high as i64))
    } else {
        (try_cast(value, DataType::Float64), lit(low), lit(high))
    };
    when(value.clone().lt(low.clone()), low)
        .when(value.clone().gt(high.clone()), high)
        .otherwise(value)
        .expect("a CASE with WHEN branches")
}

/// The schema a release table for `query` has: one column per DP aggregate
/// output column, named `c0…`.
pub(crate) fn release_table_schema(query: &DpQuery) -> SchemaRef {
    Arc::new(Schema::new(
        query
            .aggregate_schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| Field::new(format!("c{i}"), f.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ))
}
