//! `schemashift`: parse the command line, set up logging, call the library.
use clap::Parser;
use schemashift::cli::{execute, Cli};

fn main() {
    let cli = Cli::parse();
    schemashift::cli::init_tracing(cli.quiet, cli.log_json);
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
    let code = runtime.block_on(execute(cli));
    std::process::exit(code);
}
