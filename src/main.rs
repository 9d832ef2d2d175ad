//! The `writegate` binary: command line, logging and runtime set-up, exit codes. Everything else
//! lives in the library.

use std::cell::Cell;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use writegate::config::Config;
use writegate::server::{shutdown_signal, Proxy};

/// mimalloc instead of glibc's malloc: a connection's buffers are freed when it goes idle, and
/// mimalloc returns such freed pages to the system (glibc keeps them when they sit between live
/// allocations); it is also faster for the many small, short-lived allocations of a request.
/// mimalloc 2 (the `v2` feature) rather than 3: after a burst of connections 3 kept more pages
/// (idle connections 1.07 vs 0.75 KiB each, `cargo bench --bench memory`) and ran a request in
/// 16.0 vs 14.2 µs of CPU under `cargo bench --bench wrk`.
#[global_allocator]
static ALLOCATOR: MiMalloc = MiMalloc;

/// The global allocator over mimalloc's C API. Every `mi_malloc` block is aligned to
/// [`MI_MAX_ALIGN`] (or to its size, when smaller), so only stricter alignments need the aligned
/// entry points, whose path through mimalloc is several times longer.
struct MiMalloc;

/// mimalloc's `MI_MAX_ALIGN_SIZE` on 64-bit targets.
const MI_MAX_ALIGN: usize = 16;

// SAFETY: each method forwards to the mimalloc function with the same contract as the
// `GlobalAlloc` method, choosing the aligned variant whenever `mi_malloc`'s guaranteed alignment
// might not cover `layout.align()`; blocks from either variant are freed by `mi_free`.
unsafe impl std::alloc::GlobalAlloc for MiMalloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys as mi;
        if layout.align() <= MI_MAX_ALIGN {
            mi::mi_malloc(layout.size()).cast()
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys as mi;
        if layout.align() <= MI_MAX_ALIGN {
            mi::mi_zalloc(layout.size()).cast()
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        libmimalloc_sys::mi_free(ptr.cast());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        use libmimalloc_sys as mi;
        if layout.align() <= MI_MAX_ALIGN {
            mi::mi_realloc(ptr.cast(), new_size).cast()
        } else {
            mi::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
        }
    }
}

extern "C" {
    /// mimalloc's `mi_collect`: frees what the calling thread's heap holds for reuse; with
    /// `force`, it also returns freed pages to the system at once.
    fn mi_collect(force: bool);
}

/// How often a runtime thread returns the pages it freed to the system: from a tick on the
/// runtime, and as each thread goes idle. A collection takes 5–90 µs.
const RELEASE_INTERVAL: Duration = Duration::from_millis(500);

thread_local! {
    static LAST_RELEASE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// mimalloc keeps the pages a burst of requests freed for the thread that freed them, so without
/// this RSS stays at a burst's peak: after thousands of requests start at once, about twice the
/// memory their connections go on holding.
fn release_memory(now: Instant) {
    LAST_RELEASE.with(|last| last.set(Some(now)));
    // SAFETY: takes a flag and works on the calling thread's own heap.
    unsafe { mi_collect(true) };
}

/// Runs as a runtime thread parks: the other threads of a multi-threaded runtime release their
/// pages here, the tick reaching only one of them at a time.
fn release_memory_when_idle() {
    let now = Instant::now();
    let due = LAST_RELEASE
        .with(|last| last.get())
        .is_none_or(|at| now - at >= RELEASE_INTERVAL);
    if due {
        release_memory(now);
    }
}

async fn release_tick() {
    let mut tick = tokio::time::interval(RELEASE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let now = tick.tick().await;
        release_memory(now.into_std());
    }
}

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

/// Logs go to stderr through [`writegate::log_writer`]: runtime threads gather their lines, written
/// in blocks when 64 KiB gather and at most 100 ms after a line came.
fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writegate::log_writer::BufferedStderr);
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
            let summary = format!(
                "writegate: {} error(s) in {}",
                errors.0.len(),
                path.display()
            );
            say(&mut std::io::stderr(), &format!("{errors}\n{summary}"));
            ExitCode::FAILURE
        }
    }
}

fn check(config: Config) -> ExitCode {
    say(&mut std::io::stdout(), &config.describe());
    ExitCode::SUCCESS
}

/// Writes `text` and a newline. A reader that went away (`writegate check | head -1`) is no
/// error of ours: the rest is dropped and the exit status stays the one the command documents,
/// where `println!` would panic.
fn say(out: &mut impl std::io::Write, text: &str) {
    let _ = writeln!(out, "{text}").and_then(|()| out.flush());
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
    let runtime = builder
        .enable_all()
        .on_thread_park(|| {
            writegate::log_writer::register_this_thread();
            release_memory_when_idle();
        })
        .on_thread_stop(writegate::log_writer::unregister_this_thread)
        .build()?;
    runtime.spawn(release_tick());
    Ok(runtime)
}

fn run(config: Config) -> ExitCode {
    let runtime = match runtime(config.runtime.workers) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("writegate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let status = runtime.block_on(async {
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
    });
    // Lines the runtime's threads gathered (with one worker, this thread among them).
    writegate::log_writer::flush_all();
    status
}

fn demo(options: writegate::demo::DemoOptions) -> ExitCode {
    let result = runtime(None).map_err(Into::into).and_then(|rt| {
        rt.block_on(async { writegate::demo::run(options, shutdown_signal()).await })
    });
    writegate::log_writer::flush_all();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("writegate demo: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout};

    #[test]
    fn blocks_meet_every_alignment_asked() {
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for size in [
                align,
                align * 3,
                align * 5 + align,
                24 * align,
                1000 * align,
            ] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: a non-zero size; each block is freed with the layout it was made with.
                unsafe {
                    let blocks = [ALLOCATOR.alloc(layout), ALLOCATOR.alloc_zeroed(layout)];
                    for block in blocks {
                        assert!(!block.is_null());
                        assert_eq!(block as usize % align, 0, "size {size}, align {align}");
                    }
                    let grown = Layout::from_size_align(size * 2 + align, align).unwrap();
                    let moved = ALLOCATOR.realloc(blocks[0], layout, grown.size());
                    assert_eq!(moved as usize % align, 0, "realloc, align {align}");
                    ALLOCATOR.dealloc(moved, grown);
                    ALLOCATOR.dealloc(blocks[1], layout);
                }
            }
        }
    }
}
