//! The version-independent plugin: one transport per process and the
//! objects NCCL holds as `void*`. The per-version tables in `tables.rs`
//! only convert arguments and call these.

use std::ffi::{c_int, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, OnceLock};

use tcpx::{Config, Error, ListenComm, MemoryRegion, Net, PtrKind, RecvBuf, RecvComm, Request};
use tcpx::{SendComm, HANDLE_SIZE};

use crate::abi::*;
use crate::log;
use crate::nlog;

/// The name NCCL shows and matches NCCL_NET against.
pub const NAME: &std::ffi::CStr = c"TCPX-rs";
/// Grouped receives per irecv (the transport's limit).
pub const MAX_RECVS: usize = 8;

pub struct State {
    pub net: Net,
    /// Per device: the name we report (unique, NCCL keys its topology by it)
    /// and the PCI path in /sys (NULL for virtual NICs such as `lo`).
    names: Vec<CString>,
    pci: Vec<Option<CString>>,
}

static STATE: OnceLock<State> = OnceLock::new();
static INIT_LOCK: Mutex<()> = Mutex::new(());

pub fn state() -> Result<&'static State, Error> {
    STATE.get().ok_or_else(|| {
        Error::Config("the plugin is not initialized: NCCL must call init first".into())
    })
}

/// NCCL error code for a transport error.
fn code(e: &Error) -> ncclResult_t {
    match e {
        Error::InvalidArgument(_) | Error::BadHandle(_) | Error::NoSuchDevice { .. } => {
            NCCL_INVALID_ARGUMENT
        }
        Error::Config(_)
        | Error::Unsupported(_)
        | Error::Busy
        | Error::Closed
        | Error::Truncated { .. }
        | Error::TagMismatch(_) => NCCL_INVALID_USAGE,
        Error::Protocol(_)
        | Error::ConnectionLost(_)
        | Error::PeerUnresponsive { .. }
        | Error::PeerClosed => NCCL_REMOTE_ERROR,
        Error::Timeout { .. } | Error::Io { .. } | Error::Interface(_) | Error::Gpumemd(_) => {
            NCCL_SYSTEM_ERROR
        }
        _ => NCCL_INTERNAL_ERROR,
    }
}

/// Runs one entry point: errors become codes (and a WARN line), panics
/// become `ncclInternalError`. Nothing unwinds into NCCL.
pub fn guard(entry: &str, f: impl FnOnce() -> Result<(), Error>) -> ncclResult_t {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => NCCL_SUCCESS,
        Ok(Err(e)) => {
            log::warn(&format!("NET/TCPX-rs : {entry} failed: {e}"));
            code(&e)
        }
        Err(_) => {
            log::warn(&format!(
                "NET/TCPX-rs : {entry}: internal error (panic caught at the plugin boundary); please report it"
            ));
            NCCL_INTERNAL_ERROR
        }
    }
}

pub fn out<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, Error> {
    // SAFETY: NCCL passes NULL or a valid pointer it owns for the call (net_vN.h contract).
    unsafe { p.as_mut() }.ok_or_else(|| Error::InvalidArgument(format!("{what} is NULL")))
}

/// Borrows an object we handed to NCCL as `void*`.
pub fn obj<'a, T>(p: *mut c_void, what: &str) -> Result<&'a T, Error> {
    // SAFETY: NCCL passes back pointers that came from Box::into_raw of a T
    // here and are not freed until the matching close/dereg/test-done.
    unsafe { p.cast::<T>().as_ref() }
        .ok_or_else(|| Error::InvalidArgument(format!("{what} is NULL")))
}

/// Writes a boxed object (or NULL = "not yet") to NCCL's out pointer.
pub fn put<T>(slot: *mut *mut c_void, v: Option<T>) -> Result<(), Error> {
    *out(slot, "output pointer")? =
        v.map_or(std::ptr::null_mut(), |v| Box::into_raw(Box::new(v)).cast());
    Ok(())
}

/// Frees an object created here; NULL is ignored.
pub fn free<T>(p: *mut c_void) {
    if !p.is_null() {
        // SAFETY: from Box::into_raw of a T here; NCCL does not use it after close.
        drop(unsafe { Box::from_raw(p.cast::<T>()) });
    }
}

pub fn dev_index(dev: c_int) -> Result<usize, Error> {
    usize::try_from(dev).map_err(|_| Error::InvalidArgument(format!("device {dev} is negative")))
}

pub struct Listen(Mutex<ListenComm>);
pub struct Send(SendComm);
pub struct Recv(RecvComm);
pub struct Mr(MemoryRegion);
pub struct Req(Request);

/// NCCL's interface variables allow `^` (exclude) and `=` (exact) prefixes
/// and name prefixes; the transport wants names or addresses. Exact names
/// are passed on; exclusion lists are dropped (the transport then picks).
fn env_for_transport(key: &str) -> Option<String> {
    let v = std::env::var(key).ok()?;
    if key.ends_with("IFNAME") {
        let v = v.trim();
        if v.starts_with('^') {
            return None;
        }
        return Some(v.trim_start_matches('=').to_string());
    }
    Some(v)
}

fn pci_path(ifname: &str) -> Option<CString> {
    let p = std::fs::canonicalize(format!("/sys/class/net/{ifname}/device")).ok()?;
    CString::new(p.into_os_string().into_encoded_bytes()).ok()
}

/// Starts the transport once per process; later calls only log again.
pub fn init(version: &str) -> Result<(), Error> {
    let _g = INIT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if STATE.get().is_some() {
        return Ok(());
    }
    let cfg = Config::from_lookup(env_for_transport)?;
    let net = Net::init(cfg)?;
    let devs = net.devices();
    let mut names = Vec::with_capacity(devs.len());
    let mut pci = Vec::with_capacity(devs.len());
    for (i, d) in devs.iter().enumerate() {
        let dup = devs.iter().filter(|o| o.name == d.name).count() > 1;
        let name = if dup {
            format!("{}:{}", d.name, d.addr)
        } else {
            d.name.clone()
        };
        names.push(CString::new(name).map_err(|_| Error::Config("NUL in interface name".into()))?);
        pci.push(pci_path(&d.name));
        nlog!(
            NCCL_LOG_INFO,
            NCCL_INIT | NCCL_NET,
            "NET/TCPX-rs : dev {i} {} addr {} speed {} Mbps data path {} (pointers: host only; CUDA buffers use NCCL's host staging)",
            d.name,
            d.addr,
            d.speed_mbps,
            d.path
        );
    }
    nlog!(
        NCCL_LOG_INFO,
        NCCL_INIT | NCCL_NET,
        "NET/TCPX-rs : initialized ({version}), {} device(s), engine {:?}",
        devs.len(),
        net.engine()
    );
    let _ = STATE.set(State { net, names, pci });
    Ok(())
}

pub fn devices(ndev: *mut c_int) -> Result<(), Error> {
    let n = state()?.net.devices().len();
    *out(ndev, "ndev")? = c_int::try_from(n).unwrap_or(c_int::MAX);
    Ok(())
}

/// The fields every properties version shares.
pub struct Props {
    pub name: *mut std::ffi::c_char,
    pub pci_path: *mut std::ffi::c_char,
    pub guid: u64,
    pub speed: c_int,
    pub max_comms: c_int,
    pub dev: c_int,
}

pub fn props(dev: c_int) -> Result<Props, Error> {
    let s = state()?;
    let i = dev_index(dev)?;
    let d = s.net.devices().get(i).ok_or(Error::NoSuchDevice {
        dev: i,
        count: s.net.devices().len(),
    })?;
    Ok(Props {
        // NCCL only reads these strings; they live as long as the process.
        name: s.names[i].as_ptr().cast_mut(),
        pci_path: s.pci[i]
            .as_ref()
            .map_or(std::ptr::null_mut(), |p| p.as_ptr().cast_mut()),
        guid: i as u64,
        speed: c_int::try_from(d.speed_mbps).unwrap_or(c_int::MAX),
        max_comms: c_int::try_from(d.max_comms).unwrap_or(c_int::MAX),
        dev,
    })
}

impl Props {
    pub fn v8(&self) -> ncclNetProperties_v8_t {
        ncclNetProperties_v8_t {
            name: self.name,
            pciPath: self.pci_path,
            guid: self.guid,
            ptrSupport: NCCL_PTR_HOST,
            regIsGlobal: 0,
            speed: self.speed,
            port: 0,
            latency: 0.0,
            maxComms: self.max_comms,
            maxRecvs: MAX_RECVS as c_int,
            netDeviceType: NCCL_NET_DEVICE_HOST,
            netDeviceVersion: NCCL_NET_DEVICE_INVALID_VERSION,
        }
    }

    pub fn v9(&self) -> ncclNetProperties_v9_t {
        let p = self.v8();
        ncclNetProperties_v9_t {
            name: p.name,
            pciPath: p.pciPath,
            guid: p.guid,
            ptrSupport: p.ptrSupport,
            regIsGlobal: p.regIsGlobal,
            forceFlush: 0,
            speed: p.speed,
            port: p.port,
            latency: p.latency,
            maxComms: p.maxComms,
            maxRecvs: p.maxRecvs,
            netDeviceType: p.netDeviceType,
            netDeviceVersion: p.netDeviceVersion,
            vProps: ncclNetVDeviceProps {
                ndevs: 1,
                devs: [self.dev, 0, 0, 0],
            },
            // Sizes come back through test()'s int array: stay below INT_MAX.
            maxP2pBytes: MAX_NET_SIZE,
            maxCollBytes: MAX_COLLNET_SIZE,
        }
    }

    pub fn v11(&self) -> ncclNetProperties_v11_t {
        let p = self.v9();
        ncclNetProperties_v11_t {
            name: p.name,
            pciPath: p.pciPath,
            guid: p.guid,
            ptrSupport: p.ptrSupport,
            regIsGlobal: p.regIsGlobal,
            forceFlush: p.forceFlush,
            speed: p.speed,
            port: p.port,
            latency: p.latency,
            maxComms: p.maxComms,
            maxRecvs: p.maxRecvs,
            netDeviceType: p.netDeviceType,
            netDeviceVersion: p.netDeviceVersion,
            vProps: p.vProps,
            maxP2pBytes: p.maxP2pBytes,
            maxCollBytes: p.maxCollBytes,
            maxMultiRequestSize: 1,
        }
    }
}

fn handle_buf<'a>(handle: *mut c_void) -> Result<&'a mut [u8; HANDLE_SIZE], Error> {
    const _: () = assert!(HANDLE_SIZE == NCCL_NET_HANDLE_MAXSIZE);
    out(handle.cast::<[u8; HANDLE_SIZE]>(), "handle")
}

pub fn listen(dev: c_int, handle: *mut c_void, listen: *mut *mut c_void) -> Result<(), Error> {
    put::<Listen>(listen, None)?;
    let h = handle_buf(handle)?;
    let (hd, l) = state()?.net.listen(dev_index(dev)?)?;
    *h = hd.to_bytes();
    put(listen, Some(Listen(Mutex::new(l))))
}

/// Non-blocking: `*send` stays NULL until connected; NCCL calls again with
/// the same handle buffer, whose stage word keeps our progress.
pub fn connect(dev: c_int, handle: *mut c_void, send: *mut *mut c_void) -> Result<(), Error> {
    put::<Send>(send, None)?;
    let h = handle_buf(handle)?;
    let c = state()?.net.connect_bytes(dev_index(dev)?, h)?;
    put(send, c.map(Send))
}

pub fn accept(listen: *mut c_void, recv: *mut *mut c_void) -> Result<(), Error> {
    put::<Recv>(recv, None)?;
    let l = obj::<Listen>(listen, "listen comm")?;
    let c = l.0.lock().unwrap_or_else(|p| p.into_inner()).accept()?;
    put(recv, c.map(Recv))
}

pub fn reg_mr(
    data: *mut c_void,
    size: usize,
    ty: c_int,
    mh: *mut *mut c_void,
) -> Result<(), Error> {
    put::<Mr>(mh, None)?;
    match ty {
        NCCL_PTR_HOST => {}
        NCCL_PTR_CUDA => {
            return Err(Error::Unsupported(
                "CUDA pointers: this plugin reports NCCL_PTR_HOST only; let NCCL stage through host memory".into(),
            ))
        }
        t => return Err(Error::InvalidArgument(format!("unknown pointer type {t}"))),
    }
    // SAFETY: NCCL keeps the buffer valid and registered until deregMr, and
    // frees it only after the requests using it completed (net_vN.h contract).
    let mr = unsafe { state()?.net.reg_mr_raw(data.cast(), size, PtrKind::Host)? };
    put(mh, Some(Mr(mr)))
}

pub fn dereg_mr(mh: *mut c_void) -> Result<(), Error> {
    if mh.is_null() {
        return Err(Error::InvalidArgument("mhandle is NULL".into()));
    }
    // SAFETY: from reg_mr's Box::into_raw; NCCL does not use it after deregMr.
    let mr = unsafe { Box::from_raw(mh.cast::<Mr>()) };
    match state()?.net.dereg_mr(mr.0) {
        // A request still holds the region (and so the memory stays referenced
        // until it ends); the handle itself is gone either way.
        Ok(_) | Err(Error::Busy) => Ok(()),
        Err(e) => Err(e),
    }
}

fn offset_in(mr: &MemoryRegion, data: *const c_void, size: usize) -> Result<usize, Error> {
    match (data as usize).checked_sub(mr.addr()) {
        Some(o) if o.checked_add(size).is_some_and(|e| e <= mr.len()) => Ok(o),
        _ => Err(Error::InvalidArgument(format!(
            "buffer {data:p}+{size} lies outside its registered region; pass the mhandle from regMr of that buffer"
        ))),
    }
}

pub fn isend(
    send: *mut c_void,
    data: *mut c_void,
    size: usize,
    tag: c_int,
    mh: *mut c_void,
    req: *mut *mut c_void,
) -> Result<(), Error> {
    put::<Req>(req, None)?;
    let c = obj::<Send>(send, "send comm")?;
    let mr = &obj::<Mr>(mh, "mhandle")?.0;
    let r = c.0.isend(mr, offset_in(mr, data, size)?, size, tag)?;
    put(req, r.map(Req))
}

/// `sizes(i)` gives buffer i's size in whichever C type the version uses.
pub fn irecv(
    recv: *mut c_void,
    n: c_int,
    data: *mut *mut c_void,
    sizes: impl Fn(usize) -> Result<usize, Error>,
    tags: *mut c_int,
    mhs: *mut *mut c_void,
    req: *mut *mut c_void,
) -> Result<(), Error> {
    // NCCL may preset *req to NCCL_NET_OPTIONAL_RECV_COMPLETION; it is a hint
    // we need not use, and the slot is ours to overwrite.
    put::<Req>(req, None)?;
    let c = obj::<Recv>(recv, "recv comm")?;
    let n = usize::try_from(n)
        .ok()
        .filter(|n| (1..=MAX_RECVS).contains(n))
        .ok_or_else(|| {
            Error::InvalidArgument(format!("irecv takes 1..={MAX_RECVS} buffers, got {n}"))
        })?;
    if data.is_null() || tags.is_null() || mhs.is_null() {
        return Err(Error::InvalidArgument("irecv: NULL array".into()));
    }
    let mut bufs = Vec::with_capacity(n);
    for i in 0..n {
        // SAFETY: NCCL's arrays hold n elements; i < n.
        let (d, t, m) = unsafe { (*data.add(i), *tags.add(i), *mhs.add(i)) };
        let s = sizes(i)?;
        let mr = &obj::<Mr>(m, "mhandle")?.0;
        bufs.push(RecvBuf {
            mr,
            offset: offset_in(mr, d, s)?,
            len: s,
            tag: t,
        });
    }
    let r = c.0.irecv(&bufs)?;
    put(req, r.map(Req))
}

/// Host memory needs no flush: a request that is done at once.
pub fn iflush(recv: *mut c_void, req: *mut *mut c_void) -> Result<(), Error> {
    put::<Req>(req, None)?;
    let c = obj::<Recv>(recv, "recv comm")?;
    put(req, c.0.iflush(&[])?.map(Req))
}

/// Polls; the request is freed when done or failed (NCCL never tests it again).
pub fn test(req: *mut c_void, done: *mut c_int, sizes: *mut c_int) -> ncclResult_t {
    let mut finished = false;
    let rc = guard("test", || {
        let d = out(done, "done")?;
        *d = 0;
        if req.is_null() {
            return Err(Error::InvalidArgument("request is NULL".into()));
        }
        // SAFETY: from isend/irecv/iflush's Box::into_raw; only NCCL's proxy
        // thread for this comm tests it, so the &mut is exclusive.
        let r = unsafe { &mut *req.cast::<Req>() };
        let res = r.0.test();
        finished = !matches!(res, Ok(None));
        if let Some(s) = res? {
            *d = 1;
            if !sizes.is_null() {
                for (i, v) in s.iter().enumerate() {
                    // SAFETY: NCCL's sizes array has room for every buffer it posted.
                    unsafe { *sizes.add(i) = c_int::try_from(*v).unwrap_or(c_int::MAX) };
                }
            }
        }
        Ok(())
    });
    if finished {
        free::<Req>(req);
    }
    rc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_errors_map_to_nccl_codes() {
        let cases = [
            (Error::InvalidArgument("x".into()), 4),
            (Error::NoSuchDevice { dev: 3, count: 1 }, 4),
            (Error::Unsupported("cuda".into()), 5),
            (Error::Closed, 5),
            (Error::ConnectionLost("peer".into()), 6),
            (Error::Protocol("magic".into()), 6),
            (
                Error::Timeout {
                    what: "x".into(),
                    after_ms: 1,
                },
                2,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(code(&e), want, "{e}");
        }
    }

    #[test]
    fn nccl_exclusion_and_exact_prefixes_are_eased() {
        std::env::set_var("TCPX_TEST_X_IFNAME", "=eth1,eth2");
        assert_eq!(
            env_for_transport("TCPX_TEST_X_IFNAME").as_deref(),
            Some("eth1,eth2")
        );
        std::env::set_var("TCPX_TEST_X_IFNAME", "^docker,lo");
        assert_eq!(env_for_transport("TCPX_TEST_X_IFNAME"), None);
        std::env::remove_var("TCPX_TEST_X_IFNAME");
    }
}
