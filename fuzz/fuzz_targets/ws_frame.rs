//! One WebSocket text frame: size limit, JSON, id, version, op, the op's
//! parameters and the router's parameter rules (`frame::parse_frame`).
//! Whatever the bytes, the parser answers a request or a bad-frame error
//! with a documented code, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use natter_router::frame::{parse_frame, MAX_ID_BYTES};

const CODES: &[&str] = &[
    "too_large",
    "bad_frame",
    "unsupported_version",
    "unknown_op",
    "invalid_argument",
    "limit_exceeded",
];

fuzz_target!(|data: &[u8]| {
    // The router only sees valid UTF-8 here (tungstenite closes on
    // anything else with 1007).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_frame(text, 64 * 1024) {
        Ok(p) => {
            assert!(natter_router::ops::OPS.contains(&p.op));
            assert!(p.id.is_number() || p.id.as_str().is_some_and(|s| s.len() <= MAX_ID_BYTES));
        }
        Err(b) => {
            assert!(CODES.contains(&b.code), "undocumented code {}", b.code);
            assert!(b.id.is_null() || b.id.is_number() || b.id.is_string());
        }
    }
});
