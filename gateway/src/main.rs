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
    /// Plugin author tools.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Run a plugin on one notification the way the gateway would, and print
    /// the verdict, the fuel used, the time taken and the plugin's logs.
    /// Exit status: 0 when the plugin answered, 1 when it failed, 2 when it
    /// could not be loaded.
    Test {
        /// The plugin (a WebAssembly component, e.g. target/wasm32-wasip2/release/my_filter.wasm).
        #[arg(value_name = "FILE.wasm")]
        wasm: PathBuf,
        /// The notification, as JSON (`-` for standard input), e.g.
        /// {"instance": "mastodon.social", "urgency": "normal", "ttl": 3600, "body_size": 200,
        /// "payload": {"title": "...", "body": "...", "notification_type": "mention"}}.
        #[arg(long, value_name = "FILE")]
        input: PathBuf,
        /// The plugin's configuration, as JSON (what `config = {...}` gives it). Default `{}`.
        #[arg(long, value_name = "JSON")]
        config: Option<String>,
        /// Then time this many more calls on the warm instance.
        #[arg(long, default_value_t = 0)]
        repeat: u32,
        /// Fuel per call.
        #[arg(long, default_value_t = 10_000_000)]
        fuel: u64,
        /// Wall-clock deadline per call.
        #[arg(long, default_value_t = 50)]
        timeout_ms: u64,
        /// Memory cap.
        #[arg(long, default_value_t = 16)]
        memory_mb: u32,
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
        Command::Plugin { command: PluginCommand::Test { wasm, input, config, repeat, fuel, timeout_ms, memory_mb } } => {
            let mut options = push_relay_plugins::cli::TestOptions::new(wasm, input);
            options.config = config;
            options.repeat = repeat;
            options.fuel = fuel;
            options.timeout_ms = timeout_ms;
            options.memory_mb = memory_mb;
            match push_relay_plugins::cli::run(&options) {
                Ok(out) => {
                    print!("{out}");
                    if out.contains("\nverdict: error") {
                        ExitCode::FAILURE
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
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
