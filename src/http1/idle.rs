//! Keep-alive connections that went quiet, waiting without a task of their own.
//!
//! While its client thinks between requests, a connection's task (the connection future with its
//! timer and stop registration, and the wire it shares with a request body) is most of what the
//! connection costs; nginx keeps only its connection struct. So a plain-TCP connection quiet for
//! [`PARK_AFTER`] ends its task and parks its socket here: a slot in one table per listener, a
//! small waker registered with the socket's readiness, and one watcher task that hands a socket
//! whose client wrote again to a new task, and closes a socket at its idle deadline or when the
//! server stops. Busy connections never come here: their next request arrives long before.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::stop::{StopSignal, StopWatch};

/// How long a connection waits for its client's next request in its own task before it parks.
/// Long enough that a client sending requests back to back never pays for parking; short enough
/// that connections held open by quiet clients cost little soon after their last response.
pub const PARK_AFTER: Duration = Duration::from_millis(100);

/// One listener's parked connections; `C` is what the listener keeps with each socket to serve
/// it again. Cloning gives another handle to the same table.
pub struct IdleSet<C> {
    shared: Arc<Shared<C>>,
}

impl<C> Clone for IdleSet<C> {
    fn clone(&self) -> Self {
        IdleSet {
            shared: Arc::clone(&self.shared),
        }
    }
}

struct Shared<C> {
    table: Mutex<Table<C>>,
    /// Wakes the watcher: a socket turned readable, or a deadline earlier than its timer came.
    changed: Notify,
    parked: metrics::Gauge,
}

/// A slot's place and the generation of the socket in it: a waker or deadline left over from a
/// socket that has since left matches no longer.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct SlotId {
    index: u32,
    generation: u32,
}

struct Slot<C> {
    generation: u32,
    parked: Option<(TcpStream, C)>,
}

struct Table<C> {
    slots: Vec<Slot<C>>,
    free: Vec<u32>,
    /// Parked sockets by idle deadline, soonest first. Sockets that leave early leave their entry
    /// behind; the heap is rebuilt when such entries outnumber the parked sockets.
    deadlines: BinaryHeap<Reverse<(Instant, SlotId)>>,
    /// Sockets whose clients wrote again, for the watcher to resume.
    readable: Vec<SlotId>,
    parked: usize,
    stopped: bool,
}

fn lock<C>(table: &Mutex<Table<C>>) -> MutexGuard<'_, Table<C>> {
    table.lock().unwrap_or_else(|e| e.into_inner())
}

impl<C> Table<C> {
    fn reserve(&mut self) -> SlotId {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                // More parked sockets than u32::MAX cannot exist: each holds a file descriptor.
                let index = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
                self.slots.push(Slot {
                    generation: 0,
                    parked: None,
                });
                index
            }
        };
        let generation = self.slots.get(index as usize).map_or(0, |s| s.generation);
        SlotId { index, generation }
    }

    /// Takes the socket in `id` out, if it is still that socket; frees its slot either way.
    fn take(&mut self, id: SlotId) -> Option<(TcpStream, C)> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(id.index);
        let taken = slot.parked.take();
        if taken.is_some() {
            self.parked -= 1;
        }
        taken
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((at, _))| *at)
    }

    /// Drops the deadlines of sockets that left, once they outnumber the parked ones.
    fn prune_deadlines(&mut self) {
        if self.deadlines.len() > 64 && self.deadlines.len() > 2 * self.parked {
            let slots = &self.slots;
            self.deadlines.retain(|Reverse((_, id))| {
                slots
                    .get(id.index as usize)
                    .is_some_and(|s| s.generation == id.generation && s.parked.is_some())
            });
        }
    }
}

/// Registered with a parked socket's readiness: queues its slot for the watcher.
struct SlotWaker<C> {
    shared: Weak<Shared<C>>,
    slot: SlotId,
}

impl<C: Send + 'static> Wake for SlotWaker<C> {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(shared) = self.shared.upgrade() {
            lock(&shared.table).readable.push(self.slot);
            shared.changed.notify_one();
        }
    }
}

impl<C: Send + 'static> IdleSet<C> {
    /// `parked` counts the sockets in the table.
    pub fn new(parked: metrics::Gauge) -> Self {
        IdleSet {
            shared: Arc::new(Shared {
                table: Mutex::new(Table {
                    slots: Vec::new(),
                    free: Vec::new(),
                    deadlines: BinaryHeap::new(),
                    readable: Vec::new(),
                    parked: 0,
                    stopped: false,
                }),
                changed: Notify::new(),
                parked,
            }),
        }
    }

    /// Parks `io` until its client writes again (then the watcher hands it to `resume`), until
    /// `deadline` (then it is closed), or until the server stops (closed). A socket that is
    /// readable already is handed back to be served at once.
    pub fn park(&self, io: TcpStream, context: C, deadline: Instant) -> Option<(TcpStream, C)> {
        let mut table = lock(&self.shared.table);
        if table.stopped {
            return None;
        }
        let id = table.reserve();
        let waker = Waker::from(Arc::new(SlotWaker {
            shared: Arc::downgrade(&self.shared),
            slot: id,
        }));
        // Under the table's lock, so that a wake-up cannot look for the slot before it is filled.
        if io
            .poll_read_ready(&mut Context::from_waker(&waker))
            .is_ready()
        {
            table.take(id);
            return Some((io, context));
        }
        let sooner = table.next_deadline().is_none_or(|next| deadline < next);
        if let Some(slot) = table.slots.get_mut(id.index as usize) {
            slot.parked = Some((io, context));
        }
        table.parked += 1;
        table.deadlines.push(Reverse((deadline, id)));
        self.shared.parked.increment(1.0);
        drop(table);
        if sooner {
            self.shared.changed.notify_one();
        }
        None
    }

    /// The table's watcher, run on a task of its own until `stop` flips: hands each socket whose
    /// client wrote again to `resume`, and closes sockets whose idle deadline passed. On stop it
    /// closes every parked socket.
    pub async fn watch(self, stop: Arc<StopSignal>, resume: impl Fn(TcpStream, C)) {
        let mut stop = StopWatch {
            signal: stop,
            registered: None,
        };
        let mut timer = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
        loop {
            let changed = self.shared.changed.notified();
            let (ready, expired, next) = self.sweep(Instant::now());
            let count = ready.len() + expired.len();
            if count > 0 {
                self.shared.parked.decrement(count as f64);
            }
            ready
                .into_iter()
                .for_each(|(io, context)| resume(io, context));
            drop(expired);
            let mut changed = std::pin::pin!(changed);
            let stopped = std::future::poll_fn(|cx| {
                if stop.poll_stopped(cx).is_ready() {
                    return Poll::Ready(true);
                }
                if changed.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(false);
                }
                match next {
                    Some(at) => {
                        if timer.deadline() != at {
                            timer.as_mut().reset(at);
                        }
                        timer.as_mut().poll(cx).map(|()| false)
                    }
                    None => Poll::Pending,
                }
            })
            .await;
            if stopped {
                self.close_all();
                return;
            }
        }
    }

    /// Takes out the sockets that turned readable and those whose deadline passed; returns them
    /// with the next deadline.
    #[allow(clippy::type_complexity)]
    fn sweep(&self, now: Instant) -> (Vec<(TcpStream, C)>, Vec<(TcpStream, C)>, Option<Instant>) {
        let mut table = lock(&self.shared.table);
        let readable = std::mem::take(&mut table.readable);
        let ready: Vec<_> = readable
            .into_iter()
            .filter_map(|id| table.take(id))
            .collect();
        let mut expired = Vec::new();
        while let Some(&Reverse((at, id))) = table.deadlines.peek() {
            if at > now {
                break;
            }
            table.deadlines.pop();
            expired.extend(table.take(id));
        }
        table.prune_deadlines();
        (ready, expired, table.next_deadline())
    }

    fn close_all(&self) {
        let mut table = lock(&self.shared.table);
        table.stopped = true;
        table.deadlines.clear();
        table.readable.clear();
        let sockets: Vec<_> = table
            .slots
            .iter_mut()
            .filter_map(|s| s.parked.take())
            .collect();
        self.shared.parked.decrement(table.parked as f64);
        table.parked = 0;
        drop(table);
        drop(sockets);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A loopback pair: (the accepted side, the client side). The accepted side has been read
    /// once, finding nothing, as a connection's task does before it parks: a new socket is
    /// reported readable at first.
    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().expect("addr"));
        let (client, accepted) = tokio::join!(client, listener.accept());
        let accepted = accepted.expect("accept").0;
        let read = accepted.try_read(&mut [0u8; 1]);
        assert!(matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock));
        (accepted, client.expect("connect"))
    }

    #[tokio::test]
    async fn deadlines_of_sockets_that_left_do_not_pile_up() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let idle = IdleSet::<u32>::new(metrics::Gauge::noop());
        let (resumed, mut resumed_rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = Arc::new(StopSignal::default());
        let watcher = tokio::spawn(idle.clone().watch(Arc::clone(&stop), move |io, n| {
            let _ = resumed.send((io, n));
        }));
        let (mut socket, mut client) = pair(&listener).await;
        let far = Instant::now() + Duration::from_secs(600);
        for round in 0..500u32 {
            assert!(
                idle.park(socket, round, far).is_none(),
                "nothing to read yet"
            );
            client.write_all(b"x").await.expect("write");
            let (back, n) = tokio::time::timeout(Duration::from_secs(10), resumed_rx.recv())
                .await
                .expect("resumed within 10 s")
                .expect("watcher alive");
            assert_eq!(n, round);
            // Read the byte, and on until nothing is left, as a served connection does.
            let mut byte = [0u8; 1];
            loop {
                back.readable().await.expect("readable");
                if back.try_read(&mut byte).is_ok() {
                    break;
                }
            }
            let read = back.try_read(&mut byte);
            assert!(matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock));
            socket = back;
        }
        let (deadlines, parked, slots) = {
            let table = lock(&idle.shared.table);
            (table.deadlines.len(), table.parked, table.slots.len())
        };
        assert!(
            deadlines <= 64,
            "{deadlines} deadlines kept for no parked socket"
        );
        assert_eq!(parked, 0);
        assert_eq!(slots, 1, "the one slot is reused");
        stop.stop();
        tokio::time::timeout(Duration::from_secs(10), watcher)
            .await
            .expect("the watcher ends on stop")
            .expect("no panic");
    }

    /// Waits for the proxy's side of `client` to close: end of file or a reset.
    async fn closed_within_10s(client: &mut TcpStream, when: &str) {
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read(client, &mut buf),
        )
        .await
        .unwrap_or_else(|_| panic!("not closed {when} within 10 s"));
        assert!(matches!(read, Ok(0) | Err(_)));
    }

    #[tokio::test]
    async fn a_socket_past_its_deadline_is_closed_and_stop_closes_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let idle = IdleSet::<()>::new(metrics::Gauge::noop());
        let stop = Arc::new(StopSignal::default());
        let watcher = tokio::spawn(
            idle.clone()
                .watch(Arc::clone(&stop), |_, ()| panic!("no client wrote")),
        );
        let (soon, mut soon_client) = pair(&listener).await;
        let (late, mut late_client) = pair(&listener).await;
        let parked_at = Instant::now();
        assert!(idle
            .park(late, (), parked_at + Duration::from_secs(600))
            .is_none());
        assert!(idle
            .park(soon, (), parked_at + Duration::from_millis(200))
            .is_none());
        closed_within_10s(&mut soon_client, "at its deadline").await;
        assert!(parked_at.elapsed() >= Duration::from_millis(190));
        assert_eq!(lock(&idle.shared.table).parked, 1, "the later one waits on");
        stop.stop();
        closed_within_10s(&mut late_client, "on stop").await;
        tokio::time::timeout(Duration::from_secs(10), watcher)
            .await
            .expect("the watcher ends on stop")
            .expect("no panic");
        assert!(idle.park(pair(&listener).await.0, (), parked_at).is_none());
        assert_eq!(
            lock(&idle.shared.table).parked,
            0,
            "nothing parks after stop"
        );
    }
}
