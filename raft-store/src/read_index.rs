//! Coalesced leadership confirmations for linearizable reads.
//!
//! A linearizable read must see every write acknowledged before it began, so
//! the leader confirms it still leads (a heartbeat round to a quorum, then
//! waits until it has applied up to its commit index) *after* the read
//! arrived. One round per read costs two RPCs each: a push to a group of a
//! thousand members is a thousand reads at once. Here every read waiting
//! when a round starts shares that round; a read that arrives while a round
//! is running waits for the next one (the running one may have read the
//! commit index before the read arrived), which starts as soon as the
//! running one ends. So at most two rounds serve any burst of reads, and a
//! lone read still costs exactly one.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::Error;

#[derive(Default)]
struct Rounds {
    /// Rounds started so far; the running one is `started` when
    /// `started > finished`.
    started: u64,
    finished: u64,
    /// A read arrived during the running round: another one follows it.
    wanted: bool,
}

/// One per group.
pub struct ReadIndex {
    rounds: Mutex<Rounds>,
    /// (last finished round, its outcome).
    done: watch::Sender<(u64, Result<(), Error>)>,
}

impl Default for ReadIndex {
    fn default() -> Self {
        ReadIndex {
            rounds: Mutex::default(),
            done: watch::channel((0, Ok(()))).0,
        }
    }
}

/// The outcome of a shared round, for each of its readers.
fn share(r: &Result<(), Error>) -> Result<(), Error> {
    match r {
        Ok(()) => Ok(()),
        Err(Error::NotLeader { group, leader }) => Err(Error::NotLeader {
            group: *group,
            leader: leader.clone(),
        }),
        Err(Error::UnknownGroup(g)) => Err(Error::UnknownGroup(*g)),
        Err(Error::Poisoned) => Err(Error::Poisoned),
        Err(e) => Err(Error::Raft(e.to_string())),
    }
}

impl ReadIndex {
    /// Waits for a round that started after this call; `round` runs one
    /// (confirm leadership, wait until applied). Rounds run in a task of
    /// their own, so a reader that gives up never stalls the others.
    pub async fn confirm<F, Fut>(self: &Arc<Self>, round: F) -> Result<(), Error>
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), Error>> + Send + 'static,
    {
        let mut done = self.done.subscribe();
        let need = {
            let mut r = self.rounds.lock().map_err(|_| Error::Poisoned)?;
            if r.started == r.finished {
                r.started += 1;
                tokio::spawn(self.clone().drive(round));
                r.started
            } else {
                r.wanted = true;
                r.started + 1
            }
        };
        loop {
            {
                let d = done.borrow_and_update();
                if d.0 >= need {
                    return share(&d.1);
                }
            }
            if done.changed().await.is_err() {
                return Err(Error::Raft("read index closed".into()));
            }
        }
    }

    /// Runs rounds back to back while readers want them.
    async fn drive<F, Fut>(self: Arc<Self>, round: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), Error>>,
    {
        loop {
            let outcome = round().await;
            let (finished, again) = match self.rounds.lock() {
                Ok(mut r) => {
                    r.finished = r.started;
                    let again = std::mem::take(&mut r.wanted);
                    if again {
                        r.started += 1;
                    }
                    (r.finished, again)
                }
                Err(_) => return,
            };
            let _ = self.done.send_replace((finished, outcome));
            if !again {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use tokio::sync::Semaphore;

    use super::*;

    #[tokio::test]
    async fn a_burst_of_reads_shares_at_most_two_rounds() {
        let ix = Arc::new(ReadIndex::default());
        let rounds = Arc::new(AtomicU64::new(0));
        let reads = (0..200).map(|_| {
            let (ix, rounds) = (ix.clone(), rounds.clone());
            tokio::spawn(async move {
                ix.confirm(move || {
                    let rounds = rounds.clone();
                    async move {
                        rounds.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok(())
                    }
                })
                .await
            })
        });
        for r in futures::future::join_all(reads).await {
            assert!(r.unwrap().is_ok());
        }
        let n = rounds.load(Ordering::SeqCst);
        assert!((1..=2).contains(&n), "{n} rounds");
    }

    #[tokio::test]
    async fn a_read_arriving_during_a_round_waits_for_the_next_one() {
        let ix = Arc::new(ReadIndex::default());
        // Each round takes one permit: the test lets them finish one by one.
        let gate = Arc::new(Semaphore::new(0));
        let started = Arc::new(AtomicU64::new(0));
        let round = {
            let (gate, started) = (gate.clone(), started.clone());
            move || {
                let (gate, started) = (gate.clone(), started.clone());
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    gate.acquire().await.map_err(|_| Error::Poisoned)?.forget();
                    Ok(())
                }
            }
        };
        let first = tokio::spawn({
            let (ix, round) = (ix.clone(), round.clone());
            async move { ix.confirm(round).await }
        });
        while started.load(Ordering::SeqCst) < 1 {
            tokio::task::yield_now().await;
        }
        let second = tokio::spawn({
            let ix = ix.clone();
            async move { ix.confirm(round).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        gate.add_permits(1);
        assert!(first.await.unwrap().is_ok());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !second.is_finished(),
            "served by a round that began before it"
        );
        assert_eq!(started.load(Ordering::SeqCst), 2);
        gate.add_permits(1);
        assert!(second.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn every_reader_of_a_failed_round_gets_its_error() {
        let ix = Arc::new(ReadIndex::default());
        let r = ix
            .confirm(|| async {
                Err(Error::NotLeader {
                    group: 3,
                    leader: Some((2, "n2".into())),
                })
            })
            .await;
        assert!(matches!(
            r,
            Err(Error::NotLeader {
                group: 3,
                leader: Some((2, _))
            })
        ));
        // The next read starts a new round.
        assert!(ix.confirm(|| async { Ok(()) }).await.is_ok());
    }
}
