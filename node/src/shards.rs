//! One loop per data shard this node hosts, for leader-side work (the
//! outbox worker, the notifier). A supervisor starts a loop for every shard
//! hosted at start-up and for every replica moved onto this node later
//! (issue 8); a loop must return once its replica leaves
//! (`RaftHost::hosts` turns false), and starts again if one comes back.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use natter_raft_store::RaftHost;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::META_GROUP;

/// How often the supervisor looks for replicas that arrived or left.
const SUPERVISE_EVERY: Duration = Duration::from_secs(1);

/// Runs `start(shard)` as a task for each data shard hosted here, until
/// `stop`; then aborts the loops still running.
pub fn spawn_per_shard<F, Fut>(
    host: Arc<RaftHost>,
    mut stop: watch::Receiver<bool>,
    start: F,
) -> JoinHandle<()>
where
    F: Fn(u32) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut running: BTreeMap<u32, JoinHandle<()>> = BTreeMap::new();
        loop {
            if *stop.borrow() {
                break;
            }
            running.retain(|_, t| !t.is_finished());
            for shard in host.hosted() {
                if shard != META_GROUP && !running.contains_key(&shard) {
                    running.insert(shard, tokio::spawn(start(shard)));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(SUPERVISE_EVERY) => {}
                r = stop.changed() => if r.is_err() { break },
            }
        }
        for t in running.into_values() {
            t.abort();
        }
    })
}
