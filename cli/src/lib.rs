//! The `schemashift` command line: commands of INTERFACE.md mapped onto the library.
pub mod bench;
pub mod cli;
pub mod demo;
pub mod fleet;
pub mod load;
pub mod progress;
pub mod report;
pub mod telemetry;
