//! A member's queue: what the room has for one member and the member has not taken yet.
//!
//! Bounded like tokio's mpsc it replaces (a full queue refuses the frame, and the room drops the
//! member as a slow consumer), but it holds memory only while frames wait: tokio's channel
//! allocates a 32-slot block and a cache-padded state up front and keeps its blocks, ~3.3 KiB
//! (4.6 KiB once 32 frames passed) for every idle member (#16). Here an idle member costs one
//! small allocation; the buffer is freed whenever the member has taken everything.
//!
//! One lock per queue: the room pushes under its own lock (one uncontended lock per member
//! per frame), the member pops in its writer; neither holds it across an `.await`.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use super::Outbound;

/// A queue of at most `capacity` frames.
pub(crate) fn channel(capacity: usize) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        capacity,
        state: Mutex::new(State {
            frames: VecDeque::new(),
            senders: 1,
            receiver: true,
            waker: None,
        }),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TrySendError {
    /// The member has `capacity` frames waiting: it is not keeping up.
    Full,
    /// The member is gone.
    Closed,
}

#[derive(Debug)]
struct Shared {
    capacity: usize,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    frames: VecDeque<Outbound>,
    senders: usize,
    receiver: bool,
    /// The member's task, waiting for a frame.
    waker: Option<Waker>,
}

impl Shared {
    /// Never held across an `.await`; a poisoned lock only means a thread panicked between two
    /// plain field updates, which leaves the queue usable.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The room's end. The member's [`Receiver`] ends once every sender is dropped.
#[derive(Debug)]
pub(crate) struct Sender {
    shared: Arc<Shared>,
}

impl Sender {
    /// Queues `out` without waiting.
    pub(crate) fn try_send(&self, out: Outbound) -> Result<(), TrySendError> {
        let waker = {
            let mut st = self.shared.lock();
            if !st.receiver {
                return Err(TrySendError::Closed);
            }
            if st.frames.len() >= self.shared.capacity {
                return Err(TrySendError::Full);
            }
            st.frames.push_back(out);
            st.waker.take()
        };
        // Woken outside the lock: the member may run at once on another thread and pop.
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }
}

impl Clone for Sender {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let waker = {
            let mut st = self.shared.lock();
            st.senders -= 1;
            if st.senders > 0 {
                return;
            }
            st.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The member's end.
#[derive(Debug)]
pub(crate) struct Receiver {
    shared: Arc<Shared>,
}

impl Receiver {
    /// The next frame; `None` once the queue is empty and the room dropped its sender.
    /// Cancel-safe: a frame is taken only when it is returned.
    pub(crate) async fn recv(&mut self) -> Option<Outbound> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Outbound>> {
        let mut st = self.shared.lock();
        if let Some(out) = pop(&mut st) {
            return Poll::Ready(Some(out));
        }
        if st.senders == 0 {
            return Poll::Ready(None);
        }
        match &mut st.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// A frame if one is waiting (`None` also when the queue ended: [`Receiver::recv`] says so).
    pub(crate) fn try_recv(&mut self) -> Option<Outbound> {
        pop(&mut self.shared.lock())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let frames = {
            let mut st = self.shared.lock();
            st.receiver = false;
            st.waker = None;
            std::mem::take(&mut st.frames)
        };
        // The frames are dropped outside the lock.
        drop(frames);
    }
}

/// The oldest frame; the buffer is freed once the member took everything, so an idle member
/// keeps none of the capacity a burst needed.
fn pop(st: &mut State) -> Option<Outbound> {
    let out = st.frames.pop_front()?;
    if st.frames.is_empty() {
        st.frames = VecDeque::new();
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::ws::Utf8Bytes;

    fn frame(n: u64) -> Outbound {
        Outbound {
            id: None,
            turn: None,
            frame: Utf8Bytes::from(n.to_string()),
        }
    }

    #[test]
    fn bounded_and_ordered() {
        let (tx, mut rx) = channel(2);
        assert_eq!(tx.try_send(frame(1)), Ok(()));
        assert_eq!(tx.try_send(frame(2)), Ok(()));
        assert_eq!(tx.try_send(frame(3)), Err(TrySendError::Full));
        assert_eq!(
            rx.try_recv().map(|o| o.frame.to_string()).as_deref(),
            Some("1")
        );
        assert_eq!(tx.try_send(frame(4)), Ok(()));
        assert_eq!(
            rx.try_recv().map(|o| o.frame.to_string()).as_deref(),
            Some("2")
        );
        assert_eq!(
            rx.try_recv().map(|o| o.frame.to_string()).as_deref(),
            Some("4")
        );
        assert!(rx.try_recv().is_none());
        assert_eq!(rx.shared.lock().frames.capacity(), 0);
        drop(rx);
        assert_eq!(tx.try_send(frame(5)), Err(TrySendError::Closed));
    }

    #[tokio::test]
    async fn ends_after_the_last_sender_once_drained() {
        let (tx, mut rx) = channel(4);
        let tx2 = tx.clone();
        assert_eq!(tx.try_send(frame(1)), Ok(()));
        drop(tx);
        assert_eq!(tx2.try_send(frame(2)), Ok(()));
        drop(tx2);
        assert!(rx.recv().await.is_some());
        assert!(rx.recv().await.is_some());
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn wakes_a_waiting_member() {
        let (tx, mut rx) = channel(4);
        let waiting = tokio::spawn(async move { rx.recv().await.map(|o| o.frame.to_string()) });
        tokio::task::yield_now().await;
        assert_eq!(tx.try_send(frame(7)), Ok(()));
        assert_eq!(waiting.await.ok().flatten().as_deref(), Some("7"));
        let (tx, mut rx) = channel(4);
        let waiting = tokio::spawn(async move { rx.recv().await.is_none() });
        tokio::task::yield_now().await;
        drop(tx);
        assert_eq!(waiting.await.ok(), Some(true));
    }
}
