//! Frames on the socket (docs/PROTOCOL.md §1): a u32 big-endian length, then
//! that many bytes of JSON. Both sides refuse a frame over [`MAX_FRAME_LEN`]
//! before reading its body, so a peer cannot make the other allocate more.

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::Error;

/// Largest frame body, in bytes (1 MiB).
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Reads one frame body into `buf` (cleared first). Returns `Ok(false)` on a
/// clean end of stream between frames, `Error::FrameTooLarge` when the
/// announced length is over the limit (the body is then left unread, so the
/// stream can no longer be trusted to be in step).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Result<bool, Error> {
    let mut len = [0u8; 4];
    // Distinguish a clean close (no byte of a new frame) from a torn one.
    let n = r.read(&mut len).await?;
    if n == 0 {
        return Ok(false);
    }
    r.read_exact(&mut len[n..]).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_LEN {
        return Err(Error::FrameTooLarge(len));
    }
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf).await?;
    Ok(true)
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
        let mut buf = Vec::new();
        let mut r = &frame[..];
        assert!(read_frame(&mut r, &mut buf).await.unwrap());
        assert_eq!(buf, br#"{"id":1}"#);
        assert!(!read_frame(&mut r, &mut buf).await.unwrap());

        let big = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        let mut r = &big[..];
        assert!(matches!(read_frame(&mut r, &mut buf).await, Err(Error::FrameTooLarge(_))));

        let torn = [0u8, 0, 0, 9, b'{'];
        let mut r = &torn[..];
        assert!(matches!(read_frame(&mut r, &mut buf).await, Err(Error::Io(_))));
    }
}
