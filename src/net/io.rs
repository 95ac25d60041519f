//! The socket under every HTTP connection (and, after an upgrade, under its WebSocket), watched
//! for two things hyper does not do: a write that cannot make progress for
//! `--write-timeout-secs` fails (so a peer that stops reading an event stream is cut, and its
//! queued frames freed, instead of being held as long as it keeps the socket open), and the time
//! of the last byte in either direction is kept for the idle check of the accept loop.
//!
//! It also holds the connection's slot of the per-address TCP cap, so the slot is freed when the
//! socket is, upgraded or not.
//!
//! And it reads ahead: the WebSocket layer reads into a small buffer (so an idle connection holds
//! little), which alone would cost a read syscall per frame from a busy sender. A read asking for
//! less than [`READ_AHEAD`] reads a whole chunk into a buffer of its own, hands out what fits,
//! and keeps the rest for the next reads — only until it is handed out, so an idle socket holds
//! nothing.
//!
//! And it writes behind, for the same reason the other way: the WebSocket layer writes each frame
//! as it comes (a buffer of its own would keep its largest burst's capacity for the connection's
//! life), and small writes wait here for the flush that ends the writer's batch, so a burst of
//! frames is still one syscall; the buffer is dropped once written.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::limits::Slot;

/// When a connection last moved a byte, readable by the accept loop while hyper owns the socket.
#[derive(Debug)]
pub(crate) struct Activity {
    opened: Instant,
    /// Milliseconds from `opened` to the last byte read or written.
    last_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// How long since the last byte either way.
    pub(crate) fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.opened.elapsed().saturating_sub(last)
    }
}

/// Bytes read per syscall when the reader asks for fewer.
const READ_AHEAD: usize = 4096;
/// Most bytes of small writes kept for the next flush; a write this large goes straight out.
const WRITE_BEHIND: usize = 16 * 1024;

/// A socket with a write-stall timeout, an activity clock and read-ahead. See the module docs.
pub(crate) struct Watched<T> {
    inner: T,
    /// Read ahead and not yet handed out (never empty: dropped once drained).
    ahead: Option<Ahead>,
    /// Small writes waiting for a flush (never empty: dropped once written).
    out: Option<Behind>,
    activity: Arc<Activity>,
    write_timeout: Duration,
    /// Armed while a write (or flush) waits for the peer; cleared by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
    _slot: Option<Slot<std::net::IpAddr>>,
}

impl<T> Watched<T> {
    pub(crate) fn new(
        inner: T,
        activity: Arc<Activity>,
        write_timeout: Duration,
        slot: Option<Slot<std::net::IpAddr>>,
    ) -> Self {
        Self {
            inner,
            ahead: None,
            out: None,
            activity,
            write_timeout,
            stalled: None,
            _slot: slot,
        }
    }

    /// `pending` from a write or flush: waits on the stall timer, which fails the write once the
    /// peer has taken nothing for the whole timeout.
    fn stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let timeout = self.write_timeout;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(timer.as_mut().poll(cx));
        self.stalled = None;
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer stopped reading (write timeout)",
        ))
    }

    fn progressed(&mut self) {
        self.stalled = None;
        self.activity.touch();
    }
}

/// Bytes read ahead: `chunk[at..]` are still to be handed out.
struct Ahead {
    chunk: Vec<u8>,
    at: usize,
}

impl Ahead {
    /// Copies what fits into `buf`; true when nothing is left.
    fn hand_out(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let n = buf.remaining().min(self.chunk.len() - self.at);
        buf.put_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        self.at == self.chunk.len()
    }
}

/// Bytes written behind: `bytes[at..]` are still to be written to the socket.
struct Behind {
    bytes: Vec<u8>,
    at: usize,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(ahead) = this.ahead.as_mut() {
            if ahead.hand_out(buf) {
                this.ahead = None;
            }
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= READ_AHEAD {
            let before = buf.filled().len();
            let res = ready!(Pin::new(&mut this.inner).poll_read(cx, buf));
            if buf.filled().len() > before {
                this.activity.touch();
            }
            return Poll::Ready(res);
        }
        // A fresh chunk per read: a socket waiting for data holds none.
        let mut chunk = vec![0; READ_AHEAD];
        let mut into = ReadBuf::new(&mut chunk);
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut into))?;
        let n = into.filled().len();
        if n > 0 {
            this.activity.touch();
            chunk.truncate(n);
            let mut ahead = Ahead { chunk, at: 0 };
            if !ahead.hand_out(buf) {
                this.ahead = Some(ahead);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> Watched<T> {
    /// Writes out what small writes left in `out`; frees it once all is written.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(out) = self.out.as_mut() {
            match Pin::new(&mut self.inner).poll_write(cx, &out.bytes[out.at..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    out.at += n;
                    if out.at == out.bytes.len() {
                        self.out = None;
                    }
                    self.progressed();
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return self.stall(cx).map(Err),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    /// A small write is kept until the next flush (or until [`WRITE_BEHIND`] bytes wait), so
    /// the WebSocket layer can write each frame as it comes, holding no buffer of its own, and
    /// a burst of frames still leaves in one syscall.
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let waiting = this.out.as_ref().map_or(0, |out| out.bytes.len() - out.at);
        if waiting + data.len() > WRITE_BEHIND {
            ready!(this.poll_drain(cx))?;
        }
        if data.len() < WRITE_BEHIND {
            let out = this.out.get_or_insert_with(|| Behind {
                bytes: Vec::with_capacity(data.len().max(1024)),
                at: 0,
            });
            out.bytes.extend_from_slice(data);
            return Poll::Ready(Ok(data.len()));
        }
        match Pin::new(&mut this.inner).poll_write(cx, data) {
            Poll::Ready(res) => {
                this.progressed();
                Poll::Ready(res)
            }
            Poll::Pending => this.stall(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(res) => {
                this.progressed();
                Poll::Ready(res)
            }
            Poll::Pending => this.stall(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(res) => {
                this.stalled = None;
                Poll::Ready(res)
            }
            Poll::Pending => this.stall(cx).map(Err),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Small reads are served from one chunk, in order, and nothing is kept once handed out.
    #[tokio::test]
    async fn small_reads_share_a_chunk_read_ahead() {
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        far.write_all(&data).await.unwrap();
        drop(far);
        let mut r = Watched::new(near, Activity::new(), Duration::from_secs(5), None);
        let mut got = Vec::new();
        let mut small = [0u8; 300];
        assert_eq!(r.read(&mut small).await.unwrap(), 300);
        got.extend_from_slice(&small);
        assert!(
            r.ahead
                .as_ref()
                .is_some_and(|a| a.chunk.len() == READ_AHEAD),
            "one read took a whole chunk"
        );
        loop {
            let n = r.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
            // Each small read is either from the chunk or the chunk's last bytes.
            assert!(r.ahead.as_ref().is_none_or(|a| a.at < a.chunk.len()));
        }
        assert_eq!(got, data);
        assert!(r.ahead.is_none(), "nothing kept once handed out");
    }

    /// Small writes leave together at the flush, a large one goes straight out after them, and
    /// nothing is kept once written.
    #[tokio::test]
    async fn small_writes_wait_for_the_flush() {
        let (near, mut far) = tokio::io::duplex(256 * 1024);
        let mut w = Watched::new(near, Activity::new(), Duration::from_secs(5), None);
        w.write_all(b"one ").await.unwrap();
        w.write_all(b"two ").await.unwrap();
        let mut buf = [0u8; 64];
        let early = tokio::time::timeout(Duration::from_millis(50), far.read(&mut buf)).await;
        assert!(early.is_err(), "nothing is written before the flush");
        w.flush().await.unwrap();
        assert!(w.out.is_none(), "nothing kept once written");
        assert_eq!(far.read(&mut buf).await.unwrap(), 8);
        assert_eq!(&buf[..8], b"one two ");

        let large = vec![7u8; WRITE_BEHIND + 1];
        w.write_all(b"head").await.unwrap();
        w.write_all(&large).await.unwrap();
        assert!(
            w.out.is_none(),
            "the large write took the small one with it, in order"
        );
        let mut got = vec![0u8; 4 + large.len()];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..4], b"head");
        assert!(got[4..].iter().all(|&b| b == 7));
    }

    #[tokio::test]
    async fn a_stalled_write_fails_after_the_timeout_and_progress_resets_it() {
        let timeout = Duration::from_millis(300);
        // A pipe with room for 8 bytes: the writer blocks once it is full.
        let (near, mut far) = tokio::io::duplex(8);
        let activity = Activity::new();
        let mut w = Watched::new(near, activity.clone(), timeout, None);
        w.write_all(b"12345678").await.unwrap();
        w.flush().await.unwrap();
        let reader = tokio::spawn(async move {
            // Takes the first 8 bytes late, but within the timeout, then stops reading.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut buf = [0u8; 8];
            far.read_exact(&mut buf).await.unwrap();
            far
        });
        // Blocks until the reader makes room: progress, so no error.
        w.write_all(b"abcdefgh").await.unwrap();
        w.flush().await.unwrap();
        assert!(activity.idle_for() < Duration::from_millis(100));
        let _far = reader.await.unwrap();
        w.write_all(b"more").await.unwrap();
        let err = w.flush().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(activity.idle_for() >= timeout);
    }
}
