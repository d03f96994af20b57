//! A `cleanroom serve` process and a Flight SQL client for end-to-end tests:
//! the AdBench demo at SF 0.01 (generated once per test binary), its
//! credentials, and helpers to run a statement and collect its answer.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_cleanroom");

/// AdBench at SF 0.01, generated once for all tests of this file.
pub fn demo() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("cleanroom-e2e-{}", std::process::id()));
        let status = Command::new(BIN)
            .args(["generate", "--sf", "0.01", "--seed", "7", "--quiet", "--out"])
            .arg(&dir)
            .status()
            .expect("run cleanroom generate");
        assert!(status.success(), "cleanroom generate failed");
        dir
    })
}

pub fn password(party: &str) -> String {
    password_in(demo(), party)
}

/// The demo password of `party` in the collaboration generated in `dir`.
pub fn password_in(dir: &Path, party: &str) -> String {
    let text = std::fs::read_to_string(dir.join("credentials.toml")).unwrap();
    let mut in_party = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_party = line == format!("[parties.{party}]");
        } else if in_party {
            if let Some(v) = line.strip_prefix("password = ") {
                return v.trim_matches('"').to_string();
            }
        }
    }
    panic!("no password for {party}")
}

pub fn truth() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(demo().join("truth.json")).unwrap()).unwrap()
}

/// A `cleanroom serve` process on a free port, killed on drop. It runs
/// queries on the test binary's `ENGINE` (`ballista` or `in-process`).
pub struct Server {
    pub child: Child,
    pub addr: String,
    pub log: PathBuf,
}

impl Server {
    pub fn start(state_dir: &Path) -> Server {
        Server::start_with(&demo().join("manifest.toml"), state_dir)
    }

    pub fn start_with(manifest: &Path, state_dir: &Path) -> Server {
        Server::start_on(manifest, &["--state-dir".into(), state_dir.display().to_string()], &state_dir.with_extension("log"))
    }

    /// Serve `manifest` with the ledger where `ledger_args` say
    /// (`--state-dir DIR` or `--etcd URLS`), logging to `log`.
    pub fn start_on(manifest: &Path, ledger_args: &[String], log: &Path) -> Server {
        let log = log.to_path_buf();
        let child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--engine", crate::ENGINE])
            .args(if crate::ENGINE == "ballista" { &["--executors", "2"][..] } else { &[] })
            .arg("--manifest")
            .arg(manifest)
            .args(ledger_args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start cleanroom serve");
        let mut child = child;
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let started = Instant::now();
        let addr = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("server exited: {}", std::fs::read_to_string(&log).unwrap_or_default()))
                .unwrap();
            if let Some(rest) = line.split("grpc://").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
            assert!(started.elapsed() < Duration::from_secs(120), "server did not start");
        };
        Server { child, addr, log }
    }

    pub async fn client(&self) -> FlightSqlServiceClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.unwrap();
        FlightSqlServiceClient::new(channel)
    }

    pub async fn login(&self, party: &str) -> FlightSqlServiceClient<Channel> {
        let mut client = self.client().await;
        client.handshake(party, &password(party)).await.expect("handshake");
        client
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Simulate a crash: SIGKILL, no shutdown.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn query(client: &mut FlightSqlServiceClient<Channel>, sql: &str) -> Result<Vec<RecordBatch>, tonic::Status> {
    let info = client.execute(sql.to_string(), None).await.map_err(to_status)?;
    let mut batches = Vec::new();
    for endpoint in info.endpoint {
        let stream = client.do_get(endpoint.ticket.unwrap()).await.map_err(to_status)?;
        batches.extend(stream.try_collect::<Vec<_>>().await.map_err(|e| tonic::Status::internal(e.to_string()))?);
    }
    Ok(batches)
}

pub fn to_status(e: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::unknown(e.to_string())
}

pub fn state_dir(name: &str) -> PathBuf {
    let dir = tempfile::Builder::new().prefix(name).tempdir().unwrap().keep();
    dir.join("state")
}
