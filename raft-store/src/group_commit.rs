//! Group commit: one WAL fsync shared by every append that is waiting for one.
//!
//! Appends of every group on the node write their batch to RocksDB without
//! syncing (the entries are readable at once, as openraft requires), then hand
//! their completion callback to the [`Syncer`]. Its thread takes every callback
//! queued so far, fsyncs the WAL once, and completes them all. Callbacks that
//! arrive during an fsync ride the next one, so under load one fsync covers
//! many appends of many groups, and an idle node does no fsync at all.
//!
//! Because a callback is queued only after its write returned, and the WAL is
//! sequential, the fsync that follows the dequeue covers that write.
//!
//! [`SyncMode::PerWrite`] turns this off: each append is written with
//! `sync = true` under one lock, one fsync per append — the baseline the
//! benchmark compares against.

use std::io;
use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rocksdb::DB;

/// How appends reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum SyncMode {
    /// One shared WAL fsync for all appends waiting at that moment (default).
    #[default]
    GroupCommit,
    /// One fsync per append, serialised. For benchmarks only.
    PerWrite,
    /// NEGATIVE CONTROL, never for real use: writes skip RocksDB's WAL and
    /// nothing is fsynced, so appends are acknowledged while they exist only
    /// in memory. A kill -9 then loses acknowledged writes; the
    /// fault-injection suite uses it to prove its checkers can fail.
    UnsafeNoWal,
}

type Done = Box<dyn FnOnce(io::Result<()>) + Send>;

/// What the syncer thread receives.
enum Msg {
    /// Complete this once everything written before it is on disk.
    After(Done),
    /// Sync what is waiting, then end (dropping the thread's database
    /// handle).
    Stop,
}

/// Statistics of the syncer, for metrics and the benchmark.
#[derive(Debug, Default)]
pub struct SyncStats {
    pub fsyncs: std::sync::atomic::AtomicU64,
    pub appends: std::sync::atomic::AtomicU64,
    pub fsync_micros: std::sync::atomic::AtomicU64,
    /// Duration of each WAL fsync (`natter_wal_fsync_seconds`).
    pub fsync_seconds: Option<prometheus::Histogram>,
    /// From an append handing its callback to the syncer to the fsync that
    /// covers it completing (`natter_append_wait_seconds`).
    pub append_wait_seconds: Option<prometheus::Histogram>,
}

/// Latency buckets, 50 µs .. 2.5 s.
const BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

fn histogram(name: &str, help: &str) -> Option<prometheus::Histogram> {
    prometheus::Histogram::with_opts(
        prometheus::HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
    )
    .ok()
}

pub struct Syncer {
    tx: mpsc::Sender<Msg>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    pub stats: Arc<SyncStats>,
}

impl Syncer {
    /// Starts the syncer thread. It ends at [`Syncer::stop`] or when the
    /// `Syncer` is dropped. `dir` holds the sync mark
    /// ([`crate::db::SYNC_MARK_FILE`]).
    pub fn start(db: Arc<DB>, dir: &Path) -> Syncer {
        let (tx, rx) = mpsc::channel::<Msg>();
        let stats = Arc::new(SyncStats {
            fsync_seconds: histogram(
                "natter_wal_fsync_seconds",
                "Duration of one WAL fsync (shared by every append waiting for it).",
            ),
            append_wait_seconds: histogram(
                "natter_append_wait_seconds",
                "From a Raft log append being written to the WAL fsync that covers it.",
            ),
            ..Default::default()
        });
        let st = stats.clone();
        let mark = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join(crate::db::SYNC_MARK_FILE));
        let mark = match mark {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::error!(
                    "cannot open the sync mark in {}: {e}; WAL truncation will not be detected",
                    dir.display()
                );
                None
            }
        };
        let spawned = std::thread::Builder::new()
            .name("natter-wal-sync".into())
            .spawn(move || run(db, rx, st, mark));
        let thread = match spawned {
            Ok(t) => Some(t),
            Err(e) => {
                // Without the thread every append would wait forever; failing
                // loudly at start is the only honest option.
                tracing::error!("cannot start the WAL sync thread: {e}");
                None
            }
        };
        Syncer {
            tx,
            thread: std::sync::Mutex::new(thread),
            stats,
        }
    }

    /// Syncs what is waiting and ends the thread, waiting for it: after
    /// this the thread holds no database handle, so the database closes
    /// where its last other handle drops — not on this thread while the
    /// process exits (RocksDB aborts if its destructor races the exit
    /// handlers). Later appends fail. Blocks; call from a blocking context.
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
        let thread = match self.thread.lock() {
            Ok(mut t) => t.take(),
            Err(_) => None,
        };
        if let Some(t) = thread {
            if t.join().is_err() {
                tracing::error!("the WAL sync thread panicked");
            }
        }
    }

    /// Calls `done` once everything written before this call is on disk.
    pub fn after_sync(&self, done: Done) {
        let done: Done = match self.stats.append_wait_seconds.clone() {
            Some(h) => {
                let queued = Instant::now();
                Box::new(move |res| {
                    h.observe(queued.elapsed().as_secs_f64());
                    done(res)
                })
            }
            None => done,
        };
        if let Err(mpsc::SendError(Msg::After(done))) = self.tx.send(Msg::After(done)) {
            done(Err(stopped()));
        }
    }
}

/// How stale the sync mark may be: a WAL truncation that removes only
/// writes fsynced within this long before a crash goes undetected.
pub const MARK_EVERY: Duration = Duration::from_millis(100);

/// Records `synced` in the sync mark; whether it was written.
fn write_mark(mark: &Option<std::fs::File>, synced: u64) -> bool {
    let Some(f) = mark else { return false };
    match crate::db::write_sync_mark(f, synced) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!("writing the sync mark: {e}");
            false
        }
    }
}

fn stopped() -> io::Error {
    io::Error::other("the WAL sync thread has stopped")
}

fn run(db: Arc<DB>, rx: mpsc::Receiver<Msg>, stats: Arc<SyncStats>, mark: Option<std::fs::File>) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut waiting: Vec<Done> = Vec::new();
    // Highest sequence number known fsynced, and the one the mark holds.
    let (mut synced, mut marked) = (0u64, 0u64);
    let mut marked_at = Instant::now();
    let mut stopping = false;
    while !stopping {
        let mut take = |m: Msg| match m {
            Msg::After(done) => waiting.push(done),
            Msg::Stop => stopping = true,
        };
        match rx.recv_timeout(MARK_EVERY) {
            Ok(first) => take(first),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        rx.try_iter().for_each(&mut take);
        if synced > marked && marked_at.elapsed() >= MARK_EVERY {
            if write_mark(&mark, synced) {
                marked = synced;
            }
            marked_at = Instant::now();
        }
        if waiting.is_empty() {
            continue;
        }
        let start = Instant::now();
        // Every write published by now is in the WAL ahead of this sync.
        let seq = db.latest_sequence_number();
        let res = db.flush_wal(true);
        if res.is_ok() {
            synced = synced.max(seq);
        }
        stats.fsyncs.fetch_add(1, Relaxed);
        stats.appends.fetch_add(waiting.len() as u64, Relaxed);
        let took = start.elapsed();
        stats
            .fsync_micros
            .fetch_add(took.as_micros() as u64, Relaxed);
        if let Some(h) = &stats.fsync_seconds {
            h.observe(took.as_secs_f64());
        }
        for done in waiting.drain(..) {
            done(
                res.as_ref()
                    .map(|_| ())
                    .map_err(|e| io::Error::other(format!("WAL fsync failed: {e}"))),
            );
        }
    }
    if synced > marked {
        write_mark(&mark, synced);
    }
    // Appends queued after the stop never had a sync: fail them.
    for m in rx.try_iter() {
        if let Msg::After(done) = m {
            done(Err(stopped()));
        }
    }
}
