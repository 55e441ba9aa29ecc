//! `canopy`: `canopy serve` runs the controller ([`canopy_controller::server::cli`]); every
//! other command is the console ([`canopy_controller::console`]). Parses flags, sets up
//! logging, prints an error as one line.
use canopy_controller::{console, server};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "canopy", version, about = "Canopy controller and console")]
struct Cli {
    #[command(flatten)]
    globals: console::Globals,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller.
    Serve(server::cli::ServeArgs),
    /// Run a relay for agents that cannot reach each other directly (UDP; ciphertext only).
    Relay(server::cli::RelayArgs),
    #[command(flatten)]
    Console(console::Command),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CANOPY_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: not in files, pipes or the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(a) => server::cli::serve(a).await,
        Command::Relay(a) => server::cli::relay(a).await,
        Command::Console(c) => console::run(cli.globals, c).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let msg = e
                .chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            eprintln!("canopy: {}", canopy_proto::text::escape(&msg));
            std::process::ExitCode::FAILURE
        }
    }
}
