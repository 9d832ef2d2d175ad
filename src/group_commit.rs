//! Group commit: one writer thread per embedded database, applying every operation that queued
//! up while the previous commit was on its way to the disk in one transaction, so that a burst
//! shares one fsync.
//!
//! The thread owns the database; callers submit operations and await their answers. Dropping the
//! [`Committer`] closes the queue and waits for the thread to finish its batch and release the
//! database (so that the file can be opened again at once).

use tokio::sync::{mpsc, oneshot};

/// Operations waiting for the writer, at most; more wait for room.
const QUEUE: usize = 4096;
/// Operations in one batch, at most.
const BATCH: usize = 1024;

/// The answer to one operation, or why its batch failed.
pub type Answer<A> = Result<A, String>;

struct Job<Op, A> {
    op: Op,
    reply: oneshot::Sender<Answer<A>>,
}

/// The writer thread's handle.
pub struct Committer<Op, A> {
    queue: Option<mpsc::Sender<Job<Op, A>>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl<Op, A> std::fmt::Debug for Committer<Op, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer")
            .field("running", &self.queue.is_some())
            .finish()
    }
}

impl<Op: Send + 'static, A: Send + 'static> Committer<Op, A> {
    /// Starts the thread `name`. `apply` gets each batch in arrival order and answers each
    /// operation (an `Err` of its own fails the whole batch, as a failed commit must).
    pub fn start<F>(name: &str, apply: F) -> std::io::Result<Committer<Op, A>>
    where
        F: FnMut(&[Op]) -> Result<Vec<Answer<A>>, String> + Send + 'static,
    {
        Committer::start_with(name, BATCH, apply)
    }

    /// [`Committer::start`] with at most `max_batch` operations per transaction (1: a commit
    /// per operation).
    pub fn start_with<F>(
        name: &str,
        max_batch: usize,
        mut apply: F,
    ) -> std::io::Result<Committer<Op, A>>
    where
        F: FnMut(&[Op]) -> Result<Vec<Answer<A>>, String> + Send + 'static,
    {
        let max_batch = max_batch.max(1);
        let (queue, mut jobs) = mpsc::channel::<Job<Op, A>>(QUEUE);
        let writer = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while let Some(first) = jobs.blocking_recv() {
                    let mut batch = vec![first];
                    while batch.len() < max_batch {
                        match jobs.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    let (ops, replies): (Vec<Op>, Vec<_>) =
                        batch.into_iter().map(|j| (j.op, j.reply)).unzip();
                    match apply(&ops) {
                        Ok(answers) => {
                            for (reply, answer) in replies.into_iter().zip(answers) {
                                let _ = reply.send(answer);
                            }
                        }
                        Err(error) => {
                            for reply in replies {
                                let _ = reply.send(Err(error.clone()));
                            }
                        }
                    }
                }
            })?;
        Ok(Committer {
            queue: Some(queue),
            writer: Some(writer),
        })
    }

    /// Queues `op` and waits until its batch is committed.
    pub async fn submit(&self, op: Op) -> Answer<A> {
        let stopped = || "the writer has stopped".to_string();
        let queue = self.queue.as_ref().ok_or_else(stopped)?;
        let (reply, answer) = oneshot::channel();
        queue.send(Job { op, reply }).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl<Op, A> Drop for Committer<Op, A> {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}
