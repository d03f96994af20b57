//! The ledger's guarantees, each tried against a real `cleanroom serve`
//! process over Flight SQL, on both ledger backends (the embedded store and a
//! real etcd): concurrent queries never overspend; `kill -9` at random
//! moments never loses or doubles a charge; etcd members lost and back.

#[path = "support/etcd.rs"]
mod etcd;
/// The engine `serve` runs queries on in these tests.
const ENGINE: &str = "ballista";

#[path = "support/server.rs"]
mod server;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow_flight::sql::client::FlightSqlServiceClient;
use cleanroom_ledger::audit;
use cleanroom_ledger::{EtcdLedger, Ledger, RedbLedger};
use futures::TryStreamExt;
use rand::Rng;
use server::*;
use tonic::transport::Channel;

const PARTIES: [&str; 4] = ["advertiser", "adnetwork", "operator", "affiliate"];

/// The demo manifest with four parties (the two new ones share the
/// advertiser's password) and every party's ε budget set to `budget`.
fn four_party_manifest(name: &str, budget: f64) -> PathBuf {
    let text = std::fs::read_to_string(demo().join("manifest.toml")).unwrap();
    let hash = text
        .lines()
        .skip_while(|l| !l.contains("name = \"advertiser\""))
        .find_map(|l| l.strip_prefix("password = "))
        .unwrap()
        .to_string();
    let mut text = text
        .replace("epsilon_budget = 50.0", &format!("epsilon_budget = {budget:?}"))
        .replace("readers = [\"advertiser\", \"adnetwork\"]", "readers = [\"advertiser\", \"adnetwork\", \"operator\", \"affiliate\"]")
        .replace("location = \"data/", &format!("location = \"{}/data/", demo().display()));
    let first_dataset = text.find("[[datasets]]").unwrap();
    let extra: String = ["operator", "affiliate"]
        .iter()
        .map(|p| format!("[[parties]]\nname = \"{p}\"\npassword = {hash}\nepsilon_budget = {budget:?}\n\n"))
        .collect();
    text.insert_str(first_dataset, &extra);
    let path = std::env::temp_dir().join(format!("cleanroom-guarantees-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

fn login_password(party: &str) -> String {
    match party {
        "operator" | "affiliate" => password("advertiser"),
        p => password(p),
    }
}

async fn login(server: &Server, party: &str) -> FlightSqlServiceClient<Channel> {
    let mut client = server.client().await;
    client.handshake(party, &login_password(party)).await.expect("handshake");
    client
}

/// A query no other query of the test asks (so none is answered from the
/// released-answer cache), costing ε = 1.
fn distinct_query(n: usize) -> String {
    format!("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1) channel, COUNT(*) AS n FROM impressions WHERE creative_id <> {n} GROUP BY channel")
}

/// Run `sql`; return the answer and the receipt id from the response headers.
async fn answer(client: &mut FlightSqlServiceClient<Channel>, sql: &str) -> Result<(Vec<RecordBatch>, String), tonic::Status> {
    let info = client.execute(sql.to_string(), None).await.map_err(status_of)?;
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let stream = client.do_get(ticket).await.map_err(status_of)?;
    let receipt = stream
        .headers()
        .get("x-cleanroom-receipt")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let batches = stream.try_collect::<Vec<_>>().await.map_err(status_of)?;
    Ok((batches, receipt))
}

fn status_of(e: arrow_flight::error::FlightError) -> tonic::Status {
    match e {
        arrow_flight::error::FlightError::Tonic(s) => *s,
        e => tonic::Status::unknown(e.to_string()),
    }
}

/// Where a test keeps its ledger.
enum Backend {
    Redb(PathBuf),
    Etcd(etcd::Etcd, String),
}

impl Backend {
    fn redb(name: &str) -> Backend {
        Backend::Redb(state_dir(name))
    }

    fn etcd(members: usize, prefix: &str) -> Backend {
        Backend::Etcd(etcd::Etcd::start(members), prefix.to_string())
    }

    fn serve_args(&self) -> Vec<String> {
        match self {
            Backend::Redb(dir) => vec!["--state-dir".into(), dir.display().to_string()],
            Backend::Etcd(etcd, prefix) => vec!["--etcd".into(), etcd.urls(), "--etcd-prefix".into(), prefix.clone()],
        }
    }

    /// The ledger, opened directly (the embedded one only while no server runs).
    fn open(&self) -> Arc<dyn Ledger> {
        match self {
            Backend::Redb(dir) => Arc::new(RedbLedger::open(dir).unwrap()),
            Backend::Etcd(etcd, prefix) => Arc::new(EtcdLedger::connect(&etcd.endpoints(), prefix).unwrap()),
        }
    }

    fn log(&self, name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("cleanroom-guarantees-{}-{name}.log", std::process::id()))
    }
}

/// The ledger is consistent: each party's total is the sum of its charge
/// records, no receipt appears twice, every receipt in `answered` is there,
/// and the audit log verifies with one `query` record per charge.
fn check_ledger(ledger: &dyn Ledger, parties: &[&str], answered: &HashSet<String>) -> usize {
    let mut receipts = HashSet::new();
    let mut charges = 0;
    for party in parties {
        let history = ledger.history(party).unwrap();
        let sum: f64 = history.iter().map(|c| c.epsilon).sum();
        let spent = ledger.spent(party).unwrap();
        assert!((spent - sum).abs() < 1e-9, "{party}: spent {spent} but its charges add up to {sum}");
        for c in &history {
            assert!(receipts.insert(c.receipt_id.clone()), "receipt {} charged twice", c.receipt_id);
        }
        charges += history.len();
    }
    for r in answered {
        assert!(receipts.contains(r), "an answer with receipt {r} reached a client but its charge is not in the ledger");
    }
    let records = ledger.audit_records(0).unwrap();
    let v = audit::verify(&records, ledger.audit_head().unwrap().as_ref(), &[]);
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    let audited: HashSet<String> = records
        .iter()
        .map(|(_, b)| audit::parse(b).unwrap())
        .filter(|r| r.kind == "query" && r.detail["epsilon"].as_f64() != Some(0.0))
        .map(|r| r.detail["receipt"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(audited, receipts, "every charge has its query record in the audit log, and nothing else does");
    charges
}

/// 200 concurrent queries (50 per party) against budgets of 10 queries each:
/// exactly 40 answered, every other one refused for budget, none over.
async fn concurrent_queries_admit_exactly_the_budget(backend: Backend, name: &str) {
    let manifest = four_party_manifest(name, 10.0);
    let server = Server::start_on(&manifest, &backend.serve_args(), &backend.log(name));
    let mut tasks = Vec::new();
    for (p, party) in PARTIES.iter().enumerate() {
        let client = login(&server, party).await;
        for i in 0..50 {
            let mut client = client.clone();
            tasks.push(tokio::spawn(async move { answer(&mut client, &distinct_query(p * 50 + i)).await }));
        }
    }
    let mut answered = HashSet::new();
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok((batches, receipt)) => {
                assert_eq!(batches[0].schema().metadata()["cleanroom.receipt"], receipt);
                assert!(answered.insert(receipt));
            }
            Err(s) if s.code() == tonic::Code::ResourceExhausted && s.message().contains("privacy budget exceeded") => refused += 1,
            Err(s) => panic!("unexpected error: {s}\n{}", server.log()),
        }
    }
    assert_eq!((answered.len(), refused), (40, 160));
    server.kill();
    let ledger = backend.open();
    for party in PARTIES {
        assert!((ledger.spent(party).unwrap() - 10.0).abs() < 1e-9, "{party}: {}", ledger.spent(party).unwrap());
    }
    assert_eq!(check_ledger(ledger.as_ref(), &PARTIES, &answered), 40);
    let refusals = ledger
        .audit_records(0)
        .unwrap()
        .iter()
        .filter(|(_, b)| audit::parse(b).unwrap().detail["rule"] == "budget")
        .count();
    assert_eq!(refusals, 160, "each budget refusal is on the audit log");
    println!("{name}: 200 concurrent queries from 4 parties, 40 answered, 160 refused for budget, none over");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_queries_never_overspend_embedded() {
    concurrent_queries_admit_exactly_the_budget(Backend::redb("concurrent"), "concurrent-redb").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_queries_never_overspend_etcd() {
    concurrent_queries_admit_exactly_the_budget(Backend::etcd(1, "/concurrent/"), "concurrent-etcd").await;
}

/// `kill -9` of the server at a random moment of a stream of queries, 50
/// times, restarting on the same ledger each time.
async fn crashes_lose_and_double_nothing(backend: Backend, name: &str) {
    const TRIALS: usize = 50;
    let manifest = four_party_manifest(name, 10_000.0);
    let mut answered = HashSet::new();
    let mut next = 0usize;
    let mut rng = rand::thread_rng();
    let (mut killed_mid_query, mut answers) = (0, 0);
    for trial in 0..TRIALS {
        let server = Server::start_on(&manifest, &backend.serve_args(), &backend.log(name));
        let mut client = login(&server, "advertiser").await;
        let stream = {
            let first = next;
            tokio::spawn(async move {
                let mut got = Vec::new();
                for n in first.. {
                    match answer(&mut client, &distinct_query(n)).await {
                        Ok((_, receipt)) => got.push(receipt),
                        Err(_) => return (got, true),
                    }
                }
                (got, false)
            })
        };
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..1500))).await;
        server.kill();
        let (got, interrupted) = tokio::time::timeout(Duration::from_secs(30), stream).await.expect("the client notices the crash").unwrap();
        killed_mid_query += usize::from(interrupted);
        answers += got.len();
        next += got.len() + 1;
        answered.extend(got);
        if trial % 10 == 9 || trial == TRIALS - 1 {
            // Between trials the embedded ledger is free to open (the server is dead).
            let ledger = backend.open();
            check_ledger(ledger.as_ref(), &["advertiser"], &answered);
        }
    }
    let ledger = backend.open();
    let charges = check_ledger(ledger.as_ref(), &["advertiser"], &answered);
    assert!(charges >= answers && charges <= answers + TRIALS, "{charges} charges for {answers} answers");
    drop(ledger);
    // And it still serves.
    let server = Server::start_on(&manifest, &backend.serve_args(), &backend.log(name));
    let mut client = login(&server, "advertiser").await;
    answer(&mut client, &distinct_query(next)).await.expect("serves after 50 crashes");
    println!(
        "{name}: {TRIALS} kill -9 trials, {answers} answers received, {charges} charges kept, {killed_mid_query} crashes cut a query; every answer's charge present, none doubled, audit log intact"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_loses_no_charge_embedded() {
    crashes_lose_and_double_nothing(Backend::redb("crash"), "crash-redb").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_loses_no_charge_etcd() {
    crashes_lose_and_double_nothing(Backend::etcd(1, "/crash/"), "crash-etcd").await;
}

/// One member of three killed mid-stream: queries go on. All killed: queries
/// are refused as unavailable, never answered. Back up: answered again by the
/// same server.
#[tokio::test(flavor = "multi_thread")]
async fn etcd_members_lost_mid_stream_and_back() {
    let mut etcd = etcd::Etcd::start(3);
    let manifest = four_party_manifest("faults", 10_000.0);
    let args = ["--etcd".to_string(), etcd.urls(), "--etcd-prefix".into(), "/faults/".into()];
    let log = std::env::temp_dir().join(format!("cleanroom-guarantees-{}-faults.log", std::process::id()));
    let server = Server::start_on(&manifest, &args, &log);
    let mut client = login(&server, "advertiser").await;
    let mut answered = HashSet::new();
    let mut n = 0;
    let mut ask = |client: &mut FlightSqlServiceClient<Channel>| {
        n += 1;
        let sql = distinct_query(n);
        let mut client = client.clone();
        async move { answer(&mut client, &sql).await }
    };
    for _ in 0..10 {
        answered.insert(ask(&mut client).await.expect("answered").1);
    }
    etcd.kill(0);
    for i in 0..10 {
        let (_, receipt) = ask(&mut client).await.unwrap_or_else(|e| panic!("query {i} with one member down: {e}\n{}", server.log()));
        answered.insert(receipt);
    }
    for m in 1..3 {
        etcd.kill(m);
    }
    let started = Instant::now();
    for _ in 0..2 {
        let err = ask(&mut client).await.expect_err("no answer without the ledger");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        assert!(err.message().contains("the budget ledger is unreachable"), "{err}");
    }
    let refused_in = started.elapsed();
    for m in 0..3 {
        etcd.restart(m);
    }
    etcd.wait_all_healthy();
    let (_, receipt) = ask(&mut client).await.expect("the same server answers once etcd is back");
    answered.insert(receipt);
    server.kill();
    let ledger = EtcdLedger::connect(&etcd.endpoints(), "/faults/").unwrap();
    let charges = check_ledger(&ledger, &["advertiser"], &answered);
    assert_eq!(charges, 21, "the refused queries were not charged");
    println!("etcd faults: 10 answers, one member killed, 10 more answers, all killed: 2 queries refused as unavailable in {refused_in:?}, back up: answered; 21 charges for 21 answers");
}

/// Operators see budgets and the audit log with the CLI; a grant is audited;
/// tampering with the log is reported by `audit verify`.
#[tokio::test(flavor = "multi_thread")]
async fn operator_commands_show_grant_and_verify() {
    let backend = Backend::etcd(1, "/ops/");
    let manifest = four_party_manifest("ops", 2.0);
    let server = Server::start_on(&manifest, &backend.serve_args(), &backend.log("ops"));
    let mut client = login(&server, "affiliate").await;
    let (batches, _) = answer(&mut client, &distinct_query(1)).await.unwrap();
    let audit_record = batches[0].schema().metadata()["cleanroom.audit.record"].clone();
    answer(&mut client, &distinct_query(2)).await.unwrap();
    let err = answer(&mut client, &distinct_query(3)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    let ledger_args = backend.serve_args();
    let cli = |args: &[&str]| {
        let out = Command::new(BIN).args(args).args(&ledger_args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let m = manifest.display().to_string();
    // With the server running (etcd): grant, then the party can go on.
    let (ok, out) = cli(&["budget", "grant", "--manifest", &m, "--party", "affiliate", "--epsilon", "1", "--reason", "pilot extension"]);
    assert!(ok, "{out}");
    assert!(out.contains("its budget is now epsilon = 3"), "{out}");
    answer(&mut client, &distinct_query(4)).await.expect("answered after the grant");
    let (ok, out) = cli(&["budget", "show", "--manifest", &m, "--json"]);
    assert!(ok, "{out}");
    let affiliate: serde_json::Value = out.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).find(|r| r["party"] == "affiliate").unwrap();
    assert_eq!((affiliate["epsilon_spent"].as_f64(), affiliate["epsilon_budget"].as_f64(), affiliate["queries"].as_u64()), (Some(3.0), Some(3.0), Some(3)));
    let (ok, out) = cli(&["audit", "list", "--manifest", &m, "--party", "affiliate", "--kind", "budget_grant"]);
    assert!(ok && out.contains("pilot extension"), "{out}");
    let (ok, out) = cli(&["audit", "list", "--manifest", &m, "--json", "--since", "2020-01-01"]);
    assert!(ok, "{out}");
    let kinds: Vec<String> = out.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"].as_str().unwrap().to_string()).collect();
    for k in ["manifest", "auth", "query", "answer", "refusal", "budget_grant"] {
        assert!(kinds.iter().any(|x| x == k), "no {k} record in {kinds:?}");
    }
    // The party sees its new budget too.
    let (batches, _) = answer(&mut client, "SELECT budget_epsilon, remaining_epsilon FROM system.budget").await.unwrap();
    let budget = batches[0].column(0).as_any().downcast_ref::<arrow::array::Float64Array>().unwrap().value(0);
    assert_eq!(budget, 3.0);
    // Verify while parties keep logging in (each login appends a record).
    let server_addr = server.addr.clone();
    let logins = tokio::spawn(async move {
        for _ in 0..30 {
            let channel = Channel::from_shared(format!("http://{server_addr}")).unwrap().connect().await.unwrap();
            FlightSqlServiceClient::new(channel).handshake("advertiser", &password("advertiser")).await.unwrap();
        }
    });
    for _ in 0..5 {
        let (ok, out) = cli(&["audit", "verify", "--expect", &audit_record]);
        assert!(ok && out.contains("audit log intact"), "{out}");
    }
    logins.await.unwrap();
    // Edit one record in etcd: verify names it and fails.
    let Backend::Etcd(etcd, _) = &backend else { unreachable!() };
    let (seq, _) = audit_record.split_once(':').unwrap();
    let key = format!("/ops/audit/log/{:020}", seq.parse::<u64>().unwrap());
    let mut c = etcd_client::Client::connect(etcd.endpoints(), None).await.unwrap();
    let v = String::from_utf8(c.get(key.clone(), None).await.unwrap().kvs()[0].value().to_vec()).unwrap();
    c.put(key, v.replace("\"epsilon\":1.0", "\"epsilon\":0.1"), None).await.unwrap();
    let (ok, out) = cli(&["audit", "verify", "--expect", &audit_record]);
    assert!(!ok, "{out}");
    assert!(out.contains(&format!("record {seq} was edited")) && out.contains("TAMPERED"), "{out}");
    server.kill();
}
