//! The URL query of `/v1/ws?token=…` (and any endpoint taking a token in
//! the query), decoded as the router decodes it, then the token check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use natter_router::auth::token_hash;
use natter_router::frame::query_token;

fuzz_target!(|data: &[u8]| {
    let Ok(q) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(t) = query_token(q) {
        let _ = token_hash(&t);
    }
});
