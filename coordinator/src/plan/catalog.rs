//! Catalog reads of the planner: columns and unique keys of a table.

use schemashift_common::sql::QualifiedName;
use tokio_postgres::Client;

pub(super) struct Col {
    pub(super) name: String,
    pub(super) sql_type: String,
    pub(super) not_null: bool,
    pub(super) has_default: bool,
    pub(super) generated: bool,
}

pub(super) async fn columns(
    c: &Client,
    table: &QualifiedName,
) -> Result<Option<Vec<Col>>, tokio_postgres::Error> {
    let exists = schemashift_common::pg::table_exists(c, &table.to_string()).await?;
    if !exists {
        return Ok(None);
    }
    let rows = c
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
             a.atthasdef OR a.attidentity <> '', a.attgenerated <> '' \
             FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 \
             AND NOT a.attisdropped ORDER BY a.attnum",
            &[&table.to_string()],
        )
        .await?;
    Ok(Some(
        rows.iter()
            .map(|r| Col {
                name: r.get(0),
                sql_type: r.get(1),
                not_null: r.get(2),
                has_default: r.get(3),
                generated: r.get(4),
            })
            .collect(),
    ))
}

/// Column sets of unique, non-partial, non-expression indexes (the primary key first).
pub(super) async fn unique_keys(
    c: &Client,
    table: &QualifiedName,
) -> Result<Vec<Vec<String>>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT array_agg(a.attname::text ORDER BY k.ord) FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indpred IS NULL \
             AND i.indexprs IS NULL GROUP BY i.indexrelid, i.indisprimary ORDER BY i.indisprimary DESC",
            &[&table.to_string()],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

pub(super) fn same_set(a: &[String], b: &[String]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort();
    b.sort();
    a == b
}
