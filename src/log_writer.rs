//! The log's writer: each runtime thread gathers its log lines (the access log's among them) in a
//! buffer of its own and writes them to stderr in blocks: when the buffer reaches 64 KiB, and
//! whenever the thread runs out of work (the runtime's park hook calls [`flush_this_thread`]).
//! Under load that is one `write` for hundreds of lines, as nginx's `access_log ... buffer=` does,
//! and when idle a line is written as soon as its request is done; no lock, channel or thread
//! hop per line. Threads that are not runtime workers (the blocking pool, the main thread before
//! the runtime runs) write each line at once.
//!
//! A block is written whole under stderr's lock, so lines of different threads never interleave.
//! A thread that stops flushes first ([`flush_this_thread`] from the runtime's stop hook); lines of
//! a process killed with SIGKILL, or that panics, may be lost with their thread's buffer.

use std::cell::RefCell;
use std::io::{self, Write};

/// Bytes a thread gathers before it writes them.
pub const BLOCK: usize = 64 * 1024;

thread_local! {
    /// `None` until the thread is known to be a runtime worker (its first park).
    static BUFFER: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
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
        let buffered = BUFFER.with(|cell| {
            let Ok(mut buffer) = cell.try_borrow_mut() else {
                return false; // a line logged while writing a block: written at once
            };
            let Some(buffer) = buffer.as_mut() else {
                return false;
            };
            buffer.extend_from_slice(line);
            if buffer.len() >= BLOCK {
                write_block(buffer);
            }
            true
        });
        if !buffered {
            emit(line)?;
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// For the runtime's park and stop hooks: writes what this thread gathered, and from then on
/// gathers its lines (a thread that parks is a runtime worker).
pub fn flush_this_thread() {
    BUFFER.with(|cell| {
        let Ok(mut buffer) = cell.try_borrow_mut() else {
            return;
        };
        match buffer.as_mut() {
            Some(buffer) if !buffer.is_empty() => write_block(buffer),
            Some(_) => {}
            None => *buffer = Some(Vec::with_capacity(BLOCK)),
        }
    });
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
thread_local! {
    /// What the tests' threads wrote, instead of stderr.
    static EMITTED: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
fn emit(bytes: &[u8]) -> io::Result<()> {
    EMITTED.with(|e| e.borrow_mut().push(bytes.to_vec()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_gathers_lines_until_it_parks_and_others_write_at_once() {
        std::thread::spawn(|| {
            let writes = || EMITTED.with(|e| e.borrow().clone());
            let mut sink = LineSink;
            sink.write_all(b"before the first park\n").unwrap();
            assert_eq!(writes(), [b"before the first park\n".to_vec()]);
            flush_this_thread();
            sink.write_all(b"one\n").unwrap();
            sink.write_all(b"two\n").unwrap();
            assert_eq!(
                writes().len(),
                1,
                "a worker's line was written before its park"
            );
            flush_this_thread();
            assert_eq!(
                writes()[1],
                b"one\ntwo\n",
                "the park wrote the lines as one block"
            );
            let line = vec![b'x'; 1000];
            for _ in 0..(BLOCK / 1000 + 1) {
                sink.write_all(&line).unwrap();
            }
            assert_eq!(writes().len(), 3, "a full block was not written at once");
            assert!(writes()[2].len() >= BLOCK);
        })
        .join()
        .unwrap();
    }
}
