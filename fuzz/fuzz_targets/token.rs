//! The `Authorization` header (`Bearer <token>`) and the token's own shape
//! check and hash (`auth::token_hash`): only 43 base64url characters
//! decoding to 32 bytes are accepted, and the hash is deterministic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use natter_router::auth::token_hash;
use natter_router::frame::bearer_token;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = bearer_token(data) {
        if let Ok(h) = token_hash(&t) {
            assert_eq!(t.len(), 43);
            assert_eq!(token_hash(&t).ok(), Some(h));
        }
    }
    if let Ok(t) = std::str::from_utf8(data) {
        if token_hash(t).is_ok() {
            assert_eq!(t.len(), 43);
            assert!(t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }
    }
});
