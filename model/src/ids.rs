//! Ids: UUIDs in canonical lowercase hyphenated form on the wire, 16 raw
//! bytes in keys, and the deterministic (version 5) ids the model derives.
//!
//! The namespace and name layouts below are part of the on-disk contract:
//! changing them would give existing pairs a second direct conversation.

use std::fmt;

use natter_kv::{KvError, KvResult};
use uuid::Uuid;

use crate::error::{invalid, Res};

/// Namespace of [`direct_conversation_id`] (a fixed random UUID).
const DIRECT_NAMESPACE: Uuid = Uuid::from_bytes([
    0x6f, 0x1f, 0x1d, 0x1e, 0x2c, 0x1a, 0x4e, 0x8b, 0x9a, 0x6c, 0x2b, 0x7f, 0x4c, 0x1d, 0x9e, 0x30,
]);

/// A parsed user or conversation id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Id(pub(crate) [u8; 16]);

impl Id {
    /// Parses a canonical id; `field` names it in the error.
    pub(crate) fn parse(s: &str, field: &str) -> Res<Id> {
        parse_canonical(s)
            .ok_or_else(|| invalid(format!("{field}: not a canonical lowercase uuid")))
    }

    /// Parses an id read back from a stored row.
    pub(crate) fn stored(s: &str, key: &[u8]) -> KvResult<Id> {
        parse_canonical(s).ok_or_else(|| KvError::Corrupt {
            key: key.to_vec(),
            reason: format!("bad stored id {s:?}"),
        })
    }

    /// An id taken from 16 bytes of a key or an index row.
    pub(crate) fn from_slice(b: &[u8], key: &[u8]) -> KvResult<Id> {
        <[u8; 16]>::try_from(b)
            .map(Id)
            .map_err(|_| KvError::Corrupt {
                key: key.to_vec(),
                reason: "bad id bytes".into(),
            })
    }

    pub(crate) fn bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The version nibble of the UUID.
    pub(crate) fn version(&self) -> usize {
        Uuid::from_bytes(self.0).get_version_num()
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&Uuid::from_bytes(self.0).hyphenated(), f)
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Canonical = 36 chars, hyphenated, lowercase hex, not the nil UUID.
fn parse_canonical(s: &str) -> Option<Id> {
    if s.len() != 36 || s.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let u = Uuid::parse_str(s).ok()?;
    if u.is_nil() {
        return None;
    }
    Some(Id(*u.as_bytes()))
}

/// Whether `s` is a canonical lowercase hyphenated (non-nil) UUID.
pub fn is_canonical_uuid(s: &str) -> bool {
    parse_canonical(s).is_some()
}

/// The id of the pair's direct conversation: UUID v5 in a fixed Natter
/// namespace of the two user ids' 16 bytes each, smaller first — the same
/// for (a, b) and (b, a). `None` unless both are canonical uuids.
pub fn direct_conversation_id(a: &str, b: &str) -> Option<String> {
    let (a, b) = (parse_canonical(a)?, parse_canonical(b)?);
    Some(direct_id(a, b).to_string())
}

pub(crate) fn direct_id(a: Id, b: Id) -> Id {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut name = [0u8; 32];
    name[..16].copy_from_slice(&lo.0);
    name[16..].copy_from_slice(&hi.0);
    Id(*Uuid::new_v5(&DIRECT_NAMESPACE, &name).as_bytes())
}

/// A message's id: UUID v5 in the conversation id's namespace of the seq
/// (8 bytes big-endian).
pub(crate) fn message_id(conversation: Id, seq: u64) -> String {
    Uuid::new_v5(&Uuid::from_bytes(conversation.0), &seq.to_be_bytes())
        .hyphenated()
        .to_string()
}

/// A notification's id: UUID v5 in the user id's namespace of the
/// conversation id's 16 bytes and the seq (8 bytes big-endian).
pub(crate) fn notification_id(user: Id, conversation: Id, seq: u64) -> String {
    let mut name = [0u8; 24];
    name[..16].copy_from_slice(&conversation.0);
    name[16..].copy_from_slice(&seq.to_be_bytes());
    Uuid::new_v5(&Uuid::from_bytes(user.0), &name)
        .hyphenated()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";
    const B: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";

    #[test]
    fn canonical_only() {
        assert!(is_canonical_uuid(A));
        assert!(!is_canonical_uuid(&A.to_uppercase()));
        assert!(!is_canonical_uuid(&A.replace('-', "")));
        assert!(!is_canonical_uuid(&format!("{{{A}}}")));
        assert!(!is_canonical_uuid("00000000-0000-0000-0000-000000000000"));
        assert!(!is_canonical_uuid("0f8fad5b-d9cb-469f-a165-70867728950"));
        assert!(!is_canonical_uuid("0f8fad5bxd9cb-469f-a165-70867728950e"));
        assert_eq!(
            Id::parse(A, "x").ok().map(|i| i.to_string()).as_deref(),
            Some(A)
        );
    }

    #[test]
    fn direct_id_is_symmetric_and_stable() {
        let ab = direct_conversation_id(A, B);
        assert_eq!(ab, direct_conversation_id(B, A));
        assert_ne!(ab, direct_conversation_id(A, A));
        // Pinned: part of the on-disk contract.
        assert_eq!(ab.as_deref(), Some("1f2f0549-86a3-5f14-97a3-c9e094c38340"));
        assert_eq!(direct_conversation_id(A, "nope"), None);
    }

    #[test]
    fn uuid_v5_matches_rfc_vector() {
        let u = Uuid::new_v5(&Uuid::NAMESPACE_DNS, b"www.example.com");
        assert_eq!(u.to_string(), "2ed6657d-e927-568b-95e1-2665a8aea6a2");
    }
}
