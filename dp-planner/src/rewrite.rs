//! Privacy checks and the rewrite of the DP aggregate.
//!
//! This slice accepts one shape:
//!
//! ```text
//! [post-processing: Projection | Filter (HAVING) | Sort | Limit | SubqueryAlias]*
//!   Aggregate  (the DP aggregate: GROUP BY public-domain dimensions)
//!     [Filter: comparisons of dimensions with literals]*
//!       [SubqueryAlias]
//!         TableScan of one protected dataset
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
use datafusion::common::{Column, DFSchemaRef, ExprSchema, ScalarValue, TableReference};
use datafusion::datasource::{provider_as_source, MemTable};
use datafusion::functions_aggregate::expr_fn::{count, sum};
use datafusion::functions_window::expr_fn::row_number;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{
    col, lit, try_cast, when, Aggregate, BinaryExpr, Expr, ExprFunctionExt, LogicalPlan,
    LogicalPlanBuilder, Operator,
};
use rand::RngCore;

use crate::error::{DpError, Result};
use crate::options::ResolvedOptions;
use crate::policy::{ColumnRole, DatasetPolicy, Domain, Policy};
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
}

impl NoDataQuery {
    pub fn output_schema(&self) -> SchemaRef {
        Arc::new(self.plan.schema().as_arrow().clone())
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
    /// values, each with half of the aggregate's ε, clamped to the bounds.
    Avg,
}

/// One noisy column of the DP aggregate.
#[derive(Debug, Clone)]
pub struct DpAggregate {
    pub kind: AggregateKind,
    /// The column's name in the DP aggregate's output.
    pub output_name: String,
    /// L1 sensitivity of this column over all groups.
    pub sensitivity: f64,
    /// This column's share of the query's ε.
    pub epsilon: f64,
    /// The exact column holds whole numbers (counts, sums of an integer
    /// measure with integer bounds): noise it with the discrete Laplace.
    pub integral: bool,
    /// For `AVG`: the L1 sensitivity of the count of values (the exact plan's
    /// `__b<j>` column) and the measure's bounds, to clamp the ratio.
    pub average: Option<(f64, (f64, f64))>,
}

/// One group column with its public domain.
#[derive(Debug, Clone)]
pub struct GroupKey {
    pub name: String,
    pub domain: Domain,
}

/// A checked DP query.
#[derive(Debug)]
pub struct DpQuery {
    /// A fresh random id; the budget charge for this query names it, and the
    /// release step refuses a receipt for any other query.
    pub id: String,
    /// Exact, contribution-bounded aggregates: columns `__g0…` (group keys as
    /// Utf8 or Int64) then `__a0…` (one per [`DpAggregate`]). Never sent to a party.
    pub exact_plan: LogicalPlan,
    pub groups: Vec<GroupKey>,
    pub aggregates: Vec<DpAggregate>,
    /// ε this query costs (pure DP; δ = 0).
    pub epsilon: f64,
    /// The dataset read.
    pub dataset: String,
    /// The privacy options the query was planned with.
    pub options: ResolvedOptions,
    /// The analyst's plan; the DP aggregate in it is replaced by the released
    /// values before the post-processing above it runs.
    pub(crate) original: LogicalPlan,
    pub(crate) aggregate_schema: DFSchemaRef,
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
        let plan = self
            .original
            .clone()
            .transform_up(|node| {
                if matches!(node, LogicalPlan::Aggregate(_)) {
                    Ok(Transformed::yes(substitute.clone()))
                } else {
                    Ok(Transformed::no(node))
                }
            })?
            .data;
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
    let all_scans = table_scans(plan)?;
    let system = all_scans.iter().filter(|t| t.schema() == Some(SYSTEM_SCHEMA)).count();
    if system > 0 && system < all_scans.len() {
        return Err(DpError::refused_with(
            "system_tables_alone",
            "system tables cannot be combined with datasets in one query",
            "query system.budget or system.queries on their own",
        ));
    }
    // Only the party's own system tables, or nothing at all: no protected
    // data is read, so the answer is exact and free.
    if system == all_scans.len() {
        return Ok(PlannedQuery::NoData(NoDataQuery { plan: plan.clone() }));
    }
    let scans: Vec<String> = all_scans.iter().map(|t| t.table().to_string()).collect();
    if scans.len() > 1 {
        return Err(DpError::refused_with(
            "one_dataset_per_query",
            "this version reads one dataset per query; joins, unions and subqueries over several datasets are not supported yet",
            "one aggregate over a single protected dataset",
        ));
    }
    let dataset = policy.dataset(&scans[0]).ok_or_else(|| {
        DpError::refused("unknown_dataset", format!("dataset `{}` is not in the collaboration", scans[0]))
    })?;
    if dataset.privacy_unit.is_none() {
        return Err(DpError::refused(
            "public_dataset",
            format!("queries over the public dataset `{}` are not supported yet", dataset.name),
        ));
    }
    let aggregate = find_dp_aggregate(plan)?;
    let (input_schema, scan_qualifier) = check_aggregate_input(&aggregate.input, dataset)?;
    let groups = check_group_keys(aggregate, dataset, policy)?;
    let kinds = check_aggregates(aggregate, dataset)?;
    rewrite(plan, aggregate, dataset, groups, kinds, options, &input_schema, scan_qualifier)
}

/// Statements other than queries never reach data through the planner.
fn refuse_statements(plan: &LogicalPlan) -> Result<()> {
    match plan {
        LogicalPlan::DescribeTable(_) => Err(DpError::refused_with(
            "describe",
            "DESCRIBE is not supported",
            "the table schemas of the Flight SQL metadata calls (GetTables with include_schema)",
        )),
        LogicalPlan::Analyze(_) => Err(DpError::refused_with(
            "explain_analyze",
            "EXPLAIN ANALYZE would show row counts and timings of protected data",
            "EXPLAIN, which shows the rewritten plan and the privacy cost",
        )),
        LogicalPlan::Dml(_) | LogicalPlan::Ddl(_) | LogicalPlan::Copy(_) => Err(DpError::refused_with(
            "read_only",
            "parties can only run queries; data changes go through the dataset owner's upload",
            "SELECT … GROUP BY …",
        )),
        LogicalPlan::Statement(_) => Err(DpError::refused_with(
            "statement",
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
fn find_dp_aggregate(plan: &LogicalPlan) -> Result<&Aggregate> {
    let mut node = plan;
    loop {
        match node {
            LogicalPlan::Aggregate(aggregate) => return Ok(aggregate),
            LogicalPlan::Projection(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::Sort(_)
            | LogicalPlan::Limit(_)
            | LogicalPlan::SubqueryAlias(_) => {
                if contains_subquery(node) {
                    return Err(DpError::refused(
                        "subquery",
                        "subqueries are not supported yet",
                    ));
                }
                node = node.inputs()[0];
            }
            LogicalPlan::TableScan(_) => {
                return Err(DpError::refused_with(
                    "dp_aggregate_required",
                    "a protected dataset can only be released as an aggregate; this query would return its rows",
                    "SELECT <dimension>, COUNT(*) FROM <dataset> GROUP BY <dimension>",
                ))
            }
            LogicalPlan::Join(_) => {
                return Err(DpError::refused(
                    "join",
                    "joins are not supported yet",
                ))
            }
            LogicalPlan::Window(_) => {
                return Err(DpError::refused_with(
                    "dp_aggregate_required",
                    "window functions over protected rows are not supported yet",
                    "an aggregate with GROUP BY",
                ))
            }
            other => {
                return Err(DpError::refused(
                    "unsupported_shape",
                    format!("`{}` is not supported in DP queries yet", node_name(other)),
                ))
            }
        }
    }
}

fn node_name(plan: &LogicalPlan) -> String {
    plan.display().to_string().split(':').next().unwrap_or("").trim().to_string()
}

fn contains_subquery(node: &LogicalPlan) -> bool {
    let mut found = false;
    for e in node.expressions() {
        let _ = e.apply(|e| {
            if matches!(
                e,
                Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_)
            ) {
                found = true;
                return Ok(TreeNodeRecursion::Stop);
            }
            Ok(TreeNodeRecursion::Continue)
        });
    }
    found
}

/// Below the DP aggregate only filters on dimensions, an alias and the scan.
/// Returns the input schema and the qualifier under which the dataset's
/// columns appear.
fn check_aggregate_input(
    input: &LogicalPlan,
    dataset: &DatasetPolicy,
) -> Result<(DFSchemaRef, TableReference)> {
    let mut node = input;
    loop {
        match node {
            LogicalPlan::Filter(filter) => {
                check_predicate(&filter.predicate, filter.input.schema(), dataset)?;
                node = &filter.input;
            }
            LogicalPlan::SubqueryAlias(alias) => {
                if matches!(alias.input.as_ref(), LogicalPlan::TableScan(_)) {
                    return Ok((input.schema().clone(), alias.alias.clone()));
                }
                node = &alias.input;
            }
            LogicalPlan::TableScan(scan) => {
                if !scan.filters.is_empty() || scan.fetch.is_some() {
                    return Err(DpError::refused("unsupported_shape", "pre-filtered scans are not supported"));
                }
                return Ok((input.schema().clone(), scan.table_name.clone()));
            }
            LogicalPlan::Limit(_) => {
                return Err(DpError::refused_with(
                    "limit_below_dp_aggregate",
                    "LIMIT below the DP aggregate would make the answer depend on which rows come first",
                    "LIMIT on the aggregated result",
                ))
            }
            LogicalPlan::Join(_) => return Err(DpError::refused("join", "joins are not supported yet")),
            LogicalPlan::Projection(_) | LogicalPlan::Aggregate(_) | LogicalPlan::Window(_) => {
                return Err(DpError::refused(
                    "subquery",
                    "derived tables, nested aggregates and expressions computed before the DP aggregate are not supported yet",
                ))
            }
            other => {
                return Err(DpError::refused(
                    "unsupported_shape",
                    format!("`{}` below the DP aggregate is not supported yet", node_name(other)),
                ))
            }
        }
    }
}

/// The role of a column referenced by `expr`, refusing hidden columns.
fn column_role(column: &Column, dataset: &DatasetPolicy) -> Result<ColumnRole> {
    let role = dataset.role(&column.name);
    if role == ColumnRole::Hidden {
        return Err(DpError::refused(
            "hidden_column",
            format!(
                "column `{}` of `{}` is hidden by the collaboration manifest and cannot be used in any query",
                column.name, dataset.name
            ),
        ));
    }
    Ok(role)
}

/// WHERE may compare dimensions with literals. Comparing with a literal of
/// another type family is refused: the implicit cast could fail at run time on
/// some values, and whether a query fails must never depend on the data.
fn check_predicate(expr: &Expr, schema: &DFSchemaRef, dataset: &DatasetPolicy) -> Result<()> {
    let refuse = |what: String| {
        DpError::refused_with(
            "filter_on_dimensions",
            format!("WHERE may only compare dimension columns with literals; {what}"),
            "comparisons (=, <>, <, <=, >, >=, IN, BETWEEN, IS NULL) of a dimension with literals, combined with AND, OR, NOT",
        )
    };
    let dimension = |e: &Expr| -> Result<DataType> {
        let Expr::Column(c) = e else {
            return Err(refuse(format!("`{e}` is not a column")));
        };
        match column_role(c, dataset)? {
            ColumnRole::Dimension { .. } => Ok(schema.field_from_column(c)?.data_type().clone()),
            ColumnRole::JoinKey => Err(refuse(format!("`{}` is the privacy unit or a join key", c.name))),
            _ => Err(refuse(format!("`{}` is a measure", c.name))),
        }
    };
    let literal = |e: &Expr, column_type: &DataType| -> Result<()> {
        match e {
            Expr::Literal(value, _) if value.is_null() || same_family(column_type, &value.data_type()) => Ok(()),
            Expr::Literal(value, _) => Err(refuse(format!(
                "the literal {value} is of type {} but the column is {column_type}",
                value.data_type()
            ))),
            other => Err(refuse(format!("`{other}` is not a literal"))),
        }
    };
    match expr {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
            Operator::And | Operator::Or => {
                check_predicate(left, schema, dataset)?;
                check_predicate(right, schema, dataset)
            }
            Operator::Eq | Operator::NotEq | Operator::Lt | Operator::LtEq | Operator::Gt | Operator::GtEq => {
                if matches!(left.as_ref(), Expr::Column(_)) {
                    let t = dimension(left)?;
                    literal(right, &t)
                } else {
                    let t = dimension(right)?;
                    literal(left, &t)
                }
            }
            other => Err(refuse(format!("operator `{other}` is not allowed"))),
        },
        Expr::Not(inner) => check_predicate(inner, schema, dataset),
        Expr::IsNull(inner) | Expr::IsNotNull(inner) => dimension(inner).map(|_| ()),
        Expr::InList(list) => {
            let t = dimension(&list.expr)?;
            list.list.iter().try_for_each(|e| literal(e, &t))
        }
        Expr::Between(between) => {
            let t = dimension(&between.expr)?;
            literal(&between.low, &t)?;
            literal(&between.high, &t)
        }
        Expr::Literal(ScalarValue::Boolean(_), _) => Ok(()),
        other => Err(refuse(format!("`{other}` is not allowed"))),
    }
}

fn same_family(a: &DataType, b: &DataType) -> bool {
    let family = |t: &DataType| match t {
        t if t.is_numeric() => 1,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => 2,
        DataType::Dictionary(_, v) if matches!(v.as_ref(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) => 2,
        DataType::Boolean => 3,
        _ => 0,
    };
    family(a) != 0 && family(a) == family(b)
}

fn check_group_keys(
    aggregate: &Aggregate,
    dataset: &DatasetPolicy,
    policy: &Policy,
) -> Result<Vec<(Column, GroupKey)>> {
    let mut keys = Vec::new();
    let mut cells: usize = 1;
    for expr in &aggregate.group_expr {
        let Expr::Column(column) = expr else {
            return Err(DpError::refused_with(
                "group_by_columns",
                format!("GROUP BY `{expr}` is not a plain column"),
                "GROUP BY dimension columns that have a public domain in the manifest",
            ));
        };
        let domain = match column_role(column, dataset)? {
            ColumnRole::Dimension { domain: Some(domain) } => domain,
            ColumnRole::Dimension { domain: None } => {
                return Err(DpError::refused_with(
                    "group_key_public_domain",
                    format!(
                        "GROUP BY `{}`: the column has no public domain in the manifest, and DP partition selection is not supported yet",
                        column.name
                    ),
                    "GROUP BY dimensions whose manifest entry lists a domain",
                ))
            }
            ColumnRole::JoinKey => {
                return Err(DpError::refused_with(
                    "privacy_unit_in_output",
                    format!("GROUP BY `{}` would release one row per person or join key", column.name),
                    "COUNT(DISTINCT <privacy unit>) to count people",
                ))
            }
            _ => {
                return Err(DpError::refused_with(
                    "group_key_public_domain",
                    format!("GROUP BY `{}`: measures cannot be group keys", column.name),
                    "GROUP BY dimensions whose manifest entry lists a domain",
                ))
            }
        };
        cells = cells.saturating_mul(domain.len());
        keys.push((column.clone(), GroupKey { name: column.name.clone(), domain }));
    }
    if cells > policy.defaults.max_output_groups {
        return Err(DpError::refused_with(
            "max_output_groups",
            format!(
                "the group keys' public domains have {cells} combinations, above the collaboration's limit of {}",
                policy.defaults.max_output_groups
            ),
            "fewer or coarser group keys",
        ));
    }
    Ok(keys)
}

/// An aggregate of the DP aggregate with what it reads.
struct Requested {
    kind: AggregateKind,
    column: Option<Column>,
    bounds: (f64, f64),
}

fn check_aggregates(aggregate: &Aggregate, dataset: &DatasetPolicy) -> Result<Vec<Requested>> {
    if aggregate.aggr_expr.is_empty() {
        return Err(DpError::refused_with(
            "dp_aggregate_required",
            "GROUP BY without an aggregate would release the group keys present in the data",
            "add COUNT(*), COUNT(DISTINCT <privacy unit>) or SUM(<measure>)",
        ));
    }
    let unit = dataset.privacy_unit.as_deref().unwrap_or_default();
    let allowed = "COUNT(*), COUNT(<column>), COUNT(DISTINCT <privacy unit>), SUM(<measure>), AVG(<measure>)";
    aggregate
        .aggr_expr
        .iter()
        .map(|expr| {
            let Expr::AggregateFunction(AggregateFunction { func, params }) = expr.clone().unalias() else {
                return Err(DpError::refused_with("supported_aggregates", format!("`{expr}` is not an aggregate function"), allowed));
            };
            if params.filter.is_some() || !params.order_by.is_empty() {
                return Err(DpError::refused_with("supported_aggregates", format!("`{expr}`: FILTER and ORDER BY inside aggregates are not supported yet"), allowed));
            }
            let name = func.name().to_ascii_lowercase();
            if params.args.len() > 1 {
                return Err(DpError::refused_with("supported_aggregates", format!("`{expr}`: aggregates of several arguments are not supported"), allowed));
            }
            let arg = params.args.first();
            match (name.as_str(), arg, params.distinct) {
                ("count", None, false) => {
                    Ok(Requested { kind: AggregateKind::CountRows, column: None, bounds: (0.0, 0.0) })
                }
                ("count", Some(Expr::Literal(value, _)), false) if !value.is_null() => {
                    Ok(Requested { kind: AggregateKind::CountRows, column: None, bounds: (0.0, 0.0) })
                }
                ("count", Some(Expr::Column(c)), true) => {
                    column_role(c, dataset)?;
                    if c.name == unit {
                        Ok(Requested { kind: AggregateKind::CountPeople, column: Some(c.clone()), bounds: (0.0, 0.0) })
                    } else {
                        Err(DpError::refused_with("supported_aggregates", format!("`{expr}`: COUNT(DISTINCT) is only supported on the privacy unit `{unit}`"), allowed))
                    }
                }
                ("count", Some(Expr::Column(c)), false) => match column_role(c, dataset)? {
                    ColumnRole::JoinKey if c.name == unit => Ok(Requested { kind: AggregateKind::CountRows, column: None, bounds: (0.0, 0.0) }),
                    _ => Ok(Requested { kind: AggregateKind::CountValues, column: Some(c.clone()), bounds: (0.0, 0.0) }),
                },
                ("avg", Some(Expr::Column(c)), false) => match column_role(c, dataset)? {
                    ColumnRole::Measure { lower, upper } => Ok(Requested { kind: AggregateKind::Avg, column: Some(c.clone()), bounds: (lower, upper) }),
                    _ => Err(DpError::refused_with("sum_of_measure", format!("`{expr}`: only columns declared as measures (with bounds) can be averaged"), "AVG(<measure column>)")),
                },
                ("sum", Some(Expr::Column(c)), false) => match column_role(c, dataset)? {
                    ColumnRole::Measure { lower, upper } => Ok(Requested { kind: AggregateKind::Sum, column: Some(c.clone()), bounds: (lower, upper) }),
                    _ => Err(DpError::refused_with("sum_of_measure", format!("`{expr}`: only columns declared as measures (with bounds) can be summed"), "SUM(<measure column>)")),
                },
                _ => Err(DpError::refused_with("supported_aggregates", format!("`{expr}` is not supported yet"), allowed)),
            }
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn rewrite(
    original: &LogicalPlan,
    aggregate: &Aggregate,
    dataset: &DatasetPolicy,
    groups: Vec<(Column, GroupKey)>,
    requested: Vec<Requested>,
    options: &ResolvedOptions,
    input_schema: &DFSchemaRef,
    qualifier: TableReference,
) -> Result<PlannedQuery> {
    let unit_name = dataset.privacy_unit.clone().unwrap_or_default();
    if let Some(asked) = &options.privacy_unit_column {
        if !asked.eq_ignore_ascii_case(&unit_name) {
            return Err(DpError::refused_with(
                "privacy_unit",
                format!(
                    "privacy_unit_column = {asked}: the privacy unit of `{}` is `{unit_name}`, set by the collaboration manifest",
                    dataset.name
                ),
                format!("privacy_unit_column = {unit_name}, or leave the option out"),
            ));
        }
    }
    if input_schema.field_with_unqualified_name(&unit_name).is_err() {
        return Err(DpError::refused("privacy_unit", format!("dataset `{}` has no privacy-unit column `{unit_name}`", dataset.name)));
    }
    let unit = col(Column::new(Some(qualifier), unit_name));
    let per_group_rows = options.max_contributions_per_group as f64;
    // A person can reach no more groups than the domain has cells.
    let cells = groups.iter().fold(1usize, |n, (_, g)| n.saturating_mul(g.domain.len()));
    let k = (options.max_groups_contributed as usize).min(cells.max(1)) as f64;

    // Every cast below is a TRY_CAST: a value that does not convert becomes
    // NULL instead of failing the query, so whether a query fails never
    // depends on the data.
    //
    // Rows without a person are dropped (a NULL identifier would lump several
    // people into one "person" and break the contribution bound), and so are
    // rows whose group key is outside the public domain (they could never be
    // released, and would use up a person's `max_groups_contributed`).
    let mut keep = unit.clone().is_not_null();
    let mut group_by = vec![unit.alias("__uid")];
    let mut group_cols = Vec::new();
    for (i, (column, key)) in groups.iter().enumerate() {
        let (as_type, in_domain): (DataType, Box<dyn Fn(Expr) -> Expr>) = match &key.domain {
            Domain::Strings(values) => {
                let values: Vec<Expr> = values.iter().map(|v| lit(v.as_str())).collect();
                (DataType::Utf8, Box::new(move |e: Expr| e.in_list(values.clone(), false)))
            }
            Domain::IntRange { min, max } => {
                let (min, max) = (*min, *max);
                (DataType::Int64, Box::new(move |e: Expr| e.between(lit(min), lit(max))))
            }
        };
        let key_expr = try_cast(col(column.clone()), as_type);
        keep = keep.and(in_domain(key_expr.clone()));
        group_by.push(key_expr.alias(format!("__g{i}")));
        group_cols.push(col(format!("__g{i}")));
    }

    // 1. Per person and group: partial aggregates. Integer measures with
    // integer bounds are clamped and summed as Int64, so the sums are exact;
    // other measures as Float64.
    let mut partials = Vec::new();
    let mut integral = Vec::new();
    for (j, r) in requested.iter().enumerate() {
        let name = format!("__p{j}");
        let field_type = aggregate.schema.field(groups.len() + j).data_type().clone();
        let whole = match r.kind {
            AggregateKind::Sum => field_type.is_integer() && r.bounds.0.fract() == 0.0 && r.bounds.1.fract() == 0.0,
            AggregateKind::Avg => false,
            _ => true,
        };
        integral.push(whole);
        match r.kind {
            AggregateKind::CountRows => partials.push(count(lit(1i64)).alias(name)),
            AggregateKind::CountValues => partials.push(count(col(r.column.clone().unwrap())).alias(name)),
            AggregateKind::CountPeople => {}
            AggregateKind::Sum => {
                let value = col(r.column.clone().unwrap());
                partials.push(sum(clamp(value, r.bounds.0, r.bounds.1, whole)).alias(name));
            }
            AggregateKind::Avg => {
                let value = col(r.column.clone().unwrap());
                partials.push(sum(clamp(value.clone(), r.bounds.0, r.bounds.1, false)).alias(name));
                partials.push(count(value).alias(format!("__q{j}")));
            }
        }
    }
    let builder = LogicalPlanBuilder::from(aggregate.input.as_ref().clone())
        .filter(keep)?
        .aggregate(group_by, partials)?;

    // Each partial bounded to what `max_contributions_per_group` rows give.
    let salt = rand::rngs::OsRng.next_u64() as i64;
    let mut key_args = vec![lit(salt), col("__uid")];
    key_args.extend(group_cols.iter().cloned());
    let key_fn = datafusion::logical_expr::ScalarUDF::new_from_impl(ContributionKey::new());
    let mut bounded = vec![col("__uid")];
    bounded.extend(group_cols.iter().cloned());
    let mut aggregates = Vec::new();
    let mut finals = Vec::new();
    let share = options.epsilon / requested.len() as f64;
    for (j, r) in requested.iter().enumerate() {
        let p = col(format!("__p{j}"));
        let (partial, per_group, final_expr) = match r.kind {
            AggregateKind::CountRows | AggregateKind::CountValues => (
                Some(clamp(p, 0.0, per_group_rows, true)),
                per_group_rows,
                sum(col(format!("__p{j}"))),
            ),
            AggregateKind::CountPeople => (None, 1.0, count(lit(1i64))),
            AggregateKind::Sum | AggregateKind::Avg => {
                let low = per_group_rows * r.bounds.0.min(0.0);
                let high = per_group_rows * r.bounds.1.max(0.0);
                (Some(clamp(p, low, high, integral[j])), low.abs().max(high.abs()), sum(col(format!("__p{j}"))))
            }
        };
        if r.kind == AggregateKind::Avg {
            // The denominator: values counted per person and group, at most
            // `max_contributions_per_group`.
            bounded.push(clamp(col(format!("__q{j}")), 0.0, per_group_rows, true).alias(format!("__q{j}")));
            finals.push(sum(col(format!("__q{j}"))).alias(format!("__b{j}")));
        }
        if let Some(partial) = partial {
            bounded.push(partial.alias(format!("__p{j}")));
        }
        finals.push(final_expr.alias(format!("__a{j}")));
        let field = aggregate.schema.field(groups.len() + j);
        aggregates.push(DpAggregate {
            kind: r.kind,
            output_name: field.name().clone(),
            // A person reaches at most k groups, changing each by at most `per_group`.
            sensitivity: k * per_group,
            epsilon: share,
            integral: integral[j],
            average: (r.kind == AggregateKind::Avg).then_some((k * per_group_rows, r.bounds)),
        });
    }
    // 2. At most k groups per person, the ones with the smallest keyed hash.
    // Rows outside the public domain were dropped above, so a person reaches
    // at most `cells` groups: when k covers them all, nothing needs dropping
    // and the (costly) ranking is skipped.
    let builder = if (options.max_groups_contributed as usize) < cells {
        bounded.push(key_fn.call(key_args).alias("__key"));
        let rank = row_number()
            .partition_by(vec![col("__uid")])
            .order_by(vec![col("__key").sort(true, false)])
            .build()?
            .alias("__rank");
        builder
            .project(bounded)?
            .window(vec![rank])?
            .filter(col("__rank").lt_eq(lit(options.max_groups_contributed as u64)))?
    } else {
        builder.project(bounded)?
    };
    // 3. Sum the partials per group.
    let exact_plan = builder.aggregate(group_cols, finals)?.build()?;

    let mut id = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut id);
    Ok(PlannedQuery::Dp(Box::new(DpQuery {
        id: hex::encode(id),
        exact_plan,
        groups: groups.into_iter().map(|(_, g)| g).collect(),
        aggregates,
        epsilon: options.epsilon,
        dataset: dataset.name.clone(),
        options: options.clone(),
        original: original.clone(),
        aggregate_schema: aggregate.schema.clone(),
    })))
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
