//! The layout of one stored object in Redis: a small header followed by the body, in one string.
//!
//! ```text
//! offset  size      field
//! 0       4         magic "mcob"
//! 4       1         layout version (1)
//! 5       8         nonce: random per publish, so a reader can tell two writes of one key apart
//! 13      2         info length N (big-endian)
//! 15      N         MediaInfo (protobuf)
//! 15+N    size      body
//! ```
//!
//! Readers take the first window of the value (header and the start of the body) in one
//! `GETRANGE`, and later windows together with the first [`PREFIX_LEN`] bytes, so a value that
//! was replaced between two windows is detected instead of being spliced into one answer.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

use crate::proto::MediaInfo;

pub const MAGIC: &[u8; 4] = b"mcob";
pub const LAYOUT_VERSION: u8 = 1;
/// Magic, layout version and nonce: what identifies one publish of a value.
pub const PREFIX_LEN: usize = 13;
const FIXED_LEN: usize = PREFIX_LEN + 2;
/// Bound on the encoded `MediaInfo`; key validation keeps real ones far below it.
pub const MAX_INFO_LEN: usize = 4096;
/// The most a header can take; the first read window covers it.
pub const MAX_HEADER_LEN: usize = FIXED_LEN + MAX_INFO_LEN;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("value does not start with the object magic")]
    NotAnObject,
    #[error("unknown layout version {0}")]
    UnknownLayout(u8),
    #[error("header is truncated")]
    Truncated,
    #[error("media info is {0} bytes, over the limit")]
    InfoTooLong(usize),
    #[error("media info does not decode: {0}")]
    BadInfo(String),
    #[error("value is {actual} bytes, header says {expected}")]
    WrongLength { expected: u64, actual: u64 },
}

/// A decoded header.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// The first [`PREFIX_LEN`] bytes, compared on every later window.
    pub prefix: [u8; PREFIX_LEN],
    pub info: MediaInfo,
    /// Bytes before the body.
    pub len: usize,
}

impl Header {
    /// The nonce of the publish this header belongs to.
    pub fn nonce(&self) -> u64 {
        u64::from_be_bytes(self.prefix[5..13].try_into().expect("8 bytes"))
    }

    /// Total length of the stored value.
    pub fn value_len(&self) -> u64 {
        (self.len as u64).saturating_add(self.info.size)
    }
}

/// A fresh nonce for one publish.
pub fn new_nonce() -> u64 {
    fastrand::u64(..)
}

/// Encodes a header. The same `info` field lengths and nonce give the same header length, which
/// lets a writer patch the digest in place once the body is complete.
pub fn encode_header(info: &MediaInfo, nonce: u64) -> Result<Bytes, LayoutError> {
    let info_bytes = info.encode_to_vec();
    if info_bytes.len() > MAX_INFO_LEN {
        return Err(LayoutError::InfoTooLong(info_bytes.len()));
    }
    let mut out = BytesMut::with_capacity(FIXED_LEN + info_bytes.len());
    out.put_slice(MAGIC);
    out.put_u8(LAYOUT_VERSION);
    out.put_u64(nonce);
    out.put_u16(info_bytes.len() as u16);
    out.put_slice(&info_bytes);
    Ok(out.freeze())
}

/// Decodes the header at the start of `buf`, which may also hold part of the body.
pub fn decode_header(buf: &[u8]) -> Result<Header, LayoutError> {
    if buf.len() < MAGIC.len() || &buf[..MAGIC.len()] != MAGIC {
        return Err(LayoutError::NotAnObject);
    }
    if buf.len() < FIXED_LEN {
        return Err(LayoutError::Truncated);
    }
    if buf[4] != LAYOUT_VERSION {
        return Err(LayoutError::UnknownLayout(buf[4]));
    }
    let info_len = u16::from_be_bytes([buf[13], buf[14]]) as usize;
    if info_len > MAX_INFO_LEN {
        return Err(LayoutError::InfoTooLong(info_len));
    }
    let len = FIXED_LEN + info_len;
    if buf.len() < len {
        return Err(LayoutError::Truncated);
    }
    let info =
        MediaInfo::decode(&buf[FIXED_LEN..len]).map_err(|e| LayoutError::BadInfo(e.to_string()))?;
    let mut prefix = [0; PREFIX_LEN];
    prefix.copy_from_slice(&buf[..PREFIX_LEN]);
    Ok(Header { prefix, info, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> MediaInfo {
        MediaInfo {
            size: 42,
            content_type: "image/png".into(),
            file_name: "cat.png".into(),
            sha256: vec![7; 32].into(),
            stored_at_unix_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn round_trip_with_body_after_header() {
        let h = encode_header(&info(), new_nonce()).unwrap();
        let mut value = h.to_vec();
        value.extend_from_slice(b"body bytes");
        let decoded = decode_header(&value).unwrap();
        assert_eq!(decoded.info, info());
        assert_eq!(decoded.len, h.len());
        assert_eq!(decoded.value_len(), h.len() as u64 + 42);
        assert_eq!(&decoded.prefix[..], &h[..PREFIX_LEN]);
    }

    #[test]
    fn each_publish_gets_its_own_nonce() {
        let a = encode_header(&info(), new_nonce()).unwrap();
        let b = encode_header(&info(), new_nonce()).unwrap();
        assert_ne!(a[..PREFIX_LEN], b[..PREFIX_LEN]);
    }

    #[test]
    fn foreign_truncated_and_corrupt_values_are_errors() {
        let h = encode_header(&info(), new_nonce()).unwrap();
        assert_eq!(decode_header(b""), Err(LayoutError::NotAnObject));
        assert_eq!(
            decode_header(b"hello world, not ours"),
            Err(LayoutError::NotAnObject)
        );
        for cut in 4..h.len() {
            assert_eq!(
                decode_header(&h[..cut]),
                Err(LayoutError::Truncated),
                "cut {cut}"
            );
        }
        let mut v = h.to_vec();
        v[4] = 9;
        assert_eq!(decode_header(&v), Err(LayoutError::UnknownLayout(9)));
        let mut v = h.to_vec();
        v[13] = 0xff;
        assert!(matches!(
            decode_header(&v),
            Err(LayoutError::InfoTooLong(_))
        ));
        let mut v = h.to_vec();
        v[15] = 0xff; // a field tag with wire type 7 does not decode
        assert!(matches!(decode_header(&v), Err(LayoutError::BadInfo(_))));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(7);
        let h = encode_header(&info(), new_nonce()).unwrap();
        for _ in 0..20_000 {
            let mut v = h.to_vec();
            let n = rng.usize(1..4);
            for _ in 0..n {
                let i = rng.usize(..v.len());
                v[i] = rng.u8(..);
            }
            v.truncate(rng.usize(..=v.len()));
            let _ = decode_header(&v);
        }
    }
}
