//! Frames on the socket (docs/PROTOCOL.md §1): a u32 big-endian length, then
//! that many bytes of JSON. Both sides refuse a frame over [`MAX_FRAME_LEN`]
//! before reading its body, so a peer cannot make the other allocate more.

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::Error;

/// Largest frame body, in bytes (1 MiB).
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Reads frames through one buffer, so that one `read` call usually brings
/// a whole frame, or several pipelined ones, instead of one call for the length and
/// one for the body. Frames carry plaintext: bytes are zeroed as their frame
/// is consumed, when the buffer moves or shrinks, and when the reader is
/// dropped. [`FrameReader::next`] is cancel safe (bytes read so far stay in
/// the buffer), so it may race other futures in a `select!`.
pub struct FrameReader<R> {
    inner: R,
    /// Fully initialised; `buf[start..end]` holds bytes not yet consumed.
    buf: zeroize::Zeroizing<Vec<u8>>,
    start: usize,
    end: usize,
    /// Length (with its prefix) of the frame last returned, consumed at the
    /// next call.
    returned: usize,
}

/// The buffer a reader starts with, and shrinks back to when it is empty:
/// room for a typical request or answer, little for an idle connection.
const READER_INITIAL: usize = 1024;
/// A buffer grown past this for a large frame is given back once empty.
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
        }
    }

    /// The next frame's body: `Ok(None)` on a clean end of stream between
    /// frames, `Error::FrameTooLarge` when the announced length is over
    /// [`MAX_FRAME_LEN`] (nothing more is read: the stream is out of step),
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
            self.make_room(need);
            let end = self.end;
            let n = self.inner.read(&mut self.buf[end..]).await?;
            if n == 0 {
                return match avail {
                    0 => Ok(None),
                    _ => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
                };
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
            if self.buf.len() > READER_KEEP {
                self.buf = zeroize::Zeroizing::new(vec![0; READER_INITIAL]);
            }
        }
    }

    /// Makes room for a frame of `need` bytes (with its prefix) from
    /// `start`, and for at least one more byte to be read.
    fn make_room(&mut self, need: usize) {
        use zeroize::Zeroize;
        if self.start + need <= self.buf.len() && self.end < self.buf.len() {
            return;
        }
        let held = self.end - self.start;
        if need <= self.buf.len() && held < self.buf.len() {
            // Move the partial frame to the front and zero where it was.
            self.buf.copy_within(self.start..self.end, 0);
            self.buf[held..self.end].zeroize();
        } else {
            let size = need.max(2 * self.buf.len()).min(MAX_FRAME_LEN + 4);
            let mut bigger = zeroize::Zeroizing::new(vec![0; size]);
            bigger[..held].copy_from_slice(&self.buf[self.start..self.end]);
            // The old buffer is zeroed as it drops.
            self.buf = bigger;
        }
        self.start = 0;
        self.end = held;
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
}
