// The gateway's end-to-end tests, shared by the engine test binaries:
// `tests/gateway.rs` runs them with `serve --engine ballista`,
// `tests/gateway_in_process.rs` with `serve --engine in-process`.

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::{CommandGetDbSchemas, CommandGetTables};
use futures::TryStreamExt;
use tonic::transport::Channel;


/// What the server logs when a query ran on this binary's engine.
fn ran_on_engine() -> &'static str {
    if ENGINE == "ballista" { "ran as Ballista job" } else { "query ran in process" }
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_without_a_token_or_with_a_wrong_password_are_refused() {
    let server = Server::start(&state_dir("auth"));
    let mut anonymous = server.client().await;
    let err = anonymous.execute("SELECT 1".into(), None).await.unwrap_err();
    assert!(err.to_string().contains("Unauthenticated") || err.to_string().contains("credentials"), "{err}");

    let mut wrong = server.client().await;
    let err = wrong.handshake("advertiser", "not-the-password").await.unwrap_err();
    assert!(err.to_string().contains("invalid user name or password"), "{err}");
    let err = wrong.handshake("nobody", "x").await.unwrap_err();
    assert!(err.to_string().contains("invalid user name or password"), "{err}");

    let mut forged = server.client().await;
    forged.set_token("0123456789abcdef".into());
    assert!(forged.execute("SELECT 1".into(), None).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_calls_show_the_party_its_datasets_without_hidden_columns() {
    let server = Server::start(&state_dir("meta"));
    let mut client = server.login("advertiser").await;

    let info = client.get_catalogs().await.unwrap();
    let catalogs = collect(&mut client, info).await;
    assert_eq!(strings(&catalogs, 0), vec!["cleanroom"]);

    let info = client
        .get_db_schemas(CommandGetDbSchemas { catalog: None, db_schema_filter_pattern: None })
        .await
        .unwrap();
    let schemas = collect(&mut client, info).await;
    assert_eq!(strings(&schemas, 1), vec!["public", "system"]);

    let info = client
        .get_tables(CommandGetTables {
            catalog: None,
            db_schema_filter_pattern: None,
            table_name_filter_pattern: None,
            table_types: vec![],
            include_schema: true,
        })
        .await
        .unwrap();
    let tables = collect(&mut client, info).await;
    assert_eq!(strings(&tables, 2), vec!["conversions", "impressions", "budget", "queries"]);
    assert_eq!(strings(&tables, 3), vec!["TABLE", "TABLE", "SYSTEM TABLE", "SYSTEM TABLE"]);
    let schema_bytes = tables[0].column(4).as_binary::<i32>().value(0).to_vec();
    let schema = arrow::ipc::convert::try_schema_from_ipc_buffer(&schema_bytes).unwrap();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert!(names.contains(&"revenue") && names.contains(&"uid"), "{names:?}");
    assert!(!names.contains(&"order_id"), "hidden column order_id is listed: {names:?}");

    let info = client.get_table_types().await.unwrap();
    assert_eq!(strings(&collect(&mut client, info).await, 0), vec!["SYSTEM TABLE", "TABLE"]);
    let info = client.get_sql_info(vec![]).await.unwrap();
    assert!(collect(&mut client, info).await[0].num_rows() > 0);
    let info = client.get_xdbc_type_info(Default::default()).await.unwrap();
    assert!(collect(&mut client, info).await[0].num_rows() > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_party_sees_and_queries_only_the_datasets_it_may_read() {
    // The same collaboration, but only the advertiser may query conversions.
    let text = std::fs::read_to_string(demo().join("manifest.toml")).unwrap();
    let readers = r#"readers = ["advertiser", "adnetwork"]"#;
    let second = text.rfind(readers).expect("readers of the second dataset");
    let restricted = format!("{}readers = [\"advertiser\"]{}", &text[..second], &text[second + readers.len()..]);
    assert!(restricted.contains("name = \"conversions\""));
    let manifest = demo().join("restricted-manifest.toml");
    std::fs::write(&manifest, restricted).unwrap();
    let server = Server::start_with(&manifest, &state_dir("visibility"));

    let mut adnetwork = server.login("adnetwork").await;
    let info = adnetwork
        .get_tables(CommandGetTables {
            catalog: None,
            db_schema_filter_pattern: None,
            table_name_filter_pattern: None,
            table_types: vec![],
            include_schema: false,
        })
        .await
        .unwrap();
    assert_eq!(strings(&collect(&mut adnetwork, info).await, 2), vec!["impressions", "budget", "queries"]);
    let err = adnetwork
        .execute("SELECT product_category, COUNT(*) FROM conversions GROUP BY product_category".into(), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("conversions") && err.to_string().contains("not found"), "{err}");

    let mut advertiser = server.login("advertiser").await;
    query(&mut advertiser, "SELECT product_category, COUNT(*) FROM conversions GROUP BY product_category")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn dp_count_of_people_per_channel_is_close_to_the_truth_and_runs_on_the_engine() {
    let server = Server::start(&state_dir("count"));
    let mut client = server.login("advertiser").await;
    // Each person appears in at most 5 channels, so with max_groups_contributed
    // = 5 no contribution is dropped and the only error is the noise:
    // discrete Laplace with scale b = 5 / 1 (L1 sensitivity 5, epsilon 1).
    // P(|noise| > t) <= exp(-t / b); with t = b ln(5 / 1e-6) the chance that any
    // of the 5 channels misses is at most 1e-6 (union bound).
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, max_groups_contributed = 5) \
               channel, COUNT(DISTINCT uid) AS users FROM impressions GROUP BY channel ORDER BY channel";
    let batches = query(&mut client, sql).await.expect("DP query");
    let bound = 5.0 * (5.0f64 / 1e-6).ln();
    let truth = truth();
    let expected = truth["queries"]["Q4_reach_frequency"].as_array().unwrap();
    let channels = strings(&batches, 0);
    assert_eq!(channels.len(), expected.len(), "one row per channel of the public domain");
    let users: Vec<i64> = batches.iter().flat_map(|b| b.column(1).as_primitive::<Int64Type>().values().to_vec()).collect();
    for (i, row) in expected.iter().enumerate() {
        assert_eq!(row["channel"].as_str().unwrap(), channels[i]);
        let exact = row["users"].as_i64().unwrap();
        assert!(
            ((users[i] - exact) as f64).abs() <= bound,
            "{}: released {} vs exact {exact}, bound {bound}",
            channels[i],
            users[i]
        );
    }
    let field = batches[0].schema().field(1).clone();
    let ci: f64 = field.metadata()["cleanroom.ci95.half_width"].parse().unwrap();
    assert!((ci - 5.0 * 20f64.ln()).abs() < 1e-6, "ci {ci}");
    assert_eq!(batches[0].schema().metadata()["cleanroom.charge.epsilon"], "1");

    let log = server.log();
    assert!(log.contains(ran_on_engine()), "no run on the {ENGINE} engine in the server log:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_rows_hidden_columns_and_undeclared_group_keys_are_refused_by_rule() {
    let server = Server::start(&state_dir("refuse"));
    let mut client = server.login("adnetwork").await;
    let cases = [
        ("SELECT * FROM impressions", "dp_aggregate_required"),
        ("SELECT uid FROM impressions", "dp_aggregate_required"),
        ("SELECT is_return, COUNT(*) FROM conversions GROUP BY is_return", "partition_selection_delta"),
        ("SELECT uid, COUNT(*) FROM impressions GROUP BY uid", "privacy_unit_in_output"),
        ("SELECT channel, COUNT(*) FROM impressions i JOIN conversions c ON i.campaign_id = c.affiliate_id GROUP BY channel", "join_on_privacy_unit"),
        ("SELECT channel, COUNT(*) FROM impressions i CROSS JOIN conversions c GROUP BY channel", "cross_join"),
        ("SELECT channel, MAX(cost_micros) FROM impressions GROUP BY channel", "supported_aggregates"),
        ("SELECT channel, COUNT(*) FROM impressions WHERE campaign_id / creative_id = 1 GROUP BY channel", "integer_division"),
    ];
    for (sql, rule) in cases {
        let err = client.execute(sql.into(), None).await.expect_err(sql);
        assert!(err.to_string().contains(&format!("`{rule}`")), "{sql}: expected rule {rule}, got {err}");
    }
    // A hidden column is not in the party's view of the dataset: naming it
    // fails exactly as naming a column that does not exist, and no error
    // lists a hidden column.
    let error = |column: &str| format!("SELECT affiliate_id, COUNT(*) FROM conversions WHERE {column} > 5 GROUP BY affiliate_id");
    let hidden = client.execute(error("order_id"), None).await.expect_err("a hidden column").to_string();
    let absent = client.execute(error("no_such_column"), None).await.expect_err("an absent column").to_string();
    assert_eq!(hidden.replace("order_id", "no_such_column"), absent);
    assert!(!absent.contains("order_id"), "{absent}");
    // Planning refusals cost nothing: a full-budget query still fits.
    query(&mut client, "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 5) channel, COUNT(*) FROM impressions GROUP BY channel")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_answers_alike_whether_or_not_any_row_passes_its_filter() {
    let server = Server::start(&state_dir("empty"));
    let mut client = server.login("adnetwork").await;
    // Each person's groups are ranked (max_groups_contributed 1 < 5 channels);
    // the second filter keeps no row at all.
    for filter in ["cost_micros > 1000", "cost_micros < 0"] {
        let sql = format!("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 0.1) channel, COUNT(*) FROM impressions WHERE {filter} GROUP BY channel");
        let started = std::time::Instant::now();
        let batches = tokio::time::timeout(std::time::Duration::from_secs(60), query(&mut client, &sql))
            .await
            .unwrap_or_else(|_| panic!("{filter}: no answer within 60 s"))
            .unwrap();
        assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 5, "{filter}");
        println!("{filter}: answered in {:.2} s", started.elapsed().as_secs_f64());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn per_person_float_sums_run_in_their_exact_form_on_the_engine() {
    let server = Server::start(&state_dir("exact"));
    let mut client = server.login("advertiser").await;
    // A per-person SUM of revenue (a double), and a sliding window AVG over
    // each person's rows (its frame retracts rows): both run in their exact,
    // order-independent forms, which the executors resolve by name.
    for sql in [
        "WITH p AS (SELECT uid, SUM(revenue) AS r FROM conversions GROUP BY uid) \
         SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 0.5) COUNT(*) AS people, SUM(LEAST(GREATEST(r, 0), 1000)) AS revenue FROM p",
        "WITH w AS (SELECT uid, AVG(revenue) OVER (PARTITION BY uid ORDER BY revenue ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) AS a FROM conversions) \
         SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 0.5, max_contributions_per_group = 5) SUM(LEAST(GREATEST(a, 0), 1000)) AS revenue FROM w",
    ] {
        let batches = query(&mut client, sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1, "{sql}");
        let revenue = batches[0].column(batches[0].num_columns() - 1);
        let revenue = arrow::compute::cast(revenue, &arrow::datatypes::DataType::Float64).unwrap();
        assert!(revenue.as_primitive::<arrow::datatypes::Float64Type>().value(0).is_finite(), "{sql}");
    }
    assert!(server.log().contains(ran_on_engine()));
}

#[tokio::test(flavor = "multi_thread")]
async fn spent_budget_is_refused_with_the_remainder_and_survives_a_crash() {
    let state = state_dir("budget");
    let server = Server::start(&state);
    let mut client = server.login("advertiser").await;
    // Different questions each time (a re-run of the same one would be free).
    let sql = |i: usize| {
        format!(
            "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 4.5) product_category, SUM(revenue) \
             FROM conversions WHERE affiliate_id <> {i} GROUP BY product_category"
        )
    };
    // The demo budget is 50: eleven queries of 4.5 leave 0.5.
    for i in 0..11 {
        let batches = query(&mut client, &sql(i)).await.unwrap_or_else(|e| panic!("query {i}: {e}"));
        let remaining: f64 = batches[0].schema().metadata()["cleanroom.budget.remaining_epsilon"].parse().unwrap();
        assert!((remaining - (50.0 - 4.5 * (i + 1) as f64)).abs() < 1e-9, "after query {i}: {remaining}");
    }
    let err = query(&mut client, &sql(11)).await.unwrap_err();
    assert!(err.to_string().contains("has only epsilon = 0.5 left"), "{err}");
    // Another party's budget is its own.
    let mut other = server.login("adnetwork").await;
    query(&mut other, &sql(11)).await.unwrap();

    server.kill();
    let server = Server::start(&state);
    let mut client = server.login("advertiser").await;
    let err = query(&mut client, &sql(12)).await.unwrap_err();
    assert!(err.to_string().contains("has only epsilon = 0.5 left"), "after restart: {err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_shows_the_cost_and_charges_nothing() {
    let server = Server::start(&state_dir("explain"));
    let mut client = server.login("advertiser").await;
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 2) channel, COUNT(*) FROM impressions GROUP BY channel";
    for _ in 0..3 {
        let batches = query(&mut client, &format!("EXPLAIN {sql}")).await.unwrap();
        let cost = strings(&batches, 1)[0].clone();
        assert!(cost.contains("epsilon = 2"), "{cost}");
    }
    let err = client.execute(format!("EXPLAIN ANALYZE {sql}"), None).await.unwrap_err();
    assert!(err.to_string().contains("`explain_analyze`"), "{err}");
    let batches = query(&mut client, sql).await.unwrap();
    assert_eq!(batches[0].schema().metadata()["cleanroom.budget.remaining_epsilon"], "48");
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_without_public_domain_are_selected_and_their_delta_charged() {
    let server = Server::start(&state_dir("selection"));
    let mut client = server.login("advertiser").await;
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6) is_return, COUNT(DISTINCT uid) AS buyers FROM conversions GROUP BY is_return ORDER BY is_return";
    let batches = query(&mut client, sql).await.unwrap();
    let delta: f64 = batches[0].schema().metadata()["cleanroom.charge.delta"].parse().unwrap();
    assert!(delta > 0.0 && delta <= 1e-6, "{delta}");
    // Most purchases are not returns: that key has hundreds of buyers at SF 0.01.
    assert!(strings(&batches, 0).contains(&"false".to_string()), "{:?}", strings(&batches, 0));
    let budget = query(&mut client, "SELECT spent_epsilon, spent_delta, remaining_delta FROM system.budget").await.unwrap();
    assert_eq!(strings(&budget, 0), vec!["1.0"]);
    let spent: f64 = strings(&budget, 1)[0].parse().unwrap();
    assert_eq!(spent, delta);
    let remaining: f64 = strings(&budget, 2)[0].parse().unwrap();
    assert!((remaining - (1e-5 - delta)).abs() < 1e-15, "{remaining}");
    let history = query(&mut client, "SELECT delta FROM system.queries").await.unwrap();
    // (δ as the history table prints it: to the last digit or so.)
    let recorded = strings(&history, 0)[0].parse::<f64>().unwrap();
    assert!((recorded - delta).abs() <= delta * 1e-12, "{recorded} vs {delta}");
    // A δ above the collaboration's per-query cap is refused before anything runs.
    let err = client.execute(sql.replace("1e-6", "1e-5"), None).await.unwrap_err();
    assert!(err.to_string().contains("per query"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn system_tables_show_each_party_only_its_own_budget_and_history_for_free() {
    let server = Server::start(&state_dir("system"));
    let mut advertiser = server.login("advertiser").await;
    let mut adnetwork = server.login("adnetwork").await;
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.5) device, COUNT(*) FROM impressions GROUP BY device";
    query(&mut advertiser, sql).await.unwrap();

    for _ in 0..2 {
        let budget = query(&mut advertiser, "SELECT party, spent_epsilon, remaining_epsilon FROM system.budget").await.unwrap();
        assert_eq!(strings(&budget, 0), vec!["advertiser"]);
        assert_eq!(strings(&budget, 1), vec!["1.5"]);
        assert_eq!(strings(&budget, 2), vec!["48.5"]);
    }
    let history = query(&mut advertiser, "SELECT sql, epsilon FROM system.queries ORDER BY charged_at").await.unwrap();
    assert_eq!(strings(&history, 0), vec![sql.to_string()]);

    let theirs = query(&mut adnetwork, "SELECT * FROM system.queries").await.unwrap();
    assert_eq!(theirs.iter().map(|b| b.num_rows()).sum::<usize>(), 0, "another party's history is private");
    let budget = query(&mut adnetwork, "SELECT spent_epsilon FROM cleanroom.system.budget").await.unwrap();
    assert_eq!(strings(&budget, 0), vec!["0.0"]);

    let err = advertiser
        .execute("SELECT COUNT(*) FROM impressions, system.budget".into(), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("`system_tables_alone`"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_question_gets_the_same_answer_at_no_new_cost_even_after_a_restart() {
    let state = state_dir("cache");
    let server = Server::start(&state);
    let mut client = server.login("advertiser").await;
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 2) country, COUNT(DISTINCT uid) AS people FROM impressions GROUP BY country";
    let first = query(&mut client, sql).await.unwrap();
    let again = query(&mut client, sql).await.unwrap();
    assert_eq!(first, again, "a re-run must return the released answer");
    let spent = |b: &[RecordBatch]| strings(b, 0);
    let budget = query(&mut client, "SELECT spent_epsilon FROM system.budget").await.unwrap();
    assert_eq!(spent(&budget), vec!["2.0"]);

    // Another option is another question.
    query(&mut client, &sql.replace("epsilon = 2", "epsilon = 1")).await.unwrap();
    let budget = query(&mut client, "SELECT spent_epsilon FROM system.budget").await.unwrap();
    assert_eq!(spent(&budget), vec!["3.0"]);
    // Another party asking the same question pays for its own answer.
    let mut other = server.login("adnetwork").await;
    query(&mut other, sql).await.unwrap();
    let budget = query(&mut other, "SELECT spent_epsilon FROM system.budget").await.unwrap();
    assert_eq!(spent(&budget), vec!["2.0"]);

    server.kill();
    let server = Server::start(&state);
    let mut client = server.login("advertiser").await;
    assert_eq!(query(&mut client, sql).await.unwrap(), first);
    let budget = query(&mut client, "SELECT spent_epsilon FROM system.budget").await.unwrap();
    assert_eq!(spent(&budget), vec!["3.0"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_collaboration_cap_bounds_what_all_parties_spend_together() {
    let text = std::fs::read_to_string(demo().join("manifest.toml")).unwrap();
    let capped = text.replacen("name = \"adbench\"", "name = \"adbench\"\nepsilon_cap = 6.0", 1);
    assert_ne!(capped, text);
    let manifest = demo().join("capped-manifest.toml");
    std::fs::write(&manifest, capped).unwrap();
    let server = Server::start_with(&manifest, &state_dir("cap"));
    let mut advertiser = server.login("advertiser").await;
    let mut adnetwork = server.login("adnetwork").await;
    query(&mut advertiser, "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 5) device, COUNT(*) FROM impressions GROUP BY device")
        .await
        .unwrap();
    let err = query(&mut adnetwork, "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 2) device, COUNT(*) FROM impressions GROUP BY device")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("has only epsilon = 1 left of its cap of 6"), "{err}");
    query(&mut adnetwork, "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1) device, COUNT(*) FROM impressions GROUP BY device")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn unfetched_tickets_are_bounded_per_session() {
    let server = Server::start(&state_dir("bounded"));
    let mut client = server.login("advertiser").await;
    let mut tickets = Vec::new();
    for i in 0..1030 {
        let info = client.execute(format!("SELECT {i} AS n"), None).await.unwrap();
        tickets.push(info.endpoint[0].ticket.clone().unwrap());
    }
    assert!(client.do_get(tickets[0].clone()).await.is_err(), "the oldest unfetched ticket is forgotten");
    let last = client.do_get(tickets[1029].clone()).await.unwrap().try_collect::<Vec<_>>().await.unwrap();
    assert_eq!(strings(&last, 0), vec!["1029"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ticket_only_works_once_and_in_its_own_session() {
    let server = Server::start(&state_dir("ticket"));
    let mut alice = server.login("advertiser").await;
    let mut mallory = server.login("advertiser").await;
    let info = alice
        .execute("SELECT channel, COUNT(*) FROM impressions GROUP BY channel".into(), None)
        .await
        .unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    assert!(mallory.do_get(ticket.clone()).await.is_err(), "a ticket worked in another session");
    let stream = alice.do_get(ticket.clone()).await.unwrap();
    stream.try_collect::<Vec<_>>().await.unwrap();
    assert!(alice.do_get(ticket).await.is_err(), "a ticket worked twice");
}

#[tokio::test(flavor = "multi_thread")]
async fn prepared_statements_and_session_settings_work() {
    let server = Server::start(&state_dir("prepared"));
    let mut client = server.login("advertiser").await;
    client.execute_update("SET cleanroom.epsilon = 0.5".into(), None).await.unwrap();
    // Sent as a query (as ADBC's cursor.execute does), SET answers with one
    // endpoint whose stream is empty (clients fetch every endpoint).
    let info = client.execute("SET cleanroom.epsilon = 0.25".into(), None).await.unwrap();
    assert_eq!(info.endpoint.len(), 1);
    assert!(collect(&mut client, info).await.iter().all(|b| b.num_rows() == 0));
    let mut prepared = client
        .prepare("SELECT device, COUNT(DISTINCT uid) AS people FROM impressions GROUP BY device".into(), None)
        .await
        .unwrap();
    assert_eq!(prepared.dataset_schema().unwrap().fields().len(), 2);
    let info = prepared.execute().await.unwrap();
    let batches = collect(&mut client, info).await;
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 4, "one row per device of the domain");
    assert_eq!(batches[0].schema().metadata()["cleanroom.charge.epsilon"], "0.25");
    prepared.close().await.unwrap();
    let err = client.execute_update("SET cleanroom.epsilon = -1".into(), None).await.unwrap_err();
    assert!(err.to_string().contains("epsilon"), "{err}");
}

async fn collect(client: &mut FlightSqlServiceClient<Channel>, info: arrow_flight::FlightInfo) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    for endpoint in info.endpoint {
        let stream = client.do_get(endpoint.ticket.unwrap()).await.unwrap();
        out.extend(stream.try_collect::<Vec<_>>().await.unwrap());
    }
    out
}

fn strings(batches: &[RecordBatch], column: usize) -> Vec<String> {
    let mut out = Vec::new();
    for b in batches {
        let c = arrow::compute::cast(b.column(column), &arrow::datatypes::DataType::Utf8).unwrap();
        let c = c.as_string::<i32>();
        for i in 0..c.len() {
            out.push(c.value(i).to_string());
        }
    }
    out
}

/// The demo manifest with `settings` added to its `[collaboration]` table,
/// beside it (its dataset locations are relative to its directory).
fn demo_manifest_with(name: &str, settings: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(demo().join("manifest.toml")).unwrap();
    let text = text.replacen("[collaboration]\n", &format!("[collaboration]\n{settings}\n"), 1);
    let path = demo().join(format!("manifest-{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_are_held_back_to_the_minimum_response_time() {
    let manifest = demo_manifest_with("padded", "min_response_seconds = 2");
    let server = Server::start_with(&manifest, &state_dir("padded"));
    let mut client = server.login("adnetwork").await;
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 0.1) channel, COUNT(*) FROM impressions GROUP BY channel";
    let started = std::time::Instant::now();
    query(&mut client, sql).await.unwrap();
    let padded = started.elapsed();
    assert!(padded >= std::time::Duration::from_secs(2), "answered after {padded:?}");
    // Bad SQL is refused at planning, which reads no data: not held back.
    let started = std::time::Instant::now();
    query(&mut client, "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 0.1) COUNT(*) FROM impressions WHERE sqrt(cost_micros) = repeat('x', 3)").await.unwrap_err();
    println!("answered after {:.2} s (minimum 2 s); a refusal after {:.2} s", padded.as_secs_f64(), started.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_past_the_deadline_is_stopped_with_a_fixed_message_and_its_charge_kept() {
    let manifest = demo_manifest_with("deadline", "query_deadline_seconds = 1");
    let server = Server::start_with(&manifest, &state_dir("deadline"));
    let mut client = server.login("adnetwork").await;
    // Each person's impressions joined with themselves four times over.
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 0.5) COUNT(*) FROM impressions a \
               JOIN impressions b ON a.uid = b.uid JOIN impressions c ON a.uid = c.uid JOIN impressions d ON a.uid = d.uid";
    let started = std::time::Instant::now();
    let err = query(&mut client, sql).await.unwrap_err();
    assert!(err.to_string().contains("did not finish within the collaboration's deadline of 1 s"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "stopped after {:?}", started.elapsed());
    if ENGINE == "in-process" {
        // The stopped run gives its threads back: the server is idle, not
        // still computing the join (CPU time in clock ticks, usually 100/s).
        let cpu = || {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", server.child.id())).unwrap();
            let fields: Vec<u64> = stat.rsplit(')').next().unwrap().split_whitespace().skip(11).take(2).map(|f| f.parse().unwrap()).collect();
            fields[0] + fields[1]
        };
        std::thread::sleep(std::time::Duration::from_millis(500));
        let before = cpu();
        std::thread::sleep(std::time::Duration::from_secs(2));
        let used = cpu() - before;
        assert!(used < 50, "the server used {used} ticks of CPU in the 2 s after the run was stopped");
    }
    let spent = query(&mut client, "SELECT spent_epsilon FROM system.budget").await.unwrap();
    let spent = arrow::compute::cast(spent[0].column(0), &arrow::datatypes::DataType::Float64).unwrap();
    assert_eq!(spent.as_any().downcast_ref::<arrow::array::Float64Array>().unwrap().value(0), 0.5);
}

/// Column `name` of `batches` as numbers (NULL as NaN).
fn numbers(batches: &[RecordBatch], name: &str) -> Vec<f64> {
    let mut out = Vec::new();
    for b in batches {
        let c = arrow::compute::cast(b.column_by_name(name).unwrap_or_else(|| panic!("no column {name}")), &arrow::datatypes::DataType::Float64).unwrap();
        let c = c.as_primitive::<arrow::datatypes::Float64Type>();
        out.extend((0..c.len()).map(|i| if c.is_null(i) { f64::NAN } else { c.value(i) }));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_lift_study_is_a_table_function_charged_once_whose_interval_covers_the_exact_lift() {
    let server = Server::start(&state_dir("study"));
    let mut client = server.login("advertiser").await;
    // The manifest's [studies.lift] gives every parameter but epsilon.
    let batches = query(&mut client, "SELECT * FROM lift(epsilon => 2)").await.unwrap();
    assert_eq!(strings(&batches, 0), vec!["control", "test"]);
    let names: Vec<String> = batches[0].schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(
        names,
        ["test_group", "people", "converters", "revenue", "revenue_per_person", "conversion_rate", "lift", "lift_ci_low", "lift_ci_high", "significant"]
    );
    assert_eq!(batches[0].schema().metadata()["cleanroom.charge.epsilon"], "2");
    // The exact figures, from plain SQL over the same files.
    let truth = truth();
    let exact = truth["queries"]["study_lift"].as_array().unwrap();
    let rate = |g: &str| {
        let row = exact.iter().find(|r| r["test_group"] == g).unwrap();
        row["converters"].as_f64().unwrap() / row["people"].as_f64().unwrap()
    };
    let exact_lift = rate("test") / rate("control") - 1.0;
    let (lift, low, high) = (numbers(&batches, "lift"), numbers(&batches, "lift_ci_low"), numbers(&batches, "lift_ci_high"));
    assert!(lift[0].is_nan() && low[0].is_nan(), "the control group has no lift: {lift:?}");
    assert!(low[1] <= exact_lift && exact_lift <= high[1], "exact lift {exact_lift} outside [{}, {}]", low[1], high[1]);
    let people = numbers(&batches, "people");
    for (i, g) in ["control", "test"].iter().enumerate() {
        let row = exact.iter().find(|r| r["test_group"] == *g).unwrap();
        assert!((people[i] - row["people"].as_f64().unwrap()).abs() < 50.0, "{g}: {} people vs {}", people[i], row["people"]);
    }
    let spent = |b: &[RecordBatch]| strings(b, 0)[0].parse::<f64>().unwrap();
    assert_eq!(spent(&query(&mut client, "SELECT spent_epsilon FROM system.budget").await.unwrap()), 2.0);
    // The same study again, or a projection of it: the kept release, free.
    let again = query(&mut client, "SELECT test_group, lift FROM lift(epsilon => 2) WHERE lift IS NOT NULL").await.unwrap();
    assert_eq!(numbers(&again, "lift"), vec![lift[1]]);
    assert_eq!(spent(&query(&mut client, "SELECT spent_epsilon FROM system.budget").await.unwrap()), 2.0);
    // EXPLAIN shows the cost and charges nothing; bad parameters are named.
    let explained = query(&mut client, "EXPLAIN SELECT * FROM lift(epsilon => 0.5, window_days => 7)").await.unwrap();
    let cost = &strings(&explained, 1)[0];
    assert!(cost.contains("epsilon = 0.5"), "{cost}");
    // Most of the budget goes to converters: the control group's rate dominates the lift's noise.
    assert!(cost.contains("budget split across the columns: count(Int64(1)) epsilon 0.044813238, count(a.uid) epsilon 0.330186762, sum(a.value) epsilon 0.125"), "{cost}");
    for (sql, says) in [
        ("SELECT * FROM lift(exposure => 'nowhere')", "exposure => nowhere: no such dataset"),
        ("SELECT * FROM lift(colour => 'red')", "unknown parameter `colour`"),
        ("SELECT * FROM lift('impressions')", "arguments are named"),
        ("SELECT * FROM lift(window_days => 0)", "window_days => 0"),
        ("SELECT * FROM lift(control => 'nobody')", "control => nobody: not a value of impressions.test_group"),
        ("WITH impressions AS (SELECT uid, 'test' AS test_group FROM conversions) SELECT * FROM lift()", "cannot have a WITH clause"),
    ] {
        let err = client.execute(sql.into(), None).await.unwrap_err();
        assert!(err.to_string().contains(says), "{sql}: {err}");
    }
    assert_eq!(spent(&query(&mut client, "SELECT spent_epsilon FROM system.budget").await.unwrap()), 2.0);

    // The CLI runs the same study and prints it as JSON.
    let out = std::process::Command::new(BIN)
        .args(["study", "lift", "--server", &format!("grpc://{}", server.addr), "--party", "advertiser", "--json", "-p", "epsilon=2"])
        .env("CLEANROOM_PASSWORD", password("advertiser"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // (JSON text parsed back: equal to the last digit or so.)
    let printed = rows[1]["lift"].as_f64().unwrap();
    assert!((printed - lift[1]).abs() <= 1e-12 * lift[1].abs().max(1.0), "the CLI reads the same kept release: {printed} vs {}", lift[1]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_match_rate_study_counts_each_dataset_and_both_with_one_charge() {
    let server = Server::start(&state_dir("match"));
    let mut client = server.login("adnetwork").await;
    let batches = query(&mut client, "SELECT * FROM match_rate(epsilon => 3)").await.unwrap();
    assert_eq!((strings(&batches, 0), strings(&batches, 2)), (vec!["impressions".to_string()], vec!["conversions".to_string()]));
    let truth = truth();
    let exact = &truth["queries"]["Q1_match_rate"][0];
    let (imp, conv, both) = (exact["imp_users"].as_f64().unwrap(), exact["conv_users"].as_f64().unwrap(), exact["matched_users"].as_f64().unwrap());
    let one = |name: &str| numbers(&batches, name)[0];
    // epsilon 1 per count: noise of standard deviation 1.4.
    for (name, truth) in [("left_people", imp), ("right_people", conv), ("matched", both)] {
        assert!((one(name) - truth).abs() < 30.0, "{name}: {} vs {truth}", one(name));
    }
    for (side, rate) in [("left", both / imp), ("right", both / conv)] {
        let (low, high) = (one(&format!("{side}_match_rate_ci_low")), one(&format!("{side}_match_rate_ci_high")));
        let half = (high - low) / 2.0;
        assert!(low <= one(&format!("{side}_match_rate")) && one(&format!("{side}_match_rate")) <= high);
        // The interval is the noise's alone: the exact rate within three half-widths.
        assert!((one(&format!("{side}_match_rate")) - rate).abs() <= 3.0 * half + 1e-9, "{side}: {rate} vs [{low}, {high}]");
    }
    let budget = query(&mut client, "SELECT spent_epsilon FROM system.budget").await.unwrap();
    assert_eq!(strings(&budget, 0), vec!["3.0"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_attribution_study_credits_channels_net_of_returns_with_one_charge() {
    let server = Server::start(&state_dir("attribution"));
    let mut client = server.login("advertiser").await;
    let batches = query(&mut client, "SELECT * FROM attribution(epsilon => 3)").await.unwrap();
    let names: Vec<String> = batches[0].schema().fields().iter().map(|f| f.name().clone()).collect();
    for name in ["channel", "conversions", "share", "gross_revenue", "returned_revenue", "net_revenue", "net_revenue_ci_low", "commission", "commission_ci_high"] {
        assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
    }
    assert_eq!(strings(&batches, 0), vec!["display", "email", "search", "social", "video"]);
    // Each channel's figures, and their totals, against the exact answer of
    // the same crediting (truth.json): within four half-widths (Laplace
    // noise beyond that: odds of about 2e-5 per figure).
    let truth = truth();
    let exact = truth["queries"]["study_attribution"].as_array().unwrap();
    let (conversions, high) = (numbers(&batches, "conversions"), numbers(&batches, "conversions_ci_high"));
    let (net, net_low, net_high) = (numbers(&batches, "net_revenue"), numbers(&batches, "net_revenue_ci_low"), numbers(&batches, "net_revenue_ci_high"));
    let (mut total, mut exact_total, mut variance) = (0.0, 0.0, 0.0);
    for (i, row) in exact.iter().enumerate() {
        // (A count's lower end is cut at 0; its upper end is not.)
        let half = high[i] - conversions[i];
        let want = row["conversions"].as_f64().unwrap();
        assert!((conversions[i] - want).abs() <= 4.0 * half, "{}: {} conversions vs exact {want} (half-width {half})", row["channel"], conversions[i]);
        let net_half = (net_high[i] - net_low[i]) / 2.0;
        let want_net = row["net_revenue"].as_f64().unwrap();
        assert!((net[i] - want_net).abs() <= 4.0 * net_half, "{}: net {} vs exact {want_net} (half-width {net_half})", row["channel"], net[i]);
        (total, exact_total, variance) = (total + net[i], exact_total + want_net, variance + net_half * net_half);
    }
    assert!((total - exact_total).abs() <= 4.0 * variance.sqrt(), "net revenue in all: {total} vs exact {exact_total}");
    // The commission is the rate times the net revenue, its interval too.
    let commission = numbers(&batches, "commission");
    assert!((commission[0] - 0.1 * net[0]).abs() <= 1e-6 * net[0].abs().max(1.0));
    let shares: f64 = numbers(&batches, "share").iter().sum();
    assert!((shares - 1.0).abs() < 1e-9, "shares add up to {shares}");
    // One charge; the other models are questions of their own.
    let budget = query(&mut client, "SELECT spent_epsilon FROM system.budget").await.unwrap();
    assert_eq!(strings(&budget, 0), vec!["3.0"]);
    let first = query(&mut client, "SELECT channel, conversions FROM attribution(model => 'first', epsilon => 1)").await.unwrap();
    assert_eq!(strings(&first, 0).len(), 5);
    // Linear credit splits each conversion over its touches: with every
    // channel a person may touch counted, the total stays the conversions'.
    let linear = query(&mut client, "SELECT conversions, conversions_ci_high - conversions AS half FROM attribution(model => 'linear', groups_per_person => 5, epsilon => 3)").await.unwrap();
    let exact_all: f64 = exact.iter().map(|r| r["conversions"].as_f64().unwrap()).sum();
    let (all, half) = (numbers(&linear, "conversions").iter().sum::<f64>(), numbers(&linear, "half")[0] * 5f64.sqrt());
    assert!((all - exact_all).abs() <= 4.0 * half, "linear credit keeps the conversions' total: {all} vs {exact_all} (half-width {half})");
    let budget = query(&mut client, "SELECT spent_epsilon FROM system.budget").await.unwrap();
    assert_eq!(strings(&budget, 0), vec!["7.0"]);
    for (sql, expected) in [
        ("SELECT * FROM attribution(model => 'middle')", "model => middle: last, first or linear"),
        ("SELECT * FROM attribution(credit => 'uid')", "credit => uid: not a dimension of impressions"),
        ("SELECT * FROM attribution(value => 'order_id')", "value => order_id: not a measure of conversions"),
        ("SELECT * FROM attribution(groups_per_person => 0)", "groups_per_person => 0"),
        ("SELECT * FROM attribution(returns => 'product_category')", "returns => product_category: not a true/false column of conversions"),
        ("SELECT * FROM attribution(time => 'cost_micros')", "time => cost_micros: not a dimension of impressions"),
    ] {
        let err = client.execute(sql.into(), None).await.unwrap_err();
        assert!(err.to_string().contains(expected), "{sql}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cohorts_study_releases_each_first_exposure_week_and_its_following_weeks() {
    let server = Server::start(&state_dir("cohorts"));
    let mut client = server.login("advertiser").await;
    let batches = query(&mut client, "SELECT * FROM cohorts(epsilon => 4)").await.unwrap();
    let cohorts = strings(&batches, 0);
    let after = numbers(&batches, "periods_after");
    // The impressions' declared days (2026-01-01 to 03-31) fall in 14 weeks
    // (from Monday 2025-12-29), each with the 6 weeks from it, but for the
    // last cohort's sixth, past the conversions' declared days (to 05-01).
    assert_eq!(cohorts.len(), 14 * 6 - 1);
    assert_eq!((cohorts[0].as_str(), cohorts[82].as_str()), ("2025-12-29", "2026-03-30"));
    assert_eq!(after[..6], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    let (people, active, low, high) = (numbers(&batches, "people"), numbers(&batches, "active"), numbers(&batches, "active_ci_low"), numbers(&batches, "active_ci_high"));
    // Every cell has the same noise: its half-width is that of any cell
    // whose interval is not cut at 0.
    let half = (0..active.len()).map(|i| (high[i] - low[i]) / 2.0).fold(0.0, f64::max);
    let truth = truth();
    let mut checked = 0;
    for row in truth["queries"]["study_cohorts"].as_array().unwrap() {
        let i = (0..cohorts.len())
            .find(|&i| cohorts[i] == row["cohort"].as_str().unwrap() && after[i] == row["periods_after"].as_f64().unwrap())
            .unwrap_or_else(|| panic!("no cell for {row}"));
        let want = row["active"].as_f64().unwrap();
        assert!((active[i] - want).abs() <= 4.0 * half + 1.0, "{row}: active {} (half-width {half})", active[i]);
        let size = row["people"].as_f64().unwrap();
        assert!((people[i] - size).abs() <= 4.0 * (numbers(&batches, "people_ci_high")[i] - people[i]) + 1.0, "{row}: people {}", people[i]);
        checked += 1;
    }
    assert!(checked >= 60, "{checked} cells with buyers checked");
    let budget = query(&mut client, "SELECT spent_epsilon FROM system.budget").await.unwrap();
    assert_eq!(strings(&budget, 0), vec!["4.0"]);
    let err = client.execute("SELECT * FROM cohorts(period => 'fortnight')".into(), None).await.unwrap_err();
    assert!(err.to_string().contains("period => fortnight: day, week or month"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_vertical_runs_the_five_studies_with_one_charge_each_and_pays_commission_on_its_truth() {
    for (vertical, party, credit, value, rate) in [
        ("igaming", "operator", "affiliate_id", "ggr", 0.3),
        ("forex", "broker", "ib_id", "lots", 5.0),
        ("ecommerce", "merchant", "publisher_id", "order_value", 0.08),
    ] {
        let dir = tempfile::Builder::new().prefix(vertical).tempdir().unwrap().keep();
        let status = std::process::Command::new(BIN)
            .args(["generate", "--vertical", vertical, "--sf", "0.01", "--quiet", "--out"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success(), "generate --vertical {vertical}");
        let server = Server::start_with(&dir.join("manifest.toml"), &dir.join("state"));
        let pw = password_in(&dir, party);
        let mut client = server.client().await;
        client.handshake(party, &pw).await.expect("handshake");
        let truth: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("truth.json")).unwrap()).unwrap();
        // Lift, reach, cohorts and match rate with the manifest's defaults.
        for study in ["lift", "reach", "cohorts", "match_rate"] {
            let batches = query(&mut client, &format!("SELECT * FROM {study}()")).await.unwrap_or_else(|e| panic!("{vertical} {study}: {e}"));
            assert!(batches.iter().map(|b| b.num_rows()).sum::<usize>() > 0, "{vertical} {study}");
            if study == "lift" {
                let exact = truth["queries"]["study_lift"].as_array().unwrap();
                let rate = |i: usize| exact[i]["converters"].as_f64().unwrap() / exact[i]["people"].as_f64().unwrap();
                let exact_lift = rate(1) / rate(0) - 1.0;
                let (low, high) = (numbers(&batches, "lift_ci_low")[1], numbers(&batches, "lift_ci_high")[1]);
                assert!(low <= exact_lift && exact_lift <= high, "{vertical}: exact lift {exact_lift} outside [{low}, {high}]");
            }
        }
        // Attribution from the CLI, as the vertical's operator runs it.
        let out = std::process::Command::new(BIN)
            .args(["study", "attribution", "--server", &format!("grpc://{}", server.addr), "--party", party, "--json"])
            .env("CLEANROOM_PASSWORD", &pw)
            .output()
            .unwrap();
        assert!(out.status.success(), "{vertical}: {}", String::from_utf8_lossy(&out.stderr));
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let exact = truth["queries"]["study_attribution"].as_array().unwrap();
        assert!(exact.len() >= 5, "{vertical}: {} credited keys", exact.len());
        for want in exact {
            let got = rows.iter().find(|r| r[credit] == want[credit]).unwrap_or_else(|| panic!("{vertical}: no row for {}", want[credit]));
            let f = |name: &str| got[name].as_f64().unwrap_or_else(|| panic!("{vertical}: {name} in {got}"));
            for (name, exact_name) in [("conversions".to_string(), "conversions".to_string()), (format!("net_{value}"), format!("net_{value}"))] {
                // (A count's lower end is cut at 0; its upper end is not.)
                let half = f(&format!("{name}_ci_high")) - f(&name);
                let want = want[&exact_name].as_f64().unwrap();
                // Laplace noise beyond four half-widths: odds of about 2e-5.
                assert!((f(&name) - want).abs() <= 4.0 * half, "{vertical} {}: {name} {} vs exact {want} (half-width {half})", got[credit], f(&name));
            }
            assert!((f("commission") - rate * f(&format!("net_{value}"))).abs() <= 1e-6 * f("commission").abs().max(1.0));
        }
        // One charge per study.
        let budget = query(&mut client, "SELECT spent_epsilon FROM system.budget").await.unwrap();
        assert_eq!(strings(&budget, 0), vec!["5.0"], "{vertical}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reach_study_releases_reach_overlaps_and_frequency_as_one_aggregate() {
    let server = Server::start(&state_dir("reach"));
    let mut client = server.login("adnetwork").await;
    let batches = query(&mut client, "SELECT * FROM reach(epsilon => 5)").await.unwrap();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
    let one = |name: &str| numbers(&batches, name)[0];
    let truth = truth();
    let within = |name: &str, exact: f64| {
        let half = (one(&format!("{name}_ci_high")) - one(&format!("{name}_ci_low"))) / 2.0;
        // Laplace noise beyond four half-widths: odds of about 2e-5 per figure.
        assert!((one(name) - exact).abs() <= 4.0 * half + 1.0, "{name}: {} vs exact {exact} (half-width {half})", one(name));
    };
    within("people", truth["queries"]["Q1_match_rate"][0]["imp_users"].as_f64().unwrap());
    for row in truth["queries"]["Q4_reach_frequency"].as_array().unwrap() {
        within(&format!("reach_{}", row["channel"].as_str().unwrap()), row["users"].as_f64().unwrap());
    }
    // Five channels: ten pairs; buckets 1, 2, 3-4, 5-9, 10 or more.
    let names: Vec<String> = batches[0].schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(names.iter().filter(|n| n.starts_with("overlap_") && !n.contains("_ci_")).count(), 10);
    for bucket in ["frequency_1", "frequency_2", "frequency_3_to_4", "frequency_5_to_9", "frequency_10_or_more"] {
        assert!(names.iter().any(|n| n == bucket), "{bucket} in {names:?}");
    }
    let budget = query(&mut client, "SELECT spent_epsilon FROM system.budget").await.unwrap();
    assert_eq!(strings(&budget, 0), vec!["5.0"]);
    let err = client.execute("SELECT * FROM reach(channel => 'device', buckets => '3,2')".into(), None).await.unwrap_err();
    assert!(err.to_string().contains("buckets => 3,2"), "{err}");
}
