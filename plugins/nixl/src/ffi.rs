//! The C API the C++ shim calls (declared in shim/tcpx_nixl.h).
//!
//! Every function returns a `nixl_status_t` value and never unwinds: panics
//! become `NIXL_ERR_UNKNOWN`. The calling thread's last failure message is
//! available from `tnx_last_error()`. Pointer contracts are in the header.
#![allow(non_camel_case_types, clippy::not_unsafe_ptr_arg_deref)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use crate::engine::{xfer_status, Engine, Op, Options, Progress, XferDesc, XferState};
use crate::error::{status, Error, Result};
use crate::registry::Mem;

pub struct tnx_engine(Engine);
pub struct tnx_xfer(Arc<XferState>);

/// One local/remote pair of a transfer (`local_md`/`remote_md`: ids from
/// `tnx_register`/`tnx_load_remote_md`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct tnx_desc {
    pub local_addr: u64,
    pub remote_addr: u64,
    pub len: u64,
    pub local_md: u64,
    pub remote_md: u64,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: String) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = c);
}

/// Runs `f`; errors and panics become status codes and a last-error message.
fn guard(f: impl FnOnce() -> Result<c_int>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            set_last_error(e.to_string());
            e.status()
        }
        Err(_) => {
            set_last_error(
                "internal error (panic caught at the C boundary); please report it".into(),
            );
            status::ERR_UNKNOWN
        }
    }
}

fn engine<'a>(e: *const tnx_engine) -> Result<&'a Engine> {
    // SAFETY: the caller passes null or a live engine from tnx_engine_new (header contract).
    unsafe { e.as_ref() }
        .map(|e| &e.0)
        .ok_or_else(|| Error::InvalidArgument("engine is NULL".into()))
}

fn cstr<'a>(p: *const c_char, what: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::InvalidArgument(format!("{what} is NULL")));
    }
    // SAFETY: non-null, NUL-terminated per the header contract.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| Error::InvalidArgument(format!("{what} is not UTF-8")))
}

fn bytes<'a>(p: *const u8, len: usize, what: &str) -> Result<&'a [u8]> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Error::InvalidArgument(format!("{what} is NULL")));
    }
    // SAFETY: p is valid for len bytes per the header contract.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

fn out<T>(p: *mut T, v: T) -> Result<()> {
    // SAFETY: the caller passes null or a valid, writable pointer.
    let slot = unsafe { p.as_mut() }
        .ok_or_else(|| Error::InvalidArgument("output pointer is NULL".into()))?;
    *slot = v;
    Ok(())
}

/// Hands `data` to the caller's sink (the shim appends it to a std::string).
type sink_fn = extern "C" fn(ctx: *mut c_void, data: *const u8, len: usize);

/// Message of the calling thread's last failure ("" if none).
#[no_mangle]
pub extern "C" fn tnx_last_error() -> *const c_char {
    LAST_ERROR.with(|l| l.borrow().as_ptr())
}

/// Creates an engine for `agent` with `n` option key/value pairs.
/// `progress_thread` != 0 (NIXL's agent asked for a progress thread): one
/// thread polls the peers, pausing `progress_delay_us` between rounds;
/// otherwise threads sleep on the sockets.
#[no_mangle]
pub extern "C" fn tnx_engine_new(
    agent: *const c_char,
    keys: *const *const c_char,
    vals: *const *const c_char,
    n: usize,
    progress_thread: c_int,
    progress_delay_us: u64,
    out_engine: *mut *mut tnx_engine,
) -> c_int {
    guard(|| {
        let agent = cstr(agent, "agent name")?;
        let mut kv = Vec::with_capacity(n);
        for i in 0..n {
            // SAFETY: keys and vals hold n valid pointers (header contract).
            let (k, v) = unsafe { (*keys.add(i), *vals.add(i)) };
            kv.push((cstr(k, "option key")?, cstr(v, "option value")?));
        }
        let mut opts = Options::parse(kv)?;
        if progress_thread != 0 {
            opts.progress = Progress::Polling {
                delay: Duration::from_micros(progress_delay_us),
            };
        }
        let e = Engine::new(agent, opts)?;
        out(out_engine, Box::into_raw(Box::new(tnx_engine(e))))?;
        Ok(status::SUCCESS)
    })
}

/// Stops the engine's threads and frees it. NULL is ignored.
#[no_mangle]
pub extern "C" fn tnx_engine_free(e: *mut tnx_engine) {
    if e.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: e came from tnx_engine_new and is freed once (header contract).
        drop(unsafe { Box::from_raw(e) });
    }));
}

#[no_mangle]
pub extern "C" fn tnx_conn_info(e: *const tnx_engine, sink: sink_fn, ctx: *mut c_void) -> c_int {
    guard(|| {
        let v = engine(e)?.conn_info();
        sink(ctx, v.as_ptr(), v.len());
        Ok(status::SUCCESS)
    })
}

#[no_mangle]
pub extern "C" fn tnx_load_conn_info(
    e: *const tnx_engine,
    agent: *const c_char,
    info: *const u8,
    len: usize,
) -> c_int {
    guard(|| {
        engine(e)?.load_conn_info(cstr(agent, "agent name")?, bytes(info, len, "info")?)?;
        Ok(status::SUCCESS)
    })
}

/// Registers `addr..addr+len` of memory kind `mem` (`nixl_mem_t`).
/// The memory must stay valid until `tnx_deregister` and until transfers using it complete.
#[no_mangle]
pub extern "C" fn tnx_register(
    e: *const tnx_engine,
    addr: u64,
    len: u64,
    mem: u32,
    out_id: *mut u64,
) -> c_int {
    guard(|| {
        // SAFETY: NIXL's registration contract, restated in the header.
        let id = unsafe { engine(e)?.register(addr, len, Mem::from_nixl(mem)?)? };
        out(out_id, id)?;
        Ok(status::SUCCESS)
    })
}

#[no_mangle]
pub extern "C" fn tnx_deregister(e: *const tnx_engine, id: u64) -> c_int {
    guard(|| {
        engine(e)?.deregister(id)?;
        Ok(status::SUCCESS)
    })
}

#[no_mangle]
pub extern "C" fn tnx_public_data(
    e: *const tnx_engine,
    id: u64,
    sink: sink_fn,
    ctx: *mut c_void,
) -> c_int {
    guard(|| {
        let v = engine(e)?.public_data(id)?;
        sink(ctx, v.as_ptr(), v.len());
        Ok(status::SUCCESS)
    })
}

#[no_mangle]
pub extern "C" fn tnx_load_remote_md(
    e: *const tnx_engine,
    agent: *const c_char,
    blob: *const u8,
    len: usize,
    mem: u32,
    out_id: *mut u64,
) -> c_int {
    guard(|| {
        let id = engine(e)?.load_remote_md(
            cstr(agent, "agent name")?,
            bytes(blob, len, "blob")?,
            Mem::from_nixl(mem)?,
        )?;
        out(out_id, id)?;
        Ok(status::SUCCESS)
    })
}

#[no_mangle]
pub extern "C" fn tnx_unload_remote_md(e: *const tnx_engine, id: u64) -> c_int {
    guard(|| {
        engine(e)?.unload_remote_md(id)?;
        Ok(status::SUCCESS)
    })
}

#[no_mangle]
pub extern "C" fn tnx_connect(e: *const tnx_engine, agent: *const c_char) -> c_int {
    guard(|| {
        engine(e)?.connect(cstr(agent, "agent name")?)?;
        Ok(status::SUCCESS)
    })
}

#[no_mangle]
pub extern "C" fn tnx_disconnect(e: *const tnx_engine, agent: *const c_char) -> c_int {
    guard(|| {
        engine(e)?.disconnect(cstr(agent, "agent name")?)?;
        Ok(status::SUCCESS)
    })
}

/// Writes the `nixl_mem_t` kinds this process can register (DRAM, and VRAM
/// when CUDA is usable) into `out[..cap]`; returns how many there are.
#[no_mangle]
pub extern "C" fn tnx_supported_mems(out: *mut u32, cap: usize) -> usize {
    catch_unwind(|| {
        let mems = Mem::supported();
        if !out.is_null() {
            for (i, m) in mems.iter().take(cap).enumerate() {
                // SAFETY: out holds cap elements (header contract).
                unsafe { *out.add(i) = m.nixl() };
            }
        }
        mems.len()
    })
    .unwrap_or(0)
}

/// Checks the memory kinds of a transfer's lists before it is prepared:
/// the local kind must be registrable here, the remote one movable at all.
#[no_mangle]
pub extern "C" fn tnx_check_xfer_mems(local: u32, remote: u32) -> c_int {
    guard(|| {
        Mem::from_nixl(local)?.usable()?;
        Mem::from_nixl(remote)?;
        Ok(status::SUCCESS)
    })
}

/// Posts a transfer. `op`: 0 = READ, 1 = WRITE (`nixl_xfer_op_t`).
/// `has_notif` != 0 sends `notif` (possibly empty) to the peer after the data.
#[allow(clippy::too_many_arguments)]
#[no_mangle]
pub extern "C" fn tnx_xfer_post(
    e: *const tnx_engine,
    op: c_int,
    agent: *const c_char,
    descs: *const tnx_desc,
    n: usize,
    notif: *const u8,
    notif_len: usize,
    has_notif: c_int,
    out_xfer: *mut *mut tnx_xfer,
) -> c_int {
    guard(|| {
        let op = match op {
            0 => Op::Read,
            1 => Op::Write,
            o => return Err(Error::InvalidArgument(format!("unknown transfer op {o}"))),
        };
        let ds: &[tnx_desc] = if n == 0 {
            &[]
        } else if descs.is_null() {
            return Err(Error::InvalidArgument("descriptors are NULL".into()));
        } else {
            // SAFETY: descs holds n elements (header contract).
            unsafe { std::slice::from_raw_parts(descs, n) }
        };
        let ds: Vec<XferDesc> = ds
            .iter()
            .map(|d| XferDesc {
                local_addr: d.local_addr,
                remote_addr: d.remote_addr,
                len: d.len,
                local_md: d.local_md,
                remote_md: d.remote_md,
            })
            .collect();
        let notif = if has_notif != 0 {
            Some(bytes(notif, notif_len, "notification")?)
        } else {
            None
        };
        let x = engine(e)?.post(op, cstr(agent, "agent name")?, &ds, notif)?;
        let (code, _) = xfer_status(&x);
        out(out_xfer, Box::into_raw(Box::new(tnx_xfer(x))))?;
        Ok(code)
    })
}

/// NIXL_SUCCESS when done, NIXL_IN_PROG while in flight, an error otherwise.
#[no_mangle]
pub extern "C" fn tnx_xfer_check(x: *const tnx_xfer) -> c_int {
    guard(|| {
        // SAFETY: null or a live transfer from tnx_xfer_post (header contract).
        let x = unsafe { x.as_ref() }
            .ok_or_else(|| Error::InvalidArgument("transfer is NULL".into()))?;
        match xfer_status(&x.0) {
            (_, Some(e)) => Err(e),
            (code, None) => Ok(code),
        }
    })
}

/// Frees a transfer handle; an in-flight transfer finishes unobserved. NULL is ignored.
#[no_mangle]
pub extern "C" fn tnx_xfer_free(x: *mut tnx_xfer) {
    if x.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: x came from tnx_xfer_post and is freed once.
        drop(unsafe { Box::from_raw(x) });
    }));
}

/// Hands each queued notification to `sink` once: (ctx, agent, agent_len, msg, msg_len).
#[no_mangle]
pub extern "C" fn tnx_get_notifs(
    e: *const tnx_engine,
    sink: extern "C" fn(*mut c_void, *const u8, usize, *const u8, usize),
    ctx: *mut c_void,
) -> c_int {
    guard(|| {
        for (a, m) in engine(e)?.take_notifs() {
            sink(ctx, a.as_ptr(), a.len(), m.as_ptr(), m.len());
        }
        Ok(status::SUCCESS)
    })
}

#[no_mangle]
pub extern "C" fn tnx_gen_notif(
    e: *const tnx_engine,
    agent: *const c_char,
    msg: *const u8,
    len: usize,
) -> c_int {
    guard(|| {
        engine(e)?.gen_notif(cstr(agent, "agent name")?, bytes(msg, len, "message")?)?;
        Ok(status::SUCCESS)
    })
}

/// Known option `i` (key and default) for the plugin's option list; returns
/// 0 past the end.
#[no_mangle]
pub extern "C" fn tnx_option(
    i: usize,
    key: *mut *const c_char,
    default: *mut *const c_char,
) -> c_int {
    static OPTS: &[(&CStr, &CStr)] = &[
        (c"nics", c""),
        (c"sockets_per_nic", c""),
        (c"chunk_size", c""),
        (c"timeout_ms", c"10000"),
    ];
    const _: () = assert!(OPTS.len() == crate::engine::OPTIONS.len());
    match OPTS.get(i) {
        Some((k, d)) => {
            if out(key, k.as_ptr()).is_err() || out(default, d.as_ptr()).is_err() {
                return 0;
            }
            1
        }
        None => 0,
    }
}

extern "C" {
    /// The C++ shim's plugin descriptor (shim/plugin.cpp).
    fn tcpx_nixl_plugin_descriptor() -> *mut c_void;
}

/// NIXL's plugin entry point (backend_plugin.h: `nixlBackendPlugin* nixl_plugin_init()`).
/// Defined here so the cdylib exports it (cargo exports only Rust symbols);
/// the descriptor itself is built by the C++ shim.
#[no_mangle]
pub extern "C" fn nixl_plugin_init() -> *mut c_void {
    // SAFETY: a plain C function without arguments; it catches its own exceptions.
    unsafe { tcpx_nixl_plugin_descriptor() }
}

/// NIXL's plugin exit point; engines are freed by `destroy_engine`.
#[no_mangle]
pub extern "C" fn nixl_plugin_fini() {}
