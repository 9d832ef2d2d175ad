//! The `writegate` binary: command line, logging and runtime set-up, exit codes. Everything else
//! lives in the library.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use writegate::config::Config;
use writegate::server::{shutdown_signal, Proxy};

/// mimalloc instead of glibc's malloc: a connection's buffers are freed when it goes idle, and
/// mimalloc returns such freed pages to the system (glibc keeps them when they sit between live
/// allocations); it is also faster for the many small, short-lived allocations of a request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "writegate", version, about = "A load-balancing write proxy")]
struct Cli {
    /// Config file (TOML). Given alone, it runs the proxy with it.
    #[arg(long, short, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Log line format on stderr: human-readable text, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with --config PATH.
    Run,
    /// Validate --config PATH like `nginx -t`: exit 0 with a summary, or 1 with every error.
    Check,
    /// Start three in-memory key-value writers behind the proxy and print a short tour.
    Demo {
        /// Proxy listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin listen address.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    writegate::metrics::install();
    match cli.command {
        Some(Command::Demo { listen, admin }) => {
            demo(writegate::demo::DemoOptions { listen, admin })
        }
        Some(Command::Check) => with_config(cli.config, check),
        Some(Command::Run) | None => with_config(cli.config, run),
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}

fn with_config(path: Option<PathBuf>, command: fn(Config) -> ExitCode) -> ExitCode {
    let Some(path) = path else {
        eprintln!("writegate: --config PATH is required (or try `writegate demo`; see --help)");
        return ExitCode::from(2);
    };
    match Config::load(&path) {
        Ok(config) => command(config),
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!(
                "writegate: {} error(s) in {}",
                errors.0.len(),
                path.display()
            );
            ExitCode::FAILURE
        }
    }
}

fn check(config: Config) -> ExitCode {
    println!("{}", config.describe());
    ExitCode::SUCCESS
}

fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match workers {
        // One worker needs no work stealing: the current-thread scheduler does less per task.
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}

fn run(config: Config) -> ExitCode {
    let runtime = match runtime(config.runtime.workers) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("writegate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = shutdown_signal();
        match Proxy::bind(config).await {
            Ok(mut proxy) => {
                proxy.enable_reload();
                proxy.run(shutdown).await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("writegate: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn demo(options: writegate::demo::DemoOptions) -> ExitCode {
    let result = runtime(None).map_err(Into::into).and_then(|rt| {
        rt.block_on(async { writegate::demo::run(options, shutdown_signal()).await })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("writegate demo: {e}");
            ExitCode::FAILURE
        }
    }
}
