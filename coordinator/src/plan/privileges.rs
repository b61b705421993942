//! What each role needs, phase by phase (docs/privileges.md), read from the catalogs:
//! `plan` prints it as a table and refuses the run when something needed is missing, before
//! anything is written. Optional rights say what is lost without them.

use schemashift_common::spec::Spec;
use schemashift_common::sql::{quote_ident, QualifiedName};
use serde::Serialize;
use tokio_postgres::Client;

type Checked<T> = Result<T, tokio_postgres::Error>;

/// One right the run uses on one server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Privilege {
    /// `source` or `target`.
    pub side: &'static str,
    pub privilege: String,
    /// The phases that use it.
    pub used_for: &'static str,
    pub present: bool,
    /// Needed for the run; an optional one only costs what `without` says.
    pub required: bool,
    /// The statement that grants it (run by the tables' owner or an administrator).
    pub fix: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub without: Option<&'static str>,
}

impl Privilege {
    /// A right the run cannot do without.
    fn needed(
        side: &'static str,
        privilege: String,
        used_for: &'static str,
        present: bool,
        fix: String,
    ) -> Self {
        Privilege {
            side,
            privilege,
            used_for,
            present,
            required: true,
            fix,
            without: None,
        }
    }

    pub fn missing(&self) -> bool {
        self.required && !self.present
    }

    /// A problem line for the planner: the server, what is missing, and the fix.
    pub fn problem(&self) -> String {
        format!(
            "{}: the role lacks {} (for {}); {}",
            self.side, self.privilege, self.used_for, self.fix
        )
    }
}

/// The tables the run reads, locks and writes, by side.
pub struct Tables<'a> {
    /// Source tables of the spec (copied, frozen, written back by reverse sync).
    pub source: &'a [QualifiedName],
    /// Tables joined in by `lookups`: read only.
    pub lookups: &'a [QualifiedName],
    pub target: &'a [QualifiedName],
}

/// Every right the spec's run needs, with whether the connecting roles have it. Tables
/// that do not exist are left out (the planner reports them).
pub async fn check(
    spec: &Spec,
    source: &Client,
    target: &Client,
    tables: &Tables<'_>,
) -> Checked<Vec<Privilege>> {
    let mut out = Vec::new();
    let reverse = spec.cutover.reverse;
    let own_publication = spec.source_publication.is_none();
    let src_role: String = source
        .query_one("SELECT current_user::text", &[])
        .await?
        .get(0);
    let tgt_role: String = target
        .query_one("SELECT current_user::text", &[])
        .await?
        .get(0);
    let (sr, tr) = (quote_ident(&src_role), quote_ident(&tgt_role));

    out.push(Privilege::needed(
        "source",
        "REPLICATION (or rds_replication)".into(),
        "capture: the slot and the replication stream",
        may_replicate(source).await?,
        format!("ALTER ROLE {sr} REPLICATION; on RDS: GRANT rds_replication TO {sr}"),
    ));
    for t in tables.source.iter().chain(tables.lookups) {
        let Some(has) = table_rights(source, t).await? else {
            continue;
        };
        let is_source = tables.source.contains(t);
        out.push(Privilege::needed(
            "source",
            format!("SELECT on {t}"),
            "backfill, replay, verify",
            has.select,
            format!("GRANT SELECT ON {t} TO {sr}"),
        ));
        if own_publication {
            out.push(Privilege::needed(
                "source",
                format!("ownership of {t}"),
                "capture: creating the run's publication",
                has.owner,
                format!(
                    "have an administrator CREATE PUBLICATION <name> FOR TABLE {t} and name it \
                     in the spec as `source_publication: <name>` (or ALTER TABLE {t} OWNER TO {sr})"
                ),
            ));
        }
        if !is_source {
            continue;
        }
        out.push(Privilege::needed(
            "source",
            format!("UPDATE, DELETE or TRUNCATE on {t}"),
            "cutover: LOCK ... IN EXCLUSIVE MODE, the write freeze",
            has.lock,
            format!("GRANT UPDATE ON {t} TO {sr}"),
        ));
        for (seq, select, update) in owned_sequences(source, t).await? {
            let (privilege, present, used_for) = if reverse {
                (
                    "SELECT, UPDATE",
                    select && update,
                    "cutover (read) and rollback (moved past the target's)",
                )
            } else {
                (
                    "SELECT",
                    select,
                    "cutover: the target's sequence moves past it",
                )
            };
            out.push(Privilege::needed(
                "source",
                format!("{privilege} on sequence {seq}"),
                used_for,
                present,
                format!("GRANT {privilege} ON SEQUENCE {seq} TO {sr}"),
            ));
        }
        if reverse {
            out.push(Privilege::needed(
                "source",
                format!("INSERT, UPDATE, DELETE on {t}"),
                "reverse sync and rollback after the cutover",
                has.write,
                format!(
                    "GRANT INSERT, UPDATE, DELETE ON {t} TO {sr} (or `cutover: {{reverse: false}}`, \
                     giving up the way back)"
                ),
            ));
        }
    }
    if reverse {
        out.push(Privilege::needed(
            "source",
            "CREATE on the database".into(),
            "reverse sync's control schema",
            can_create(source).await?,
            format!(
                "GRANT CREATE ON DATABASE {} TO {sr}",
                current_db(source).await?
            ),
        ));
        out.push(
            origin_rights(
                source,
                "source",
                &sr,
                "reverse sync's writes are not marked: a forward capture running at the same time \
             would see them as the application's",
            )
            .await?,
        );
    }

    out.push(Privilege::needed(
        "target",
        "CREATE on the database".into(),
        "the control schema (run, shards, leases, change log)",
        can_create(target).await?,
        format!(
            "GRANT CREATE ON DATABASE {} TO {tr}",
            current_db(target).await?
        ),
    ));
    let mut schemas: Vec<&str> = tables.target.iter().map(|t| t.schema.as_str()).collect();
    schemas.sort_unstable();
    schemas.dedup();
    for schema in schemas {
        let present: Option<bool> = target
            .query_one(
                "SELECT CASE WHEN to_regnamespace($1) IS NULL THEN NULL \
                 ELSE has_schema_privilege(to_regnamespace($1), 'CREATE') END",
                &[&quote_ident(schema)],
            )
            .await?
            .get(0);
        let Some(present) = present else { continue };
        out.push(Privilege::needed(
            "target",
            format!("CREATE on schema {}", quote_ident(schema)),
            "backfill: building the indexes dropped for the load",
            present,
            format!("GRANT CREATE ON SCHEMA {} TO {tr}", quote_ident(schema)),
        ));
    }
    for t in tables.target {
        let Some(has) = table_rights(target, t).await? else {
            continue;
        };
        out.push(Privilege::needed(
            "target",
            format!("ownership of {t}"),
            "backfill and cutover: dropping and rebuilding its indexes, moving its sequences",
            has.owner,
            format!("ALTER TABLE {t} OWNER TO {tr}"),
        ));
        out.push(Privilege::needed(
            "target",
            format!("SELECT, INSERT, UPDATE, DELETE on {t}"),
            "backfill, replay, verify",
            has.select && has.write,
            format!("GRANT SELECT, INSERT, UPDATE, DELETE ON {t} TO {tr}"),
        ));
    }
    if reverse {
        out.push(Privilege::needed(
            "target",
            "REPLICATION (or rds_replication)".into(),
            "reverse sync's slot after the cutover",
            may_replicate(target).await?,
            format!(
                "ALTER ROLE {tr} REPLICATION; on RDS: GRANT rds_replication TO {tr} (or \
                 `cutover: {{reverse: false}}`, giving up the way back)"
            ),
        ));
    }
    out.push(
        origin_rights(
            target,
            "target",
            &tr,
            "replay's writes are not marked: after the cutover reverse sync would send the \
             writes replay carried over back to the source, where they already are",
        )
        .await?,
    );
    Ok(out)
}

struct TableRights {
    select: bool,
    owner: bool,
    /// Any of UPDATE, DELETE, TRUNCATE: what `LOCK ... IN EXCLUSIVE MODE` needs on PG 15.
    lock: bool,
    /// INSERT, UPDATE and DELETE.
    write: bool,
}

async fn table_rights(client: &Client, t: &QualifiedName) -> Checked<Option<TableRights>> {
    let row = client
        .query_one(
            "SELECT c.oid IS NOT NULL, \
             coalesce(has_table_privilege(c.oid, 'SELECT'), false), \
             coalesce(pg_has_role(c.relowner, 'USAGE'), false), \
             coalesce(has_table_privilege(c.oid, 'UPDATE') OR has_table_privilege(c.oid, 'DELETE') \
                      OR has_table_privilege(c.oid, 'TRUNCATE'), false), \
             coalesce(has_table_privilege(c.oid, 'INSERT') AND has_table_privilege(c.oid, 'UPDATE') \
                      AND has_table_privilege(c.oid, 'DELETE'), false) \
             FROM (SELECT to_regclass($1) AS oid) r LEFT JOIN pg_class c ON c.oid = r.oid",
            &[&t.to_string()],
        )
        .await?;
    Ok(row.get::<_, bool>(0).then(|| TableRights {
        select: row.get(1),
        owner: row.get(2),
        lock: row.get(3),
        write: row.get(4),
    }))
}

/// Sequences owned by the table's columns (serial and identity), with SELECT and UPDATE.
async fn owned_sequences(client: &Client, t: &QualifiedName) -> Checked<Vec<(String, bool, bool)>> {
    let rows = client
        .query(
            "SELECT s.oid::regclass::text, has_sequence_privilege(s.oid, 'SELECT'), \
             has_sequence_privilege(s.oid, 'UPDATE') \
             FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' \
             WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass \
               AND d.refobjid = to_regclass($1) AND d.deptype IN ('a', 'i') \
             ORDER BY 1",
            &[&t.to_string()],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// The REPLICATION attribute, a superuser, or membership in RDS's `rds_replication`.
async fn may_replicate(client: &Client) -> Checked<bool> {
    Ok(client
        .query_one(
            "SELECT r.rolsuper OR r.rolreplication OR coalesce( \
               (SELECT pg_has_role(current_user, g.oid, 'MEMBER') FROM pg_roles g \
                WHERE g.rolname = 'rds_replication'), false) \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?
        .get(0))
}

async fn can_create(client: &Client) -> Checked<bool> {
    Ok(client
        .query_one(
            "SELECT has_database_privilege(current_database(), 'CREATE')",
            &[],
        )
        .await?
        .get(0))
}

async fn current_db(client: &Client) -> Checked<String> {
    let db: String = client
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0);
    Ok(quote_ident(&db))
}

/// EXECUTE on the replication origin functions the run calls (superuser only unless
/// granted, on PostgreSQL 15).
async fn origin_rights(
    client: &Client,
    side: &'static str,
    role: &str,
    without: &'static str,
) -> Checked<Privilege> {
    let present: bool = client
        .query_one(
            "SELECT has_function_privilege('pg_replication_origin_create(text)', 'EXECUTE') \
             AND has_function_privilege('pg_replication_origin_session_setup(text)', 'EXECUTE') \
             AND has_function_privilege('pg_replication_origin_oid(text)', 'EXECUTE')",
            &[],
        )
        .await?
        .get(0);
    Ok(Privilege {
        side,
        privilege: "EXECUTE on the replication origin functions".into(),
        used_for: "echo suppression (marking our own writes)",
        present,
        required: false,
        fix: format!(
            "GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), \
             pg_replication_origin_session_setup(text), pg_replication_origin_oid(text) TO {role}"
        ),
        without: Some(without),
    })
}

/// The table `plan` prints: one line per right, missing ones marked with what fixes them.
pub fn render(privileges: &[Privilege]) -> String {
    let mut out = String::from("privileges:\n");
    for p in privileges {
        let state = match (p.present, p.required) {
            (true, _) => "present",
            (false, true) => "MISSING",
            (false, false) => "missing (optional)",
        };
        out.push_str(&format!(
            "  {:<7} {:<20} {} — {}\n",
            p.side, state, p.privilege, p.used_for
        ));
        if !p.present {
            out.push_str(&format!("          fix: {}\n", p.fix));
            if let Some(w) = p.without {
                out.push_str(&format!("          without it: {w}\n"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(present: bool, required: bool) -> Privilege {
        Privilege {
            side: "source",
            privilege: "SELECT on public.users".into(),
            used_for: "backfill",
            present,
            required,
            fix: "GRANT SELECT ON public.users TO m".into(),
            without: (!required).then_some("something is lost"),
        }
    }

    #[test]
    fn only_required_rights_that_are_absent_are_missing() {
        assert!(p(false, true).missing());
        assert!(!p(true, true).missing());
        assert!(!p(false, false).missing());
    }

    #[test]
    fn the_table_says_what_fixes_each_absent_right_and_what_an_optional_one_costs() {
        let text = render(&[p(true, true), p(false, true), p(false, false)]);
        assert_eq!(text.matches("fix: GRANT SELECT").count(), 2, "{text}");
        assert!(text.contains("MISSING"), "{text}");
        assert!(text.contains("missing (optional)"), "{text}");
        assert!(text.contains("without it: something is lost"), "{text}");
        assert_eq!(text.matches("present").count(), 1, "{text}");
    }
}
