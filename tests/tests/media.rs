//! Media through a real router and cluster: upload, download, thumbnails,
//! caching headers, ranges, limits, sniffing, who may fetch what, and
//! media inside messages (docs/protocol.md, "Media").

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use natter_tests::media::{png, request, sha256_hex, sign_url, Answer, Body};
use natter_tests::router::{login, register, sync_until, Client, RouterProc, Synced};
use natter_tests::{Cluster, ClusterOpts};
use serde_json::{json, Value};

const PW: &str = "correct horse battery";
const SECRET: &str = "test-media-secret";
const LIMIT: usize = 2_000_000;

struct World {
    _cluster: Cluster,
    router: RouterProc,
    /// alice, bob: friends with a direct chat; carol: a stranger.
    tokens: [String; 3],
    ids: [String; 3],
    clients: Vec<Client>,
    conv: String,
}

async fn world() -> World {
    let cluster = Cluster::start(ClusterOpts::default())
        .await
        .expect("cluster starts");
    let media_dir = cluster.dir.path().join("media");
    let router = RouterProc::start(
        cluster.dir.path(),
        "router",
        &cluster.addrs(),
        &[
            "--media-dir",
            media_dir.to_str().expect("utf-8 path"),
            "--media-secret",
            SECRET,
            "--max-upload-bytes",
            &LIMIT.to_string(),
        ],
    )
    .await
    .expect("router starts");
    let names = ["alice", "bob", "carol"];
    let mut tokens = Vec::new();
    let mut ids = Vec::new();
    let mut clients = Vec::new();
    for n in names {
        ids.push(register(&router.addr, n, PW).await.expect("register"));
        let t = login(&router.addr, n, PW, "test").await.expect("login");
        clients.push(Client::connect(&router.addr, &t).await.expect("connect"));
        tokens.push(t);
    }
    clients[0]
        .call("friend_request", json!({"user_id": ids[1]}))
        .await
        .expect("request");
    clients[1]
        .call("friend_accept", json!({"user_id": ids[0]}))
        .await
        .expect("accept");
    let c = clients[0]
        .call("create_direct", json!({"user_id": ids[1]}))
        .await
        .expect("direct");
    let conv = c["conversation"]["id"].as_str().expect("id").to_string();
    World {
        _cluster: cluster,
        router,
        tokens: tokens.try_into().expect("3"),
        ids: ids.try_into().expect("3"),
        clients,
        conv,
    }
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

async fn upload(w: &World, who: usize, conv: &str, name: &str, ct: &str, bytes: &[u8]) -> Answer {
    let auth = bearer(&w.tokens[who]);
    request(
        &w.router.addr,
        "POST",
        &format!("/v1/media?conversation_id={conv}&name={name}"),
        &[("Authorization", &auth), ("Content-Type", ct)],
        Body::Bytes(bytes),
    )
    .await
    .expect("upload answered")
}

async fn get(w: &World, path: &str, headers: &[(&str, &str)]) -> Answer {
    request(&w.router.addr, "GET", path, headers, Body::None)
        .await
        .expect("download answered")
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_upload_download_thumbnails_and_access() {
    let mut w = world().await;
    let conv = w.conv.clone();

    // --- Upload a real PNG (the client lies about its type) -------------
    let img = png(800, 600);
    let up = upload(&w, 0, &conv, "photo.png", "text/html", &img).await;
    assert_eq!(up.status, 201, "{:?}", String::from_utf8_lossy(&up.body));
    let v = up.json();
    let sha = sha256_hex(&img);
    assert_eq!(s(&v["object_id"]), sha);
    assert_eq!(s(&v["sha256"]), sha);
    assert_eq!(
        s(&v["content_type"]),
        "image/png",
        "sniffed, not the header"
    );
    assert_eq!(v["size"], json!(img.len()));
    assert_eq!(
        (v["width"].clone(), v["height"].clone()),
        (json!(800), json!(600))
    );
    let url = s(&v["url"]);
    let thumb_url = s(&v["thumbnail_url"]);
    assert!(
        url.starts_with(&format!("/v1/media/{conv}/{sha}?")),
        "{url}"
    );

    // --- Download by signed URL: bytes, headers -------------------------
    let d = get(&w, &url, &[]).await;
    assert_eq!(d.status, 200);
    assert_eq!(d.body, img);
    assert_eq!(d.header("content-type"), Some("image/png"));
    assert_eq!(d.header("etag"), Some(format!("\"{sha}\"").as_str()));
    assert_eq!(
        d.header("cache-control"),
        Some("public, max-age=31536000, immutable")
    );
    assert_eq!(d.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(d.header("content-disposition"), None, "images show inline");

    // --- Thumbnail: a real image of at most 320 px ----------------------
    let t = get(&w, &thumb_url, &[]).await;
    assert_eq!(t.status, 200);
    assert_eq!(t.header("content-type"), Some("image/jpeg"));
    let timg = image::load_from_memory(&t.body).expect("thumbnail decodes");
    assert_eq!((timg.width(), timg.height()), (320, 240));

    // --- ETag / If-None-Match -------------------------------------------
    let etag = format!("\"{sha}\"");
    let nm = get(&w, &url, &[("If-None-Match", &etag)]).await;
    assert_eq!(nm.status, 304);
    assert!(nm.body.is_empty());
    let other = get(&w, &url, &[("If-None-Match", "\"nope\"")]).await;
    assert_eq!(other.status, 200);

    // --- Range ----------------------------------------------------------
    let r = get(&w, &url, &[("Range", "bytes=10-19")]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, img[10..20]);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 10-19/{}", img.len()).as_str())
    );
    let r = get(&w, &url, &[("Range", "bytes=-7")]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, img[img.len() - 7..]);
    let r = get(&w, &url, &[("Range", &format!("bytes={}-", img.len()))]).await;
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes */{}", img.len()).as_str())
    );

    // --- A non-image: sniffed type wins; served as an attachment --------
    let text = b"just some notes\n".repeat(10);
    let up = upload(&w, 0, &conv, "notes.txt", "image/png", &text).await;
    assert_eq!(up.status, 201);
    let tv = up.json();
    assert_eq!(s(&tv["content_type"]), "text/plain; charset=utf-8");
    assert_eq!(tv["thumbnail_url"], Value::Null);
    let d = get(&w, &s(&tv["url"]), &[]).await;
    assert_eq!(d.body, text);
    assert!(
        d.header("content-disposition")
            .is_some_and(|c| c.starts_with("attachment") && c.contains("notes.txt")),
        "{:?}",
        d.headers
    );

    // --- Bearer downloads: members yes (private cache), others no -------
    let plain = format!("/v1/media/{conv}/{sha}");
    let b = get(&w, &plain, &[("Authorization", &bearer(&w.tokens[1]))]).await;
    assert_eq!(b.status, 200);
    assert_eq!(b.body, img);
    assert!(b
        .header("cache-control")
        .is_some_and(|c| c.starts_with("private")));
    let c = get(&w, &plain, &[("Authorization", &bearer(&w.tokens[2]))]).await;
    assert_eq!(c.status, 404, "a non-member learns nothing");
    assert_eq!(c.code(), "not_found");
    let none = get(&w, &plain, &[]).await;
    assert_eq!(none.status, 401);

    // --- Forged, altered and expired signatures -------------------------
    let forged = format!(
        "/v1/media/{conv}/{sha}?exp=99999999999&sig={}",
        "ab".repeat(32)
    );
    assert_eq!(get(&w, &forged, &[]).await.status, 401);
    let swapped = url.replace(&format!("/{sha}?"), &format!("/{}?", sha256_hex(&text)));
    assert_eq!(
        get(&w, &swapped, &[]).await.status,
        401,
        "sig binds the object"
    );
    let as_thumb = url.replace('?', "?thumb=1&");
    assert_eq!(
        get(&w, &as_thumb, &[]).await.status,
        401,
        "sig binds the variant"
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let expired = sign_url(SECRET, &conv, &sha, false, now - 10);
    let e = get(&w, &expired, &[]).await;
    assert_eq!(e.status, 401);
    assert!(e.json()["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("expired")));
    let fresh = sign_url(SECRET, &conv, &sha, false, now + 600);
    assert_eq!(get(&w, &fresh, &[]).await.status, 200, "same secret, valid");

    // --- A non-member can't upload; no token can't either ----------------
    let up = upload(&w, 2, &conv, "x.png", "image/png", &img).await;
    assert_eq!(up.status, 404);
    assert_eq!(up.code(), "not_found");
    let anon = request(
        &w.router.addr,
        "POST",
        &format!("/v1/media?conversation_id={conv}"),
        &[],
        Body::Bytes(&img),
    )
    .await
    .expect("answered");
    assert_eq!(anon.status, 401);

    // --- Oversized uploads are refused, the router keeps serving ---------
    let big = vec![7u8; LIMIT + 1];
    let auth = bearer(&w.tokens[0]);
    let path = format!("/v1/media?conversation_id={conv}&name=big.bin");
    let declared = request(
        &w.router.addr,
        "POST",
        &path,
        &[("Authorization", &auth)],
        Body::DeclaredOnly(big.len() as u64),
    )
    .await
    .expect("answered");
    assert_eq!(declared.status, 413);
    assert_eq!(declared.code(), "too_large");
    let streamed = request(
        &w.router.addr,
        "POST",
        &path,
        &[("Authorization", &auth)],
        Body::Chunked(&big, 16 * 1024),
    )
    .await
    .expect("answered");
    assert_eq!(streamed.status, 413, "a chunked body is cut at the limit");
    assert_eq!(streamed.code(), "too_large");
    let again = upload(&w, 1, &conv, "again.png", "", &img).await;
    assert_eq!(again.status, 201, "still serving after refusals");
    assert_eq!(s(&again.json()["object_id"]), sha, "content addressed");

    // --- Media in messages ------------------------------------------------
    // An object that isn't in this conversation is refused.
    let bogus = w.clients[0]
        .request(
            "send",
            json!({"conversation_id": conv, "client_msg_id": "m-bogus",
                   "media": [{"object_id": "f".repeat(64)}]}),
        )
        .await
        .expect("reply");
    assert_eq!(bogus["error"]["code"], "invalid_argument", "{bogus}");
    assert!(bogus["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("not uploaded")));
    // A group alice is in, without the image: referencing it there fails.
    let g = w.clients[0]
        .call(
            "create_group",
            json!({"name": "g", "member_ids": [w.ids[1]]}),
        )
        .await
        .expect("group");
    let gid = s(&g["conversation"]["id"]);
    let elsewhere = w.clients[0]
        .request(
            "send",
            json!({"conversation_id": gid, "client_msg_id": "m-else",
                   "media": [{"object_id": sha}]}),
        )
        .await
        .expect("reply");
    assert_eq!(elsewhere["error"]["code"], "invalid_argument");
    // A non-member gets the conversation's not_found, not a media error.
    let stranger = w.clients[2]
        .request(
            "send",
            json!({"conversation_id": conv, "client_msg_id": "m-c",
                   "media": [{"object_id": sha}]}),
        )
        .await
        .expect("reply");
    assert_eq!(stranger["error"]["code"], "not_found");

    // Bob watches; alice sends the photo (claiming a wrong type and size:
    // the stored facts win).
    w.clients[1]
        .call("resume", json!({}))
        .await
        .expect("resume");
    let sent = w.clients[0]
        .call(
            "send",
            json!({"conversation_id": conv, "client_msg_id": "m-photo", "text": "look",
                   "media": [{"object_id": sha, "name": "photo.png",
                              "content_type": "application/x-evil", "size": 1}]}),
        )
        .await
        .expect("send");
    let m = &sent["message"]["media"][0];
    assert_eq!(s(&m["content_type"]), "image/png");
    assert_eq!(m["size"], json!(img.len()));
    let mut bob = Synced::default();
    sync_until(&mut w.clients[1], &mut bob, Duration::from_secs(20), |b| {
        b.texts(&conv).contains(&"look".to_string())
    })
    .await
    .expect("bob receives the message");
    let got = bob.convs[&conv]
        .messages
        .values()
        .find(|m| m["text"] == "look")
        .cloned()
        .expect("message");
    let item = &got["media"][0];
    assert_eq!(s(&item["object_id"]), sha);
    assert_eq!(
        (item["width"].clone(), item["height"].clone()),
        (json!(800), json!(600))
    );
    let (u, tu) = (s(&item["url"]), s(&item["thumbnail_url"]));
    let d = get(&w, &u, &[]).await;
    assert_eq!(d.status, 200);
    assert_eq!(d.body, img, "bob's URL works without a token");
    let t = get(&w, &tu, &[]).await;
    assert_eq!(t.status, 200);
    assert!(image::load_from_memory(&t.body).is_ok());
}
