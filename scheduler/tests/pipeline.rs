//! The release path without Flight: planned statements through recall →
//! charge → run → release → post-process → audit → remember, on the
//! in-process engine and a durable ledger.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use cleanroom_dp::options::QueryOptions;
use cleanroom_dp::policy::Policy;
use cleanroom_dp::rewrite::PlannedQuery;
use cleanroom_ledger::audit::{self, Event};
use cleanroom_ledger::{Ledger, Limits, RedbLedger};
use cleanroom_scheduler::engine::InProcess;
use cleanroom_scheduler::pipeline::{Ask, Failure, Pipeline, QueryError, Served};
use datafusion::prelude::SessionContext;

#[allow(dead_code)]
#[path = "../../dp-planner/tests/fixtures/mod.rs"]
mod fixtures;

const BY_CHANNEL: &str =
    "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 0.5) channel, COUNT(*) AS n FROM events GROUP BY channel ORDER BY channel";

struct Room {
    _dir: tempfile::TempDir,
    ledger: Arc<dyn Ledger>,
    pipeline: Pipeline,
    ctx: SessionContext,
    policy: Policy,
}

impl Room {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ledger: Arc<dyn Ledger> = Arc::new(RedbLedger::open(dir.path()).unwrap());
        let pipeline = Pipeline::new(ledger.clone(), Arc::new(InProcess::default()));
        Room { _dir: dir, ledger, pipeline, ctx: fixtures::context(), policy: fixtures::policy() }
    }

    async fn plan(&self, sql: &str) -> Arc<PlannedQuery> {
        Arc::new(cleanroom_dp::plan_sql(&self.ctx.state(), sql, &self.policy, &QueryOptions::default()).await.unwrap())
    }

    fn ask<'a>(&'a self, sql: &'a str, versions: &'a str, epsilon_budget: f64) -> Ask<'a> {
        Ask {
            party: "analyst",
            sql,
            ctx: &self.ctx,
            policy: &self.policy,
            versions,
            limits: Limits::epsilon(epsilon_budget),
            deadline: Duration::from_secs(60),
            min_response: Duration::ZERO,
        }
    }

    /// The audit log, typed, after checking its chain.
    fn events(&self) -> Vec<Event> {
        let (records, head) = self.ledger.audit_log().unwrap();
        let verification = audit::verify(&records, head.as_ref(), &[]);
        assert!(verification.problems.is_empty(), "{:?}", verification.problems);
        records.iter().map(|(_, bytes)| audit::parse(bytes).unwrap().event().expect("a typed event")).collect()
    }
}

fn kinds(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(Event::kind).collect()
}

fn rows(batches: &[RecordBatch]) -> String {
    arrow::util::pretty::pretty_format_batches(batches).unwrap().to_string()
}

#[tokio::test]
async fn a_query_is_charged_once_then_run_released_audited_and_remembered() {
    let room = Room::new();
    let planned = room.plan(BY_CHANNEL).await;

    let first = room.pipeline.answer(&room.ask(BY_CHANNEL, "v1", 1.0), planned.clone()).await.unwrap();
    assert_eq!(first.served, Served::Answered);
    assert!(first.ran.is_some());
    // channel has the public domain a, b, c: one row each, whatever the data.
    assert_eq!(first.released.num_rows(), 3);
    assert_eq!(room.ledger.spent("analyst").unwrap(), 0.5);

    // The same question on the same data versions: the same bytes, free.
    let again = room.pipeline.answer(&room.ask(BY_CHANNEL, "v1", 1.0), planned.clone()).await.unwrap();
    assert_eq!(again.served, Served::Cached);
    assert_eq!(rows(again.released.batches()), rows(first.released.batches()));
    assert_eq!(room.ledger.spent("analyst").unwrap(), 0.5);

    // New data: a new answer, paid for.
    let fresh = room.pipeline.answer(&room.ask(BY_CHANNEL, "v2", 1.0), planned.clone()).await.unwrap();
    assert_eq!(fresh.served, Served::Answered);
    assert_eq!(room.ledger.spent("analyst").unwrap(), 1.0);

    // The budget is spent: refused by rule, nothing run or charged.
    let refused = room.pipeline.answer(&room.ask(BY_CHANNEL, "v3", 1.0), planned).await.unwrap_err();
    let QueryError::Refused { rule, error } = refused else { panic!("not a refusal: {refused:?}") };
    assert_eq!(rule, "budget");
    assert_eq!(room.ledger.spent("analyst").unwrap(), 1.0);

    let events = room.events();
    assert_eq!(kinds(&events), ["query", "answer", "answer", "query", "answer", "refusal"]);
    let Event::Query(charged) = &events[0] else { unreachable!() };
    let Event::Answer(answered) = &events[1] else { unreachable!() };
    assert_eq!((charged.epsilon, charged.sql.as_str()), (0.5, BY_CHANNEL));
    assert_eq!(charged.receipt.as_deref(), Some(answered.receipt.as_str()));
    assert_eq!(charged.columns, answered.columns, "the announced columns are the released ones");
    assert_eq!((answered.rows, answered.cached), (3, false));
    let Event::Answer(cached) = &events[2] else { unreachable!() };
    assert_eq!((cached.receipt.as_str(), cached.cached), (answered.receipt.as_str(), true));
    let Event::Refusal(refusal) = &events[5] else { unreachable!() };
    assert_eq!((refusal.rule.as_str(), refusal.message.clone()), ("budget", error.to_string()));
}

#[tokio::test]
async fn a_run_stopped_at_the_deadline_keeps_its_charge_and_leaves_no_sooner_than_the_minimum_response_time() {
    let room = Room::new();
    let planned = room.plan(BY_CHANNEL).await;
    let ask = Ask { deadline: Duration::ZERO, min_response: Duration::from_millis(300), ..room.ask(BY_CHANNEL, "v1", 1.0) };
    let started = Instant::now();
    let failed = room.pipeline.answer(&ask, planned).await.unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(300), "left after {:?}", started.elapsed());
    assert_eq!(
        failed.message().as_deref(),
        Some("the query did not finish within the collaboration's deadline of 0 s and was stopped; its charge of epsilon = 0.5 is kept")
    );
    let QueryError::Failed { receipt, epsilon, failure: Failure::Deadline(_) } = failed else { panic!("{failed:?}") };
    assert_eq!((epsilon, room.ledger.spent("analyst").unwrap()), (0.5, 0.5));
    let events = room.events();
    assert_eq!(kinds(&events), ["query", "query_failure"]);
    assert_eq!(events[1], Event::QueryFailure { receipt, query_id: match &events[0] {
        Event::Query(q) => q.query_id.clone().unwrap(),
        _ => unreachable!(),
    } });
}

#[tokio::test]
async fn statements_that_read_no_data_are_free_and_on_the_audit_log() {
    let room = Room::new();
    for (sql, statement) in [("SELECT 1 AS one", "no_data"), (&*format!("EXPLAIN {BY_CHANNEL}"), "explain")] {
        let answer = room.pipeline.answer(&room.ask(sql, "v1", 1.0), room.plan(sql).await).await.unwrap();
        assert_eq!(answer.served, Served::Free);
        let Some(Event::Query(recorded)) = room.events().pop() else { panic!("no query record") };
        assert_eq!((recorded.statement.as_deref(), recorded.epsilon, recorded.receipt), (Some(statement), 0.0, None));
        assert_eq!(recorded.rows, Some(answer.released.num_rows()));
    }
    assert_eq!(room.ledger.spent("analyst").unwrap(), 0.0);
}

/// The in-process engine ranks each person's groups with `RankPerPersonExec`
/// instead of a window, and keeps exactly the groups the window keeps.
#[tokio::test]
async fn ranking_per_person_matches_the_window() {
    let plain = fixtures::context();
    let engine = SessionContext::new_with_state(InProcess::default().session_state(plain.state()));
    for sql in [
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_groups_contributed = 1) channel, COUNT(*) AS n FROM events GROUP BY channel",
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (max_groups_contributed = 2, max_contributions_per_group = 2) channel, COUNT(*) AS n, COUNT(DISTINCT uid) AS people FROM events GROUP BY channel",
    ] {
        let PlannedQuery::Dp(query) = cleanroom_dp::plan_sql(&plain.state(), sql, &fixtures::policy(), &QueryOptions::default()).await.unwrap() else {
            panic!("{sql}: not a DP query")
        };
        let physical = engine.state().create_physical_plan(&query.exact_plan).await.unwrap();
        let shown = datafusion::physical_plan::displayable(physical.as_ref()).indent(true).to_string();
        assert!(shown.contains("RankPerPersonExec") && !shown.contains("BoundedWindowAggExec"), "{shown}");
        let sorted = |batches: Vec<RecordBatch>| {
            let text = arrow::util::pretty::pretty_format_batches(&batches).unwrap().to_string();
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            lines.sort();
            lines
        };
        let ranked = sorted(datafusion::physical_plan::collect(physical, engine.task_ctx()).await.unwrap());
        let windowed = sorted(plain.execute_logical_plan(query.exact_plan.clone()).await.unwrap().collect().await.unwrap());
        assert_eq!(ranked, windowed, "{sql}");
    }
}
