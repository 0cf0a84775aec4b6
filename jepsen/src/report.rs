//! The results table (markdown) and the summary line CI reads.

use std::fmt::Write;

use crate::runner::RunResult;

pub const HEADER: &str = "| nemesis | seconds | ops ok/fail/info | faults | acked | lost | duplicated | seq conflicts | order violations | stale reads | sync skips/backwards | divergent replicas | feed backwards/disagree | other | recovered | liveness ok | result |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";

/// One table row.
pub fn row(r: &RunResult) -> String {
    let x = &r.results;
    let other = x.failed_present + x.unexpected + x.unreadable + r.corrupt_started;
    let name = if r.negative_control {
        format!("{} (negative control)", r.nemesis.name())
    } else {
        r.nemesis.name().to_string()
    };
    format!(
        "| {name} | {:.0} | {}/{}/{} | {} | {} | {} | {} | {} | {} | {} | {}/{} | {} | {}/{} | {other} | {} | {} | {} |\n",
        r.seconds,
        x.ops_ok,
        x.ops_fail,
        x.ops_info,
        r.faults,
        x.acked,
        x.lost,
        x.duplicated,
        x.seq_conflicts,
        x.order_violations,
        x.stale_reads,
        x.sync_skips,
        x.sync_backwards,
        x.divergent,
        x.feed_backwards,
        x.feed_disagree,
        x.recovered,
        if r.liveness { "yes" } else { "NO" },
        if r.passed() { "pass" } else { "FAIL" },
    )
}

/// The whole report of a set of runs.
pub fn render(seed: u64, runs: &[RunResult], errors: &[(String, String)]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n## natter-jepsen results\n");
    let _ = writeln!(s, "seed: {seed}");
    if let Some(r) = runs.first() {
        let _ = write!(s, "mode: {}", r.mode);
        if let Some(why) = &r.fallback_reason {
            let _ = write!(s, " (not netns: {why})");
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s);
    s.push_str(HEADER);
    for r in runs {
        s.push_str(&row(r));
    }
    for (name, e) in errors {
        let _ = writeln!(
            s,
            "| {name} | - | - | - | - | - | - | - | - | - | - | - | - | - | - | NO | ERROR: {} |",
            e.replace('|', "/").replace('\n', " ")
        );
    }
    let _ = writeln!(s);
    for r in runs {
        let _ = writeln!(
            s,
            "- {}{}: history {} (node logs in {})",
            r.nemesis.name(),
            if r.negative_control {
                " (negative control)"
            } else {
                ""
            },
            r.history.display(),
            r.logs.display()
        );
        for n in &r.notes {
            let _ = writeln!(s, "  - note: {n}");
        }
        for e in &r.results.examples {
            let _ = writeln!(s, "  - {e}");
        }
        if r.negative_control {
            if r.passed() {
                let _ = writeln!(s, "  - negative control: anomalies detected as expected");
            } else {
                let _ = writeln!(
                    s,
                    "  - negative control: NO anomaly detected (the checkers missed a known loss)"
                );
            }
        }
    }
    s
}
