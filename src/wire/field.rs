//! Reading and writing the field encodings shared by control frames.

use bytes::BufMut;

use super::{FrameError, FrameKind};

/// A cursor over the payload of one control frame; every read is bounds-checked and
/// fails with [`FrameError::Truncated`] naming the field.
pub(super) struct Reader<'a> {
    kind: FrameKind,
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads the payload `buf` of a frame of `kind`.
    pub(super) fn new(kind: FrameKind, buf: &'a [u8]) -> Self {
        Self { kind, buf }
    }

    /// Takes the next `len` bytes.
    fn take(&mut self, len: usize, field: &'static str) -> Result<&'a [u8], FrameError> {
        let Some((head, rest)) = self.buf.split_at_checked(len) else {
            return Err(self.truncated(field));
        };
        self.buf = rest;
        Ok(head)
    }

    /// Takes the next `N` bytes as an array.
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], FrameError> {
        let Some((head, rest)) = self.buf.split_first_chunk::<N>() else {
            return Err(self.truncated(field));
        };
        self.buf = rest;
        Ok(*head)
    }

    /// Reads a `u8`.
    pub(super) fn u8(&mut self, field: &'static str) -> Result<u8, FrameError> {
        self.array(field).map(u8::from_be_bytes)
    }

    /// Reads a big-endian `u16`.
    pub(super) fn u16(&mut self, field: &'static str) -> Result<u16, FrameError> {
        self.array(field).map(u16::from_be_bytes)
    }

    /// Reads a big-endian `u32`.
    pub(super) fn u32(&mut self, field: &'static str) -> Result<u32, FrameError> {
        self.array(field).map(u32::from_be_bytes)
    }

    /// Reads a big-endian `u64`.
    pub(super) fn u64(&mut self, field: &'static str) -> Result<u64, FrameError> {
        self.array(field).map(u64::from_be_bytes)
    }

    /// Reads a big-endian `u128`.
    pub(super) fn u128(&mut self, field: &'static str) -> Result<u128, FrameError> {
        self.array(field).map(u128::from_be_bytes)
    }

    /// Reads a `bytes16`: a `u16` length, then that many bytes.
    pub(super) fn bytes16(&mut self, field: &'static str) -> Result<&'a [u8], FrameError> {
        let len = self.u16(field)?;
        self.take(len.into(), field)
    }

    /// Reads a `str16`: a `u16` length, then that many bytes of UTF-8.
    pub(super) fn str16(&mut self, field: &'static str) -> Result<String, FrameError> {
        let bytes = self.bytes16(field)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(FrameError::InvalidUtf8 {
                kind: self.kind,
                field,
            }),
        }
    }

    /// Ends the read, failing if any payload is left over.
    pub(super) fn finish(self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::TrailingBytes {
                kind: self.kind,
                extra: self.buf.len(),
            })
        }
    }

    fn truncated(&self, field: &'static str) -> FrameError {
        FrameError::Truncated {
            kind: self.kind,
            field,
        }
    }
}

/// Encoded size of a `bytes16` or `str16` holding `len` bytes.
pub(super) fn len16(len: usize) -> usize {
    2 + len
}

/// Checks that a `bytes16` or `str16` field of `len` bytes can be encoded.
pub(super) fn check16(kind: FrameKind, field: &'static str, len: usize) -> Result<(), FrameError> {
    if len > usize::from(u16::MAX) {
        return Err(FrameError::FieldTooLong {
            kind,
            field,
            len,
            max: usize::from(u16::MAX),
        });
    }
    Ok(())
}

/// Writes a `bytes16`.
///
/// # Panics
///
/// If `bytes` is longer than `u16::MAX`; [`check16`] rules that out first.
pub(super) fn put_bytes16(dst: &mut impl BufMut, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).expect("field length checked by Frame::validate");
    dst.put_u16(len);
    dst.put_slice(bytes);
}
