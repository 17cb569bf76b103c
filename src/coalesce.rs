//! A connection's writes gathered into one system call per turn of its HTTP/2 connection task.
//!
//! h2 (`FramedWrite`) sends a data frame's payload of 256 bytes or more from where it lies,
//! chained behind its buffer in one vectored write, and flushes that write before it queues
//! another frame. So a small Get's response went out as two `writev`s: its headers, messages
//! and chunk, then its trailers; each is a system call, a loopback segment, and often a wake-up
//! of the client.
//!
//! Here the flush that follows such a chained write is put off: h2 makes it only to get room for
//! the next frame, and the turn of its connection task always ends in another flush (the one
//! after it has queued every pending frame), or in a write that blocks and wakes the task again,
//! or in a shutdown. That later flush writes everything at once. Any other flush writes at once.
//! A write that would hold more than [`HOLD_BYTES`], or any write while the socket is backed up
//! (it took less than it was offered), goes out at once, behind what waits, in the same
//! `writev`, and what is held never passes [`HOLD_BYTES`]. A chunk sent as one frame larger than
//! that (a client that allows large frames, as ours does) is not copied; a client on HTTP/2's
//! default 16 KiB frames has most frames of a large chunk copied here, sent up to 128 KiB a write.
//!
//! Only HTTP/2 connections may be wrapped: HTTP/1 (hyper's `h1`) ends a response with a vectored
//! write and one flush, which would be put off until the client spoke again. The gRPC port
//! speaks HTTP/2 alone.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes held for the next flush at most; a write that would pass it goes out at once. A
/// thumbnail's whole response fits, and a frame carrying a whole chunk of the default
/// `chunk_bytes` (256 KiB) does not: that is sent from where it lies. Copying 64 KiB cost the
/// service less than the second write it saves (BENCHMARKS.md).
pub const HOLD_BYTES: usize = 128 * 1024;

/// Room made beyond a write that does not fit what is held, for the frames that follow it (a
/// response's trailers) without growing again.
const SLACK_BYTES: usize = 4 * 1024;

/// Room a connection keeps for held bytes between writes; more is given back once sent, so an
/// idle connection holds no more than h2's own write buffer.
const KEEP_BYTES: usize = 16 * 1024;

/// Slices one `writev` carries at most (Linux takes 1024; tokio-util passes h2's 2).
const MAX_SLICES: usize = 16;

/// An I/O stream whose small writes wait for the flush after the next one (see the module).
pub struct Coalesced<T> {
    inner: T,
    /// Written by the caller, not yet to `inner`: `held[sent..]`.
    held: Vec<u8>,
    sent: usize,
    /// The last bytes held came in a vectored write (h2's chained payload): the next flush is
    /// only h2 making room, and may wait for the one that ends the turn.
    chained: bool,
    /// The socket last took less than it was offered: nothing more is held until what waits
    /// has gone out.
    backed_up: bool,
}

impl<T> Coalesced<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            held: Vec::new(),
            sent: 0,
            chained: false,
            backed_up: false,
        }
    }

    fn waiting(&self) -> usize {
        self.held.len() - self.sent
    }

    fn advance(&mut self, n: usize) {
        self.sent += n;
        if self.sent == self.held.len() {
            if self.held.capacity() > KEEP_BYTES {
                self.held = Vec::new();
            } else {
                self.held.clear();
            }
            self.sent = 0;
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesced<T> {
    /// Offers what waits and then `bufs` to `inner` in one write. Returns how many bytes of
    /// `bufs` it took: none while only held bytes went out.
    fn poll_offer(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let waiting = self.waiting();
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let mut count = 0;
        if waiting > 0 {
            slices[0] = IoSlice::new(&self.held[self.sent..]);
            count = 1;
        }
        let mut offered = waiting;
        for b in bufs
            .iter()
            .filter(|b| !b.is_empty())
            .take(MAX_SLICES - count)
        {
            slices[count] = *b;
            count += 1;
            offered += b.len();
        }
        let n = match Pin::new(&mut self.inner).poll_write_vectored(cx, &slices[..count]) {
            Poll::Ready(written) => written?,
            Poll::Pending => {
                self.backed_up = true;
                return Poll::Pending;
            }
        };
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        self.backed_up = n < offered;
        let held_out = n.min(waiting);
        self.advance(held_out);
        Poll::Ready(Ok(n - held_out))
    }

    /// Writes everything held, then flushes `inner`.
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.waiting() > 0 {
            ready!(self.poll_offer(cx, &[]))?;
        }
        self.chained = false;
        Pin::new(&mut self.inner).poll_flush(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        if !this.backed_up && this.waiting() + total <= HOLD_BYTES {
            // Not backed up, so nothing was sent of what is held: it is all of `held`.
            debug_assert_eq!(this.sent, 0);
            let len = this.held.len();
            if this.held.capacity() - len < total {
                // Doubling, but never past the bound, and with room for what follows.
                let room = (len + total + SLACK_BYTES)
                    .max(2 * this.held.capacity())
                    .min(HOLD_BYTES + SLACK_BYTES);
                this.held.reserve_exact(room - len);
            }
            for b in bufs {
                this.held.extend_from_slice(b);
            }
            this.chained = bufs.len() > 1;
            return Poll::Ready(Ok(total));
        }
        // Too much to hold: what waits goes first, the new bytes behind it in the same call.
        this.chained = false;
        loop {
            let taken = ready!(this.poll_offer(cx, bufs))?;
            if taken > 0 {
                return Poll::Ready(Ok(taken));
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.waiting() > 0 && this.chained {
            // h2 flushes to make room: the flush that ends this turn writes.
            this.chained = false;
            return Poll::Ready(Ok(()));
        }
        this.poll_send_held(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_held(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Coalesced<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Records each write it is given, taking at most `per_write` bytes of it; with `stalls`,
    /// every other write is refused as a full socket would (and the task woken at once).
    struct Recorder {
        writes: Vec<Vec<u8>>,
        per_write: usize,
        stalls: bool,
        calls: usize,
        shut: bool,
    }

    fn recorder(per_write: usize) -> Coalesced<Recorder> {
        Coalesced::new(Recorder {
            writes: Vec::new(),
            per_write,
            stalls: false,
            calls: 0,
            shut: false,
        })
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.calls += 1;
            if self.stalls && self.calls % 2 == 1 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let taken = all[..all.len().min(self.per_write)].to_vec();
            let n = taken.len();
            self.writes.push(taken);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }

    fn sent(io: &Coalesced<Recorder>) -> Vec<u8> {
        io.inner.writes.concat()
    }

    #[tokio::test]
    async fn a_plain_write_goes_out_at_its_flush() {
        let mut io = recorder(usize::MAX);
        io.write_all(b"headers").await.unwrap();
        assert!(io.inner.writes.is_empty());
        io.flush().await.unwrap();
        assert_eq!(io.inner.writes, vec![b"headers".to_vec()]);
    }

    #[tokio::test]
    async fn the_flush_after_a_chained_write_waits_for_the_next_one() {
        let mut io = recorder(usize::MAX);
        let payload = vec![7u8; 8192];
        let chained = [IoSlice::new(b"frame head"), IoSlice::new(&payload)];
        let n = io.write_vectored(&chained).await.unwrap();
        assert_eq!(n, 10 + payload.len());
        io.flush().await.unwrap();
        assert!(io.inner.writes.is_empty(), "h2 flushes only for room");
        io.write_all(b"trailers").await.unwrap();
        io.flush().await.unwrap();
        let mut expected = b"frame head".to_vec();
        expected.extend(&payload);
        expected.extend(b"trailers");
        assert_eq!(io.inner.writes, vec![expected], "one write for all");
    }

    #[tokio::test]
    async fn a_write_past_the_hold_goes_out_behind_what_waits() {
        let mut io = recorder(usize::MAX);
        io.write_all(b"small").await.unwrap();
        let large = vec![1u8; HOLD_BYTES];
        let n = io.write(&large).await.unwrap();
        assert_eq!(
            n,
            large.len(),
            "the held bytes are not counted as the caller's"
        );
        let mut expected = b"small".to_vec();
        expected.extend(&large);
        assert_eq!(io.inner.writes, vec![expected]);
        io.flush().await.unwrap();
        assert_eq!(io.inner.writes.len(), 1, "nothing was left held");
    }

    #[tokio::test]
    async fn short_writes_keep_every_byte_in_order() {
        let mut io = recorder(1000);
        let small: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        io.write_all(&small).await.unwrap();
        let large: Vec<u8> = (0..HOLD_BYTES as u32 + 5).map(|i| (i / 7) as u8).collect();
        io.write_all(&large).await.unwrap();
        io.write_all(b"end").await.unwrap();
        io.flush().await.unwrap();
        let mut expected = small;
        expected.extend(&large);
        expected.extend(b"end");
        assert_eq!(sent(&io), expected);
    }

    /// Writes a frame as h2 does, its head and payload in one vectored write, to the end.
    async fn write_chained(io: &mut Coalesced<Recorder>, head: &[u8], payload: &[u8]) {
        let mut done = 0;
        while done < head.len() + payload.len() {
            let n = if done < head.len() {
                let slices = [IoSlice::new(&head[done..]), IoSlice::new(payload)];
                io.write_vectored(&slices).await.unwrap()
            } else {
                io.write(&payload[done - head.len()..]).await.unwrap()
            };
            assert!(n > 0);
            done += n;
        }
    }

    #[tokio::test]
    async fn a_backed_up_socket_holds_no_more_than_the_bound() {
        let mut io = recorder(5000);
        io.inner.stalls = true;
        let mut expected = Vec::new();
        let mut most_held = 0;
        for i in 0..300u32 {
            let head = i.to_be_bytes();
            let payload = vec![i as u8; 16 * 1024];
            write_chained(&mut io, &head, &payload).await;
            io.flush().await.unwrap();
            most_held = most_held.max(io.held.capacity());
            expected.extend(head);
            expected.extend(&payload);
        }
        io.write_all(b"trailers").await.unwrap();
        io.flush().await.unwrap();
        expected.extend(b"trailers");
        assert_eq!(sent(&io), expected);
        assert!(
            most_held <= HOLD_BYTES + SLACK_BYTES,
            "{most_held} bytes held at once"
        );
    }

    #[test]
    fn a_write_after_a_partly_sent_flush_goes_behind_what_waits() {
        let mut io = recorder(5000);
        io.inner.stalls = true;
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let first: Vec<u8> = (0..12_000u32).map(|i| i as u8).collect();
        let n = Pin::new(&mut io).poll_write(&mut cx, &first);
        assert!(matches!(n, Poll::Ready(Ok(12_000))));
        // Refused, then 5,000 bytes out and refused again: the socket is backed up.
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_pending());
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_pending());
        assert_eq!(sent(&io).len(), 5000);
        // A small write now is not held behind the rest: it goes through, in order.
        let mut written = 0;
        while written == 0 {
            if let Poll::Ready(n) = Pin::new(&mut io).poll_write(&mut cx, b"next") {
                written = n.unwrap();
            }
        }
        assert!(io.held.len() <= first.len(), "nothing more was held");
        while Pin::new(&mut io).poll_flush(&mut cx).is_pending() {}
        let mut expected = first;
        expected.extend(&b"next"[..written]);
        assert_eq!(sent(&io), expected);
    }

    #[tokio::test]
    async fn shutdown_sends_what_waits() {
        let mut io = recorder(usize::MAX);
        let payload = vec![3u8; 300];
        let n = io
            .write_vectored(&[IoSlice::new(b"head"), IoSlice::new(&payload)])
            .await
            .unwrap();
        assert_eq!(n, 4 + payload.len());
        io.flush().await.unwrap();
        io.shutdown().await.unwrap();
        assert_eq!(sent(&io).len(), 4 + payload.len());
        assert!(io.inner.shut);
    }
}
