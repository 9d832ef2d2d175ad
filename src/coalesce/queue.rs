//! One key's queue: its pending entries in arrival order and what is in flight.

use super::*;

pub(super) struct Waiter {
    pub(super) id: u64,
    pub(super) tx: oneshot::Sender<Reply>,
    pub(super) disposition: Disposition,
}

pub(super) enum Entry {
    Write {
        /// Only `dedupe` compares writes; the other modes skip building this.
        fingerprint: Option<Box<Fingerprint>>,
        job: Job,
        waiters: Vec<Waiter>,
    },
    Read {
        id: u64,
        go: oneshot::Sender<ReadPermit>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Busy {
    Idle,
    Writing,
    Reading(usize),
}

pub(super) struct KeyQueue {
    pub(super) busy: Busy,
    pub(super) queue: VecDeque<Entry>,
    /// Clients waiting in `queue` (a deduplicated write counts each of its clients).
    pub(super) waiting: usize,
    pub(super) next_id: u64,
    /// How long the key's last write took, for `Retry-After`.
    pub(super) last_service: Duration,
}

impl KeyQueue {
    pub(super) fn new() -> KeyQueue {
        KeyQueue {
            busy: Busy::Idle,
            queue: VecDeque::new(),
            waiting: 0,
            next_id: 0,
            last_service: Duration::ZERO,
        }
    }

    pub(super) fn is_done(&self) -> bool {
        self.busy == Busy::Idle && self.queue.is_empty()
    }

    /// A client-facing estimate of when the queue will have room: the work ahead of it.
    pub(super) fn retry_after(&self) -> Duration {
        let per_write = self.last_service.max(Duration::from_millis(1));
        (per_write * (self.waiting as u32 + 1)).max(Duration::from_secs(1))
    }
}

/// A write that a dispatch decided to send, carried out after the shard lock is released.
pub(super) struct Start {
    pub(super) job: Job,
    pub(super) waiters: Vec<Waiter>,
}
