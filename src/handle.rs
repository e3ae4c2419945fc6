//! The 128-byte listen handle that travels out of band (NCCL_NET_HANDLE_MAXSIZE).
//!
//! Layout (little-endian), documented in docs/PROTOCOL.md:
//! `magic "TXHD" | version u16 | len u16 | secret [16] | listen_id u64 | addr [20] | zeros | stage u64`.
//! The last 8 bytes belong to the caller's side only (the C ABI keeps its
//! connect progress there, as NCCL plugins do) and are ignored on parse.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use crate::error::{Error, Result};
use crate::wire;

pub const HANDLE_SIZE: usize = 128;
const MAGIC: [u8; 4] = *b"TXHD";
/// Version 2 goes with wire version 2 (a handle names the listener's protocol).
const VERSION: u16 = 2;
/// Bytes covered by the checks (everything before the reserved zeros).
const USED_LEN: usize = 52;
/// Offset of the caller-private stage word.
pub const STAGE_OFFSET: usize = 120;

/// What a connector needs to reach a listen comm, plus (on the connecting
/// side) the progress of `Net::connect`, which is called again with the same
/// handle until the comm is ready — NCCL keeps that state in its handle too.
pub struct Handle {
    pub(crate) secret: [u8; 16],
    pub(crate) listen_id: u64,
    pub(crate) addr: SocketAddr,
    pub(crate) stage: Option<Box<crate::net::Connecting>>,
}

impl Clone for Handle {
    /// Clones the wire fields; connect progress stays with the original.
    fn clone(&self) -> Self {
        Handle {
            secret: self.secret,
            listen_id: self.listen_id,
            addr: self.addr,
            stage: None,
        }
    }
}

impl PartialEq for Handle {
    fn eq(&self, o: &Self) -> bool {
        self.secret == o.secret && self.listen_id == o.listen_id && self.addr == o.addr
    }
}

impl Eq for Handle {}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("listen_id", &self.listen_id)
            .field("addr", &self.addr)
            .field("connecting", &self.stage.is_some())
            .finish_non_exhaustive()
    }
}

impl Handle {
    /// The control address the listener waits on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn to_bytes(&self) -> [u8; HANDLE_SIZE] {
        let mut b = [0u8; HANDLE_SIZE];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&(USED_LEN as u16).to_le_bytes());
        b[8..24].copy_from_slice(&self.secret);
        b[24..32].copy_from_slice(&self.listen_id.to_le_bytes());
        wire::put_addr(&mut b[32..52], &self.addr);
        b
    }

    /// Parses and validates a handle; any corruption is `Error::BadHandle`.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let bad = |m: &str| Err(Error::BadHandle(m.to_string()));
        if b.len() != HANDLE_SIZE {
            return Err(Error::BadHandle(format!(
                "{} bytes, expected {HANDLE_SIZE}",
                b.len()
            )));
        }
        if b[0..4] != MAGIC {
            return bad("bad magic");
        }
        match u16::from_le_bytes([b[4], b[5]]) {
            VERSION => {}
            1 => return bad("version 1: the listener is a tcpx-rs of wire version 1; run the same release on both sides"),
            _ => return bad("unknown handle version"),
        }
        if u16::from_le_bytes([b[6], b[7]]) as usize != USED_LEN {
            return bad("bad length field");
        }
        if b[USED_LEN..STAGE_OFFSET].iter().any(|&x| x != 0) {
            return bad("reserved bytes are not zero");
        }
        let mut secret = [0u8; 16];
        secret.copy_from_slice(&b[8..24]);
        if secret == [0u8; 16] {
            return bad("missing secret");
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[24..32]);
        let addr =
            wire::get_addr(&b[32..52]).map_err(|e| Error::BadHandle(format!("address: {e}")))?;
        if addr.ip().is_unspecified() {
            return bad("unspecified address");
        }
        Ok(Handle {
            secret,
            listen_id: u64::from_le_bytes(id),
            addr,
            stage: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Handle {
        Handle {
            secret: [7; 16],
            listen_id: 42,
            addr: "127.0.0.2:4567".parse().unwrap(),
            stage: None,
        }
    }

    #[test]
    fn garbage_and_truncated_handles_are_typed_errors() {
        assert!(matches!(
            Handle::from_bytes(&[0u8; 128]),
            Err(Error::BadHandle(_))
        ));
        assert!(matches!(
            Handle::from_bytes(&sample().to_bytes()[..100]),
            Err(Error::BadHandle(_))
        ));
        let mut b = sample().to_bytes();
        b[60] = 1;
        assert!(matches!(Handle::from_bytes(&b), Err(Error::BadHandle(_))));
    }

    #[test]
    fn stage_word_is_ignored() {
        let mut b = sample().to_bytes();
        b[STAGE_OFFSET..].copy_from_slice(&99u64.to_le_bytes());
        assert_eq!(Handle::from_bytes(&b).unwrap(), sample());
    }

    proptest! {
        #[test]
        fn round_trips(secret in any::<[u8; 16]>().prop_filter("nonzero", |s| *s != [0; 16]),
                       listen_id: u64, v6: bool, raw: [u8; 16], port in 1u16..) {
            let ip: std::net::IpAddr = if v6 { raw.into() } else { [raw[0] | 1, raw[1], raw[2], raw[3]].into() };
            prop_assume!(!ip.is_unspecified());
            let h = Handle { secret, listen_id, addr: SocketAddr::new(ip, port), stage: None };
            prop_assert_eq!(Handle::from_bytes(&h.to_bytes()).unwrap(), h);
        }

        #[test]
        fn any_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Handle::from_bytes(&b);
        }

        #[test]
        fn single_byte_corruption_is_caught_or_harmless(i in 0usize..STAGE_OFFSET, v: u8) {
            let mut b = sample().to_bytes();
            b[i] = v;
            if let Ok(h) = Handle::from_bytes(&b) {
                // Only the secret, id and address bytes may change without an error.
                prop_assert!((8..52).contains(&i) || h == sample());
            }
        }
    }
}
