//! Live progress bars on a terminal (indicatif), fed by the same control state `status`
//! reads. Off the terminal, the coordinator's plain progress log lines serve instead.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use schemashift_common::spec::Spec;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::task::JoinHandle;

static BARS: OnceLock<MultiProgress> = OnceLock::new();
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Decided once from the command line (`wanted`).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Log lines go around the bars (suspending them) instead of through them.
#[derive(Clone, Copy, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match BARS.get() {
            Some(mp) => mp.suspend(|| std::io::stderr().write(buf)),
            None => std::io::stderr().write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// Whether bars make sense: a terminal, and neither --quiet nor JSON logs.
pub fn wanted(quiet: bool, log_json: bool) -> bool {
    !quiet && !log_json && std::io::stderr().is_terminal()
}

/// Shows backfill and replay progress until the returned task is aborted.
pub fn start(spec: &Spec) -> JoinHandle<()> {
    let spec = spec.clone();
    let mp = BARS
        .get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
        .clone();
    tokio::spawn(async move {
        let style = ProgressStyle::with_template(
            "{prefix:>9} [{bar:30}] {pos}/{len} rows {per_sec} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let backfill = mp.add(
            ProgressBar::new(0)
                .with_style(style)
                .with_prefix("backfill"),
        );
        let replay = mp.add(
            ProgressBar::new_spinner()
                .with_style(
                    ProgressStyle::with_template("{prefix:>9} {spinner} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                )
                .with_prefix("replay"),
        );
        loop {
            if let Ok(st) = schemashift_coordinator::ops::status(&spec).await {
                let total: i64 = st
                    .shard_list
                    .iter()
                    .map(|s| s.rows.unwrap_or(0).max(s.estimated_rows))
                    .sum();
                backfill.set_length(total.max(st.shards.rows_done).max(1) as u64);
                backfill.set_position(st.shards.rows_done.max(0) as u64);
                backfill.set_message(format!(
                    "{} of {} shards, phase {}",
                    st.shards.done,
                    st.shard_list.len(),
                    st.phase
                ));
                replay.set_message(format!(
                    "{} captured, {} applied, {} waiting",
                    st.changes_logged, st.changes_applied, st.replay_lag_changes
                ));
                replay.tick();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

/// Removes the bars (before the final report is printed).
pub fn finish(task: Option<JoinHandle<()>>) {
    if let Some(t) = task {
        t.abort();
    }
    if let Some(mp) = BARS.get() {
        let _ = mp.clear();
    }
}
