use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = lifeboat::cli::Cli::parse();
    lifeboat::cli::init_tracing(&cli);
    match lifeboat::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
