//! The JSON body of `/v1/register` and `/v1/login`, then the username and
//! password rules both apply before anything reaches the cluster.
#![no_main]

use libfuzzer_sys::fuzz_target;
use natter_router::auth::{check_password, normalize_username};
use natter_router::frame::parse_credentials;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = parse_credentials(data) {
        if let Ok(name) = normalize_username(&c.username) {
            assert!(name.len() >= 3 && name.len() <= 32);
            assert!(name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.'));
            // Normalizing is idempotent.
            assert_eq!(
                normalize_username(&name).ok().as_deref(),
                Some(name.as_str())
            );
        }
        let _ = check_password(&c.password);
    }
});
