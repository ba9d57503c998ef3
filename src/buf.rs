//! Buffers handed to monoio's owned-buffer I/O: `FrameBatch` (shared frames for one `writev`,
//! without copying them) and `read_more` (a read that appends).
//!
//! monoio ships `IoVecBuf` only for `Vec<Vec<u8>>` and raw iovec vectors. Broadcast frames are
//! `Bytes` shared by every recipient, so this type owns the `Bytes` handles and an iovec array
//! pointing into them. The batch moves into the write op, so the kernel never sees freed
//! memory even if the writing task were dropped mid-write.

use std::io;

use bytes::{Bytes, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::AsyncReadRent;

/// Reads more bytes from a socket, appending to `buf` (monoio reads at the start of the
/// buffer it is given, so it gets only the spare room after what is there).
pub async fn read_more<R: AsyncReadRent>(
    reader: &mut R,
    mut buf: BytesMut,
    spare: usize,
) -> (io::Result<usize>, BytesMut) {
    if buf.capacity() - buf.len() < spare {
        buf.reserve(spare);
    }
    let len = buf.len();
    let (result, slice) = reader.read(buf.slice_mut(len..)).await;
    (result, slice.into_inner())
}

/// Frames for one vectored write, with partial-write bookkeeping.
pub struct FrameBatch {
    /// The frames; their heap data is what `iov` points at.
    frames: Vec<Bytes>,
    /// One iovec per unwritten frame, starting at `first`.
    iov: Vec<libc::iovec>,
    /// Index of the first iovec not yet completely written.
    first: usize,
}

impl FrameBatch {
    /// A batch over `frames`.
    pub fn new(frames: Vec<Bytes>) -> FrameBatch {
        let iov = frames
            .iter()
            .map(|f| libc::iovec { iov_base: f.as_ptr() as *mut libc::c_void, iov_len: f.len() })
            .collect();
        FrameBatch { frames, iov, first: 0 }
    }

    /// Marks `n` more bytes as written.
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 && self.first < self.iov.len() {
            let head = &mut self.iov[self.first];
            if n >= head.iov_len {
                n -= head.iov_len;
                self.first += 1;
            } else {
                // SAFETY: n < iov_len, so the new base stays inside the same frame's bytes.
                head.iov_base = unsafe { (head.iov_base as *mut u8).add(n) } as *mut libc::c_void;
                head.iov_len -= n;
                n = 0;
            }
        }
    }

    /// Whether everything has been written.
    pub fn is_done(&self) -> bool {
        self.first >= self.iov.len()
    }

    /// Gives the frames back (to drop them or reuse the vector).
    pub fn into_frames(self) -> Vec<Bytes> {
        self.frames
    }
}

// SAFETY: every iovec points into the heap data of a `Bytes` owned by `self.frames`; that data
// never moves when the `FrameBatch` (or its `Vec`) moves, and it lives as long as `self`.
// monoio keeps the buffer alive until the kernel completes the operation.
unsafe impl monoio::buf::IoVecBuf for FrameBatch {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iov[self.first..].as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.iov.len() - self.first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remaining(batch: &FrameBatch) -> Vec<u8> {
        batch.iov[batch.first..]
            .iter()
            // SAFETY: each iovec points to live bytes of a frame in the batch (see above).
            .flat_map(|v| unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) }.to_vec())
            .collect()
    }

    /// Partial writes advance across frame boundaries.
    #[test]
    fn advance_across_frames() {
        let mut batch =
            FrameBatch::new(vec![Bytes::from_static(b"abc"), Bytes::from_static(b"de"), Bytes::from_static(b"fgh")]);
        batch.advance(2);
        assert_eq!(remaining(&batch), b"cdefgh");
        batch.advance(2);
        assert_eq!(remaining(&batch), b"efgh");
        batch.advance(4);
        assert!(batch.is_done());
        assert_eq!(batch.into_frames().len(), 3);
    }
}
