//! Proposal batching: proposals that wait for the same group at the same
//! moment become one log entry.
//!
//! openraft 0.9 handles every `client_write` on its own: one log append call
//! and one pass over its engine's commands per entry. Under load that
//! per-entry work, not the fsync (group commit already shares it), is what
//! a write costs. So each group has one proposer task: it takes the first
//! waiting proposal plus whatever else is queued (up to [`MAX_COMMANDS`] /
//! [`MAX_BYTES`]) and writes them as one entry, with [`IN_FLIGHT`] (one)
//! entry in flight. A proposal that finds nobody waiting and the slot free
//! is written directly by its caller, so a lone writer pays nothing extra;
//! batches form exactly when writes queue up.
//!
//! A single proposal is written as it is (the log format of every entry
//! before batching existed). A batch is [`MARK`] followed by the bincode of
//! the commands; the state machine store applies them in order in one
//! transaction and answers the bincode of their responses. `RaftHost::propose`
//! refuses a command that itself starts with [`MARK`], so the framing is
//! unambiguous (Natter's commands are protobuf, which never starts with 0).

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::db;
use crate::host::write_error;
use crate::types::{Command, Raft};
use crate::{Error, StoreError};

/// Marks a batched entry. Starts with a zero byte: never a protobuf message.
pub const MARK: &[u8] = b"\0natter-batch\x01";
/// Commands in one entry, at most.
pub const MAX_COMMANDS: usize = 256;
/// Bytes of commands in one entry, at most (a single larger command still
/// goes alone).
pub const MAX_BYTES: usize = 1 << 20;
/// Entries of one group being written at once. One: what arrives while an
/// entry is in flight waits for it and goes as the next entry, so batches
/// form from two waiting proposals on. With 3 shards and 16 clients (about
/// 5 writers per group) 4 in flight had let most proposals go alone, one
/// Raft round each; 1 instead of 4 took sends at 16 clients up 13-35 %
/// in 9 of 9 A/B rows, and up 4-27 % in most rows at 256 (README,
/// "Benchmarks"). A lone writer waits only behind the outbox's own
/// proposals to its group; one-client pairs showed no direction.
pub const IN_FLIGHT: usize = 1;
/// Proposals queued per group before `propose` waits.
const QUEUE: usize = 4096;

/// A committed proposal: the state machine's response and the log index.
pub type Outcome = Result<(Vec<u8>, u64), Error>;

struct Pending {
    command: Vec<u8>,
    done: oneshot::Sender<Outcome>,
}

/// The entry a batch of commands is written as.
pub fn encode(commands: &[Vec<u8>]) -> Result<Vec<u8>, StoreError> {
    let mut out = MARK.to_vec();
    out.extend(encode_list(commands)?);
    Ok(out)
}

/// The commands of a batched entry; None for a single command.
pub fn decode(entry: &[u8]) -> Option<Result<Vec<Vec<u8>>, StoreError>> {
    let body = entry.strip_prefix(MARK)?;
    Some(decode_list("batched commands", body))
}

/// The bincode of a list of byte strings (a batch's commands or responses):
/// the layout of a `Vec<Vec<u8>>`, each element copied at once.
pub(crate) fn encode_list(items: &[Vec<u8>]) -> Result<Vec<u8>, StoreError> {
    let items: Vec<&serde_bytes::Bytes> =
        items.iter().map(|i| serde_bytes::Bytes::new(i)).collect();
    db::encode(&items)
}

/// The inverse of [`encode_list`].
pub(crate) fn decode_list(what: &str, raw: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
    let items: Vec<serde_bytes::ByteBuf> = db::decode(what, raw)?;
    Ok(items.into_iter().map(|i| i.into_vec()).collect())
}

/// A group's proposer: the queue, the in-flight slots and the Raft handle.
#[derive(Clone)]
pub struct Proposer {
    group: u32,
    tx: mpsc::Sender<Pending>,
    slots: Arc<Semaphore>,
    raft: Raft,
}

impl Proposer {
    /// Starts the proposer task of a group; it ends when every `Proposer`
    /// clone is dropped (the group stopped).
    pub fn start(group: u32, raft: Raft) -> Proposer {
        let (tx, rx) = mpsc::channel(QUEUE);
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        tokio::spawn(run(group, raft.clone(), slots.clone(), rx));
        Proposer {
            group,
            tx,
            slots,
            raft,
        }
    }

    /// Replicates `command` (in a batch when others wait too) and answers
    /// its own response.
    pub async fn propose(&self, command: Vec<u8>) -> Outcome {
        // Nobody waiting and a slot free: write it from here, as it is
        // (no hand-over to the proposer task, so a lone writer pays nothing).
        if self.tx.capacity() == self.tx.max_capacity() {
            if let Ok(slot) = self.slots.clone().try_acquire_owned() {
                let r = write_one(self.group, &self.raft, command).await;
                drop(slot);
                return r;
            }
        }
        let group = self.group;
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Pending { command, done })
            .await
            .map_err(|_| Error::UnknownGroup(group))?;
        rx.await
            .map_err(|_| Error::Raft(format!("group {group} stopped")))?
    }
}

/// One command as one entry (the format of every entry before batching).
async fn write_one(group: u32, raft: &Raft, command: Vec<u8>) -> Outcome {
    raft.client_write(Command(command))
        .await
        .map(|r| (r.data.0, r.log_id.index))
        .map_err(|e| write_error(group, &e))
}

async fn run(group: u32, raft: Raft, slots: Arc<Semaphore>, mut rx: mpsc::Receiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // Whatever queued meanwhile (also while all slots were busy) rides along.
        let mut bytes = first.command.len();
        let mut batch = vec![first];
        while batch.len() < MAX_COMMANDS && bytes < MAX_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.command.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            write(group, &raft, batch).await;
            drop(slot);
        });
    }
}

async fn write(group: u32, raft: &Raft, mut batch: Vec<Pending>) {
    if batch.len() == 1 {
        let Some(p) = batch.pop() else { return };
        let _ = p.done.send(write_one(group, raft, p.command).await);
        return;
    }
    let commands: Vec<Vec<u8>> = batch
        .iter_mut()
        .map(|p| std::mem::take(&mut p.command))
        .collect();
    let entry = match encode(&commands) {
        Ok(e) => e,
        Err(e) => {
            for p in batch {
                let _ = p
                    .done
                    .send(Err(Error::Store(StoreError::Encode(e.to_string()))));
            }
            return;
        }
    };
    match raft.client_write(Command(entry)).await {
        Ok(r) => {
            let index = r.log_id.index;
            match decode_list("batched responses", &r.data.0) {
                Ok(replies) if replies.len() == batch.len() => {
                    for (p, reply) in batch.into_iter().zip(replies) {
                        let _ = p.done.send(Ok((reply, index)));
                    }
                }
                other => {
                    let why = match other {
                        Ok(r) => format!("{} responses to {} commands", r.len(), batch.len()),
                        Err(e) => e.to_string(),
                    };
                    for p in batch {
                        let _ = p
                            .done
                            .send(Err(Error::Raft(format!("batched write: {why}"))));
                    }
                }
            }
        }
        Err(e) => {
            for p in batch {
                let _ = p.done.send(Err(write_error(group, &e)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{HostConfig, RaftHost, RaftTimings};
    use crate::SyncMode;
    use natter_kv::{KvRead, KvResult, KvWrite, StateMachine};
    use std::collections::{BTreeMap, BTreeSet};

    /// Appends each command to a list and answers "command@position".
    struct Journal;

    impl StateMachine for Journal {
        fn apply(&self, kv: &mut dyn KvWrite, command: &[u8]) -> KvResult<Vec<u8>> {
            let n = kv
                .get(b"n")?
                .map(|v| u64::from_be_bytes(v.try_into().unwrap_or([0; 8])))
                .unwrap_or(0)
                + 1;
            kv.put(b"n", &n.to_be_bytes());
            kv.put(&[b"e".as_slice(), &n.to_be_bytes()].concat(), command);
            Ok([command, format!("@{n}").as_bytes()].concat())
        }

        fn query(&self, kv: &dyn KvRead, _query: &[u8]) -> KvResult<Vec<u8>> {
            Ok(kv.get(b"n")?.unwrap_or_default())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_proposals_share_entries_and_each_gets_its_own_answer() {
        let dir = tempfile::tempdir().unwrap();
        let host = RaftHost::open(HostConfig {
            node_id: 1,
            addr: "127.0.0.1:1".into(),
            data_dir: dir.path().to_path_buf(),
            timings: RaftTimings::default(),
            sync_mode: SyncMode::GroupCommit,
            eager_replication: true,
            verify_on_open: false,
        })
        .unwrap();
        host.start_group(7, Arc::new(Journal)).await.unwrap();
        host.initialize(7, &BTreeMap::from([(1, "127.0.0.1:1".to_string())]))
            .await
            .unwrap();
        while !host.is_leader(7) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // A command may not pose as a batch.
        assert!(host
            .propose(7, encode(&[b"x".to_vec()]).unwrap())
            .await
            .is_err());

        const N: usize = 300;
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let host = host.clone();
                tokio::spawn(async move { host.propose(7, format!("c{i}").into_bytes()).await })
            })
            .collect();
        let mut positions = BTreeSet::new();
        let mut indexes = BTreeSet::new();
        for (i, t) in tasks.into_iter().enumerate() {
            let p = t.await.unwrap().unwrap();
            let answer = String::from_utf8(p.response).unwrap();
            let (cmd, pos) = answer.split_once('@').unwrap();
            assert_eq!(cmd, format!("c{i}"), "someone else's answer");
            positions.insert(pos.parse::<u64>().unwrap());
            indexes.insert(p.index);
        }
        // Every command applied exactly once...
        assert_eq!(positions, (1..=N as u64).collect());
        let (n, _) = host
            .read(7, b"", crate::Consistency::Linearizable)
            .await
            .unwrap();
        assert_eq!(n, (N as u64).to_be_bytes().to_vec());
        // ...in fewer log entries than commands.
        assert!(
            indexes.len() < N,
            "{} entries for {N} commands",
            indexes.len()
        );
    }

    #[test]
    fn a_batch_round_trips_and_a_single_command_is_not_one() {
        let cmds = vec![b"\x08\x01".to_vec(), Vec::new(), vec![0xff; 300]];
        let e = encode(&cmds).unwrap();
        assert!(e.starts_with(MARK));
        assert_eq!(decode(&e).unwrap().unwrap(), cmds);
        assert!(decode(b"\x08\x01").is_none());
        assert!(decode(b"").is_none());
        // A marked entry whose body is damaged is an error, not a panic.
        let mut bad = MARK.to_vec();
        bad.extend([1, 2, 3]);
        assert!(decode(&bad).unwrap().is_err());
    }

    /// Batches written before lists were encoded as byte strings must still
    /// read, and the other way round.
    #[test]
    fn a_list_is_encoded_as_a_vec_of_vec_u8_was() {
        let items = vec![b"\x08\x01".to_vec(), Vec::new(), vec![0xff; 300]];
        let old = bincode::serialize(&items).unwrap();
        assert_eq!(encode_list(&items).unwrap(), old);
        assert_eq!(decode_list("test", &old).unwrap(), items);
    }
}
