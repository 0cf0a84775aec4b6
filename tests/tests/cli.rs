//! The `natter` CLI as a user runs it: two users, each with their own
//! config dir, register, become friends, chat (text, a file, a group),
//! read the feed and history, and watch messages arrive live — every step
//! a real `natter` process against a real cluster and router.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use natter_tests::router::RouterProc;
use natter_tests::{bin, Cluster, ClusterOpts};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

const PW: &str = "correct horse battery";

/// Runs `natter` with this config dir; (success, stdout, stderr).
async fn natter(dir: &Path, router: &str, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(bin("natter"))
        .arg("--config-dir")
        .arg(dir)
        .args(["--router", router, "--timeout", "30"])
        .args(args)
        .env("NATTER_PASSWORD", PW)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("natter runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

async fn ok(dir: &Path, router: &str, args: &[&str]) -> String {
    let (good, out, err) = natter(dir, router, args).await;
    assert!(good, "natter {args:?} failed: {err}\n{out}");
    out
}

async fn json(dir: &Path, router: &str, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = ok(dir, router, &a).await;
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// `json` repeated until `done` holds for its answer (or 30 s passed): for
/// what follows a write through the outbox, a moment later. The caller
/// asserts on the last answer.
async fn json_until(
    dir: &Path,
    router: &str,
    args: &[&str],
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = json(dir, router, args).await;
        if done(&v) || std::time::Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn two_cli_users_chat() {
    let c = Cluster::start(ClusterOpts::default()).await.unwrap();
    let r = RouterProc::start(c.dir.path(), "router", &c.addrs(), &[])
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("alice"), tmp.path().join("bob"));
    let ra = &r.addr;

    let out = ok(&a, ra, &["register", "alice"]).await;
    assert!(out.contains("logged in as alice"), "{out}");
    ok(&b, ra, &["register", "bob"]).await;
    let who = json(&b, ra, &["whoami"]).await;
    assert_eq!(who["username"], "bob");
    // A wrong password is refused with a clear message.
    let (good, _, err) = natter(&b, ra, &["login", "bob", "--password", "wrong password"]).await;
    assert!(!good && err.contains("unauthenticated"), "{err}");

    // Friends.
    let f = json(&a, ra, &["friends", "request", "bob"]).await;
    assert_eq!(f["relation"], "outgoing");
    let f = json(&b, ra, &["friends", "accept", "alice"]).await;
    assert_eq!(f["relation"], "friend");
    // Alice's friend list follows the acceptance through the outbox (a
    // moment later, on her own shard).
    let list = json_until(&a, ra, &["friends", "list"], |l| {
        l[0]["relation"] == "friend"
    })
    .await;
    assert_eq!(list[0]["username"], "bob");
    assert_eq!(list[0]["relation"], "friend");

    // Bob watches live while Alice writes.
    let mut watch = tokio::process::Command::new(bin("natter"))
        .arg("--config-dir")
        .arg(&b)
        .args(["--router", ra, "--json", "watch"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let next = |l: Option<String>| -> Value {
        serde_json::from_str(&l.expect("a line")).expect("JSON line")
    };
    let first = next(
        tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .unwrap()
            .unwrap(),
    );
    assert_eq!(first["event"], "connected");

    let sent = json(&a, ra, &["send", "@bob", "hello bob"]).await;
    let conv = sent["conversation_id"].as_str().unwrap().to_string();
    let live = loop {
        let v = next(
            tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .unwrap()
                .unwrap(),
        );
        if v["event"] == "message" {
            break v;
        }
    };
    assert_eq!(live["text"], "hello bob");
    assert_eq!(live["conversation_id"], conv.as_str());
    watch.kill().await.unwrap();

    ok(&b, ra, &["send", "@alice", "hi alice"]).await;
    let h = json(&a, ra, &["history", &conv]).await;
    let texts: Vec<&str> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["hello bob", "hi alice"]);
    let text = ok(&a, ra, &["history", "@bob"]).await;
    assert!(
        text.contains("alice: hello bob") && text.contains("bob: hi alice"),
        "{text}"
    );

    // The feed shows the chat, unread for Alice: feeds follow a send
    // through the outbox, a moment later (up to the fan-out's spacing when
    // the conversation was busy just before).
    let feed = json_until(&a, ra, &["feed"], |f| f[0]["preview"] == "hi alice").await;
    assert_eq!(feed[0]["conversation_id"], conv.as_str());
    assert_eq!(feed[0]["unread_count"], 1);
    assert_eq!(feed[0]["preview"], "hi alice");

    // A group.
    let g = json(&a, ra, &["chats", "group", "trip", "bob"]).await;
    let gid = g["conversation_id"].as_str().unwrap().to_string();
    assert_eq!(g["members"], 2);
    ok(&b, ra, &["send", &gid, "in the group"]).await;
    let h = json(&a, ra, &["history", &gid]).await;
    assert_eq!(h[0]["text"], "in the group");
    let chats = json_until(&b, ra, &["chats", "list"], |c| {
        c.as_array().is_some_and(|c| c.len() == 2)
    })
    .await;
    assert_eq!(chats.as_array().unwrap().len(), 2);

    // A file: uploaded when the router has the media endpoint; otherwise
    // the CLI says so and sends nothing.
    let file = tmp.path().join("photo.bin");
    std::fs::write(&file, vec![7u8; 300_000]).unwrap();
    let (good, out, err) = natter(
        &a,
        ra,
        &["--json", "send-file", &conv, file.to_str().unwrap()],
    )
    .await;
    let h = json(&b, ra, &["history", &conv]).await;
    let last = h.as_array().unwrap().last().unwrap().clone();
    if good {
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["size"], 300_000);
        assert_eq!(last["media"][0]["size"], 300_000);
        assert_eq!(last["media"][0]["name"], "photo.bin");
    } else {
        assert!(err.contains("media upload is not available"), "{err}");
        assert_eq!(last["text"], "hi alice", "nothing sent without the file");
    }

    // A chat with a stranger is refused clearly.
    ok(&tmp.path().join("carol"), ra, &["register", "carol"]).await;
    let (good, _, err) = natter(&tmp.path().join("carol"), ra, &["send", &conv, "let me in"]).await;
    assert!(!good && err.contains("not_found"), "{err}");

    // Logout forgets the session.
    ok(&b, ra, &["logout"]).await;
    let (good, _, err) = natter(&b, ra, &["whoami"]).await;
    assert!(!good && err.contains("not logged in"), "{err}");
}
