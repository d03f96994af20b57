//! Real etcd clusters for tests: `etcd` (Debian's `etcd-server`) members on
//! free loopback ports, each a separate process that a test can kill and
//! restart.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Member {
    name: String,
    client: u16,
    peer: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster, killed (and its data removed) on drop.
pub struct Etcd {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    dir: PathBuf,
}

/// A free loopback port never handed out before in this process (the
/// system may give a just-released port again, and two members on one port
/// would leave the cluster a member short).
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// `GET /health` on a client port: true if the member is up and has a leader.
fn healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET /health HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes()).is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl Etcd {
    /// Start `n` members and wait until they have a leader.
    pub fn start(n: usize) -> Etcd {
        let dir = std::env::temp_dir().join(format!("cleanroom-etcd-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                data_dir: dir.join(format!("m{i}.etcd")),
                log: dir.join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let token = dir.file_name().unwrap().to_string_lossy().into_owned();
        let mut etcd = Etcd { members, initial_cluster, token, dir };
        for i in 0..n {
            etcd.spawn(i);
        }
        etcd.wait_healthy(&(0..n).collect::<Vec<_>>());
        etcd
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&m.log).unwrap();
        let child = Command::new("etcd")
            .args(["--name", &m.name, "--data-dir"])
            .arg(&m.data_dir)
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{}", m.client),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{}", m.client),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", m.peer),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", m.peer),
                "--initial-cluster",
                &self.initial_cluster,
                "--initial-cluster-token",
                &self.token,
                "--initial-cluster-state",
                "new",
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start etcd (install Debian's etcd-server package)");
        self.members[i].child = Some(child);
    }

    fn wait_healthy(&self, members: &[usize]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for &i in members {
            while !healthy(self.members[i].client) {
                assert!(
                    Instant::now() < deadline,
                    "etcd member {i} did not become healthy; its log:\n{}",
                    std::fs::read_to_string(&self.members[i].log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// `http://127.0.0.1:<port>` of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("http://127.0.0.1:{}", m.client)).collect()
    }

    /// The endpoints as `--etcd` takes them.
    pub fn urls(&self) -> String {
        self.endpoints().join(",")
    }

    /// `kill -9` member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start member `i` again on its data and wait until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
    }

    /// Wait until every running member reports a leader.
    pub fn wait_all_healthy(&self) {
        let running: Vec<usize> = (0..self.members.len()).filter(|&i| self.members[i].child.is_some()).collect();
        self.wait_healthy(&running);
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
