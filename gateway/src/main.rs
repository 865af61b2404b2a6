//! The `push-relay` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "push-relay", version, about = "A self-hosted Web Push relay for Fediverse apps")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (built-in defaults when no config file is given).
    Serve {
        /// The TOML configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Check a configuration file and exit: 0 when valid, 2 when not.
    CheckConfig {
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

fn load(path: Option<&PathBuf>) -> Result<push_relay_config::Config, push_relay_config::ConfigError> {
    match path {
        Some(path) => push_relay_config::load(path),
        None => Ok(push_relay_config::Config::default()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match load(config.as_ref()) {
            Ok(c) => {
                // Providers check their credentials (key types, service accounts) when built.
                if let Err(e) = push_relay::build_providers(&c) {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
                println!(
                    "configuration is valid: listening on {}, public URL {}, {} provider(s): {}",
                    c.server.listen,
                    c.server.public_url,
                    c.providers.len(),
                    c.providers.keys().cloned().collect::<Vec<_>>().join(", ")
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve { config } => {
            let config = match load(config.as_ref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            push_relay::init_logging(&config.server);
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(push_relay::serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
