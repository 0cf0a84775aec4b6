//! What a client sends to the media endpoints: the upload's query string
//! and `Content-Length`, the download's query (thumbnail, signed URL), the
//! `Range` and `If-None-Match` headers, and the first bytes of a file
//! (content sniffing). One input, split on newlines into those parts.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use natter_router::media::{
    download_query, etag_matches, parse_range, sniff, upload_params, MediaError, RangeReq,
    MAX_NAME_BYTES,
};

const LIMIT: u64 = 25 * 1024 * 1024;

/// A query string as axum's `Query` decodes it.
fn query(s: &str) -> Option<HashMap<String, String>> {
    serde_urlencoded::from_str(s).ok()
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(6, |b| *b == b'\n');
    let mut next = || parts.next().unwrap_or_default();
    let (upload_q, length, download_q, range, etag) = (next(), next(), next(), next(), next());
    let head = next();

    if let (Ok(q), Ok(len)) = (std::str::from_utf8(upload_q), std::str::from_utf8(length)) {
        if let Some(q) = query(q) {
            let len = (!len.is_empty()).then_some(len);
            match upload_params(&q, len, LIMIT) {
                Ok(p) => {
                    assert_eq!(q.get("conversation_id"), Some(&p.conv));
                    assert!(p.name.len() <= MAX_NAME_BYTES);
                    assert!(!p.name.contains(['/', '\\']));
                    assert!(!p.name.chars().any(char::is_control));
                }
                Err(MediaError::TooLarge(l)) => {
                    assert_eq!(l, LIMIT);
                    let declared: u64 = len.unwrap_or("").trim().parse().unwrap_or(0);
                    assert!(declared > LIMIT);
                }
                Err(MediaError::Api(_)) => {}
                Err(e) => panic!("unexpected refusal {e}"),
            }
        }
    }
    if let Some(q) = std::str::from_utf8(download_q).ok().and_then(query) {
        if let Ok(d) = download_query(&q) {
            assert_eq!(d.thumb, q.get("thumb").map(String::as_str) == Some("1"));
            assert_eq!(d.signed.is_some(), q.contains_key("sig"));
        }
    }
    if let Ok(r) = std::str::from_utf8(range) {
        for size in [0, 1, 1000, u64::MAX] {
            if let RangeReq::Part(a, b) = parse_range(Some(r), size) {
                assert!(a <= b && b < size, "{r:?} of {size}: {a}-{b}");
            }
        }
    }
    if let Ok(e) = std::str::from_utf8(etag) {
        let _ = etag_matches(Some(e), "\"abc\"");
    }
    let t = sniff(head);
    assert!(!t.is_empty());
});
