//! A source role with least privilege: the documented grants (docs/privileges.md) and no
//! ownership, so an administrator makes the publication and the spec names it
//! (`source_publication`). `plan` prints what each role has and refuses what is missing.

use schemashift_lab::scenario::users_spec_yaml;
use schemashift_tests::{connect, dsn_with_db, schemashift, table_diff, users_env, write_spec};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn non_owner_source_role_migrates_through_an_administrators_publication() -> anyhow::Result<()>
{
    let env = users_env("least_priv", 3_000).await?;
    let admin = connect(&env.source_admin_dsn()).await?;
    // Roles are cluster-wide: a name of this test's own.
    let role = format!(
        "migrator_{}",
        &env.source_db[env.source_db.len() - 10..env.source_db.len() - 2]
    );
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN REPLICATION; GRANT SELECT ON users TO {role}; \
             CREATE PUBLICATION admin_pub FOR TABLE users; \
             CREATE TABLE other (id int PRIMARY KEY); CREATE PUBLICATION other_pub FOR TABLE other"
        ))
        .await?;
    let base =
        env.source_admin_dsn()
            .replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    let source = dsn_with_db(&base, &env.source_db);
    let dir = tempfile::tempdir()?;
    let yaml = users_spec_yaml(&source, &env.target_dsn, 2, Some(1_000));
    let yaml = format!("{yaml}throttle:\n  enabled: false\n");

    // Its own publication would need ownership: refused, saying what to do instead.
    let own = write_spec(&dir, &yaml)?;
    let out = schemashift(&["plan", &own])?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("source_publication"),
        "{}",
        stderr(&out)
    );

    // An administrator's publication, but only LOGIN REPLICATION and SELECT: the freeze's
    // and reverse sync's rights are missing, listed with their GRANTs; nothing written.
    let partial = dir.path().join("partial.yaml");
    std::fs::write(&partial, format!("{yaml}source_publication: admin_pub\n"))?;
    let out = schemashift(&["plan", &partial.to_string_lossy()])?;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for needed in [
        "MISSING",
        &format!(r#"GRANT UPDATE ON "public"."users" TO "{role}""#),
        &format!(r#"GRANT INSERT, UPDATE, DELETE ON "public"."users" TO "{role}""#),
        &format!(
            r#"GRANT CREATE ON DATABASE "{}" TO "{role}""#,
            env.source_db
        ),
    ] {
        assert!(err.contains(needed), "plan names {needed:?}:\n{err}");
    }
    let out = schemashift(&["plan", &partial.to_string_lossy(), "--json"])?;
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let missing = schemashift_tests::absent_privileges(&plan, Some("source"));
    assert_eq!(
        missing,
        [
            r#"UPDATE, DELETE or TRUNCATE on "public"."users""#,
            "SELECT, UPDATE on sequence users_id_seq",
            r#"INSERT, UPDATE, DELETE on "public"."users""#,
            "CREATE on the database",
            "EXECUTE on the replication origin functions",
        ],
        "{plan}"
    );
    assert!(plan["tables"].is_null(), "{plan}");
    admin
        .batch_execute(&format!(
            "GRANT INSERT, UPDATE, DELETE ON users TO {role}; \
             GRANT SELECT, UPDATE ON SEQUENCE users_id_seq TO {role}; \
             GRANT CREATE ON DATABASE {} TO {role}",
            env.source_db
        ))
        .await?;

    // A publication that does not cover the table: refused, naming it.
    let wrong = dir.path().join("wrong.yaml");
    std::fs::write(&wrong, format!("{yaml}source_publication: other_pub\n"))?;
    let out = schemashift(&["plan", &wrong.to_string_lossy()])?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("does not cover table"),
        "{}",
        stderr(&out)
    );

    // The administrator's publication: the run goes, and cleanup leaves it.
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, format!("{yaml}source_publication: admin_pub\n"))?;
    let good = good.to_string_lossy().into_owned();
    let out = schemashift(&["run", &good, "--until", "backfill"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    admin
        .batch_execute("UPDATE users SET bio = 'seen through admin_pub' WHERE id % 5 = 0")
        .await?;
    let out = schemashift(&["plan", &good])?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out)
            .lines()
            .any(|l| l.contains("missing (optional)") && l.contains("replication origin functions")),
        "the origin functions are optional and said so:\n{}",
        stderr(&out)
    );
    let out = schemashift(&["run", &good, "--until", "verify"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let t = connect(&env.target_dsn).await?;
    assert_eq!(table_diff(&admin, &t).await?, (0, 0, 0));
    // The freeze, the switch and the way back with the same role.
    let out = schemashift(&["cutover", &good])?;
    assert!(out.status.success(), "{}", stderr(&out));
    t.batch_execute(
        "UPDATE users SET bio = 'written after the switch' WHERE id % 7 = 0; \
         INSERT INTO users (email, first_name, last_name, bio) \
         SELECT 'after' || i || '@example.com', 'After', 'Switch', 'new on the target' \
         FROM generate_series(1, 5) i",
    )
    .await?;
    let out = schemashift(&["rollback", &good])?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(table_diff(&admin, &t).await?, (0, 0, 0));
    // The application's next insert on the source takes an id no row has.
    let (last, max): (i64, i64) = {
        let r = admin
            .query_one(
                "SELECT (SELECT last_value FROM users_id_seq), (SELECT max(id) FROM users)",
                &[],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    assert!(last >= max, "source sequence at {last}, rows up to {max}");
    let out = schemashift(&["cleanup", &good])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let pubs: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_publication WHERE pubname IN ('admin_pub', 'other_pub')",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(pubs, 2, "the administrator's publications stay");
    admin
        .batch_execute(&format!(
            "DROP PUBLICATION admin_pub, other_pub; DROP OWNED BY {role}; DROP ROLE {role}"
        ))
        .await?;
    env.drop_all().await
}
