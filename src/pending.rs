//! Bytes a stream has produced for its reader but the reader has not taken
//! yet: decrypted TLS records ([`server::tls`](crate::server::tls)) and
//! checked HTTP/1 request bytes ([`http1::guard`](crate::http1::guard)).

use tokio::io::ReadBuf;

/// `bytes[pos..]` waits to be read. No `Debug`: the bytes are a client's
/// decrypted request, which may carry its credentials.
#[derive(Default)]
pub struct Pending {
    bytes: Vec<u8>,
    pos: usize,
}

impl Pending {
    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.pos == self.bytes.len()
    }

    /// The buffer to append new bytes to (they wait behind what does).
    pub fn append_to(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }

    /// Appends `bytes`.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }

    /// Puts `bytes` in front of what waits, to be read first.
    pub fn unread(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut again = Vec::with_capacity(bytes.len() + self.bytes.len() - self.pos);
        again.extend_from_slice(bytes);
        again.extend_from_slice(&self.bytes[self.pos..]);
        self.bytes = again;
        self.pos = 0;
    }

    /// Moves as much as fits into `buf`; false when nothing waited. Once
    /// all is read the buffer is emptied for reuse, keeping its capacity.
    pub fn read_into(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.is_empty() {
            return false;
        }
        let n = (self.bytes.len() - self.pos).min(buf.remaining());
        buf.put_slice(&self.bytes[self.pos..self.pos + n]);
        self.pos += n;
        if self.is_empty() {
            self.bytes.clear();
            self.pos = 0;
        }
        true
    }

    /// Lets go of the buffer if nothing waits in it.
    pub fn release(&mut self) {
        if self.is_empty() {
            *self = Pending::default();
        }
    }

    /// The buffer's capacity (what an idle stream still holds).
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.bytes.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &mut Pending, room: usize) -> Option<Vec<u8>> {
        let mut space = vec![0; room];
        let mut buf = ReadBuf::new(&mut space);
        p.read_into(&mut buf).then(|| buf.filled().to_vec())
    }

    #[test]
    fn reads_in_order_across_small_reads_and_reuses_the_buffer() {
        let mut p = Pending::default();
        assert_eq!(read(&mut p, 4), None);
        p.extend(b"hello ");
        p.append_to().extend_from_slice(b"world");
        assert_eq!(read(&mut p, 4).unwrap(), b"hell");
        assert_eq!(read(&mut p, 100).unwrap(), b"o world");
        assert!(p.is_empty());
        assert!(p.capacity() > 0, "kept for the next bytes");
        p.release();
        assert_eq!(p.capacity(), 0);
    }

    #[test]
    fn unread_bytes_come_first_and_release_keeps_what_waits() {
        let mut p = Pending::default();
        p.extend(b"abcdef");
        assert_eq!(read(&mut p, 3).unwrap(), b"abc");
        p.unread(b"XY");
        p.unread(b"");
        p.release();
        assert_eq!(read(&mut p, 100).unwrap(), b"XYdef");
        assert_eq!(read(&mut p, 100), None);
    }
}
