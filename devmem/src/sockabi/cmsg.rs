//! Raw `cmsghdr` framing of x86-64 Linux: a writer and a checked reader.
//!
//! `struct cmsghdr { size_t cmsg_len; int cmsg_level; int cmsg_type; }` is 16
//! bytes; payloads start right after it and each cmsg is padded to 8 bytes
//! (`CMSG_ALIGN`). Values are in host byte order.

use super::AbiError;

/// `sizeof(struct cmsghdr)` on x86-64.
pub const CMSG_HDR_LEN: usize = 16;
/// `CMSG_ALIGN` unit (`sizeof(size_t)`).
pub const CMSG_ALIGN_TO: usize = 8;

/// `CMSG_ALIGN(len)`.
pub const fn cmsg_align(len: usize) -> usize {
    (len + CMSG_ALIGN_TO - 1) & !(CMSG_ALIGN_TO - 1)
}

/// `CMSG_LEN(payload)`: the value of `cmsg_len`.
pub const fn cmsg_len(payload: usize) -> usize {
    CMSG_HDR_LEN + payload
}

/// `CMSG_SPACE(payload)`: the bytes one cmsg takes in the buffer.
pub const fn cmsg_space(payload: usize) -> usize {
    CMSG_HDR_LEN + cmsg_align(payload)
}

/// One cmsg as found in a control buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawCmsg<'a> {
    /// Offset of its header in the buffer.
    pub offset: usize,
    /// `cmsg_level`.
    pub level: i32,
    /// `cmsg_type`.
    pub ty: i32,
    /// The `cmsg_len - 16` payload bytes.
    pub data: &'a [u8],
}

/// Walks the cmsgs of a control buffer, checking every length.
///
/// Give it exactly the `msg_controllen` bytes recvmsg reported. The last
/// cmsg may lack its trailing padding. After an error it yields `None`.
#[derive(Debug, Clone)]
pub struct RawCmsgs<'a> {
    buf: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> RawCmsgs<'a> {
    /// Starts at the first cmsg of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        RawCmsgs {
            buf,
            pos: 0,
            failed: false,
        }
    }

    fn fail(&mut self, reason: &'static str) -> Option<Result<RawCmsg<'a>, AbiError>> {
        self.failed = true;
        Some(Err(AbiError::Malformed {
            offset: self.pos,
            reason,
        }))
    }
}

impl<'a> Iterator for RawCmsgs<'a> {
    type Item = Result<RawCmsg<'a>, AbiError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.buf.len() {
            return None;
        }
        let rest = &self.buf[self.pos..];
        let Some(hdr) = rest.get(..CMSG_HDR_LEN) else {
            return self.fail("fewer than 16 bytes left for a cmsghdr");
        };
        let len = u64::from_ne_bytes(array(&hdr[0..8]));
        let level = i32::from_ne_bytes(array(&hdr[8..12]));
        let ty = i32::from_ne_bytes(array(&hdr[12..16]));
        if len < CMSG_HDR_LEN as u64 {
            return self.fail("cmsg_len is smaller than the cmsghdr");
        }
        if len > rest.len() as u64 {
            return self.fail("cmsg_len runs past the end of the buffer");
        }
        // len <= rest.len() here, so it fits in usize.
        let len = len as usize;
        let item = RawCmsg {
            offset: self.pos,
            level,
            ty,
            data: &rest[CMSG_HDR_LEN..len],
        };
        // A last cmsg without its padding ends the buffer.
        self.pos = self.pos.saturating_add(cmsg_align(len)).min(self.buf.len());
        Some(Ok(item))
    }
}

/// Appends one cmsg, padded to `CMSG_SPACE`, as the kernel's `put_cmsg` does.
pub fn push_cmsg(out: &mut Vec<u8>, level: i32, ty: i32, payload: &[u8]) {
    let len = cmsg_len(payload.len());
    out.extend_from_slice(&(len as u64).to_ne_bytes());
    out.extend_from_slice(&level.to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len() + cmsg_align(payload.len()) - payload.len(), 0);
}

/// Copies a slice of known length into an array (callers slice exactly N bytes).
pub(crate) fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&bytes[..N]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_libc_macros() {
        for payload in [0usize, 1, 4, 8, 12, 20, 24, 100] {
            // SAFETY: CMSG_LEN/CMSG_SPACE are pure arithmetic.
            let (l, s) = unsafe {
                (
                    libc::CMSG_LEN(payload as u32) as usize,
                    libc::CMSG_SPACE(payload as u32) as usize,
                )
            };
            assert_eq!(cmsg_len(payload), l, "CMSG_LEN({payload})");
            assert_eq!(cmsg_space(payload), s, "CMSG_SPACE({payload})");
        }
        assert_eq!(CMSG_HDR_LEN, std::mem::size_of::<libc::cmsghdr>());
    }

    #[test]
    fn reads_back_what_push_writes() {
        let mut buf = Vec::new();
        push_cmsg(&mut buf, 1, 99, &[1, 2, 3, 4, 5]);
        push_cmsg(&mut buf, 6, 7, &[]);
        assert_eq!(buf.len(), cmsg_space(5) + cmsg_space(0));
        let got: Vec<_> = RawCmsgs::new(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].level, got[0].ty, got[0].data),
            (1, 99, &[1u8, 2, 3, 4, 5][..])
        );
        assert_eq!(
            (got[1].offset, got[1].level, got[1].ty),
            (cmsg_space(5), 6, 7)
        );
        assert!(got[1].data.is_empty());
    }

    #[test]
    fn last_cmsg_may_lack_padding() {
        let mut buf = Vec::new();
        push_cmsg(&mut buf, 1, 98, &[9; 12]);
        buf.truncate(cmsg_len(12));
        let got: Vec<_> = RawCmsgs::new(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].data, &[9; 12]);
    }

    #[test]
    fn bad_lengths_are_typed_errors() {
        let mut buf = Vec::new();
        push_cmsg(&mut buf, 1, 99, &[0; 12]);
        // Cut inside the payload: cmsg_len runs past the end.
        let err = RawCmsgs::new(&buf[..20]).next().unwrap().unwrap_err();
        assert!(
            matches!(err, AbiError::Malformed { offset: 0, .. }),
            "{err}"
        );
        // Fewer than 16 bytes.
        let err = RawCmsgs::new(&buf[..10]).next().unwrap().unwrap_err();
        assert!(matches!(err, AbiError::Malformed { .. }));
        // cmsg_len 0 (zeroed buffer) must not loop forever.
        let zeros = [0u8; 64];
        let mut it = RawCmsgs::new(&zeros);
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none());
        // A huge cmsg_len.
        let mut big = buf.clone();
        big[..8].copy_from_slice(&u64::MAX.to_ne_bytes());
        assert!(RawCmsgs::new(&big).next().unwrap().is_err());
    }
}
