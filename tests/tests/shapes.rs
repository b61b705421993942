//! Table shapes beyond `BIGSERIAL id`: composite, UUID and text keys under write load, many
//! tables in one run, foreign keys between target tables, keyless tables, and the value
//! types that must survive mapping, replay and verify.

use rand::Rng;
use schemashift_tests::{connect, rows_text, schemashift, schemashift_ok, write_spec, TestEnv};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio_postgres::Client;

/// One table of a spec, mapped column for column.
fn table_yaml(name: &str, key: &[&str], cols: &[&str]) -> String {
    let key = if key.len() == 1 {
        key[0].to_owned()
    } else {
        format!("[{}]", key.join(", "))
    };
    let mut y = format!(
        "  - source: public.{name}\n    target: public.{name}\n    key: {key}\n    shard_rows: 700\n    columns:\n"
    );
    for c in cols {
        y.push_str(&format!("      {c}: {c}\n"));
    }
    y
}

fn spec_yaml(env: &TestEnv, workers: usize, tables: &[String]) -> String {
    format!(
        "source: {}\ntarget: {}\nworkers: {workers}\ntables:\n{}",
        env.source_dsn,
        env.target_dsn,
        tables.concat()
    )
}

async fn assert_same(env: &TestEnv, sql: &str) -> anyhow::Result<()> {
    let s = rows_text(&connect(&env.source_dsn).await?, sql).await?;
    let t = rows_text(&connect(&env.target_dsn).await?, sql).await?;
    assert_eq!(s.len(), t.len(), "row counts of {sql}");
    let first = s.iter().zip(&t).find(|(a, b)| a != b);
    assert!(first.is_none(), "{sql}: first difference {first:?}");
    Ok(())
}

fn run_until_cutover(spec: &str) -> anyhow::Result<()> {
    let out = schemashift(&["run", spec, "--until", "cutover"])?;
    anyhow::ensure!(
        out.status.success(),
        "run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = schemashift(&["verify", spec])?;
    anyhow::ensure!(
        v.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&v.stderr)
    );
    Ok(())
}

const KEYED_DDL: &str = "
CREATE TABLE public.orders (tenant_id int NOT NULL, order_no bigint NOT NULL, amount numeric(12,2),
  note text, PRIMARY KEY (tenant_id, order_no));
CREATE TABLE public.sessions (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), agent text, data jsonb);
CREATE TABLE public.countries (code text PRIMARY KEY, name text NOT NULL);";

/// Random inserts, updates and deletes on the keyed tables until stopped.
async fn write_keyed(c: Client, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) -> anyhow::Result<()> {
    while !stop.load(Ordering::Relaxed) {
        let (t, n, kind) = {
            let mut r = rand::thread_rng();
            (
                r.gen_range(1..=20i32),
                r.gen_range(1..=3000i64),
                r.gen_range(0..10u8),
            )
        };
        let sql = match kind {
            0..=2 => format!(
                "INSERT INTO orders VALUES ({t}, {n} + 100000, {n}.5, 'new ' || {n}) ON CONFLICT DO NOTHING;
                 INSERT INTO sessions (agent, data) VALUES ('agent {n}', jsonb_build_object('n', {n}));
                 INSERT INTO countries VALUES ('Z' || {n} || 'ß', 'Land {n}') ON CONFLICT DO NOTHING"
            ),
            3..=7 => format!(
                "UPDATE orders SET amount = amount + 1, note = note || '!' WHERE tenant_id = {t} AND order_no = {n};
                 UPDATE sessions SET data = data || '{{\"u\": true}}' WHERE id = (SELECT id FROM sessions ORDER BY id OFFSET {n} LIMIT 1);
                 UPDATE countries SET name = name || '·' WHERE code = 'C' || {n}"
            ),
            _ => format!(
                "DELETE FROM orders WHERE tenant_id = {t} AND order_no = {n};
                 DELETE FROM sessions WHERE id = (SELECT id FROM sessions ORDER BY id OFFSET {n} LIMIT 1);
                 DELETE FROM countries WHERE code = 'C' || {n}"
            ),
        };
        c.batch_execute(&sql).await?;
        done.fetch_add(1, Ordering::Relaxed);
        tokio::task::yield_now().await;
    }
    Ok(())
}

#[tokio::test]
async fn composite_uuid_and_text_keys_migrate_under_write_load_with_zero_diffs(
) -> anyhow::Result<()> {
    let env = TestEnv::new("keyed_tables").await?;
    let s = connect(&env.source_dsn).await?;
    s.batch_execute(KEYED_DDL).await?;
    s.batch_execute(
        "INSERT INTO orders SELECT 1 + i % 20, i, i * 1.25, 'note ' || i FROM generate_series(1, 6000) i;
         INSERT INTO sessions (agent, data) SELECT 'agent ' || i, jsonb_build_object('i', i, 'tags', jsonb_build_array('a', i))
           FROM generate_series(1, 5000) i;
         INSERT INTO countries SELECT 'C' || i, 'Country ' || i FROM generate_series(1, 3000) i;
         ANALYZE",
    )
    .await?;
    connect(&env.target_dsn)
        .await?
        .batch_execute(KEYED_DDL)
        .await?;
    let spec = spec_yaml(
        &env,
        3,
        &[
            table_yaml(
                "orders",
                &["tenant_id", "order_no"],
                &["tenant_id", "order_no", "amount", "note"],
            ),
            table_yaml("sessions", &["id"], &["id", "agent", "data"]),
            table_yaml("countries", &["code"], &["code", "name"]),
        ],
    );
    let dir = tempfile::tempdir()?;
    let spec = write_spec(&dir, &spec)?;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(write_keyed(
        connect(&env.source_dsn).await?,
        stop.clone(),
        done.clone(),
    ));
    let spec_s = spec.clone();
    let out =
        tokio::task::spawn_blocking(move || schemashift(&["run", &spec_s, "--until", "cutover"]))
            .await??;
    stop.store(true, Ordering::Relaxed);
    writer.await??;
    assert!(
        out.status.success(),
        "run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        done.load(Ordering::Relaxed) > 20,
        "the writer wrote during the run"
    );
    let v = schemashift(&["verify", &spec])?;
    assert!(
        v.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&v.stderr)
    );
    assert_same(&env, "SELECT * FROM orders ORDER BY tenant_id, order_no").await?;
    assert_same(&env, "SELECT * FROM sessions ORDER BY id").await?;
    assert_same(&env, "SELECT * FROM countries ORDER BY code COLLATE \"C\"").await?;
    let t = connect(&env.target_dsn).await?;
    let shards: Vec<(i32, i64)> = t
        .query(
            "SELECT table_idx, count(*) FROM schemashift.shards GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(shards.len(), 3, "all three tables were sharded");
    assert!(
        shards.iter().all(|(_, n)| *n >= 3),
        "keyset shards on every key shape: {shards:?}"
    );
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}

#[tokio::test]
async fn table_without_a_key_is_refused_with_exit_2_naming_it() -> anyhow::Result<()> {
    let env = TestEnv::new("keyless").await?;
    let ddl = "CREATE TABLE public.audit_log (at timestamptz, msg text)";
    connect(&env.source_dsn).await?.batch_execute(ddl).await?;
    connect(&env.target_dsn).await?.batch_execute(ddl).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(
        &dir,
        &spec_yaml(&env, 1, &[table_yaml("audit_log", &["at"], &["at", "msg"])]),
    )?;
    let out = schemashift(&["run", &spec])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("public.audit_log") && err.contains("ADD PRIMARY KEY"),
        "{err}"
    );
    env.drop_all().await
}

#[tokio::test]
async fn two_tables_with_a_foreign_key_migrate_and_the_constraint_is_valid_after_cutover(
) -> anyhow::Result<()> {
    let env = TestEnv::new("foreign_key").await?;
    let ddl = "CREATE TABLE public.authors (id bigint PRIMARY KEY, name text NOT NULL);
               CREATE TABLE public.books (id bigint PRIMARY KEY, author_id bigint NOT NULL REFERENCES public.authors (id),
                 title text NOT NULL)";
    let s = connect(&env.source_dsn).await?;
    s.batch_execute(ddl).await?;
    s.batch_execute(
        "INSERT INTO authors SELECT i, 'Author ' || i FROM generate_series(1, 3000) i;
         INSERT INTO books SELECT i, 1 + (i * 7) % 3000, 'Book ' || i FROM generate_series(1, 9000) i;
         ANALYZE",
    )
    .await?;
    connect(&env.target_dsn).await?.batch_execute(ddl).await?;
    let dir = tempfile::tempdir()?;
    // Books first, so child shards are likely to land before their parents.
    let spec = write_spec(
        &dir,
        &spec_yaml(
            &env,
            3,
            &[
                table_yaml("books", &["id"], &["id", "author_id", "title"]),
                table_yaml("authors", &["id"], &["id", "name"]),
            ],
        ),
    )?;
    let out = schemashift(&["run", &spec, "--until", "backfill"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Changes after the backfill: new parent and child in one transaction, a delete of both.
    s.batch_execute(
        "BEGIN; INSERT INTO authors VALUES (5000, 'New'); INSERT INTO books VALUES (50000, 5000, 'Fresh'); COMMIT;
         BEGIN; DELETE FROM books WHERE author_id = 1; DELETE FROM authors WHERE id = 1; COMMIT;",
    )
    .await?;
    run_until_cutover(&spec)?;
    assert_same(&env, "SELECT * FROM authors ORDER BY id").await?;
    assert_same(&env, "SELECT * FROM books ORDER BY id").await?;
    let t = connect(&env.target_dsn).await?;
    let fks: Vec<(String, bool)> = t
        .query(
            "SELECT conname::text, convalidated FROM pg_constraint WHERE contype = 'f' AND conrelid = 'public.books'::regclass",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(fks.len(), 1, "the foreign key is back: {fks:?}");
    assert!(fks[0].1, "and validated: {fks:?}");
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}

#[tokio::test]
async fn key_referenced_from_outside_the_migration_stays_and_unique_constraints_come_back(
) -> anyhow::Result<()> {
    let env = TestEnv::new("outside_reference").await?;
    let ddl = "CREATE TABLE public.authors (id bigint PRIMARY KEY, name text NOT NULL UNIQUE)";
    let s = connect(&env.source_dsn).await?;
    s.batch_execute(ddl).await?;
    s.batch_execute(
        "INSERT INTO authors SELECT i, 'Author ' || i FROM generate_series(1, 5000) i; ANALYZE",
    )
    .await?;
    let t = connect(&env.target_dsn).await?;
    t.batch_execute(ddl).await?;
    // A target table the run does not migrate points at the migrated table's key, so that
    // key cannot be dropped for the load; the unique constraint on name can.
    t.batch_execute(
        "CREATE TABLE public.reviews (id bigint PRIMARY KEY, author_id bigint REFERENCES public.authors (id))",
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(
        &dir,
        &spec_yaml(&env, 2, &[table_yaml("authors", &["id"], &["id", "name"])]),
    )?;
    schemashift_ok(&["run", &spec, "--until", "backfill"])?;
    assert_same(&env, "SELECT * FROM authors ORDER BY id").await?;
    let constraints: Vec<(String, String)> = t
        .query(
            "SELECT conname::text, contype::text FROM pg_constraint \
             WHERE conrelid IN ('public.authors'::regclass, 'public.reviews'::regclass) ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let want = [
        ("authors_name_key", "u"),
        ("authors_pkey", "p"),
        ("reviews_author_id_fkey", "f"),
        ("reviews_pkey", "p"),
    ];
    assert_eq!(
        constraints,
        want.map(|(n, k)| (n.to_owned(), k.to_owned())),
        "every constraint is there after the backfill"
    );
    let recorded: Vec<String> = t
        .query("SELECT name FROM schemashift.indexes ORDER BY name", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        recorded,
        ["authors_name_key"],
        "only the unreferenced unique index was dropped for the load"
    );
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}

#[tokio::test]
async fn values_of_every_kind_survive_mapping_replay_and_verify() -> anyhow::Result<()> {
    let env = TestEnv::new("value_types").await?;
    let src = "CREATE TABLE public.things (id bigint PRIMARY KEY, label text, empty text, uni text,
        big text, tags text[], doc jsonb, price numeric(20,6), at timestamptz, day date, flag boolean,
        ratio double precision)";
    let tgt = "CREATE TABLE public.things (id bigint PRIMARY KEY, label text, empty text, uni text,
        big text, tags text[], doc jsonb, price numeric(20,6), at timestamptz, day date, flag boolean,
        ratio double precision, label_len int GENERATED ALWAYS AS (length(label)) STORED)";
    let s = connect(&env.source_dsn).await?;
    s.batch_execute(src).await?;
    let fill = "INSERT INTO things SELECT i,
        CASE WHEN i % 5 = 0 THEN NULL ELSE 'label ' || i END, '', 'Zoë ☃ 東京 🌍 ' || i,
        CASE WHEN i % 50 = 0 THEN repeat(md5(i::text), 4000) END,
        ARRAY['a', NULL, 'c ' || i, ''], jsonb_build_object('i', i, 'nested', jsonb_build_object('x', ARRAY[1, 2]), 'nul', NULL),
        12345678901234.123456 / i, timestamptz '2024-03-31 01:30:00+01' + i * interval '17 minutes',
        date '2000-02-29' + i, i % 2 = 0, 1.0 / i
        FROM generate_series(1, 3000) i";
    s.batch_execute(fill).await?;
    connect(&env.target_dsn).await?.batch_execute(tgt).await?;
    let cols = [
        "id", "label", "empty", "uni", "big", "tags", "doc", "price", "at", "day", "flag", "ratio",
    ];
    let dir = tempfile::tempdir()?;
    let spec = write_spec(
        &dir,
        &spec_yaml(&env, 2, &[table_yaml("things", &["id"], &cols)]),
    )?;
    let out = schemashift(&["run", &spec, "--until", "backfill"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Changes that replay must carry exactly, in a session with another time zone.
    s.batch_execute(
        "SET TimeZone = 'America/St_Johns';
         UPDATE things SET uni = uni || ' ✓', tags = tags || ARRAY['é'], at = at + interval '1 day' WHERE id % 7 = 0;
         UPDATE things SET label = NULL, doc = doc - 'i' WHERE id % 11 = 0;
         UPDATE things SET flag = NOT flag WHERE id % 50 = 0; -- big stays as it is (unchanged TOAST)
         DELETE FROM things WHERE id % 13 = 0;
         INSERT INTO things (id, label, empty, uni, at) VALUES (100001, 'late', '', '𝄞', '2025-01-01 00:00:00');
         RESET TimeZone",
    )
    .await?;
    run_until_cutover(&spec)?;
    let list = cols.join(", ");
    assert_same(&env, &format!("SELECT {list} FROM things ORDER BY id")).await?;
    let t = connect(&env.target_dsn).await?;
    let bad: i64 = t
        .query_one(
            "SELECT count(*) FROM things WHERE label_len IS DISTINCT FROM length(label)",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(bad, 0, "the generated column is computed on the target");
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}
