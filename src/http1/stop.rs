//! Telling every HTTP/1.1 connection to stop, as mini-redis's shutdown does: a flag, and a
//! wake-up for each connection waiting for its next request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// How the server tells its HTTP/1.1 connections to stop: a flag, and a wake-up for each
/// connection waiting for its next request. (A `watch` receiver would register a waiter for every
/// request; here a connection registers once.)
#[derive(Debug, Default)]
pub struct StopSignal {
    stopped: AtomicBool,
    waiting: Mutex<Waiting>,
}

#[derive(Debug, Default)]
struct Waiting {
    next_id: u64,
    wakers: HashMap<u64, Waker>,
}

impl StopSignal {
    /// Flips the flag and wakes every connection waiting for a request; they close.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let wakers = std::mem::take(&mut self.waiting().wakers);
        wakers.into_values().for_each(Waker::wake);
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    fn waiting(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One connection's registration with a [`StopSignal`], removed when dropped.
pub(super) struct StopWatch {
    pub(super) signal: Arc<StopSignal>,
    pub(super) registered: Option<(u64, Waker)>,
}

impl StopWatch {
    /// Ready once the server stops. Registers the task's waker the first time (and again only if
    /// the task's waker changes).
    pub(super) fn poll_stopped(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !matches!(&self.registered, Some((_, w)) if w.will_wake(cx.waker())) {
            let mut waiting = self.signal.waiting();
            let id = match &self.registered {
                Some((id, _)) => *id,
                None => {
                    waiting.next_id += 1;
                    waiting.next_id
                }
            };
            waiting.wakers.insert(id, cx.waker().clone());
            self.registered = Some((id, cx.waker().clone()));
        }
        // Checked after registering, so that a stop between the two still wakes this task.
        if self.signal.is_stopped() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for StopWatch {
    fn drop(&mut self) {
        if let Some((id, _)) = self.registered.take() {
            self.signal.waiting().wakers.remove(&id);
        }
    }
}
