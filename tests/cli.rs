//! The `cleanroom` command line: manifest checking, and a server that stops
//! cleanly on Ctrl-C.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cleanroom");

#[test]
fn manifest_check_reports_every_problem_with_its_path_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("manifest.toml");
    std::fs::write(
        &manifest,
        r#"
[collaboration]
name = "broken"

[[parties]]
name = "a"
password = "not a hash"
epsilon_budget = 10.0

[[datasets]]
name = "events"
owner = "nobody"
location = "data/events/"
privacy_unit = "uid"
readers = ["a"]

[datasets.columns]
uid = { role = "join_key" }
revenue = { role = "measure", bounds = [10, 5] }
"#,
    )
    .unwrap();
    let out = Command::new(BIN).args(["manifest", "check"]).arg(&manifest).output().unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("datasets[0].columns.revenue.bounds: lower bound 10 is above upper bound 5"), "{stdout}");
    assert!(stdout.contains("datasets[0].owner"), "{stdout}");
    assert!(stdout.contains("parties[0].password"), "{stdout}");
}

/// A tiny AdBench collaboration in a fresh directory.
fn generated_demo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(BIN)
        .args(["generate", "--sf", "0.001", "--quiet", "--out"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    dir
}

#[test]
fn generated_manifest_passes_the_check() {
    let dir = generated_demo();
    let out = Command::new(BIN).args(["manifest", "check"]).arg(dir.path().join("manifest.toml")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn serve_stops_cleanly_on_ctrl_c() {
    let dir = generated_demo();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--manifest"])
        .arg(dir.path().join("manifest.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next().unwrap().unwrap();
    assert!(line.contains("grpc://127.0.0.1:"), "{line}");
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "server did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
    // The ledger was closed properly: it opens again.
    assert!(dir.path().join("state").join("ledger.redb").exists());
}

#[test]
fn serve_refuses_a_manifest_whose_roles_do_not_fit_the_data() {
    let dir = generated_demo();
    let manifest = dir.path().join("manifest.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let line = text.lines().find(|l| l.starts_with("channel = { role")).unwrap().to_string();
    std::fs::write(&manifest, text.replace(&line, r#"channel = { role = "measure", bounds = [0, 1] }"#)).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--manifest"])
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("column `channel`") && stderr.contains("does not fit its role measure"), "{stderr}");
}
