//! Human (stderr) and JSON (stdout) output of the commands.

use schemashift_coordinator::error::CoordinatorError;
use schemashift_coordinator::ops::{PlanOutput, Status};
use schemashift_coordinator::plan::privileges;
use schemashift_coordinator::run::{RunReport, VerifySummary};
#[cfg(feature = "lab")]
use schemashift_lab::demo::DemoReport;
use serde::Serialize;

fn json_out<T: Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot encode JSON: {e}"),
    }
}

fn mb(b: u64) -> f64 {
    b as f64 / 1_048_576.0
}

/// The privileges table, then the analysis (or, on stderr after it, every problem).
pub fn print_plan(out: &PlanOutput, json: bool) {
    if json {
        let tables = out.analysis.as_ref().ok();
        let problems = match &out.analysis {
            Err(CoordinatorError::Plan(p)) => p.clone(),
            Err(e) => vec![e.to_string()],
            Ok(_) => Vec::new(),
        };
        return json_out(&serde_json::json!({
            "tables": tables,
            "privileges": out.privileges,
            "problems": problems,
        }));
    }
    eprint!("{}", privileges::render(&out.privileges));
    let Ok(a) = &out.analysis else {
        return;
    };
    eprintln!(
        "{:<28} {:<28} {:>12} {:>10} {:>7} {:>9} {:>10}",
        "source", "target", "rows", "size MB", "shards", "strategy", "est. time"
    );
    for t in a {
        eprintln!(
            "{:<28} {:<28} {:>12} {:>10.1} {:>7} {:>9} {:>9.0}s",
            t.source,
            t.target,
            t.rows,
            mb(t.bytes),
            t.shards,
            t.strategy,
            t.estimated_seconds
        );
    }
    let mut notes: Vec<&String> = a.iter().flat_map(|t| &t.reverse_notes).collect();
    notes.dedup();
    for n in notes {
        eprintln!("note: {n}");
    }
    eprintln!("plan is valid; nothing was written");
}

pub fn print_verify(v: &VerifySummary, json: bool) {
    if json {
        return json_out(v);
    }
    eprintln!(
        "verify: {} ranges, source rows {}, target rows {}, differing rows {}, still changing {} ({:.1}s)",
        v.ranges,
        v.source_rows,
        v.target_rows,
        v.differing.len(),
        v.still_changing.len(),
        v.seconds
    );
    for d in v.differing.iter().take(50) {
        eprintln!("  {:?} {} key={:?}", d.kind, d.table, d.key);
    }
    for t in &v.skipped_tables {
        eprintln!("  not compared: table {t} is stopped (see `schemashift status`)");
    }
}

pub fn print_run(r: &RunReport, json: bool) {
    if json {
        return json_out(r);
    }
    eprintln!(
        "run {} — phase {}{}",
        r.run_id,
        r.phase,
        if r.resumed { " (resumed)" } else { "" }
    );
    eprintln!(
        "  backfill: {} rows in {} shards, {:.1} MB, {:.1}s, {:.0} rows/s",
        r.rows_copied,
        r.shards,
        mb(r.bytes_copied as u64),
        r.backfill_seconds,
        r.rows_per_second
    );
    eprintln!(
        "  changes: {} captured, {} replayed; catch-up lag {:.2}s",
        r.changes_captured, r.changes_replayed, r.lag_seconds
    );
    if let Some(v) = &r.verify {
        eprintln!(
            "  verify: source {} rows, target {} rows, {} differing, {} still changing (re-checked in the freeze)",
            v.source_rows,
            v.target_rows,
            v.differing.len(),
            v.still_changing.len()
        );
    }
    if let Some(c) = &r.cutover {
        eprintln!(
            "  cutover: write freeze {:.0} ms (lock attempt {}), {} keys re-checked inside it, {} sequences moved",
            c.freeze_ms, c.lock_attempts, c.keys_rechecked, c.sequences_moved
        );
        eprintln!(
            "    freeze steps: drained at {:.0} ms, re-checked at {:.0} ms, {} at {:.0} ms{}",
            c.drained_ms,
            c.rechecked_ms,
            if c.reverse_sync {
                "reverse sync started"
            } else {
                "no reverse sync (cutover.reverse: false)"
            },
            c.reverse_ms,
            if c.autovacuums_cancelled > 0 {
                format!(
                    "; {} autovacuum run(s) cancelled for the lock",
                    c.autovacuums_cancelled
                )
            } else {
                String::new()
            }
        );
    }
    if let Some(why) = &r.throttle_baseline_retaken {
        eprintln!("  throttle: {why}");
    }
    eprintln!("  total {:.1}s", r.total_seconds);
}

/// The final report as markdown: what an operator pastes into a change ticket.
pub fn run_markdown(r: &RunReport) -> String {
    let mut o = format!("# schemashift run {}\n\n", r.run_id);
    o.push_str("| | |\n|---|---|\n");
    let mut row = |k: &str, v: String| o.push_str(&format!("| {k} | {v} |\n"));
    row(
        "phase",
        format!("{}{}", r.phase, if r.resumed { " (resumed)" } else { "" }),
    );
    let tables: Vec<String> = r
        .tables
        .iter()
        .map(|t| format!("{} → {}", t.source, t.target))
        .collect();
    row("tables", tables.join(", "));
    row(
        "rows copied",
        format!(
            "{} in {} shards ({:.1} MB)",
            r.rows_copied,
            r.shards,
            mb(r.bytes_copied.max(0) as u64)
        ),
    );
    row(
        "backfill",
        format!(
            "{:.1} s, {:.0} rows/s",
            r.backfill_seconds, r.rows_per_second
        ),
    );
    row(
        "changes",
        format!(
            "{} captured, {} replayed",
            r.changes_captured, r.changes_replayed
        ),
    );
    row("catch-up lag", format!("{:.2} s", r.lag_seconds));
    if let Some(v) = &r.verify {
        row(
            "verify",
            format!(
                "source {} rows, target {} rows, {} differing",
                v.source_rows,
                v.target_rows,
                v.differing.len()
            ),
        );
    }
    if let Some(c) = &r.cutover {
        row(
            "write freeze",
            format!("{:.0} ms (lock attempt {})", c.freeze_ms, c.lock_attempts),
        );
        row(
            "keys re-checked in the freeze",
            c.keys_rechecked.to_string(),
        );
        row("sequences moved", c.sequences_moved.to_string());
        row("changes after the freeze", c.late_changes.to_string());
    }
    row("total", format!("{:.1} s", r.total_seconds));
    o
}

/// Writes DIR/report.md and DIR/report.json; the exit code on failure.
pub fn write_report(dir: Option<&std::path::Path>, r: &RunReport) -> Result<(), i32> {
    let Some(dir) = dir else { return Ok(()) };
    let json = serde_json::to_string_pretty(r).unwrap_or_default();
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(dir.join("report.md"), run_markdown(r)))
        .and_then(|()| std::fs::write(dir.join("report.json"), json));
    written.map_err(|e| {
        eprintln!("error: writing the report to {}: {e}", dir.display());
        1
    })
}

pub fn print_status(s: &Status, json: bool) {
    if json {
        return json_out(s);
    }
    match &s.run_id {
        None => eprintln!("no run in this control schema"),
        Some(id) => {
            eprintln!("run {id} — phase {}", s.phase);
            eprintln!(
                "  shards: {} done, {} leased, {} pending{}; {} rows copied ({:.0} rows/s{})",
                s.shards.done,
                s.shards.leased,
                s.shards.pending,
                if s.shards.stopped > 0 {
                    format!(", {} stopped", s.shards.stopped)
                } else {
                    String::new()
                },
                s.shards.rows_done,
                s.backfill_rows_per_s,
                s.eta_seconds
                    .map(|e| format!(", backfill done in about {e:.0} s"))
                    .unwrap_or_default()
            );
            if let Some(p) = &s.paused {
                eprintln!("  {p}: copies and replay hold, capture goes on (`schemashift resume` to go on)");
            }
            if !s.indexes_to_build.is_empty() {
                eprintln!(
                    "  indexes to build ({}): {}",
                    if s.phase == "backfill" || s.phase == "planned" {
                        "when the backfill ends; the unique ones first"
                    } else {
                        "once replay has caught up"
                    },
                    s.indexes_to_build.join(", ")
                );
            }
            for t in &s.stopped_tables {
                eprintln!("  STOPPED since {}: {t}", t.since);
                eprintln!(
                    "    to fix: {}; then `schemashift run SPEC` copies it again",
                    t.fix()
                );
            }
            if s.throttled || s.throttled_seconds > 0.0 {
                eprintln!(
                    "  throttle: {}{}; {:.1} s throttled in {} episodes",
                    if s.throttled {
                        "holding new shards back"
                    } else {
                        "released"
                    },
                    s.throttle_reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default(),
                    s.throttled_seconds,
                    s.throttle_episodes
                );
            }
            if let Some(why) = &s.throttle_rebaseline_reason {
                eprintln!(
                    "  throttle baseline re-taken {} time(s): {why}",
                    s.throttle_rebaselines
                );
            }
            for p in &s.partitions {
                eprintln!(
                    "  partition {}: log head {}, applied {}, {} waiting{}",
                    p.partition,
                    p.head,
                    p.applied,
                    p.lag,
                    p.worker
                        .as_deref()
                        .map(|w| format!(" (worker {w})"))
                        .unwrap_or_default()
                );
            }
            eprintln!(
                "  change log: {} logged, {} applied, {} waiting; captured to {}",
                s.changes_logged,
                s.changes_applied,
                s.replay_lag_changes,
                s.capture_lsn.as_deref().unwrap_or("-")
            );
            if let Some(slot) = &s.slot {
                eprintln!(
                    "  slot {}: exists {}, active {}, retains {:.1} MB of WAL",
                    slot.name,
                    slot.exists,
                    slot.active,
                    mb(slot.retained_wal_bytes.max(0) as u64)
                );
            }
            for w in &s.workers {
                eprintln!(
                    "  worker {} on {}: {}{}, {} rows, {} changes, {:.0} rows/s, seen {:.0} s ago",
                    w.worker,
                    w.host,
                    w.state,
                    w.lease
                        .as_deref()
                        .map(|l| format!(" ({l})"))
                        .unwrap_or_default(),
                    w.rows,
                    w.changes,
                    w.rows_per_s,
                    w.seconds_since_seen
                );
            }
            for sh in s.shard_list.iter().filter(|sh| sh.state != "done") {
                eprintln!(
                    "  shard {} of {} {}: {}{}, attempts {}{}",
                    sh.shard,
                    sh.table,
                    sh.range,
                    sh.state,
                    sh.worker
                        .as_deref()
                        .map(|w| format!(" by {w}"))
                        .unwrap_or_default(),
                    sh.attempts,
                    sh.last_error
                        .as_deref()
                        .map(|e| format!(", last error: {e}"))
                        .unwrap_or_default()
                );
            }
        }
    }
}

#[cfg(feature = "lab")]
pub fn print_demo(d: &DemoReport, json: bool) {
    if json {
        return json_out(d);
    }
    eprintln!();
    eprintln!("schemashift demo — users.full_name → first_name + last_name");
    print_run(&d.run, false);
    eprintln!(
        "  application load: {} inserts, {} updates ({} of TOASTed rows), {} deletes, {} failed; p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms; longest write wait {:.0} ms",
        d.load_inserts, d.load_updates, d.load_toast_updates, d.load_deletes, d.load_failed, d.p50_ms, d.p95_ms, d.p99_ms, d.max_write_wait_ms
    );
    eprintln!(
        "  split accuracy (round trip on {} sampled rows): {:.3}%",
        d.accuracy_sample,
        d.split_accuracy * 100.0
    );
    eprintln!(
        "  final compare (our own SQL, all rows): {} missing, {} extra, {} different",
        d.diff.0, d.diff.1, d.diff.2
    );
    eprintln!("  total {:.1}s", d.total_seconds);
    eprintln!();
    eprintln!(
        "  the brief's success metrics (throttling {}):",
        if d.throttling { "on" } else { "off" }
    );
    for line in success_lines(d) {
        eprintln!("{line}");
    }
    let [b50, b95, b99] = d.percentiles_before_ms;
    let [d50, d95, d99] = d.percentiles_during_ms;
    eprintln!(
        "    (write p50/p95/p99 before {b50:.2}/{b95:.2}/{b99:.2} ms, during the backfill {d50:.2}/{d95:.2}/{d99:.2} ms)"
    );
    eprintln!(
        "    (write p95 during replay, verify and cutover {:.2} ms; on the target after the switch {:.2} ms)",
        d.p95_rest_ms, d.p95_after_ms
    );
}

/// One line per event: when, run, what, by whom, and the detail.
pub fn print_history(events: &[schemashift_coordinator::history::Event], json: bool) {
    if json {
        return json_out(&events);
    }
    if events.is_empty() {
        eprintln!("no history for this spec's control schema");
        return;
    }
    for e in events {
        let by = match (&e.by_user, &e.by_host) {
            (Some(u), Some(h)) => format!(" by {u}@{h}"),
            _ => String::new(),
        };
        let detail = match &e.detail {
            serde_json::Value::Object(m) if m.is_empty() => String::new(),
            d => format!(" {d}"),
        };
        eprintln!("{}  {}  {}{by}{detail}", e.at, e.run_id, e.kind);
    }
}

/// A success metric's verdict; one that was not measured is not counted either way.
#[cfg(feature = "lab")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Met,
    NotMet,
    NotRun,
}

/// The success-metrics table: each metric on one line (name, value, verdict) and its target
/// on the next, within 100 columns however long a value is.
#[cfg(feature = "lab")]
fn success_lines(d: &DemoReport) -> Vec<String> {
    let lost = d.diff.0 + d.diff.1 + d.diff.2 + d.rollback_diff.map_or(0, |r| r.0 + r.1 + r.2);
    let impact = if d.p95_before_ms > 0.0 {
        (d.p95_during_ms / d.p95_before_ms - 1.0) * 100.0
    } else {
        0.0
    };
    let lag = d.run.lag_seconds;
    let freeze = d.run.cutover.as_ref().map_or(0.0, |c| c.freeze_ms);
    let verdict = |met: bool| if met { Verdict::Met } else { Verdict::NotMet };
    let rows: [(&str, String, &str, Verdict); 8] = [
        (
            "downtime (longest write wait)",
            format!("{:.0} ms", d.max_write_wait_ms),
            "0 s (writes wait, never fail; freeze < 1 s)",
            verdict(d.load_failed == 0 && d.max_write_wait_ms < 1000.0),
        ),
        (
            "write freeze",
            format!("{freeze:.0} ms"),
            "< 1 s",
            verdict(freeze < 1000.0),
        ),
        (
            "rows lost or different",
            lost.to_string(),
            "0",
            verdict(lost == 0),
        ),
        (
            "split accuracy",
            format!("{:.3}% of {}", d.split_accuracy * 100.0, d.accuracy_sample),
            "> 99.9%",
            verdict(d.split_accuracy > 0.999),
        ),
        (
            "write p95 before → backfill",
            format!(
                "{:.2} → {:.2} ms ({impact:+.0}%)",
                d.p95_before_ms, d.p95_during_ms
            ),
            "< +10%",
            verdict(impact < 10.0),
        ),
        (
            "target writes in the old schema",
            format!(
                "{} written after the switch, {} synced back",
                d.writes_after_switch, d.reverse_applied
            ),
            "all, by reverse sync",
            verdict(d.writes_after_switch > 0 && lost == 0),
        ),
        (
            "catch-up lag before cutover",
            format!("{lag:.2} s"),
            "< 1 s",
            verdict(lag < 1.0),
        ),
        (
            "rollback",
            d.rollback_seconds
                .map_or("not run (ask with --rollback)".into(), |s| {
                    format!("{s:.1} s, nothing lost")
                }),
            "< 15 min",
            match d.rollback_seconds {
                None => Verdict::NotRun,
                Some(s) => verdict(s < 900.0),
            },
        ),
    ];
    let mut out = Vec::new();
    for (what, got, target, v) in rows {
        let v = match v {
            Verdict::Met => "met",
            Verdict::NotMet => "NOT met",
            Verdict::NotRun => "not run",
        };
        // 4 + 32 + 1 + 50 + 1 + 7: a value longer than its column is cut, never run on.
        let got: String = if got.chars().count() > 50 {
            got.chars().take(49).chain(std::iter::once('…')).collect()
        } else {
            got
        };
        out.push(format!("    {what:<32} {got:<50} {v}"));
        out.push(format!("      target {target}"));
    }
    out
}

#[cfg(all(test, feature = "lab"))]
mod tests {
    use super::*;

    #[test]
    fn demo_metrics_fit_100_columns_and_a_rollback_not_asked_for_is_not_run() {
        let d = DemoReport {
            writes_after_switch: 123_456_789,
            reverse_applied: 123_456_789,
            split_accuracy: 1.0,
            accuracy_sample: 10_000,
            max_write_wait_ms: 12_345_678.0,
            ..DemoReport::default()
        };
        let lines = success_lines(&d);
        for l in &lines {
            assert!(
                l.chars().count() <= 100,
                "{} columns: {l}",
                l.chars().count()
            );
        }
        let rollback = lines
            .iter()
            .find(|l| l.trim_start().starts_with("rollback"))
            .expect("a rollback line");
        assert!(rollback.ends_with("not run"), "{rollback}");
        assert!(!lines
            .iter()
            .any(|l| l.contains("NOT met") && l.contains("rollback")));
        // Columns line up: every verdict starts at the same column.
        let verdicts: Vec<usize> = lines
            .iter()
            .filter(|l| !l.trim_start().starts_with("target"))
            .map(|l| {
                l.chars().count() - l.split_whitespace().last().map_or(0, |w| w.chars().count())
            })
            .collect();
        assert!(verdicts.iter().all(|c| *c >= 4 + 32 + 1 + 50), "{lines:#?}");
    }
}
