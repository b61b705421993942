//! Fleets against real clusters: eight members on three clusters under write load, one
//! worker pool, one copy or index build per server at a time, a drifted member skipped with
//! nothing written and completed after its fix, cutover in waves.

use schemashift_lab::cluster::{Cluster, ClusterOptions};
use schemashift_lab::load::{start_load, LoadOptions};
use schemashift_lab::scenario::{load_users, users_spec_yaml, SOURCE_DDL, TARGET_DDL};
use schemashift_tests::fleet::{
    four_members, fresh_db, members, sample, shards_done, shared_part, write_fleet,
};
use schemashift_tests::{
    connect, has_control_schema, schemashift, slot_and_publication_count, table_diff, Proc,
    TestEnv, TEST_HBA,
};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_of_eight_on_three_clusters_cuts_over_in_waves_with_one_copy_per_server(
) -> anyhow::Result<()> {
    let third = Cluster::start(ClusterOptions {
        hba: Some(TEST_HBA.to_string()),
        ..ClusterOptions::default()
    })
    .await?;
    let c_base = format!("postgres://postgres@127.0.0.1:{}", third.port());
    // (source on the shared source cluster A or on C, target on the shared B or on C, rows)
    let shapes: [(bool, bool, u64); 8] = [
        (false, false, 1_000),
        (true, false, 2_000),
        (false, true, 5_000),
        (true, true, 10_000),
        (false, false, 20_000),
        (true, false, 40_000),
        (false, true, 80_000),
        (false, false, 200_000),
    ];
    let mut envs = Vec::new();
    let mut pairs = Vec::new();
    for (i, (src_on_c, tgt_on_c, rows)) in shapes.iter().enumerate() {
        let env = TestEnv::new(&format!("fleet_m{i}")).await?;
        let source = if *src_on_c {
            fresh_db(&c_base, &format!("{}_c", env.source_db))
                .await?
                .dsn
        } else {
            env.source_dsn.clone()
        };
        let target = if *tgt_on_c {
            fresh_db(&c_base, &format!("{}_c", env.target_db))
                .await?
                .dsn
        } else {
            env.target_dsn.clone()
        };
        let s = connect(&source).await?;
        s.batch_execute(SOURCE_DDL).await?;
        load_users(&s, *rows).await?;
        connect(&target).await?.batch_execute(TARGET_DDL).await?;
        pairs.push((format!("m{i}"), source, target));
        envs.push(env);
    }
    // A ninth member whose target drifted: no last_name.
    let drift = TestEnv::new("fleet_drift").await?;
    let s = connect(&drift.source_dsn).await?;
    s.batch_execute(SOURCE_DDL).await?;
    load_users(&s, 3_000).await?;
    let drift_target = connect(&drift.target_dsn).await?;
    drift_target
        .batch_execute(&format!(
            "{TARGET_DDL}; ALTER TABLE users DROP COLUMN last_name"
        ))
        .await?;
    pairs.push((
        "drifted".into(),
        drift.source_dsn.clone(),
        drift.target_dsn.clone(),
    ));

    let dir = tempfile::tempdir()?;
    let switched = dir.path().join("switched.txt");
    let mut yaml = String::from("members:\n");
    for (name, s, t) in &pairs {
        yaml.push_str(&format!(
            "  - name: {name}\n    source: '{s}'\n    target: '{t}'\n"
        ));
    }
    yaml.push_str("limits:\n  per_host: 1\nthrottle:\n  enabled: false\n");
    yaml.push_str(&format!(
        "cutover:\n  switch_command: 'echo $SCHEMASHIFT_MEMBER >> {}'\n",
        switched.display()
    ));
    yaml.push_str(
        &shared_part(20_000).replace("    key: id\n", "    key: id\n    strategy: copy\n"),
    );
    let spec = dir.path().join("fleet.yaml");
    std::fs::write(&spec, &yaml)?;
    let spec = spec.to_string_lossy().into_owned();

    // plan flags the member that does not look like the others.
    let out = schemashift(&["plan", &spec])?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    let flagged: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("its tables differ from most members'"))
        .collect();
    assert_eq!(flagged.len(), 1, "{err}");
    assert!(
        flagged[0].starts_with("member drifted:") && flagged[0].contains("target public.users"),
        "{err}"
    );

    // --strict: the drifted member refuses the whole fleet, nothing written anywhere.
    let out = schemashift(&["run", &spec, "--strict"])?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("member drifted: SKIPPED"), "{err}");
    for (_, s, t) in &pairs {
        assert!(!has_control_schema(t).await?, "nothing written to {t}");
        assert_eq!(slot_and_publication_count(s).await?.0, 0);
    }

    let mut loads = Vec::new();
    for (_, s, _) in pairs.iter().take(8) {
        loads.push(
            start_load(
                s.clone(),
                LoadOptions {
                    rate_per_sec: 40,
                    ..LoadOptions::default()
                },
            )
            .await?,
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let admins = vec![
        envs[0].source_dsn_for("postgres"),
        envs[0].target_dsn_for("postgres"),
        format!("{c_base}/postgres"),
    ];
    // This fleet's databases only: other tests share the clusters and the role.
    let mut dbs = Vec::new();
    for (_, s, t) in &pairs {
        for dsn in [s, t] {
            let cfg: tokio_postgres::Config = dsn.parse()?;
            dbs.extend(cfg.get_dbname().map(str::to_owned));
        }
    }
    let sampler = tokio::spawn(sample(admins, dbs, stop.clone()));
    let t0 = Instant::now();
    let listen = format!("127.0.0.1:{}", schemashift_tests::free_port()?);
    let mut run = Proc::spawn(
        dir.path(),
        "fleet-run",
        &["run", &spec, "--workers", "3", "--metrics-listen", &listen],
        &[],
    )?;
    // One metrics endpoint for the fleet, every metric labelled with its member.
    let body = loop {
        let text = scrape(&listen).await.unwrap_or_default();
        if text.lines().next().is_some_and(|l| l.contains(" 200 ")) {
            break text;
        }
        anyhow::ensure!(run.is_running(), "{}", run.stderr_tail());
        anyhow::ensure!(t0.elapsed() < LIMIT, "metrics never ready: {text}");
        tokio::task::yield_now().await;
    };
    for i in 0..8 {
        let line = format!("schemashift_rows_copied_total{{member=\"m{i}\"}}");
        assert!(body.contains(&line), "{line}: {body}");
    }
    assert!(
        !body.contains("member=\"drifted\""),
        "a skipped member has no metrics"
    );
    let status = run.wait(LIMIT).await?;
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let worst = sampler.await??;
    eprintln!(
        "fleet of 8 (+1 drifted) with per_host 1: {:.1} s; most of ours at once per cluster \
         (reading+builds, writing+builds): {worst:?}",
        took.as_secs_f64()
    );
    let err = run.stderr();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("member drifted: SKIPPED, nothing written"),
        "{err}"
    );
    assert!(err.contains("--members drifted"), "{err}");
    for (i, w) in worst.iter().enumerate() {
        assert!(w.0 <= 1 && w.1 <= 1, "cluster {i}: {worst:?}");
    }
    assert!(
        worst.iter().any(|w| w.0 == 1),
        "the sampler saw copies: {worst:?}"
    );
    assert!(!has_control_schema(&drift.target_dsn).await?);
    assert_eq!(slot_and_publication_count(&drift.source_dsn).await?.0, 0);

    for l in loads {
        l.stop().await;
    }
    let out = schemashift(&["cutover", &spec, "--wave", "3"])?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "the drifted one is still skipped: {err}"
    );
    let lines: Vec<String> = std::fs::read_to_string(&switched)?
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 8, "{lines:?}");
    let waves: Vec<BTreeSet<&str>> = lines
        .chunks(3)
        .map(|c| c.iter().map(String::as_str).collect())
        .collect();
    assert_eq!(
        waves,
        [
            BTreeSet::from(["m0", "m1", "m2"]),
            BTreeSet::from(["m3", "m4", "m5"]),
            BTreeSet::from(["m6", "m7"]),
        ],
        "waves in spec order"
    );

    // The fix, then the drifted member alone.
    drift_target
        .batch_execute("ALTER TABLE users ADD COLUMN last_name TEXT NOT NULL DEFAULT ''; ALTER TABLE users ALTER COLUMN last_name DROP DEFAULT")
        .await?;
    let out = schemashift(&["cutover", &spec, "--members", "drifted"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = schemashift(&["status", &spec, "--json"])?;
    let st: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(st["members"].as_array().map(Vec::len), Some(9), "{st}");
    for (name, s, t) in &pairs {
        let (s, t) = (connect(s).await?, connect(t).await?);
        assert_eq!(table_diff(&s, &t).await?, (0, 0, 0), "member {name}");
    }
    for env in envs {
        env.drop_all().await?;
    }
    drift.drop_all().await?;
    third.stop().await?;
    Ok(())
}

/// `GET /metrics` over plain HTTP/1.0: the status line and the body.
async fn scrape(addr: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    sock.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
    let mut out = String::new();
    sock.read_to_string(&mut out).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_run_killed_mid_backfill_resumes_every_member_copying_each_row_once(
) -> anyhow::Result<()> {
    let (envs, dir, spec) = four_members("fleet_kill", 1).await?;
    let mut targets = Vec::new();
    for e in &envs {
        targets.push(connect(&e.target_dsn).await?);
    }
    let mut run = Proc::spawn(
        dir.path(),
        "fleet-run",
        &["run", &spec, "--workers", "2"],
        &[],
    )?;
    // 4 members × 15 shards: kill once some, not all, have committed.
    let deadline = Instant::now() + LIMIT;
    while shards_done(&targets).await < 8 {
        anyhow::ensure!(run.is_running(), "{}", run.stderr_tail());
        anyhow::ensure!(Instant::now() < deadline, "the fleet never got going");
        tokio::task::yield_now().await;
    }
    run.kill9().await?;
    let done = shards_done(&targets).await;
    assert!(
        done < 60,
        "kill came too late to test a resume ({done} of 60 done)"
    );

    let t0 = Instant::now();
    let out = schemashift(&["run", &spec, "--workers", "2", "--json"])?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "resume failed: {err}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(doc["members"].as_array().map(Vec::len), Some(4), "{doc}");
    eprintln!(
        "fleet resumed after kill -9 with {done} shards done: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    for (e, t) in envs.iter().zip(&targets) {
        let rows: i64 = t.query_one("SELECT count(*) FROM users", &[]).await?.get(0);
        let copied: i64 = t
            .query_one("SELECT sum(rows)::bigint FROM schemashift.shards", &[])
            .await?
            .get(0);
        assert_eq!(
            (rows, copied),
            (30_000, 30_000),
            "each row copied exactly once"
        );
        let s = connect(&e.source_dsn).await?;
        assert_eq!(table_diff(&s, t).await?, (0, 0, 0));
    }
    let out = schemashift(&["cleanup", &spec])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for e in envs {
        e.drop_all().await?;
    }
    Ok(())
}

/// The per-server limit is what bounds the fleet: the same four members with one copy per
/// server, then three (numbers in the output; timings are not asserted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_per_host_lets_more_of_the_fleet_copy_at_once() -> anyhow::Result<()> {
    let mut took = Vec::new();
    for per_host in [1, 3] {
        let (envs, _dir, spec) = four_members(&format!("fleet_ph{per_host}"), per_host).await?;
        let t0 = Instant::now();
        let out = schemashift(&["run", &spec, "--workers", "3", "--until", "backfill"])?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        took.push((per_host, t0.elapsed().as_secs_f64()));
        schemashift(&["cleanup", &spec])?;
        for e in envs {
            e.drop_all().await?;
        }
    }
    eprintln!("four members of 30,000 rows to the end of the backfill, 3 workers: {took:?} (per_host, seconds)");
    Ok(())
}

/// examples/fleet: the spec loads as a fleet of four from its members file, every member's
/// servers are services of its compose file, the compose command parses with our CLI, and
/// each member plans cleanly against real databases built from the SQL the compose file
/// mounts.
#[tokio::test]
async fn fleet_example_loads_matches_its_compose_file_and_plans() -> anyhow::Result<()> {
    use clap::Parser;
    use schemashift_common::fleet::{load, server_of, Loaded};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/fleet");
    std::env::set_var("PGPASSWORD", "a p@ss/word");
    let Loaded::Fleet(f) = load(&dir.join("fleet.yaml"))? else {
        anyhow::bail!("not a fleet")
    };
    let names: Vec<&str> = f.members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        ["tenant-001", "tenant-002", "tenant-003", "tenant-004"]
    );
    assert_eq!(f.per_host, Some(2));
    let compose: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(dir.join("docker-compose.yml"))?)?;
    for m in &f.members {
        for dsn in [&m.spec.source, &m.spec.target] {
            let host = server_of(dsn);
            let service = host.trim_end_matches(":5432");
            assert!(
                !compose["services"][service].is_null(),
                "{}: {host} is not a compose service",
                m.name
            );
        }
    }
    let cmd: Vec<String> = compose["services"]["schemashift"]["command"]
        .as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    schemashift::cli::Cli::try_parse_from(std::iter::once("schemashift".to_owned()).chain(cmd))?;

    // The fleet's tables against the databases the compose file builds.
    let root = dir.join("../..");
    let env = TestEnv::with_ddl(
        "fleet_example",
        &std::fs::read_to_string(root.join("deploy/source.sql"))?,
        &std::fs::read_to_string(root.join("deploy/target.sql"))?,
    )
    .await?;
    let text = std::fs::read_to_string(dir.join("fleet.yaml"))?.replace(
        "members_file: members.yaml",
        &format!(
            "members:\n  - {{name: tenant-001, source: '{}', target: '{}'}}",
            env.source_dsn, env.target_dsn
        ),
    );
    let tmp = tempfile::tempdir()?;
    let spec = tmp.path().join("fleet.yaml");
    std::fs::write(&spec, text)?;
    let out = schemashift(&["plan", &spec.to_string_lossy()])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("fleet: 1 members"));
    env.drop_all().await
}

/// One member's source server stops mid-backfill: the other member is not held up (it gets
/// through its backfill while the server is down, though both write to one target server
/// with `per_host: 1`); the stopped member waits or fails alone, said in the output, and
/// completes once its server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_whose_source_stops_mid_backfill_does_not_hold_up_the_rest() -> anyhow::Result<()> {
    let mut down_cluster = Cluster::start(ClusterOptions {
        hba: Some(TEST_HBA.to_string()),
        ..ClusterOptions::default()
    })
    .await?;
    let c_base = format!("postgres://postgres@127.0.0.1:{}", down_cluster.port());
    let up = schemashift_tests::users_env("fleet_up", 60_000).await?;
    let down_env = TestEnv::new("fleet_down").await?;
    let down_source = fresh_db(&c_base, &format!("{}_c", down_env.source_db))
        .await?
        .dsn;
    let s = connect(&down_source).await?;
    s.batch_execute(SOURCE_DDL).await?;
    load_users(&s, 60_000).await?;
    drop(s);
    connect(&down_env.target_dsn)
        .await?
        .batch_execute(TARGET_DDL)
        .await?;
    let yaml = format!(
        "members:\n  - {{name: down, source: '{down_source}', target: '{}'}}\n  \
         - {{name: up, source: '{}', target: '{}'}}\n\
         limits:\n  per_host: 1\nthrottle:\n  enabled: false\n",
        down_env.target_dsn, up.source_dsn, up.target_dsn
    );
    let (dir, spec) = write_fleet(yaml, 2_000)?;

    let (down_t, up_t) = (
        connect(&down_env.target_dsn).await?,
        connect(&up.target_dsn).await?,
    );
    let mut run = Proc::spawn(
        dir.path(),
        "fleet-run",
        &["run", &spec, "--workers", "2", "--until", "backfill"],
        &[],
    )?;
    let deadline = Instant::now() + LIMIT;
    while shards_done(std::slice::from_ref(&down_t)).await < 2 {
        anyhow::ensure!(run.is_running(), "{}", run.stderr_tail());
        anyhow::ensure!(Instant::now() < deadline, "the down member never started");
        tokio::task::yield_now().await;
    }
    down_cluster.halt().await?;
    let stopped_at = Instant::now();
    // 30 shards of the up member, all copied while the other member's server is down.
    while shards_done(std::slice::from_ref(&up_t)).await < 30 {
        anyhow::ensure!(
            Instant::now() < stopped_at + Duration::from_secs(120),
            "the up member was held up: {}",
            run.stderr_tail()
        );
        tokio::task::yield_now().await;
    }
    eprintln!(
        "the up member finished its backfill {:.1} s after the other's server stopped",
        stopped_at.elapsed().as_secs_f64()
    );
    down_cluster.resume().await?;
    let status = run.wait(LIMIT).await?;
    let err = run.stderr();
    eprintln!(
        "fleet exit {status}; {}",
        err.lines()
            .filter(|l| l.starts_with("member "))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    if !status.success() {
        assert!(
            err.contains("member down: FAILED"),
            "said in the output: {err}"
        );
        assert!(!err.contains("member up: FAILED"), "{err}");
        let out = schemashift(&["run", &spec, "--members", "down", "--until", "backfill"])?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = schemashift(&["run", &spec])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (s, t) in [(&down_source, &down_t), (&up.source_dsn, &up_t)] {
        assert_eq!(table_diff(&connect(s).await?, t).await?, (0, 0, 0));
    }
    schemashift(&["cleanup", &spec])?;
    up.drop_all().await?;
    down_env.drop_all().await?;
    down_cluster.stop().await?;
    Ok(())
}

/// Bad fleet input: exit 2 with the culprit named, before any server is contacted.
#[tokio::test]
async fn bad_fleet_input_exits_2_naming_it() -> anyhow::Result<()> {
    let env = schemashift_tests::users_env("fleet_bad_input", 100).await?;
    let member = |name: &str| {
        format!(
            "  - {{name: {name}, source: '{}', target: '{}'}}\n",
            env.source_dsn, env.target_dsn
        )
    };
    let err = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let cases: [(String, Vec<&str>, &str); 5] = [
        (
            format!("members:\n{}{}", member("t1"), member("t1")),
            vec!["plan"],
            "\"t1\" is used twice",
        ),
        (
            format!("members:\n{}limits: {{per_host: 0}}\n", member("t1")),
            vec!["run"],
            "per_host: must be at least 1",
        ),
        (
            format!("members:\n{}", member("t1")),
            vec!["status", "--members", "t9"],
            "no member is named \"t9\"",
        ),
        (
            format!("members:\n{}{}", member("t1"), member("t2")),
            vec!["coordinator", "--listen", "127.0.0.1:0", "--report", "/tmp"],
            "--report is per run",
        ),
        (
            String::new(),
            vec!["cutover", "--wave", "2"],
            "--wave needs a fleet spec",
        ),
    ];
    for (i, (head, args, needle)) in cases.into_iter().enumerate() {
        let (_dir, spec) = if head.is_empty() {
            let dir = tempfile::tempdir()?;
            let spec = schemashift_tests::write_spec(
                &dir,
                &users_spec_yaml(&env.source_dsn, &env.target_dsn, 1, None),
            )?;
            (dir, spec)
        } else {
            write_fleet(head, 1_000)?
        };
        let mut argv = vec![args[0], spec.as_str()];
        argv.extend_from_slice(&args[1..]);
        let out = schemashift(&argv)?;
        assert_eq!(out.status.code(), Some(2), "case {i}: {}", err(&out));
        assert!(err(&out).contains(needle), "case {i}: {}", err(&out));
    }
    assert!(
        !has_control_schema(&env.target_dsn).await?,
        "nothing written"
    );
    env.drop_all().await
}

/// Members on one source server compare their throttle probe with one baseline, taken before
/// any of their copies ran: each measuring its own would take it while the others already
/// copy, and members would hold on each other's load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_on_one_source_server_share_one_throttle_baseline() -> anyhow::Result<()> {
    let (envs, yaml) = members("fleet_base", 3, 10_000).await?;
    let (_dir, spec) = write_fleet(yaml, 2_000)?;
    // Without the host CPU rule: on a host busy with other tests that rule measures the
    // baseline again, member by member, which is another behaviour than the one shown here.
    let mut text = std::fs::read_to_string(&spec)?;
    text.push_str("throttle:\n  max_host_cpu: 1.0\n");
    std::fs::write(&spec, text)?;
    let out = schemashift(&["run", &spec, "--until", "backfill", "--workers", "2"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut seen = Vec::new();
    for e in &envs {
        let t = connect(&e.target_dsn).await?;
        let b: Option<f64> = t
            .query_one("SELECT baseline_ms FROM schemashift.throttle", &[])
            .await?
            .get(0);
        seen.push(b);
    }
    assert!(
        seen.iter().all(|b| b.is_some() && *b == seen[0]),
        "one baseline for the server: {seen:?}"
    );
    schemashift(&["cleanup", &spec])?;
    for e in envs {
        e.drop_all().await?;
    }
    Ok(())
}

/// Eight equal members, a pool of two: each member's first worker keeps the pool full, so
/// its second worker (a spare) copies, and opens database sessions, only at the fleet's tail.
/// Before shares, all sixteen workers took copies in turn, each with sessions of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_members_copy_through_their_share_of_the_pool_not_a_worker_each() -> anyhow::Result<()>
{
    let (envs, yaml) = members("fleet_share", 8, 20_000).await?;
    let (_dir, spec) = write_fleet(yaml + "throttle:\n  enabled: false\n", 1_000)?;
    let dbs: Vec<String> = envs.iter().map(|e| e.source_db.clone()).collect();
    let admin = connect(&envs[0].source_admin_dsn()).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        tokio::spawn(async move {
            // Backends that ran a backfill COPY, by member database; a worker's source
            // session lives as long as the worker, so each is seen many times over.
            let mut copiers: BTreeSet<(String, i32)> = BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                let rows = admin
                    .query(
                        "SELECT datname::text, pid FROM pg_stat_activity \
                         WHERE datname = ANY($1) AND backend_type = 'client backend' \
                           AND query LIKE 'COPY (SELECT % FROM ONLY \"public\".\"users\" %'",
                        &[&dbs],
                    )
                    .await?;
                copiers.extend(rows.iter().map(|r| (r.get(0), r.get(1))));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(copiers)
        })
    };
    let out = schemashift(&["run", &spec, "--until", "backfill", "--workers", "2"])?;
    stop.store(true, Ordering::Relaxed);
    let copiers = watcher.await??;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for e in &envs {
        let (s, t) = (connect(&e.source_dsn).await?, connect(&e.target_dsn).await?);
        assert_eq!(table_diff(&s, &t).await?, (0, 0, 0), "{}", e.source_db);
    }
    let per_member = |db: &str| copiers.iter().filter(|(d, _)| d == db).count();
    let busy: Vec<usize> = envs.iter().map(|e| per_member(&e.source_db)).collect();
    eprintln!("source sessions that copied, per member: {busy:?}");
    assert!(
        busy.iter().all(|&n| n >= 1),
        "every member copied: {busy:?}"
    );
    // Sixteen workers; eight first ones, and spares only where a slot was free at the end.
    assert!(
        copiers.len() <= 11,
        "{} sessions copied, spares beyond the tail: {busy:?}",
        copiers.len()
    );
    schemashift(&["cleanup", &spec])?;
    for e in envs {
        e.drop_all().await?;
    }
    Ok(())
}
