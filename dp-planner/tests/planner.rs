//! The DP planner on a local DataFusion session: which queries it accepts and
//! refuses, and what its rewritten plans compute.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int64Type};
use cleanroom_ledger::{Charge, Ledger, Limits, RedbLedger};
use cleanroom_dp::options::QueryOptions;
use cleanroom_dp::release::{finish, release};
use cleanroom_dp::rewrite::{DpQuery, ExactColumn, PlannedQuery};
use cleanroom_dp::mechanism::{Noise, Share};
use cleanroom_dp::DpError;
use datafusion::prelude::SessionContext;

mod fixtures;
use fixtures::{context, context_without, policy};

async fn plan(sql: &str) -> Result<PlannedQuery, DpError> {
    plan_on(&context(), sql).await
}

async fn plan_on(ctx: &SessionContext, sql: &str) -> Result<PlannedQuery, DpError> {
    cleanroom_dp::plan_sql(&ctx.state(), sql, &policy(), &QueryOptions::default()).await
}

async fn refused_rule(sql: &str) -> &'static str {
    match plan(sql).await {
        Err(e) => e.rule().unwrap_or_else(|| panic!("{sql}: not a refusal: {e}")),
        Ok(_) => panic!("{sql}: accepted"),
    }
}

fn epsilon_of(share: Share) -> f64 {
    match share {
        Share::Epsilon(e) => e,
        Share::Rho(_) => panic!("a Gaussian column"),
    }
}

fn dp(planned: PlannedQuery) -> DpQuery {
    match planned {
        PlannedQuery::Dp(q) => *q,
        other => panic!("not a DP query: {other:?}"),
    }
}

/// The exact bounded value of aggregate `agg` of a query without GROUP BY.
async fn exact_value(query: &DpQuery, agg: usize) -> f64 {
    let b = exact(query).await;
    let values = arrow::compute::cast(b[0].column(agg), &DataType::Float64).unwrap();
    values.as_primitive::<arrow::datatypes::Float64Type>().value(0)
}

async fn exact(query: &DpQuery) -> Vec<RecordBatch> {
    let ctx = context();
    ctx.execute_logical_plan(query.exact_plan.clone()).await.unwrap().collect().await.unwrap()
}

/// Exact bounded value of aggregate `agg` per group key, from the rewritten plan.
async fn exact_by_group(query: &DpQuery, agg: usize) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for b in exact(query).await {
        let keys = b.column(0).as_string::<i32>();
        let values = arrow::compute::cast(b.column(1 + agg), &DataType::Float64).unwrap();
        let values = values.as_primitive::<arrow::datatypes::Float64Type>();
        for i in 0..b.num_rows() {
            out.insert(keys.value(i).to_string(), values.value(i));
        }
    }
    out
}

#[tokio::test]
async fn select_star_is_refused() {
    assert_eq!(refused_rule("SELECT * FROM events").await, "dp_aggregate_required");
}

#[tokio::test]
async fn hidden_column_is_refused_anywhere() {
    assert_eq!(refused_rule("SELECT channel, COUNT(*) FROM events WHERE secret = 'x' GROUP BY channel").await, "hidden_column");
    assert_eq!(refused_rule("SELECT secret, COUNT(*) FROM events GROUP BY secret").await, "hidden_column");
    assert_eq!(refused_rule("SELECT channel, COUNT(secret) FROM events GROUP BY channel").await, "hidden_column");
}

#[tokio::test]
async fn group_key_without_public_domain_needs_delta_for_partition_selection() {
    assert_eq!(refused_rule("SELECT country, COUNT(*) FROM events GROUP BY country").await, "partition_selection_delta");
    assert_eq!(
        refused_rule("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (delta = 1e-6) uid, COUNT(*) FROM events GROUP BY uid").await,
        "privacy_unit_in_output"
    );
    assert!(plan("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (delta = 1e-3) country, COUNT(*) FROM events GROUP BY country").await.is_err(),
        "delta above the per-query cap");
}

/// DP partition selection: a key is released only when enough people have
/// it. Five people live in DE; every cost value belongs to one person.
/// Scale 1/5 and δ = 1e-6 give τ = 4: DE (5 people) is kept unless the noise
/// is ≤ −2 (probability < 1e-4); a one-person key passes only when the noise
/// is ≥ 3 (< 1e-6).
#[tokio::test]
async fn keys_without_public_domain_are_released_by_partition_selection() {
    let q = dp(plan("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 10, delta = 1e-6) country, COUNT(*) AS n FROM events GROUP BY country").await.unwrap());
    let t = q.selection.expect("partition selection");
    assert_eq!(t.threshold, 4, "{t:?}");
    assert!(q.delta > 0.0 && q.delta <= 1e-6 && q.delta == t.delta, "{t:?}");
    assert!(t.epsilon + epsilon_of(q.aggregates[0].share) <= q.epsilon + 1e-12);
    assert_eq!(exact_by_group(&q, 0).await["DE"], 9.0, "the rows of p1 … p5");
    let released = charged_release(&q).await;
    let batch = &released.batches()[0];
    assert_eq!(batch.num_rows(), 1);
    assert_eq!(batch.column(0).as_string::<i32>().value(0), "DE");
    assert_eq!(released.schema().metadata()["cleanroom.charge.delta"], q.delta.to_string());

    let q = dp(plan("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 10, delta = 1e-6) cost, SUM(cost) FROM events GROUP BY cost").await.unwrap());
    let released = charged_release(&q).await;
    assert_eq!(released.batches().iter().map(|b| b.num_rows()).sum::<usize>(), 0, "one-person keys are never released");

    // Mixed keys: the public one keeps its domain (zzz is dropped).
    let q = dp(plan("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 10, delta = 1e-6, max_groups_contributed = 3) country, channel, COUNT(DISTINCT uid) FROM events GROUP BY country, channel").await.unwrap());
    let exact = exact(&q).await;
    let keys: Vec<String> = exact.iter().flat_map(|b| {
        let c = b.column(1).as_string::<i32>();
        (0..b.num_rows()).map(|i| c.value(i).to_string()).collect::<Vec<_>>()
    }).collect();
    assert!(!keys.contains(&"zzz".to_string()), "{keys:?}");

    let planned = plan("EXPLAIN SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (delta = 1e-7) country, COUNT(*) FROM events GROUP BY country").await.unwrap();
    let PlannedQuery::Explain(explain) = planned else { panic!("not an explain") };
    let cost = cleanroom_dp::release::explain(&explain).unwrap().batches()[0].column(1).as_string::<i32>().value(0).to_string();
    assert!(cost.contains("DP partition selection") && cost.contains("delta = "), "{cost}");
}

#[tokio::test]
async fn grouping_by_the_privacy_unit_is_refused() {
    assert_eq!(refused_rule("SELECT uid, COUNT(*) FROM events GROUP BY uid").await, "privacy_unit_in_output");
}

#[tokio::test]
async fn limit_below_the_dp_aggregate_is_refused() {
    assert_eq!(
        refused_rule("SELECT channel, COUNT(*) FROM (SELECT * FROM events LIMIT 3) e GROUP BY channel").await,
        "limit_below_dp_aggregate"
    );
}

#[tokio::test]
async fn joins_must_equate_the_privacy_unit() {
    for (sql, rule) in [
        ("SELECT a.channel, COUNT(*) FROM events a JOIN events b ON a.country = b.country GROUP BY a.channel", "join_on_privacy_unit"),
        ("SELECT e.channel, COUNT(*) FROM events e JOIN orders o ON e.cost = o.amount GROUP BY e.channel", "join_on_privacy_unit"),
        ("SELECT e.channel, COUNT(*) FROM events e JOIN orders o ON e.uid = o.uid OR e.cost = o.amount GROUP BY e.channel", "join_on_privacy_unit"),
        ("SELECT e.channel, COUNT(*) FROM events e CROSS JOIN orders o GROUP BY e.channel", "cross_join"),
        ("SELECT e.channel, COUNT(*) FROM events e, orders o GROUP BY e.channel", "cross_join"),
        ("SELECT e.channel, COUNT(*) FROM events e FULL JOIN orders o ON e.uid = o.uid GROUP BY e.channel", "join_type"),
        ("SELECT f.family, COUNT(*) FROM families f LEFT JOIN events e ON f.channel = e.channel GROUP BY f.family", "public_outer_join"),
    ] {
        assert_eq!(refused_rule(sql).await, rule, "{sql}");
    }
    // A self-join on the unit pairs a person's rows with their own.
    plan("SELECT a.channel, COUNT(*) FROM events a JOIN events b ON a.uid = b.uid GROUP BY a.channel").await.unwrap();
}

#[tokio::test]
async fn filters_may_use_any_visible_column_but_not_compute_with_identifiers() {
    plan("SELECT channel, COUNT(*) FROM events WHERE channel = 3 GROUP BY channel").await.unwrap();
    plan("SELECT channel, COUNT(*) FROM events WHERE cost > 3 AND country LIKE 'D%' GROUP BY channel").await.unwrap();
    assert_eq!(refused_rule("SELECT channel, COUNT(*) FROM events WHERE uid = 'p1' GROUP BY channel").await, "join_key_use");
    assert_eq!(refused_rule("SELECT channel, COUNT(*) FROM events WHERE length(uid) > 3 GROUP BY channel").await, "join_key_use");
}

#[tokio::test]
async fn expressions_that_could_fail_on_a_value_are_refused() {
    assert_eq!(refused_rule("SELECT channel, COUNT(*) FROM events WHERE cost / cost > 1 GROUP BY channel").await, "integer_division");
    assert_eq!(refused_rule("SELECT channel, COUNT(*) FROM events WHERE cost % (cost - 1) = 0 GROUP BY channel").await, "integer_division");
    assert_eq!(refused_rule("SELECT channel, COUNT(*) FROM events WHERE to_timestamp(country) > now() GROUP BY channel").await, "function_not_allowed");
    assert_eq!(refused_rule("SELECT channel, COUNT(*) FROM events WHERE substr(country, 1, cost) = 'D' GROUP BY channel").await, "function_not_allowed");
    // An invalid literal would fail only when some row reaches the function.
    assert_eq!(refused_rule("SELECT COUNT(*) FROM orders WHERE date_trunc('fortnight', ts) IS NULL").await, "function_not_allowed");
    plan("SELECT COUNT(*) FROM orders WHERE date_trunc('day', ts) > ts").await.unwrap();
    // Floating-point division and a fixed divisor cannot fail.
    plan("SELECT channel, COUNT(*) FROM events WHERE CAST(cost AS DOUBLE) / cost > 1 GROUP BY channel").await.unwrap();
    plan("SELECT channel, COUNT(*) FROM events WHERE cost / 7 > 1 GROUP BY channel").await.unwrap();
    // Casts run as TRY_CAST: a value that does not convert is NULL, not an error.
    let q = dp(plan("SELECT channel, COUNT(*) FROM events WHERE CAST(country AS INT) IS NULL GROUP BY channel").await.unwrap());
    assert!(!exact(&q).await.is_empty());
}

#[tokio::test]
async fn cross_party_join_on_the_privacy_unit_counts_matched_people() {
    // p1 and p2 are in both datasets.
    let q = dp(plan("SELECT COUNT(DISTINCT e.uid) AS matched FROM events e JOIN orders o ON e.uid = o.uid").await.unwrap());
    assert_eq!(exact_value(&q, 0).await, 2.0);
    // USING and a semi-join written as a join with the distinct people.
    let q = dp(plan("SELECT SUM(o.amount) AS spend FROM orders o JOIN (SELECT DISTINCT uid FROM events) e USING (uid)").await.unwrap());
    // p1: 10 + 20, p2: 100 clamped to 50.
    assert_eq!(exact_value(&q, 0).await, 80.0);
    let released = charged_release(&q).await;
    assert_eq!(released.batches()[0].num_rows(), 1);
    // The same as a semi join, with a condition beyond the unit.
    let q = dp(plan("SELECT SUM(o.amount) AS spend FROM orders o LEFT SEMI JOIN events e ON o.uid = e.uid AND e.cost > 0").await.unwrap());
    assert_eq!(exact_value(&q, 0).await, 80.0);
    assert_eq!(refused_rule("SELECT SUM(o.amount) FROM orders o LEFT SEMI JOIN events e ON o.amount = e.cost").await, "join_on_privacy_unit");
}

#[tokio::test]
async fn per_person_subqueries_ctes_and_windows_are_tracked() {
    // Per-person total, then an unbounded SUM is refused and a clamped one accepted.
    let per_person = "WITH spend AS (SELECT uid, SUM(amount) AS total FROM orders GROUP BY uid) ";
    assert_eq!(refused_rule(&format!("{per_person} SELECT SUM(total) FROM spend")).await, "sum_of_measure");
    let q = dp(plan(&format!("{per_person} SELECT SUM(LEAST(total, 25)) AS capped, COUNT(*) AS people FROM spend")).await.unwrap());
    // p1: min(30, 25), p2: min(100, 25), p6: 5; one row per person, so the
    // per-group bound is 1 row: sensitivity 25 and 1.
    assert_eq!(exact_value(&q, 0).await, 55.0);
    assert_eq!(exact_value(&q, 1).await, 3.0);
    assert_eq!(q.aggregates[0].sensitivity, 25.0);
    assert_eq!(q.aggregates[1].sensitivity, 1.0);

    // A left join of per-person facts: people with and without orders.
    let q = dp(plan(&format!(
        "{per_person} SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_groups_contributed = 3) e.channel, COUNT(DISTINCT e.uid) AS people, COUNT(DISTINCT s.uid) AS buyers \
         FROM events e LEFT JOIN spend s ON e.uid = s.uid GROUP BY e.channel"
    ))
    .await
    .unwrap());
    // Channel a: p1, p2, p5; buyers among them p1, p2.
    assert_eq!(exact_by_group(&q, 0).await["a"], 3.0);
    assert_eq!(exact_by_group(&q, 1).await["a"], 2.0);

    // First order per person, by a window partitioned by the unit.
    let q = dp(plan(
        "WITH ranked AS (SELECT uid, amount, ROW_NUMBER() OVER (PARTITION BY uid ORDER BY ts) AS rn FROM orders) \
         SELECT SUM(amount) AS first_orders FROM ranked WHERE rn = 1",
    )
    .await
    .unwrap());
    assert_eq!(exact_value(&q, 0).await, 10.0 + 50.0 + 5.0);
    assert_eq!(
        refused_rule("SELECT SUM(amount) FROM (SELECT amount, ROW_NUMBER() OVER (ORDER BY ts) AS rn FROM orders) WHERE rn = 1").await,
        "window_partition"
    );
    // (An aggregate over a DP aggregate is post-processing; one that mixes
    // people below a join or union is refused.)
    assert_eq!(
        refused_rule("SELECT COUNT(*) FROM (SELECT uid FROM events UNION ALL SELECT channel AS uid FROM (SELECT channel, COUNT(*) AS n FROM events GROUP BY channel) AS t) AS u").await,
        "nested_aggregate"
    );
    assert_eq!(refused_rule("SELECT COUNT(*) FROM (SELECT uid FROM events LIMIT 3)").await, "limit_below_dp_aggregate");
    assert_eq!(refused_rule("SELECT COUNT(*) FROM events WHERE uid IN (SELECT uid FROM orders)").await, "subquery");
}

#[tokio::test]
async fn union_all_of_protected_inputs_keeps_each_row_s_person() {
    // The match-rate shape: one row per person with 0/1 flags.
    let q = dp(plan(
        "WITH people AS (SELECT uid, 1 AS in_events, 0 AS in_orders FROM events UNION ALL SELECT uid, 0, 1 FROM orders), \
         flags AS (SELECT uid, MAX(in_events) AS e, MAX(in_orders) AS o FROM people GROUP BY uid) \
         SELECT SUM(e) AS event_people, SUM(o) AS order_people, SUM(e * o) AS both_people FROM flags",
    )
    .await
    .unwrap());
    // events: p1..p5; orders: p1, p2, p6; both: p1, p2.
    assert_eq!(exact_value(&q, 0).await, 5.0);
    assert_eq!(exact_value(&q, 1).await, 3.0);
    assert_eq!(exact_value(&q, 2).await, 2.0);
    assert!(q.aggregates.iter().all(|a| a.sensitivity == 1.0 && a.integral), "{:?}", q.aggregates);
    assert_eq!(
        refused_rule("SELECT COUNT(*) FROM (SELECT uid FROM events UNION ALL SELECT channel FROM families)").await,
        "union_of_protected_and_public"
    );
}

#[tokio::test]
async fn joins_with_public_data_and_date_keys() {
    // Group by a public table's dimension.
    let q = dp(plan(
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_groups_contributed = 2) f.family, COUNT(*) AS n \
         FROM events e JOIN families f ON e.channel = f.channel GROUP BY f.family",
    )
    .await
    .unwrap());
    // ab: p1 a+b (2), p2 3, p3 1, p5 1.
    assert_eq!(exact_by_group(&q, 0).await["ab"], 7.0);

    // Days of a timestamp with a date-range domain; every day of it is released.
    let q = dp(plan("SELECT CAST(ts AS DATE) AS day, COUNT(*) AS orders FROM orders GROUP BY CAST(ts AS DATE) ORDER BY day").await.unwrap());
    let released = charged_release(&q).await;
    let days = arrow::compute::cast(released.batches()[0].column(0), &DataType::Utf8).unwrap();
    let days: Vec<&str> = days.as_string::<i32>().iter().map(|d| d.unwrap()).collect();
    assert_eq!(days, vec!["2026-01-01", "2026-01-02", "2026-01-03"]);
    assert_eq!(refused_rule("SELECT ts, COUNT(*) FROM orders GROUP BY ts").await, "group_key_public_domain");
}

/// A filter on a group key narrows its public domain: the keys the query
/// itself rules out are not released (as noisy zeros, negative ones too).
#[tokio::test]
async fn a_filter_on_a_group_key_narrows_its_public_domain() {
    let released = |sql: &'static str| async move {
        let q = dp(plan(sql).await.unwrap());
        let answer = charged_release(&q).await;
        let keys = arrow::compute::cast(answer.batches()[0].column(0), &DataType::Utf8).unwrap();
        keys.as_string::<i32>().iter().map(|k| k.unwrap().to_string()).collect::<Vec<_>>()
    };
    assert_eq!(released("SELECT channel, COUNT(*) FROM events WHERE channel = 'b' GROUP BY channel").await, vec!["b"]);
    assert_eq!(released("SELECT channel, COUNT(*) FROM events WHERE 'b' = channel AND cost > 1 GROUP BY channel").await, vec!["b"]);
    assert_eq!(
        released("SELECT channel, COUNT(*) FROM events WHERE channel IN ('a', 'c', 'nope') GROUP BY channel ORDER BY channel").await,
        vec!["a", "c"]
    );
    // A comparison in another type than the key's may let other keys
    // through: no narrowing.
    assert_eq!(
        released("SELECT channel, COUNT(*) FROM events WHERE CAST(channel AS BYTEA) = CAST('b' AS BYTEA) GROUP BY channel ORDER BY channel").await,
        vec!["a", "b", "c"]
    );
    // Conditions the narrowing does not read leave the domain whole.
    assert_eq!(
        released("SELECT channel, COUNT(*) FROM events WHERE channel = 'b' OR cost > 1 GROUP BY channel ORDER BY channel").await,
        vec!["a", "b", "c"]
    );
    // A key no row can have: nothing to release.
    let q = dp(plan("SELECT channel, COUNT(*) FROM events WHERE channel = 'nope' GROUP BY channel").await.unwrap());
    assert_eq!(charged_release(&q).await.num_rows(), 0);
}

/// Time-grain charts group by `DATE_TRUNC(unit, ts)`: a column with a day
/// range gets the periods of that range as its public domain, each released
/// as its first instant (and as a date under `CAST(… AS DATE)`).
#[tokio::test]
async fn date_trunc_of_a_day_range_has_the_periods_as_public_domain() {
    let released_keys = |sql: &'static str| async move {
        let q = dp(plan(sql).await.unwrap());
        let released = charged_release(&q).await;
        let keys = arrow::compute::cast(released.batches()[0].column(0), &DataType::Date32).unwrap();
        let keys = arrow::compute::cast(&keys, &DataType::Utf8).unwrap();
        (released.schema().field(0).data_type().clone(), keys.as_string::<i32>().iter().map(|d| d.unwrap().to_string()).collect::<Vec<_>>())
    };
    // The orders' days are 2026-01-01 (a Thursday) to 2026-01-03.
    let (day_type, days) = released_keys("SELECT DATE_TRUNC('day', ts) AS day, COUNT(*) FROM orders GROUP BY 1 ORDER BY 1").await;
    assert!(matches!(day_type, DataType::Timestamp(..)), "{day_type}");
    assert_eq!(days, vec!["2026-01-01", "2026-01-02", "2026-01-03"]);
    let (_, weeks) = released_keys("SELECT DATE_TRUNC('week', ts) AS week, COUNT(*) FROM orders GROUP BY 1").await;
    assert_eq!(weeks, vec!["2025-12-29"]);
    let (month_type, months) = released_keys("SELECT CAST(DATE_TRUNC('month', ts) AS DATE) AS month, COUNT(*) FROM orders GROUP BY 1").await;
    assert_eq!((month_type, months), (DataType::Date32, vec!["2026-01-01".to_string()]));
    // A date (DATE_TRUNC takes it as a timestamp), and periods of periods.
    let (_, weeks) = released_keys("SELECT DATE_TRUNC('week', CAST(ts AS DATE)) AS week, COUNT(*) FROM orders GROUP BY 1").await;
    assert_eq!(weeks, vec!["2025-12-29"]);
    let (_, months) = released_keys("SELECT DATE_TRUNC('month', DATE_TRUNC('week', ts)) AS m, COUNT(*) FROM orders GROUP BY 1").await;
    assert_eq!(months, vec!["2025-12-01"]);
    let q = dp(plan("SELECT CAST(DATE_TRUNC('month', DATE_TRUNC('week', ts)) AS DATE) AS m, COUNT(*) FROM orders GROUP BY 1").await.unwrap());
    assert_eq!(exact_by_group_dates(&q).await, BTreeMap::from([("2025-12-01".to_string(), 4.0)]));
    // Exact counts per week: p1's two orders, p2's and p6's (the order
    // without a person is dropped).
    let q = dp(plan("SELECT CAST(DATE_TRUNC('week', ts) AS DATE) AS week, COUNT(*) FROM orders GROUP BY 1").await.unwrap());
    assert_eq!(exact_by_group_dates(&q).await, BTreeMap::from([("2025-12-29".to_string(), 4.0)]));
    // A unit DATE_TRUNC has no period for stays without a public domain.
    assert_eq!(refused_rule("SELECT DATE_TRUNC('hour', ts), COUNT(*) FROM orders GROUP BY 1").await, "partition_selection_delta");
}

/// Like [`exact_by_group`], for a date key.
async fn exact_by_group_dates(query: &DpQuery) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for b in exact(query).await {
        let keys = arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
        let values = arrow::compute::cast(b.column(1), &DataType::Float64).unwrap();
        let values = values.as_primitive::<arrow::datatypes::Float64Type>();
        for i in 0..b.num_rows() {
            out.insert(keys.as_string::<i32>().value(i).to_string(), values.value(i));
        }
    }
    out
}

/// A subquery that leaves the privacy unit out of its SELECT list still
/// feeds the DP aggregate: the unit is carried through it, so each person's
/// rows are bounded exactly as if the analyst had kept `uid`.
#[tokio::test]
async fn the_privacy_unit_is_carried_through_subqueries_that_leave_it_out() {
    let by_channel = |q: DpQuery| async move { exact_by_group(&q, 0).await };
    let direct = dp(plan("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_groups_contributed = 3, max_contributions_per_group = 2) channel, COUNT(*) FROM events GROUP BY channel").await.unwrap());
    let nested = dp(plan("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_groups_contributed = 3, max_contributions_per_group = 2) channel, COUNT(*) FROM (SELECT channel FROM events WHERE cost > 0) t GROUP BY channel").await.unwrap());
    let cte = dp(plan("WITH c AS (SELECT channel, cost * 2 AS double_cost FROM events) SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_groups_contributed = 3, max_contributions_per_group = 2) channel, COUNT(*) FROM (SELECT channel FROM c) GROUP BY channel").await.unwrap());
    // a: p1 1 row, p2 3 rows (2 kept), p5 1 row → 4; b: p1, p3 → 2; c: p1 → 1.
    let expected: BTreeMap<String, f64> = [("a".to_string(), 4.0), ("b".to_string(), 2.0), ("c".to_string(), 1.0)].into();
    assert_eq!(by_channel(direct).await, expected);
    assert_eq!(by_channel(nested).await, expected);
    assert_eq!(by_channel(cte).await, expected);
    // The answer's columns are the analyst's.
    let q = dp(plan("SELECT channel, COUNT(*) AS n FROM (SELECT channel FROM events) GROUP BY channel").await.unwrap());
    assert_eq!(q.output_schema().fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>(), vec!["channel", "n"]);
    // DISTINCT over a projection without the unit counts values across
    // people: still refused.
    assert_eq!(refused_rule("SELECT COUNT(*) FROM (SELECT DISTINCT channel FROM events) t").await, "privacy_unit");
    assert_eq!(
        refused_rule("SELECT COUNT(*) FROM (SELECT channel FROM events UNION SELECT channel FROM events) t").await,
        "union_privacy_unit"
    );
    // DISTINCT ON is refused, not a crash.
    assert!(plan("SELECT channel, COUNT(*) FROM (SELECT DISTINCT ON (uid) uid, channel FROM events ORDER BY uid, cost DESC) s GROUP BY channel").await.is_err());
    // A subquery that names another column `uid` cannot get the unit back.
    assert_eq!(refused_rule("SELECT COUNT(*) FROM (SELECT channel AS uid FROM events) t").await, "privacy_unit");
}

/// After `GROUP BY uid, channel` a person has one row per channel, so a DP
/// aggregate grouped by channel needs no per-group row bound beyond 1.
#[tokio::test]
async fn one_row_per_person_and_group_is_inferred_from_an_inner_group_by() {
    let cte = "WITH pp AS (SELECT uid, channel, country, LEAST(COUNT(*), 5) AS n FROM events GROUP BY uid, channel, country)";
    let q = dp(plan(&format!("{cte} SELECT channel, COUNT(*), SUM(n) FROM pp GROUP BY channel")).await.unwrap());
    // Unique per (uid, channel, country): grouping by channel alone is not enough.
    assert_eq!(q.aggregates[0].sensitivity, 10.0);
    let q = dp(plan(&format!("{cte} SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (delta = 1e-7) channel, country, COUNT(*), SUM(n) FROM pp GROUP BY channel, country")).await.unwrap());
    assert_eq!(q.aggregates[0].sensitivity, 1.0);
    let cte = "WITH pp AS (SELECT uid, channel, LEAST(COUNT(*), 5) AS n FROM events GROUP BY uid, channel)";
    let q = dp(plan(&format!("{cte} SELECT channel, COUNT(*) AS people, SUM(n) AS rows FROM pp GROUP BY channel")).await.unwrap());
    assert_eq!((q.aggregates[0].sensitivity, q.aggregates[1].sensitivity), (1.0, 5.0));
    // Through a subquery that keeps the column, still one per group ...
    let q = dp(plan(&format!("{cte} SELECT c, COUNT(*) FROM (SELECT channel AS c, n FROM pp) t GROUP BY c")).await.unwrap());
    assert_eq!(q.aggregates[0].sensitivity, 1.0);
    // ... but not when the DP aggregate groups by something else.
    let q = dp(plan(&format!("{cte} SELECT COUNT(*) FROM pp")).await.unwrap());
    assert_eq!(q.aggregates[0].sensitivity, 10.0);
    // The exact counts: a has p1, p2, p5; b has p1, p3; c has p1 (one
    // group per person kept with max_groups_contributed = 1, so they sum to 4).
    let q = dp(plan(&format!("{cte} SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_groups_contributed = 3) channel, COUNT(*) FROM pp GROUP BY channel")).await.unwrap());
    let expected: BTreeMap<String, f64> = [("a".to_string(), 3.0), ("b".to_string(), 2.0), ("c".to_string(), 1.0)].into();
    assert_eq!(exact_by_group(&q, 0).await, expected);
}

#[tokio::test]
async fn unsupported_aggregates_are_refused() {
    assert_eq!(refused_rule("SELECT channel, COUNT(DISTINCT country) FROM events GROUP BY channel").await, "supported_aggregates");
    assert_eq!(refused_rule("SELECT channel, MAX(cost) FROM events GROUP BY channel").await, "supported_aggregates");
}

#[tokio::test]
async fn privacy_unit_column_must_be_the_manifests() {
    assert!(plan("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (privacy_unit_column = uid) channel, COUNT(*) FROM events GROUP BY channel").await.is_ok());
    assert_eq!(
        refused_rule("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (privacy_unit_column = country) channel, COUNT(*) FROM events GROUP BY channel").await,
        "privacy_unit"
    );
}

#[tokio::test]
async fn describe_is_refused() {
    assert_eq!(refused_rule("DESCRIBE events").await, "describe");
}

#[tokio::test]
async fn count_of_several_columns_is_refused() {
    assert_eq!(refused_rule("SELECT channel, COUNT(DISTINCT uid, secret) FROM events GROUP BY channel").await, "supported_aggregates");
}

#[tokio::test]
async fn rows_without_a_person_are_not_counted() {
    let q = dp(plan("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_groups_contributed = 3) channel, COUNT(*), COUNT(DISTINCT uid) FROM events GROUP BY channel").await.unwrap());
    // a: p1 1 row, p2 3 rows, p5 1 row; the two NULL-uid rows are dropped.
    assert_eq!(exact_by_group(&q, 0).await["a"], 5.0);
    assert_eq!(exact_by_group(&q, 1).await["a"], 3.0);
}

#[tokio::test]
async fn without_group_by_a_person_reaches_one_cell() {
    let q = dp(plan("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_groups_contributed = 4) COUNT(DISTINCT uid) FROM events").await.unwrap());
    assert_eq!(q.aggregates[0].sensitivity, 1.0);
}

#[tokio::test]
async fn explain_shows_the_rewrite_and_the_cost() {
    let planned = plan("EXPLAIN SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 0.5) channel, COUNT(*) FROM events GROUP BY channel").await.unwrap();
    let PlannedQuery::Explain(explain) = planned else { panic!("not an explain") };
    let released = cleanroom_dp::release::explain(&explain).unwrap();
    let batch = &released.batches()[0];
    let kinds: Vec<&str> = batch.column(0).as_string::<i32>().iter().map(|v| v.unwrap()).collect();
    assert_eq!(kinds, vec!["dp_cost", "dp_rewritten_plan", "post_processing_plan"]);
    let cost = batch.column(1).as_string::<i32>().value(0);
    assert!(cost.contains("epsilon = 0.5"), "{cost}");
    assert!(cost.contains("L1 sensitivity 10"), "{cost}");
    assert!(batch.column(1).as_string::<i32>().value(1).contains("cleanroom_contribution_key"));
    // With k covering every cell of the domain nothing is dropped, and no ranking is planned.
    let planned = plan("EXPLAIN SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_groups_contributed = 3) channel, COUNT(*) FROM events GROUP BY channel").await.unwrap();
    let PlannedQuery::Explain(explain) = planned else { panic!("not an explain") };
    let released = cleanroom_dp::release::explain(&explain).unwrap();
    assert!(!released.batches()[0].column(1).as_string::<i32>().value(1).contains("row_number"));
}

/// The exact plan's text, to see which steps the rewrite planned.
fn plan_text(q: &DpQuery) -> String {
    q.exact_plan.display_indent().to_string()
}

/// Whether the plan aggregates per person (and group) before bounding.
fn aggregates_per_person(text: &str) -> bool {
    text.lines().any(|l| l.trim_start().starts_with("Aggregate:") && l.contains("AS __uid"))
}

#[tokio::test]
async fn one_row_per_person_needs_no_per_person_aggregate_and_no_ranking() {
    // After GROUP BY uid each person has one row, so reaches one group
    // whatever max_groups_contributed says: k is 1, nothing is ranked, and
    // the rows are bounded as they are.
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_groups_contributed = 3, max_contributions_per_group = 5) \
               channel, COUNT(*), SUM(cost) FROM (SELECT uid, MIN(channel) AS channel, LEAST(SUM(cost), 100) AS cost FROM events GROUP BY uid) GROUP BY channel";
    let q = dp(plan(sql).await.unwrap());
    assert_eq!(q.aggregates[0].sensitivity, 1.0);
    assert_eq!(q.aggregates[1].sensitivity, 100.0);
    let text = plan_text(&q);
    assert!(!text.contains("row_number"), "{text}");
    assert!(!aggregates_per_person(&text), "{text}");
    // p1 (min a, cost 30), p2 (a, 15), p3 (b, 1000 → 100), p5 (a, 7); p4 outside.
    assert_eq!(exact_by_group(&q, 0).await, BTreeMap::from([("a".to_string(), 3.0), ("b".to_string(), 1.0)]));
    assert_eq!(exact_by_group(&q, 1).await["b"], 100.0);
}

#[tokio::test]
async fn rows_unique_per_person_and_key_skip_the_per_person_aggregate_but_are_ranked() {
    // GROUP BY uid, channel gives one row per person and channel: p1 has
    // three, and with k = 2 two of them are kept.
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_groups_contributed = 2) \
               channel, COUNT(*) FROM (SELECT uid, channel, COUNT(*) AS n FROM events GROUP BY uid, channel) GROUP BY channel";
    let q = dp(plan(sql).await.unwrap());
    let text = plan_text(&q);
    assert!(text.contains("row_number"), "{text}");
    assert!(!aggregates_per_person(&text), "{text}");
    let people = exact_by_group(&q, 0).await;
    // p2, p5 in a; p3 in b; p1 in two of a, b, c.
    assert_eq!(people.values().sum::<f64>(), 5.0, "{people:?}");
    assert_eq!(q.aggregates[0].sensitivity, 2.0);
}

#[tokio::test]
async fn a_key_computed_from_the_unique_column_keeps_the_per_person_aggregate() {
    // Rows unique per person and timestamp can share a day: the per-person
    // aggregate merges a person's rows of one day before each (person, day)
    // is bounded.
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_groups_contributed = 3) \
               CAST(ts AS DATE) AS day, COUNT(*) FROM (SELECT uid, ts FROM orders GROUP BY uid, ts) GROUP BY 1";
    let q = dp(plan(sql).await.unwrap());
    let text = plan_text(&q);
    assert!(aggregates_per_person(&text), "{text}");
}

#[tokio::test]
async fn explain_of_a_refused_query_is_refused_by_the_same_rule() {
    assert_eq!(refused_rule("EXPLAIN SELECT * FROM events").await, "dp_aggregate_required");
}

#[tokio::test]
async fn explain_analyze_is_refused() {
    assert_eq!(refused_rule("EXPLAIN ANALYZE SELECT channel, COUNT(*) FROM events GROUP BY channel").await, "explain_analyze");
}

#[tokio::test]
async fn query_reading_no_dataset_is_answered_without_charge() {
    assert!(matches!(plan("SELECT 1 AS one").await.unwrap(), PlannedQuery::NoData(_)));
}

/// BI tools probe a query's or a table's columns with statements that can
/// answer no row: those answer their schema, free, whatever they read.
#[tokio::test]
async fn zero_row_probes_answer_their_schema_for_free() {
    for probe in [
        "SELECT * FROM events WHERE 1 = 0",
        "SELECT * FROM events LIMIT 0",
        "SELECT t.* FROM (SELECT uid, channel FROM events) t WHERE false",
        "SELECT * FROM (SELECT channel, COUNT(*) AS n FROM events GROUP BY channel) AS virtual_table WHERE 1 = 0",
        "SELECT * FROM (SELECT /*+ DIFFERENTIAL_PRIVACY(epsilon = 0.5) */ channel, COUNT(*) AS n FROM events GROUP BY channel) LIMIT 0",
        "SELECT channel, SUM(cost) FROM events WHERE 1 = 0 GROUP BY channel",
    ] {
        let PlannedQuery::NoData(q) = plan(probe).await.unwrap_or_else(|e| panic!("{probe}: {e}")) else { panic!("{probe}: not answered for free") };
        let answer = cleanroom_dp::release::without_data(&q).await.unwrap();
        assert_eq!(answer.num_rows(), 0, "{probe}");
        assert!(answer.schema().fields().len() >= 2, "{probe}");
    }
    let PlannedQuery::NoData(q) = plan("SELECT * FROM events LIMIT 0").await.unwrap() else { unreachable!() };
    let answer = cleanroom_dp::release::without_data(&q).await.unwrap();
    let names: Vec<String> = answer.schema().fields().iter().map(|f| f.name().clone()).collect();
    assert!(names.iter().any(|n| n == "channel") && names.iter().any(|n| n == "uid"), "{names:?}");
    // A probe around a DP query announces that query's columns (interval
    // columns included) and noise, at a charge of 0.
    let probe = "SELECT * FROM (SELECT /*+ DIFFERENTIAL_PRIVACY(confidence_intervals = true) */ channel, COUNT(*) AS n FROM events GROUP BY channel) AS t WHERE 1 = 0";
    let PlannedQuery::NoData(q) = plan(probe).await.unwrap() else { panic!("{probe}: not answered for free") };
    let answer = cleanroom_dp::release::without_data(&q).await.unwrap();
    let names: Vec<String> = answer.schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(names, ["channel", "n", "n_ci_low", "n_ci_high"]);
    assert_eq!(answer.schema().field(1).metadata()["cleanroom.noise.mechanism"], "discrete_laplace");
    assert_eq!(answer.schema().metadata()["cleanroom.charge.epsilon"], "0");
    assert_eq!(q.announced_schema(), answer.schema().as_ref().clone());
    // Not probes: an aggregate without groups answers one row whatever the
    // filter, and so stays a DP query.
    assert!(matches!(plan("SELECT COUNT(*) FROM events WHERE 1 = 0").await.unwrap(), PlannedQuery::Dp(_)));
    assert_eq!(refused_rule("SELECT * FROM events WHERE cost > 1e9").await, "dp_aggregate_required");
    // GROUPING SETS may answer a row without any input row: not a probe.
    assert_eq!(refused_rule("SELECT COUNT(*) FROM events WHERE 1 = 0 GROUP BY GROUPING SETS (())").await, "grouping_sets");
}

#[tokio::test]
async fn each_person_reaches_at_most_max_groups_contributed_groups() {
    // p1 is in a, b and c; with k = 1 it is counted in exactly one of them.
    let q = dp(plan("SELECT channel, COUNT(DISTINCT uid) FROM events GROUP BY channel").await.unwrap());
    let people = exact_by_group(&q, 0).await;
    let in_domain: f64 = ["a", "b", "c"].iter().map(|k| people.get(*k).copied().unwrap_or(0.0)).sum();
    // p1 once, p2, p3, p5: four people in domain channels.
    assert_eq!(in_domain, 4.0, "{people:?}");
    assert_eq!(q.aggregates[0].sensitivity, 1.0);

    let q = dp(plan("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_groups_contributed = 3) channel, COUNT(DISTINCT uid) FROM events GROUP BY channel").await.unwrap());
    let people = exact_by_group(&q, 0).await;
    assert_eq!(people["a"], 3.0);
    assert_eq!(people["b"], 2.0);
    assert_eq!(q.aggregates[0].sensitivity, 3.0);
}

#[tokio::test]
async fn rows_and_values_are_clamped_per_person_and_group() {
    let q = dp(plan(
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_groups_contributed = 3, max_contributions_per_group = 2) \
         channel, COUNT(*), SUM(cost) FROM events GROUP BY channel",
    )
    .await
    .unwrap());
    let rows = exact_by_group(&q, 0).await;
    let sums = exact_by_group(&q, 1).await;
    // a: p1 1 row, p2 3 rows capped at 2, p5 1 row.
    assert_eq!(rows["a"], 4.0);
    // b: p1 cost 10, p3 cost 1000 clamped to the bound 100.
    assert_eq!(sums["b"], 110.0);
    // COUNT(*): 3 groups x 2 rows; SUM: 3 groups x 2 rows x 100.
    assert_eq!(q.aggregates[0].sensitivity, 6.0);
    assert_eq!(q.aggregates[1].sensitivity, 600.0);
    assert!((epsilon_of(q.aggregates[0].share) + epsilon_of(q.aggregates[1].share) - q.epsilon).abs() < 1e-12);
}

#[tokio::test]
async fn release_covers_the_whole_domain_and_drops_keys_outside_it() {
    let q = dp(plan("SELECT channel, COUNT(*) AS n FROM events GROUP BY channel ORDER BY channel").await.unwrap());
    let released = charged_release(&q).await;
    let batch = &released.batches()[0];
    let keys: Vec<&str> = batch.column(0).as_string::<i32>().iter().map(|k| k.unwrap()).collect();
    assert_eq!(keys, vec!["a", "b", "c"]);
    assert_eq!(batch.column(1).as_primitive::<Int64Type>().len(), 3);
    let field = released.schema().field(1).clone();
    assert_eq!(field.metadata()["cleanroom.noise.mechanism"], "discrete_laplace");
    assert_eq!(released.schema().metadata()["cleanroom.charge.epsilon"], "1");
}

#[tokio::test]
async fn confidence_intervals_come_as_companion_columns_when_asked() {
    let q = dp(plan("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (confidence_intervals = true) channel, COUNT(*) AS n FROM events GROUP BY channel").await.unwrap());
    let released = charged_release(&q).await;
    let names: Vec<String> = released.schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(names, vec!["channel", "n", "n_ci_low", "n_ci_high"]);
    assert_eq!(cleanroom_dp::release::announced_dp_schema(&q).unwrap().fields().len(), 4);
    let half: f64 = released.schema().field(1).metadata()["cleanroom.ci95.half_width"].parse().unwrap();
    let b = &released.batches()[0];
    let n = b.column(1).as_primitive::<Int64Type>().value(0) as f64;
    let low = b.column(2).as_primitive::<arrow::datatypes::Float64Type>().value(0);
    let high = b.column(3).as_primitive::<arrow::datatypes::Float64Type>().value(0);
    assert!((n - half - low).abs() < 1e-9 && (n + half - high).abs() < 1e-9);
}

#[tokio::test]
async fn variance_and_stddev_come_from_noisy_centred_moments_within_the_bounds() {
    let q = dp(plan("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_groups_contributed = 3, epsilon = 3) channel, VAR_POP(cost) AS v, STDDEV(cost) AS s FROM events GROUP BY channel").await.unwrap());
    let a = &q.aggregates[0];
    assert_eq!(a.kind, cleanroom_dp::rewrite::AggregateKind::Variance { sample: false, root: false });
    // Bounds [0, 100]: centred values within ±50; 3 groups × 10 rows. The
    // sums are exact in steps of a power of two (`unit`): sensitivities in steps.
    assert_eq!(a.sensitivity * a.unit, 1500.0);
    let squares = a.squares.unwrap();
    assert_eq!((squares.0 * a.squares_unit, squares.1 * a.squares_unit), (75_000.0, 3f64.sqrt() * 25_000.0));
    assert_eq!(a.average, Some((30.0, 3f64.sqrt() * 10.0, (0.0, 100.0))));
    // Channel a: costs 10, 5, 5, 5, 7 (people p1, p2 ×3, p5); centred on 50:
    // −40, −45 ×3, −43, so the sum is −218 and the sum of squares 9524.
    let batches = exact(&q).await;
    let mut checked = false;
    for b in &batches {
        let keys = b.column(0).as_string::<i32>();
        let column = |c: ExactColumn| arrow::compute::cast(b.column_by_name(&c.name()).unwrap(), &DataType::Float64).unwrap();
        let (sums, counts, squares) = (column(ExactColumn::Total(0)), column(ExactColumn::Count(0)), column(ExactColumn::Squares(0)));
        for i in 0..b.num_rows() {
            if keys.value(i) == "a" {
                assert_eq!(sums.as_primitive::<arrow::datatypes::Float64Type>().value(i) * a.unit, -218.0);
                assert_eq!(counts.as_primitive::<arrow::datatypes::Float64Type>().value(i), 5.0);
                assert_eq!(squares.as_primitive::<arrow::datatypes::Float64Type>().value(i) * a.squares_unit, 9524.0);
                checked = true;
            }
        }
    }
    assert!(checked);
    let released = charged_release(&q).await;
    let b = &released.batches()[0];
    assert_eq!(b.num_rows(), 3);
    let v = b.column(1).as_primitive::<arrow::datatypes::Float64Type>();
    let s = b.column(2).as_primitive::<arrow::datatypes::Float64Type>();
    for i in 0..3 {
        assert!((0.0..=2500.0).contains(&v.value(i)), "{}", v.value(i));
        assert!(s.value(i) >= 0.0 && s.value(i).is_finite(), "{}", s.value(i));
    }
    assert_eq!(refused_rule("SELECT VAR(LENGTH(country)) FROM events").await, "sum_of_measure");

    // Accuracy on 20 020 people with costs 0, 1, …, 100 (each 198 times):
    // population variance (101² − 1) / 12 = 850. With one row per person and
    // ε = 1 per moment, the noise moves the estimate by well under 1.
    let ctx = many_people(20_020);
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 6, max_contributions_per_group = 1) VAR_POP(cost), STDDEV_POP(cost) FROM events";
    let q = dp(plan_on(&ctx, sql).await.unwrap());
    let released = charged_release_on(&ctx, &q).await;
    let b = &released.batches()[0];
    let v = b.column(0).as_primitive::<arrow::datatypes::Float64Type>().value(0);
    let s = b.column(1).as_primitive::<arrow::datatypes::Float64Type>().value(0);
    assert!((v - 850.0).abs() < 5.0, "variance {v}");
    assert!((s - 850f64.sqrt()).abs() < 0.2, "stddev {s}");
}

#[tokio::test]
async fn quantiles_are_chosen_among_candidates_over_the_bounds() {
    let q = dp(plan("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_groups_contributed = 3) channel, MEDIAN(cost) AS m FROM events GROUP BY channel").await.unwrap());
    let spec = q.aggregates[0].quantile.clone().expect("a quantile");
    assert_eq!((spec.permille, spec.candidates.len(), spec.candidates[0], spec.candidates[100]), (500, 101, 0.0, 100.0));
    // |1000·C − 500·N| moves by at most 1000 × 10 rows.
    assert_eq!(q.aggregates[0].sensitivity, 10_000.0);
    let released = charged_release(&q).await;
    let b = &released.batches()[0];
    assert_eq!(b.num_rows(), 3);
    let m = arrow::compute::cast(b.column(1), &DataType::Float64).unwrap();
    for v in m.as_primitive::<arrow::datatypes::Float64Type>().values() {
        assert!((0.0..=100.0).contains(v), "{v}");
    }
    assert_eq!(refused_rule("SELECT MEDIAN(LENGTH(country)) FROM events").await, "sum_of_measure");
    assert_eq!(refused_rule("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (noise = 'gaussian', delta = 1e-6) MEDIAN(cost) FROM events").await, "quantile_noise");
    assert_eq!(refused_rule("SELECT approx_percentile_cont(cost, 0.5, 200) FROM events").await, "supported_aggregates");

    // Accuracy on 20 020 people with costs i mod 101 (0 … 21 199 times, the
    // rest 198): the score |1000·#(≤ c) − 1000·q·N| is lowest at c = 49 for
    // the median (88 000; next 110 000 at 50) and at c = 24 for q = 0.25
    // (33 000; next 165 000). Each selection has ε = 1, scale 2000, so the
    // runner-up wins with probability ½·e^(−11) or less.
    let ctx = many_people(20_020);
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 2, max_contributions_per_group = 1) MEDIAN(cost), approx_percentile_cont(0.25) WITHIN GROUP (ORDER BY cost) FROM events";
    let q = dp(plan_on(&ctx, sql).await.unwrap());
    let released = charged_release_on(&ctx, &q).await;
    let b = &released.batches()[0];
    let value = |i: usize| arrow::compute::cast(b.column(i), &DataType::Float64).unwrap().as_primitive::<arrow::datatypes::Float64Type>().value(0);
    assert_eq!((value(0), value(1)), (49.0, 24.0));
}

#[tokio::test]
async fn average_is_a_noisy_sum_over_a_noisy_count_within_the_bounds() {
    let q = dp(plan("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_groups_contributed = 3, epsilon = 2) channel, AVG(cost) AS avg_cost FROM events GROUP BY channel").await.unwrap());
    let a = &q.aggregates[0];
    // 3 groups x 10 rows x bound 100 for the sum (in steps of `unit`), 3 x 10 for the count.
    assert_eq!(a.sensitivity * a.unit, 3000.0);
    assert_eq!(a.average, Some((30.0, 3f64.sqrt() * 10.0, (0.0, 100.0))));
    let b = &exact(&q).await[0];
    assert!(b.column_by_name(&ExactColumn::Total(0).name()).is_some() && b.column_by_name(&ExactColumn::Count(0).name()).is_some());
    let released = charged_release(&q).await;
    let avg = released.batches()[0].column(1).as_primitive::<arrow::datatypes::Float64Type>().clone();
    assert_eq!(avg.len(), 3);
    assert!(avg.values().iter().all(|v| (0.0..=100.0).contains(v)), "{avg:?}");
}

#[tokio::test]
async fn release_refuses_a_receipt_for_another_query() {
    let q = dp(plan("SELECT channel, COUNT(*) FROM events GROUP BY channel").await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let other = receipt(&dir, "another", q.epsilon, q.delta);
    assert!(release(&q, &exact(&q).await, &other).is_err());
}

/// A durable charge of `epsilon` for `query_id` on a fresh ledger in `dir`.
fn receipt(dir: &tempfile::TempDir, query_id: &str, epsilon: f64, delta: f64) -> cleanroom_ledger::Receipt {
    let ledger = RedbLedger::open(dir.path()).unwrap();
    ledger
        .charge(&Charge { party: "p".into(), query_id: query_id.into(), epsilon, delta, ..Default::default() }, &Limits { delta_budget: 1e-3, ..Limits::epsilon(10.0) })
        .unwrap()
}

/// `q` charged on a fresh ledger, run on the test data and released.
async fn charged_release(q: &DpQuery) -> cleanroom_dp::release::Released {
    charged_release_on(&context(), q).await
}

/// `q` charged on a fresh ledger, run on `ctx`'s data and released.
async fn charged_release_on(ctx: &SessionContext, q: &DpQuery) -> cleanroom_dp::release::Released {
    let dir = tempfile::tempdir().unwrap();
    let receipt = receipt(&dir, &q.id, q.epsilon, q.delta);
    let exact = ctx.execute_logical_plan(q.exact_plan.clone()).await.unwrap().collect().await.unwrap();
    finish(q, release(q, &exact, &receipt).unwrap()).await.unwrap()
}

/// `n` people `u0…`, each with one `events` row in channel a and cost
/// `i mod 101`.
fn many_people(n: i64) -> SessionContext {
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("uid", DataType::Utf8, true),
        arrow::datatypes::Field::new("channel", DataType::Utf8, true),
        arrow::datatypes::Field::new("cost", DataType::Int64, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(arrow::array::StringArray::from_iter_values((0..n).map(|i| format!("u{i}")))),
            Arc::new(arrow::array::StringArray::from_iter_values((0..n).map(|_| "a"))),
            Arc::new(arrow::array::Int64Array::from_iter_values((0..n).map(|i| i % 101))),
        ],
    )
    .unwrap();
    let ctx = SessionContext::new();
    ctx.register_table("events", Arc::new(datafusion::datasource::MemTable::try_new(schema, vec![vec![batch]]).unwrap())).unwrap();
    ctx
}

/// Empirical privacy audit: the same query on two neighbouring datasets (one
/// person's rows removed), many noisy releases of each, and a statistical
/// lower bound on the ε that separates them. It must not exceed the claimed ε.
///
/// Query: COUNT(*) with max_contributions_per_group = 3; person p2 has exactly
/// 3 rows, so removing p2 moves the count by the full sensitivity (3) and the
/// true privacy loss of the threshold event {X >= count(D)} is exactly ε = 1.
/// With 20 000 releases per side and Hoeffding bounds at 1e-6 each, the
/// estimated lower bound lands near 0.83; it would exceed 1 if the noise were
/// calibrated to half the sensitivity. The test fails wrongly with
/// probability at most 2e-6.
#[tokio::test]
async fn empirical_privacy_loss_stays_within_the_claimed_epsilon() {
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, max_contributions_per_group = 3) COUNT(*) FROM events";
    let q = dp(plan(sql).await.unwrap());
    // Each dataset is planned and run on its own (a plan carries its tables).
    let count = |ctx: SessionContext| async move {
        let q = dp(plan_on(&ctx, sql).await.unwrap());
        let b = ctx.execute_logical_plan(q.exact_plan.clone()).await.unwrap().collect().await.unwrap();
        arrow::compute::cast(b[0].column(0), &DataType::Float64).unwrap().as_primitive::<arrow::datatypes::Float64Type>().value(0)
    };
    let (d, d_neighbour) = (count(context()).await, count(context_without("p2")).await);
    assert_eq!(d - d_neighbour, 3.0, "p2 contributes the full sensitivity");

    let agg = &q.aggregates[0];
    let mechanism = Noise::calibrate(agg.share, agg.sensitivity, agg.l2_sensitivity, agg.integral).unwrap();
    let n = 20_000;
    let share_at_least = |exact: f64| {
        let noisy = mechanism.apply(&vec![exact; n]).unwrap();
        noisy.iter().filter(|v| **v >= d).count() as f64 / n as f64
    };
    let (p, p_neighbour) = (share_at_least(d), share_at_least(d_neighbour));
    let slack = ((2.0f64 / 1e-6).ln() / (2.0 * n as f64)).sqrt();
    let epsilon_lower_bound = ((p - slack) / (p_neighbour + slack)).ln();
    assert!(epsilon_lower_bound <= q.epsilon, "estimated epsilon >= {epsilon_lower_bound} exceeds the claimed {}", q.epsilon);
    assert!(epsilon_lower_bound > 0.5, "the audit should detect most of the loss: {epsilon_lower_bound}");
}

/// The same audit for Gaussian noise, which is (ε, δ)-DP: for any event S,
/// P[M(D) ∈ S] ≤ e^ε · P[M(D') ∈ S] + δ, so ln((p − δ) / p') estimates a
/// lower bound on ε. COUNT(*) at ε = 1, δ = 1e-5; p2 moves it by 3, the full
/// L2 sensitivity. The event {X ≥ count(D) + 3} sits in the tail where the
/// privacy loss is largest, so the estimate comes close to the claim.
#[tokio::test]
async fn empirical_privacy_loss_of_gaussian_noise_stays_within_the_claimed_epsilon() {
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-5, noise = 'gaussian', max_contributions_per_group = 3) COUNT(*) FROM events";
    let q = dp(plan(sql).await.unwrap());
    assert_eq!(q.delta, 1e-5);
    let agg = &q.aggregates[0];
    let Share::Rho(rho) = agg.share else { panic!("not Gaussian") };
    assert!(cleanroom_dp::mechanism::zcdp_epsilon(rho, 1e-5).unwrap() <= 1.0 + 1e-9);
    let mechanism = Noise::calibrate(agg.share, agg.sensitivity, agg.l2_sensitivity, agg.integral).unwrap();
    assert_eq!(mechanism.name(), "discrete_gaussian");
    let d = 9.0; // rows of p1 … p5, at most 3 each
    let d_neighbour = 6.0; // without p2's 3 rows
    let n = 20_000;
    let cut = d + 0.5 * mechanism.stddev();
    let share_at_least = |exact: f64| {
        let noisy = mechanism.apply(&vec![exact; n]).unwrap();
        noisy.iter().filter(|v| **v >= cut).count() as f64 / n as f64
    };
    let (p, p_neighbour) = (share_at_least(d), share_at_least(d_neighbour));
    let slack = ((2.0f64 / 1e-6).ln() / (2.0 * n as f64)).sqrt();
    let epsilon_lower_bound = ((p - q.delta - slack) / (p_neighbour + slack)).ln();
    assert!(epsilon_lower_bound <= q.epsilon, "estimated epsilon >= {epsilon_lower_bound} exceeds the claimed {}", q.epsilon);
    assert!(epsilon_lower_bound > 0.0, "the audit should detect some loss: {epsilon_lower_bound}");

    // Released end to end: the answer names its mechanism and its charge.
    let released = charged_release(&q).await;
    let field = released.schema().field(0).clone();
    assert_eq!(field.metadata()["cleanroom.noise.mechanism"], "discrete_gaussian");
    assert!(field.metadata().contains_key("cleanroom.rho"));
    assert_eq!(released.schema().metadata()["cleanroom.charge.delta"], "0.00001");
    assert_eq!(refused_rule("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (noise = 'gaussian') COUNT(*) FROM events").await, "gaussian_delta");
}

#[tokio::test]
async fn coalesce_below_the_dp_aggregate_keeps_its_meaning() {
    // Total forms must not change what a function computes: COALESCE is made
    // a CASE (DataFusion only ever runs it as one).
    let q = dp(plan("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_contributions_per_group = 5) COUNT(*) FROM events WHERE coalesce(NULLIF(cost, 5), 0) >= 0").await.unwrap());
    // Every row with a person: p1 3, p2 3, p3 1, p4 1, p5 1.
    assert_eq!(exact_value(&q, 0).await, 9.0);
}

#[tokio::test]
async fn a_cap_on_rows_per_person_bounds_a_self_join() {
    // p2 has three rows in channel a: joined with themselves, nine pairs;
    // with at most two rows per person and scan, four.
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_contributions_per_group = 100) COUNT(*) FROM events a JOIN events b ON a.uid = b.uid WHERE a.uid = b.uid AND a.channel = 'a' AND b.channel = 'a'";
    let uncapped = dp(plan(sql).await.unwrap());
    let mut policy = policy();
    policy.defaults.max_rows_per_person = Some(2);
    let capped = dp(cleanroom_dp::plan_sql(&context().state(), sql, &policy, &QueryOptions::default()).await.unwrap());
    // Channel a: p1 one row (1 pair), p2 three rows, p5 one row (1 pair).
    assert_eq!(exact_value(&uncapped, 0).await, 11.0);
    let value = exact_value(&capped, 0).await;
    // Each scan keeps the same two of p2's three rows (the same keyed hash
    // of the same content): four pairs; p1 keeps two of its three rows
    // (a, b, c), its row in a or not; p5 one pair.
    assert!(value == 5.0 || value == 6.0, "{value}");
}

#[tokio::test]
async fn per_person_float_sums_and_averages_are_exact_and_keep_their_names() {
    // Per person: p1 avg 10, p2 avg 5, p3 avg 1000 (the outer SUM clamps it
    // to 100), p4 avg 1, p5 avg 7; rows without a person are dropped.
    let q = dp(plan("SELECT WITH DIFFERENTIAL_PRIVACY SUM(a) FROM (SELECT uid, AVG(cost) AS a FROM events GROUP BY uid) t").await.unwrap());
    let text = q.exact_plan.display_indent().to_string();
    assert!(text.contains("cleanroom_exact_avg"), "{text}");
    // Exact values are in steps of the aggregate's fixed-point grid.
    assert_eq!(exact_value(&q, 0).await * q.aggregates[0].unit, 123.0);
    // A window sum of a double over each person's rows: p2's three rows each
    // see 15.0 (one row per person is bounded by max_contributions_per_group).
    let q = dp(plan(
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_contributions_per_group = 3) SUM(LEAST(GREATEST(s, 0), 10)) FROM (SELECT uid, SUM(CAST(cost AS DOUBLE) / 10) OVER (PARTITION BY uid) AS s FROM events WHERE channel = 'a') t",
    )
    .await
    .unwrap());
    let text = q.exact_plan.display_indent().to_string();
    assert!(text.contains("cleanroom_exact_sum"), "{text}");
    // Channel a: p1 one row (1.0), p2 three rows (1.5 each), p5 one row (0.7).
    let value = exact_value(&q, 0).await * q.aggregates[0].unit;
    assert!((value - 6.2).abs() < 1e-6, "{value}");
}

#[test]
fn the_readme_lists_every_refusal_rule_and_no_other() {
    // The table under "What this version refuses": one row per rule or group
    // of rules, each named in backquotes in its first cell.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme.split("### What this version refuses").nth(1).unwrap().split("\n### ").next().unwrap();
    let mut listed: Vec<String> = section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .flat_map(|l| l.split('|').nth(1).unwrap().split(',').map(|r| r.trim().trim_matches('`').to_string()).collect::<Vec<_>>())
        .collect();
    listed.sort();
    let mut rules: Vec<String> = cleanroom_dp::Rule::ALL.iter().map(|r| r.name().to_string()).collect();
    rules.sort();
    assert_eq!(listed, rules, "the README's refusal table and the planner's rules differ");
}

#[tokio::test]
async fn a_planned_query_carries_each_aggregate_s_calibrated_mechanism() {
    use cleanroom_dp::mechanism::Mechanism;
    let q = dp(plan("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1) COUNT(*), AVG(cost), VAR(cost), MEDIAN(cost) FROM events").await.unwrap());
    assert_eq!(q.mechanisms.len(), 4);
    assert!(matches!(q.mechanisms[0], Mechanism::Total(_)));
    assert!(matches!(q.mechanisms[1], Mechanism::Average { .. }));
    assert!(matches!(q.mechanisms[2], Mechanism::Variance { .. }));
    assert!(matches!(q.mechanisms[3], Mechanism::Quantile(_)));
    // The count's noise is the one its column announces.
    let Mechanism::Total(noise) = q.mechanisms[0] else { unreachable!() };
    let schema = cleanroom_dp::release::announced_dp_schema(&q).unwrap();
    let announced: f64 = schema.field(0).metadata()[cleanroom_dp::release::META_STDDEV].parse().unwrap();
    assert!((announced - noise.stddev()).abs() <= 1e-9 * noise.stddev().max(1.0), "{announced} vs {}", noise.stddev());
}

/// The fixture policy with `channel` declared as a dimension a person may
/// have every value of (3) and `events` allowing 3 rows per person and group.
fn declared_policy() -> cleanroom_dp::policy::Policy {
    use cleanroom_dp::policy::{ColumnRole, Domain};
    let mut p = policy();
    let events = p.datasets.get_mut("events").unwrap();
    events.columns.insert(
        "channel".into(),
        ColumnRole::Dimension { domain: Some(Domain::Strings(vec!["a".into(), "b".into(), "c".into()])), groups_per_person: Some(3) },
    );
    events.max_contributions_per_group = Some(3);
    p
}

async fn plan_declared(sql: &str) -> DpQuery {
    dp(cleanroom_dp::plan_sql(&context().state(), sql, &declared_policy(), &QueryOptions::default()).await.unwrap())
}

#[tokio::test]
async fn manifest_declarations_set_unbiased_default_bounds_and_the_answer_says_what_may_be_dropped() {
    use cleanroom_dp::release::{announced_dp_schema, META_BOUNDS_FROM, META_CLIPPING, META_GROUPS_PER_PERSON, META_ROWS_PER_GROUP};
    // Without options: k = 3 (channel's declared groups per person), so p1
    // counts in a, b and c; nothing can be dropped, and the answer says so.
    let q = plan_declared("SELECT channel, COUNT(DISTINCT uid) AS people FROM events GROUP BY channel").await;
    assert_eq!(q.options.max_groups_contributed, 3);
    let people = exact_by_group(&q, 0).await;
    assert_eq!((people["a"], people["b"], people["c"]), (3.0, 2.0, 1.0));
    assert_eq!(q.aggregates[0].sensitivity, 3.0);
    let meta = announced_dp_schema(&q).unwrap().metadata().clone();
    assert_eq!(meta[META_CLIPPING], "none");
    assert_eq!(meta[META_GROUPS_PER_PERSON], "3");
    assert_eq!(meta[META_BOUNDS_FROM], "manifest");

    // COUNT(*): the dataset's 3 rows per person and group keep all of p2's
    // rows in a; more could exist, so rows may be dropped.
    let q = plan_declared("SELECT channel, COUNT(*) AS n FROM events GROUP BY channel").await;
    assert_eq!(exact_by_group(&q, 0).await["a"], 5.0);
    assert_eq!(q.aggregates[0].sensitivity, 9.0);
    let meta = announced_dp_schema(&q).unwrap().metadata().clone();
    assert_eq!((meta[META_CLIPPING].as_str(), meta[META_ROWS_PER_GROUP].as_str()), ("rows", "3"));

    // A bound the query sets wins over the declaration.
    let q = plan_declared("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_groups_contributed = 1, max_contributions_per_group = 1) channel, COUNT(*) AS n FROM events GROUP BY channel").await;
    assert_eq!(q.options.max_groups_contributed, 1);
    assert_eq!(q.aggregates[0].sensitivity, 1.0);
    let meta = announced_dp_schema(&q).unwrap().metadata().clone();
    assert_eq!((meta[META_CLIPPING].as_str(), meta[META_BOUNDS_FROM].as_str()), ("groups,rows", "query"));

    // A filter narrowing channel to one key: one group per person at most.
    let q = plan_declared("SELECT channel, COUNT(DISTINCT uid) FROM events WHERE channel = 'a' GROUP BY channel").await;
    assert_eq!(q.options.max_groups_contributed, 1);
    // Without a declaration the collaboration's default (1) stays.
    let q = dp(plan("SELECT channel, COUNT(DISTINCT uid) FROM events GROUP BY channel").await.unwrap());
    assert_eq!(q.options.max_groups_contributed, 1);
    let meta = announced_dp_schema(&q).unwrap().metadata().clone();
    assert_eq!((meta[META_CLIPPING].as_str(), meta[META_BOUNDS_FROM].as_str()), ("groups", "manifest"));
    let explained = plan("EXPLAIN SELECT channel, COUNT(DISTINCT uid) FROM events GROUP BY channel").await.unwrap();
    let text = format!("{:?}", cleanroom_dp::release::explain(match &explained {
        PlannedQuery::Explain(e) => e,
        other => panic!("{other:?}"),
    }).unwrap().batches());
    assert!(text.contains("at most 1 group(s) per person (a person's further groups are dropped)"), "{text}");
}

#[tokio::test]
async fn counts_clamped_at_zero_when_asked_with_their_intervals() {
    // ε = 0.01 with sensitivity 30 (3 groups x 10 rows): the noise's scale is 3000, so about half of
    // the unclamped counts of these tiny groups would be negative.
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 0.01, clamp_counts = true, confidence_intervals = true, max_groups_contributed = 3) \
               channel, COUNT(*) AS n FROM events GROUP BY channel";
    let q = dp(plan(sql).await.unwrap());
    assert_eq!(cleanroom_dp::release::announced_dp_schema(&q).unwrap().metadata()["cleanroom.clamp_counts"], "true");
    let mut zeros = 0;
    for _ in 0..10 {
        let released = charged_release(&q).await;
        let b = &released.batches()[0];
        let n = b.column(1).as_primitive::<Int64Type>();
        let low = b.column(2).as_primitive::<arrow::datatypes::Float64Type>();
        let high = b.column(3).as_primitive::<arrow::datatypes::Float64Type>();
        for i in 0..b.num_rows() {
            assert!(n.value(i) >= 0 && low.value(i) >= 0.0 && high.value(i) >= low.value(i), "{b:?}");
            zeros += usize::from(n.value(i) == 0);
        }
    }
    assert!(zeros > 0, "no count came out at 0 in 30 draws with noise of scale 3000");
}

#[tokio::test]
async fn aggregates_over_a_dp_query_are_post_processing_of_its_release() {
    use cleanroom_dp::release::release_key;
    let inner = "SELECT channel, COUNT(*) AS n FROM events GROUP BY channel";
    let q = dp(plan(inner).await.unwrap());
    // A total, a count of rows and a share over the released rows: the DP
    // aggregate is the inner one, with the same release.
    for outer in [
        format!("SELECT SUM(n) AS total FROM ({inner}) AS t"),
        format!("SELECT COUNT(*) AS groups, MAX(n) AS top FROM ({inner}) AS t WHERE n > -1000000"),
        format!("SELECT channel, n, SUM(n) OVER () AS total FROM ({inner}) AS t ORDER BY channel LIMIT 2"),
        format!("SELECT DISTINCT channel FROM ({inner}) AS t"),
    ] {
        let w = dp(plan(&outer).await.unwrap());
        assert_eq!(w.epsilon, q.epsilon, "{outer}");
        assert_eq!(release_key(&w, "p", &policy(), "v1"), release_key(&q, "p", &policy(), "v1"), "{outer}");
    }
    // One release, two post-processings: the total is the sum of the rows.
    let w = dp(plan(&format!("SELECT SUM(n) AS total FROM ({inner}) AS t")).await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let receipt = receipt(&dir, &q.id, q.epsilon, q.delta);
    let exact = context().execute_logical_plan(q.exact_plan.clone()).await.unwrap().collect().await.unwrap();
    let noisy = release(&q, &exact, &receipt).unwrap();
    let rows = finish(&q, noisy.clone()).await.unwrap();
    let total = finish(&w, noisy).await.unwrap();
    let sum: i64 = rows.batches().iter().flat_map(|b| b.column(1).as_primitive::<Int64Type>().values().to_vec()).sum();
    assert_eq!(total.batches()[0].column(0).as_primitive::<Int64Type>().value(0), sum);
    // The total is computed, not one noisy column: no noise is announced for it.
    assert!(total.schema().field(0).metadata().is_empty());
    assert_eq!(total.schema().metadata()["cleanroom.charge.epsilon"], "1");

    // Another ε, bound or DP aggregate is another release.
    let other = dp(plan("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 0.5) channel, COUNT(*) AS n FROM events GROUP BY channel").await.unwrap());
    assert_ne!(release_key(&other, "p", &policy(), "v1"), release_key(&q, "p", &policy(), "v1"));
    let people = dp(plan("SELECT channel, COUNT(DISTINCT uid) AS n FROM events GROUP BY channel").await.unwrap());
    assert_ne!(release_key(&people, "p", &policy(), "v1"), release_key(&q, "p", &policy(), "v1"));
    assert_ne!(release_key(&q, "p", &policy(), "v2"), release_key(&q, "p", &policy(), "v1"));
    assert_ne!(release_key(&q, "o", &policy(), "v1"), release_key(&q, "p", &policy(), "v1"));

    // A per-person aggregate below stays per-person logic; a subquery in an
    // outer expression could read data and is refused.
    let per_person = dp(plan("SELECT COUNT(*) FROM (SELECT uid, SUM(cost) AS s FROM events GROUP BY uid) AS p").await.unwrap());
    assert_eq!(per_person.groups.len(), 0);
    for wrapper in [
        format!("SELECT SUM(n) FROM ({inner}) AS t WHERE channel IN (SELECT channel FROM events)"),
        format!("SELECT * FROM ({inner}) AS t WHERE 1 = ANY (SELECT 1 FROM events WHERE uid = 'p1')"),
        format!("SELECT * FROM ({inner}) AS t WHERE n > ALL (SELECT cost FROM events WHERE uid = 'p3')"),
        format!("SELECT COUNT(*) FROM ({inner}) AS t WHERE EXISTS (SELECT 1 FROM events WHERE uid = 'p1')"),
        format!("SELECT MAX(n) = ANY (SELECT cost FROM events) FROM ({inner}) AS t"),
        format!("SELECT channel, (SELECT MAX(cost) FROM events) AS top FROM ({inner}) AS t"),
    ] {
        assert_eq!(refused_rule(&wrapper).await, "subquery", "{wrapper}");
    }
}
