//! The `chat-service` binary: parse the command line, start tracing, run the subcommand.

use chat_service::cli;
use chat_service::config::{Cli, Command};
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// mimalloc rather than glibc's malloc: the service allocates from many threads at once (tokio
/// workers, sqlx's SQLite threads), where glibc's arenas contended (chat-bench scenario 5).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e` of mimalloc v2's
/// `mimalloc.h`; libmimalloc-sys names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory goes back to the OS at once rather than after mimalloc's default 10 ms, which
/// it only counts on a thread's next allocation: memory that the tokio workers free for sqlx's
/// SQLite threads stayed resident while those threads sat idle (chat-bench scenario 4, 10,000
/// open streams: 16.6-17.4 KiB each by default, 12.2 KiB with this). The
/// `MIMALLOC_PURGE_DELAY` environment variable still wins.
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain integer option; mimalloc reads options with atomics.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
}

#[tokio::main]
async fn main() {
    tune_allocator();
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
