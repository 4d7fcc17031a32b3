//! The `chat-service` binary: parse the command line, start tracing, run the subcommand.

use chat_service::cli;
use chat_service::config::{Cli, Command};
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// mimalloc rather than glibc's malloc: the service allocates from many threads at once (tokio
/// workers, sqlx's SQLite threads), where glibc's arenas contended (chat-bench scenario 5).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let level = match &cli.command {
        Command::Serve(a) => a.log_level.clone(),
        _ => std::env::var("LOG_LEVEL").unwrap_or_else(|_| "warn".into()),
    };
    let filter = match EnvFilter::try_new(&level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: LOG_LEVEL: {e}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
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
