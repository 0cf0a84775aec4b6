//! openraft's type configuration for every Natter group.
//!
//! Commands and responses are opaque bytes: raft-store replicates them, the
//! state machine plugged into a group gives them meaning.

use serde::{Deserialize, Serialize};
use std::io::Cursor;

/// An encoded state-machine command (the log entry's payload).
///
/// Its bytes are serialized as a byte string: in bincode the same layout as
/// a sequence of `u8` (a u64 length, then the bytes), so logs and messages
/// written either way read alike, but copied at once instead of one visitor
/// call per byte (which was ~3 % of a node's CPU under load).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// An encoded state-machine response (a byte string, as [`Command`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Command({} bytes)", self.0.len())
    }
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
pub type StorageError = openraft::StorageError<NodeId>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries and messages written before commands were byte strings must
    /// still read, and the other way round.
    #[test]
    fn a_command_is_encoded_as_a_sequence_of_u8_was() {
        let bytes = vec![0u8, 1, 0x80, 0xff, 7];
        let old = bincode::serialize(&bytes).unwrap();
        assert_eq!(bincode::serialize(&Command(bytes.clone())).unwrap(), old);
        assert_eq!(bincode::serialize(&Reply(bytes.clone())).unwrap(), old);
        let back: Command = bincode::deserialize(&old).unwrap();
        assert_eq!(back.0, bytes);
        let back: Reply = bincode::deserialize(&old).unwrap();
        assert_eq!(back.0, bytes);
    }
}
