//! The target's indexes that are not unique wait until replay has caught up with the
//! changes made during the backfill; a crash while they wait, then more changes (key
//! changes among them), then a resume: every index complete, every row as on the source.

use schemashift_lab::scenario::users_spec_yaml;
use schemashift_tests::{
    connect, schemashift, schemashift_to_failpoint, table_diff, unrestored_index_count, users_env,
    users_index_names, write_spec,
};

#[tokio::test]
async fn changes_replayed_before_the_name_indexes_exist_leave_every_index_complete_after_a_crash(
) -> anyhow::Result<()> {
    let env = users_env("deferred_index_crash", 20_000).await?;
    let dir = tempfile::tempdir()?;
    let spec = write_spec(
        &dir,
        &users_spec_yaml(&env.source_dsn, &env.target_dsn, 2, Some(5_000)),
    )?;
    // Aborts (like kill -9) once replay is stopped for the deferred builds, before any.
    schemashift_to_failpoint(
        &["run", &spec, "--until", "backfill"],
        "deferred-indexes-replay-stopped",
    )?;
    let t = connect(&env.target_dsn).await?;
    assert_eq!(
        users_index_names(&t).await?,
        ["users_email_key", "users_pkey"],
        "the unique indexes come back before replay, the name indexes wait"
    );
    let status = |spec: &str| -> anyhow::Result<serde_json::Value> {
        let out = schemashift(&["status", spec, "--json"])?;
        anyhow::ensure!(out.status.success(), "status failed");
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    assert_eq!(
        status(&spec)?["indexes_to_build"],
        serde_json::json!([
            "users_first_name_idx on public.users",
            "users_first_name_last_name_idx on public.users",
            "users_last_name_idx on public.users"
        ]),
        "status says which indexes wait"
    );

    // Replayed by the resumed run into a table without its name indexes: new names,
    // renamed users (their index keys move), key changes, deletes, a row changed twice.
    connect(&env.source_dsn)
        .await?
        .batch_execute(
            "INSERT INTO users (id, email, full_name, bio) \
               SELECT 100000 + g, 'late' || g || '@example.com', 'Late  Comer ' || g, 'b' \
               FROM generate_series(1, 500) g;
             UPDATE users SET full_name = 'Renamed Person ' || id WHERE id % 7 = 0;
             UPDATE users SET id = id + 1000000 WHERE id % 97 = 0;
             BEGIN;
             UPDATE users SET full_name = 'Twice Renamed' WHERE id = 100001;
             UPDATE users SET id = 200001, full_name = 'Moved  Away' WHERE id = 100001;
             COMMIT;
             DELETE FROM users WHERE id % 13 = 0;",
        )
        .await?;
    let out = schemashift(&["run", &spec, "--until", "replay", "--json"])?;
    assert!(
        out.status.success(),
        "resume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        users_index_names(&t).await?,
        [
            "users_email_key",
            "users_first_name_idx",
            "users_first_name_last_name_idx",
            "users_last_name_idx",
            "users_pkey"
        ]
    );
    let pending = unrestored_index_count(&t).await?;
    assert_eq!(pending, 0, "every recorded index is marked restored");
    assert_eq!(status(&spec)?["indexes_to_build"], serde_json::json!([]));
    // Every heap row is in every index, and each index is well formed (amcheck, as the
    // fixture's superuser).
    let admin = connect(&env.target_admin_dsn()).await?;
    admin
        .batch_execute("CREATE EXTENSION IF NOT EXISTS amcheck")
        .await?;
    for name in users_index_names(&t).await? {
        admin
            .execute("SELECT bt_index_check($1::text::regclass, true)", &[&name])
            .await?;
    }
    let s = connect(&env.source_dsn).await?;
    assert_eq!(table_diff(&s, &t).await?, (0, 0, 0));
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}
