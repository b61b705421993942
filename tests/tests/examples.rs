//! Every directory under examples/ runs end to end: schemas and rows from its SQL, backfill,
//! its changes replayed, verify, cutover, then its own compare of source and target.

use schemashift_tests::{connect, schemashift, write_spec, TestEnv};
use std::path::{Path, PathBuf};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// The `-- source` and `-- target` queries of compare.sql.
fn compare_queries(text: &str) -> anyhow::Result<(String, String)> {
    let (_, rest) = text
        .split_once("-- source")
        .ok_or_else(|| anyhow::anyhow!("compare.sql lacks `-- source`"))?;
    let (src, tgt) = rest
        .split_once("-- target")
        .ok_or_else(|| anyhow::anyhow!("compare.sql lacks `-- target`"))?;
    let clean = |s: &str| s.trim().trim_end_matches(';').to_owned();
    Ok((clean(src), clean(tgt)))
}

async fn rows(dsn: &str, sql: &str) -> anyhow::Result<Vec<String>> {
    Ok(connect(dsn)
        .await?
        .query(&format!("SELECT t::text FROM ({sql}) t"), &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

async fn run_example(dir: &Path) -> anyhow::Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let read = |f: &str| std::fs::read_to_string(dir.join(f));
    let env = TestEnv::new(&format!("example_{name}")).await?;
    connect(&env.source_dsn)
        .await?
        .batch_execute(&read("source.sql")?)
        .await?;
    connect(&env.target_dsn)
        .await?
        .batch_execute(&read("target.sql")?)
        .await?;
    let spec_text = read("spec.yaml")?
        .replace("${SOURCE_DSN}", &env.source_dsn)
        .replace("${TARGET_DSN}", &env.target_dsn);
    let tmp = tempfile::tempdir()?;
    let spec = write_spec(&tmp, &spec_text)?;
    let ok = |args: &[&str]| -> anyhow::Result<()> {
        let out = schemashift(args)?;
        anyhow::ensure!(
            out.status.success(),
            "example {name}: schemashift {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    ok(&["run", &spec, "--until", "backfill"])?;
    connect(&env.source_dsn)
        .await?
        .batch_execute(&read("changes.sql")?)
        .await?;
    ok(&["run", &spec, "--until", "cutover"])?;
    ok(&["verify", &spec])?;
    let (src_q, tgt_q) = compare_queries(&read("compare.sql")?)?;
    let (s, t) = (
        rows(&env.source_dsn, &src_q).await?,
        rows(&env.target_dsn, &tgt_q).await?,
    );
    anyhow::ensure!(
        !s.is_empty(),
        "example {name}: the compare query returns rows"
    );
    anyhow::ensure!(
        s == t,
        "example {name}: source and target differ ({} vs {} rows; first difference {:?})",
        s.len(),
        t.len(),
        s.iter().zip(&t).find(|(a, b)| a != b)
    );
    // Every target sequence owned by a migrated column is past the values it must not repeat.
    let t = connect(&env.target_dsn).await?;
    let serials = t
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname), a.attname::text FROM pg_attribute a \
             JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'public' AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped \
             AND pg_get_serial_sequence(format('%I.%I', n.nspname, c.relname), a.attname) IS NOT NULL",
            &[],
        )
        .await?;
    for r in &serials {
        let (table, col): (String, String) = (r.get(0), r.get(1));
        let ok: bool = t
            .query_one(
                &format!(
                    "SELECT (SELECT last_value FROM {seq}) >= coalesce((SELECT max({col}) FROM {table}), 0)",
                    seq = t
                        .query_one("SELECT pg_get_serial_sequence($1, $2)", &[&table, &col])
                        .await?
                        .get::<_, String>(0),
                ),
                &[],
            )
            .await?
            .get(0);
        anyhow::ensure!(
            ok,
            "example {name}: the sequence of {table}.{col} was not moved past its values"
        );
    }
    schemashift(&["cleanup", &spec])?;
    env.drop_all().await
}

#[tokio::test]
async fn every_example_migrates_end_to_end() -> anyhow::Result<()> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(examples_dir())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("spec.yaml").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 4, "examples found: {dirs:?}");
    for d in &dirs {
        run_example(d).await?;
    }
    Ok(())
}
