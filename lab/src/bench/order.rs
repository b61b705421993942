//! Which rows a bench run measures, and in which order.

use super::{changes, cpu, fleet, ours, parallelisms, peers, Bench, Collected, Only};

/// Every row `only` asks for; returns this process's peak memory after schemashift's
/// backfills, when they ran. The fleet's pair copies the scenario's source table, which
/// the change rows write to: they come last.
pub(super) async fn measure_all(
    b: &Bench,
    c: &mut Collected,
    only: Option<Only>,
    changes: &[u64],
) -> Option<f64> {
    let (with_peers, with_ours) = (
        matches!(only, None | Some(Only::Peers)),
        matches!(only, None | Some(Only::Ours)),
    );
    copies(b, c, with_peers, with_ours).await;
    let peak_rss_mib = with_ours.then(cpu::peak_rss_mib).flatten();
    if only == Some(Only::LikeForLike) {
        for _ in 0..3 {
            peers::run_pgcopydb(b, c).await;
            ours::like_for_like(b, c).await;
        }
    }
    if only == Some(Only::OneWorker) {
        for _ in 0..2 {
            peers::run_raw_rebuilt(b, c, 1).await;
            ours::one_worker(b, c).await;
        }
    }
    if matches!(only, None | Some(Only::Fleet)) {
        fleet::run_all(b, c).await;
    }
    if matches!(only, None | Some(Only::Ours | Only::Changes)) {
        changes::run_changes(b, c, changes).await;
    }
    peak_rss_mib
}

/// The copy rows, each peer's row beside schemashift's of the same kind (the raw pipe then
/// schemashift at each parallelism, the two-index rows, TLS, fdw), so that the machine's
/// speed drifting during a run moves both sides of a ratio alike.
async fn copies(b: &Bench, c: &mut Collected, with_peers: bool, with_ours: bool) {
    for k in parallelisms(b.workers) {
        if with_peers {
            peers::raw_at(b, c, k).await;
        }
        if with_ours {
            ours::backfill_at(b, c, k).await;
        }
    }
    if with_peers {
        peers::two_indexes(b, c).await;
    }
    if with_ours {
        ours::excluded(b, c).await;
    }
    if b.tls_ready {
        if with_peers {
            peers::raw_tls(b, c).await;
        }
        if with_ours {
            ours::tls(b, c).await;
        }
    }
    if with_peers {
        peers::run_fdw(b, c).await;
    }
    if with_ours {
        ours::fdw(b, c).await;
    }
    if with_peers {
        peers::run_logical(b, c).await;
    }
}
