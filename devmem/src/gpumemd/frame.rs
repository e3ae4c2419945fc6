//! Sans-I/O codecs: the 2-byte big-endian length framing of a proto, and the
//! 24-byte pool metadata struct. No sockets here, so everything is fuzzable.
#![forbid(unsafe_code)]

use prost::Message as _;

use super::error::FrameError;
use super::proto::UnixSocketProto;

/// Bytes of the length header.
pub const HEADER_LEN: usize = 2;
/// Largest payload a 2-byte length can describe.
pub const MAX_PAYLOAD: usize = u16::MAX as usize;

/// Serializes `msg` and prefixes its big-endian 16-bit length.
pub fn encode_frame(msg: &UnixSocketProto) -> Result<Vec<u8>, FrameError> {
    let len = msg.encoded_len();
    let len16 = u16::try_from(len).map_err(|_| FrameError::TooLong {
        len,
        max: MAX_PAYLOAD,
    })?;
    let mut out = Vec::with_capacity(HEADER_LEN + len);
    out.extend_from_slice(&len16.to_be_bytes());
    // Encoding into a Vec cannot run out of space; map anyway, never panic.
    msg.encode(&mut out).map_err(|_| FrameError::TooLong {
        len,
        max: MAX_PAYLOAD,
    })?;
    Ok(out)
}

/// Payload length announced by a header, checked against `max`.
pub fn parse_header(bytes: &[u8], max: usize) -> Result<usize, FrameError> {
    let hdr: [u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(FrameError::TooShort {
            need: HEADER_LEN,
            have: bytes.len(),
        })?;
    let len = usize::from(u16::from_be_bytes(hdr));
    if len > max {
        return Err(FrameError::TooLong { len, max });
    }
    Ok(len)
}

/// Parses one frame at the start of `bytes`; returns the message and the
/// number of bytes it used. Never panics, whatever `bytes` holds.
pub fn parse_frame(bytes: &[u8]) -> Result<(UnixSocketProto, usize), FrameError> {
    parse_frame_with_limit(bytes, MAX_PAYLOAD)
}

/// [`parse_frame`] with a payload limit below the protocol's 65535.
pub fn parse_frame_with_limit(
    bytes: &[u8],
    max: usize,
) -> Result<(UnixSocketProto, usize), FrameError> {
    let len = parse_header(bytes, max)?;
    let end = HEADER_LEN + len;
    let payload = bytes.get(HEADER_LEN..end).ok_or(FrameError::TooShort {
        need: end,
        have: bytes.len(),
    })?;
    Ok((decode_payload(payload)?, end))
}

/// Decodes a payload whose length header was already consumed.
pub fn decode_payload(payload: &[u8]) -> Result<UnixSocketProto, FrameError> {
    Ok(UnixSocketProto::decode(payload)?)
}

/// The daemon's `IpcGpuMemFdMetadata { int fd; size_t size; size_t align; }`
/// as raw x86-64 memory: little-endian, 4 padding bytes after `fd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolMetadata {
    /// The fd number *in the daemon's process*; informational only.
    pub daemon_fd: i32,
    /// Pool size in bytes.
    pub size: u64,
    /// Mapping alignment (CUDA VMM granularity) in bytes.
    pub align: u64,
}

impl PoolMetadata {
    /// Size of the C struct on x86-64.
    pub const WIRE_LEN: usize = 24;

    /// The struct's bytes; padding is written as zero.
    pub fn to_bytes(&self) -> [u8; Self::WIRE_LEN] {
        let mut b = [0u8; Self::WIRE_LEN];
        b[0..4].copy_from_slice(&self.daemon_fd.to_le_bytes());
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..24].copy_from_slice(&self.align.to_le_bytes());
        b
    }

    /// Parses exactly 24 bytes; padding is ignored. Any other length is an
    /// error (the original memcpy'd whatever length arrived into the struct).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FrameError> {
        let b: &[u8; Self::WIRE_LEN] = bytes.try_into().map_err(|_| {
            if bytes.len() < Self::WIRE_LEN {
                FrameError::TooShort {
                    need: Self::WIRE_LEN,
                    have: bytes.len(),
                }
            } else {
                FrameError::TooLong {
                    len: bytes.len(),
                    max: Self::WIRE_LEN,
                }
            }
        })?;
        let [f0, f1, f2, f3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7, a0, a1, a2, a3, a4, a5, a6, a7] =
            *b;
        Ok(Self {
            daemon_fd: i32::from_le_bytes([f0, f1, f2, f3]),
            size: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
            align: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_one_byte_inputs_are_too_short() {
        assert_eq!(
            parse_frame(&[]).unwrap_err(),
            FrameError::TooShort { need: 2, have: 0 }
        );
        assert_eq!(
            parse_frame(&[0]).unwrap_err(),
            FrameError::TooShort { need: 2, have: 1 }
        );
    }

    #[test]
    fn header_over_limit_is_rejected_before_reading_payload() {
        assert_eq!(
            parse_frame_with_limit(&[0x01, 0x00], 255).unwrap_err(),
            FrameError::TooLong { len: 256, max: 255 }
        );
    }

    #[test]
    fn payload_over_65535_cannot_be_encoded() {
        let msg = UnixSocketProto::raw(vec![0u8; 70_000]);
        assert!(matches!(
            encode_frame(&msg),
            Err(FrameError::TooLong { max: 65535, .. })
        ));
    }

    #[test]
    fn metadata_of_wrong_length_is_rejected() {
        assert!(matches!(
            PoolMetadata::from_bytes(b"Not found."),
            Err(FrameError::TooShort { need: 24, have: 10 })
        ));
        assert!(matches!(
            PoolMetadata::from_bytes(&[0u8; 25]),
            Err(FrameError::TooLong { len: 25, max: 24 })
        ));
    }
}
