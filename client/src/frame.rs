//! Frames on the socket (docs/PROTOCOL.md §1): a u32 big-endian length, then
//! that many bytes of JSON. Both sides refuse a frame over [`MAX_FRAME_LEN`]
//! before reading its body, so a peer cannot make the other allocate more.

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::Error;

/// Largest frame body, in bytes (1 MiB).
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// A budget of buffer bytes shared by several [`FrameReader`]s (the
/// daemon's connections): a reader takes from it before it grows its
/// buffer past [`READER_INITIAL`] bytes, and gives back when it shrinks or
/// drops. So what all readers hold for partly received frames is bounded,
/// however many peers announce large frames.
#[derive(Debug)]
pub struct FrameBudget {
    limit: usize,
    used: std::sync::atomic::AtomicUsize,
}

impl FrameBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> FrameBudget {
        FrameBudget { limit, used: std::sync::atomic::AtomicUsize::new(0) }
    }

    /// Bytes taken now.
    pub fn used(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn take(&self, n: usize) -> bool {
        use std::sync::atomic::Ordering;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Reads frames through one buffer, so that one `read` call usually brings
/// a whole frame, or several pipelined ones, instead of one call for the length and
/// one for the body. Frames carry plaintext: bytes are zeroed as their frame
/// is consumed, when the buffer moves or shrinks, and when the reader is
/// dropped. [`FrameReader::next`] is cancel safe (bytes read so far stay in
/// the buffer), so it may race other futures in a `select!`.
///
/// The buffer grows with the bytes that arrive (at most doubling when it is
/// full), never to the length a frame announces: a peer that announces
/// 1 MiB and sends 10 bytes costs [`READER_INITIAL`] bytes.
pub struct FrameReader<R> {
    inner: R,
    /// Fully initialised; `buf[start..end]` holds bytes not yet consumed.
    buf: zeroize::Zeroizing<Vec<u8>>,
    start: usize,
    end: usize,
    /// Length (with its prefix) of the frame last returned, consumed at the
    /// next call.
    returned: usize,
    /// When the bytes of the frame now partly held started to arrive.
    partial_since: Option<std::time::Instant>,
    /// The shared budget, and the bytes taken from it.
    budget: Option<(std::sync::Arc<FrameBudget>, usize)>,
}

/// The buffer a reader starts with, and shrinks back to when it is empty:
/// room for a typical request or answer, little for an idle connection.
pub const READER_INITIAL: usize = 1024;
/// A buffer grown past this for a large frame is given back once empty
/// (with a budget: any buffer grown past [`READER_INITIAL`]).
const READER_KEEP: usize = 64 << 10;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader over `inner`.
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader {
            inner,
            buf: zeroize::Zeroizing::new(vec![0; READER_INITIAL]),
            start: 0,
            end: 0,
            returned: 0,
            partial_since: None,
            budget: None,
        }
    }

    /// A reader over `inner` whose buffer grows past [`READER_INITIAL`]
    /// only with bytes taken from `budget`; when the budget is spent,
    /// [`next`](Self::next) fails with [`Error::FrameBudgetSpent`].
    pub fn with_budget(inner: R, budget: std::sync::Arc<FrameBudget>) -> FrameReader<R> {
        let mut r = FrameReader::new(inner);
        r.budget = Some((budget, 0));
        r
    }

    /// When the first bytes of a frame not yet whole arrived (`None` when
    /// no partial frame is held).
    pub fn partial_since(&self) -> Option<std::time::Instant> {
        self.partial_since
    }

    /// The size of the buffer now.
    pub fn buffer_len(&self) -> usize {
        self.buf.len()
    }

    /// The next frame's body: `Ok(None)` on a clean end of stream between
    /// frames, `Error::FrameTooLarge` when the announced length is over
    /// [`MAX_FRAME_LEN`] (nothing more is read: the stream is out of step),
    /// `Error::FrameBudgetSpent` when the buffer cannot grow for the frame,
    /// an I/O error for a stream that ends inside a frame.
    pub async fn next(&mut self) -> Result<Option<&[u8]>, Error> {
        self.consume();
        loop {
            let avail = self.end - self.start;
            let need = if avail >= 4 {
                let len =
                    u32::from_be_bytes(self.buf[self.start..self.start + 4].try_into().expect("4 bytes"));
                let len = len as usize;
                if len > MAX_FRAME_LEN {
                    return Err(Error::FrameTooLarge(len));
                }
                if avail >= 4 + len {
                    self.returned = 4 + len;
                    return Ok(Some(&self.buf[self.start + 4..self.start + 4 + len]));
                }
                4 + len
            } else {
                4
            };
            self.make_room(need)?;
            let end = self.end;
            let n = self.inner.read(&mut self.buf[end..]).await?;
            if n == 0 {
                return match avail {
                    0 => Ok(None),
                    _ => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
                };
            }
            if avail == 0 {
                self.partial_since = Some(std::time::Instant::now());
            }
            self.end += n;
        }
    }

    /// Zeroes and drops the frame returned last.
    fn consume(&mut self) {
        use zeroize::Zeroize;
        if self.returned == 0 {
            return;
        }
        self.buf[self.start..self.start + self.returned].zeroize();
        self.start += self.returned;
        self.returned = 0;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            self.partial_since = None;
            let keep = if self.budget.is_some() { READER_INITIAL } else { READER_KEEP };
            if self.buf.len() > keep {
                // Shrinking gives back to the budget; it cannot fail.
                let _ = self.resize(READER_INITIAL);
            }
        } else {
            // The rest arrived with the frame just returned.
            self.partial_since = Some(std::time::Instant::now());
        }
    }

    /// Makes room to read at least one more byte, moving a partial frame
    /// to the front when it would not fit where it is, and growing the
    /// buffer (at most doubling it, and never past `need`, the length of
    /// the frame with its prefix) only when it is full.
    fn make_room(&mut self, need: usize) -> Result<(), Error> {
        use zeroize::Zeroize;
        if self.end < self.buf.len() && self.start + need <= self.buf.len() {
            return Ok(());
        }
        let held = self.end - self.start;
        if self.start > 0 {
            // Move the partial frame to the front and zero where it was.
            self.buf.copy_within(self.start..self.end, 0);
            self.buf[held..self.end].zeroize();
            self.start = 0;
            self.end = held;
        }
        if self.end == self.buf.len() {
            let size = need.min(2 * self.buf.len()).min(MAX_FRAME_LEN + 4).max(self.end + 1);
            self.resize(size)?;
        }
        Ok(())
    }

    /// Moves the held bytes (from the front) into a buffer of `size`
    /// bytes, taking from or giving back to the budget.
    fn resize(&mut self, size: usize) -> Result<(), Error> {
        debug_assert!(self.start == 0 && self.end <= size);
        if let Some((budget, taken)) = &mut self.budget {
            let want = size.saturating_sub(READER_INITIAL);
            if want > *taken {
                if !budget.take(want - *taken) {
                    return Err(Error::FrameBudgetSpent(budget.limit()));
                }
            } else {
                budget.give(*taken - want);
            }
            *taken = want;
        }
        let mut other = zeroize::Zeroizing::new(vec![0; size]);
        other[..self.end].copy_from_slice(&self.buf[..self.end]);
        // The old buffer is zeroed as it drops.
        self.buf = other;
        Ok(())
    }
}

impl<R> Drop for FrameReader<R> {
    fn drop(&mut self) {
        if let Some((budget, taken)) = &self.budget {
            budget.give(*taken);
        }
    }
}

/// Serialises `value` as JSON into a complete frame: length prefix and body.
pub fn encode_frame<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    let mut out = vec![0u8; 4];
    serde_json::to_writer(&mut out, value).map_err(|e| Error::Protocol(e.to_string()))?;
    let len = out.len() - 4;
    if len > MAX_FRAME_LEN {
        return Err(Error::FrameTooLarge(len));
    }
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Writes a frame made by [`encode_frame`].
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> Result<(), Error> {
    w.write_all(frame).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_limits() {
        let frame = encode_frame(&serde_json::json!({"id": 1})).unwrap();
        assert_eq!(&frame[..4], &[0, 0, 0, 8]);
        let mut r = FrameReader::new(&frame[..]);
        assert_eq!(r.next().await.unwrap().unwrap(), br#"{"id":1}"#);
        assert!(r.next().await.unwrap().is_none());
    }

    /// A reader that hands out at most `step` bytes per read.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = self.step.min(self.data.len()).min(buf.remaining());
            buf.put_slice(&self.data[..n]);
            self.data = &self.data[n..];
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn the_frame_reader_reads_pipelined_split_and_large_frames() {
        let bodies: Vec<Vec<u8>> = vec![
            b"{}".to_vec(),
            vec![b'a'; 3000],
            Vec::new(),
            vec![b'b'; READER_KEEP + 10],
            b"{\"id\":2}".to_vec(),
        ];
        let mut stream = Vec::new();
        for b in &bodies {
            stream.extend_from_slice(&(b.len() as u32).to_be_bytes());
            stream.extend_from_slice(b);
        }
        for step in [1, 3, 7, 1000, usize::MAX] {
            let mut r = FrameReader::new(Trickle { data: &stream, step });
            for b in &bodies {
                assert_eq!(r.next().await.unwrap().unwrap(), &b[..], "step {step}");
            }
            assert!(r.next().await.unwrap().is_none());
            assert!(r.buf.len() <= READER_KEEP, "shrinks once empty");
            assert!(r.buf.iter().all(|b| *b == 0), "consumed bytes are zeroed");
        }
        let mut torn = FrameReader::new(&[0u8, 0, 0, 9, b'{'][..]);
        assert!(matches!(torn.next().await, Err(Error::Io(_))));
        let big = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        let mut r = FrameReader::new(&big[..]);
        assert!(matches!(r.next().await, Err(Error::FrameTooLarge(_))));
    }

    #[tokio::test]
    async fn the_buffer_grows_with_what_arrived_not_with_what_was_announced() {
        // 1 MiB announced, 10 bytes sent, then the peer stalls.
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut r = FrameReader::new(rx);
        tx.write_all(&(MAX_FRAME_LEN as u32).to_be_bytes()).await.unwrap();
        tx.write_all(&[b'x'; 10]).await.unwrap();
        let pending = tokio::time::timeout(std::time::Duration::from_millis(50), r.next()).await;
        assert!(pending.is_err(), "the frame is not whole");
        assert_eq!(r.buffer_len(), READER_INITIAL);
        assert!(r.partial_since().is_some());
    }

    #[tokio::test]
    async fn readers_share_a_budget_and_give_it_back() {
        let budget = std::sync::Arc::new(FrameBudget::new(8 << 10));
        let body = vec![b'a'; 6000];
        let mut stream = (body.len() as u32).to_be_bytes().to_vec();
        stream.extend_from_slice(&body);
        let mut a = FrameReader::with_budget(Trickle { data: &stream, step: 700 }, budget.clone());
        assert_eq!(a.next().await.unwrap().unwrap(), &body[..]);
        let held = budget.used();
        assert!(held > 0 && held <= 8 << 10, "{held}");
        // A second reader cannot take what the first holds.
        let mut b = FrameReader::with_budget(Trickle { data: &stream, step: 700 }, budget.clone());
        assert!(matches!(b.next().await, Err(Error::FrameBudgetSpent(_))));
        assert!(a.next().await.unwrap().is_none());
        assert_eq!(a.buffer_len(), READER_INITIAL, "shrinks once empty");
        drop((a, b));
        assert_eq!(budget.used(), 0);
    }
}
