//! Privacy-unit tracking: what every column below the DP aggregate is, and
//! whether every row still belongs to exactly one person.
//!
//! [`track`] walks the analyst's logical plan below the DP aggregate, bottom
//! up, and gives each node's output either *protected* (every row belongs to
//! one person, whose id is in a column of lineage [`Lineage::Unit`]) or
//! *public* (derived from public datasets only), plus a [`Lineage`] per output
//! column. Anything it cannot track is refused with the rule it breaks.
//!
//! Why this keeps the DP guarantee: neighbouring databases differ in all rows
//! of one person, across every dataset. Each rule below keeps the invariant
//! "an output row depends only on the input rows of the person in its unit
//! column (and on public data)":
//! - a scan of a protected dataset: by definition, its unit column;
//! - filters, projections, sorts, `DISTINCT` work row by row;
//! - an inner join of two protected inputs equates their unit columns, so a
//!   joined row pairs two rows of the same person; a left/right join keeps the
//!   preserved side's person; semi/anti joins on the unit only filter a
//!   person's rows by that person's other rows;
//! - a join with a public input pairs a person's row with public rows;
//! - an aggregate or window grouped/partitioned by the unit computes within
//!   one person's rows;
//! - `UNION ALL` of protected inputs keeps each row's person.
//!
//! So removing a person changes only the rows carrying that person's id, and
//! the DP aggregate's contribution bounding ([`crate::rewrite`]) limits how
//! much those rows can change the released values.
//!
//! The same walk keeps every query *total*: whether a query fails must never
//! depend on the data, so expressions that could fail on some value
//! (integer division by a column, functions outside an allow-list) are
//! refused; casts are made `TRY_CAST` by [`make_total`].

use datafusion::common::tree_node::{Transformed, TreeNode};
use std::sync::Arc;

use datafusion::common::{Column, DFSchema, ScalarValue};
use datafusion::logical_expr::expr::{AggregateFunction, WindowFunction};
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    BinaryExpr, Distinct, Expr, ExprSchemable, JoinType, LogicalPlan, Operator, Projection, TryCast,
};

use crate::error::{DpError, Result, Rule};
use crate::policy::{ColumnRole, Domain, Policy};

/// What a column holds, as far as privacy is concerned.
#[derive(Debug, Clone, PartialEq)]
pub enum Lineage {
    /// The person the row belongs to (the privacy unit); never NULL on rows
    /// the DP aggregate keeps.
    Unit,
    /// The row's person or NULL (the unit of the optional side of an outer join).
    UnitOrNull,
    /// Another join key (or an identifier of the manifest's `join_key` role):
    /// it may be joined on, partitioned by and counted, never released or
    /// computed with.
    Key,
    /// A dimension value, with the public domain of its values if it has
    /// one, and the most values of it one person has, as the manifest
    /// declares (`groups_per_person`; counted in the domain's values, days
    /// for a day range). A function of one dimension value has at most as
    /// many values per person as its argument. Only the default of
    /// `max_groups_contributed` is derived from it: the bound is enforced
    /// whatever it says.
    Dimension(Option<Domain>, Option<u32>),
    /// A number within `[lo, hi]` (either end may be infinite).
    Number { lo: f64, hi: f64 },
    /// Any other value (a boolean, a string with no declared domain…).
    Other,
    /// A column the manifest hides: no expression may read it.
    Hidden { dataset: String, column: String },
}

impl Lineage {
    fn unbounded() -> Self {
        Lineage::Number { lo: f64::NEG_INFINITY, hi: f64::INFINITY }
    }

    /// Finite bounds, if the value is a number known to lie within them.
    pub fn bounds(&self) -> Option<(f64, f64)> {
        match self {
            Lineage::Number { lo, hi } if lo.is_finite() && hi.is_finite() => Some((*lo, *hi)),
            _ => None,
        }
    }

    fn is_identifier(&self) -> bool {
        matches!(self, Lineage::Unit | Lineage::UnitOrNull | Lineage::Key)
    }
}

/// The tracked output of a plan node.
#[derive(Debug, Clone)]
pub struct Tracked {
    /// Every row belongs to one person (false: the rows are public).
    pub protected: bool,
    /// One lineage per output column, in schema order.
    pub columns: Vec<Lineage>,
    /// At most this many rows belong to one person, when that is known from
    /// the plan's shape (an aggregate grouped by the unit alone gives one).
    pub rows_per_person: Option<u64>,
    /// A person has at most one row per combination of values of these
    /// output columns, when known (after `GROUP BY uid, a, b`: the columns
    /// of `a` and `b`). A DP aggregate grouped by all of them gets at most
    /// one row per person and group.
    pub unique_by: Option<Vec<usize>>,
}

impl Tracked {
    /// The first column holding the row's person.
    pub fn unit_index(&self) -> Option<usize> {
        self.columns.iter().position(|l| *l == Lineage::Unit)
    }
}

fn refuse(rule: Rule, message: impl Into<String>, instead: impl Into<String>) -> DpError {
    DpError::refused_with(rule, message, instead)
}

/// Replace every `CAST` by `TRY_CAST`: a value that does not convert becomes
/// NULL instead of failing the query, so no query fails because of a value.
pub fn make_total(plan: LogicalPlan) -> Result<LogicalPlan> {
    Ok(plan
        .transform_up_with_subqueries(|node| {
            node.map_expressions(|e| {
                e.transform_up(|e| match e {
                    Expr::Cast(c) => Ok(Transformed::yes(Expr::TryCast(TryCast::new_from_field(c.expr, c.field)))),
                    other => Ok(Transformed::no(other)),
                })
            })
        })?
        .data)
}

/// Carry the privacy unit through projections that leave it out: BI tools
/// and analysts write `SELECT channel, COUNT(*) FROM (SELECT channel FROM
/// impressions) GROUP BY channel`, where the subquery drops `uid`. Every
/// projection below the DP aggregate whose input is protected but whose
/// output has no unit column gets its input's unit column appended (under
/// its own name), so the DP aggregate can still bound each person's rows.
/// The analyst's columns are unchanged; the extra column is only read by the
/// rewrite.
///
/// Why this is sound: appending a column to a projection changes no row's
/// other values and no row count, and the appended value is the row's own
/// person, so the tracking invariant holds as if the analyst had kept it.
/// The one place where a dropped unit changes meaning is `DISTINCT` (of
/// `SELECT DISTINCT`, `UNION`, `INTERSECT`, `EXCEPT`: distinct values across
/// people, not per person): nothing under it is changed, and the DP
/// aggregate above it is refused by the `privacy_unit` rule.
pub fn carry_unit(plan: LogicalPlan, policy: &Policy) -> Result<LogicalPlan> {
    let plan = match plan {
        // Under DISTINCT (also the one of UNION, INTERSECT, EXCEPT) nothing is
        // carried at any depth: an added column would change which rows are
        // duplicates.
        LogicalPlan::Distinct(_) => return Ok(plan),
        LogicalPlan::Projection(p) => {
            let input = carry_unit(Arc::unwrap_or_clone(p.input), policy)?;
            // Tracking errors are left for the main walk to report (in its
            // own order); here they only mean "nothing to carry".
            let below = track(&input, policy).ok();
            let projection = Projection::try_new(p.expr, Arc::new(input))?;
            let Some(unit) = below.filter(|b| b.protected).and_then(|b| b.unit_index()) else {
                return Ok(LogicalPlan::Projection(projection));
            };
            match track(&LogicalPlan::Projection(projection.clone()), policy) {
                Ok(here) if here.unit_index().is_none() => {}
                _ => return Ok(LogicalPlan::Projection(projection)),
            }
            let column = Column::from(projection.input.schema().qualified_field(unit));
            if projection.schema.fields().iter().any(|f| f.name() == &column.name) {
                return Err(refuse(
                    Rule::PrivacyUnit,
                    format!("a subquery leaves out the privacy unit but names another column `{}`", column.name),
                    format!("keep `{}` in the subquery's SELECT list, or name the other column differently", column.name),
                ));
            }
            let mut expr = projection.expr;
            expr.push(Expr::Column(column));
            return Ok(LogicalPlan::Projection(Projection::try_new(expr, projection.input)?));
        }
        // Only the shapes `track` accepts are rebuilt; anything else is
        // returned as written, for `track` to refuse.
        other @ (LogicalPlan::Filter(_)
        | LogicalPlan::Sort(_)
        | LogicalPlan::SubqueryAlias(_)
        | LogicalPlan::Join(_)
        | LogicalPlan::Aggregate(_)
        | LogicalPlan::Window(_)
        | LogicalPlan::Union(_)) => other,
        other => return Ok(other),
    };
    let inputs: Vec<LogicalPlan> = plan
        .inputs()
        .into_iter()
        .map(|child| carry_unit(child.clone(), policy))
        .collect::<Result<_>>()?;
    if inputs.is_empty() {
        return Ok(plan);
    }
    // Rebuilt over the carried inputs, with schemas recomputed.
    Ok(plan.with_new_exprs(plan.expressions(), inputs)?)
}

/// Track `plan`, the input of the DP aggregate (or any node below it).
pub fn track(plan: &LogicalPlan, policy: &Policy) -> Result<Tracked> {
    match plan {
        LogicalPlan::TableScan(scan) => {
            if !scan.filters.is_empty() || scan.fetch.is_some() {
                return Err(DpError::refused(Rule::UnsupportedShape, "pre-filtered scans are not supported"));
            }
            let name = scan.table_name.table();
            let dataset = policy.dataset(name).ok_or_else(|| {
                DpError::refused(Rule::UnknownDataset, format!("dataset `{name}` is not in the collaboration"))
            })?;
            let unit = dataset.privacy_unit.as_deref();
            let columns: Vec<Lineage> = scan
                .projected_schema
                .fields()
                .iter()
                .map(|f| {
                    if Some(f.name().as_str()) == unit {
                        return Lineage::Unit;
                    }
                    match dataset.role(f.name()) {
                        ColumnRole::JoinKey => Lineage::Key,
                        // A public dataset has no people to count values of.
                        ColumnRole::Dimension { domain, groups_per_person } => {
                            Lineage::Dimension(domain, groups_per_person.filter(|_| unit.is_some()))
                        }
                        ColumnRole::Measure { lower, upper } => Lineage::Number { lo: lower, hi: upper },
                        ColumnRole::Hidden => Lineage::Hidden { dataset: dataset.name.clone(), column: f.name().clone() },
                    }
                })
                .collect();
            let protected = unit.is_some();
            if protected && !columns.contains(&Lineage::Unit) {
                return Err(DpError::refused(
                    Rule::PrivacyUnit,
                    format!("dataset `{}` has no privacy-unit column `{}`", dataset.name, unit.unwrap_or_default()),
                ));
            }
            Ok(Tracked { protected, columns, rows_per_person: None, unique_by: None })
        }
        LogicalPlan::Filter(filter) => {
            let input = track(&filter.input, policy)?;
            lineage(&filter.predicate, filter.input.schema(), &input.columns)?;
            Ok(input)
        }
        LogicalPlan::Projection(projection) => {
            let input = track(&projection.input, policy)?;
            let columns = projection
                .expr
                .iter()
                .map(|e| lineage(e, projection.input.schema(), &input.columns))
                .collect::<Result<Vec<_>>>()?;
            // Uniqueness survives only if every column it names is passed
            // through unchanged.
            let unique_by = input.unique_by.as_ref().and_then(|by| {
                by.iter()
                    .map(|&i| {
                        let wanted = Column::from(projection.input.schema().qualified_field(i));
                        projection.expr.iter().position(|e| matches!(e.clone().unalias(), Expr::Column(c) if c == wanted))
                    })
                    .collect::<Option<Vec<usize>>>()
            });
            Ok(Tracked { columns, unique_by, ..input })
        }
        LogicalPlan::SubqueryAlias(alias) => track(&alias.input, policy),
        LogicalPlan::Sort(sort) => {
            if sort.fetch.is_some() {
                return Err(limit_below());
            }
            let input = track(&sort.input, policy)?;
            for s in &sort.expr {
                lineage(&s.expr, sort.input.schema(), &input.columns)?;
            }
            Ok(input)
        }
        LogicalPlan::Limit(_) => Err(limit_below()),
        LogicalPlan::Distinct(Distinct::All(input)) => track(input, policy),
        LogicalPlan::Join(join) => track_join(join, policy),
        LogicalPlan::Aggregate(aggregate) => {
            let input = track(&aggregate.input, policy)?;
            let schema = aggregate.input.schema();
            let mut columns = Vec::new();
            let mut by_unit = false;
            refuse_grouping_sets(&aggregate.group_expr)?;
            for g in &aggregate.group_expr {
                let l = lineage(g, schema, &input.columns)?;
                by_unit |= l == Lineage::Unit && matches!(g, Expr::Column(_));
                columns.push(l);
            }
            if input.protected && !by_unit {
                // Only the DP aggregate may mix people; it is the outermost one.
                return Err(refuse(
                    Rule::NestedAggregate,
                    "an aggregate below the DP aggregate must be grouped by the privacy unit (one person at a time)",
                    "GROUP BY uid in the inner query, or move this aggregate to the outermost query",
                ));
            }
            for a in &aggregate.aggr_expr {
                columns.push(aggregate_lineage(a, schema, &input.columns, "aggregate")?);
            }
            let only_unit = aggregate.group_expr.len() == 1;
            let rows_per_person = if only_unit { Some(1) } else { input.rows_per_person };
            // One output row per person and combination of the other keys.
            let unique_by = input.protected.then(|| {
                (0..aggregate.group_expr.len()).filter(|&i| columns[i] != Lineage::Unit).collect()
            });
            Ok(Tracked { protected: input.protected, columns, rows_per_person, unique_by })
        }
        LogicalPlan::Window(window) => {
            let input = track(&window.input, policy)?;
            let schema = window.input.schema();
            let mut columns = input.columns.clone();
            for w in &window.window_expr {
                let mut inner = w;
                while let Expr::Alias(a) = inner {
                    inner = &a.expr;
                }
                let Expr::WindowFunction(f) = inner else {
                    return Err(DpError::refused(Rule::UnsupportedShape, format!("`{w}` is not a window function")));
                };
                let WindowFunction { fun, params } = f.as_ref();
                let mut partitioned = false;
                for p in &params.partition_by {
                    let l = lineage(p, schema, &input.columns)?;
                    partitioned |= l == Lineage::Unit && matches!(p, Expr::Column(_));
                }
                if input.protected && !partitioned {
                    return Err(refuse(
                        Rule::WindowPartition,
                        format!("the window of `{}` must be partitioned by the privacy unit", fun.name()),
                        "OVER (PARTITION BY uid …), so the window looks at one person's rows",
                    ));
                }
                for s in &params.order_by {
                    lineage(&s.expr, schema, &input.columns)?;
                }
                if let Some(filter) = &params.filter {
                    lineage(filter, schema, &input.columns)?;
                }
                check_window_frame(w, &params.window_frame)?;
                let name = fun.name().to_ascii_lowercase();
                check_aggregate_arguments(w, &name, &params.args, schema)?;
                let args = params
                    .args
                    .iter()
                    .map(|a| lineage(a, schema, &input.columns))
                    .collect::<Result<Vec<_>>>()?;
                // A window function of the unit can be NULL (a frame that
                // holds no row, LAG on the first row): never a key that may
                // group or partition.
                columns.push(match function_lineage(&name, &args, "window")? {
                    Lineage::Unit => Lineage::UnitOrNull,
                    other => other,
                });
            }
            Ok(Tracked { columns, ..input })
        }
        LogicalPlan::Union(union) => {
            let inputs = union.inputs.iter().map(|i| track(i, policy)).collect::<Result<Vec<_>>>()?;
            let protected = inputs.iter().filter(|t| t.protected).count();
            if protected > 0 && protected < inputs.len() {
                return Err(refuse(
                    Rule::UnionOfProtectedAndPublic,
                    "a UNION of protected and public rows would mix rows that belong to no one with people's rows",
                    "UNION ALL of protected inputs only",
                ));
            }
            let mut columns = inputs[0].columns.clone();
            for t in &inputs[1..] {
                columns = columns.iter().zip(&t.columns).map(|(a, b)| merge(a, b)).collect();
            }
            if protected > 0 && !columns.contains(&Lineage::Unit) {
                return Err(refuse(
                    Rule::UnionPrivacyUnit,
                    "every input of a UNION must have its privacy unit in the same column",
                    "SELECT uid, … FROM a UNION ALL SELECT uid, … FROM b",
                ));
            }
            let rows_per_person = inputs
                .iter()
                .try_fold(0u64, |n, t| t.rows_per_person.and_then(|r| n.checked_add(r)));
            Ok(Tracked { protected: protected > 0, columns, rows_per_person, unique_by: None })
        }
        LogicalPlan::EmptyRelation(_) | LogicalPlan::Values(_) => Ok(Tracked {
            protected: false,
            columns: vec![Lineage::Other; plan.schema().fields().len()],
            rows_per_person: None,
            unique_by: None,
        }),
        other => Err(DpError::refused(
            Rule::UnsupportedShape,
            format!("`{}` is not supported below the DP aggregate", node_name(other)),
        )),
    }
}

/// A `RANGE` frame with an offset (`RANGE BETWEEN INTERVAL '1 day'
/// PRECEDING …`) adds the offset to each row's ORDER BY value, which fails
/// near the ends of the value's range: only `UNBOUNDED` and `CURRENT ROW`
/// bounds are allowed in `RANGE` frames (`ROWS` and `GROUPS` frames count
/// rows and cannot fail).
fn check_window_frame(w: &Expr, frame: &datafusion::logical_expr::WindowFrame) -> Result<()> {
    use datafusion::logical_expr::{WindowFrameBound, WindowFrameUnits};
    if frame.units != WindowFrameUnits::Range {
        return Ok(());
    }
    let plain = |b: &WindowFrameBound| match b {
        WindowFrameBound::CurrentRow => true,
        WindowFrameBound::Preceding(v) | WindowFrameBound::Following(v) => v.is_null(),
    };
    if plain(&frame.start_bound) && plain(&frame.end_bound) {
        return Ok(());
    }
    Err(refuse(
        Rule::WindowFrame,
        format!("`{w}`: a RANGE frame with an offset is not supported"),
        "ROWS BETWEEN n PRECEDING AND CURRENT ROW, or RANGE with UNBOUNDED / CURRENT ROW bounds",
    ))
}

pub(crate) fn node_name(plan: &LogicalPlan) -> String {
    plan.display().to_string().split(':').next().unwrap_or("").trim().to_string()
}

fn limit_below() -> DpError {
    refuse(
        Rule::LimitBelowDpAggregate,
        "LIMIT below the DP aggregate would make the answer depend on which rows come first",
        "LIMIT on the aggregated result",
    )
}

fn track_join(join: &datafusion::logical_expr::Join, policy: &Policy) -> Result<Tracked> {
    let left = track(&join.left, policy)?;
    let right = track(&join.right, policy)?;
    if join.on.is_empty() && join.filter.is_none() && (left.protected || right.protected) {
        return Err(refuse(
            Rule::CrossJoin,
            "a cross join pairs every person's rows with everyone else's",
            "JOIN … ON a.uid = b.uid",
        ));
    }
    // Lineage of the joined row (left columns, then right), for the condition.
    let both: Vec<Lineage> = left.columns.iter().chain(&right.columns).cloned().collect();
    let n_left = left.columns.len();
    let mut unit_equated = false;
    for (l, r) in &join.on {
        let ll = lineage(l, join.left.schema(), &left.columns)?;
        let rl = lineage(r, join.right.schema(), &right.columns)?;
        unit_equated |= ll == Lineage::Unit && rl == Lineage::Unit;
    }
    if let Some(filter) = &join.filter {
        // The condition sees both inputs (a semi join's output schema has one).
        let condition_schema = join.left.schema().as_ref().clone();
        let condition_schema = condition_schema.join(join.right.schema())?;
        lineage(filter, &condition_schema, &both)?;
        for conjunct in split_conjunction(filter) {
            if let Expr::BinaryExpr(BinaryExpr { left: a, op: Operator::Eq, right: b }) = conjunct {
                let side = |e: &Expr| -> Option<(bool, Lineage)> {
                    let Expr::Column(c) = e else { return None };
                    let i = condition_schema.index_of_column(c).ok()?;
                    Some((i < n_left, both[i].clone()))
                };
                if let (Some((sa, la)), Some((sb, lb))) = (side(a), side(b)) {
                    unit_equated |= sa != sb && la == Lineage::Unit && lb == Lineage::Unit;
                }
            }
        }
    }
    let optional = |t: &Tracked| -> Vec<Lineage> {
        t.columns
            .iter()
            .map(|l| if *l == Lineage::Unit { Lineage::UnitOrNull } else { l.clone() })
            .collect()
    };
    let times = |a: Option<u64>, b: Option<u64>| a.zip(b).and_then(|(a, b)| a.checked_mul(b.max(1)));
    match (left.protected, right.protected) {
        (true, true) => {
            if !unit_equated {
                return Err(refuse(
                    Rule::JoinOnPrivacyUnit,
                    "a join of two protected datasets must equate their privacy units, or it would pair one person's rows with another's",
                    "JOIN … ON a.uid = b.uid (other conditions may follow with AND)",
                ));
            }
            let (columns, rows) = match join.join_type {
                JoinType::Inner => (both, times(left.rows_per_person, right.rows_per_person)),
                JoinType::Left => (
                    left.columns.iter().cloned().chain(optional(&right)).collect(),
                    times(left.rows_per_person, right.rows_per_person),
                ),
                JoinType::Right => (
                    optional(&left).into_iter().chain(right.columns.iter().cloned()).collect(),
                    times(left.rows_per_person, right.rows_per_person),
                ),
                JoinType::LeftSemi | JoinType::LeftAnti => (left.columns.clone(), left.rows_per_person),
                JoinType::RightSemi | JoinType::RightAnti => (right.columns.clone(), right.rows_per_person),
                other => return Err(unsupported_join(other)),
            };
            // A semi or anti join only filters one side's rows.
            let unique_by = match join.join_type {
                JoinType::LeftSemi | JoinType::LeftAnti => left.unique_by.clone(),
                JoinType::RightSemi | JoinType::RightAnti => right.unique_by.clone(),
                _ => None,
            };
            Ok(Tracked { protected: true, columns, rows_per_person: rows, unique_by })
        }
        (true, false) | (false, true) => {
            let protected_left = left.protected;
            let columns = match (join.join_type, protected_left) {
                (JoinType::Inner, _) => both,
                (JoinType::Left, true) => left.columns.iter().cloned().chain(right.columns.iter().cloned()).collect(),
                (JoinType::Right, false) => left.columns.iter().cloned().chain(right.columns.iter().cloned()).collect(),
                (JoinType::LeftSemi | JoinType::LeftAnti, true) => left.columns.clone(),
                (JoinType::RightSemi | JoinType::RightAnti, false) => right.columns.clone(),
                (JoinType::Left | JoinType::Right | JoinType::Full, _) => {
                    return Err(refuse(
                        Rule::PublicOuterJoin,
                        "an outer join that keeps public rows without a person is not supported",
                        "an inner join, or a LEFT JOIN with the protected dataset on the left",
                    ))
                }
                (other, _) => return Err(unsupported_join(other)),
            };
            // A person's row may match many public rows: no per-person row count.
            Ok(Tracked { protected: true, columns, rows_per_person: None, unique_by: None })
        }
        (false, false) => {
            let columns = match join.join_type {
                JoinType::LeftSemi | JoinType::LeftAnti => left.columns.clone(),
                JoinType::RightSemi | JoinType::RightAnti => right.columns.clone(),
                _ => both,
            };
            Ok(Tracked { protected: false, columns, rows_per_person: None, unique_by: None })
        }
    }
}

fn unsupported_join(join_type: JoinType) -> DpError {
    refuse(
        Rule::JoinType,
        format!("{join_type} joins of protected inputs are not supported"),
        "INNER, LEFT or RIGHT JOIN on the privacy unit, or WHERE … IN / EXISTS written as a join",
    )
}

/// The lineage of two values that may end up in one column (CASE branches,
/// COALESCE arguments, UNION inputs).
fn merge(a: &Lineage, b: &Lineage) -> Lineage {
    match (a, b) {
        (Lineage::Hidden { .. }, _) => a.clone(),
        (_, Lineage::Hidden { .. }) => b.clone(),
        (Lineage::Number { lo: l1, hi: h1 }, Lineage::Number { lo: l2, hi: h2 }) => {
            Lineage::Number { lo: l1.min(*l2), hi: h1.max(*h2) }
        }
        // A value from either side: a person has at most both sides' values.
        (Lineage::Dimension(d1, p1), Lineage::Dimension(d2, p2)) => Lineage::Dimension(
            match (d1, d2) {
                _ if d1 == d2 => d1.clone(),
                // Days or periods of the same grain from two date ranges:
                // a value of either lies in the span of both (a public
                // superset, from the manifest alone).
                (Some(Domain::DateRange { from: f1, to: t1 }), Some(Domain::DateRange { from: f2, to: t2 })) => {
                    Some(Domain::DateRange { from: *f1.min(f2), to: *t1.max(t2) })
                }
                (Some(Domain::Periods { from: f1, to: t1, grain: g1 }), Some(Domain::Periods { from: f2, to: t2, grain: g2 })) if g1 == g2 => {
                    Some(Domain::Periods { from: *f1.min(f2), to: *t1.max(t2), grain: *g1 })
                }
                _ => None,
            },
            p1.zip(*p2).map(|(p1, p2)| p1.saturating_add(p2)),
        ),
        (Lineage::Unit, Lineage::Unit) => Lineage::Unit,
        (Lineage::Unit | Lineage::UnitOrNull, Lineage::Unit | Lineage::UnitOrNull) => Lineage::UnitOrNull,
        (Lineage::Key, Lineage::Key) => Lineage::Key,
        _ => Lineage::Other,
    }
}

/// `GROUPING SETS`, `CUBE` and `ROLLUP` release several groupings at once;
/// refused wherever they appear.
pub(crate) fn refuse_grouping_sets(group_expr: &[Expr]) -> Result<()> {
    if group_expr.iter().any(|g| matches!(g, Expr::GroupingSet(_))) {
        return Err(refuse(Rule::GroupingSets, "GROUPING SETS, CUBE and ROLLUP are not supported", "one GROUP BY per query"));
    }
    Ok(())
}

/// The lineage of a value that is one of `values` (CASE branches, COALESCE
/// arguments); NULL literals add nothing.
fn merge_non_null<'e>(values: impl IntoIterator<Item = (Lineage, &'e Expr)>) -> Option<Lineage> {
    values
        .into_iter()
        .filter(|(_, e)| !is_null_literal(e))
        .map(|(l, _)| l)
        .reduce(|a, b| merge(&a, &b))
}

fn hidden(dataset: &str, column: &str) -> DpError {
    DpError::refused(
        Rule::HiddenColumn,
        format!("column `{column}` of `{dataset}` is hidden by the collaboration manifest and cannot be used in any query"),
    )
}

fn identifier_use(e: &Expr) -> DpError {
    refuse(
        Rule::JoinKeyUse,
        format!("`{e}` computes with the privacy unit or a join key"),
        "use the privacy unit and join keys only to join on (a.uid = b.uid), partition or group per person, and COUNT(DISTINCT uid)",
    )
}

/// Scalar functions a query may call below the DP aggregate. None of them can
/// fail the query: the plan that runs calls their total forms
/// ([`crate::total`]: NULL where a function fails on a value). The list is
/// about resources: each function's output is at most a fixed multiple of
/// its inputs' size (no `repeat` or `lpad` whose length comes from the
/// data), so no value can make a function allocate without bound; and it is
/// deterministic. Literal arguments that could be invalid are checked at
/// planning ([`check_function_literals`]).
const TOTAL_FUNCTIONS: &[&str] = &[
    "abs", "ceil", "floor", "round", "trunc", "signum", "least", "greatest", "coalesce", "nullif", "nvl", "ifnull",
    "lower", "upper", "trim", "btrim", "ltrim", "rtrim", "length", "character_length", "char_length", "octet_length",
    "concat", "concat_ws", "starts_with", "ends_with", "strpos", "replace", "date_trunc", "date_part", "datepart",
    "isnan", "iszero", "ln", "log10", "log2", "exp", "sqrt",
];

/// Functions a statement may call where no protected row reaches them
/// (statements that read no dataset, post-processing of released values),
/// besides [`TOTAL_FUNCTIONS`]. Every other function is refused there too:
/// some allocate without bound on a value (`repeat`, `lpad`, `range`), and a
/// failed allocation ends the process, which no error handling can catch.
const NO_DATA_FUNCTIONS: &[&str] = &[
    "version", "now", "current_date", "current_time", "pi", "random", "power", "pow", "cbrt", "arrow_typeof",
];

/// Refuse a call of any function outside [`TOTAL_FUNCTIONS`] and
/// [`NO_DATA_FUNCTIONS`] anywhere in `plan`, subqueries included.
pub fn check_functions(plan: &LogicalPlan) -> Result<()> {
    let mut refused: Option<String> = None;
    plan.apply_with_subqueries(|node| {
        node.apply_expressions(|e| {
            e.apply(|e| {
                if let Expr::ScalarFunction(f) = e {
                    let name = f.name().to_ascii_lowercase();
                    if !TOTAL_FUNCTIONS.contains(&name.as_str()) && !NO_DATA_FUNCTIONS.contains(&name.as_str()) {
                        refused = Some(name);
                        return Ok(datafusion::common::tree_node::TreeNodeRecursion::Stop);
                    }
                }
                Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
            })
        })
    })?;
    match refused {
        None => Ok(()),
        Some(name) => Err(refuse(
            Rule::FunctionNotAllowed,
            format!("`{name}` is not supported"),
            format!("one of {}", TOTAL_FUNCTIONS.iter().chain(NO_DATA_FUNCTIONS).copied().collect::<Vec<_>>().join(", ")),
        )),
    }
}

/// The units `date_trunc` and `date_part` accept (an unknown one fails at run time).
const DATE_UNITS: &[&str] = &[
    "microsecond", "millisecond", "second", "minute", "hour", "day", "week", "month", "quarter", "year",
    "microseconds", "milliseconds", "nanosecond", "dow", "doy", "epoch", "isodow",
];

/// `date_trunc`/`date_part` take their unit as a literal from a fixed list;
/// `replace` takes literal patterns and never lengthens its input (an empty
/// pattern, or a longer replacement, could multiply a value's size).
fn check_function_literals(name: &str, args: &[Expr]) -> Result<()> {
    if name == "replace" {
        let text = |e: Option<&Expr>| literal_text(e).map(str::len);
        return match (text(args.get(1)), text(args.get(2))) {
            (Some(from), Some(to)) if from > 0 && to <= from => Ok(()),
            _ => Err(refuse(
                Rule::FunctionLiteral,
                "`replace` needs a non-empty literal pattern and a literal replacement no longer than it",
                "replace(s, 'ab', 'c')",
            )),
        };
    }
    if !matches!(name, "date_trunc" | "date_part" | "datepart") {
        return Ok(());
    }
    match literal_text(args.first()).map(str::to_ascii_lowercase) {
        Some(u) if DATE_UNITS.contains(&u.as_str()) && !(name == "date_trunc" && matches!(u.as_str(), "dow" | "doy" | "epoch" | "isodow" | "nanosecond")) => Ok(()),
        _ => Err(refuse(
            Rule::FunctionNotAllowed,
            format!("`{name}` needs its unit as a literal it accepts"),
            format!("{name}('day', ts), with one of {}", DATE_UNITS.join(", ")),
        )),
    }
}

/// The lineage of `e` over an input whose columns have lineage `columns`,
/// refusing what may not be computed.
pub fn lineage(e: &Expr, schema: &DFSchema, columns: &[Lineage]) -> Result<Lineage> {
    let of = |e: &Expr| lineage(e, schema, columns);
    let plain = |e: &Expr| -> Result<Lineage> {
        let l = of(e)?;
        if l.is_identifier() {
            return Err(identifier_use(e));
        }
        Ok(l)
    };
    Ok(match e {
        Expr::Column(c) => {
            let l = columns[schema.index_of_column(c)?].clone();
            if let Lineage::Hidden { dataset, column } = &l {
                return Err(hidden(dataset, column));
            }
            l
        }
        Expr::Alias(a) => of(&a.expr)?,
        Expr::Literal(value, _) => literal_lineage(value),
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            if matches!(op, Operator::Eq | Operator::NotEq | Operator::IsDistinctFrom | Operator::IsNotDistinctFrom) {
                let (a, b) = (of(left)?, of(right)?);
                if a.is_identifier() != b.is_identifier() {
                    return Err(identifier_use(e));
                }
                return Ok(Lineage::Other);
            }
            let (a, b) = (plain(left)?, plain(right)?);
            match op {
                Operator::Divide | Operator::Modulo => {
                    check_division(e, right, schema)?;
                    Lineage::Other
                }
                Operator::Plus | Operator::Minus | Operator::Multiply => match (a, b) {
                    (Lineage::Number { lo: l1, hi: h1 }, Lineage::Number { lo: l2, hi: h2 }) => match op {
                        Operator::Plus => Lineage::Number { lo: l1 + l2, hi: h1 + h2 },
                        Operator::Minus => Lineage::Number { lo: l1 - h2, hi: h1 - l2 },
                        _ => {
                            let products = [l1 * l2, l1 * h2, h1 * l2, h1 * h2];
                            if products.iter().any(|p| p.is_nan()) {
                                Lineage::unbounded()
                            } else {
                                Lineage::Number {
                                    lo: products.iter().cloned().fold(f64::INFINITY, f64::min),
                                    hi: products.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
                                }
                            }
                        }
                    },
                    _ => Lineage::Other,
                },
                _ => Lineage::Other,
            }
        }
        Expr::Not(inner) | Expr::IsTrue(inner) | Expr::IsFalse(inner) | Expr::IsNotTrue(inner)
        | Expr::IsNotFalse(inner) | Expr::IsUnknown(inner) | Expr::IsNotUnknown(inner) => {
            plain(inner)?;
            Lineage::Other
        }
        Expr::IsNull(inner) | Expr::IsNotNull(inner) => {
            of(inner)?;
            Lineage::Other
        }
        Expr::Negative(inner) => {
            // Integers negate wrapping and floats exactly; other types
            // (intervals, durations) could fail on a value.
            let numeric = inner.get_type(schema).map(|t| t.is_integer() || t.is_floating()).unwrap_or(false);
            if !numeric {
                return Err(refuse(
                    Rule::UnsupportedExpression,
                    format!("`{e}`: only numbers can be negated"),
                    "0 - x, or negate a number",
                ));
            }
            match plain(inner)? {
                Lineage::Number { lo, hi } => Lineage::Number { lo: -hi, hi: -lo },
                _ => Lineage::Other,
            }
        }
        Expr::Between(b) => {
            plain(&b.expr)?;
            plain(&b.low)?;
            plain(&b.high)?;
            Lineage::Other
        }
        Expr::InList(list) => {
            plain(&list.expr)?;
            list.list.iter().try_for_each(|e| plain(e).map(|_| ()))?;
            Lineage::Other
        }
        Expr::Like(like) => {
            plain(&like.expr)?;
            plain(&like.pattern)?;
            check_like_pattern(e, like)?;
            Lineage::Other
        }
        Expr::SimilarTo(_) => {
            return Err(refuse(
                Rule::FunctionNotAllowed,
                format!("`{e}`: SIMILAR TO is not supported"),
                "LIKE with a literal pattern",
            ))
        }
        Expr::Case(case) => {
            if let Some(operand) = &case.expr {
                plain(operand)?;
            }
            let mut values = Vec::new();
            for (when, then) in &case.when_then_expr {
                plain(when)?;
                values.push((plain(then)?, then.as_ref()));
            }
            if let Some(otherwise) = &case.else_expr {
                values.push((plain(otherwise)?, otherwise.as_ref()));
            }
            merge_non_null(values).unwrap_or(Lineage::Other)
        }
        Expr::Cast(datafusion::logical_expr::Cast { expr, field })
        | Expr::TryCast(TryCast { expr, field }) => cast_lineage(plain(expr)?, field.data_type()),
        Expr::ScalarFunction(f) => {
            let name = f.name().to_ascii_lowercase();
            if !TOTAL_FUNCTIONS.contains(&name.as_str()) {
                return Err(refuse(
                    Rule::FunctionNotAllowed,
                    format!("`{name}` may fail on some values, and whether a query fails must not depend on the data"),
                    format!("one of {}", TOTAL_FUNCTIONS.join(", ")),
                ));
            }
            check_function_literals(&name, &f.args)?;
            let args = f.args.iter().map(plain).collect::<Result<Vec<_>>>()?;
            // Bounds of the non-NULL arguments, when all of them are numbers.
            let numbers: Option<Vec<(f64, f64)>> = args
                .iter()
                .zip(&f.args)
                .filter(|(_, e)| !is_null_literal(e))
                .map(|(l, _)| match l {
                    Lineage::Number { lo, hi } => Some((*lo, *hi)),
                    _ => None,
                })
                .collect();
            match (name.as_str(), numbers) {
                ("least", Some(n)) if !n.is_empty() => Lineage::Number {
                    lo: n.iter().map(|b| b.0).fold(f64::INFINITY, f64::min),
                    hi: n.iter().map(|b| b.1).fold(f64::INFINITY, f64::min),
                },
                ("greatest", Some(n)) if !n.is_empty() => Lineage::Number {
                    lo: n.iter().map(|b| b.0).fold(f64::NEG_INFINITY, f64::max),
                    hi: n.iter().map(|b| b.1).fold(f64::NEG_INFINITY, f64::max),
                },
                ("coalesce" | "nvl" | "ifnull", _) => {
                    merge_non_null(args.iter().cloned().zip(&f.args)).unwrap_or(Lineage::Other)
                }
                ("nullif", _) => args[0].clone(),
                // DATE_TRUNC of a dimension with a day range: the periods of
                // that range (a function of the manifest), for a timestamp
                // without a time zone or a date (a zoned timestamp is
                // truncated in its zone, so its periods are not the range's;
                // UTC is the range's own).
                ("date_trunc", _) => match (date_argument_lineage(f.args.get(1), schema, columns)?.as_ref().or(args.get(1)), period_grain(&f.args), f.args.get(1).and_then(|a| a.get_type(schema).ok())) {
                    (Some(Lineage::Dimension(Some(d @ (Domain::DateRange { .. } | Domain::Periods { .. })), per_person)), Some(grain), Some(t))
                        if crate::policy::utc_timestamp(&t) || matches!(t, arrow::datatypes::DataType::Date32 | arrow::datatypes::DataType::Date64) =>
                    {
                        // Of periods (a nested DATE_TRUNC), the coarser
                        // periods of the inner ones' days.
                        let days = d.days();
                        let (from, to) = (days.first().copied().unwrap_or(0), days.last().copied().unwrap_or(-1));
                        Lineage::Dimension(Some(Domain::Periods { from, to, grain }), *per_person)
                    }
                    (Some(Lineage::Dimension(_, per_person)), _, _) => Lineage::Dimension(None, *per_person),
                    _ => Lineage::Other,
                },
                ("abs", Some(n)) if n.len() == 1 => {
                    let (lo, hi) = n[0];
                    let top = lo.abs().max(hi.abs());
                    let bottom = if lo <= 0.0 && hi >= 0.0 { 0.0 } else { lo.abs().min(hi.abs()) };
                    Lineage::Number { lo: bottom, hi: top }
                }
                _ => Lineage::Other,
            }
        }
        Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_) | Expr::SetComparison(_) | Expr::OuterReferenceColumn(..) => {
            return Err(refuse(
                Rule::Subquery,
                "subqueries in expressions are not supported",
                "a JOIN on the privacy unit (WHERE uid IN (SELECT uid …) becomes JOIN (SELECT DISTINCT uid …) USING (uid))",
            ))
        }
        Expr::Placeholder(_) => {
            return Err(DpError::refused(Rule::Parameters, "query parameters are not supported"));
        }
        Expr::AggregateFunction(_) | Expr::WindowFunction(_) => {
            return Err(DpError::refused(Rule::UnsupportedShape, format!("`{e}` is not allowed here")));
        }
        other => {
            return Err(DpError::refused(Rule::UnsupportedExpression, format!("`{other}` is not supported")));
        }
    })
}

/// DATE_TRUNC takes a date as a timestamp (a cast the analyzer adds): the
/// lineage of the date itself, whose days the timestamp keeps.
fn date_argument_lineage(arg: Option<&Expr>, schema: &DFSchema, columns: &[Lineage]) -> Result<Option<Lineage>> {
    let Some(Expr::Cast(datafusion::logical_expr::Cast { expr, field }) | Expr::TryCast(TryCast { expr, field })) = arg else { return Ok(None) };
    let from_date = matches!(expr.get_type(schema), Ok(arrow::datatypes::DataType::Date32 | arrow::datatypes::DataType::Date64));
    if !from_date || !matches!(field.data_type(), arrow::datatypes::DataType::Timestamp(_, None)) {
        return Ok(None);
    }
    Ok(Some(lineage(expr, schema, columns)?))
}

/// The grain of a `DATE_TRUNC` whose unit is a literal day, week, month,
/// quarter or year.
fn period_grain(args: &[Expr]) -> Option<crate::policy::Grain> {
    crate::policy::Grain::of_unit(&literal_text(args.first())?.to_ascii_lowercase())
}

/// The text of a text value (of any of Arrow's string types).
pub(crate) fn text_of(v: &ScalarValue) -> Option<&str> {
    match v {
        ScalarValue::Utf8(Some(t)) | ScalarValue::Utf8View(Some(t)) | ScalarValue::LargeUtf8(Some(t)) => Some(t),
        _ => None,
    }
}

/// The text of a text literal, through casts.
fn literal_text(e: Option<&Expr>) -> Option<&str> {
    match e.map(strip_casts) {
        Some(Expr::Literal(v, _)) => text_of(v),
        _ => None,
    }
}

fn is_null_literal(e: &Expr) -> bool {
    matches!(e, Expr::Literal(v, _) if v.is_null())
}

fn literal_lineage(value: &ScalarValue) -> Lineage {
    if value.data_type().is_numeric() {
        if let Ok(ScalarValue::Float64(Some(v))) = value.cast_to(&arrow::datatypes::DataType::Float64) {
            if v.is_finite() {
                return Lineage::Number { lo: v, hi: v };
            }
        }
    }
    Lineage::Other
}

fn cast_lineage(l: Lineage, to: &arrow::datatypes::DataType) -> Lineage {
    use arrow::datatypes::DataType;
    match (l, to) {
        (Lineage::Number { lo, hi }, t) if t.is_integer() => Lineage::Number { lo: lo.floor(), hi: hi.ceil() },
        (Lineage::Number { lo, hi }, t) if t.is_floating() || matches!(t, DataType::Decimal128(..) | DataType::Decimal256(..)) => {
            Lineage::Number { lo, hi }
        }
        (Lineage::Dimension(Some(d @ (Domain::DateRange { .. } | Domain::Periods { .. })), p), DataType::Date32) => Lineage::Dimension(Some(d), p),
        (Lineage::Dimension(Some(d @ Domain::IntRange { .. }), p), t) if t.is_integer() => Lineage::Dimension(Some(d), p),
        (Lineage::Dimension(Some(d @ Domain::Strings(_)), p), DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8) => {
            Lineage::Dimension(Some(d), p)
        }
        (Lineage::Dimension(_, p), _) => Lineage::Dimension(None, p),
        _ => Lineage::Other,
    }
}

/// Division and remainder fail on a zero (and overflow on `MIN / -1`) for
/// integers and decimals; floats give ±inf or NaN instead. So an exact
/// divisor must be a literal other than 0 and -1.
fn check_division(e: &Expr, divisor: &Expr, schema: &DFSchema) -> Result<()> {
    let floating = |x: &Expr| x.get_type(schema).map(|t| t.is_floating()).unwrap_or(false);
    if floating(e) {
        return Ok(());
    }
    if let Expr::Literal(v, _) = strip_casts(divisor) {
        if let Ok(ScalarValue::Float64(Some(d))) = v.cast_to(&arrow::datatypes::DataType::Float64) {
            if d != 0.0 && d != -1.0 {
                return Ok(());
            }
        }
    }
    Err(refuse(
        Rule::IntegerDivision,
        format!("`{e}` fails when the divisor is 0, so whether the query fails would depend on the data"),
        "divide as floating point: CAST(a AS DOUBLE) / b (a zero divisor gives NULL-like inf/NaN, not an error)",
    ))
}

/// `e` without its casts and aliases.
pub(crate) fn strip_casts(e: &Expr) -> &Expr {
    match e {
        Expr::Cast(c) => strip_casts(&c.expr),
        Expr::TryCast(c) => strip_casts(&c.expr),
        Expr::Alias(a) => strip_casts(&a.expr),
        other => other,
    }
}

/// The lineage of an aggregate computed per person (below the DP aggregate).
fn aggregate_lineage(e: &Expr, schema: &DFSchema, columns: &[Lineage], context: &str) -> Result<Lineage> {
    let mut inner = e;
    while let Expr::Alias(a) = inner {
        inner = &a.expr;
    }
    let Expr::AggregateFunction(AggregateFunction { func, params }) = inner else {
        return Err(DpError::refused(Rule::UnsupportedShape, format!("`{e}` is not an aggregate function")));
    };
    if let Some(filter) = &params.filter {
        lineage(filter, schema, columns)?;
    }
    for s in &params.order_by {
        lineage(&s.expr, schema, columns)?;
    }
    let name = func.name().to_ascii_lowercase();
    check_aggregate_arguments(e, &name, &params.args, schema)?;
    let args = params.args.iter().map(|a| lineage(a, schema, columns)).collect::<Result<Vec<_>>>()?;
    let l = function_lineage(&name, &args, context)?;
    // With a FILTER, MIN/MAX/FIRST_VALUE/LAST_VALUE of the unit are NULL for
    // a person none of whose rows passes it: not a key that may group or
    // partition (all NULLs would fall into one group of many people).
    Ok(match l {
        Lineage::Unit if params.filter.is_some() => Lineage::UnitOrNull,
        other => other,
    })
}

/// Aggregates whose accumulator could fail on a value, or on a literal only
/// once a group exists, are refused here, at planning: SUM/AVG of decimals
/// (the decimal average raises on overflow) and `NTH_VALUE` whose position
/// is not a positive whole-number literal.
fn check_aggregate_arguments(e: &Expr, name: &str, args: &[Expr], schema: &DFSchema) -> Result<()> {
    if matches!(name, "sum" | "avg" | "mean") {
        if let Some(t) = args.first().and_then(|a| a.get_type(schema).ok()) {
            if matches!(t, arrow::datatypes::DataType::Decimal128(..) | arrow::datatypes::DataType::Decimal256(..)) {
                return Err(refuse(
                    Rule::SupportedAggregates,
                    format!("`{e}`: a per-person {name} of a DECIMAL may overflow"),
                    format!("{name}(CAST(x AS DOUBLE))"),
                ));
            }
        }
    }
    let literal = |e: Option<&Expr>| match e.map(strip_casts) {
        Some(Expr::Literal(v, _)) => Some(v.clone()),
        _ => None,
    };
    if name == "ntile" {
        let valid = matches!(literal(args.first()), Some(v) if v.data_type().is_integer() && !v.is_null() && v.cast_to(&arrow::datatypes::DataType::Int64).is_ok_and(|n| n > ScalarValue::Int64(Some(0))));
        if !valid || args.len() != 1 {
            return Err(refuse(Rule::FunctionLiteral, format!("`{e}`: NTILE needs its number of buckets as a whole number above 0"), "NTILE(4)"));
        }
    }
    if matches!(name, "lag" | "lead") {
        // The offset and the default are read once a window has rows.
        if args.len() > 1 && !matches!(literal(args.get(1)), Some(v) if v.data_type().is_integer() && !v.is_null()) {
            return Err(refuse(Rule::FunctionLiteral, format!("`{e}`: the offset of {name} must be a whole-number literal"), format!("{name}(x, 1)")));
        }
        if let (Some(value), Some(default)) = (args.first(), args.get(2)) {
            let fits = match (literal(Some(default)), value.get_type(schema)) {
                (Some(d), Ok(t)) => d.is_null() || d.cast_to(&t).is_ok(),
                _ => false,
            };
            if !fits {
                return Err(refuse(
                    Rule::FunctionLiteral,
                    format!("`{e}`: the default of {name} must be a literal of the value's type"),
                    format!("{name}(x, 1, 0) for a number x"),
                ));
            }
        }
    }
    if name == "nth_value" {
        let position = args.get(1).map(strip_casts);
        let valid = matches!(position, Some(Expr::Literal(ScalarValue::Int64(Some(n)), _)) if *n > 0);
        if !valid || args.len() != 2 {
            return Err(refuse(
                Rule::FunctionLiteral,
                format!("`{e}`: NTH_VALUE needs its position as a whole number above 0"),
                "NTH_VALUE(x, 2)",
            ));
        }
    }
    Ok(())
}

/// A `LIKE` pattern must be a literal the pattern matcher accepts: it is
/// compiled once per batch, so a pattern it rejects would fail only when a
/// row reaches it. Checked here on one row, which fails exactly when any
/// input would.
fn check_like_pattern(e: &Expr, like: &datafusion::logical_expr::expr::Like) -> Result<()> {
    use arrow::array::{Scalar, StringArray};
    let pattern = match strip_casts(&like.pattern) {
        Expr::Literal(ScalarValue::Utf8(Some(p)) | ScalarValue::Utf8View(Some(p)) | ScalarValue::LargeUtf8(Some(p)), _) => p.clone(),
        Expr::Literal(v, _) if v.is_null() => return Ok(()),
        _ => {
            return Err(refuse(
                Rule::FunctionLiteral,
                format!("`{e}`: the LIKE pattern must be a literal"),
                "x LIKE 'prefix%'",
            ))
        }
    };
    let escape_ok = like.escape_char.is_none_or(|c| c == '\\');
    let probe = StringArray::from(vec!["x"]);
    let pattern = Scalar::new(StringArray::from(vec![pattern]));
    let compiled = if like.case_insensitive {
        arrow::compute::kernels::comparison::ilike(&probe, &pattern)
    } else {
        arrow::compute::kernels::comparison::like(&probe, &pattern)
    };
    if compiled.is_err() || !escape_ok {
        return Err(refuse(
            Rule::FunctionLiteral,
            format!("`{e}`: the LIKE pattern is not valid"),
            "a pattern of characters, % and _ (escape with a backslash)",
        ));
    }
    Ok(())
}

/// Per-person aggregate and window functions, and what their value is.
fn function_lineage(name: &str, args: &[Lineage], context: &str) -> Result<Lineage> {
    let first = args.first().cloned().unwrap_or(Lineage::Other);
    let numeric = |l: &Lineage| matches!(l, Lineage::Number { .. });
    Ok(match name {
        "count" => Lineage::Number { lo: 0.0, hi: f64::INFINITY },
        "row_number" | "rank" | "dense_rank" | "ntile" => Lineage::Number { lo: 1.0, hi: f64::INFINITY },
        "percent_rank" | "cume_dist" => Lineage::Number { lo: 0.0, hi: 1.0 },
        "min" | "max" | "first_value" | "last_value" | "nth_value" | "lag" | "lead" => match first {
            Lineage::Unit if matches!(name, "lag" | "lead" | "nth_value") => Lineage::UnitOrNull,
            other => other,
        },
        "avg" | "mean" if numeric(&first) => first,
        "sum" => match first {
            Lineage::Number { lo, hi } if lo >= 0.0 => Lineage::Number { lo: 0.0, hi: if hi == 0.0 { 0.0 } else { f64::INFINITY } },
            Lineage::Number { hi, .. } if hi <= 0.0 => Lineage::Number { lo: f64::NEG_INFINITY, hi: 0.0 },
            _ => Lineage::unbounded(),
        },
        "bool_and" | "bool_or" => Lineage::Other,
        _ => {
            return Err(refuse(
                Rule::SupportedAggregates,
                format!("`{name}` is not supported in a per-person {context}"),
                "COUNT, SUM, AVG, MIN, MAX, FIRST_VALUE, LAST_VALUE, BOOL_AND, BOOL_OR, and in windows ROW_NUMBER, RANK, DENSE_RANK, LAG, LEAD",
            ))
        }
    })
    .and_then(|l| {
        if args.iter().any(|a| matches!(a, Lineage::Unit | Lineage::UnitOrNull | Lineage::Key))
            && !matches!(name, "count" | "min" | "max" | "first_value" | "last_value" | "lag" | "lead" | "nth_value")
        {
            return Err(refuse(
                Rule::JoinKeyUse,
                format!("`{name}` of the privacy unit or a join key"),
                "COUNT(DISTINCT uid), or MIN/MAX/FIRST_VALUE of a join key",
            ));
        }
        Ok(l)
    })
}

/// Window functions whose value for a row depends on the order of the rows
/// in its window, beyond the values the window orders by.
const ORDER_SENSITIVE_WINDOWS: &[&str] = &["row_number", "ntile", "first_value", "last_value", "nth_value", "lag", "lead"];

/// Aggregates whose value depends on which row comes first.
const ORDER_SENSITIVE_AGGREGATES: &[&str] = &["first_value", "last_value", "nth_value"];

/// `e` (an aggregate or window function, possibly aliased) with a SUM or
/// AVG that DataFusion would add in floating point replaced by its exact
/// form ([`crate::exact`]), under its original name: SUM of a float, AVG of
/// anything (DataFusion averages integers as doubles too). SUM of integers
/// wraps in 64 bits, which does not depend on the order, and stays.
///
/// Why it is private: a float sum in arrival order depends in its last bits
/// on where other people's rows fall; the exact sum is a function of the
/// person's own values, so what the person contributes after clamping and
/// rounding to the DP aggregate's grid is too.
fn exact_float_sum(e: &Expr, schema: &DFSchema) -> datafusion::error::Result<Expr> {
    use arrow::datatypes::DataType;
    let name = e.schema_name().to_string();
    let inner = strip_alias(e);
    let (function, args) = match inner {
        Expr::AggregateFunction(f) => (f.func.name().to_ascii_lowercase(), &f.params.args),
        Expr::WindowFunction(f) => (f.fun.name().to_ascii_lowercase(), &f.params.args),
        _ => return Ok(e.clone()),
    };
    let Some(argument) = args.first() else { return Ok(e.clone()) };
    let float = matches!(argument.get_type(schema)?, DataType::Float16 | DataType::Float32 | DataType::Float64);
    let exact = match function.as_str() {
        "sum" if float => Arc::new(datafusion::logical_expr::AggregateUDF::new_from_impl(crate::exact::ExactSum::sum())),
        "avg" | "mean" => Arc::new(datafusion::logical_expr::AggregateUDF::new_from_impl(crate::exact::ExactSum::avg())),
        _ => return Ok(e.clone()),
    };
    let args = vec![Expr::Cast(datafusion::logical_expr::Cast::new(Box::new(argument.clone()), DataType::Float64))];
    let changed = match inner.clone() {
        Expr::AggregateFunction(mut f) => {
            f.func = exact;
            f.params.args = args;
            Expr::AggregateFunction(f)
        }
        Expr::WindowFunction(mut f) => {
            f.fun = datafusion::logical_expr::expr::WindowFunctionDefinition::AggregateUDF(exact);
            f.params.args = args;
            Expr::WindowFunction(f)
        }
        other => other,
    };
    Ok(changed.alias(name))
}

/// Make every per-person operator below the DP aggregate see one person's
/// rows only, in an order that does not depend on anyone else's data.
///
/// - Rows whose privacy unit is NULL belong to no one; SQL puts all NULL
///   keys into one group or window, which would mix many people's rows.
///   So a `Filter(unit IS NOT NULL)` goes below every aggregate grouped by
///   the unit and every window partitioned by it (those rows could never
///   reach the DP aggregate anyway: it drops rows without a person).
/// - Order-sensitive functions (`ROW_NUMBER`, `FIRST_VALUE`, `LAG`, …, and
///   any `ROWS` frame) pick rows by position; among rows that tie on the
///   ORDER BY, the position would be the arrival order, which depends on
///   other people's rows (files, partitions). Every input column the party
///   may read is appended to their ORDER BY as a tie-breaker, so the order
///   is total up to rows that are identical in every readable column.
///
/// Why it is private: both are per-row or per-person decisions, so a
/// person's rows after this step are a function of that person's own rows,
/// which is what the DP aggregate's contribution bound relies on. The
/// output schema is unchanged (changed expressions keep their names).
///
/// Columns nothing above reads are pruned first (DataFusion's projection
/// pruning, which keeps the plan's output), so "every readable column"
/// means every column that can reach the DP aggregate: two rows equal in
/// all of those are interchangeable in any order, and not carrying (and
/// sorting on) the others keeps a per-person window as cheap as the plain
/// query's.
pub fn guard_per_person(plan: LogicalPlan, policy: &Policy) -> Result<LogicalPlan> {
    use datafusion::optimizer::{OptimizerContext, OptimizerRule};
    let plan = datafusion::optimizer::optimize_projections::OptimizeProjections::new()
        .rewrite(plan, &OptimizerContext::new())?
        .data;
    Ok(plan
        .transform_up(|node| match node {
            LogicalPlan::Aggregate(aggregate) => {
                let input = track(&aggregate.input, policy).map_err(to_df)?;
                let schema = aggregate.input.schema().clone();
                let units: Vec<Expr> = aggregate
                    .group_expr
                    .iter()
                    .filter(|g| {
                        matches!(g, Expr::Column(c) if schema.index_of_column(c).is_ok_and(|i| input.columns[i] == Lineage::Unit))
                    })
                    .cloned()
                    .collect();
                let ties = tie_breakers(&schema, &input.columns);
                let aggr_expr = aggregate
                    .aggr_expr
                    .iter()
                    .map(|a| with_total_order(a, &ties, |name, _| ORDER_SENSITIVE_AGGREGATES.contains(&name)))
                    .map(|a| a.and_then(|a| exact_float_sum(&a, &schema)))
                    .collect::<datafusion::error::Result<Vec<_>>>()?;
                let input = not_null(Arc::unwrap_or_clone(aggregate.input), &units)?;
                Ok(Transformed::yes(LogicalPlan::Aggregate(datafusion::logical_expr::Aggregate::try_new(
                    Arc::new(input),
                    aggregate.group_expr,
                    aggr_expr,
                )?)))
            }
            LogicalPlan::Window(window) => {
                let input = track(&window.input, policy).map_err(to_df)?;
                let schema = window.input.schema().clone();
                let mut units: Vec<Expr> = Vec::new();
                for w in &window.window_expr {
                    if let Expr::WindowFunction(f) = strip_alias(w) {
                        for p in &f.params.partition_by {
                            let is_unit = matches!(p, Expr::Column(c) if schema.index_of_column(c).is_ok_and(|i| input.columns[i] == Lineage::Unit));
                            if is_unit && !units.contains(p) {
                                units.push(p.clone());
                            }
                        }
                    }
                }
                let ties = tie_breakers(&schema, &input.columns);
                let window_expr = window
                    .window_expr
                    .iter()
                    .map(|w| {
                        with_total_order(w, &ties, |name, rows_frame| rows_frame || ORDER_SENSITIVE_WINDOWS.contains(&name))
                            .and_then(|w| exact_float_sum(&w, &schema))
                    })
                    .collect::<datafusion::error::Result<Vec<_>>>()?;
                // One window node per expression: a node sorts its input by
                // its first expression's keys only, so expressions given
                // different tie-breakers may not share one.
                let mut plan = not_null(Arc::unwrap_or_clone(window.input), &units)?;
                for w in window_expr {
                    plan = LogicalPlan::Window(datafusion::logical_expr::Window::try_new(vec![w], Arc::new(plan))?);
                }
                Ok(Transformed::yes(plan))
            }
            other => Ok(Transformed::no(other)),
        })?
        .data)
}

fn to_df(e: DpError) -> datafusion::error::DataFusionError {
    datafusion::error::DataFusionError::Plan(e.to_string())
}

fn strip_alias(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => strip_alias(&a.expr),
        other => other,
    }
}

/// `input` without the rows where any of `units` is NULL.
fn not_null(input: LogicalPlan, units: &[Expr]) -> datafusion::error::Result<LogicalPlan> {
    let Some(predicate) = units.iter().map(|u| u.clone().is_not_null()).reduce(Expr::and) else {
        return Ok(input);
    };
    Ok(LogicalPlan::Filter(datafusion::logical_expr::Filter::try_new(predicate, Arc::new(input))?))
}

/// Sort keys on every input column a party may read (not hidden) and that
/// has an order (no nested types), in schema order.
fn tie_breakers(schema: &DFSchema, columns: &[Lineage]) -> Vec<datafusion::logical_expr::SortExpr> {
    schema
        .iter()
        .zip(columns)
        .filter(|((_, f), l)| !matches!(l, Lineage::Hidden { .. }) && !f.data_type().is_nested())
        .map(|((q, f), _)| Expr::Column(Column::new(q.cloned(), f.name())).sort(true, true))
        .collect()
}

/// `e` (an aggregate or window function, possibly aliased) with `ties`
/// appended to its ORDER BY when `sensitive(name, rows_frame)` says its value
/// depends on row order; under its original name.
fn with_total_order(
    e: &Expr,
    ties: &[datafusion::logical_expr::SortExpr],
    sensitive: impl Fn(&str, bool) -> bool,
) -> datafusion::error::Result<Expr> {
    let name = e.schema_name().to_string();
    let (alias, inner) = match e {
        Expr::Alias(a) => (Some(a.name.clone()), strip_alias(&a.expr).clone()),
        other => (None, other.clone()),
    };
    let extend = |order_by: &mut Vec<datafusion::logical_expr::SortExpr>| {
        for t in ties {
            if !order_by.iter().any(|s| s.expr == t.expr) {
                order_by.push(t.clone());
            }
        }
    };
    let changed = match inner {
        Expr::AggregateFunction(mut f) if sensitive(&f.func.name().to_ascii_lowercase(), false) => {
            extend(&mut f.params.order_by);
            Expr::AggregateFunction(f)
        }
        Expr::WindowFunction(mut f) => {
            let rows = f.params.window_frame.units == datafusion::logical_expr::WindowFrameUnits::Rows;
            if !sensitive(&f.fun.name().to_ascii_lowercase(), rows) {
                return Ok(e.clone());
            }
            extend(&mut f.params.order_by);
            Expr::WindowFunction(f)
        }
        _ => return Ok(e.clone()),
    };
    Ok(changed.alias(alias.unwrap_or(name)))
}

/// When `cap` is set and `plan` joins, keep at most `cap` rows of each
/// person from each scan of a protected dataset: the rows with the smallest
/// keyed hash of their whole content (`salt`).
///
/// Why it is private: which of a person's rows are kept depends only on that
/// person's own rows (and the salt), so each person's rows after the cap are
/// still a function of that person's data, and the DP aggregate's bound
/// applies as before (the cap only lowers what a person can contribute). It
/// also bounds the work one person causes: a self-join of a person's r rows
/// becomes at most cap² rows, whatever r is.
pub fn cap_rows_per_person(plan: LogicalPlan, policy: &Policy, cap: Option<u32>, salt: i64) -> Result<LogicalPlan> {
    use datafusion::logical_expr::ExprFunctionExt;
    let Some(cap) = cap else { return Ok(plan) };
    if !plan.exists(|node| Ok(matches!(node, LogicalPlan::Join(_))))? {
        return Ok(plan);
    }
    let key_fn = Arc::new(datafusion::logical_expr::ScalarUDF::new_from_impl(crate::udf::ContributionKey::new()));
    Ok(plan
        .transform_up(|node| {
            let LogicalPlan::TableScan(scan) = &node else { return Ok(Transformed::no(node)) };
            let Some(unit) = policy.dataset(scan.table_name.table()).and_then(|d| d.privacy_unit.clone()) else {
                return Ok(Transformed::no(node));
            };
            let columns: Vec<Column> = scan.projected_schema.columns();
            let Some(unit) = columns.iter().find(|c| c.name == unit).cloned() else {
                return Ok(Transformed::no(node));
            };
            let mut key_args = vec![datafusion::logical_expr::lit(salt), Expr::Column(unit.clone())];
            key_args.extend(columns.iter().cloned().map(Expr::Column));
            // The hash orders a person's rows; ties (equal hashes) are broken
            // on every orderable column, so the kept rows never depend on
            // arrival order.
            let mut order_by = vec![key_fn.call(key_args).sort(true, true)];
            order_by.extend(
                scan.projected_schema
                    .iter()
                    .filter(|(_, f)| !f.data_type().is_nested())
                    .map(|(q, f)| Expr::Column(Column::new(q.cloned(), f.name())).sort(true, true)),
            );
            let rank = datafusion::functions_window::expr_fn::row_number()
                .partition_by(vec![Expr::Column(unit.clone())])
                .order_by(order_by)
                .build()?
                .alias("__row_rank");
            // Rows without a person belong to no one and are dropped (as the
            // DP aggregate drops them), so they are never ranked together.
            let capped = datafusion::logical_expr::LogicalPlanBuilder::from(node)
                .filter(Expr::Column(unit).is_not_null())?
                .window(vec![rank])?
                .filter(datafusion::logical_expr::col("__row_rank").lt_eq(datafusion::logical_expr::lit(cap as u64)))?
                .project(columns.into_iter().map(Expr::Column))?
                .build()?;
            Ok(Transformed::yes(capped))
        })?
        .data)
}
