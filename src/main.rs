//! The `chat-service` binary: parse the command line, start logging, run the subcommand.

use chat_service::cli;
use chat_service::config::{Cli, Command};
use chat_service::telemetry::{self, LogFormat};
use clap::Parser;

/// mimalloc rather than glibc's malloc: the service allocates from many threads at once (tokio
/// workers, sqlx's SQLite threads), where glibc's arenas contended (chat-bench scenario 5).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // `serve` takes both from its settings (clap has checked LOG_FORMAT); the client commands
    // read the same variables, quieter by default.
    let logging = match &cli.command {
        Command::Serve(a) => Ok((a.log_level.clone(), a.log_format)),
        _ => std::env::var("LOG_FORMAT")
            .ok()
            .map_or(Ok(LogFormat::Text), |f| f.parse())
            .map_err(|e| format!("LOG_FORMAT: {e}"))
            .map(|format| {
                let level = std::env::var("LOG_LEVEL").unwrap_or_else(|_| "warn".into());
                (level, format)
            }),
    }
    .and_then(|(level, format)| telemetry::init_logging(&level, format));
    if let Err(e) = logging {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    let result = match cli.command {
        Command::Serve(a) => cli::serve(*a).await,
        Command::Migrate(a) => cli::migrate(a).await,
        Command::Token(a) => cli::token(a),
        Command::Group(c) => cli::group(c).await,
        Command::Send(a) => cli::send(a).await,
        Command::History(a) => cli::history(a).await,
        Command::Tail(a) => cli::tail(a).await,
        Command::Upload(a) => cli::upload(a).await,
        Command::Download(a) => cli::download(a).await,
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
