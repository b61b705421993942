//! Our own compare of the `users` scenario, independent of the tool's verify: the split rule
//! is computed here in Rust, and rows are merged by id from two ordered streams (constant
//! memory, so it also works on the million-row tables).

use std::pin::pin;
use std::time::SystemTime;

use anyhow::Context;
use futures_util::TryStreamExt;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, RowStream};

/// The brief's split rule: trim spaces, split at the last space, trim both parts; no space
/// gives `(name, "")`, empty gives `("", "")`. Trims spaces only, as SQL `btrim` does.
pub fn split_full_name(name: &str) -> (String, String) {
    let t = name.trim_matches(' ');
    match t.rfind(' ') {
        Some(i) => (
            t[..i].trim_matches(' ').to_string(),
            t[i + 1..].trim_matches(' ').to_string(),
        ),
        None => (t.to_string(), String::new()),
    }
}

/// The reverse rule: the non-empty parts joined by one space.
pub fn concat_names(first: &str, last: &str) -> String {
    match (first.is_empty(), last.is_empty()) {
        (true, _) => last.to_string(),
        (false, true) => first.to_string(),
        (false, false) => format!("{first} {last}"),
    }
}

/// Counts of a compare, with the first few differing ids for the failure message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiffReport {
    /// Source rows absent from the target.
    pub missing: u64,
    /// Target rows absent from the source.
    pub extra: u64,
    /// Rows on both sides whose mapped values differ.
    pub different: u64,
    /// Up to [`SAMPLE`] examples: (id, "missing" | "extra" | "different: column").
    pub samples: Vec<(i64, String)>,
}

impl DiffReport {
    pub fn is_clean(&self) -> bool {
        self.missing == 0 && self.extra == 0 && self.different == 0
    }

    fn note(&mut self, id: i64, what: impl Into<String>) {
        if self.samples.len() < SAMPLE {
            self.samples.push((id, what.into()));
        }
    }
}

const SAMPLE: usize = 20;

/// A source row mapped to the target's shape.
#[derive(Debug, PartialEq)]
struct Mapped {
    id: i64,
    first_name: String,
    last_name: String,
    email: String,
    bio: Option<String>,
    created_at: SystemTime,
    updated_at: SystemTime,
}

impl Mapped {
    fn from_source(row: &Row) -> anyhow::Result<Mapped> {
        let full_name: String = row.try_get(1)?;
        let (first_name, last_name) = split_full_name(&full_name);
        Ok(Mapped {
            id: row.try_get(0)?,
            first_name,
            last_name,
            email: row.try_get(2)?,
            bio: row.try_get(3)?,
            created_at: row.try_get(4)?,
            updated_at: row.try_get(5)?,
        })
    }

    fn from_target(row: &Row) -> anyhow::Result<Mapped> {
        Ok(Mapped {
            id: row.try_get(0)?,
            first_name: row.try_get(1)?,
            last_name: row.try_get(2)?,
            email: row.try_get(3)?,
            bio: row.try_get(4)?,
            created_at: row.try_get(5)?,
            updated_at: row.try_get(6)?,
        })
    }

    /// Name of the first differing column, if any.
    fn first_difference(&self, other: &Mapped) -> Option<&'static str> {
        if self.first_name != other.first_name {
            Some("first_name")
        } else if self.last_name != other.last_name {
            Some("last_name")
        } else if self.email != other.email {
            Some("email")
        } else if self.bio != other.bio {
            Some("bio")
        } else if self.created_at != other.created_at {
            Some("created_at")
        } else if self.updated_at != other.updated_at {
            Some("updated_at")
        } else {
            None
        }
    }
}

async fn stream(client: &Client, sql: &str) -> anyhow::Result<RowStream> {
    let params: [&(dyn ToSql + Sync); 0] = [];
    client
        .query_raw(sql, params)
        .await
        .with_context(|| format!("run compare query {sql}"))
}

/// Compares `public.users` of the source (old schema) with the target (new schema):
/// (missing, extra, different).
pub async fn table_diff(source: &Client, target: &Client) -> anyhow::Result<(u64, u64, u64)> {
    let r = table_diff_report(source, target).await?;
    Ok((r.missing, r.extra, r.different))
}

/// [`table_diff`] with examples of the differing ids.
pub async fn table_diff_report(source: &Client, target: &Client) -> anyhow::Result<DiffReport> {
    let src = stream(
        source,
        "SELECT id, full_name, email, bio, created_at, updated_at FROM public.users ORDER BY id",
    )
    .await?;
    let dst = stream(
        target,
        "SELECT id, first_name, last_name, email, bio, created_at, updated_at \
         FROM public.users ORDER BY id",
    )
    .await?;
    let mut src = pin!(src);
    let mut dst = pin!(dst);
    let mut report = DiffReport::default();
    let mut s = next(&mut src, Mapped::from_source).await?;
    let mut t = next(&mut dst, Mapped::from_target).await?;
    loop {
        match (&s, &t) {
            (None, None) => break,
            (Some(a), Some(b)) if a.id == b.id => {
                if let Some(col) = a.first_difference(b) {
                    report.different += 1;
                    report.note(a.id, format!("different: {col}"));
                }
                s = next(&mut src, Mapped::from_source).await?;
                t = next(&mut dst, Mapped::from_target).await?;
            }
            (Some(a), Some(b)) if a.id < b.id => {
                report.missing += 1;
                report.note(a.id, "missing");
                s = next(&mut src, Mapped::from_source).await?;
            }
            (Some(a), None) => {
                report.missing += 1;
                report.note(a.id, "missing");
                s = next(&mut src, Mapped::from_source).await?;
            }
            (_, Some(b)) => {
                report.extra += 1;
                report.note(b.id, "extra");
                t = next(&mut dst, Mapped::from_target).await?;
            }
        }
    }
    Ok(report)
}

async fn next(
    rows: &mut std::pin::Pin<&mut RowStream>,
    map: fn(&Row) -> anyhow::Result<Mapped>,
) -> anyhow::Result<Option<Mapped>> {
    match rows.try_next().await.context("read compare rows")? {
        Some(row) => map(&row).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_rule_matches_the_brief() {
        let cases = [
            ("  Spaced  Out  ", "Spaced", "Out"),
            ("Cher", "Cher", ""),
            ("", "", ""),
            ("   ", "", ""),
            ("John Q Public", "John Q", "Public"),
            ("Mary Jane Watson", "Mary Jane", "Watson"),
            ("van der Berg, Johann", "van der Berg,", "Johann"),
            ("김철수", "김철수", ""),
            ("毛 泽东", "毛", "泽东"),
        ];
        for (name, first, last) in cases {
            assert_eq!(
                split_full_name(name),
                (first.to_string(), last.to_string()),
                "{name:?}"
            );
        }
    }

    #[test]
    fn reverse_rule_joins_non_empty_parts() {
        assert_eq!(concat_names("John", "Doe"), "John Doe");
        assert_eq!(concat_names("Cher", ""), "Cher");
        assert_eq!(concat_names("", "Solo"), "Solo");
        assert_eq!(concat_names("", ""), "");
        let (f, l) = split_full_name("  Mary   Jane  Watson ");
        assert_eq!(concat_names(&f, &l), "Mary   Jane Watson");
    }
}
