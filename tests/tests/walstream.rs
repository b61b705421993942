//! The streaming replication client against real walsenders: committed changes and
//! keepalives arrive, confirm moves the slot, a busy slot is reported as such, `next` survives
//! cancellation mid-message, password authentication works, and no error shows the password.

use schemashift_common::retry::Classify;
use std::time::{Duration, Instant};

use schemashift_common::ids::Lsn;
use schemashift_common::spec::Dsn;
use schemashift_common::walstream::{WalMessage, WalStream, WalStreamError};
use schemashift_lab::cluster::{Cluster, ClusterOptions};
use schemashift_tests::{connect, TestEnv};
use tokio_postgres::Client;

const PUBLICATION: &str = "ws_pub";
const APP: &str = "schemashift_walstream_test";
/// How long the server gets for anything we wait on.
const PATIENCE: Duration = Duration::from_secs(30);

/// A slot name unique on a shared cluster: slots are cluster-wide, databases are per test.
fn slot_of(env: &TestEnv) -> String {
    format!("ws_{}", env.source_db)
}

/// Table and publication, a pgoutput slot per name, then one committed transaction of
/// three inserts (flushed at commit, so the walsender can decode it at once).
async fn setup(c: &Client, slots: &[&str]) -> anyhow::Result<()> {
    c.batch_execute(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, name text); \
         CREATE PUBLICATION {PUBLICATION} FOR TABLE items;"
    ))
    .await?;
    for slot in slots {
        c.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[slot],
        )
        .await?;
    }
    c.batch_execute(
        "SET synchronous_commit = on; \
         BEGIN; INSERT INTO items VALUES (1, 'a'), (2, 'b'), (3, 'c'); COMMIT;",
    )
    .await?;
    Ok(())
}

/// Message kinds (first byte of each XLogData) up to and including the commit, and the
/// commit's end LSN (pgoutput 'C': flags, commit LSN, end LSN, timestamp).
async fn read_transaction(stream: &mut WalStream) -> anyhow::Result<(Vec<u8>, Lsn)> {
    let deadline = Instant::now() + PATIENCE;
    let mut kinds = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Err(_) => anyhow::bail!("no commit within {PATIENCE:?}; saw {kinds:?}"),
            Ok(message) => {
                if let WalMessage::XLogData { data, .. } = message? {
                    kinds.push(data[0]);
                    if data[0] == b'C' {
                        let end: [u8; 8] = data
                            .get(10..18)
                            .and_then(|s| s.try_into().ok())
                            .ok_or_else(|| anyhow::anyhow!("short commit message"))?;
                        return Ok((kinds, Lsn(u64::from_be_bytes(end))));
                    }
                }
            }
        }
    }
}

async fn slot_state(c: &Client, slot: &str) -> anyhow::Result<(Lsn, bool)> {
    let row = c
        .query_one(
            "SELECT confirmed_flush_lsn::text, active FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok((row.get::<_, String>(0).parse()?, row.get(1)))
}

/// Polls until the slot satisfies `done` (a walsender applies replies and exits on its own time).
async fn wait_for_slot(
    c: &Client,
    slot: &str,
    what: &str,
    done: impl Fn(Lsn, bool) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (confirmed, active) = slot_state(c, slot).await?;
        if done(confirmed, active) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "slot {slot}: {what} not reached (confirmed {confirmed}, active {active})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kinds_text(kinds: &[u8]) -> String {
    kinds.iter().map(|k| char::from(*k)).collect()
}

/// B, the relation, three inserts, C.
fn assert_one_transaction(kinds: &[u8]) {
    assert_eq!(
        kinds_text(kinds),
        "BRIIIC",
        "pgoutput messages of the transaction"
    );
}

#[tokio::test]
async fn stream_delivers_committed_changes_and_keepalives() -> anyhow::Result<()> {
    let env = TestEnv::new("walstream_delivers").await?;
    let c = connect(&env.source_dsn).await?;
    let slot = slot_of(&env);
    setup(&c, &[&slot]).await?;
    let (start_confirmed, _) = slot_state(&c, &slot).await?;
    let dsn = Dsn::new(env.source_dsn.clone());
    let mut stream = WalStream::start(&dsn, APP, &slot, PUBLICATION, Lsn(0)).await?;
    let (kinds, commit_end) = read_transaction(&mut stream).await?;
    assert_one_transaction(&kinds);

    // A walsender waiting for WAL pings on its own while our reported flush is behind what it
    // sent; should no ping cover the commit, reply_requested (confirming nothing new) asks.
    let deadline = Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no keepalive at or after the commit end {commit_end}; saw {seen:?}"
        );
        match tokio::time::timeout(Duration::from_secs(2), stream.next()).await {
            // Cancelled mid-wait: the stream must stay usable (next is cancel-safe).
            Err(_) => {
                seen.push("requested".to_string());
                stream.confirm(start_confirmed, true).await?;
            }
            Ok(message) => match message? {
                WalMessage::Keepalive {
                    wal_end,
                    reply_requested,
                } => {
                    let flush: String = c
                        .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
                        .await?
                        .get(0);
                    seen.push(format!(
                        "keepalive {wal_end} reply={reply_requested} (server flush {flush})"
                    ));
                    if wal_end >= commit_end {
                        break;
                    }
                }
                WalMessage::XLogData { data, .. } => {
                    anyhow::bail!(
                        "unexpected change {:?} after the commit",
                        char::from(data[0])
                    )
                }
            },
        }
    }
    drop(stream);
    drop(c);
    env.drop_all().await
}

#[tokio::test]
async fn confirm_moves_the_slots_confirmed_flush() -> anyhow::Result<()> {
    let env = TestEnv::new("walstream_confirm").await?;
    let c = connect(&env.source_dsn).await?;
    let slot = slot_of(&env);
    setup(&c, &[&slot]).await?;
    let dsn = Dsn::new(env.source_dsn.clone());
    let mut stream = WalStream::start(&dsn, APP, &slot, PUBLICATION, Lsn(0)).await?;
    let (_, commit_end) = read_transaction(&mut stream).await?;
    assert!(slot_state(&c, &slot).await?.0 < commit_end);
    stream.confirm(commit_end, false).await?;
    wait_for_slot(&c, &slot, "confirmed commit end", |lsn, _| {
        lsn >= commit_end
    })
    .await?;

    // A new stream resumes after the confirmed transaction: the next thing is a keepalive
    // (asked for), no change.
    drop(stream);
    wait_for_slot(&c, &slot, "inactive", |_, active| !active).await?;
    let mut stream = WalStream::start(&dsn, APP, &slot, PUBLICATION, Lsn(0)).await?;
    stream.confirm(commit_end, true).await?;
    match tokio::time::timeout(PATIENCE, stream.next()).await?? {
        WalMessage::Keepalive { wal_end, .. } => assert!(wal_end >= commit_end, "{wal_end}"),
        WalMessage::XLogData { data, .. } => {
            panic!("confirmed change {:?} delivered again", char::from(data[0]))
        }
    }
    drop(stream);
    drop(c);
    env.drop_all().await
}

#[tokio::test]
async fn second_reader_of_an_active_slot_gets_slot_busy() -> anyhow::Result<()> {
    let env = TestEnv::new("walstream_busy").await?;
    let c = connect(&env.source_dsn).await?;
    let slot = slot_of(&env);
    setup(&c, &[&slot]).await?;
    let dsn = Dsn::new(env.source_dsn.clone());
    let first = WalStream::start(&dsn, APP, &slot, PUBLICATION, Lsn(0)).await?;
    match WalStream::start(&dsn, APP, &slot, PUBLICATION, Lsn(0)).await {
        Err(e @ WalStreamError::SlotBusy(_)) => {
            assert!(e.to_string().contains(&slot), "{e}");
            assert!(!e.is_transient(), "{e}");
        }
        Err(e) => panic!("expected SlotBusy, got {e:?}"),
        Ok(_) => panic!("two streams of one slot"),
    }
    // Dropping the first stream frees the slot for the next reader.
    drop(first);
    wait_for_slot(&c, &slot, "inactive", |_, active| !active).await?;
    let mut second = WalStream::start(&dsn, APP, &slot, PUBLICATION, Lsn(0)).await?;
    assert_one_transaction(&read_transaction(&mut second).await?.0);
    drop(second);
    drop(c);
    env.drop_all().await
}

/// Forwards one connection to `server`, handing the server's bytes on in small pieces so
/// that the client sees every message arrive in fragments. Returns the port to connect to.
async fn trickle_proxy(server: (String, u16)) -> anyhow::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let Ok((client, _)) = listener.accept().await else {
            return;
        };
        let Ok(upstream) = tokio::net::TcpStream::connect(server).await else {
            return;
        };
        let _ = client.set_nodelay(true);
        let ((mut client_rx, mut client_tx), (mut up_rx, mut up_tx)) =
            (client.into_split(), upstream.into_split());
        tokio::spawn(async move { tokio::io::copy(&mut client_rx, &mut up_tx).await });
        let mut piece = [0u8; 61];
        while let Ok(n @ 1..) = up_rx.read(&mut piece).await {
            if client_tx.write_all(&piece[..n]).await.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
    });
    Ok(port)
}

#[tokio::test]
async fn next_survives_cancellation_mid_message() -> anyhow::Result<()> {
    use futures_util::FutureExt;
    let env = TestEnv::new("walstream_cancel").await?;
    let c = connect(&env.source_dsn).await?;
    let slot = slot_of(&env);
    setup(&c, &[&slot]).await?;
    c.batch_execute(
        "SET synchronous_commit = on; \
         INSERT INTO items SELECT g, repeat(md5(g::text), 64) FROM generate_series(100, 399) g",
    )
    .await?;
    let config: tokio_postgres::Config = env.source_dsn.parse()?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => anyhow::bail!("the test source is not on TCP"),
    };
    let proxy = trickle_proxy((host, config.get_ports().first().copied().unwrap_or(5432))).await?;
    let dsn = Dsn::new(format!(
        "host=127.0.0.1 port={proxy} user={} password={} dbname={}",
        config.get_user().unwrap_or("postgres"),
        schemashift_tests::TEST_PASSWORD,
        env.source_db
    ));
    let mut stream = WalStream::start(&dsn, APP, &slot, PUBLICATION, Lsn(0)).await?;
    let deadline = Instant::now() + PATIENCE;
    let (mut inserts, mut big, mut commits, mut cancelled) = (0, 0, 0, 0);
    while commits < 2 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{inserts} inserts, {commits} commits"
        );
        // One poll, then the future is dropped: cancelled whenever the message is not whole.
        match stream.next().now_or_never() {
            None => {
                cancelled += 1;
                tokio::task::yield_now().await;
            }
            Some(message) => {
                if let WalMessage::XLogData { data, .. } = message? {
                    match data[0] {
                        // setup's three small rows, then the 2 KiB ones, each whole.
                        b'I' => {
                            inserts += 1;
                            big += usize::from(data.len() > 2048);
                        }
                        b'C' => commits += 1,
                        _ => {}
                    }
                }
            }
        }
    }
    assert_eq!(
        (inserts, big),
        (303, 300),
        "after {cancelled} cancellations"
    );
    // A 2 KiB message in 61-byte pieces cannot arrive whole in one poll.
    assert!(cancelled > 300, "only {cancelled} cancellations");
    drop(stream);
    drop(c);
    env.drop_all().await
}

/// Roles for each password method, in `pg_hba.conf` ahead of initdb's trust lines (TCP only).
const ROLES: [(&str, &str, &str); 3] = [
    ("ws_scram", "scram-sha-256", "Scram-Secret-42"),
    ("ws_md5", "md5", "Md5-Secret-42"),
    ("ws_clear", "password", "Clear-Secret-42"),
];

#[tokio::test]
async fn password_auth_with_scram_works() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let c = connect(&cluster.dsn("postgres")).await?;
    let slots = ["ws_scram", "ws_md5", "ws_clear", "ws_unix"];
    for (role, method, password) in ROLES {
        // md5 needs an md5 hash stored; the others work from SCRAM's (PostgreSQL 15 default).
        let encryption = if method == "md5" {
            "md5"
        } else {
            "scram-sha-256"
        };
        c.batch_execute(&format!(
            "SET password_encryption = '{encryption}'; \
             CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{password}'"
        ))
        .await?;
    }
    let stored: String = c
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'ws_scram'",
            &[],
        )
        .await?
        .get(0);
    assert!(stored.starts_with("SCRAM-SHA-256$"), "{stored}");
    setup(&c, &slots).await?;

    let hba_path = cluster.data_dir().join("pg_hba.conf");
    let mut hba: String = ROLES
        .iter()
        .map(|(role, method, _)| format!("host all {role} 127.0.0.1/32 {method}\n"))
        .collect();
    hba.push_str(&std::fs::read_to_string(&hba_path)?);
    std::fs::write(&hba_path, hba)?;
    c.batch_execute("SELECT pg_reload_conf()").await?;
    // The postmaster reloads asynchronously: wait until a password-less login is refused.
    let port = cluster.port();
    let deadline = Instant::now() + PATIENCE;
    while connect(&format!("postgres://ws_scram@127.0.0.1:{port}/postgres"))
        .await
        .is_ok()
    {
        anyhow::ensure!(Instant::now() < deadline, "pg_hba.conf not reloaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    for (role, method, password) in ROLES {
        let dsn = Dsn::new(format!(
            "postgres://{role}:{password}@127.0.0.1:{port}/postgres"
        ));
        let mut stream = WalStream::start(&dsn, APP, role, PUBLICATION, Lsn(0))
            .await
            .map_err(|e| anyhow::anyhow!("{method}: {e}"))?;
        assert_one_transaction(&read_transaction(&mut stream).await?.0);

        let wrong = "Wrong-Secret-99";
        let dsn = Dsn::new(format!(
            "postgres://{role}:{wrong}@127.0.0.1:{port}/postgres"
        ));
        let e = match WalStream::start(&dsn, APP, role, PUBLICATION, Lsn(0)).await {
            Err(e) => e,
            Ok(_) => panic!("{method}: a wrong password was accepted"),
        };
        assert!(
            matches!(&e, WalStreamError::Connect { code: Some(c), .. } if c == "28P01"),
            "{method}: {e:?}"
        );
        assert!(!e.is_transient(), "{method}: {e}");
        for text in [e.to_string(), format!("{e:?}")] {
            assert!(
                !text.contains(wrong) && !text.contains(password),
                "{method}: {text}"
            );
        }

        let dsn = Dsn::new(format!("postgres://{role}@127.0.0.1:{port}/postgres"));
        match WalStream::start(&dsn, APP, role, PUBLICATION, Lsn(0)).await {
            Err(WalStreamError::Connect { reason, .. }) => {
                assert!(reason.contains("password"), "{method}: {reason}")
            }
            other => panic!("{method}: no password: {:?}", other.map(|_| ())),
        }
    }

    // Unix socket (trust, as initdb set it up): the socket lives in the cluster's directory.
    let socket_dir = cluster
        .data_dir()
        .parent()
        .ok_or_else(|| anyhow::anyhow!("cluster directory"))?;
    let dsn = Dsn::new(format!(
        "host={} port={port} user=ws_md5 dbname=postgres",
        socket_dir.display()
    ));
    let mut stream = WalStream::start(&dsn, APP, "ws_unix", PUBLICATION, Lsn(0)).await?;
    assert_one_transaction(&read_transaction(&mut stream).await?.0);
    drop(stream);
    drop(c);
    cluster.stop().await?;
    Ok(())
}

/// What is wrong, the DSN, the error expected, whether it is transient.
type Case = (&'static str, Dsn, fn(&WalStreamError) -> bool, bool);

#[tokio::test]
async fn failed_start_errors_never_show_the_password() -> anyhow::Result<()> {
    let env = TestEnv::new("walstream_errors").await?;
    connect(&env.source_dsn)
        .await?
        .batch_execute(&format!(
            "CREATE TABLE items (id int PRIMARY KEY); CREATE PUBLICATION {PUBLICATION} FOR TABLE items"
        ))
        .await?;
    // The test role's DSNs carry its password; the other cases' servers never ask for it.
    let secret = schemashift_tests::TEST_PASSWORD;
    let with_secret = |dsn: &str| Dsn::new(dsn.to_owned());
    let cases: [Case; 6] = [
        (
            "unparseable port",
            Dsn::new(format!(
                "postgres://migrator:{secret}@127.0.0.1:notaport/db"
            )),
            |e| matches!(e, WalStreamError::Unsupported(_)),
            false,
        ),
        (
            "unknown option",
            Dsn::new(format!(
                "host=127.0.0.1 user=migrator password={secret} bogus={secret}"
            )),
            |e| matches!(e, WalStreamError::Unsupported(_)),
            false,
        ),
        (
            "unreachable server",
            Dsn::new(format!("postgres://migrator:{secret}@127.0.0.1:1/db")),
            |e| matches!(e, WalStreamError::Connect { code: None, .. }),
            true,
        ),
        (
            "sslmode=require against a server without TLS",
            with_secret(&format!("{}?sslmode=require", env.source_dsn)),
            |e| matches!(e, WalStreamError::Unsupported(m) if m.contains("does not accept TLS")),
            false,
        ),
        (
            "missing database",
            with_secret(&schemashift_tests::dsn_with_db(
                &env.source_dsn,
                "no_such_db_ws",
            )),
            |e| matches!(e, WalStreamError::Connect { code: Some(c), .. } if c == "3D000"),
            false,
        ),
        (
            "missing slot",
            with_secret(&env.source_dsn),
            |e| matches!(e, WalStreamError::Server { code, .. } if code == "42704"),
            false,
        ),
    ];
    for (what, dsn, expected, transient) in cases {
        let e = match WalStream::start(&dsn, APP, "ws_no_such_slot", PUBLICATION, Lsn(0)).await {
            Err(e) => e,
            Ok(_) => panic!("{what}: started"),
        };
        assert!(expected(&e), "{what}: {e:?}");
        assert_eq!(e.is_transient(), transient, "{what}: {e}");
        for text in [e.to_string(), format!("{e:?}")] {
            assert!(!text.contains(secret), "{what}: {text}");
        }
    }
    env.drop_all().await
}
