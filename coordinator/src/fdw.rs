//! The FDW strategy's plumbing on the target: postgres_fdw, a server for the source, a user
//! mapping with the source's credentials, and one foreign table per FDW table in the control
//! schema. Everything is created idempotently when a run starts or resumes, and dropped by
//! cleanup (the foreign tables go with the control schema, the server explicitly).

use crate::error::CoordinatorError;
use schemashift_common::conninfo::{ConnInfo, SslMode};
use schemashift_common::control::ControlSql;
use schemashift_common::plan::{RunPlan, ShardRange, TablePlan, Transfer};
use schemashift_common::spec::Dsn;
use schemashift_common::sql::{quote_ident, quote_literal};
use tokio_postgres::config::Host;
use tokio_postgres::Client;

/// The foreign server's name for a control schema.
fn server(control_schema: &str) -> String {
    quote_ident(&format!("{control_schema} source"))
}

/// Creates what the plan's FDW tables read through, unless there.
pub async fn ensure(target: &Client, source: &Dsn, plan: &RunPlan) -> Result<(), CoordinatorError> {
    let tables: Vec<_> = plan
        .tables
        .iter()
        .filter(|t| t.transfer == Transfer::Fdw)
        .collect();
    ensure_for(target, source, &plan.control_schema, &tables).await
}

/// Creates the server, user mapping and these tables' foreign tables, unless there.
pub async fn ensure_for(
    target: &Client,
    source: &Dsn,
    control_schema: &str,
    tables: &[&TablePlan],
) -> Result<(), CoordinatorError> {
    if tables.is_empty() {
        return Ok(());
    }
    let info = source.conninfo().map_err(|_| {
        CoordinatorError::State(format!(
            "the source connection string ({}) cannot be read for postgres_fdw",
            source.redacted()
        ))
    })?;
    let sql = setup_sql(&info, control_schema, tables);
    let srv = server(control_schema);
    let failed = |e: tokio_postgres::Error| {
        CoordinatorError::State(format!(
            "setting up postgres_fdw on the target for the fdw strategy failed: {} \
             (the target role needs to create the extension, a server, a user mapping and \
             foreign tables; or use strategy copy)",
            e.as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_else(|| "connection lost".into())
        ))
    };
    target.batch_execute(&sql).await.map_err(failed)?;
    let made = user_mapping(target, control_schema, &info).await;
    // The options (password included) leave the session's temporary table at once.
    let dropped = target
        .batch_execute("DROP TABLE IF EXISTS pg_temp.schemashift_fdw_mapping")
        .await;
    made.and(dropped).map_err(failed)?;
    tracing::info!(server = %srv, "postgres_fdw set up for the fdw strategy");
    Ok(())
}

/// The user mapping's options, as COPY data: the password never appears in a statement's
/// text, where `pg_stat_activity`, `pg_stat_statements` and a `log_statement` server log
/// would show it (COPY data is neither logged nor shown). A DO block builds the statement
/// from them; an error in it is re-raised with its message only, as the context of the
/// statement it ran would carry the password into the log.
async fn user_mapping(
    tx: &Client,
    control_schema: &str,
    info: &ConnInfo,
) -> Result<(), tokio_postgres::Error> {
    use futures_util::SinkExt;
    tx.batch_execute(
        "DROP TABLE IF EXISTS pg_temp.schemashift_fdw_mapping; \
         CREATE TEMP TABLE schemashift_fdw_mapping (n int, k text, v text)",
    )
    .await?;
    let rows = mapping_options(control_schema, info);
    let sink = tx
        .copy_in("COPY pg_temp.schemashift_fdw_mapping (n, k, v) FROM STDIN")
        .await?;
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for (n, (k, v)) in rows.iter().enumerate() {
        data.push_str(&format!("{n}\t{k}\t{}\n", copy_text(v)));
    }
    sink.send(bytes::Bytes::from(data)).await?;
    sink.finish().await?;
    tx.batch_execute(
        "DO $mapping$ DECLARE srv text; opts text; BEGIN \
           SELECT v INTO srv FROM pg_temp.schemashift_fdw_mapping WHERE k = 'server'; \
           SELECT string_agg(format('%s %L', k, v), ', ' ORDER BY n) INTO opts \
             FROM pg_temp.schemashift_fdw_mapping WHERE k <> 'server'; \
           BEGIN \
             EXECUTE format('CREATE USER MAPPING IF NOT EXISTS FOR CURRENT_USER SERVER %I OPTIONS (%s)', srv, opts); \
           EXCEPTION WHEN OTHERS THEN RAISE EXCEPTION USING ERRCODE = SQLSTATE, MESSAGE = SQLERRM; \
           END; \
         END $mapping$",
    )
    .await
}

/// `(option, value)` rows: the server's name, then the user mapping's options (the keys are
/// ours: fixed option names; the values are the connection string's).
fn mapping_options(control_schema: &str, info: &ConnInfo) -> Vec<(&'static str, String)> {
    let cfg = &info.config;
    let mut rows = vec![
        ("server", format!("{control_schema} source")),
        ("user", cfg.get_user().unwrap_or("postgres").to_owned()),
    ];
    if let (Some(cert), Some(key)) = (&info.tls.cert, &info.tls.key) {
        rows.push(("sslcert", cert.to_string_lossy().into_owned()));
        rows.push(("sslkey", key.to_string_lossy().into_owned()));
    }
    if let Some(pw) = cfg.get_password() {
        rows.push(("password", String::from_utf8_lossy(pw).into_owned()));
    }
    rows
}

/// A value in COPY's text format: backslash, tab, newline and carriage return escaped.
fn copy_text(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

/// The statements that set up what `tables` read through: extension, server, foreign
/// tables (the user mapping is [`user_mapping`]'s). Every name and value quoted.
fn setup_sql(info: &ConnInfo, control_schema: &str, tables: &[&TablePlan]) -> String {
    let cfg = &info.config;
    let host = match cfg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().unwrap_or("postgres");
    let dbname = cfg.get_dbname().unwrap_or(user);
    let srv = server(control_schema);
    let control = ControlSql::new(control_schema);
    // The same TLS rules as our own sessions; certificate paths are read by the target's
    // server, so they must exist there too.
    let tls = &info.tls;
    let mode = match tls.mode {
        SslMode::Disable => "disable",
        SslMode::Allow => "allow",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    };
    let mut server_tls = format!(", sslmode {}", quote_literal(mode));
    if let (Some(root), SslMode::VerifyCa | SslMode::VerifyFull) = (&tls.root_cert, tls.mode) {
        server_tls.push_str(&format!(
            ", sslrootcert {}",
            quote_literal(&root.to_string_lossy())
        ));
    }
    let mut sql = format!(
        "CREATE EXTENSION IF NOT EXISTS postgres_fdw; \
         CREATE SERVER IF NOT EXISTS {srv} FOREIGN DATA WRAPPER postgres_fdw \
         OPTIONS (host {}, port {}, dbname {}, fetch_size '10000', application_name 'schemashift'{server_tls});",
        quote_literal(&host),
        quote_literal(&port.to_string()),
        quote_literal(dbname)
    );
    for t in tables {
        let cols: Vec<String> = t
            .source_columns
            .iter()
            .map(|c| format!("{} {}", quote_ident(&c.name), c.sql_type))
            .collect();
        sql.push_str(&format!(
            "CREATE FOREIGN TABLE IF NOT EXISTS {} ({}) SERVER {srv} \
             OPTIONS (schema_name {}, table_name {});",
            control.table(&t.foreign_table_name()),
            cols.join(", "),
            quote_literal(&t.source.schema),
            quote_literal(&t.source.name)
        ));
    }
    sql
}

/// Drops the source server and what depends on it (user mapping, foreign tables).
pub async fn drop(target: &Client, control_schema: &str) -> Result<(), CoordinatorError> {
    target
        .batch_execute(&format!(
            "DROP SERVER IF EXISTS {} CASCADE",
            server(control_schema)
        ))
        .await
        .map_err(|e| CoordinatorError::db("dropping the postgres_fdw server", &e))
}

/// Rows per second of each strategy on this table, measured on its servers: the first
/// `rows` rows of `range` moved both ways into a temporary table of the target's columns
/// (so the real target is untouched). A first round that keeps copy (the default without
/// `auto`) ends the measurement: the sample moved again is pure overhead, about 4% of a
/// million-row table's backfill CPU per round. A round that would choose fdw is confirmed
/// by a second one, best of two each: fdw chosen wrongly halved the load's speed.
pub async fn measure(
    source: &Client,
    target_dsn: &Dsn,
    plan: &RunPlan,
    table: &TablePlan,
    range: &ShardRange,
    rows: u64,
) -> Result<Speeds, CoordinatorError> {
    let db = |what: &'static str| move |e: tokio_postgres::Error| CoordinatorError::db(what, &e);
    let target = schemashift_common::pg::connect(target_dsn, "target").await?;
    schemashift_common::pg::install_helpers(&target, &plan.helpers, "target").await?;
    let probe = "pg_temp.\"schemashift probe\"";
    target
        .batch_execute(&format!(
            "CREATE TEMP TABLE {probe} (LIKE {} INCLUDING DEFAULTS)",
            table.target
        ))
        .await
        .map_err(db("creating the strategy probe table"))?;
    let ft = ControlSql::new(&plan.control_schema).table(&table.foreign_table_name());
    let fdw_sql = table.fdw_insert_sql_into(probe, &ft, range, Some(rows));
    let (copy_out, copy_in) = (
        table.copy_out_sql_limited(range, rows),
        table.copy_in_sql_into(probe),
    );
    // Each move is timed, then the probe emptied for the next.
    let rate = |n: u64, t0: std::time::Instant| n as f64 / t0.elapsed().as_secs_f64().max(1e-6);
    let truncate = format!("TRUNCATE {probe}");
    let mut best = Speeds::default();
    for _ in 0..2 {
        let t0 = std::time::Instant::now();
        let copy = db("measuring the copy strategy");
        let n = schemashift_common::pg::pipe_copy(
            target.copy_in(&copy_in).await.map_err(copy)?,
            source.copy_out(&copy_out).await.map_err(copy)?,
        )
        .await
        .map_err(copy)?;
        best.copy = best.copy.max(rate(n, t0));
        target
            .batch_execute(&truncate)
            .await
            .map_err(db("measuring the strategies"))?;
        let t0 = std::time::Instant::now();
        let n = target
            .execute(&fdw_sql, &[])
            .await
            .map_err(db("measuring the fdw strategy"))?;
        best.fdw = best.fdw.max(rate(n, t0));
        target
            .batch_execute(&truncate)
            .await
            .map_err(db("measuring the strategies"))?;
        if best.faster() == Transfer::Copy {
            break;
        }
    }
    Ok(best)
}

/// Measured rows per second of each strategy.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Speeds {
    pub copy: f64,
    pub fdw: f64,
}

/// How much faster fdw must measure to be chosen. The measurement is one stream into a
/// temporary table; the real load runs every worker at once, and fdw then evaluates every
/// mapping and inserts through the executor on the target, where copy splits the work
/// between both servers. A measured tie (201K vs 203K rows/s) ran at half copy's speed in
/// the 4-worker benchmark.
const FDW_MARGIN: f64 = 1.25;

impl Speeds {
    /// The strategy to keep: copy unless fdw measured clearly faster.
    pub fn faster(&self) -> Transfer {
        if self.fdw > self.copy * FDW_MARGIN {
            Transfer::Fdw
        } else {
            Transfer::Copy
        }
    }
}

/// Rows each strategy moves in the measurement: enough to see both at speed, a fraction of
/// a second each.
const MEASURED_ROWS: u64 = 20_000;

/// For tables planned `auto` that could also go by FDW (no lookups, postgres_fdw on the
/// target): measures both strategies, keeps the faster in the recorded plan and shows both
/// rates in the analysis. A measurement that cannot be made (say, no right to create the
/// extension) leaves the table on copy.
pub async fn choose_auto(
    spec: &schemashift_common::spec::Spec,
    source: &Client,
    target: &Client,
    store: &crate::control::Store,
    planned: &mut crate::plan::Planned,
    mut known: Option<&mut schemashift_common::gate::Measured>,
) -> Result<(), CoordinatorError> {
    use schemashift_common::spec::Strategy;
    let mut changed = false;
    for i in 0..planned.plan.tables.len() {
        let t = &planned.plan.tables[i];
        let auto = spec
            .tables
            .get(t.index as usize)
            .is_some_and(|s| s.strategy == Strategy::Auto);
        if !auto || !t.lookups.is_empty() {
            continue;
        }
        // Measuring copies the sample twice: on a table no bigger than it (a fleet of small
        // tenants has hundreds), that is more work than the copy it would choose for.
        if t.estimated_rows <= MEASURED_ROWS {
            tracing::info!(
                table = %t.describe(),
                rows = t.estimated_rows,
                "strategy auto: table no bigger than the measuring sample, using copy"
            );
            continue;
        }
        let mine: Vec<_> = planned
            .shards
            .iter()
            .filter(|s| s.table == t.index)
            .collect();
        // The middle shard: the first and last are open-ended and may be thin.
        let Some(shard) = mine.get(mine.len() / 2) else {
            continue;
        };
        let plan = &planned.plan;
        let key = t.source.to_string();
        let earlier = known.as_ref().and_then(|k| k.get(&key).copied());
        let measured = match earlier {
            // A fleet member on the same two servers measured this table already.
            Some((copy, fdw)) => {
                let speeds = Speeds { copy, fdw };
                match speeds.faster() {
                    Transfer::Fdw => ensure_for(target, &spec.source, &plan.control_schema, &[t])
                        .await
                        .map(|_| speeds),
                    Transfer::Copy => Ok(speeds),
                }
            }
            None => {
                async {
                    ensure_for(target, &spec.source, &plan.control_schema, &[t]).await?;
                    measure(source, &spec.target, plan, t, &shard.range, MEASURED_ROWS).await
                }
                .await
            }
        };
        if let (Ok(speeds), Some(k), None) = (&measured, known.as_mut(), earlier) {
            k.insert(key, (speeds.copy, speeds.fdw));
        }
        match measured {
            Ok(speeds) => {
                let transfer = speeds.faster();
                tracing::info!(
                    table = %t.describe(),
                    copy_rows_per_s = speeds.copy as u64,
                    fdw_rows_per_s = speeds.fdw as u64,
                    strategy = transfer.as_str(),
                    "strategy auto: measured both, keeping the faster"
                );
                planned.plan.tables[i].transfer = transfer;
                if let Some(a) = planned.analysis.get_mut(i) {
                    a.strategy = transfer.as_str().into();
                    a.measured_rows_per_s = Some(speeds);
                }
                changed = true;
            }
            Err(e) => tracing::warn!(
                table = %t.describe(),
                error = %e,
                "strategy auto: fdw not measurable, using copy"
            ),
        }
    }
    if changed {
        store.save_plan(target, &planned.plan).await?;
    }
    // The measurement's user mapping holds the source password in the target's catalog:
    // kept only when a table goes by fdw (cleanup drops it then).
    if !planned
        .plan
        .tables
        .iter()
        .any(|t| t.transfer == Transfer::Fdw)
    {
        drop(target, &planned.plan.control_schema).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemashift_common::plan::SourceColumn;
    use schemashift_common::sql::QualifiedName;

    #[test]
    fn auto_keeps_copy_unless_fdw_is_clearly_faster() {
        let s = |copy, fdw| Speeds { copy, fdw }.faster();
        assert_eq!(
            s(201_017.0, 202_755.0),
            Transfer::Copy,
            "a tie goes to copy"
        );
        assert_eq!(s(300_000.0, 220_000.0), Transfer::Copy);
        assert_eq!(s(100_000.0, 124_000.0), Transfer::Copy);
        assert_eq!(s(100_000.0, 130_000.0), Transfer::Fdw);
        assert_eq!(s(0.0, 0.0), Transfer::Copy);
    }

    #[test]
    fn copy_text_escapes_what_copy_would_read_as_structure() {
        assert_eq!(copy_text("a b'c\"@/"), "a b'c\"@/");
        assert_eq!(copy_text("t\tn\nr\rb\\"), "t\\tn\\nr\\rb\\\\");
    }

    #[test]
    fn setup_quotes_hostile_names_and_leaves_the_password_out() {
        let info = schemashift_common::conninfo::parse(
            r"host=db.example port=5433 dbname=old user=mig password=pa\'ss sslmode=verify-full sslrootcert=/etc/ca.pem",
        )
        .expect("dsn");
        let mut t: TablePlan = serde_json::from_value(serde_json::json!({
            "index": 2, "source": {"schema": "we\"ird", "name": "us'ers"},
            "target": {"schema": "public", "name": "users"},
            "key": [], "target_key": [], "columns": [], "source_columns": [],
            "sequences": [], "estimated_rows": 0, "estimated_bytes": 0, "shard_rows": 1
        }))
        .expect("table plan");
        t.source_columns.push(SourceColumn {
            name: "full name".into(),
            sql_type: "text".into(),
        });
        assert_eq!(
            t.source,
            QualifiedName {
                schema: "we\"ird".into(),
                name: "us'ers".into()
            }
        );
        let sql = setup_sql(&info, "ctl", &[&t]);
        assert!(sql.contains("CREATE SERVER IF NOT EXISTS \"ctl source\" FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host 'db.example', port '5433', dbname 'old'"), "{sql}");
        assert!(
            sql.contains(", sslmode 'verify-full', sslrootcert '/etc/ca.pem');"),
            "{sql}"
        );
        assert!(
            !sql.contains("pa'ss") && !sql.contains("pa''ss") && !sql.contains("password"),
            "no password in statement text: {sql}"
        );
        let opts = mapping_options("ctl", &info);
        assert_eq!(
            opts,
            [
                ("server", "ctl source".to_owned()),
                ("user", "mig".to_owned()),
                ("password", "pa'ss".to_owned())
            ]
        );
        assert!(sql.contains("CREATE FOREIGN TABLE IF NOT EXISTS \"ctl\".\"source 2\" (\"full name\" text) SERVER \"ctl source\" OPTIONS (schema_name 'we\"ird', table_name 'us''ers');"), "{sql}");
    }
}
