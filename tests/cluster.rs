//! The embedded cluster really executes queries: each DP query becomes a
//! Ballista job in the scheduler's job list, with several stages (a shuffle)
//! run by the in-process executors.

use arrow_flight::sql::client::FlightSqlServiceClient;
use cleanroom_bench::generate::{generate, GenerateOptions};
use cleanroom_scheduler::serve::{start, EngineChoice, ServeOptions};
use futures::TryStreamExt;
use tonic::transport::Channel;

#[tokio::test(flavor = "multi_thread")]
async fn dp_queries_run_as_ballista_jobs_on_the_embedded_executors() {
    let dir = tempfile::tempdir().unwrap();
    generate(&GenerateOptions { scale_factor: 0.001, out_dir: dir.path().to_path_buf(), seed: 3, progress: false, truth: true, vertical: Default::default() })
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = start(
        &ServeOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            engine: EngineChoice::Ballista,
            state_dir: Some(dir.path().join("state")),
            ..ServeOptions::standalone(dir.path().join("manifest.toml"))
        },
        async move {
            let _ = stopped.await;
        },
    )
    .await
    .unwrap();
    let cluster = running.cluster.clone().expect("a Ballista cluster");
    assert!(cluster.scheduler_addr.ip().is_loopback(), "the scheduler must be internal");
    assert!(cluster.jobs().await.unwrap().is_empty());

    let credentials: toml::Value = toml::from_str(&std::fs::read_to_string(dir.path().join("credentials.toml")).unwrap()).unwrap();
    let password = credentials["parties"]["adnetwork"]["password"].as_str().unwrap();
    let channel = Channel::from_shared(format!("http://{}", running.addr)).unwrap().connect().await.unwrap();
    let mut client = FlightSqlServiceClient::new(channel);
    client.handshake("adnetwork", password).await.unwrap();
    for dimension in ["channel", "device"] {
        let info = client
            .execute(format!("SELECT {dimension}, COUNT(DISTINCT uid) FROM impressions GROUP BY {dimension}"), None)
            .await
            .unwrap();
        let stream = client.do_get(info.endpoint[0].ticket.clone().unwrap()).await.unwrap();
        stream.try_collect::<Vec<_>>().await.unwrap();
    }
    // A query that reads no dataset does not touch the cluster.
    let info = client.execute("SELECT 1 AS one".into(), None).await.unwrap();
    client.do_get(info.endpoint[0].ticket.clone().unwrap()).await.unwrap().try_collect::<Vec<_>>().await.unwrap();

    let jobs = cluster.jobs().await.unwrap();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    for job in &jobs {
        assert!(job.status == "successful", "{job:?}");
        assert!(job.stages >= 2 && job.completed_stages == job.stages, "{job:?}");
    }
    let _ = stop.send(());
    running.wait().await.unwrap();
}
