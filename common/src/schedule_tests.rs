use super::*;
use proptest::prelude::*;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

/// A fleet to simulate: each member's servers and its shards' sizes (in rows; a row takes
/// one unit of time to copy).
#[derive(Debug, Clone)]
struct SimFleet {
    servers: usize,
    pool: usize,
    per_host: Option<usize>,
    members: Vec<(usize, usize, Vec<u64>)>,
}

/// Cuts `rows` the way the planner does: about `shard_rows` rows a shard.
fn shards(rows: u64, shard_rows: u64) -> Vec<u64> {
    let n = rows.div_ceil(shard_rows).max(1);
    let mut out = vec![rows / n; n as usize];
    for s in out.iter_mut().take((rows % n) as usize) {
        *s += 1;
    }
    out
}

/// Random fleets cut the way the planner cuts them by default: about `rows / (workers · 8)`
/// rows a shard, at least 10,000 and at most 250,000 (`workers` being the fleet's pool).
fn fleet_strategy(
    members: std::ops::RangeInclusive<usize>,
    max_servers: usize,
) -> impl Strategy<Value = SimFleet> {
    (
        1..=max_servers,
        1..=64usize,
        prop_oneof![Just(None), (1..=4usize).prop_map(Some)],
    )
        .prop_flat_map(move |(servers, pool, per_host)| {
            let member =
                (0..servers, 0..servers, 1_000..=200_000u64).prop_map(move |(s, t, rows)| {
                    let shard_rows = (rows / (pool as u64 * 8)).clamp(10_000, 250_000);
                    (s, t, shards(rows, shard_rows))
                });
            (
                Just(servers),
                Just(pool),
                Just(per_host),
                prop::collection::vec(member, members.clone()),
            )
        })
        .prop_map(|(servers, pool, per_host, members)| SimFleet {
            servers,
            pool,
            per_host,
            members,
        })
}

/// The least time any schedule needs. A resource with `n` slots (the pool, or a server
/// under `per_host`) runs its shards as if on `n` machines (at most `n` overlap, so they
/// can be laid on `n` lanes), so it needs at least its work per slot, and for every `k` at
/// least the `k + 1` shortest of its `k·n + 1` longest shards back to back (one lane gets
/// `k + 1` of them).
fn lower_bound(f: &SimFleet) -> u64 {
    let lanes = |mut sizes: Vec<u64>, n: usize| -> u64 {
        let total: u64 = sizes.iter().sum();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let mut best = total.div_ceil(n as u64);
        let mut k = 0;
        while k * n < sizes.len() {
            let top = k * n + 1;
            best = best.max(sizes[top - k - 1..top].iter().sum());
            k += 1;
        }
        best
    };
    let all: Vec<u64> = f.members.iter().flat_map(|m| m.2.clone()).collect();
    let mut best = lanes(all, f.pool);
    if let Some(n) = f.per_host {
        let mut on: Vec<Vec<u64>> = vec![Vec::new(); f.servers];
        for (s, t, sizes) in &f.members {
            on[*s].extend(sizes);
            if t != s {
                on[*t].extend(sizes);
            }
        }
        for sizes in on {
            best = best.max(lanes(sizes, n));
        }
        best = best.max(odd_sets(f, n));
    }
    best
}

/// Copies between two servers of a set `U` of servers with `n` slots each: at most
/// `⌊n·|U| / 2⌋` run at once (each takes two of the set's slots), which binds when `n·|U|`
/// is odd (three servers at one slot each run one such copy at a time, not one and a half).
/// Every set of the servers such copies touch is tried when they are at most 12; else the
/// triangles (the sets that bind in sparse fleets).
fn odd_sets(f: &SimFleet, n: usize) -> u64 {
    let mut between: BTreeMap<(usize, usize), u64> = BTreeMap::new();
    for (s, t, sizes) in f.members.iter().filter(|(s, t, _)| s != t) {
        *between.entry((*s.min(t), *s.max(t))).or_default() += sizes.iter().sum::<u64>();
    }
    let used: BTreeSet<usize> = between.keys().flat_map(|(a, b)| [*a, *b]).collect();
    let per = |size: usize| (n * size / 2) as u64;
    let mut best = 0;
    if used.len() <= 12 {
        let used: Vec<usize> = used.into_iter().collect();
        for set in 0u32..(1 << used.len()) {
            let size = set.count_ones() as usize;
            if size < 3 || (n * size).is_multiple_of(2) {
                continue;
            }
            let has = |s: &usize| {
                used.iter()
                    .position(|u| u == s)
                    .is_some_and(|i| set & (1 << i) != 0)
            };
            let inside: u64 = between
                .iter()
                .filter(|((a, b), _)| has(a) && has(b))
                .map(|(_, w)| w)
                .sum();
            best = best.max(inside.div_ceil(per(size)));
        }
    } else if !n.is_multiple_of(2) {
        let w = |a: usize, b: usize| between.get(&(a.min(b), a.max(b))).copied();
        for &(a, b) in between.keys() {
            for &c in used.range(b + 1..) {
                if let (Some(ac), Some(bc)) = (w(a, c), w(b, c)) {
                    best = best.max((between[&(a, b)] + ac + bc).div_ceil(per(3)));
                }
            }
        }
    }
    best
}

struct Outcome {
    makespan: u64,
    first_start: Vec<u64>,
    /// Copies started by workers beyond their member's share.
    spares_started: usize,
}

/// Runs the fleet through the board: a member asks for one more copy whenever it has a
/// shard not yet started; at every moment the simulation checks the limits itself and that
/// no waiting shard would have fitted (no idle slot while work waits).
fn simulate(f: &SimFleet) -> Outcome {
    let limits = Limits {
        pool: f.pool,
        per_host: f.per_host,
    };
    let mut board = Board::new(limits);
    let name = |i: usize| format!("server{i}:5432");
    let slots: Vec<Slot> = f
        .members
        .iter()
        .map(|(s, t, sizes)| board.add_member(&name(*s), &name(*t), sizes.iter().sum()))
        .collect();
    // Each member runs the pool's number of workers: its first `caps[m]` ask for copies,
    // the others as spares. Idle workers of one member and kind ask alike, so one waiting
    // entry per member stands for them: a copy while a first worker is idle, else a spare.
    let rows: Vec<u64> = f.members.iter().map(|m| m.2.iter().sum()).collect();
    let caps = member_workers(&rows, f.pool);
    let (mut first_busy, mut spare_busy) =
        (vec![0usize; f.members.len()], vec![0usize; f.members.len()]);
    let mut next_shard = vec![0usize; f.members.len()];
    let ask = |m: usize, next: usize, first: usize, spare: usize| -> Option<Kind> {
        if next >= f.members[m].2.len() {
            None
        } else if first < caps[m] {
            Some(Kind::Copy)
        } else if spare < f.pool - caps[m] {
            Some(Kind::Spare)
        } else {
            None
        }
    };
    let mut first_start = vec![u64::MAX; f.members.len()];
    let mut waiting: Vec<(Slot, Kind)> = slots.iter().map(|&m| (m, Kind::Copy)).collect();
    // (end time, member, shard size, by a spare)
    let mut running: BinaryHeap<Reverse<(u64, usize, u64, bool)>> = BinaryHeap::new();
    let mut pool_busy = 0usize;
    let mut host_busy = vec![0usize; f.servers];
    let mut now = 0u64;
    let servers: Vec<Vec<usize>> = f
        .members
        .iter()
        .map(|(s, t, _)| if s == t { vec![*s] } else { vec![*s, *t] })
        .collect();
    let touched = |m: usize| servers[m].iter().copied();
    let fits_by_hand = |m: usize, pool_busy: usize, host_busy: &[usize]| {
        pool_busy < f.pool
            && f.per_host
                .is_none_or(|n| touched(m).all(|h| host_busy[h] < n))
    };
    let mut spares_started = 0usize;
    loop {
        while let Some(i) = board.pick(&waiting) {
            let (slot, kind) = waiting.remove(i);
            let m = slot.0;
            assert!(
                fits_by_hand(m, pool_busy, &host_busy),
                "picked work that does not fit"
            );
            board.start(slot, kind);
            pool_busy += 1;
            for h in touched(m) {
                host_busy[h] += 1;
            }
            let size = f.members[m].2[next_shard[m]];
            next_shard[m] += 1;
            first_start[m] = first_start[m].min(now);
            let spare = kind == Kind::Spare;
            if spare {
                spare_busy[m] += 1;
                spares_started += 1;
            } else {
                first_busy[m] += 1;
            }
            running.push(Reverse((now + size, m, size, spare)));
            if let Some(k) = ask(m, next_shard[m], first_busy[m], spare_busy[m]) {
                waiting.push((slot, k));
            }
        }
        // Nothing fits when the pool is full; else every waiting copy must be blocked.
        for (slot, _) in waiting.iter().filter(|_| pool_busy < f.pool) {
            assert!(
                !fits_by_hand(slot.0, pool_busy, &host_busy),
                "member {} waits while a slot for it is free",
                slot.0
            );
        }
        let Some(Reverse((end, m, size, spare))) = running.pop() else {
            break;
        };
        now = end;
        let kind = if spare { Kind::Spare } else { Kind::Copy };
        board.finish(slots[m], kind, size);
        if spare {
            spare_busy[m] -= 1;
        } else {
            first_busy[m] -= 1;
        }
        // The worker that finished asks again: the member's entry may change kind.
        waiting.retain(|(s, _)| s.0 != m);
        if let Some(k) = ask(m, next_shard[m], first_busy[m], spare_busy[m]) {
            waiting.push((slots[m], k));
        }
        pool_busy -= 1;
        for h in touched(m) {
            host_busy[h] -= 1;
        }
    }
    assert!(waiting.is_empty(), "work left waiting at the end");
    Outcome {
        makespan: now,
        first_start,
        spares_started,
    }
}

/// Every member starts and finishes, and the fleet ends within 10% of the least time any
/// schedule needs — or, where the fleet is only a few shards per slot (where no schedule can
/// lay whole shards evenly and the bound is loose), within one shard of it.
fn check(f: &SimFleet) -> Result<(), TestCaseError> {
    let out = simulate(f);
    let bound = lower_bound(f);
    let longest = f
        .members
        .iter()
        .flat_map(|m| m.2.iter())
        .max()
        .copied()
        .unwrap_or(0);
    prop_assert!(
        out.first_start.iter().all(|&t| t != u64::MAX),
        "a member never started"
    );
    prop_assert!(
        out.makespan as f64 <= (bound as f64 * 1.10).max((bound + longest) as f64),
        "makespan {} against at least {} needed (longest shard {}) for {} members",
        out.makespan,
        bound,
        longest,
        f.members.len()
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, rng_seed: proptest::test_runner::RngSeed::Fixed(20261205), ..ProptestConfig::default() })]

    #[test]
    fn small_fleets_keep_the_limits_and_finish_within_10_percent_of_the_best(
        f in fleet_strategy(1..=200, 30)
    ) {
        check(&f)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2, rng_seed: proptest::test_runner::RngSeed::Fixed(20261205), ..ProptestConfig::default() })]

    #[test]
    fn fleets_of_10000_members_on_500_servers_keep_the_limits_and_finish_within_10_percent(
        f in fleet_strategy(9_000..=10_000, 500)
    ) {
        check(&f)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, rng_seed: proptest::test_runner::RngSeed::Fixed(20261205), ..ProptestConfig::default() })]

    #[test]
    fn each_member_gets_twice_its_share_of_the_pool_and_never_outlasts_half_the_fleets_work_per_worker(
        rows in prop::collection::vec(0..=50_000_000u64, 1..=300),
        pool in 1..=256usize,
    ) {
        let w = member_workers(&rows, pool);
        let total: u64 = rows.iter().sum();
        prop_assert_eq!(w.len(), rows.len());
        for (&r, &n) in rows.iter().zip(&w) {
            prop_assert!((1..=pool).contains(&n));
            // r / n <= total / (2 · pool), in integers, unless it has the whole pool.
            prop_assert!(
                n == pool || u128::from(r) * 2 * pool as u128 <= u128::from(total) * n as u128
            );
        }
    }
}

/// The bench's fleet: 8 members of 125,000 rows, a pool of 4. Each member's one first
/// worker keeps the pool full, so the other three never open sessions, and the fleet takes
/// no longer than the pool needs.
#[test]
fn equal_members_keep_the_pool_full_with_their_first_workers_alone() {
    let f = SimFleet {
        servers: 2,
        pool: 4,
        per_host: None,
        members: (0..8).map(|_| (0, 1, shards(125_000, 10_000))).collect(),
    };
    let out = simulate(&f);
    assert_eq!(out.spares_started, 0);
    assert_eq!(out.makespan, lower_bound(&f));
}

/// A spare (a worker beyond its member's share) waits while another member's first
/// worker wants the slot, even a smaller member's; with nobody else asking it takes the
/// free slot, so a member left alone at the end still fills the pool.
#[test]
fn a_spare_copies_only_when_no_first_worker_wants_the_slot() {
    let mut b = Board::new(Limits {
        pool: 2,
        per_host: None,
    });
    let big = b.add_member("s:1", "t:1", 100);
    let small = b.add_member("s:1", "t:1", 10);
    assert_eq!(b.pick(&[(big, Kind::Spare), (small, Kind::Copy)]), Some(1));
    b.start(small, Kind::Copy);
    assert_eq!(b.pick(&[(big, Kind::Spare)]), Some(0));
    b.start(big, Kind::Spare);
    // The pool is full: nothing more.
    assert_eq!(b.pick(&[(big, Kind::Spare), (small, Kind::Copy)]), None);
    b.finish(big, Kind::Spare, 10);
    assert_eq!(b.busy().0, 1);
}

#[test]
fn a_fleet_of_equal_members_gives_each_its_part_of_the_pool() {
    assert_eq!(member_workers(&[125_000; 8], 4), vec![1; 8]);
    assert_eq!(member_workers(&[125_000; 8], 16), vec![4; 8]);
    assert_eq!(member_workers(&[900, 100], 4), vec![4, 1]);
    assert_eq!(member_workers(&[0, 0], 4), vec![1, 1]);
    assert_eq!(member_workers(&[1_000; 2], 16), vec![16, 16]);
}

#[test]
fn a_build_goes_first_then_the_busiest_servers_then_the_biggest_member() {
    let mut b = Board::new(Limits {
        pool: 1,
        per_host: Some(1),
    });
    // Servers a and t have two members' work (30 + 30 each); b and u one bigger member's.
    let m0 = b.add_member("a:1", "t:1", 30);
    let m1 = b.add_member("a:1", "t:1", 30);
    let m2 = b.add_member("b:1", "u:1", 50);
    assert_eq!(b.pick(&[(m2, Kind::Copy), (m0, Kind::Copy)]), Some(1));
    assert_eq!(
        b.pick(&[(m2, Kind::Copy), (m0, Kind::Copy), (m2, Kind::Build)]),
        Some(2)
    );
    b.start(m0, Kind::Copy);
    // The pool is full: no copy fits, a build on a free target does.
    assert_eq!(b.pick(&[(m2, Kind::Copy)]), None);
    assert_eq!(b.pick(&[(m2, Kind::Copy), (m2, Kind::Build)]), Some(1));
    b.finish(m0, Kind::Copy, 30);
    assert_eq!(b.busy().0, 0);
    // a and t have 30 left now, b and u 50: b's member goes first.
    assert_eq!(b.pick(&[(m1, Kind::Copy), (m2, Kind::Copy)]), Some(1));
}
