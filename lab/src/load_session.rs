//! One load connection and its prepared statements, for the old schema (`full_name`) or,
//! once the application has been switched at the cutover, the new one (`first_name`,
//! `last_name`).

use super::{OpKind, Shared, TOAST_SEARCH_SPAN};
use crate::scenario::{random_full_name, random_large_bio, random_short_bio};
use rand::rngs::StdRng;
use rand::Rng;
use schemashift_common::pg::Connector;
use std::sync::atomic::Ordering;
use tokio_postgres::{Client, Statement};

/// Which `users` table the load talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schema {
    /// The source's `users (email, full_name, bio, …)`.
    Old,
    /// The target's `users (email, first_name, last_name, bio, …)`.
    New,
}

/// Where the load's operations go; changed by `LoadHandle::switch`.
#[derive(Clone, Debug)]
pub(super) struct Route {
    pub connector: Connector,
    pub schema: Schema,
}

pub(super) struct Session {
    pub client: Client,
    schema: Schema,
    insert: Statement,
    update_name: Statement,
    update_bio: Statement,
    update_toasted: Statement,
    delete: Statement,
    read: Statement,
}

/// The scenario's split rule (as the SQL helpers): trim, split at the last space.
pub fn split_name(full: &str) -> (String, String) {
    let t = full.trim();
    match t.rfind(' ') {
        Some(i) => (t[..i].trim_end().to_owned(), t[i + 1..].trim().to_owned()),
        None => (t.to_owned(), String::new()),
    }
}

impl Session {
    pub async fn open(route: &Route) -> Result<Session, tokio_postgres::Error> {
        let client = route
            .connector
            .open(tracing::debug_span!("load_connection"))
            .await?;
        let (insert, set_name, read_cols) = match route.schema {
            Schema::Old => (
                "INSERT INTO public.users (email, full_name, bio) VALUES ($1, $2, $3) RETURNING id",
                "full_name = $2",
                "id, email, full_name, bio",
            ),
            Schema::New => (
                "INSERT INTO public.users (email, first_name, last_name, bio) VALUES ($1, $2, $4, $3) \
                 RETURNING id",
                "first_name = $2, last_name = $3",
                "id, email, first_name, last_name, bio",
            ),
        };
        Ok(Session {
            schema: route.schema,
            insert: client.prepare(insert).await?,
            update_name: client
                .prepare(&format!(
                    "UPDATE public.users SET {set_name}, updated_at = now() WHERE id = $1"
                ))
                .await?,
            update_bio: client
                .prepare("UPDATE public.users SET bio = $2, updated_at = now() WHERE id = $1")
                .await?,
            update_toasted: client
                .prepare(&format!(
                    "UPDATE public.users SET {set_name}, updated_at = now()
                     WHERE id = (SELECT id FROM public.users
                                 WHERE id >= $1 AND id < $1 + {TOAST_SEARCH_SPAN}
                                   AND pg_column_size(bio) > 2000
                                 ORDER BY id LIMIT 1)"
                ))
                .await?,
            delete: client
                .prepare("DELETE FROM public.users WHERE id = $1")
                .await?,
            read: client
                .prepare(&format!(
                    "SELECT {read_cols} FROM public.users WHERE id = $1"
                ))
                .await?,
            client,
        })
    }

    /// Runs one operation; returns its affected row count.
    pub async fn execute(
        &self,
        shared: &Shared,
        rng: &mut StdRng,
        kind: OpKind,
        email: &str,
    ) -> Result<u64, tokio_postgres::Error> {
        let max = shared.max_id.load(Ordering::Relaxed).max(1);
        let id = rng.gen_range(1..=max);
        match kind {
            OpKind::Insert => {
                let name = random_full_name(rng);
                let bio = match rng.gen_range(0..100) {
                    0 => Some(random_large_bio(rng)),
                    1..=10 => None,
                    _ => Some(random_short_bio(rng)),
                };
                let row = match self.schema {
                    Schema::Old => {
                        self.client
                            .query_one(&self.insert, &[&email, &name, &bio])
                            .await?
                    }
                    Schema::New => {
                        let (first, last) = split_name(&name);
                        self.client
                            .query_one(&self.insert, &[&email, &first, &bio, &last])
                            .await?
                    }
                };
                shared.max_id.fetch_max(row.get(0), Ordering::Relaxed);
                Ok(1)
            }
            OpKind::UpdateName | OpKind::UpdateToasted => {
                let stmt = match kind {
                    OpKind::UpdateName => &self.update_name,
                    _ => &self.update_toasted,
                };
                let name = random_full_name(rng);
                match self.schema {
                    Schema::Old => self.client.execute(stmt, &[&id, &name]).await,
                    Schema::New => {
                        let (first, last) = split_name(&name);
                        self.client.execute(stmt, &[&id, &first, &last]).await
                    }
                }
            }
            OpKind::UpdateBio => {
                let bio = random_large_bio(rng);
                self.client.execute(&self.update_bio, &[&id, &bio]).await
            }
            OpKind::Delete => self.client.execute(&self.delete, &[&id]).await,
            OpKind::Read => Ok(self.client.query(&self.read, &[&id]).await?.len() as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split_name;

    #[test]
    fn split_name_matches_the_sql_split_rule() {
        let s = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        assert_eq!(split_name("Ada Lovelace"), s("Ada", "Lovelace"));
        assert_eq!(split_name(" Mary Ann  Evans "), s("Mary Ann", "Evans"));
        assert_eq!(split_name("Cher"), s("Cher", ""));
        assert_eq!(split_name("  "), s("", ""));
    }
}
