//! Studies: the questions a clean room is bought for, as SQL table
//! functions, `SELECT * FROM lift(exposure => 'impressions', …)`. A study
//! call in a statement's `FROM` is replaced by the DP SQL that answers it —
//! one DP aggregate, so one charge — and the study's figures (rates, lift,
//! its interval) are computed above that aggregate, as post-processing of
//! the released values. Every client (ADBC, BI tools, the CLI) shares this
//! one implementation, and EXPLAIN, the released-answer cache and the audit
//! log work on a study as on any DP query.
//!
//! Why a study is private: its SQL is planned and checked like any
//! statement (the planner finds its DP aggregate, bounds each person's
//! contribution and calibrates the noise); what the study adds is
//! arithmetic on released values and on public constants (the noise's
//! standard deviations, fixed at planning from the SQL and the manifest).
//!
//! Parameters are named arguments (`name => value`); those a call leaves
//! out come from the manifest's `[studies.<kind>]` table, so the demo's
//! `SELECT * FROM lift()` works as is.

use std::collections::BTreeMap;

use datafusion::execution::SessionState;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{
    Expr as SqlExpr, FunctionArg, FunctionArgExpr, Ident, SetExpr, Statement as SqlStatement, TableAlias, TableFactor, Value,
};

use crate::error::{DpError, Result};
use crate::options::QueryOptions;
use crate::policy::{ColumnRole, Policy};
use crate::rewrite::PlannedQuery;

/// The studies a statement may call.
pub const STUDIES: &[&str] = &["lift", "attribution", "reach", "cohorts", "match_rate"];

/// What each study provides: how its budget is split across its DP
/// aggregate's columns, the CTEs that aggregate reads, the aggregate
/// itself, and what is computed from its released rows given the noise
/// of each released column.
trait Study: Send + Sync {
    /// How the budget is split across the aggregate's columns (`None`:
    /// evenly).
    fn split(&self, _noise: crate::options::NoiseKind) -> Option<crate::options::ColumnSplit> {
        None
    }
    /// `WITH a AS (…), b AS (…)`: per-person rows, below the DP aggregate.
    fn ctes(&self) -> String;
    /// The study's one DP aggregate, over [`Study::ctes`].
    fn released_select(&self) -> String;
    /// What follows the CTE `study_released` (the aggregate's rows): more
    /// CTEs (`, x AS (…) …`) and the final `SELECT`.
    fn above(&self, noise: &Noise) -> Result<String>;

    /// The contribution bounds the study sets (`max_groups_contributed`,
    /// `max_contributions_per_group`), as options of its DP aggregate.
    fn bounds(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    /// The columns the study reads as true/false flags: (parameter,
    /// dataset, column).
    fn flags(&self) -> Vec<(&'static str, &str, &str)> {
        Vec::new()
    }

    /// The DP aggregate alone, to plan its noise.
    fn released_sql(&self) -> String {
        format!("{} {}", self.ctes(), self.released_select())
    }

    /// The whole study.
    fn sql(&self, noise: &Noise) -> Result<String> {
        Ok(format!("{}, study_released AS ({}) {}", self.ctes(), self.released_select(), self.above(noise)?))
    }
}

/// The noise of each column of a study's DP aggregate, fixed when the
/// aggregate is planned (a function of the SQL, the manifest and ε): public
/// constants the study's intervals are computed from.
struct Noise<'a> {
    metadata: &'a (dyn Fn(&str, &str) -> Result<f64> + Sync),
}

impl Noise<'_> {
    /// The standard deviation of the noise on `column`.
    fn sd(&self, column: &str) -> Result<f64> {
        (self.metadata)(column, crate::release::META_STDDEV)
    }

    /// The half-width of the 95 % interval of the noise on `column`: the
    /// mechanism's own (ln 20 · b for Laplace, 1.96 σ for Gaussian noise).
    fn half(&self, column: &str) -> Result<f64> {
        (self.metadata)(column, crate::release::META_CI95)
    }
}

/// The 97.5 % quantile of the standard normal: 95 % intervals are ± Z95 σ.
const Z95: f64 = 1.959963984540054;

/// The study `kind` with `params`.
fn study(kind: &str, params: &BTreeMap<String, String>, policy: &Policy) -> Result<Box<dyn Study>> {
    Ok(match kind {
        "lift" => Box::new(Lift::from_params(params, policy)?),
        "match_rate" => Box::new(MatchRate::from_params(params, policy)?),
        "reach" => Box::new(Reach::from_params(params, policy)?),
        "attribution" => Box::new(Attribution::from_params(params, policy)?),
        "cohorts" => Box::new(Cohorts::from_params(params, policy)?),
        other => return Err(invalid(other, "no such study")),
    })
}

/// Check that `params` are among `known`.
fn known_params(kind: &str, params: &BTreeMap<String, String>, known: &[&str]) -> Result<()> {
    match params.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => Err(invalid(kind, format!("unknown parameter `{unknown}`; the parameters are {}", known.join(", ")))),
        None => Ok(()),
    }
}

/// A parameter naming a protected dataset: the dataset and its privacy unit.
fn protected_dataset(kind: &str, params: &BTreeMap<String, String>, name: &str, policy: &Policy) -> Result<(String, String)> {
    let d = params
        .get(name)
        .cloned()
        .ok_or_else(|| invalid(kind, format!("missing parameter `{name}` (give it as {name} => …, or in the manifest's [studies.{kind}])")))?;
    let dataset = policy.dataset(&d).ok_or_else(|| invalid(kind, format!("{name} => {d}: no such dataset")))?;
    let unit = dataset.privacy_unit.clone().ok_or_else(|| invalid(kind, format!("{name} => {d}: a public dataset has no people")))?;
    Ok((d, unit))
}

fn invalid(study: &str, detail: impl Into<String>) -> DpError {
    DpError::InvalidOption { option: study.to_string(), detail: detail.into() }
}

/// Replace the study call in `statement`'s `FROM` (in the outermost query,
/// or the one under EXPLAIN) by the SQL that answers it. Returns the
/// statement unchanged when it calls none, and the options the study sets
/// (its `epsilon`), which take precedence over `asked` (the query's,
/// session's and connection's).
pub(crate) async fn expand(
    state: &SessionState,
    mut statement: DfStatement,
    policy: &Policy,
    asked: &QueryOptions,
) -> Result<(DfStatement, QueryOptions)> {
    // The study's own SQL quotes in the generic dialect's way, whatever
    // the session's dialect is.
    let dialect = datafusion::config::Dialect::Generic;
    let Some(factor) = study_factor(&mut statement)? else {
        return Ok((statement, QueryOptions::default()));
    };
    let TableFactor::Table { name, alias, args, .. } = &*factor else { unreachable!("study_factor finds tables") };
    let kind = name.to_string().to_ascii_lowercase();
    let mut params = policy.studies.get(&kind).cloned().unwrap_or_default();
    for arg in args.as_ref().map(|a| a.args.as_slice()).unwrap_or_default() {
        let (name, value) = named_argument(&kind, arg)?;
        params.insert(name, value);
    }
    let alias = alias.clone().unwrap_or(TableAlias { explicit: true, name: Ident::new(&kind), columns: Vec::new(), at: None });
    let study = study(&kind, &params, policy)?;
    // Flags are true or false (the manifest knows a column's role, the
    // catalog its type).
    for (param, dataset, column) in study.flags() {
        if column_type(state, dataset, column).await != Some(arrow::datatypes::DataType::Boolean) {
            return Err(invalid(&kind, format!("{param} => {column}: not a true/false column of {dataset}")));
        }
    }
    let call = format!(
        "{kind}({})",
        params.iter().map(|(k, v)| format!("{k} => {}", text(v))).collect::<Vec<_>>().join(", ")
    );
    let mut study_options = QueryOptions { study: Some(call), ..QueryOptions::default() };
    if let Some(e) = params.get("epsilon") {
        study_options.set("epsilon", e)?;
    }
    for (option, value) in study.bounds() {
        study_options.set(option, &value)?;
    }
    let mut options = study_options.over(asked).resolve(&policy.defaults)?;
    study_options.column_split = study.split(options.noise);
    options.column_split = study_options.column_split.clone();
    // The noise of the study's counts: its DP aggregate planned alone.
    let counts = parse_query(state, &study.released_sql(), &dialect)?;
    let plan = state.statement_to_plan(counts).await.map_err(DpError::Sql)?;
    let PlannedQuery::Dp(q) = crate::rewrite::plan_query(&plan, policy, &options)? else {
        return Err(invalid(&kind, "the study's data could not be planned as a DP aggregate"));
    };
    let announced = crate::release::announced_dp_schema(&q)?;
    let metadata = |column: &str, key: &str| -> Result<f64> {
        announced
            .field_with_name(column)
            .ok()
            .and_then(|f| f.metadata().get(key))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| invalid(&kind, format!("no noise was calibrated for the study's {column}")))
    };
    let sql = study.sql(&Noise { metadata: &metadata })?;
    let DfStatement::Statement(parsed) = parse_query(state, &sql, &dialect)? else { unreachable!("parse_query gives a query") };
    let SqlStatement::Query(query) = *parsed else { unreachable!("parse_query gives a query") };
    *factor = TableFactor::Derived { lateral: false, subquery: query, alias: Some(alias), sample: None };
    Ok((statement, study_options))
}

/// The type of `table.column` in `state`'s catalog.
async fn column_type(state: &SessionState, table: &str, column: &str) -> Option<arrow::datatypes::DataType> {
    let reference = datafusion::common::TableReference::bare(table);
    let provider = state.schema_for_ref(reference.clone()).ok()?.table(reference.table()).await.ok()??;
    provider.schema().field_with_name(column).ok().map(|f| f.data_type().clone())
}

/// Parse SQL the study wrote (always one query).
fn parse_query(state: &SessionState, sql: &str, dialect: &datafusion::config::Dialect) -> Result<DfStatement> {
    state.sql_to_statement(sql, dialect).map_err(DpError::Sql)
}

/// The FROM item of `statement` that calls a study, if any. A statement
/// with a `WITH` of its own cannot call one: the study's SQL would see its
/// names, which could stand for the datasets the study reads.
fn study_factor(statement: &mut DfStatement) -> Result<Option<&mut TableFactor>> {
    let query = match statement {
        DfStatement::Explain(explain) => return study_factor(&mut explain.statement),
        DfStatement::Statement(s) => match s.as_mut() {
            SqlStatement::Query(q) => q,
            _ => return Ok(None),
        },
        _ => return Ok(None),
    };
    let has_with = query.with.is_some();
    let SetExpr::Select(select) = query.body.as_mut() else { return Ok(None) };
    let found = select.from.iter_mut().flat_map(|t| std::iter::once(&mut t.relation).chain(t.joins.iter_mut().map(|j| &mut j.relation))).find(|f| {
        matches!(f, TableFactor::Table { name, args: Some(_), .. } if STUDIES.contains(&name.to_string().to_ascii_lowercase().as_str()))
    });
    match found {
        Some(TableFactor::Table { name, .. }) if has_with => Err(invalid(
            &name.to_string().to_ascii_lowercase(),
            "a statement that calls a study cannot have a WITH clause of its own (its names could stand for the study's datasets)",
        )),
        found => Ok(found),
    }
}

/// One `name => value` argument; values are literals or bare names.
fn named_argument(study: &str, arg: &FunctionArg) -> Result<(String, String)> {
    let FunctionArg::Named { name, arg: FunctionArgExpr::Expr(value), .. } = arg else {
        return Err(invalid(study, format!("arguments are named: {study}(exposure => 'impressions', …); got `{arg}`")));
    };
    let value = match value {
        SqlExpr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => s.clone(),
            Value::Number(n, _) => n.to_string(),
            Value::Boolean(b) => b.to_string(),
            other => return Err(invalid(study, format!("`{}` = {other}: expected a text, a number or a name", name.value))),
        },
        SqlExpr::Identifier(i) => i.value.clone(),
        other => return Err(invalid(study, format!("`{}` = {other}: expected a text, a number or a name", name.value))),
    };
    if value.len() > 256 {
        return Err(invalid(study, format!("`{}`: a parameter is at most 256 characters", name.value)));
    }
    Ok((name.value.to_ascii_lowercase(), value))
}

/// A SQL identifier, quoted.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A SQL text literal.
fn text(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Lift (incrementality): people exposed per group of an assignment column
/// (test/hold-out, or a geo hold-out's regions), how many of them had an
/// outcome within the attribution window after their first exposure, the
/// outcome's value, and each group's lift over the control group:
/// `rate_g / rate_control − 1` with a 95 % interval.
///
/// The interval is the delta method on the log of the rate ratio. Each
/// rate's variance adds the sampling variance of a proportion,
/// `p (1 − p) / n`, and the variance the DP noise adds to `c / n` (noisy
/// converters c and people n with noise standard deviations σ_c and σ_n:
/// `(σ_c² + p² σ_n²) / n²`); `se = sqrt(var_t / p_t² + var_c / p_c²)`, and
/// the interval is `(p_t / p_c) · exp(± 1.96 se) − 1`.
struct Lift {
    unit: String,
    outcome_unit: String,
    exposure: String,
    outcome: String,
    group: String,
    control: String,
    time: String,
    outcome_time: String,
    window_days: u32,
    /// The outcome's value column and the per-person cap of its sum.
    value: Option<Capped>,
    /// The conversion rate the analyst expects (public, from the call):
    /// what the budget split is tuned for.
    expected_rate: f64,
}

impl Lift {
    fn from_params(params: &BTreeMap<String, String>, policy: &Policy) -> Result<Lift> {
        known_params(
            "lift",
            params,
            &["exposure", "outcome", "group", "control", "time", "outcome_time", "window_days", "value", "value_cap", "expected_rate", "epsilon"],
        )?;
        let get = |name: &str| -> Result<String> {
            params.get(name).cloned().ok_or_else(|| invalid("lift", format!("missing parameter `{name}` (give it as {name} => …, or in the manifest's [studies.lift])")))
        };
        let (exposure, unit) = protected_dataset("lift", params, "exposure", policy)?;
        let (outcome, outcome_unit) = protected_dataset("lift", params, "outcome", policy)?;
        let time = params.get("time").cloned().unwrap_or_else(|| "ts".to_string());
        let window_days = whole_param("lift", params, "window_days", 30, 1..=3650)?;
        // A person's outcomes within the window: a few at most.
        let value = measure_param("lift", params, "value", "value_cap", &outcome, 4.0, policy)?;
        let group = get("group")?;
        let control = get("control")?;
        // The control group must be a key the group column can release.
        if let Some(ColumnRole::Dimension { domain: Some(domain), .. }) = policy.dataset(&exposure).map(|d| d.role(&group)) {
            if !domain.values().contains(&control) {
                return Err(invalid("lift", format!("control => {control}: not a value of {exposure}.{group} (its values: {})", domain.values().join(", "))));
            }
        }
        let expected_rate = match params.get("expected_rate") {
            Some(r) => r.parse::<f64>().ok().filter(|r| *r > 0.0 && *r < 1.0).ok_or_else(|| invalid("lift", format!("expected_rate => {r}: a rate above 0 and below 1")))?,
            None => 0.05,
        };
        Ok(Lift {
            expected_rate,
            unit,
            outcome_unit,
            exposure,
            outcome,
            group,
            control,
            outcome_time: params.get("outcome_time").cloned().unwrap_or_else(|| time.clone()),
            time,
            window_days,
            value,
        })
    }

    /// The budget of the DP aggregate's columns (people, converters, value).
    ///
    /// The lift's noise comes through each rate c / n, whose noise variance
    /// is (σ_c² + p² σ_n²) / n². With Laplace noise σ ∝ 1/ε, and
    /// minimising σ_c² + p² σ_n² over ε_c + ε_n = ε gives ε_n : ε_c =
    /// p^(2/3) : 1; with Gaussian noise σ² ∝ 1/ρ, and over ρ_c + ρ_n = ρ it
    /// gives ρ_n : ρ_c = p : 1 — at the expected rate p (a public parameter,
    /// never the data's rate). The value column, not part of the lift, gets
    /// a quarter. The split only moves budget between columns: their shares
    /// still add up to the query's (sequential composition, in ε or in ρ).
    fn column_split(&self, noise: crate::options::NoiseKind) -> crate::options::ColumnSplit {
        let (exponent, shape) = match noise {
            crate::options::NoiseKind::Laplace => (2.0 / 3.0, "p^(2/3) : 1"),
            crate::options::NoiseKind::Gaussian => (1.0, "p : 1 (in rho)"),
        };
        let (people, converters) = (self.expected_rate.powf(exponent), 1.0);
        let counts = if self.value.is_some() { 0.75 } else { 1.0 };
        let mut weights = vec![counts * people / (people + converters), counts * converters / (people + converters)];
        if self.value.is_some() {
            weights.push(0.25);
        }
        crate::options::ColumnSplit {
            weights,
            why: format!(
                "the lift study's: people and converters in proportion {shape}, which minimises the noise of each group's conversion rate at the expected rate p = {}{}",
                self.expected_rate,
                if self.value.is_some() { "; the value a quarter" } else { "" }
            ),
        }
    }

    /// Above the DP aggregate: rates, the control group's rate beside every
    /// row (a window over the released rows), and lift with its interval.
    fn lift_above(&self, people_sd: f64, converters_sd: f64) -> String {
        let (value, value_out) = match &self.value {
            Some(Capped { column: v, .. }) => (
                ", value".to_string(),
                format!(", value AS {}, CAST(value AS DOUBLE) / CAST(GREATEST(people, 1) AS DOUBLE) AS {}", ident(v), ident(&format!("{v}_per_person"))),
            ),
            None => (String::new(), String::new()),
        };
        let control = text(&self.control);
        format!(
            ", study_rates AS (SELECT grp, people, converters{value}, \
               LEAST(GREATEST(CAST(converters AS DOUBLE) / CAST(GREATEST(people, 1) AS DOUBLE), 0.0), 1.0) AS rate, \
               CAST(GREATEST(people, 1) AS DOUBLE) AS n FROM study_released), \
             study_variances AS (SELECT *, rate * (1.0 - rate) / n + ({cs:?} * {cs:?} + rate * rate * {ps:?} * {ps:?}) / (n * n) AS var FROM study_rates), \
             study_against AS (SELECT *, MAX(CASE WHEN grp = {control} THEN rate END) OVER () AS control_rate, \
               MAX(CASE WHEN grp = {control} THEN var END) OVER () AS control_var FROM study_variances), \
             study_lift AS (SELECT *, CASE WHEN grp <> {control} AND rate > 0 AND control_rate > 0 \
               THEN sqrt(var / (rate * rate) + control_var / (control_rate * control_rate)) END AS se FROM study_against), \
             study_interval AS (SELECT *, rate / control_rate * exp(-{Z95:?} * se) AS ratio_low, \
               rate / control_rate * exp({Z95:?} * se) AS ratio_high FROM study_lift) \
             SELECT grp AS {group}, people, converters{value_out}, rate AS conversion_rate, \
               CASE WHEN grp <> {control} AND control_rate > 0 THEN rate / control_rate - 1.0 END AS lift, \
               ratio_low - 1.0 AS lift_ci_low, ratio_high - 1.0 AS lift_ci_high, \
               CASE WHEN se IS NULL THEN NULL ELSE ratio_low > 1.0 OR ratio_high < 1.0 END AS significant \
             FROM study_interval ORDER BY grp",
            cs = converters_sd,
            ps = people_sd,
            group = ident(&self.group),
        )
    }
}

impl Study for Lift {
    fn split(&self, noise: crate::options::NoiseKind) -> Option<crate::options::ColumnSplit> {
        Some(self.column_split(noise))
    }

    /// The people of the exposure dataset with their group and first
    /// exposure, and those with an outcome in the window, with its value.
    fn ctes(&self) -> String {
        let value = match &self.value {
            Some(c) => format!(", {} AS value", c.clamp(&format!("SUM(o.{})", ident(&c.column)))),
            None => String::new(),
        };
        format!(
            "WITH study_exposed AS (SELECT {unit} AS uid, MIN({group}) AS grp, MIN({time}) AS first_at FROM {exposure} GROUP BY {unit}), \
             study_outcomes AS (SELECT o.{ounit} AS uid{value} FROM {outcome} o JOIN study_exposed e ON o.{ounit} = e.uid \
             WHERE o.{otime} > e.first_at AND o.{otime} <= e.first_at + INTERVAL '{days} days' GROUP BY o.{ounit})",
            unit = ident(&self.unit),
            group = ident(&self.group),
            time = ident(&self.time),
            exposure = ident(&self.exposure),
            ounit = ident(&self.outcome_unit),
            outcome = ident(&self.outcome),
            otime = ident(&self.outcome_time),
            days = self.window_days,
        )
    }

    /// The study's one DP aggregate: people, converters (and value) per group.
    fn released_select(&self) -> String {
        let value = if self.value.is_some() { ", SUM(a.value) AS value" } else { "" };
        format!(
            "SELECT e.grp AS grp, COUNT(*) AS people, COUNT(a.uid) AS converters{value} \
             FROM study_exposed e LEFT JOIN study_outcomes a ON e.uid = a.uid GROUP BY e.grp"
        )
    }

    fn above(&self, noise: &Noise) -> Result<String> {
        Ok(self.lift_above(noise.sd("people")?, noise.sd("converters")?))
    }
}

/// Match rate: the people of two parties' datasets, how many are in both,
/// and the share of each dataset's people found in the other, with 95 %
/// intervals. The counts are of all people (no sample), so the intervals
/// are the DP noise's alone.
struct MatchRate {
    left: (String, String),
    right: (String, String),
}

impl MatchRate {
    fn from_params(params: &BTreeMap<String, String>, policy: &Policy) -> Result<MatchRate> {
        known_params("match_rate", params, &["left", "right", "epsilon"])?;
        Ok(MatchRate {
            left: protected_dataset("match_rate", params, "left", policy)?,
            right: protected_dataset("match_rate", params, "right", policy)?,
        })
    }
}

impl Study for MatchRate {
    /// One row per person with a 0/1 flag per dataset; each count is a sum
    /// of flags (a person changes it by at most 1).
    fn ctes(&self) -> String {
        format!(
            "WITH study_seen AS (SELECT {lu} AS uid, 1 AS in_left, 0 AS in_right FROM {l} UNION ALL SELECT {ru} AS uid, 0 AS in_left, 1 AS in_right FROM {r}), \
             study_people AS (SELECT uid, MAX(in_left) AS in_left, MAX(in_right) AS in_right FROM study_seen GROUP BY uid)",
            lu = ident(&self.left.1),
            l = ident(&self.left.0),
            ru = ident(&self.right.1),
            r = ident(&self.right.0),
        )
    }

    fn released_select(&self) -> String {
        "SELECT SUM(in_left) AS left_people, SUM(in_right) AS right_people, SUM(in_left * in_right) AS matched FROM study_people".to_string()
    }

    /// Each rate m / n with the interval (m ± h_m) / n widened by r h_n / n
    /// for the noise on n: h the noise's 95 % half-widths. A sum of
    /// half-widths covers the sum of two independent noises at least as
    /// often as each covers its own (at least 95 %).
    fn above(&self, noise: &Noise) -> Result<String> {
        let (hl, hr, hm) = (noise.half("left_people")?, noise.half("right_people")?, noise.half("matched")?);
        // matched / n, kept in [0, 1], and its interval's half-width.
        let rate = |n: &str| format!("LEAST(GREATEST(CAST(matched AS DOUBLE) / CAST(GREATEST({n}, 1) AS DOUBLE), 0.0), 1.0)");
        let half = |n: &str, hn: f64| format!("(({hm:?} + {} * {hn:?}) / CAST(GREATEST({n}, 1) AS DOUBLE))", rate(n));
        let (left_rate, left_half, right_rate, right_half) = (rate("left_people"), half("left_people", hl), rate("right_people"), half("right_people", hr));
        Ok(format!(
            "SELECT {ln} AS left_dataset, left_people, {rn} AS right_dataset, right_people, matched, \
               {left_rate} AS left_match_rate, \
               GREATEST({left_rate} - {left_half}, 0.0) AS left_match_rate_ci_low, \
               LEAST({left_rate} + {left_half}, 1.0) AS left_match_rate_ci_high, \
               {right_rate} AS right_match_rate, \
               GREATEST({right_rate} - {right_half}, 0.0) AS right_match_rate_ci_low, \
               LEAST({right_rate} + {right_half}, 1.0) AS right_match_rate_ci_high \
             FROM study_released",
            ln = text(&self.left.0),
            rn = text(&self.right.0),
        ))
    }
}

/// Reach and frequency: people reached in all, per channel (each value of
/// the channel column's public domain), in each pair of channels, and how
/// many people saw how many impressions (frequency buckets, from the
/// `buckets` parameter's lower ends, e.g. `1,2,3,5,10`).
///
/// All of it is one DP aggregate over one row per person (a count of their
/// impressions and a 0/1 flag per channel): each column is a sum of a
/// person's 0/1 values, so a person changes each by at most 1, and the
/// columns share the budget evenly. The intervals are the noise's alone
/// (the counts are of all people), from the mechanism's 95 % half-width.
struct Reach {
    exposure: (String, String),
    channel: String,
    channels: Vec<String>,
    buckets: Vec<u64>,
}

impl Reach {
    fn from_params(params: &BTreeMap<String, String>, policy: &Policy) -> Result<Reach> {
        known_params("reach", params, &["exposure", "channel", "buckets", "epsilon"])?;
        let exposure = protected_dataset("reach", params, "exposure", policy)?;
        let channel = params.get("channel").cloned().unwrap_or_else(|| "channel".to_string());
        let channels = match policy.dataset(&exposure.0).map(|d| d.role(&channel)) {
            Some(ColumnRole::Dimension { domain: Some(crate::policy::Domain::Strings(values)), .. }) if values.len() <= 12 => values,
            _ => {
                return Err(invalid(
                    "reach",
                    format!("channel => {channel}: a dimension of {} with a public list of at most 12 values", exposure.0),
                ))
            }
        };
        let text = params.get("buckets").cloned().unwrap_or_else(|| "1,2,3,5,10".to_string());
        let buckets: Vec<u64> = text
            .split(',')
            .map(|b| b.trim().parse::<u64>().ok().filter(|b| (1..=1_000_000).contains(b)))
            .collect::<Option<Vec<_>>>()
            .filter(|b| !b.is_empty() && b.len() <= 20 && b.windows(2).all(|w| w[0] < w[1]))
            .ok_or_else(|| invalid("reach", format!("buckets => {text}: increasing whole numbers from 1, at most 20 (each a bucket's lowest frequency)")))?;
        Ok(Reach { exposure, channel, channels, buckets })
    }

    /// Each released column: its name and its aggregate over the people's
    /// rows (a count, or a sum of a per-person 0/1 value).
    fn columns(&self) -> Vec<(String, String)> {
        let mut out = vec![("people".to_string(), "COUNT(*)".to_string())];
        for (i, c) in self.channels.iter().enumerate() {
            out.push((format!("reach_{c}"), format!("SUM(c{i})")));
        }
        for i in 0..self.channels.len() {
            for j in i + 1..self.channels.len() {
                out.push((format!("overlap_{}_{}", self.channels[i], self.channels[j]), format!("SUM(c{i} * c{j})")));
            }
        }
        for (k, low) in self.buckets.iter().enumerate() {
            let (name, test) = match self.buckets.get(k + 1) {
                Some(next) if *next == low + 1 => (format!("frequency_{low}"), format!("n = {low}")),
                Some(next) => (format!("frequency_{low}_to_{}", next - 1), format!("n >= {low} AND n < {next}")),
                None => (format!("frequency_{low}_or_more"), format!("n >= {low}")),
            };
            out.push((name, format!("SUM(CASE WHEN {test} THEN 1 ELSE 0 END)")));
        }
        out
    }
}

impl Study for Reach {
    /// One row per person: their impressions and a 0/1 flag per channel.
    fn ctes(&self) -> String {
        let flags: Vec<String> = self
            .channels
            .iter()
            .enumerate()
            .map(|(i, c)| format!("MAX(CASE WHEN {} = {} THEN 1 ELSE 0 END) AS c{i}", ident(&self.channel), text(c)))
            .collect();
        format!(
            "WITH study_people AS (SELECT {unit} AS uid, COUNT(*) AS n, {flags} FROM {exposure} GROUP BY {unit})",
            unit = ident(&self.exposure.1),
            flags = flags.join(", "),
            exposure = ident(&self.exposure.0),
        )
    }

    /// The study's one DP aggregate.
    fn released_select(&self) -> String {
        let columns: Vec<String> = self.columns().iter().map(|(name, aggregate)| format!("{aggregate} AS {}", ident(name))).collect();
        format!("SELECT {} FROM study_people", columns.join(", "))
    }

    fn above(&self, noise: &Noise) -> Result<String> {
        let mut out = Vec::new();
        for (name, _) in self.columns() {
            let half = noise.half(&name)?;
            let n = ident(&name);
            out.push(format!("GREATEST({n}, 0) AS {n}"));
            out.push(format!("GREATEST({n} - {half:?}, 0.0) AS {}", ident(&format!("{name}_ci_low"))));
            out.push(format!("{n} + {half:?} AS {}", ident(&format!("{name}_ci_high"))));
        }
        Ok(format!("SELECT {} FROM study_released", out.join(", ")))
    }
}

/// The bounds of an aggregate over one row per person and group, a person
/// in at most `groups` groups.
fn one_row_in_each_of(groups: u32) -> Vec<(&'static str, String)> {
    vec![("max_groups_contributed", groups.to_string()), ("max_contributions_per_group", "1".to_string())]
}

/// A whole-number parameter within `range`, or `default` when left out.
fn whole_param(kind: &str, params: &BTreeMap<String, String>, name: &str, default: u32, range: std::ops::RangeInclusive<u32>) -> Result<u32> {
    match params.get(name) {
        None => Ok(default),
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|x| range.contains(x))
            .ok_or_else(|| invalid(kind, format!("{name} => {v}: a whole number from {} to {}", range.start(), range.end()))),
    }
}

/// A number parameter within `range`, or `default` when left out.
fn number_param(kind: &str, params: &BTreeMap<String, String>, name: &str, default: f64, range: std::ops::RangeInclusive<f64>, what: &str) -> Result<f64> {
    match params.get(name) {
        None => Ok(default),
        Some(v) => v.parse::<f64>().ok().filter(|x| range.contains(x)).ok_or_else(|| invalid(kind, format!("{name} => {v}: {what}"))),
    }
}

/// A measure column of `dataset` named by parameter `name`, with the cap of
/// its per-person sum (`cap_param`, by default `times` the measure's upper
/// bound).
fn measure_param(
    kind: &str,
    params: &BTreeMap<String, String>,
    name: &str,
    cap_param: &str,
    dataset: &str,
    times: f64,
    policy: &Policy,
) -> Result<Option<Capped>> {
    let Some(v) = params.get(name) else { return Ok(None) };
    let (lower, upper) = match policy.dataset(dataset).map(|d| d.role(v)) {
        Some(ColumnRole::Measure { lower, upper }) => (lower, upper),
        _ => return Err(invalid(kind, format!("{name} => {v}: not a measure of {dataset}"))),
    };
    let high = number_param(kind, params, cap_param, upper.max(1e-9) * times, 1e-6..=1e15, "a number from 0.000001")?;
    // A measure that can be negative (GGR, a refund) is capped as far below 0.
    let low = if lower < 0.0 { -(if params.contains_key(cap_param) { high } else { -lower * times }) } else { 0.0 };
    Ok(Some(Capped { column: v.clone(), low, high }))
}

/// A measure column and the bounds of a person's sum of it.
struct Capped {
    column: String,
    low: f64,
    high: f64,
}

impl Capped {
    /// `sum` (a per-person sum of the column) kept within the bounds.
    fn clamp(&self, sum: &str) -> String {
        format!("GREATEST(LEAST({sum}, {:?}), {:?})", self.high, self.low)
    }
}

/// A dimension column of `dataset` named by parameter `name`.
fn dimension_param(kind: &str, params: &BTreeMap<String, String>, name: &str, default: &str, dataset: &str, policy: &Policy) -> Result<String> {
    let column = params.get(name).cloned().unwrap_or_else(|| default.to_string());
    match policy.dataset(dataset).map(|d| d.role(&column)) {
        Some(ColumnRole::Dimension { .. }) => Ok(column),
        _ => Err(invalid(kind, format!("{name} => {column}: not a dimension of {dataset}"))),
    }
}

/// Attribution and commission: each outcome (a conversion, a deposit, a
/// trade) is credited to the touches (impressions, clicks, referrals) of
/// the same person within `window_days` before it — all of it to the last
/// touch, to the first, or in equal parts to each (`model => 'last' |
/// 'first' | 'linear'`) — and the credit is summed per value of the touch's
/// `credit` column (campaign, channel, affiliate, introducing broker). With
/// a `value` (revenue, GGR, lots), the credited value is released gross and
/// returned (`returns` names the outcome's flag of a reversed order), and
/// the commission is `commission_rate` times the net value: a RevShare
/// fraction of GGR, or an amount per lot.
///
/// A touch counts if it is strictly before the outcome (a touch at the
/// outcome's very time does not); touches at the same time are ordered by
/// their other columns. `conversions` counts the credited outcomes that
/// were not returned; the gross value includes returned ones, the returned
/// value is theirs, and the net is the difference. A NULL value counts as
/// 0 and a NULL returns flag as not returned.
///
/// Why it is private: the credit is worked out per person (windows
/// partitioned by the person, a join on the person), then summed per person
/// and credited key and clamped (`conversions_cap`, `value_cap`), so one
/// person adds at most those caps to each of at most `groups_per_person`
/// keys — the bounds the DP aggregate is calibrated to. Net value and
/// commission are arithmetic on released sums (post-processing); their
/// intervals add the two sums' 95 % noise half-widths.
struct Attribution {
    touches: (String, String),
    outcome: (String, String),
    credit: String,
    model: String,
    time: String,
    outcome_time: String,
    window_days: u32,
    value: Option<Capped>,
    returns: Option<String>,
    commission_rate: Option<f64>,
    conversions_cap: f64,
    groups_per_person: u32,
}

impl Attribution {
    fn from_params(params: &BTreeMap<String, String>, policy: &Policy) -> Result<Attribution> {
        const KIND: &str = "attribution";
        known_params(
            KIND,
            params,
            &[
                "touches", "outcome", "credit", "model", "time", "outcome_time", "window_days", "value", "value_cap", "returns",
                "commission_rate", "conversions_cap", "groups_per_person", "epsilon",
            ],
        )?;
        let touches = protected_dataset(KIND, params, "touches", policy)?;
        let outcome = protected_dataset(KIND, params, "outcome", policy)?;
        let credit = dimension_param(KIND, params, "credit", "channel", &touches.0, policy)?;
        let model = params.get("model").cloned().unwrap_or_else(|| "last".to_string()).to_ascii_lowercase();
        if !["last", "first", "linear"].contains(&model.as_str()) {
            return Err(invalid(KIND, format!("model => {model}: last, first or linear")));
        }
        let time = dimension_param(KIND, params, "time", "ts", &touches.0, policy)?;
        let outcome_time = dimension_param(KIND, params, "outcome_time", &time, &outcome.0, policy)?;
        // A person may be credited to as many keys as the manifest says
        // they may have (so no one's credit is dropped when that holds),
        // or 3 when it says nothing.
        let declared = match policy.dataset(&touches.0).map(|d| d.role(&credit)) {
            Some(ColumnRole::Dimension { groups_per_person: Some(g), .. }) => g.clamp(1, 100),
            _ => 3,
        };
        let returns = match params.get("returns") {
            None => None,
            Some(r) => match policy.dataset(&outcome.0).map(|d| d.role(r)) {
                Some(ColumnRole::Dimension { .. }) => Some(r.clone()),
                _ => return Err(invalid(KIND, format!("returns => {r}: not a dimension (a true/false flag) of {}", outcome.0))),
            },
        };
        Ok(Attribution {
            window_days: whole_param(KIND, params, "window_days", 30, 1..=3650)?,
            value: measure_param(KIND, params, "value", "value_cap", &outcome.0, 2.0, policy)?,
            commission_rate: match params.get("commission_rate") {
                None => None,
                Some(_) => Some(number_param(KIND, params, "commission_rate", 0.0, 0.0..=1e9, "a number from 0 (a share of the value, or an amount per unit)")?),
            },
            conversions_cap: number_param(KIND, params, "conversions_cap", 5.0, 1.0..=1000.0, "a number from 1 to 1000")?,
            groups_per_person: whole_param(KIND, params, "groups_per_person", declared, 1..=100)?,
            outcome_time,
            time,
            returns,
            credit,
            model,
            touches,
            outcome,
        })
    }

    /// Each released column and its aggregate over the per-person credit.
    fn columns(&self) -> Vec<&'static str> {
        match (&self.value, &self.returns) {
            (None, _) => vec!["conversions"],
            (Some(_), None) => vec!["conversions", "gross_value"],
            (Some(_), Some(_)) => vec!["conversions", "gross_value", "returned_value"],
        }
    }
}

impl Study for Attribution {
    /// A person contributes one row (after the per-person sums) to each of
    /// at most `groups_per_person` credited keys.
    fn bounds(&self) -> Vec<(&'static str, String)> {
        one_row_in_each_of(self.groups_per_person)
    }

    fn flags(&self) -> Vec<(&'static str, &str, &str)> {
        self.returns.iter().map(|r| ("returns", self.outcome.0.as_str(), r.as_str())).collect()
    }

    /// Outcomes numbered per person, each joined with the same person's
    /// touches in the window before it, each touch's weight under the
    /// model, and per person and credited key the capped sums.
    fn ctes(&self) -> String {
        let returned = match &self.returns {
            // A true/false flag (another type is refused at planning);
            // NULL counts as not returned.
            Some(r) => format!("CASE WHEN {} IS TRUE THEN 1.0 ELSE 0.0 END", ident(r)),
            None => "0.0".to_string(),
        };
        let value = match &self.value {
            Some(c) => format!("COALESCE(CAST({} AS DOUBLE), 0.0)", ident(&c.column)),
            None => "0.0".to_string(),
        };
        let (order, weight, keep) = match self.model.as_str() {
            "first" => ("ASC", "1.0", "rn = 1"),
            "linear" => ("DESC", "1.0 / CAST(touches AS DOUBLE)", "TRUE"),
            _ => ("DESC", "1.0", "rn = 1"),
        };
        let clamp = |sum: &str| self.value.as_ref().map(|c| c.clamp(sum)).unwrap_or_else(|| "0.0".to_string());
        format!(
            "WITH study_outcomes AS (SELECT {ounit} AS uid, {otime} AS at, ROW_NUMBER() OVER (PARTITION BY {ounit} ORDER BY {otime}) AS k, \
               {returned} AS returned, {value} AS value FROM {outcome}), \
             study_touches AS (SELECT o.uid, o.k, o.returned, o.value, t.{credit} AS credit, \
               ROW_NUMBER() OVER (PARTITION BY o.uid, o.k ORDER BY t.{time} {order}) AS rn, COUNT(*) OVER (PARTITION BY o.uid, o.k) AS touches \
               FROM study_outcomes o JOIN {touches} t ON t.{unit} = o.uid \
               WHERE t.{time} < o.at AND t.{time} >= o.at - INTERVAL '{days} days'), \
             study_weighted AS (SELECT uid, credit, returned, value, {weight} AS w FROM study_touches WHERE {keep}), \
             study_credit AS (SELECT uid, credit, \
               GREATEST(LEAST(SUM(w * (1.0 - returned)), {ccap:?}), 0.0) AS conversions, \
               {gross} AS gross_value, {returned_value} AS returned_value \
               FROM study_weighted GROUP BY uid, credit)",
            ounit = ident(&self.outcome.1),
            otime = ident(&self.outcome_time),
            outcome = ident(&self.outcome.0),
            credit = ident(&self.credit),
            time = ident(&self.time),
            touches = ident(&self.touches.0),
            unit = ident(&self.touches.1),
            days = self.window_days,
            ccap = self.conversions_cap,
            gross = clamp("SUM(w * value)"),
            returned_value = clamp("SUM(w * value * returned)"),
        )
    }

    fn released_select(&self) -> String {
        let sums: Vec<String> = self.columns().iter().map(|c| format!("SUM({c}) AS {c}")).collect();
        format!("SELECT credit, {} FROM study_credit GROUP BY credit", sums.join(", "))
    }

    /// Shares of the credited conversions, net value and commission, each
    /// figure with its 95 % interval: the noise's own, and for the net (a
    /// difference of two noisy sums) the sum of the two half-widths, which
    /// covers the difference of two independent noises at least as often
    /// as each covers its own.
    fn above(&self, noise: &Noise) -> Result<String> {
        let conversions = noise.half("conversions")?;
        let mut out = vec![
            format!("credit AS {}", ident(&self.credit)),
            "conversions".to_string(),
            format!("GREATEST(conversions - {conversions:?}, 0.0) AS conversions_ci_low"),
            format!("conversions + {conversions:?} AS conversions_ci_high"),
            "GREATEST(conversions, 0.0) / GREATEST(SUM(GREATEST(conversions, 0.0)) OVER (), 1e-9) AS share".to_string(),
        ];
        if let Some(Capped { column: v, .. }) = &self.value {
            let gross = noise.half("gross_value")?;
            let (net, net_half) = match &self.returns {
                Some(_) => {
                    out.push(format!("gross_value AS {}", ident(&format!("gross_{v}"))));
                    out.push(format!("returned_value AS {}", ident(&format!("returned_{v}"))));
                    ("(gross_value - returned_value)".to_string(), gross + noise.half("returned_value")?)
                }
                None => ("gross_value".to_string(), gross),
            };
            let name = ident(&format!("net_{v}"));
            out.push(format!("{net} AS {name}"));
            out.push(format!("{net} - {net_half:?} AS {}", ident(&format!("net_{v}_ci_low"))));
            out.push(format!("{net} + {net_half:?} AS {}", ident(&format!("net_{v}_ci_high"))));
            if let Some(rate) = self.commission_rate {
                out.push(format!("{rate:?} * {net} AS commission"));
                out.push(format!("{rate:?} * ({net} - {net_half:?}) AS commission_ci_low"));
                out.push(format!("{rate:?} * ({net} + {net_half:?}) AS commission_ci_high"));
            }
        }
        Ok(format!("SELECT {} FROM study_released ORDER BY credit", out.join(", ")))
    }
}

/// Cohorts: people by the period (`week`, `day` or `month`) of their first
/// exposure, and in each of the `periods` periods from that one on, how
/// many of them had an outcome and its value — a retention or repeat-
/// purchase heatmap. The cohorts and periods are keys of public domains
/// (the periods of the datasets' declared date ranges), so every cell is
/// released, empty or not.
///
/// Why it is private: one row per person and (cohort, period) cell — the
/// cohort is fixed per person, and an outcome counts only in the `periods`
/// periods from the cohort's, so a person is in at most `periods` cells —
/// with a 0/1 membership flag (set only in the cohort's own period), a 0/1
/// active flag and a capped value: each cell's sums move by at most 1, 1
/// and the cap when a person is added or removed. Rates and offsets are
/// post-processing; intervals are the noise's alone (all people counted).
struct Cohorts {
    exposure: (String, String),
    outcome: (String, String),
    time: String,
    outcome_time: String,
    period: String,
    periods: u32,
    value: Option<Capped>,
}

impl Cohorts {
    fn from_params(params: &BTreeMap<String, String>, policy: &Policy) -> Result<Cohorts> {
        const KIND: &str = "cohorts";
        known_params(KIND, params, &["exposure", "outcome", "time", "outcome_time", "period", "periods", "value", "value_cap", "epsilon"])?;
        let exposure = protected_dataset(KIND, params, "exposure", policy)?;
        let outcome = protected_dataset(KIND, params, "outcome", policy)?;
        let time = dimension_param(KIND, params, "time", "ts", &exposure.0, policy)?;
        let outcome_time = dimension_param(KIND, params, "outcome_time", &time, &outcome.0, policy)?;
        let period = params.get("period").cloned().unwrap_or_else(|| "week".to_string()).to_ascii_lowercase();
        if !["day", "week", "month"].contains(&period.as_str()) {
            return Err(invalid(KIND, format!("period => {period}: day, week or month")));
        }
        let periods = whole_param(KIND, params, "periods", 8, 1..=26)?;
        Ok(Cohorts { value: measure_param(KIND, params, "value", "value_cap", &outcome.0, 1.0, policy)?, exposure, outcome, time, outcome_time, period, periods })
    }
}

impl Study for Cohorts {
    /// A person is in at most `periods` cells, once each.
    fn bounds(&self) -> Vec<(&'static str, String)> {
        one_row_in_each_of(self.periods)
    }

    fn ctes(&self) -> String {
        let (value, sum) = match &self.value {
            Some(c) => (format!("COALESCE(CAST(o.{} AS DOUBLE), 0.0)", ident(&c.column)), c.clamp("SUM(value)")),
            None => ("0.0".to_string(), "0.0".to_string()),
        };
        format!(
            "WITH study_exposed AS (SELECT {unit} AS uid, MIN({time}) AS first_at, DATE_TRUNC('{p}', MIN({time})) AS cohort FROM {exposure} GROUP BY {unit}), \
             study_active AS (SELECT o.{ounit} AS uid, e.cohort, DATE_TRUNC('{p}', o.{otime}) AS period, {value} AS value \
               FROM {outcome} o JOIN study_exposed e ON o.{ounit} = e.uid \
               WHERE o.{otime} >= e.first_at AND o.{otime} < e.cohort + INTERVAL '{n} {p}s'), \
             study_rows AS (SELECT uid, cohort, cohort AS period, 1 AS member, 0 AS active, 0.0 AS value FROM study_exposed \
               UNION ALL SELECT uid, cohort, period, 0 AS member, 1 AS active, value FROM study_active), \
             study_cells AS (SELECT uid, cohort, period, MAX(member) AS member, MAX(active) AS active, \
               {sum} AS value FROM study_rows GROUP BY uid, cohort, period)",
            unit = ident(&self.exposure.1),
            time = ident(&self.time),
            exposure = ident(&self.exposure.0),
            ounit = ident(&self.outcome.1),
            otime = ident(&self.outcome_time),
            outcome = ident(&self.outcome.0),
            p = self.period,
            n = self.periods,
        )
    }

    fn released_select(&self) -> String {
        let value = if self.value.is_some() { ", SUM(value) AS value" } else { "" };
        format!("SELECT cohort, period, SUM(member) AS people, SUM(active) AS active{value} FROM study_cells GROUP BY cohort, period")
    }

    /// Each cohort's size (its own period's membership sum) beside each of
    /// its cells, the cell's offset in periods, and the active share.
    fn above(&self, noise: &Noise) -> Result<String> {
        let (people, active) = (noise.half("people")?, noise.half("active")?);
        let offset = match self.period.as_str() {
            "month" => "CAST((date_part('year', period) - date_part('year', cohort)) * 12 + date_part('month', period) - date_part('month', cohort) AS BIGINT)".to_string(),
            p => format!("CAST(round((date_part('epoch', period) - date_part('epoch', cohort)) / {}) AS BIGINT)", if p == "week" { 604800 } else { 86400 }),
        };
        let value = match &self.value {
            Some(Capped { column: v, .. }) => {
                let half = noise.half("value")?;
                format!(
                    ", value AS {v}, value - {half:?} AS {lo}, value + {half:?} AS {hi}, value / GREATEST(cohort_people, 1.0) AS {per}",
                    v = ident(v),
                    lo = ident(&format!("{v}_ci_low")),
                    hi = ident(&format!("{v}_ci_high")),
                    per = ident(&format!("{v}_per_person")),
                )
            }
            None => String::new(),
        };
        Ok(format!(
            ", study_offsets AS (SELECT *, {offset} AS periods_after, \
               CAST(GREATEST(MAX(CASE WHEN period = cohort THEN people END) OVER (PARTITION BY cohort), 0) AS DOUBLE) AS cohort_people FROM study_released) \
             SELECT CAST(cohort AS DATE) AS cohort, periods_after, cohort_people AS people, \
               GREATEST(cohort_people - {people:?}, 0.0) AS people_ci_low, cohort_people + {people:?} AS people_ci_high, \
               GREATEST(active, 0) AS active, GREATEST(active - {active:?}, 0.0) AS active_ci_low, active + {active:?} AS active_ci_high, \
               LEAST(GREATEST(CAST(active AS DOUBLE) / GREATEST(cohort_people, 1.0), 0.0), 1.0) AS active_rate{value} \
             FROM study_offsets WHERE periods_after >= 0 AND periods_after < {n} ORDER BY cohort, periods_after",
            n = self.periods,
        ))
    }
}
