//! Checkers over a history. Conversations are append-only logs whose seq
//! reveals their order, so every check is a single pass (plus sorting by
//! time): no search over interleavings is needed.
//!
//! What each checker reports (see README.md for the full definitions):
//! - **lost**: acknowledged sends missing from the final linearizable read;
//! - **duplicated**: one client_msg_id observed at two seqs (in any reads,
//!   or an acknowledgement's seq that differs from where the message is);
//! - **seq conflicts**: two different messages observed at one
//!   (conversation, seq);
//! - **order violations**: A acknowledged before B was first invoked, in the
//!   same conversation, but seq(B) <= seq(A);
//! - **stale reads**: a linearizable read (full or delta sync) invoked after
//!   an acknowledgement whose result misses it;
//! - **sync skips**: a delta-synced view (or a full read) with a hole below
//!   its newest message;
//! - **sync backwards**: a sync token that decreases, or a shard that no
//!   longer knows a token it issued (cold start);
//! - **divergent**: conversations whose replicas read differently after
//!   they converged on the applied index;
//! - **failed but present**: a send answered `fail` that committed anyway;
//! - **unexpected**: a message nobody sent;
//! - **recovered** (not an anomaly): `info` sends that turned out committed.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::history::{Event, FeedDetail, FeedSeen, Seen, Type, F};

/// How many example descriptions to keep per kind of anomaly.
const MAX_EXAMPLES: usize = 5;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Results {
    pub ops_ok: usize,
    pub ops_fail: usize,
    pub ops_info: usize,
    pub acked: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub seq_conflicts: usize,
    pub order_violations: usize,
    pub stale_reads: usize,
    pub sync_skips: usize,
    pub sync_backwards: usize,
    pub divergent: usize,
    /// A feed row whose version or last seq went down for one reader, or a
    /// feed token that went down (or was forgotten).
    pub feed_backwards: usize,
    /// Final feeds that disagree with their conversations (after waiting
    /// for them to converge), and feed rows showing seqs that do not exist.
    pub feed_disagree: usize,
    pub failed_present: usize,
    pub unexpected: usize,
    /// Conversations with no final linearizable read (nothing to check
    /// losses against).
    pub unreadable: usize,
    pub recovered: usize,
    pub examples: Vec<String>,
    #[serde(skip)]
    example_counts: HashMap<String, usize>,
}

impl Results {
    /// The number of anomalies found (everything but `recovered`).
    pub fn anomalies(&self) -> usize {
        self.lost
            + self.duplicated
            + self.seq_conflicts
            + self.order_violations
            + self.stale_reads
            + self.sync_skips
            + self.sync_backwards
            + self.divergent
            + self.feed_backwards
            + self.feed_disagree
            + self.failed_present
            + self.unexpected
            + self.unreadable
    }

    /// Keeps `s` as an example of its kind (the text before the colon).
    fn example(&mut self, s: String) {
        let kind = s.split(':').next().unwrap_or_default().to_string();
        let n = self.example_counts.entry(kind).or_default();
        *n += 1;
        if *n <= MAX_EXAMPLES {
            self.examples.push(s);
        }
    }
}

/// One operation: its invocation and completion.
struct Op<'a> {
    inv: &'a Event,
    done: Option<&'a Event>,
}

impl Op<'_> {
    fn ty(&self) -> Type {
        self.done.map_or(Type::Info, |d| d.ty)
    }
    fn feed(&self) -> &[FeedSeen] {
        self.done
            .and_then(|d| d.feed.as_deref())
            .unwrap_or_default()
    }
    fn feed_detail(&self) -> &[FeedDetail] {
        self.done
            .and_then(|d| d.feed_detail.as_deref())
            .unwrap_or_default()
    }
    fn msgs(&self) -> &[Seen] {
        self.done
            .and_then(|d| d.msgs.as_deref())
            .unwrap_or_default()
    }
}

#[derive(Default)]
struct SendInfo {
    conv: u32,
    first_invoke: u64,
    /// Earliest acknowledgement: (time, seq it carried).
    ack: Option<(u64, u64)>,
    info: bool,
    fail: bool,
}

/// Tracks which seqs of a conversation were seen where, to catch two
/// messages at one seq and one message at two seqs.
#[derive(Default)]
struct Observed {
    at: HashMap<(u32, u64), String>,
    of: HashMap<String, (u32, u64)>,
    conflicts: HashSet<(u32, u64)>,
    dups: HashSet<String>,
}

impl Observed {
    fn see(&mut self, r: &mut Results, conv: u32, seq: u64, cmid: &str, source: &str) {
        match self.at.get(&(conv, seq)) {
            Some(other) if other != cmid => {
                if self.conflicts.insert((conv, seq)) {
                    r.example(format!(
                        "seq conflict: conversation {conv} seq {seq} holds {other} and {cmid} ({source})"
                    ));
                }
            }
            Some(_) => {}
            None => {
                self.at.insert((conv, seq), cmid.to_string());
            }
        }
        match self.of.get(cmid) {
            Some(&(c, s)) if (c, s) != (conv, seq) => {
                if self.dups.insert(cmid.to_string()) {
                    r.example(format!(
                        "duplicate: {cmid} at conversation {c} seq {s} and conversation {conv} seq {seq} ({source})"
                    ));
                }
            }
            Some(_) => {}
            None => {
                self.of.insert(cmid.to_string(), (conv, seq));
            }
        }
    }
}

/// A reader's delta-synced view of one conversation.
#[derive(Default)]
struct View {
    seen: HashSet<u64>,
    /// Every seq in 1..=contig is in the view.
    contig: u64,
    max: u64,
    token: u64,
}

impl View {
    fn add(&mut self, seq: u64) {
        self.seen.insert(seq);
        self.max = self.max.max(seq);
        while self.seen.contains(&(self.contig + 1)) {
            self.contig += 1;
        }
    }
}

/// Checks a whole history.
pub fn check(events: &[Event]) -> Results {
    let mut r = Results::default();

    // Pair invocations with completions (an operation never completed is
    // indeterminate: info).
    let mut open: HashMap<u64, usize> = HashMap::new();
    let mut ops: Vec<Op> = Vec::new();
    for e in events {
        if e.ty == Type::Invoke {
            open.insert(e.index, ops.len());
            ops.push(Op { inv: e, done: None });
        } else if let Some(i) = open.remove(&e.index) {
            ops[i].done = Some(e);
        }
    }

    // Sends, by client_msg_id.
    let mut sends: HashMap<&str, SendInfo> = HashMap::new();
    for op in ops.iter().filter(|o| o.inv.f == F::Send) {
        let (Some(cmid), Some(conv)) = (op.inv.cmid.as_deref(), op.inv.conv) else {
            continue;
        };
        let s = sends.entry(cmid).or_insert_with(|| SendInfo {
            conv,
            first_invoke: op.inv.time_ns,
            ..Default::default()
        });
        s.first_invoke = s.first_invoke.min(op.inv.time_ns);
        match (op.ty(), op.done) {
            (Type::Ok, Some(d)) => {
                let seq = d.seq.unwrap_or(0);
                if s.ack.is_none_or(|(t, _)| d.time_ns < t) {
                    s.ack = Some((d.time_ns, seq));
                }
            }
            (Type::Fail, _) => s.fail = true,
            _ => s.info = true,
        }
    }
    for op in ops
        .iter()
        .filter(|o| matches!(o.inv.f, F::Send | F::Sync | F::Read | F::Feed))
    {
        match op.ty() {
            Type::Ok => r.ops_ok += 1,
            Type::Fail => r.ops_fail += 1,
            _ => r.ops_info += 1,
        }
    }
    r.acked = sends.values().filter(|s| s.ack.is_some()).count();

    // Final reads: the linearizable one (the last, if several) and replicas'.
    let mut final_lin: HashMap<u32, &[Seen]> = HashMap::new();
    let mut final_rep: HashMap<u32, Vec<(u64, &[Seen])>> = HashMap::new();
    // Replicas' digests of their whole messages (not only ids).
    let mut digests: HashMap<u32, Vec<(u64, &str)>> = HashMap::new();
    for op in ops
        .iter()
        .filter(|o| o.inv.f == F::Final && o.ty() == Type::Ok)
    {
        let Some(conv) = op.inv.conv else { continue };
        match op.inv.node {
            None => {
                final_lin.insert(conv, op.msgs());
            }
            Some(n) => {
                final_rep.entry(conv).or_default().push((n, op.msgs()));
                if let Some(d) = op.done.and_then(|d| d.value.as_deref()) {
                    digests.entry(conv).or_default().push((n, d));
                }
            }
        }
    }

    // Every observation of (conversation, seq, client_msg_id).
    let mut obs = Observed::default();
    for op in &ops {
        let conv = op.inv.conv.unwrap_or(u32::MAX);
        match (op.inv.f, op.ty(), op.done) {
            (F::Send, Type::Ok, Some(d)) => {
                if let (Some(cmid), Some(seq)) = (op.inv.cmid.as_deref(), d.seq) {
                    obs.see(&mut r, conv, seq, cmid, "acknowledgement");
                }
            }
            (F::Sync | F::Read | F::Final, Type::Ok, Some(_)) => {
                let what = match (op.inv.f, op.inv.node) {
                    (F::Sync, _) => "delta sync".to_string(),
                    (F::Read, _) => "full read".to_string(),
                    (_, Some(n)) => format!("final read of node {n}"),
                    _ => "final linearizable read".to_string(),
                };
                for (seq, cmid) in op.msgs() {
                    obs.see(&mut r, conv, *seq, cmid, &what);
                }
            }
            _ => {}
        }
    }
    r.seq_conflicts = obs.conflicts.len();
    r.duplicated = obs.dups.len();

    // Where each message is in the final linearizable read.
    let mut final_seq: HashMap<&str, (u32, u64)> = HashMap::new();
    for (conv, msgs) in &final_lin {
        for (seq, cmid) in msgs.iter() {
            final_seq.insert(cmid.as_str(), (*conv, *seq));
        }
    }

    // Lost, recovered, failed-but-present; unreadable conversations.
    let mut unreadable: HashSet<u32> = HashSet::new();
    let mut sorted_sends: Vec<(&&str, &SendInfo)> = sends.iter().collect();
    sorted_sends.sort_by_key(|(_, s)| s.first_invoke);
    for (cmid, s) in &sorted_sends {
        if !final_lin.contains_key(&s.conv) {
            if s.ack.is_some() && unreadable.insert(s.conv) {
                r.example(format!(
                    "unreadable: conversation {} has no final read",
                    s.conv
                ));
            }
            continue;
        }
        let present = final_seq.contains_key(**cmid);
        match (s.ack, present) {
            (Some((t, seq)), false) => {
                r.lost += 1;
                r.example(format!(
                    "lost: {cmid} acknowledged at seq {seq} in conversation {} at {:.3} s, missing from the final read",
                    s.conv,
                    t as f64 / 1e9
                ));
            }
            (None, true) if s.info => r.recovered += 1,
            (None, true) if s.fail => {
                r.failed_present += 1;
                r.example(format!(
                    "failed but present: {cmid} was answered fail yet is in conversation {}",
                    s.conv
                ));
            }
            _ => {}
        }
    }
    r.unreadable = unreadable.len();
    let mut unexpected: HashSet<&str> = HashSet::new();
    let all_final = final_lin.iter().map(|(c, m)| (*c, *m)).chain(
        final_rep
            .iter()
            .flat_map(|(c, v)| v.iter().map(move |(_, m)| (*c, *m))),
    );
    for (conv, msgs) in all_final {
        for (seq, cmid) in msgs.iter() {
            if !sends.contains_key(cmid.as_str()) && unexpected.insert(cmid.as_str()) {
                r.example(format!(
                    "unexpected: {cmid} at conversation {conv} seq {seq} was never sent"
                ));
            }
        }
    }
    r.unexpected = unexpected.len();

    // The seq a message ended at (final read), else the one its ack carried.
    let seq_of = |cmid: &str, s: &SendInfo| -> Option<u64> {
        final_seq
            .get(cmid)
            .map(|&(_, q)| q)
            .or(s.ack.map(|(_, q)| q))
    };

    // Real-time order per conversation: sweep acks and first invocations in
    // time order (an invocation at the same instant as an ack is not after it).
    let mut timeline: HashMap<u32, Vec<(u64, u8, u64, &str)>> = HashMap::new();
    for (cmid, s) in &sends {
        let Some(seq) = seq_of(cmid, s) else { continue };
        let tl = timeline.entry(s.conv).or_default();
        tl.push((s.first_invoke, 0, seq, cmid));
        if let Some((t, _)) = s.ack {
            tl.push((t, 1, seq, cmid));
        }
    }
    let mut convs: Vec<u32> = timeline.keys().copied().collect();
    convs.sort_unstable();
    for conv in &convs {
        let tl = timeline
            .get_mut(conv)
            .map(std::mem::take)
            .unwrap_or_default();
        let mut tl = tl;
        tl.sort_unstable();
        let mut max_acked: (u64, &str) = (0, "");
        for (t, kind, seq, cmid) in tl {
            if kind == 1 {
                if seq > max_acked.0 {
                    max_acked = (seq, cmid);
                }
            } else if max_acked.0 > 0 && seq <= max_acked.0 {
                r.order_violations += 1;
                r.example(format!(
                    "order: in conversation {conv}, {} (seq {}) was acknowledged before {cmid} was invoked at {:.3} s, yet {cmid} got seq {seq}",
                    max_acked.1,
                    max_acked.0,
                    t as f64 / 1e9
                ));
            }
        }
    }

    // Reads: stale reads, skips and backwards syncs. Acks per conversation
    // in time order, reads in invocation order; a pointer sweeps the acks.
    let mut acks: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
    for (cmid, s) in &sends {
        if let (Some((t, _)), Some(seq)) = (s.ack, seq_of(cmid, s)) {
            acks.entry(s.conv).or_default().push((t, seq));
        }
    }
    for v in acks.values_mut() {
        v.sort_unstable();
    }
    let mut reads: Vec<&Op> = ops
        .iter()
        .filter(|o| matches!(o.inv.f, F::Sync | F::Read) && o.ty() == Type::Ok)
        .collect();
    reads.sort_by_key(|o| o.inv.time_ns);
    let mut ptr: HashMap<u32, (usize, u64)> = HashMap::new();
    let mut views: HashMap<(u64, u32), View> = HashMap::new();
    for op in reads {
        let Some(conv) = op.inv.conv else { continue };
        // The newest seq acknowledged before this read was invoked.
        let (i, need) = ptr.entry(conv).or_default();
        if let Some(list) = acks.get(&conv) {
            while *i < list.len() && list[*i].0 < op.inv.time_ns {
                *need = (*need).max(list[*i].1);
                *i += 1;
            }
        }
        let need = *need;
        let t = op.inv.time_ns as f64 / 1e9;
        if op.inv.f == F::Read {
            let mut v = View::default();
            for (seq, _) in op.msgs() {
                v.add(*seq);
            }
            if v.contig < v.max {
                r.sync_skips += 1;
                r.example(format!(
                    "read gap: full read of conversation {conv} at {t:.3} s has seqs up to {} but only 1..={} without holes",
                    v.max, v.contig
                ));
            }
            if need > 0 && !v.seen.contains(&need) {
                r.stale_reads += 1;
                r.example(format!(
                    "stale read: full read of conversation {conv} invoked at {t:.3} s misses seq {need}, acknowledged before"
                ));
            }
            continue;
        }
        let view = views.entry((op.inv.process, conv)).or_default();
        let from = op
            .inv
            .tokens
            .as_ref()
            .and_then(|v| v.first().copied())
            .unwrap_or(0);
        let cold = op.done.and_then(|d| d.cold).unwrap_or(false);
        let tokens: &[u64] = op
            .done
            .and_then(|d| d.tokens.as_deref())
            .unwrap_or_default();
        if from == 0 || cold {
            if cold && from != 0 {
                r.sync_backwards += 1;
                r.example(format!(
                    "sync backwards: conversation {conv} answered a cold start to token {from} (process {}, {t:.3} s)",
                    op.inv.process
                ));
            }
            // A fresh view: it starts just below the oldest message given.
            *view = View::default();
            let low = op.msgs().iter().map(|(s, _)| *s).min().unwrap_or(1);
            view.contig = low.saturating_sub(1);
        }
        let mut prev = from;
        for &tok in tokens {
            if tok < prev {
                r.sync_backwards += 1;
                r.example(format!(
                    "sync backwards: conversation {conv} token {tok} after {prev} (process {}, {t:.3} s)",
                    op.inv.process
                ));
                break;
            }
            prev = tok;
        }
        view.token = prev;
        for (seq, _) in op.msgs() {
            view.add(*seq);
        }
        if view.contig < view.max {
            r.sync_skips += 1;
            r.example(format!(
                "sync skip: process {}'s view of conversation {conv} after the sync at {t:.3} s has seqs up to {} but only ..={} without holes",
                op.inv.process, view.max, view.contig
            ));
        }
        if need > 0 && !view.seen.contains(&need) {
            r.stale_reads += 1;
            r.example(format!(
                "stale read: process {}'s delta sync of conversation {conv} invoked at {t:.3} s misses seq {need}, acknowledged before",
                op.inv.process
            ));
        }
    }

    check_feeds(&mut r, &ops, &final_lin);

    // Divergence: every replica's final read equals the linearizable one.
    let mut rep_convs: Vec<&u32> = final_rep.keys().collect();
    rep_convs.sort_unstable();
    for conv in rep_convs {
        let reference = final_lin.get(conv).copied();
        let list = &final_rep[conv];
        let base = reference.unwrap_or(list[0].1);
        let mut odd: Vec<u64> = list
            .iter()
            .filter(|(_, m)| *m != base)
            .map(|(n, _)| *n)
            .collect();
        // Same ids, different contents: the digests disagree.
        if let Some(ds) = digests.get(conv) {
            let first = ds[0].1;
            if ds.iter().any(|(_, d)| *d != first) {
                let mut count: HashMap<&str, usize> = HashMap::new();
                for (_, d) in ds {
                    *count.entry(d).or_default() += 1;
                }
                let common = count.iter().max_by_key(|(_, c)| **c).map(|(d, _)| *d);
                for (n, d) in ds {
                    if Some(*d) != common && !odd.contains(n) {
                        odd.push(*n);
                    }
                }
            }
        }
        if !odd.is_empty() {
            r.divergent += 1;
            let len = |m: &[Seen]| m.len();
            r.example(format!(
                "divergent: conversation {conv}: nodes {odd:?} differ from the linearizable read ({} messages; theirs: {:?})",
                len(base),
                list.iter()
                    .filter(|(n, _)| odd.contains(n))
                    .map(|(n, m)| (n, m.len()))
                    .collect::<Vec<_>>()
            ));
        }
    }
    r
}

/// The process whose user sent a workload message, from its client_msg_id
/// (`p<process>-<n>`; liveness writes `live-…` are sent by process 0's user).
fn sender_of(cmid: &str) -> Option<u64> {
    if cmid.starts_with("live-") {
        return Some(0);
    }
    cmid.strip_prefix('p')?.split('-').next()?.parse().ok()
}

/// Where a row belongs in the feed: unread-and-unmuted first, then newest
/// activity, ties by conversation id.
fn feed_rank(d: &FeedDetail) -> (u8, std::cmp::Reverse<u64>, &str) {
    (
        if d.unread > 0 && !d.muted { 0 } else { 1 },
        std::cmp::Reverse(d.activity_ms),
        d.id.as_str(),
    )
}

/// What user `p`'s feed row of a conversation must show once everything has
/// converged: the last message as preview, and as unread count the
/// messages of others after `p`'s own last message (sending marks read; the
/// workload never marks read otherwise).
fn expected_row(p: u64, msgs: &[Seen]) -> Option<(u64, &str, u64)> {
    let (last_seq, last_cmid) = msgs.iter().max_by_key(|(s, _)| *s)?;
    let own_last = msgs
        .iter()
        .filter(|(_, c)| sender_of(c) == Some(p))
        .map(|(s, _)| *s)
        .max()
        .unwrap_or(0);
    let unread = msgs
        .iter()
        .filter(|(s, c)| *s > own_last && sender_of(c) != Some(p))
        .count() as u64;
    Some((*last_seq, last_cmid.as_str(), unread))
}

/// Feed checks: per reader, rows never go back (conversation version, last
/// seq) and tokens never go down; no row shows a seq the conversation
/// doesn't have; every full read lists rows in feed order; each user's
/// final feed shows every conversation at its final last seq, with the
/// last message as preview and the right unread count.
fn check_feeds(r: &mut Results, ops: &[Op], final_lin: &HashMap<u32, &[Seen]>) {
    for op in ops
        .iter()
        .filter(|o| matches!(o.inv.f, F::Feed | F::FinalFeed) && o.ty() == Type::Ok)
    {
        let rows = op.feed_detail();
        if let Some(w) = rows
            .windows(2)
            .find(|w| feed_rank(&w[0]) > feed_rank(&w[1]))
        {
            r.feed_disagree += 1;
            r.example(format!(
                "feed order: process {}'s full feed at {:.3} s lists conversation {} (unread {}, muted {}, activity {}) before {} (unread {}, muted {}, activity {})",
                op.inv.process,
                op.inv.time_ns as f64 / 1e9,
                w[0].conv, w[0].unread, w[0].muted, w[0].activity_ms,
                w[1].conv, w[1].unread, w[1].muted, w[1].activity_ms,
            ));
        }
    }
    let final_max: HashMap<u32, u64> = final_lin
        .iter()
        .map(|(c, m)| (*c, m.iter().map(|(s, _)| *s).max().unwrap_or(0)))
        .collect();
    let mut reads: Vec<&Op> = ops
        .iter()
        .filter(|o| o.inv.f == F::Feed && o.ty() == Type::Ok)
        .collect();
    reads.sort_by_key(|o| o.inv.time_ns);
    let mut rows: HashMap<(u64, u32), (u64, u64)> = HashMap::new();
    let mut ahead: HashSet<(u32, u64)> = HashSet::new();
    for op in reads {
        let p = op.inv.process;
        let t = op.inv.time_ns as f64 / 1e9;
        let from = op
            .inv
            .tokens
            .as_ref()
            .and_then(|v| v.first().copied())
            .unwrap_or(0);
        let cold = op.done.and_then(|d| d.cold).unwrap_or(false);
        if cold && from != 0 {
            r.feed_backwards += 1;
            r.example(format!(
                "feed backwards: process {p}'s feed answered a cold start to token {from} at {t:.3} s"
            ));
            rows.retain(|(q, _), _| *q != p);
        }
        if from != 0 && !cold {
            let mut prev = from;
            for &tok in op
                .done
                .and_then(|d| d.tokens.as_deref())
                .unwrap_or_default()
            {
                if tok < prev {
                    r.feed_backwards += 1;
                    r.example(format!(
                        "feed backwards: process {p}'s feed token {tok} after {prev} at {t:.3} s"
                    ));
                    break;
                }
                prev = tok;
            }
        }
        for &(conv, version, last) in op.feed() {
            match rows.get(&(p, conv)) {
                Some(&(v0, l0)) if version < v0 || last < l0 => {
                    r.feed_backwards += 1;
                    r.example(format!(
                        "feed backwards: process {p}'s feed row of conversation {conv} went from version {v0} / seq {l0} to {version} / {last} at {t:.3} s"
                    ));
                }
                _ => {
                    rows.insert((p, conv), (version, last));
                }
            }
            if let Some(&max) = final_max.get(&conv) {
                if last > max && ahead.insert((conv, last)) {
                    r.feed_disagree += 1;
                    r.example(format!(
                        "feed disagrees: a feed row shows conversation {conv} at seq {last}, which ends at seq {max}"
                    ));
                }
            }
        }
    }
    // The last final feed of each process.
    let mut finals: HashMap<u64, &Op> = HashMap::new();
    for op in ops.iter().filter(|o| o.inv.f == F::FinalFeed) {
        finals.insert(op.inv.process, op);
    }
    let mut procs: Vec<&u64> = finals.keys().collect();
    procs.sort_unstable();
    for p in procs {
        let op = finals[p];
        if op.ty() != Type::Ok {
            r.feed_disagree += 1;
            r.example(format!("feed disagrees: no final feed of process {p}"));
            continue;
        }
        for d in op.feed_detail() {
            let Some((last, cmid, unread)) =
                final_lin.get(&d.conv).and_then(|m| expected_row(*p, m))
            else {
                continue;
            };
            let want: String = cmid.chars().take(100).collect();
            if d.preview_seq != last || d.preview != want {
                r.feed_disagree += 1;
                r.example(format!(
                    "feed disagrees: process {p}'s final feed previews conversation {} with seq {} {:?}, its last message is seq {last} {want:?}",
                    d.conv, d.preview_seq, d.preview
                ));
            }
            if d.unread != unread {
                r.feed_disagree += 1;
                r.example(format!(
                    "feed disagrees: process {p}'s final feed counts {} unread in conversation {}, the conversation has {unread} after its own last message",
                    d.unread, d.conv
                ));
            }
        }
        let got: HashMap<u32, u64> = op.feed().iter().map(|&(c, _, l)| (c, l)).collect();
        let mut convs: Vec<(&u32, &u64)> = final_max.iter().filter(|(_, m)| **m > 0).collect();
        convs.sort_unstable();
        for (conv, max) in convs {
            if got.get(conv) != Some(max) {
                r.feed_disagree += 1;
                r.example(format!(
                    "feed disagrees: process {p}'s final feed shows conversation {conv} at seq {:?}, the conversation ends at {max}",
                    got.get(conv)
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds histories by hand; each call advances the clock by 1 ns.
    #[derive(Default)]
    struct H {
        ev: Vec<Event>,
        t: u64,
        next: u64,
    }

    impl H {
        fn push(&mut self, mut e: Event) -> u64 {
            self.t += 1;
            e.time_ns = self.t;
            let i = e.index;
            self.ev.push(e);
            i
        }
        fn inv(&mut self, p: u64, f: F, fill: impl FnOnce(&mut Event)) -> u64 {
            let i = self.next;
            self.next += 1;
            let mut e = Event::new(i, 0, p, Type::Invoke, f);
            fill(&mut e);
            self.push(e)
        }
        fn done(&mut self, i: u64, ty: Type, fill: impl FnOnce(&mut Event)) {
            let (p, f) = self
                .ev
                .iter()
                .find(|e| e.index == i)
                .map(|e| (e.process, e.f))
                .unwrap();
            let mut e = Event::new(i, 0, p, ty, f);
            fill(&mut e);
            self.push(e);
        }
        fn inv_send(&mut self, p: u64, conv: u32, cmid: &str) -> u64 {
            self.inv(p, F::Send, |e| {
                e.conv = Some(conv);
                e.cmid = Some(cmid.into());
            })
        }
        fn ok_send(&mut self, i: u64, seq: u64) {
            self.done(i, Type::Ok, |e| e.seq = Some(seq));
        }
        fn send(&mut self, p: u64, conv: u32, cmid: &str, seq: u64) {
            let i = self.inv_send(p, conv, cmid);
            self.ok_send(i, seq);
        }
        fn sync(&mut self, p: u64, conv: u32, from: u64, tokens: &[u64], msgs: &[(u64, &str)]) {
            let i = self.inv(p, F::Sync, |e| {
                e.conv = Some(conv);
                e.tokens = Some(vec![from]);
            });
            self.done(i, Type::Ok, |e| {
                e.tokens = Some(tokens.to_vec());
                e.msgs = Some(seen(msgs));
            });
        }
        fn read(&mut self, p: u64, conv: u32, msgs: &[(u64, &str)]) {
            let i = self.inv(p, F::Read, |e| e.conv = Some(conv));
            self.done(i, Type::Ok, |e| e.msgs = Some(seen(msgs)));
        }
        fn fin(&mut self, conv: u32, node: Option<u64>, msgs: &[(u64, &str)]) {
            let i = self.inv(0, F::Final, |e| {
                e.conv = Some(conv);
                e.node = node;
            });
            self.done(i, Type::Ok, |e| e.msgs = Some(seen(msgs)));
        }
        /// The final reads of every replica and the linearizable one, alike.
        fn fin_all(&mut self, conv: u32, msgs: &[(u64, &str)]) {
            self.fin(conv, None, msgs);
            for n in 1..=3 {
                self.fin(conv, Some(n), msgs);
            }
        }
        fn check(&self) -> Results {
            check(&self.ev)
        }
    }

    fn seen(m: &[(u64, &str)]) -> Vec<Seen> {
        m.iter().map(|(s, c)| (*s, c.to_string())).collect()
    }

    /// A correct history: two writers, a reader syncing, a full read.
    fn clean() -> H {
        let mut h = H::default();
        h.sync(9, 0, 0, &[1], &[]);
        h.send(1, 0, "a", 1);
        h.sync(9, 0, 1, &[3, 4], &[(1, "a")]);
        let b = h.inv_send(2, 0, "b");
        let c = h.inv_send(1, 0, "c");
        h.ok_send(c, 2);
        h.ok_send(b, 3);
        h.read(9, 0, &[(1, "a"), (2, "c"), (3, "b")]);
        h.sync(9, 0, 4, &[7], &[(2, "c"), (3, "b")]);
        h.fin_all(0, &[(1, "a"), (2, "c"), (3, "b")]);
        h
    }

    #[test]
    fn a_correct_history_has_no_anomalies() {
        let r = clean().check();
        assert_eq!(r.anomalies(), 0, "{r:#?}");
        assert_eq!((r.acked, r.ops_ok, r.ops_fail, r.ops_info), (3, 7, 0, 0));
    }

    #[test]
    fn history_survives_a_json_round_trip() {
        let h = clean();
        let text: Vec<String> =
            h.ev.iter()
                .map(|e| serde_json::to_string(e).unwrap())
                .collect();
        let back: Vec<Event> = text
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(back, h.ev);
    }

    #[test]
    fn catches_a_lost_acknowledged_message() {
        let mut h = H::default();
        h.send(1, 0, "a", 1);
        h.send(1, 0, "b", 2);
        h.fin(0, None, &[(1, "a")]);
        let r = h.check();
        assert_eq!(r.lost, 1, "{r:#?}");
        assert!(r.examples.iter().any(|e| e.contains("lost: b")));
    }

    #[test]
    fn catches_a_duplicate() {
        let mut h = H::default();
        h.send(1, 0, "a", 1);
        h.fin(0, None, &[(1, "a"), (2, "a")]);
        let r = h.check();
        assert_eq!(r.duplicated, 1, "{r:#?}");
    }

    #[test]
    fn catches_two_messages_at_one_seq() {
        let mut h = H::default();
        let a = h.inv_send(1, 0, "a");
        let b = h.inv_send(2, 0, "b");
        h.ok_send(a, 1);
        h.ok_send(b, 1);
        h.fin(0, None, &[(1, "a")]);
        let r = h.check();
        assert_eq!(r.seq_conflicts, 1, "{r:#?}");
        assert_eq!(r.lost, 1, "b was acknowledged and is gone");
    }

    #[test]
    fn catches_real_time_order_violations() {
        let mut h = H::default();
        h.send(1, 0, "a", 2);
        h.send(2, 0, "b", 1); // invoked after a's ack, yet ordered before it
        h.fin(0, None, &[(1, "b"), (2, "a")]);
        let r = h.check();
        assert_eq!(r.order_violations, 1, "{r:#?}");
        // Concurrent sends may land in either order.
        let mut h = H::default();
        let a = h.inv_send(1, 0, "a");
        let b = h.inv_send(2, 0, "b");
        h.ok_send(a, 2);
        h.ok_send(b, 1);
        h.fin(0, None, &[(1, "b"), (2, "a")]);
        assert_eq!(h.check().anomalies(), 0);
    }

    #[test]
    fn catches_stale_reads_full_and_delta() {
        let mut h = H::default();
        h.sync(9, 0, 0, &[1], &[]);
        h.send(1, 0, "a", 1);
        h.read(8, 0, &[]);
        h.sync(9, 0, 1, &[1], &[]);
        h.fin(0, None, &[(1, "a")]);
        let r = h.check();
        assert_eq!(r.stale_reads, 2, "{r:#?}");
        // A read concurrent with the send may miss it.
        let mut h = H::default();
        let a = h.inv_send(1, 0, "a");
        h.read(8, 0, &[]);
        h.ok_send(a, 1);
        h.fin(0, None, &[(1, "a")]);
        assert_eq!(h.check().anomalies(), 0);
    }

    #[test]
    fn catches_delta_sync_skips() {
        let mut h = H::default();
        h.sync(9, 0, 0, &[1], &[]);
        let a = h.inv_send(1, 0, "a");
        let b = h.inv_send(2, 0, "b");
        h.sync(9, 0, 1, &[5], &[(2, "b")]);
        h.ok_send(a, 1);
        h.ok_send(b, 2);
        h.fin(0, None, &[(1, "a"), (2, "b")]);
        let r = h.check();
        assert_eq!(r.sync_skips, 1, "{r:#?}");
        // A full read with a hole is caught too.
        let mut h = H::default();
        h.send(1, 0, "a", 1);
        h.send(1, 0, "b", 2);
        h.read(8, 0, &[(2, "b")]);
        h.fin(0, None, &[(1, "a"), (2, "b")]);
        let r = h.check();
        assert!(r.sync_skips == 1 && r.stale_reads == 0, "{r:#?}");
    }

    #[test]
    fn catches_delta_sync_going_backwards() {
        let mut h = H::default();
        h.sync(9, 0, 0, &[4], &[]);
        h.sync(9, 0, 4, &[6, 2], &[]);
        let r = h.check();
        assert_eq!(r.sync_backwards, 1, "{r:#?}");
        // A shard that forgot a token it issued (cold start) is caught too.
        let mut h = H::default();
        h.sync(9, 0, 0, &[4], &[]);
        let i = h.inv(9, F::Sync, |e| {
            e.conv = Some(0);
            e.tokens = Some(vec![4]);
        });
        h.done(i, Type::Ok, |e| {
            e.tokens = Some(vec![9]);
            e.cold = Some(true);
            e.msgs = Some(vec![]);
        });
        assert_eq!(h.check().sync_backwards, 1);
    }

    #[test]
    fn catches_divergent_replicas() {
        let mut h = H::default();
        h.send(1, 0, "a", 1);
        h.fin(0, None, &[(1, "a")]);
        h.fin(0, Some(1), &[(1, "a")]);
        h.fin(0, Some(2), &[]);
        let r = h.check();
        assert_eq!(r.divergent, 1, "{r:#?}");
        assert!(r.examples.iter().any(|e| e.contains("nodes [2]")));
    }

    #[test]
    fn catches_replicas_with_same_ids_but_different_contents() {
        let mut h = H::default();
        h.send(1, 0, "a", 1);
        h.fin(0, None, &[(1, "a")]);
        for (n, digest) in [(1, "d1"), (2, "d1"), (3, "d2")] {
            let i = h.inv(0, F::Final, |e| {
                e.conv = Some(0);
                e.node = Some(n);
            });
            h.done(i, Type::Ok, |e| {
                e.msgs = Some(seen(&[(1, "a")]));
                e.value = Some(digest.into());
            });
        }
        let r = h.check();
        assert_eq!(r.divergent, 1, "{r:#?}");
        assert!(r.examples.iter().any(|e| e.contains("nodes [3]")));
    }

    fn feed(h: &mut H, p: u64, f: F, from: u64, tokens: &[u64], rows: &[FeedSeen], cold: bool) {
        let i = h.inv(p, f, |e| e.tokens = Some(vec![from]));
        h.done(i, Type::Ok, |e| {
            e.tokens = Some(tokens.to_vec());
            e.feed = Some(rows.to_vec());
            e.cold = cold.then_some(true);
        });
    }

    #[test]
    fn feeds_that_agree_and_move_forward_pass() {
        let mut h = clean();
        feed(&mut h, 9, F::Feed, 0, &[3], &[(0, 2, 1)], false);
        feed(&mut h, 9, F::Feed, 3, &[5, 6], &[(0, 4, 3)], false);
        feed(&mut h, 9, F::FinalFeed, 0, &[6], &[(0, 4, 3)], false);
        let r = h.check();
        assert_eq!(r.anomalies(), 0, "{r:#?}");
    }

    #[test]
    fn catches_feeds_going_backwards() {
        let mut h = clean();
        feed(&mut h, 9, F::Feed, 0, &[3], &[(0, 4, 3)], false);
        feed(&mut h, 9, F::Feed, 3, &[5], &[(0, 2, 1)], false);
        assert_eq!(h.check().feed_backwards, 1);
        let mut h = clean();
        feed(&mut h, 9, F::Feed, 0, &[3], &[], false);
        feed(&mut h, 9, F::Feed, 3, &[2], &[], false);
        assert_eq!(h.check().feed_backwards, 1);
        let mut h = clean();
        feed(&mut h, 9, F::Feed, 0, &[3], &[], false);
        feed(&mut h, 9, F::Feed, 3, &[1], &[], true);
        assert_eq!(h.check().feed_backwards, 1);
    }

    #[test]
    fn catches_feeds_that_disagree_with_their_conversations() {
        // The final feed is behind the conversation.
        let mut h = clean();
        feed(&mut h, 9, F::FinalFeed, 0, &[6], &[(0, 3, 2)], false);
        assert_eq!(h.check().feed_disagree, 1);
        // A feed row shows a seq the conversation never had.
        let mut h = clean();
        feed(&mut h, 9, F::Feed, 0, &[6], &[(0, 9, 7)], false);
        assert_eq!(h.check().feed_disagree, 1);
        // A final feed that could not be read.
        let mut h = clean();
        let i = h.inv(9, F::FinalFeed, |e| e.tokens = Some(vec![0]));
        h.done(i, Type::Fail, |_| {});
        assert_eq!(h.check().feed_disagree, 1);
    }

    fn detail(conv: u32, id: &str, preview: (u64, &str), unread: u64, act: u64) -> FeedDetail {
        FeedDetail {
            conv,
            id: id.into(),
            preview_seq: preview.0,
            preview: preview.1.into(),
            unread,
            activity_ms: act,
            muted: false,
        }
    }

    fn full_feed(h: &mut H, f: F, rows: &[FeedSeen], details: Vec<FeedDetail>) {
        let i = h.inv(9, f, |e| e.tokens = Some(vec![0]));
        h.done(i, Type::Ok, |e| {
            e.tokens = Some(vec![6]);
            e.feed = Some(rows.to_vec());
            e.feed_detail = Some(details);
        });
    }

    #[test]
    fn final_feed_previews_and_unread_counts_must_match_the_conversation() {
        // Conversation 0 ends at seq 3 "b"; process 9 sent none of it.
        let mut h = clean();
        full_feed(
            &mut h,
            F::FinalFeed,
            &[(0, 4, 3)],
            vec![detail(0, "x", (3, "b"), 3, 5)],
        );
        assert_eq!(h.check().anomalies(), 0);
        let mut h = clean();
        full_feed(
            &mut h,
            F::FinalFeed,
            &[(0, 4, 3)],
            vec![detail(0, "x", (2, "c"), 3, 5)],
        );
        assert_eq!(h.check().feed_disagree, 1);
        let mut h = clean();
        full_feed(
            &mut h,
            F::FinalFeed,
            &[(0, 4, 3)],
            vec![detail(0, "x", (3, "b"), 2, 5)],
        );
        assert_eq!(h.check().feed_disagree, 1);
    }

    #[test]
    fn full_feed_reads_must_be_in_feed_order() {
        let mut h = clean();
        let rows = [(0, 4, 3), (1, 1, 0)];
        // Unread before read, then newest first, then by id.
        let good = vec![
            detail(0, "b", (3, "b"), 1, 5),
            detail(1, "c", (0, ""), 0, 9),
            detail(2, "a", (0, ""), 0, 7),
            detail(3, "b", (0, ""), 0, 7),
        ];
        full_feed(&mut h, F::Feed, &rows, good);
        assert_eq!(h.check().feed_disagree, 0);
        let mut h = clean();
        let bad = vec![
            detail(1, "c", (0, ""), 0, 9),
            detail(0, "b", (3, "b"), 1, 5),
        ];
        full_feed(&mut h, F::Feed, &rows, bad);
        assert_eq!(h.check().feed_disagree, 1);
        let mut h = clean();
        let bad = vec![detail(1, "c", (0, ""), 0, 7), detail(0, "b", (0, ""), 0, 9)];
        full_feed(&mut h, F::Feed, &rows, bad);
        assert_eq!(h.check().feed_disagree, 1);
    }

    #[test]
    fn unread_counts_start_after_the_readers_own_last_message() {
        let msgs: Vec<Seen> = [(1, "p1-0"), (2, "p9-0"), (3, "p1-1"), (4, "live-0-0")]
            .iter()
            .map(|(s, c)| (*s, c.to_string()))
            .collect();
        assert_eq!(expected_row(9, &msgs), Some((4, "live-0-0", 2)));
        assert_eq!(expected_row(0, &msgs), Some((4, "live-0-0", 0)));
        assert_eq!(expected_row(1, &msgs), Some((4, "live-0-0", 1)));
        assert_eq!(expected_row(1, &[]), None);
    }

    #[test]
    fn reports_recovered_info_and_catches_failed_but_present_and_unexpected() {
        let mut h = H::default();
        let a = h.inv_send(1, 0, "a");
        h.done(a, Type::Info, |e| e.value = Some("timeout".into()));
        let b = h.inv_send(2, 0, "b");
        h.done(b, Type::Fail, |_| {});
        let _never_completed = h.inv_send(3, 0, "c");
        h.fin(0, None, &[(1, "a"), (2, "c")]);
        let r = h.check();
        assert_eq!((r.recovered, r.anomalies()), (2, 0), "{r:#?}");
        assert_eq!(r.ops_info, 2);
        h.fin(0, None, &[(1, "a"), (2, "c"), (3, "b"), (4, "zz")]);
        let r = h.check();
        assert_eq!((r.failed_present, r.unexpected), (1, 1), "{r:#?}");
    }

    #[test]
    fn a_conversation_without_a_final_read_is_reported() {
        let mut h = H::default();
        h.send(1, 0, "a", 1);
        h.send(1, 1, "b", 1);
        h.fin(1, None, &[(1, "b")]);
        let r = h.check();
        assert_eq!(r.unreadable, 1, "{r:#?}");
    }

    #[test]
    fn retries_of_one_message_are_one_send() {
        let mut h = H::default();
        let a = h.inv_send(1, 0, "a");
        h.done(a, Type::Info, |_| {});
        let a2 = h.inv_send(1, 0, "a");
        h.ok_send(a2, 1);
        h.send(2, 0, "b", 2);
        h.fin_all(0, &[(1, "a"), (2, "b")]);
        let r = h.check();
        assert_eq!((r.acked, r.anomalies(), r.recovered), (2, 0, 0), "{r:#?}");
    }
}
