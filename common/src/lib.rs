//! What both sides of the wire share: the spec, SQL building, ids, the plan and change
//! types, PostgreSQL sessions, the one retry policy and the row-range verify.
pub mod change;
pub mod conninfo;
pub mod control;
pub mod fleet;
pub mod gate;
pub mod idle_group;
pub mod ids;
pub mod kafka_conn;
pub mod pg;
pub mod plan;
pub mod retry;
pub mod schedule;
pub mod service;
pub mod spec;
pub mod spec_print;
pub mod sql;
pub mod tls;
pub mod trace;
pub mod verify;
pub mod walstream;
