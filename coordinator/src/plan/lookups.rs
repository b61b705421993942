//! Lookup tables of a merge: they exist, name the driving key, and their deletes carry it.

use super::catalog::{columns, Col};
use schemashift_common::plan::LookupPlan;
use schemashift_common::spec::TableSpec;
use schemashift_common::sql::{KeyCol, QualifiedName};
use tokio_postgres::Client;

pub(super) async fn plan_lookups(
    source: &Client,
    t: &TableSpec,
    at: &str,
    key: &[KeyCol],
    problems: &mut Vec<String>,
) -> Result<Vec<LookupPlan>, tokio_postgres::Error> {
    let mut lookups = Vec::new();
    for (i, l) in t.lookups.iter().enumerate() {
        let lat = format!("{at}: lookups[{i}]");
        let Ok(lname) = QualifiedName::parse(&l.table) else {
            problems.push(format!("{lat}: table {:?} is not a valid name", l.table));
            continue;
        };
        let Some(lcols) = columns(source, &lname).await? else {
            problems.push(format!("{lat}: source table {lname} does not exist"));
            continue;
        };
        let lk: Vec<String> = l.key.columns().iter().map(|k| k.to_lowercase()).collect();
        if lk.len() != key.len() {
            problems.push(format!(
            "{lat}: key names {} columns but the table's key has {}; list the columns of {lname} that hold ({})",
            lk.len(),
            key.len(),
            key.iter().map(|k| k.name.as_str()).collect::<Vec<_>>().join(", ")
        ));
            continue;
        }
        let live: Vec<&Col> = lcols.iter().filter(|c| !c.generated).collect();
        let mut key_index = Vec::new();
        for k in &lk {
            match live.iter().position(|c| &c.name == k) {
                Some(p) => key_index.push(p),
                None => problems.push(format!("{lat}: key column {k:?} does not exist in {lname}")),
            }
        }
        // Deletes must carry the key columns in their old tuple.
        let full_or_covered: bool = source
        .query_one(
            "SELECT c.relreplident = 'f' OR EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid \
               AND (i.indisprimary AND c.relreplident = 'd' OR i.indisreplident) \
               AND (SELECT array_agg(a.attname::text) FROM pg_attribute a WHERE a.attrelid = c.oid \
                    AND a.attnum = ANY (i.indkey)) @> $2::text[]) \
             FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&lname.to_string(), &lk],
        )
        .await?
        .get::<_, Option<bool>>(0)
        .unwrap_or(false);
        if !full_or_covered {
            problems.push(format!(
            "{lat}: deletes on {lname} would not carry ({}); make them part of its primary key or \
             ALTER TABLE {lname} REPLICA IDENTITY FULL",
            lk.join(", ")
        ));
        }
        lookups.push(LookupPlan {
            source: lname,
            key_index,
            columns: live.iter().map(|c| c.name.clone()).collect(),
        });
    }
    Ok(lookups)
}
