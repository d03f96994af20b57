//! Cluster mode as separate processes on loopback: etcd, `cleanroom
//! scheduler` and three `cleanroom executor`s. An AdBench join query runs
//! over Flight SQL; one executor is `kill -9`ed while the query's job has
//! written shuffle output, and the query still completes with a DP answer of
//! the right shape, charged once. With every executor gone, queries fail with
//! a clear error after a bounded wait, and the charge of a failed query is kept.

#[path = "support/etcd.rs"]
mod etcd;
/// The engine `serve` runs queries on in these tests.
const ENGINE: &str = "ballista";

#[path = "support/server.rs"]
mod server;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arrow::array::{Array, Float64Array};
use arrow_flight::sql::client::FlightSqlServiceClient;
use server::{demo, password, query, BIN};
use tonic::transport::Channel;

/// A free loopback port (and the one after it, which an executor also takes).
fn free_port_pair() -> u16 {
    loop {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if port < 65000 && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Cluster {
    scheduler: Process,
    addr: String,
    internal: String,
    executors: Vec<(Process, PathBuf)>,
    dir: PathBuf,
}

impl Cluster {
    /// The scheduler (ledger on `etcd`) with a short executor timeout.
    fn start(etcd: &etcd::Etcd, executors: usize) -> Cluster {
        let dir = tempfile::Builder::new().prefix("cleanroom-cluster").tempdir().unwrap().keep();
        let internal = format!("127.0.0.1:{}", free_port_pair());
        let log = dir.join("scheduler.log");
        let mut child = Command::new(BIN)
            .args(["scheduler", "--listen", "127.0.0.1:0", "--internal-bind", &internal, "--partitions", "6", "--executor-timeout", "6"])
            .args(["--etcd", &etcd.urls(), "--etcd-prefix", "/cluster-faults/", "--manifest"])
            .arg(demo().join("manifest.toml"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start cleanroom scheduler");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("scheduler exited: {}", std::fs::read_to_string(&log).unwrap_or_default()))
                .unwrap();
            if let Some(rest) = line.split("grpc://").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        let mut cluster = Cluster { scheduler: Process { child, log }, addr, internal, executors: Vec::new(), dir };
        for _ in 0..executors {
            cluster.add_executor();
        }
        cluster
    }

    fn add_executor(&mut self) {
        let i = self.executors.len();
        let work = self.dir.join(format!("executor-{i}"));
        let log = self.dir.join(format!("executor-{i}.log"));
        let child = Command::new(BIN)
            .args(["executor", "--scheduler", &self.internal, "--slots", "2", "--heartbeat-interval", "1"])
            .args(["--port", &free_port_pair().to_string(), "--work-dir"])
            .arg(&work)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start cleanroom executor");
        self.executors.push((Process { child, log }, work));
    }

    async fn login(&self, party: &str) -> FlightSqlServiceClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.unwrap();
        let mut client = FlightSqlServiceClient::new(channel);
        client.handshake(party, &password(party)).await.expect("handshake");
        client
    }
}

/// The AdBench query `name` from benchmarks/dp-queries.sql.
fn adbench(name: &str) -> String {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../benchmarks/dp-queries.sql")).unwrap();
    let start = text.find(&format!("-- name: {name}\n")).unwrap_or_else(|| panic!("no query {name}"));
    let body = &text[start..];
    let end = body[1..].find("-- name: ").map(|e| e + 1).unwrap_or(body.len());
    body[..end].trim().trim_end_matches(';').to_string()
}

/// Any job directory with shuffle files in an executor's work directory.
fn has_shuffle_output(work: &Path) -> bool {
    fn walk(dir: &Path, depth: usize) -> bool {
        let Ok(entries) = std::fs::read_dir(dir) else { return false };
        entries.flatten().any(|e| {
            let path = e.path();
            if path.is_dir() {
                depth < 6 && walk(&path, depth + 1)
            } else {
                path.extension().is_some_and(|x| x == "arrow" || x == "data")
            }
        })
    }
    walk(work, 0)
}

async fn spent(client: &mut FlightSqlServiceClient<Channel>) -> f64 {
    let batches = query(client, "SELECT budget_epsilon - remaining_epsilon AS spent FROM system.budget").await.unwrap();
    let column = batches[0].column(0).as_any().downcast_ref::<Float64Array>().expect("spent is a float").clone();
    column.value(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_survives_an_executor_killed_mid_join_and_fails_cleanly_without_executors() {
    let etcd = etcd::Etcd::start(1);
    let mut cluster = Cluster::start(&etcd, 3);
    let sql = adbench("Q3_incrementality");
    let mut client = cluster.login("adnetwork").await;

    // What a party is handed points back at the gateway only: no executor
    // address, and a ticket that is the gateway's own statement handle.
    let info = client.execute(sql.clone(), None).await.unwrap();
    for endpoint in &info.endpoint {
        assert!(endpoint.location.is_empty(), "an endpoint names a location: {:?}", endpoint.location);
        let ticket = endpoint.ticket.as_ref().unwrap().ticket.to_vec();
        let text = String::from_utf8_lossy(&ticket);
        assert!(!text.contains("127.0.0.1") && !text.contains(&cluster.internal), "the ticket names an address: {text}");
    }

    // Undisturbed: the reference time and answer shape.
    let started = Instant::now();
    let calm = query(&mut client, &sql).await.unwrap_or_else(|e| panic!("{e}\n{}", cluster.scheduler.log()));
    let calm_time = started.elapsed();
    let shape = calm[0].schema();
    let calm_rows: usize = calm.iter().map(|b| b.num_rows()).sum();
    let spent_before = spent(&mut client).await;

    // The same question again (a different ε, so it is not the released
    // answer from the cache); kill -9 an executor once one holds shuffle output.
    let again = sql.replacen("epsilon = 1", "epsilon = 0.5", 1);
    assert_ne!(again, sql);
    let works: Vec<PathBuf> = cluster.executors.iter().map(|(_, w)| w.clone()).collect();
    for w in &works {
        new_job_dir(w);
    }
    let mut remote = cluster.login("adnetwork").await;
    let started = Instant::now();
    let running = tokio::spawn(async move { query(&mut remote, &again).await.map(|b| (b, started.elapsed())) });
    let victim = loop {
        if running.is_finished() {
            panic!("the query finished before any executor held shuffle output to lose");
        }
        // Ignore shuffle files of the first, finished query: look for a new job directory.
        if let Some(i) = works.iter().position(|w| new_job_dir(w)) {
            break i;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let killed_at = started.elapsed();
    cluster.executors[victim].0.kill();
    let (answer, faulty_time) = running
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the query did not survive the lost executor: {e}\n{}", cluster.scheduler.log()));
    let columns = |s: &arrow::datatypes::Schema| s.fields().iter().map(|f| (f.name().clone(), f.data_type().clone())).collect::<Vec<_>>();
    assert_eq!(columns(&answer[0].schema()), columns(&shape), "same columns with and without the fault");
    assert_eq!(answer.iter().map(|b| b.num_rows()).sum::<usize>(), calm_rows, "same groups");
    let spent_after = spent(&mut client).await;
    assert!((spent_after - spent_before - 0.5).abs() < 1e-9, "charged exactly once: {spent_before} -> {spent_after}");
    println!(
        "cluster-faults: Q3_incrementality took {:.2} s undisturbed and {:.2} s with executor {victim} killed by SIGKILL at {:.2} s; charged 0.5 once",
        calm_time.as_secs_f64(),
        faulty_time.as_secs_f64(),
        killed_at.as_secs_f64()
    );

    // Every executor gone: a query already charged fails after a bounded
    // wait and keeps its charge; a new one is turned away uncharged.
    for (process, _) in &mut cluster.executors {
        process.kill();
    }
    let spent_before = spent(&mut client).await;
    let started = Instant::now();
    let error = query(&mut client, &sql.replacen("epsilon = 1", "epsilon = 0.25", 1)).await.expect_err("no executor can run it");
    let waited = started.elapsed();
    println!("cluster-faults: with no executor left: {} after {:.2} s", error.message(), waited.as_secs_f64());
    assert!(waited < Duration::from_secs(60), "the wait is bounded: {waited:?}");
    let spent_after = spent(&mut client).await;
    if error.message().contains("nothing was charged") {
        assert_eq!(spent_after, spent_before, "turned away before the charge");
    } else {
        assert!(error.message().contains("charge of epsilon = 0.25 is kept"), "{}", error.message());
        assert!((spent_after - spent_before - 0.25).abs() < 1e-9, "the failed query's charge is kept");
    }
    // Once executors are lost for good, the next query is turned away uncharged.
    let error = query(&mut client, &sql.replacen("epsilon = 1", "epsilon = 0.125", 1)).await.expect_err("no executor");
    assert!(error.message().contains("no executor is available"), "{}", error.message());
    assert_eq!(spent(&mut client).await, spent_after, "nothing charged");

    // A new executor joins: queries run again.
    cluster.add_executor();
    query(&mut client, &sql.replacen("epsilon = 1", "epsilon = 0.2", 1)).await.unwrap();
    drop(cluster);
}

/// True once an executor's work directory has shuffle files of a job it did
/// not have at the first call (the first query's files are remembered).
fn new_job_dir(work: &Path) -> bool {
    use std::collections::{HashMap, HashSet};
    use std::sync::Mutex;
    static SEEN: Mutex<Option<HashMap<PathBuf, HashSet<PathBuf>>>> = Mutex::new(None);
    let jobs: HashSet<PathBuf> = std::fs::read_dir(work)
        .map(|entries| entries.flatten().map(|e| e.path()).filter(|p| p.is_dir() && has_shuffle_output(p)).collect())
        .unwrap_or_default();
    let mut seen = SEEN.lock().unwrap();
    let seen = seen.get_or_insert_with(HashMap::new);
    match seen.get(work) {
        None => {
            seen.insert(work.to_path_buf(), jobs);
            false
        }
        Some(before) => jobs.iter().any(|j| !before.contains(j)),
    }
}
