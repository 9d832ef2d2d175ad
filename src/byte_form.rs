//! The byte form of stored records (idempotency entries, buffered writes): fixed-width integers
//! big-endian, variable fields length-prefixed. Every length read back is checked: stored bytes
//! are input like any other.

use bytes::{BufMut, BytesMut};

/// Stored bytes that do not decode, and where they stopped making sense.
#[derive(Debug, thiserror::Error)]
#[error("a stored record is corrupt ({0})")]
pub struct Corrupt(pub &'static str);

/// Appends a length-prefixed field.
pub fn put_field(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u32(bytes.len() as u32);
    out.put_slice(bytes);
}

/// Reads a byte form front to back.
pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader(bytes)
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Corrupt> {
        if self.0.len() < n {
            return Err(Corrupt("truncated"));
        }
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(taken)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], Corrupt> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, Corrupt> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, Corrupt> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, Corrupt> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, Corrupt> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub fn status(&mut self) -> Result<http::StatusCode, Corrupt> {
        http::StatusCode::from_u16(self.u16()?).map_err(|_| Corrupt("status"))
    }

    pub fn field(&mut self) -> Result<&'a [u8], Corrupt> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    /// Ends the read: bytes left over mean the record is not what it claims to be.
    pub fn finish(self) -> Result<(), Corrupt> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Corrupt("trailing bytes"))
        }
    }
}

/// The hex form of bytes (digests, receipt ids), for keys, URLs and logs.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Unix time in milliseconds, the clock of stored records: it outlives the process.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
