//! The log's writer: each runtime thread gathers its log lines (the access log's among them) in a
//! buffer of its own, and they reach stderr in blocks: the thread writes its buffer when it holds
//! 64 KiB, and a flusher thread writes every buffer within 100 ms of a line arriving in one. Under
//! load that is one `write` for hundreds of lines, as nginx's `access_log ... buffer=64k
//! flush=100ms` does; an idle process writes nothing and the flusher sleeps. Threads that are not
//! runtime workers (the blocking pool, the main thread before the runtime runs) write each line
//! at once. A thread becomes a gathering one at its first park ([`register_this_thread`], from
//! the runtime's park hook).
//!
//! A buffer is written whole, under its lock and stderr's, so lines never interleave and each
//! thread's lines keep their order. Lines gathered when the process is killed (SIGKILL) or
//! panics, at most 100 ms of them, are lost.

use std::cell::RefCell;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

/// Bytes a thread gathers before it writes them itself.
pub const BLOCK: usize = 64 * 1024;
/// Longest a gathered line waits for the flusher.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

type Buffer = Arc<Mutex<Vec<u8>>>;

thread_local! {
    /// `None` until the thread is known to be a runtime worker (its first park).
    static MINE: RefCell<Option<Buffer>> = const { RefCell::new(None) };
}

/// Every gathering thread's buffer, and the flusher's wake-up.
struct Registry {
    buffers: Mutex<Vec<Buffer>>,
    /// Some buffer holds lines the flusher has not written.
    pending: AtomicBool,
    wake: (Mutex<()>, Condvar),
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry {
        buffers: Mutex::new(Vec::new()),
        pending: AtomicBool::new(false),
        wake: (Mutex::new(()), Condvar::new()),
    })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The writer `tracing_subscriber::fmt().with_writer(...)` takes.
#[derive(Debug, Clone, Copy, Default)]
pub struct BufferedStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BufferedStderr {
    type Writer = LineSink;

    fn make_writer(&'a self) -> LineSink {
        LineSink
    }
}

/// Takes the formatted lines of one event.
pub struct LineSink;

impl Write for LineSink {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mine = MINE.with(|cell| cell.try_borrow().ok().and_then(|b| b.clone()));
        let Some(mine) = mine else {
            emit(line)?;
            return Ok(line.len());
        };
        let mut buffer = lock(&mine);
        buffer.extend_from_slice(line);
        if buffer.len() >= BLOCK {
            write_block(&mut buffer);
        } else {
            drop(buffer);
            note_pending();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Wakes the flusher when the first line since its last round arrives.
fn note_pending() {
    let registry = registry();
    if !registry.pending.load(Ordering::Relaxed) && !registry.pending.swap(true, Ordering::AcqRel) {
        let _guard = lock(&registry.wake.0);
        registry.wake.1.notify_one();
    }
}

/// For the runtime's park hook: from its first park on, the thread gathers its lines.
pub fn register_this_thread() {
    MINE.with(|cell| {
        let Ok(mut mine) = cell.try_borrow_mut() else {
            return;
        };
        if mine.is_none() {
            let buffer: Buffer = Arc::new(Mutex::new(Vec::with_capacity(BLOCK)));
            lock(&registry().buffers).push(Arc::clone(&buffer));
            *mine = Some(buffer);
            start_flusher();
        }
    });
}

/// For the runtime's stop hook: writes what the thread gathered and stops gathering.
pub fn unregister_this_thread() {
    let mine = MINE.with(|cell| cell.try_borrow_mut().ok().and_then(|mut m| m.take()));
    if let Some(mine) = mine {
        write_block(&mut lock(&mine));
        lock(&registry().buffers).retain(|b| !Arc::ptr_eq(b, &mine));
    }
}

/// Writes every thread's gathered lines (the flusher's round, and once more at exit).
pub fn flush_all() {
    let buffers: Vec<Buffer> = lock(&registry().buffers).clone();
    for buffer in buffers {
        let mut lines = lock(&buffer);
        if !lines.is_empty() {
            write_block(&mut lines);
        }
    }
}

fn start_flusher() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(flusher);
        if let Err(e) = spawned {
            eprintln!("writegate: cannot start the log flusher ({e}); lines are written when 64 KiB gather");
        }
    });
}

/// Sleeps until a line is gathered, gives its neighbours [`FLUSH_EVERY`] to join it, writes them.
fn flusher() {
    let registry = registry();
    loop {
        {
            let mut guard = lock(&registry.wake.0);
            while !registry.pending.load(Ordering::Acquire) {
                guard = registry
                    .wake
                    .1
                    .wait(guard)
                    .unwrap_or_else(|e| e.into_inner());
            }
        }
        std::thread::sleep(FLUSH_EVERY);
        // Cleared before the round: a line gathered meanwhile wakes the next one.
        registry.pending.store(false, Ordering::Release);
        flush_all();
    }
}

/// Writes `buffer` whole and empties it. A failed write (stderr closed) drops the block: logging
/// must not stop the proxy.
fn write_block(buffer: &mut Vec<u8>) {
    let _ = emit(buffer);
    buffer.clear();
}

#[cfg(not(test))]
fn emit(bytes: &[u8]) -> io::Result<()> {
    io::stderr().lock().write_all(bytes)
}

#[cfg(test)]
static EMITTED: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

#[cfg(test)]
fn emit(bytes: &[u8]) -> io::Result<()> {
    lock(&EMITTED).push(bytes.to_vec());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written_with(marker: &[u8]) -> Vec<Vec<u8>> {
        lock(&EMITTED)
            .iter()
            .filter(|b| b.windows(marker.len()).any(|w| w == marker))
            .cloned()
            .collect()
    }

    #[test]
    fn workers_gather_lines_that_the_flusher_or_a_full_block_writes() {
        std::thread::spawn(|| {
            let mut sink = LineSink;
            sink.write_all(b"before-park\n").unwrap();
            assert_eq!(written_with(b"before-park").len(), 1, "not written at once");
            register_this_thread();
            sink.write_all(b"gathered-1\n").unwrap();
            sink.write_all(b"gathered-2\n").unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while written_with(b"gathered-1").is_empty() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the flusher never wrote"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(
                written_with(b"gathered-1"),
                [b"gathered-1\ngathered-2\n".to_vec()]
            );
            let mut line = vec![b'x'; 999];
            line.extend_from_slice(b"\n");
            for _ in 0..(BLOCK / 1000 + 1) {
                sink.write_all(&line).unwrap();
            }
            // At once, not after the flusher's 100 ms.
            let written: usize = written_with(b"xxxx").iter().map(Vec::len).sum();
            assert!(
                written >= BLOCK,
                "a full block was not written by its thread"
            );
            unregister_this_thread();
            sink.write_all(b"after-stop\n").unwrap();
            assert_eq!(written_with(b"after-stop").len(), 1);
        })
        .join()
        .unwrap();
    }
}
