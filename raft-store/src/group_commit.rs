//! Group commit: one WAL fsync shared by every append that is waiting for one.
//!
//! Appends of every group on the node write their batch to RocksDB without
//! syncing (the entries are readable at once, as openraft requires), then
//! need an fsync that began after their write returned:
//!
//! * A follower's append (entries another node proposed; or any append
//!   with eager replication off) that finds no fsync running and none
//!   queued fsyncs on its own thread ([`Syncer::sync_now`]) and completes at
//!   once. It is on the path of the leader's commit, and this saves two
//!   thread hand-offs (waking the syncer, and its waking the appender back):
//!   in three A/B pairs one client's sends were ~25 % faster (p50 −20 %).
//! * Every other append — a leader's own, whose fsync overlaps the
//!   followers' (eager replication), or one that finds the syncer busy —
//!   hands its completion callback to the [`Syncer`]'s thread, which takes
//!   every callback queued so far, fsyncs the WAL once, and completes them
//!   all. Callbacks that arrive during an fsync ride the next one, so under
//!   load one fsync covers many appends of many groups. (Inline fsyncs for
//!   leaders too cost 7–20 % of the sends at 16 clients: a runtime worker
//!   of the busiest node sat in each fsync.)
//!
//! An idle node does no fsync at all. Because a callback is queued (or the
//! inline fsync started) only after its write returned, and the WAL is
//! sequential, the fsync that follows covers that write. Only the thread
//! writes the sync mark (at most every [`MARK_EVERY`]), from the highest
//! sequence either path has synced.
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
    db: Arc<DB>,
    idle: Arc<Idle>,
}

/// What the inline path needs to know of the thread: whether an fsync is
/// running or callbacks are queued for one (then an append joins the queue,
/// where one fsync covers many), and the highest sequence known fsynced
/// (for the sync mark, which only the thread writes).
#[derive(Default)]
struct Idle {
    /// Callbacks sent to the thread and not yet completed, plus one while
    /// any fsync (the thread's or an inline one) runs.
    busy: std::sync::atomic::AtomicUsize,
    synced: std::sync::atomic::AtomicU64,
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
        let idle = Arc::new(Idle::default());
        let (db_t, idle_t) = (db.clone(), idle.clone());
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
            .spawn(move || run(db_t, rx, st, mark, idle_t));
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
            db,
            idle,
        }
    }

    /// Syncs what is waiting and ends the thread, waiting for it: after
    /// this the thread holds no database handle, so the database closes
    /// where its last other handle drops — not on this thread while the
    /// process exits (RocksDB aborts if its destructor races the exit
    /// handlers). Later appends fail. Blocks; call from a blocking context.
    pub fn stop(&self) {
        // No inline fsync from now on either.
        self.idle
            .busy
            .store(usize::MAX / 2, std::sync::atomic::Ordering::Release);
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

    /// Fsyncs the WAL on the calling thread if no fsync is running or
    /// queued, and says how it went; `None` when one is (then use
    /// [`Syncer::after_sync`], whose fsync will be shared). At low load this
    /// saves the two thread hand-offs of the queue (waking the syncer, and
    /// its waking the caller back); under load the thread's shared fsyncs
    /// take over by themselves. The log store uses it for followers'
    /// appends (see the module note). Blocks for one fsync.
    pub fn sync_now(&self) -> Option<io::Result<()>> {
        use std::sync::atomic::Ordering::{AcqRel, Relaxed};
        if self
            .idle
            .busy
            .compare_exchange(0, 1, AcqRel, Relaxed)
            .is_err()
        {
            return None;
        }
        let start = Instant::now();
        let res = sync_wal(&self.db, &self.stats, &self.idle.synced, 1);
        self.idle.busy.fetch_sub(1, AcqRel);
        if let Some(h) = &self.stats.append_wait_seconds {
            h.observe(start.elapsed().as_secs_f64());
        }
        Some(res)
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
        self.idle
            .busy
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if let Err(mpsc::SendError(Msg::After(done))) = self.tx.send(Msg::After(done)) {
            self.idle
                .busy
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
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

/// One WAL fsync covering every write published before it, counted for
/// `appends` callbacks.
fn sync_wal(
    db: &DB,
    stats: &SyncStats,
    synced: &std::sync::atomic::AtomicU64,
    appends: usize,
) -> io::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let start = Instant::now();
    // Every write published by now is in the WAL ahead of this sync.
    let seq = db.latest_sequence_number();
    let res = db.flush_wal(true);
    if res.is_ok() {
        synced.fetch_max(seq, Relaxed);
    }
    stats.fsyncs.fetch_add(1, Relaxed);
    stats.appends.fetch_add(appends as u64, Relaxed);
    let took = start.elapsed();
    stats
        .fsync_micros
        .fetch_add(took.as_micros() as u64, Relaxed);
    if let Some(h) = &stats.fsync_seconds {
        h.observe(took.as_secs_f64());
    }
    res.map_err(|e| io::Error::other(format!("WAL fsync failed: {e}")))
}

fn run(
    db: Arc<DB>,
    rx: mpsc::Receiver<Msg>,
    stats: Arc<SyncStats>,
    mark: Option<std::fs::File>,
    idle: Arc<Idle>,
) {
    use std::sync::atomic::Ordering::{AcqRel, Relaxed};
    let mut waiting: Vec<Done> = Vec::new();
    // The sequence number the mark holds.
    let mut marked = 0u64;
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
        let synced = idle.synced.load(Relaxed);
        if synced > marked && marked_at.elapsed() >= MARK_EVERY {
            if write_mark(&mark, synced) {
                marked = synced;
            }
            marked_at = Instant::now();
        }
        if waiting.is_empty() {
            continue;
        }
        let n = waiting.len();
        let res = sync_wal(&db, &stats, &idle.synced, n);
        for done in waiting.drain(..) {
            done(match &res {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::other(e.to_string())),
            });
        }
        idle.busy.fetch_sub(n, AcqRel);
    }
    let synced = idle.synced.load(Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn put(db: &DB, k: &[u8]) {
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(false);
        db.put_opt(k, b"v", &w).expect("put");
    }

    /// An idle syncer fsyncs on the caller, and what that fsync covered
    /// reaches the sync mark like the thread's own fsyncs do.
    #[test]
    fn an_inline_sync_is_counted_and_marked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Arc::new(DB::open_default(dir.path().join("db")).expect("open"));
        let syncer = Syncer::start(db.clone(), dir.path());
        put(&db, b"a");
        let seq = db.latest_sequence_number();
        assert!(matches!(syncer.sync_now(), Some(Ok(()))));
        assert_eq!(
            syncer
                .stats
                .fsyncs
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        syncer.stop();
        let marked = crate::db::read_sync_mark(dir.path())
            .expect("mark")
            .unwrap_or(0);
        assert!(marked >= seq, "mark {marked} below the synced write {seq}");
    }

    /// Queued callbacks keep the inline path off until their fsync is done,
    /// and after `stop` nothing syncs: neither inline nor queued.
    #[test]
    fn queued_callbacks_complete_and_stop_ends_both_paths() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Arc::new(DB::open_default(dir.path().join("db")).expect("open"));
        let syncer = Syncer::start(db.clone(), dir.path());
        let (tx, rx) = mpsc::channel();
        for i in 0..8u8 {
            put(&db, &[i]);
            let tx = tx.clone();
            syncer.after_sync(Box::new(move |r| {
                let _ = tx.send(r.is_ok());
            }));
        }
        for _ in 0..8 {
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
        }
        // Every queued callback completed, so the syncer is idle again.
        let idle = Instant::now() + Duration::from_secs(10);
        while syncer.idle.busy.load(std::sync::atomic::Ordering::Acquire) != 0 {
            assert!(Instant::now() < idle, "the syncer never became idle");
            std::thread::yield_now();
        }
        assert!(matches!(syncer.sync_now(), Some(Ok(()))));
        syncer.stop();
        assert!(syncer.sync_now().is_none());
        syncer.after_sync(Box::new(move |r| {
            let _ = tx.send(r.is_ok());
        }));
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(false));
    }
}
