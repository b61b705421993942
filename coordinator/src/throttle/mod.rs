//! Throttling, gh-ost style: a probe watches the source's health (latency of a one-row
//! read of a migrated table, against its own latency before the copy started and an
//! absolute limit; replica replay lag; lock waiters) and, while a limit from the spec is
//! exceeded, the coordinator starts no new backfill shard and running copies pause at the
//! next heartbeat. Replay is not held back: its lag is what the cutover waits for. The
//! state is saved for `status` and metrics.
//!
//! When the source runs on this host, the host's CPU is a limit too: on a saturated host the
//! application's queries wait for a core whatever the priorities, so fewer copies (and index
//! builds) run at once while it is busier than `max_host_cpu`, and one more only when the
//! estimate of its share still fits.

mod host;

use crate::error::CoordinatorError;
use host::{next_allowed, Host, Others, OURS_SMALL, SATURATED};
use schemashift_common::control::ControlSql;
use schemashift_common::ids::{LeaseEpoch, ShardId};
use schemashift_common::plan::RunPlan;
use schemashift_common::spec::{Spec, ThrottleSpec};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_postgres::Client;

/// Shared with the service: whether to hold new shards back, and how many copies may run.
#[derive(Debug)]
pub struct Throttle {
    on: AtomicBool,
    /// An operator paused the run (`schemashift pause`): everything the throttle holds,
    /// held until `resume`, whatever the probe says.
    paused: AtomicBool,
    /// Copies (and index builds) allowed at once; unlimited unless the host CPU rule applies.
    allowed: AtomicUsize,
    /// Shard copies under way, with the lease epoch and their last sign of life: the
    /// lowest ids within `allowed` copy, the others hold.
    running: Mutex<BTreeMap<ShardId, (LeaseEpoch, Instant)>>,
}

impl Throttle {
    /// Held back until the first probe says the source is fine.
    pub fn new(enabled: bool) -> Self {
        Throttle {
            on: AtomicBool::new(enabled),
            paused: AtomicBool::new(false),
            allowed: AtomicUsize::new(usize::MAX),
            running: Mutex::new(BTreeMap::new()),
        }
    }

    /// Copies and replay hold: the source is under stress, or an operator paused the run.
    pub fn throttled(&self) -> bool {
        self.on.load(Ordering::Relaxed) || self.paused()
    }

    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    /// How many copies or index builds may run at once now.
    pub fn allowed(&self) -> usize {
        self.allowed.load(Ordering::Relaxed).max(1)
    }

    fn running(
        &self,
        stale_after: Duration,
    ) -> std::sync::MutexGuard<'_, BTreeMap<ShardId, (LeaseEpoch, Instant)>> {
        let mut r = self.lock_running();
        // A copy whose worker vanished stops counting when its lease would expire.
        r.retain(|_, (_, seen)| seen.elapsed() < stale_after);
        r
    }

    /// Whether another copy may start now.
    pub fn may_start(&self, stale_after: Duration) -> bool {
        self.running(stale_after).len() < self.allowed()
    }

    /// A copy started or is alive; false while it must hold (beyond `allowed`). A sign
    /// of life from an older lease of the shard than the one counted changes nothing.
    pub fn copying(&self, shard: ShardId, epoch: LeaseEpoch, stale_after: Duration) -> bool {
        let mut r = self.running(stale_after);
        match r.get(&shard) {
            Some((e, _)) if *e > epoch => return false,
            _ => r.insert(shard, (epoch, Instant::now())),
        };
        let allowed = self.allowed();
        r.keys().take(allowed).any(|s| *s == shard)
    }

    /// A copy under this lease finished, failed or lost its lease; a late report from an
    /// older lease leaves the current holder's place alone.
    pub fn finished(&self, shard: ShardId, epoch: LeaseEpoch) {
        let mut r = self.lock_running();
        if r.get(&shard).is_some_and(|(e, _)| *e == epoch) {
            r.remove(&shard);
        }
    }

    fn copies(&self) -> usize {
        self.lock_running().len()
    }

    /// Usable after a panic elsewhere: the map holds no invariant a panic could break.
    fn lock_running(&self) -> std::sync::MutexGuard<'_, BTreeMap<ShardId, (LeaseEpoch, Instant)>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Probe latencies of the last half second: enough to see a trend, short enough that a
/// pause shows in the probe before the next heartbeat.
const WINDOW: usize = 10;
const PROBE_EVERY: Duration = Duration::from_millis(50);
/// Below this the probe's own noise dominates; a relative limit never goes tighter.
const MIN_SLACK: Duration = Duration::from_micros(100);
/// Holding on the relative limit for most of this long (it flickers on and off as the
/// probe wobbles) without the probe coming back means the slowdown is not about us
/// (another job, the daily peak): the baseline is measured again instead of holding on.
const STARVE_AFTER: Duration = Duration::from_secs(10);
/// The share of probes in [`STARVE_AFTER`] that held on the relative limit for that.
const STARVE_SHARE: f64 = 0.7;

/// Which recent probes held on the relative limit alone.
#[derive(Default)]
struct Holds {
    since: Option<Instant>,
    probes: std::collections::VecDeque<(Instant, bool)>,
}

impl Holds {
    /// Records a probe; true when the relative limit has held most of the last
    /// [`STARVE_AFTER`] (and that long has been watched).
    fn starving(&mut self, held: bool) -> bool {
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        self.probes.push_back((now, held));
        while self
            .probes
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > STARVE_AFTER)
        {
            self.probes.pop_front();
        }
        let held_share =
            self.probes.iter().filter(|(_, h)| *h).count() as f64 / self.probes.len().max(1) as f64;
        now.duration_since(since) >= STARVE_AFTER && held_share >= STARVE_SHARE
    }

    fn reset(&mut self) {
        *self = Holds::default();
    }
}

/// The 90th percentile of a few latencies (the second largest of ten).
fn p90(samples: &[Duration]) -> Duration {
    let mut v = samples.to_vec();
    v.sort_unstable();
    v.get((v.len() * 9).div_ceil(10).saturating_sub(1))
        .copied()
        .unwrap_or_default()
}

/// The probe's latency at the start, before any copy runs (workers are held until the
/// first verdict): what "slower" is measured against.
async fn baseline(source: &Client, probe: &str) -> Result<Duration, tokio_postgres::Error> {
    let mut samples = Vec::with_capacity(40);
    for _ in 0..40 {
        let t0 = Instant::now();
        source.query(probe, &[]).await?;
        samples.push(t0.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(p90(&samples))
}

/// The first limit the recent probes exceed, if any.
fn judge(window: &[Duration], base: Duration, limits: &ThrottleSpec) -> Option<String> {
    let now = p90(window);
    if now > limits.probe_latency {
        return Some(format!(
            "probe read took {:.2} ms (limit {} ms)",
            now.as_secs_f64() * 1e3,
            limits.probe_latency.as_millis()
        ));
    }
    let allowed = base
        .mul_f64(1.0 + limits.probe_increase)
        .max(base + MIN_SLACK);
    (now > allowed).then(|| {
        format!(
            "probe read {:.2} ms is {:.0}% slower than before the run ({:.2} ms; limit {:.0}%)",
            now.as_secs_f64() * 1e3,
            (now.as_secs_f64() / base.as_secs_f64().max(1e-6) - 1.0) * 100.0,
            base.as_secs_f64() * 1e3,
            limits.probe_increase * 100.0
        )
    })
}

/// Replica lag and lock waiters: the first limit exceeded, if any.
async fn check_server(
    source: &Client,
    limits: &ThrottleSpec,
) -> Result<Option<String>, tokio_postgres::Error> {
    let r = source
        .query_one(
            "SELECT coalesce((SELECT max(extract(epoch FROM replay_lag)) FROM pg_stat_replication), 0)::float8, \
             (SELECT count(*) FROM pg_locks WHERE NOT granted)",
            &[],
        )
        .await?;
    let (lag, waiters): (f64, i64) = (r.get(0), r.get(1));
    if lag > limits.replica_lag.as_secs_f64() {
        return Ok(Some(format!(
            "replica replay lag {lag:.1} s (limit {} s)",
            limits.replica_lag.as_secs_f64()
        )));
    }
    if waiters > limits.lock_waiters {
        return Ok(Some(format!(
            "{waiters} sessions wait on locks (limit {})",
            limits.lock_waiters
        )));
    }
    Ok(None)
}

/// One probe, then (every few probes) the server-wide checks.
async fn check(
    source: &Client,
    probe: &str,
    window: &mut Vec<Duration>,
    base: Duration,
    limits: &ThrottleSpec,
    server_check: bool,
    last_server: &mut Option<String>,
) -> Result<Option<String>, tokio_postgres::Error> {
    let t0 = Instant::now();
    source.query(probe, &[]).await?;
    if window.len() == WINDOW {
        window.remove(0);
    }
    window.push(t0.elapsed());
    if server_check {
        *last_server = check_server(source, limits).await?;
    }
    Ok(judge(window, base, limits).or_else(|| last_server.clone()))
}

/// The probe's baseline on a fresh start, on a new session if ours died under us.
async fn first_baseline(
    spec: &Spec,
    source: &mut Client,
    probe: &str,
) -> Result<Duration, CoordinatorError> {
    let mut tries = 0;
    loop {
        match baseline(source, probe).await {
            Ok(b) => return Ok(b),
            Err(e) if session_lost(source, &e) && tries < 3 => {
                tries += 1;
                tracing::warn!("throttle probe session lost; reconnecting");
                *source = reconnect(spec).await?;
            }
            Err(e) => return Err(CoordinatorError::db("measuring the probe's baseline", &e)),
        }
    }
}

/// Probes every `every` until shutdown; records each change of state in the control schema.
/// A fleet member's `shared` gate gives it its source server's baseline.
pub async fn watch_source(
    spec: Spec,
    plan: Arc<RunPlan>,
    mut source: Client,
    target: Client,
    state: Arc<Throttle>,
    shared: Option<schemashift_common::fleet::MemberGate>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), CoordinatorError> {
    let limits = spec.throttle.clone();
    if !limits.enabled {
        return Ok(());
    }
    let probe = match plan.tables.first() {
        Some(t) => format!("SELECT 1 FROM ONLY {} LIMIT 1", t.source),
        None => "SELECT 1".to_owned(),
    };
    let sql = ControlSql::new(&plan.control_schema);
    let save = format!(
        "INSERT INTO {} (id, throttled, reason, since) VALUES (1, $1, $2, now()) \
         ON CONFLICT (id) DO UPDATE SET throttled = EXCLUDED.throttled, reason = EXCLUDED.reason, \
         since = EXCLUDED.since, seconds = {t}.seconds + CASE WHEN {t}.throttled \
           THEN extract(epoch FROM now() - {t}.since) ELSE 0 END, \
         episodes = {t}.episodes + CASE WHEN EXCLUDED.throttled THEN 1 ELSE 0 END",
        sql.table("throttle"),
        t = sql.table("throttle"),
    );
    let mut base = match &shared {
        Some(gate) => {
            let mut cell = gate.probe_baseline().await;
            match *cell {
                Some(b) => b,
                None => *cell.insert(first_baseline(&spec, &mut source, &probe).await?),
            }
        }
        None => first_baseline(&spec, &mut source, &probe).await?,
    };
    let noted = format!(
        "INSERT INTO {} (id, throttled, since, baseline_ms) VALUES (1, false, now(), $1) \
         ON CONFLICT (id) DO UPDATE SET baseline_ms = EXCLUDED.baseline_ms",
        sql.table("throttle")
    );
    if let Err(e) = target.execute(&noted, &[&(base.as_secs_f64() * 1e3)]).await {
        tracing::debug!(error = %schemashift_common::pg::describe(&e), "throttle baseline not saved");
    }
    tracing::info!(
        baseline_ms = base.as_secs_f64() * 1e3,
        "throttle probe baseline measured"
    );
    let mut host =
        if limits.max_host_cpu < 1.0 && schemashift_common::pg::backend_is_local(&source).await {
            // Slow start: one copy, more while the host has room.
            state.allowed.store(1, Ordering::Relaxed);
            tracing::info!(
                max_host_cpu = limits.max_host_cpu,
                "the source runs on this host: copies at once follow its CPU"
            );
            Some(Host::new())
        } else {
            None
        };
    let (mut window, mut last_server) = (Vec::with_capacity(WINDOW), None);
    let mut last: Option<Option<String>> = None;
    let mut held_since_sample = false;
    let mut holds = Holds::default();
    let mut others = Others::default();
    // Our share of the host's CPU at the last reading (None: not known).
    let mut ours_share: Option<f64> = None;
    // Since when the host's CPU is saturated, and whether our sessions left the idle class.
    let (mut saturated_since, mut idle_lifted): (Option<Instant>, bool) = (None, false);
    // Set when the host turned out saturated by others: measure the baseline again too.
    let mut rebaseline_now = false;
    let mut rebaseline_why: Option<String> = None;
    let rebaselined = format!(
        "UPDATE {} SET rebaselines = rebaselines + 1, rebaseline_reason = $1, baseline_ms = $2",
        sql.table("throttle")
    );
    for n in 0u64.. {
        if n % 5 == 4 {
            if let Some(reading) = host.as_mut().and_then(Host::sample) {
                let busy = reading.busy;
                ours_share = reading.ours;
                // Saturated, and our work a small part of it: holding cannot help, so the
                // baseline is measured again now rather than after the probe-only rule's
                // long watch.
                if others.busy_with_others(reading) {
                    others.reset();
                    rebaseline_now = true;
                    rebaseline_why = Some(format!(
                        "the host's CPU stayed {:.0}% busy for {} s with our own work using \
                         {:.0}% of it: the source is slower for reasons not ours",
                        busy * 100.0,
                        host::OTHERS_AFTER.as_secs(),
                        reading.ours.unwrap_or(0.0) * 100.0
                    ));
                }
                let was = state.allowed();
                let next = next_allowed(
                    was,
                    state.copies(),
                    busy,
                    limits.max_host_cpu,
                    held_since_sample,
                );
                held_since_sample = false;
                // Saturated by others: the idle class would give our copies nothing (any
                // normal task preempts them), so they take a normal task's share instead,
                // one copy at a time under the rule above.
                saturated_since = if busy >= SATURATED {
                    saturated_since.or(Some(Instant::now()))
                } else {
                    None
                };
                if !idle_lifted && saturated_since.is_some_and(|t| t.elapsed() >= STARVE_AFTER) {
                    idle_lifted = schemashift_common::idle_group::set_idle(false);
                    if idle_lifted {
                        tracing::warn!("bulk sessions leave the idle cpu class");
                        rebaseline_now = true;
                        rebaseline_why.get_or_insert(format!(
                            "the host's CPU stayed saturated ({:.0}% busy) for {} s by work not \
                             ours: bulk sessions left the idle CPU class, which would give them \
                             nothing",
                            busy * 100.0,
                            STARVE_AFTER.as_secs()
                        ));
                    }
                }
                if next != was {
                    state.allowed.store(next, Ordering::Relaxed);
                    tracing::info!(
                        allowed = next,
                        host_cpu = format!("{:.0}%", busy * 100.0),
                        "copies allowed at once changed"
                    );
                }
            }
        }
        let checked = check(
            &source,
            &probe,
            &mut window,
            base,
            &limits,
            n % 5 == 0,
            &mut last_server,
        )
        .await;
        let verdict = match checked {
            Ok(v) => v,
            // Our own session died (killed, or the connection dropped): a new one, not a
            // hold that nothing would ever release. A source that refuses it fails the run.
            Err(e) if session_lost(&source, &e) => {
                tracing::warn!(error = %schemashift_common::pg::describe(&e), "throttle probe session lost; reconnecting");
                source = reconnect(&spec).await?;
                continue;
            }
            // A probe that fails is a source in trouble too.
            Err(e) => Some(format!(
                "probe failed: {}",
                schemashift_common::pg::describe(&e)
            )),
        };
        // Held by the comparison with the baseline alone (absolute limits are not relative
        // and keep holding as long as they are exceeded).
        // A hold while our own work is a good part of the host's CPU (copies finishing their
        // batch, index builds) is ours: it does not count toward "not ours".
        let relative = verdict.is_some()
            && last_server.is_none()
            && p90(&window) <= limits.probe_latency
            && ours_share.is_none_or(|o| o < 2.0 * OURS_SMALL);
        let starving = holds.starving(relative);
        if starving || std::mem::take(&mut rebaseline_now) {
            let why = match rebaseline_why.take() {
                Some(why) if !starving => why,
                _ => format!(
                    "the probe stayed over its limit for {:.0}% of {} s with copies held: the \
                     source is slower for reasons not ours",
                    STARVE_SHARE * 100.0,
                    STARVE_AFTER.as_secs()
                ),
            };
            holds.reset();
            let was = base;
            // The latency that holding could not bring down is the new normal, or what a
            // fresh measurement says if that is higher.
            let held_at = p90(&window);
            match baseline(&source, &probe).await {
                Ok(b) => base = b.max(was).max(held_at),
                Err(e) => {
                    tracing::warn!(error = %schemashift_common::pg::describe(&e), "probe baseline not measured again")
                }
            }
            let reason = format!(
                "{why}; baseline measured again ({:.2} ms, was {:.2} ms), going on with one copy",
                base.as_secs_f64() * 1e3,
                was.as_secs_f64() * 1e3
            );
            tracing::warn!(reason = %reason, "throttle baseline re-taken");
            // One copy at a time from here, at a normal share of the CPU: yielding did not
            // help whatever slows the source, and the idle class would starve the copy.
            state.allowed.store(1, Ordering::Relaxed);
            idle_lifted |= schemashift_common::idle_group::set_idle(false);
            window.clear();
            let ms = base.as_secs_f64() * 1e3;
            if let Err(e) = target.execute(&rebaselined, &[&reason, &ms]).await {
                tracing::debug!(error = %schemashift_common::pg::describe(&e), "throttle state not saved");
            }
            continue;
        }
        state.on.store(verdict.is_some(), Ordering::Relaxed);
        held_since_sample |= verdict.is_some();
        let changed = last
            .as_ref()
            .is_none_or(|l| l.is_some() != verdict.is_some());
        if changed {
            match &verdict {
                Some(why) => {
                    tracing::warn!(reason = %why, "throttling: no new shards until the source recovers")
                }
                None if last.is_some() => tracing::info!("throttle released"),
                None => {}
            }
            if let Err(e) = target.execute(&save, &[&verdict.is_some(), &verdict]).await {
                tracing::debug!(error = %schemashift_common::pg::describe(&e), "throttle state not saved");
            }
            if let Some(why) = &verdict {
                crate::history::record(
                    &target,
                    &sql,
                    "throttle",
                    serde_json::json!({ "reason": why }),
                    crate::history::By::Run,
                )
                .await;
            }
        }
        last = Some(verdict);
        tokio::select! {
            _ = tokio::time::sleep(PROBE_EVERY) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
    Ok(())
}

/// Whether the probe failed because its own session ended (closed, or terminated by an
/// administrator) rather than because the source is slow.
fn session_lost(source: &Client, e: &tokio_postgres::Error) -> bool {
    source.is_closed()
        || e.is_closed()
        || e.code() == Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN)
}

/// A new probe session, through the one retry policy.
async fn reconnect(spec: &Spec) -> Result<Client, CoordinatorError> {
    schemashift_common::retry::retry(
        "reopening the throttle probe session",
        schemashift_common::retry::Backoff::Database,
        || schemashift_common::pg::connect(&spec.source, "source"),
    )
    .await
    .map_err(|e| {
        CoordinatorError::State(format!(
            "the probe session to the source closed and could not be opened again: {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[f64]) -> Vec<Duration> {
        v.iter().map(|m| Duration::from_secs_f64(m / 1e3)).collect()
    }

    #[test]
    fn probe_within_its_allowance_does_not_throttle() {
        let limits = ThrottleSpec::default();
        let base = Duration::from_micros(400);
        // p90 of ten is the second largest: one outlier is ignored.
        let window = ms(&[0.40, 0.41, 0.39, 0.42, 0.40, 0.43, 0.40, 0.41, 0.42, 5.0]);
        assert_eq!(judge(&window, base, &limits), None);
    }

    #[test]
    fn probe_slower_than_its_baseline_throttles_and_says_why() {
        let limits = ThrottleSpec::default();
        let base = Duration::from_micros(400);
        let window = ms(&[0.9, 1.1, 0.8, 1.2, 0.9, 1.0, 1.3, 0.9, 1.0, 1.1]);
        let why = judge(&window, base, &limits).expect("throttled");
        assert!(why.contains("slower than before the run"), "{why}");
    }

    #[test]
    fn tiny_baselines_get_the_minimum_slack() {
        let limits = ThrottleSpec::default();
        let base = Duration::from_micros(100);
        // +50% but only 50 µs: noise, not load.
        assert_eq!(judge(&ms(&[0.15; 10]), base, &limits), None);
        assert!(judge(&ms(&[0.25; 10]), base, &limits).is_some());
    }

    #[test]
    fn copies_beyond_the_allowance_hold_and_the_lowest_ids_go_on() {
        let t = Throttle::new(false);
        let ttl = Duration::from_secs(30);
        t.allowed.store(1, Ordering::Relaxed);
        assert!(t.may_start(ttl));
        let e = LeaseEpoch(1);
        assert!(t.copying(ShardId(7), e, ttl));
        assert!(!t.may_start(ttl), "one runs, one is allowed");
        assert!(!t.copying(ShardId(9), e, ttl), "the second copy holds");
        assert!(t.copying(ShardId(7), e, ttl));
        t.finished(ShardId(7), e);
        assert!(
            t.copying(ShardId(9), e, ttl),
            "it goes on once the first is done"
        );
        // A copy whose worker went silent stops counting.
        assert!(t.may_start(Duration::ZERO));
    }

    #[test]
    fn a_late_report_of_an_older_lease_keeps_the_new_holders_place() {
        let t = Throttle::new(false);
        let ttl = Duration::from_secs(30);
        t.allowed.store(1, Ordering::Relaxed);
        assert!(t.copying(ShardId(7), LeaseEpoch(1), ttl));
        // Re-leased at epoch 2; the old holder then reports done, failed, or beats.
        assert!(t.copying(ShardId(7), LeaseEpoch(2), ttl));
        t.finished(ShardId(7), LeaseEpoch(1));
        assert!(
            !t.copying(ShardId(7), LeaseEpoch(1), ttl),
            "the old lease copies no more"
        );
        assert!(!t.may_start(ttl), "the new holder still counts");
        t.finished(ShardId(7), LeaseEpoch(2));
        assert!(t.may_start(ttl));
    }

    #[test]
    fn holds_that_flicker_for_most_of_the_window_count_as_starving() {
        let mut h = Holds::default();
        // Not before the window was watched in full, however it held.
        assert!(!h.starving(true));
        h.since = Some(Instant::now() - STARVE_AFTER);
        let held: Vec<bool> = (0..100).map(|i| i % 4 != 0).collect();
        let verdicts: Vec<bool> = held.iter().map(|b| h.starving(*b)).collect();
        assert!(verdicts.last().copied().unwrap_or(false), "75% held");
        let mut quiet = Holds {
            since: Some(Instant::now() - STARVE_AFTER),
            ..Holds::default()
        };
        for i in 0..100 {
            assert!(
                !quiet.starving(i % 2 == 1),
                "half held is a working throttle"
            );
        }
    }

    #[test]
    fn absolute_limit_applies_whatever_the_baseline() {
        let limits = ThrottleSpec {
            probe_increase: 100.0,
            ..ThrottleSpec::default()
        };
        let base = Duration::from_millis(40);
        let why = judge(&ms(&[60.0; 10]), base, &limits).expect("throttled");
        assert!(why.contains("limit 50 ms"), "{why}");
    }
}
