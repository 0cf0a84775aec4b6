//! Limits on what one command may carry. Exceeding one is answered with
//! `LIMIT_EXCEEDED` (sizes and counts) — never a panic, never a partial write.

/// Largest message text, in bytes (UTF-8).
pub const MAX_TEXT_BYTES: usize = 16 * 1024;
/// Most media attachments in one message.
pub const MAX_MEDIA_PER_MESSAGE: usize = 10;
/// Most members of a group, the creator included.
pub const MAX_GROUP_MEMBERS: usize = 1024;
/// Most members of a conversation whose row a send's result carries (for
/// push without a read). As large as any group today: a 1,000-member row
/// (~60 KB) in every send's result and event costs far less than the
/// thousand reads it saves (each decoding that row) when members are
/// online — the last of 1,000 got a message 3–4× sooner. A bound of its
/// own, so that larger groups would not grow every event with them.
pub const MAX_PUSHED_ROW_MEMBERS: usize = 1024;
/// Longest group name, in bytes.
pub const MAX_NAME_BYTES: usize = 200;
/// Longest client message id (the idempotency key of a send), in bytes.
pub const MAX_CLIENT_MSG_ID_BYTES: usize = 64;
/// Page sizes are `1..=MAX_PAGE_LIMIT`; 0 means [`DEFAULT_PAGE_LIMIT`].
pub const MAX_PAGE_LIMIT: u32 = 500;
/// The page size used when a query asks for 0.
pub const DEFAULT_PAGE_LIMIT: u32 = 50;
/// Usernames are `USERNAME_MIN_LEN..=USERNAME_MAX_LEN` characters of
/// `[a-z0-9_.]`.
pub const USERNAME_MIN_LEN: usize = 3;
/// See [`USERNAME_MIN_LEN`].
pub const USERNAME_MAX_LEN: usize = 32;
/// Longest stored password hash (an opaque PHC string), in bytes.
pub const MAX_PASSWORD_HASH_BYTES: usize = 1024;
/// Longest home region name, in bytes.
pub const MAX_REGION_BYTES: usize = 64;
/// Longest media text field (object id, content type, file name), in bytes.
pub const MAX_MEDIA_FIELD_BYTES: usize = 256;
/// Most entries in one `ApplyFeedUpdates` or `AckOutbox` command.
pub const MAX_BATCH: usize = 1000;
/// Feed previews keep this many characters of the text.
pub const PREVIEW_CHARS: usize = 100;
/// Most messages (or purged rows) one command's housekeeping expires. The
/// rest waits for the next command or `Tick`.
pub const EXPIRY_BUDGET: usize = 256;
/// Most message rows one History or cold-start page looks at; a page that
/// hits it ends early with a cursor to continue from.
pub const SCAN_BUDGET: usize = 4096;
/// How far back (in messages) a deleted preview looks for its replacement.
pub const PREVIEW_FALLBACK_SCAN: usize = 32;
/// Longest feed or outbox cursor accepted, in bytes.
pub const MAX_CURSOR_BYTES: usize = 64;
/// A session's token hash is a SHA-256: exactly this many bytes.
pub const SESSION_TOKEN_HASH_BYTES: usize = 32;
/// Longest device label of a session, in bytes.
pub const MAX_DEVICE_BYTES: usize = 128;
/// Longest session lifetime: 366 days.
pub const MAX_SESSION_TTL_MS: u64 = 366 * 24 * 3600 * 1000;

/// A page limit as asked (0 = default), checked against [`MAX_PAGE_LIMIT`].
pub(crate) fn page_limit(asked: u32) -> crate::error::Res<usize> {
    match asked {
        0 => Ok(DEFAULT_PAGE_LIMIT as usize),
        n if n <= MAX_PAGE_LIMIT => Ok(n as usize),
        n => Err(crate::error::limit(format!(
            "limit {n} is above {MAX_PAGE_LIMIT}"
        ))),
    }
}
