//! The harness itself: fresh databases, our compare, and cleanup of slots and databases.

use std::time::SystemTime;

use schemashift_lab::scenario::{load_users, SOURCE_DDL, TARGET_DDL};
use schemashift_tests::{connect, split_full_name, table_diff, table_diff_report, TestEnv};
use tokio_postgres::Client;

/// Copies the source users into the target with the split done in Rust.
async fn copy_users(source: &Client, target: &Client) {
    let rows = source
        .query(
            "SELECT id, full_name, email, bio, created_at, updated_at FROM public.users",
            &[],
        )
        .await
        .expect("read source");
    let mut ids = Vec::new();
    let mut firsts = Vec::new();
    let mut lasts = Vec::new();
    let mut emails = Vec::new();
    let mut bios: Vec<Option<String>> = Vec::new();
    let mut created: Vec<SystemTime> = Vec::new();
    let mut updated: Vec<SystemTime> = Vec::new();
    for row in &rows {
        let (first, last) = split_full_name(row.get(1));
        ids.push(row.get::<_, i64>(0));
        firsts.push(first);
        lasts.push(last);
        emails.push(row.get::<_, String>(2));
        bios.push(row.get(3));
        created.push(row.get(4));
        updated.push(row.get(5));
    }
    target
        .execute(
            "INSERT INTO public.users (id, first_name, last_name, email, bio, created_at, updated_at)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                                  $6::timestamptz[], $7::timestamptz[])",
            &[&ids, &firsts, &lasts, &emails, &bios, &created, &updated],
        )
        .await
        .expect("write target");
}

#[tokio::test]
async fn compare_finds_missing_extra_and_different_rows() {
    let mut env = TestEnv::new("harness compare").await.expect("test env");
    let source = connect(&env.source_dsn).await.expect("source");
    let target = connect(&env.target_dsn).await.expect("target");
    source.batch_execute(SOURCE_DDL).await.expect("source ddl");
    target.batch_execute(TARGET_DDL).await.expect("target ddl");
    load_users(&source, 3_000).await.expect("load");
    copy_users(&source, &target).await;
    assert_eq!(table_diff(&source, &target).await.expect("diff"), (0, 0, 0));

    target
        .batch_execute(
            "DELETE FROM public.users WHERE id IN (10, 20);
             INSERT INTO public.users (id, first_name, last_name, email) VALUES (99999, 'A', 'B', 'x@y');
             UPDATE public.users SET last_name = last_name || 'x' WHERE id = 30;
             UPDATE public.users SET bio = NULL WHERE id = (SELECT min(id) FROM public.users
                                                            WHERE bio IS NOT NULL AND id > 30);
             UPDATE public.users SET updated_at = updated_at + interval '1 microsecond' WHERE id = 3000",
        )
        .await
        .expect("damage target");
    let report = table_diff_report(&source, &target).await.expect("diff");
    assert_eq!(
        (report.missing, report.extra, report.different),
        (2, 1, 3),
        "{report:?}"
    );
    assert!(report.samples.contains(&(10, "missing".to_string())));
    assert!(report.samples.contains(&(99999, "extra".to_string())));
    assert!(report
        .samples
        .contains(&(30, "different: last_name".to_string())));
    assert!(report
        .samples
        .contains(&(3000, "different: updated_at".to_string())));

    // A forgotten slot and an open session must not keep the databases alive.
    source
        .query_one(
            "SELECT pg_create_logical_replication_slot('harness_' || md5(random()::text), 'pgoutput')",
            &[],
        )
        .await
        .expect("create slot");
    let admin = connect(&env.source_dsn_for("postgres"))
        .await
        .expect("admin");
    env.drop_databases().await.expect("drop databases");
    let left: i64 = admin
        .query_one(
            "SELECT (SELECT count(*) FROM pg_database WHERE datname IN ($1, $2))
                  + (SELECT count(*) FROM pg_replication_slots WHERE database IN ($1, $2))",
            &[&env.source_db, &env.target_db],
        )
        .await
        .expect("check")
        .get(0);
    assert_eq!(left, 0);
    drop(admin);
    env.drop_all().await.expect("drop all");
}

#[tokio::test]
async fn dropping_the_env_cleans_up_shared_clusters() {
    let env = TestEnv::new("harness drop").await.expect("test env");
    let admin_dsn = env.source_dsn_for("postgres");
    let db = env.source_db.clone();
    let _held = connect(&env.source_dsn).await.expect("session");
    drop(env);
    let admin = connect(&admin_dsn).await;
    // With private clusters the whole cluster is gone, which is clean as well.
    if let Ok(admin) = admin {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_database WHERE datname = $1",
                &[&db],
            )
            .await
            .expect("check")
            .get(0);
        assert_eq!(n, 0);
    }
}
