//! The `schemashift` command line: commands of INTERFACE.md mapped onto the library.
//! `demo`, `bench` and `load` come from the lab crate (feature `lab`, on by default).
pub mod cli;
pub mod embedded;
pub mod fleet;
pub mod members;
pub mod progress;
pub mod report;
pub mod telemetry;
