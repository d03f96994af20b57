//! The crate layout holds: every workspace crate depends only on crates in
//! the layers below it (so there is no cycle and no upward dependency), and
//! the DP planner has no I/O dependency at all. Read from `cargo metadata`.

use std::collections::BTreeMap;

/// Each crate with its layer; a crate may depend on crates of lower layers
/// only. The README's "How it is built" table lists the same crates.
const LAYERS: &[(&str, u32)] = &[
    ("cleanroom-dp", 0),
    ("cleanroom-proto", 0),
    ("cleanroom-prepare", 0),
    ("cleanroom-ledger", 1),
    ("cleanroom-manifest", 1),
    ("cleanroom-storage", 2),
    ("cleanroom-executor", 3),
    ("cleanroom-scheduler", 4),
    ("cleanroom-bench", 5),
    ("cleanroom-prepare-bench", 5),
    ("cleanroom", 6),
];

/// What the planner must not depend on: it reads no file, opens no socket
/// and runs no runtime of its own.
const NOT_IN_THE_PLANNER: &[&str] =
    &["redb", "etcd-client", "tonic", "tokio", "object_store", "arrow-flight", "ballista", "ballista-core", "ballista-executor", "ballista-scheduler"];

fn metadata() -> serde_json::Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

/// Each workspace crate's normal (not dev, not build) dependencies.
fn dependencies() -> BTreeMap<String, Vec<String>> {
    let m = metadata();
    m["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].is_null())
                .map(|d| d["name"].as_str().unwrap().to_string())
                .collect();
            (p["name"].as_str().unwrap().to_string(), deps)
        })
        .collect()
}

#[test]
fn every_crate_depends_only_on_the_layers_below_it() {
    let layers: BTreeMap<&str, u32> = LAYERS.iter().copied().collect();
    let deps = dependencies();
    for name in deps.keys() {
        assert!(layers.contains_key(name.as_str()), "crate {name} has no layer: add it to LAYERS and the README's layout table");
    }
    for (name, deps) in &deps {
        let own = layers[name.as_str()];
        for dep in deps.iter().filter(|d| d.starts_with("cleanroom")) {
            let theirs = layers[dep.as_str()];
            assert!(theirs < own, "{name} (layer {own}) depends on {dep} (layer {theirs}): only lower layers may be used");
        }
    }
}

#[test]
fn the_dp_planner_has_no_io_dependency() {
    let deps = dependencies();
    let planner = &deps["cleanroom-dp"];
    for banned in NOT_IN_THE_PLANNER {
        assert!(!planner.iter().any(|d| d == banned), "cleanroom-dp depends on {banned}");
    }
    // The ledger and the manifest are crates of their own, below storage and
    // serving; the planner knows neither.
    assert!(!planner.iter().any(|d| d.starts_with("cleanroom")), "cleanroom-dp depends on {planner:?}");
}
