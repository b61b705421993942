//! Which way a table's shards move. `copy` streams binary COPY from the source into the
//! target (the mapping evaluated by the source); `fdw` runs one `INSERT … SELECT` per shard
//! on the target over a postgres_fdw foreign table of the source (the mapping evaluated by
//! the target). `auto` plans `copy`; when the run starts it measures both on the real
//! servers and keeps the faster (`crate::fdw::choose_auto`).

use schemashift_common::plan::Transfer;
use schemashift_common::spec::{Strategy, TableSpec};
use tokio_postgres::Client;

/// Seconds to move `rows` by `streams` parallel shards: per stream on a small machine with
/// both servers busy, ~40K rows/s by COPY, ~15K by the FDW statement (`auto` measures
/// instead when the run starts).
pub(super) fn estimated_seconds(transfer: Transfer, rows: u64, streams: usize) -> f64 {
    let per_stream = match transfer {
        Transfer::Copy => 40_000.0,
        Transfer::Fdw => 15_000.0,
    };
    rows as f64 / (per_stream * streams.max(1) as f64)
}

/// The table's transfer, with what keeps `fdw` from working added to `problems`.
pub(super) async fn transfer(
    t: &TableSpec,
    target: &Client,
    at: &str,
    problems: &mut Vec<String>,
) -> Result<Transfer, tokio_postgres::Error> {
    match t.strategy {
        Strategy::Auto | Strategy::Copy => Ok(Transfer::Copy),
        Strategy::Fdw => {
            if !t.lookups.is_empty() {
                problems.push(format!(
                    "{at}: strategy fdw cannot read lookup tables; use copy or auto for this table"
                ));
            }
            if !schemashift_common::pg::extension_available(target, "postgres_fdw").await? {
                problems.push(format!(
                    "{at}: strategy fdw needs the postgres_fdw extension on the target \
                     (install postgresql-contrib there) or use copy"
                ));
            }
            Ok(Transfer::Fdw)
        }
    }
}
