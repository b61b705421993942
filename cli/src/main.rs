//! `schemashift`: parse the command line, set up logging and tracing, call the library.
use clap::Parser;
use schemashift::cli::{execute, Cli, Command};

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let service = match cli.command {
        Command::Coordinator { .. } => "schemashift-coordinator",
        Command::Worker { .. } => "schemashift-worker",
        _ => "schemashift",
    };
    let telemetry =
        runtime.block_on(async { schemashift::telemetry::init(cli.quiet, cli.log_json, service) });
    let code = runtime.block_on(execute(cli));
    telemetry.shutdown();
    drop(runtime);
    std::process::exit(code);
}
