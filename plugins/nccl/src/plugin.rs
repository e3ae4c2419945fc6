//! The version-independent plugin: one transport per process and the
//! objects NCCL holds as `void*`. The per-version tables in `tables.rs`
//! only convert arguments and call these.

use std::ffi::{c_int, c_void, CString};
use std::sync::{Mutex, OnceLock};

use devmem::Cause;
use ffiguard::{obj, out, put, slice, slice_mut, take};

use tcpx::{Config, Error, ListenComm, MemoryRegion, Net, PtrKind, PtrKinds, RecvBuf, RecvComm};
use tcpx::{Request, SendComm, HANDLE_SIZE};

use crate::abi::*;
use crate::trace;
use crate::{log, nlog, ntrace};

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
    /// GDR mode: NCCL may hand us CUDA buffers, which the transport moves
    /// through its bounce path (`TCPX_NCCL_GDR=1` and CUDA usable here).
    gdr: bool,
}

/// GDR mode switch: `1` offers `NCCL_PTR_CUDA` where the transport can take
/// CUDA memory; unset or `0` keeps NCCL's own host staging (the default: it
/// is the mode proven on two GPUs; see README, "GDR mode").
pub const GDR_ENV: &str = "TCPX_NCCL_GDR";

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
        Error::Devmem(d) => match d.cause() {
            Cause::InvalidArgument => NCCL_INVALID_ARGUMENT,
            Cause::CudaUnavailable | Cause::PermissionDenied | Cause::NicUnsupported => {
                NCCL_INVALID_USAGE
            }
            _ => NCCL_SYSTEM_ERROR,
        },
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

/// The plugin as an `ffiguard` front end: failures go to NCCL's log.
struct Nccl;

impl ffiguard::Boundary for Nccl {
    type Error = Error;
    const PANIC: c_int = NCCL_INTERNAL_ERROR;

    fn code(e: &Error) -> c_int {
        code(e)
    }

    fn report(entry: &str, msg: &str, _cause: c_int) {
        log::warn(&format!("NET/TCPX-rs : {entry} failed: {msg}"));
    }
}

/// Runs one entry point: errors become codes (and a WARN line), panics
/// become `ncclInternalError`. Nothing unwinds into NCCL.
pub fn guard(entry: &str, f: impl FnOnce() -> Result<(), Error>) -> ncclResult_t {
    ffiguard::guard::<Nccl>(entry, || f().map(|()| NCCL_SUCCESS))
}

/// Writes a boxed object (or NULL = "not yet") to NCCL's `void**`.
///
/// # Safety
/// `slot` is NULL or valid for writes (net_vN.h contract).
pub unsafe fn put_obj<T>(slot: *mut *mut c_void, v: Option<T>) -> Result<(), Error> {
    // SAFETY: the caller's contract.
    Ok(unsafe { put(slot.cast::<*mut T>(), v) }?)
}

/// Frees an object created here; NULL is ignored.
///
/// # Safety
/// `p` is NULL or came from [`put_obj`] with this `T`, and NCCL does not use it again.
pub unsafe fn free<T>(p: *mut c_void) {
    // SAFETY: the caller's contract.
    drop(unsafe { take(p.cast::<T>()) });
}

pub struct Listen(Mutex<ListenComm>);
pub struct Send(SendComm);
pub struct Recv(RecvComm);
pub struct Mr(MemoryRegion);
pub struct Req {
    r: Request,
    /// A pending test was traced (later ones are not: NCCL polls thousands).
    traced: bool,
}

impl Req {
    fn new(r: Request) -> Self {
        Req { r, traced: false }
    }
}

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
    let gdr_wanted = match std::env::var(GDR_ENV).as_deref() {
        Ok("1") => true,
        Ok("0") | Ok("") | Err(_) => false,
        Ok(v) => {
            return Err(Error::Config(format!(
                "{GDR_ENV}={v}: use 1 (offer CUDA pointers) or 0 (host pointers only)"
            )))
        }
    };
    let gdr = gdr_wanted && devs.iter().all(|d| d.ptr_kinds.contains(PtrKinds::CUDA));
    if gdr_wanted && !gdr {
        nlog!(
            NCCL_LOG_WARN,
            NCCL_INIT | NCCL_NET,
            "NET/TCPX-rs : {GDR_ENV}=1 but CUDA memory cannot be registered here (no driver or device); reporting host pointers only"
        );
    }
    let pointers = if gdr {
        "host and CUDA (GDR mode: CUDA buffers through pinned bounce staging)"
    } else {
        "host only; CUDA buffers use NCCL's host staging"
    };
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
            "NET/TCPX-rs : dev {i} {} addr {} speed {} Mbps data path {} (pointers: {pointers})",
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
    if trace::on() {
        nlog!(
            NCCL_LOG_INFO,
            NCCL_INIT | NCCL_NET,
            "NET/TCPX-rs : {}=1: tracing every call",
            trace::ENV
        );
    }
    let _ = STATE.set(State {
        net,
        names,
        pci,
        gdr,
    });
    Ok(())
}

pub fn devices(ndev: *mut c_int) -> Result<(), Error> {
    let n = state()?.net.devices().len();
    // SAFETY: NCCL passes NULL or a writable int (net_vN.h contract).
    *unsafe { out(ndev, "ndev") }? = c_int::try_from(n).unwrap_or(c_int::MAX);
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
    /// `NCCL_PTR_*` bits.
    pub ptr_support: c_int,
}

pub fn props(dev: c_int) -> Result<Props, Error> {
    let s = state()?;
    let i = ffiguard::index(dev, "device")?;
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
        ptr_support: if s.gdr {
            NCCL_PTR_HOST | NCCL_PTR_CUDA
        } else {
            NCCL_PTR_HOST
        },
    })
}

impl Props {
    pub fn v8(&self) -> ncclNetProperties_v8_t {
        ncclNetProperties_v8_t {
            name: self.name,
            pciPath: self.pci_path,
            guid: self.guid,
            ptrSupport: self.ptr_support,
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

    /// v12 adds rail and plane ids: this plugin knows neither (it sees
    /// interfaces, not the fabric's rails), so both are NCCL_NET_ID_UNDEF.
    pub fn v12(&self) -> ncclNetProperties_v12_t {
        let p = self.v11();
        let mut devs = [0; NCCL_NET_MAX_DEVS_PER_NIC_V12];
        devs[..p.vProps.devs.len()].copy_from_slice(&p.vProps.devs);
        ncclNetProperties_v12_t {
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
            vProps: ncclNetVDeviceProps_v12 {
                ndevs: p.vProps.ndevs,
                devs,
            },
            maxP2pBytes: p.maxP2pBytes,
            maxCollBytes: p.maxCollBytes,
            maxMultiRequestSize: p.maxMultiRequestSize,
            railId: NCCL_NET_ID_UNDEF,
            planeId: NCCL_NET_ID_UNDEF,
        }
    }
}

fn handle_buf<'a>(handle: *mut c_void) -> Result<&'a mut [u8; HANDLE_SIZE], Error> {
    const _: () = assert!(HANDLE_SIZE == NCCL_NET_HANDLE_MAXSIZE);
    // SAFETY: NCCL passes NULL or its NCCL_NET_HANDLE_MAXSIZE-byte handle buffer.
    Ok(unsafe { out(handle.cast::<[u8; HANDLE_SIZE]>(), "handle") }?)
}

// The entries below take what NCCL passes: NULL or pointers valid for the
// call, and objects it got from us as `void*` (from Box::into_raw of the
// named type, alive until the matching close/deregMr/test-done). Each
// SAFETY below rests on that (net_vN.h).

pub fn listen(dev: c_int, handle: *mut c_void, listen: *mut *mut c_void) -> Result<(), Error> {
    // SAFETY: NCCL's out pointer (see above).
    unsafe { put_obj::<Listen>(listen, None) }?;
    let h = handle_buf(handle)?;
    let (hd, l) = state()?.net.listen(ffiguard::index(dev, "device")?)?;
    *h = hd.to_bytes();
    // SAFETY: as above.
    unsafe { put_obj(listen, Some(Listen(Mutex::new(l)))) }
}

/// Non-blocking: `*send` stays NULL until connected; NCCL calls again with
/// the same handle buffer, whose stage word keeps our progress.
pub fn connect(dev: c_int, handle: *mut c_void, send: *mut *mut c_void) -> Result<(), Error> {
    // SAFETY: NCCL's out pointer (see above).
    unsafe { put_obj::<Send>(send, None) }?;
    let h = handle_buf(handle)?;
    let c = state()?
        .net
        .connect_bytes(ffiguard::index(dev, "device")?, h)?;
    // SAFETY: as above.
    unsafe { put_obj(send, c.map(Send)) }
}

pub fn accept(listen: *mut c_void, recv: *mut *mut c_void) -> Result<(), Error> {
    // SAFETY: NCCL's out pointer and our Listen (see above).
    let l = unsafe {
        put_obj::<Recv>(recv, None)?;
        obj(listen.cast::<Listen>(), "listen comm")?
    };
    let c = l.0.lock().unwrap_or_else(|p| p.into_inner()).accept()?;
    // SAFETY: as above.
    unsafe { put_obj(recv, c.map(Recv)) }
}

/// `entry` names the caller in the trace (`regMr` or `regMrDmaBuf`).
pub fn reg_mr(
    entry: &str,
    comm: *mut c_void,
    data: *mut c_void,
    size: usize,
    ty: c_int,
    mh: *mut *mut c_void,
) -> Result<(), Error> {
    // SAFETY: NCCL's out pointer (see above).
    unsafe { put_obj::<Mr>(mh, None) }?;
    ntrace!(
        "{entry} comm {comm:p} data {data:p} size {size} type {} kind {}",
        ptr_type(ty),
        trace::mem_kind(data)
    );
    let s = state()?;
    let kind = match ty {
        NCCL_PTR_HOST => PtrKind::Host,
        NCCL_PTR_CUDA if s.gdr => PtrKind::Cuda,
        NCCL_PTR_CUDA => {
            return Err(Error::Unsupported(format!(
                "CUDA pointers: this plugin reports NCCL_PTR_HOST only ({GDR_ENV} is not 1); let NCCL stage through host memory"
            )))
        }
        t => return Err(Error::InvalidArgument(format!("unknown pointer type {t}"))),
    };
    // SAFETY: NCCL keeps the buffer valid and registered until deregMr, and
    // frees it only after the requests using it completed (net_vN.h contract).
    let mr = unsafe { s.net.reg_mr_raw(data.cast(), size, kind)? };
    // SAFETY: as above.
    unsafe { put_obj(mh, Some(Mr(mr))) }?;
    // SAFETY: NCCL's out pointer, just written.
    ntrace!("{entry} done mh {:p}", unsafe { *mh });
    Ok(())
}

fn ptr_type(ty: c_int) -> &'static str {
    match ty {
        NCCL_PTR_HOST => "HOST",
        NCCL_PTR_CUDA => "CUDA",
        _ => "?",
    }
}

fn kind_name(mr: &MemoryRegion) -> String {
    match mr.cuda_ordinal() {
        Some(o) => format!("cuda:{o}"),
        None => "host".into(),
    }
}

pub fn dereg_mr(mh: *mut c_void) -> Result<(), Error> {
    ntrace!("deregMr mh {mh:p}");
    // SAFETY: our Mr, which NCCL does not use after deregMr (see above).
    let mr = unsafe { take(mh.cast::<Mr>()) }.ok_or(ffiguard::ArgError::Null("mhandle"))?;
    match state()?.net.dereg_mr(mr.0) {
        // A request still holds the region (and so the memory stays referenced
        // until it ends); the handle itself is gone either way.
        Ok(_) | Err(Error::Busy) => Ok(()),
        Err(e) => Err(e),
    }
}

fn offset_in(mr: &MemoryRegion, data: *const c_void, size: usize) -> Result<usize, Error> {
    Ok(ffiguard::offset_in(mr.addr(), mr.len(), data, size)?)
}

pub fn isend(
    send: *mut c_void,
    data: *mut c_void,
    size: usize,
    tag: c_int,
    mh: *mut c_void,
    req: *mut *mut c_void,
) -> Result<(), Error> {
    // SAFETY: NCCL's out pointer, our Send and Mr (see above).
    let (c, mr) = unsafe {
        put_obj::<Req>(req, None)?;
        (
            obj(send.cast::<Send>(), "send comm")?,
            &obj(mh.cast::<Mr>(), "mhandle")?.0,
        )
    };
    let r = c.0.isend(mr, offset_in(mr, data, size)?, size, tag)?;
    // SAFETY: as above.
    unsafe { put_obj(req, r.map(Req::new)) }?;
    ntrace!(
        "isend comm {send:p} data {data:p} size {size} tag {tag} mh {mh:p} ({}) -> req {:p}",
        kind_name(mr),
        // SAFETY: NCCL's out pointer, just written.
        unsafe { *req }
    );
    Ok(())
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
    let n = ffiguard::count(n, 1..=MAX_RECVS, "irecv's buffer count")?;
    // NCCL may preset *req to NCCL_NET_OPTIONAL_RECV_COMPLETION; it is a hint
    // we need not use, and the slot is ours to overwrite.
    // SAFETY: NCCL's out pointer, our Recv, arrays of n elements (see above).
    let (c, data, tags, mhs) = unsafe {
        put_obj::<Req>(req, None)?;
        (
            obj(recv.cast::<Recv>(), "recv comm")?,
            slice(data, n, "data")?,
            slice(tags, n, "tags")?,
            slice(mhs, n, "mhandles")?,
        )
    };
    let mut bufs = Vec::with_capacity(n);
    for (i, ((d, t), m)) in data.iter().zip(tags).zip(mhs).enumerate() {
        let s = sizes(i)?;
        // SAFETY: our Mr (see above).
        let mr = &unsafe { obj(m.cast::<Mr>(), "mhandle") }?.0;
        bufs.push(RecvBuf {
            mr,
            offset: offset_in(mr, *d, s)?,
            len: s,
            tag: *t,
        });
    }
    let r = c.0.irecv(&bufs)?;
    // SAFETY: as above.
    unsafe { put_obj(req, r.map(Req::new)) }?;
    if trace::on() {
        let each: Vec<String> = bufs
            .iter()
            .zip(data)
            .zip(mhs)
            .map(|((b, d), m)| {
                format!(
                    "{d:p}+{} tag {} mh {m:p} ({})",
                    b.len,
                    b.tag,
                    kind_name(b.mr)
                )
            })
            .collect();
        ntrace!(
            "irecv comm {recv:p} n {n} [{}] -> req {:p}",
            each.join(", "),
            // SAFETY: NCCL's out pointer, just written.
            unsafe { *req }
        );
    }
    Ok(())
}

/// Nothing to flush: a receive into host memory is visible when test()
/// says done, and so is one into CUDA memory (the bounce path's copies to
/// the GPU finished before it completed). `*request = NULL` is NCCL's "no
/// flush needed": it then skips the test (src/transport/net.cc,
/// recvProxyProgress: `if (request) test(...)`, else done).
pub fn iflush(recv: *mut c_void, n: c_int, req: *mut *mut c_void) -> Result<(), Error> {
    // SAFETY: NCCL's out pointer and our Recv (see above).
    let c = unsafe {
        put_obj::<Req>(req, None)?;
        obj(recv.cast::<Recv>(), "recv comm")?
    };
    c.0.iflush(&[])?;
    ntrace!("iflush comm {recv:p} n {n} -> req NULL (nothing to flush)");
    Ok(())
}

/// Polls; the request is freed when done or failed (NCCL never tests it again).
pub fn test(req: *mut c_void, done: *mut c_int, sizes: *mut c_int) -> Result<(), Error> {
    // SAFETY: NCCL's out pointer and our Req; only NCCL's proxy thread for
    // this comm tests it, so the &mut is exclusive (see above).
    let (d, r) = unsafe { (out(done, "done")?, out(req.cast::<Req>(), "request")?) };
    *d = 0;
    let res = r.r.test();
    if trace::on() {
        match &res {
            // NCCL polls thousands of times: only the first pending test of each request.
            Ok(None) if !r.traced => {
                r.traced = true;
                ntrace!("test req {req:p} pending (its later pending tests are not logged)");
            }
            Ok(None) => {}
            Ok(Some(s)) => ntrace!(
                "test req {req:p} done sizes {:?}",
                s.iter().collect::<Vec<_>>()
            ),
            Err(e) => ntrace!("test req {req:p} failed: {e}"),
        }
    }
    if !matches!(res, Ok(None)) {
        // SAFETY: our Req; NCCL does not test it again (see above).
        unsafe { free::<Req>(req) };
    }
    let Some(s) = res? else { return Ok(()) };
    if !sizes.is_null() {
        // SAFETY: NCCL's sizes array has room for every buffer it posted.
        let dst = unsafe { slice_mut(sizes, s.len(), "sizes") }?;
        for (o, v) in dst.iter_mut().zip(s.iter()) {
            *o = c_int::try_from(*v).unwrap_or(c_int::MAX);
        }
    }
    *d = 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    use devmem::cuda::CudaError;
    use devmem::gpumemd::GpumemdError;

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
            (Error::PeerUnresponsive { after_ms: 1 }, 6),
            (
                Error::Devmem(
                    GpumemdError::Closed {
                        op: "x",
                        path: "/run/x".into(),
                    }
                    .into(),
                ),
                2,
            ),
            (
                Error::Devmem(GpumemdError::InvalidArgument("pci".into()).into()),
                4,
            ),
            (Error::Devmem(CudaError::NoDriver("none".into()).into()), 5),
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
