//! Shared parts of schemashift: the spec, SQL building, ids, the plan and change types,
//! PostgreSQL sessions, throwaway clusters and the scenario used by demo, tests and bench.
pub mod change;
pub mod cluster;
pub mod control;
pub mod idle_group;
pub mod ids;
pub mod load;
pub mod pg;
pub mod plan;
pub mod scenario;
pub mod service;
pub mod spec;
pub mod sql;
pub mod trace;
pub mod walstream;
