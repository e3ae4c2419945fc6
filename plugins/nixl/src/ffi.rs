//! The C API the C++ shim calls (declared in shim/tcpx_nixl.h).
//!
//! Every function returns a `nixl_status_t` value and never unwinds: each
//! runs inside `ffiguard`'s guard, which turns errors into their status
//! (`Error::status`) and panics into `NIXL_ERR_UNKNOWN`. The calling
//! thread's last failure message is available from `tnx_last_error()`.
//! Pointer contracts are in the header.
#![allow(non_camel_case_types, clippy::not_unsafe_ptr_arg_deref)]

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Arc;
use std::time::Duration;

use ffiguard::{cstr, obj, out, put, slice, slice_mut, take};

use crate::engine::{xfer_status, Engine, Op, Prepared, XferDesc};
use crate::error::{status, Error, Result};
use crate::options::{Options, Progress};
use crate::registry::Mem;
use crate::state::XferState;

pub struct tnx_engine(Engine);
pub struct tnx_xfer(Arc<XferState>);
pub struct tnx_prep(Prepared);

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

/// The plugin's C API as an `ffiguard` front end.
struct Nixl;

impl ffiguard::Boundary for Nixl {
    type Error = Error;
    const PANIC: c_int = status::ERR_UNKNOWN;

    fn code(e: &Error) -> c_int {
        e.status()
    }
}

/// Runs entry `name`; `Ok` carries the status to return.
fn guard(name: &str, f: impl FnOnce() -> Result<c_int>) -> c_int {
    ffiguard::guard::<Nixl>(name, f)
}

fn engine<'a>(e: *const tnx_engine) -> Result<&'a Engine> {
    // SAFETY: the caller passes NULL or a live engine from tnx_engine_new (header contract).
    Ok(&unsafe { obj(e, "engine") }?.0)
}

/// Hands `data` to the caller's sink (the shim appends it to a std::string);
/// it returns 0, or non-zero when it could not take the bytes.
type sink_fn = extern "C" fn(ctx: *mut c_void, data: *const u8, len: usize) -> c_int;
/// As `sink_fn`, for one notification: (ctx, agent, agent_len, msg, msg_len).
type notif_fn = extern "C" fn(*mut c_void, *const u8, usize, *const u8, usize) -> c_int;

fn deliver(sink: sink_fn, ctx: *mut c_void, v: &[u8]) -> Result<c_int> {
    match sink(ctx, v.as_ptr(), v.len()) {
        0 => Ok(status::SUCCESS),
        _ => Err(Error::SinkFailed),
    }
}

/// Message of the calling thread's last failure ("" if none).
#[no_mangle]
pub extern "C" fn tnx_last_error() -> *const c_char {
    ffiguard::last_error()
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
    guard("tnx_engine_new", || {
        // SAFETY: agent is a C string, keys and vals arrays of n C strings (header contract).
        let (agent, keys, vals) = unsafe {
            (
                cstr(agent, "agent name")?,
                slice(keys, n, "option keys")?,
                slice(vals, n, "option values")?,
            )
        };
        let mut kv = Vec::with_capacity(n);
        for (k, v) in keys.iter().zip(vals) {
            // SAFETY: each is a C string (header contract).
            kv.push(unsafe { (cstr(*k, "option key")?, cstr(*v, "option value")?) });
        }
        let mut opts = Options::parse(kv)?;
        if progress_thread != 0 {
            opts.progress = Progress::Polling {
                delay: Duration::from_micros(progress_delay_us),
            };
        }
        let e = Engine::new(agent, opts)?;
        // SAFETY: out_engine is NULL or writable (header contract).
        unsafe { put(out_engine, Some(tnx_engine(e))) }?;
        Ok(status::SUCCESS)
    })
}

/// Stops the engine's threads and frees it. NULL is ignored.
#[no_mangle]
pub extern "C" fn tnx_engine_free(e: *mut tnx_engine) {
    ffiguard::catch::<Nixl, _>("tnx_engine_free", (), || {
        // SAFETY: NULL or from tnx_engine_new, freed once (header contract).
        drop(unsafe { take(e) });
    });
}

#[no_mangle]
pub extern "C" fn tnx_conn_info(e: *const tnx_engine, sink: sink_fn, ctx: *mut c_void) -> c_int {
    guard("tnx_conn_info", || {
        deliver(sink, ctx, &engine(e)?.conn_info())
    })
}

#[no_mangle]
pub extern "C" fn tnx_load_conn_info(
    e: *const tnx_engine,
    agent: *const c_char,
    info: *const u8,
    len: usize,
) -> c_int {
    guard("tnx_load_conn_info", || {
        // SAFETY: a C string and len readable bytes (header contract).
        let (agent, info) = unsafe { (cstr(agent, "agent name")?, slice(info, len, "info")?) };
        engine(e)?.load_conn_info(agent, info)?;
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
    guard("tnx_register", || {
        // SAFETY: NIXL's registration contract, restated in the header.
        let id = unsafe { engine(e)?.register(addr, len, Mem::from_nixl(mem)?)? };
        // SAFETY: out_id is NULL or writable (header contract).
        *unsafe { out(out_id, "out_id") }? = id;
        Ok(status::SUCCESS)
    })
}

#[no_mangle]
pub extern "C" fn tnx_deregister(e: *const tnx_engine, id: u64) -> c_int {
    guard("tnx_deregister", || {
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
    guard("tnx_public_data", || {
        deliver(sink, ctx, &engine(e)?.public_data(id)?)
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
    guard("tnx_load_remote_md", || {
        // SAFETY: a C string and len readable bytes (header contract).
        let (agent, blob) = unsafe { (cstr(agent, "agent name")?, slice(blob, len, "blob")?) };
        let id = engine(e)?.load_remote_md(agent, blob, Mem::from_nixl(mem)?)?;
        // SAFETY: out_id is NULL or writable (header contract).
        *unsafe { out(out_id, "out_id") }? = id;
        Ok(status::SUCCESS)
    })
}

#[no_mangle]
pub extern "C" fn tnx_unload_remote_md(e: *const tnx_engine, id: u64) -> c_int {
    guard("tnx_unload_remote_md", || {
        engine(e)?.unload_remote_md(id)?;
        Ok(status::SUCCESS)
    })
}

#[no_mangle]
pub extern "C" fn tnx_connect(e: *const tnx_engine, agent: *const c_char) -> c_int {
    guard("tnx_connect", || {
        // SAFETY: a C string (header contract).
        engine(e)?.connect(unsafe { cstr(agent, "agent name") }?)?;
        Ok(status::SUCCESS)
    })
}

#[no_mangle]
pub extern "C" fn tnx_disconnect(e: *const tnx_engine, agent: *const c_char) -> c_int {
    guard("tnx_disconnect", || {
        // SAFETY: a C string (header contract).
        engine(e)?.disconnect(unsafe { cstr(agent, "agent name") }?)?;
        Ok(status::SUCCESS)
    })
}

/// Writes the `nixl_mem_t` kinds this process can register (DRAM, and VRAM
/// when CUDA is usable) into `out[..cap]`; returns how many there are.
#[no_mangle]
pub extern "C" fn tnx_supported_mems(out: *mut u32, cap: usize) -> usize {
    ffiguard::catch::<Nixl, _>("tnx_supported_mems", 0, || {
        let mems = Mem::supported();
        // SAFETY: out is NULL or holds cap elements (header contract).
        if let Ok(dst) = unsafe { slice_mut(out, cap, "out") } {
            for (d, m) in dst.iter_mut().zip(&mems) {
                *d = m.nixl();
            }
        }
        mems.len()
    })
}

/// Checks the memory kinds of a transfer's lists before it is prepared:
/// the local kind must be registrable here, the remote one movable at all.
#[no_mangle]
pub extern "C" fn tnx_check_xfer_mems(local: u32, remote: u32) -> c_int {
    guard("tnx_check_xfer_mems", || {
        Mem::from_nixl(local)?.usable()?;
        Mem::from_nixl(remote)?;
        Ok(status::SUCCESS)
    })
}

/// Prepares a transfer (NIXL's prepXfer): its descriptors merged, resolved
/// and checked once for every post of it. `op`: 0 = READ, 1 = WRITE
/// (`nixl_xfer_op_t`).
#[no_mangle]
pub extern "C" fn tnx_xfer_prep(
    e: *const tnx_engine,
    op: c_int,
    agent: *const c_char,
    descs: *const tnx_desc,
    n: usize,
    out_prep: *mut *mut tnx_prep,
) -> c_int {
    guard("tnx_xfer_prep", || {
        let op = match op {
            0 => Op::Read,
            1 => Op::Write,
            o => return Err(Error::InvalidArgument(format!("unknown transfer op {o}"))),
        };
        // SAFETY: descs holds n elements, agent is a C string (header contract).
        let (ds, agent) = unsafe { (slice(descs, n, "descriptors")?, cstr(agent, "agent name")?) };
        let ds = ds.iter().map(|d| XferDesc {
            local_addr: d.local_addr,
            remote_addr: d.remote_addr,
            len: d.len,
            local_md: d.local_md,
            remote_md: d.remote_md,
        });
        let p = engine(e)?.prepare(op, agent, ds)?;
        // SAFETY: out_prep is NULL or writable (header contract).
        unsafe { put(out_prep, Some(tnx_prep(p))) }?;
        Ok(status::SUCCESS)
    })
}

/// Frees a prepared transfer (its posts in flight go on). NULL is ignored.
#[no_mangle]
pub extern "C" fn tnx_prep_free(p: *mut tnx_prep) {
    ffiguard::catch::<Nixl, _>("tnx_prep_free", (), || {
        // SAFETY: NULL or from tnx_xfer_prep, freed once (header contract).
        drop(unsafe { take(p) });
    });
}

/// Posts a prepared transfer. `has_notif` != 0 sends `notif` (possibly
/// empty) to the peer after the data.
#[no_mangle]
pub extern "C" fn tnx_xfer_post(
    e: *const tnx_engine,
    prep: *const tnx_prep,
    notif: *const u8,
    notif_len: usize,
    has_notif: c_int,
    out_xfer: *mut *mut tnx_xfer,
) -> c_int {
    guard("tnx_xfer_post", || {
        // SAFETY: NULL or a live prepared transfer from tnx_xfer_prep (header contract).
        let prep = unsafe { obj(prep, "prepared transfer") }?;
        let notif = if has_notif != 0 {
            // SAFETY: notif holds notif_len bytes (header contract).
            Some(unsafe { slice(notif, notif_len, "notification") }?)
        } else {
            None
        };
        let x = engine(e)?.post_prepared(&prep.0, notif)?;
        let (code, _) = xfer_status(&x);
        // SAFETY: out_xfer is NULL or writable (header contract).
        unsafe { put(out_xfer, Some(tnx_xfer(x))) }?;
        Ok(code)
    })
}

/// NIXL_SUCCESS when done, NIXL_IN_PROG while in flight, an error otherwise.
#[no_mangle]
pub extern "C" fn tnx_xfer_check(x: *const tnx_xfer) -> c_int {
    guard("tnx_xfer_check", || {
        // SAFETY: NULL or a live transfer from tnx_xfer_post (header contract).
        let x = unsafe { obj(x, "transfer") }?;
        match xfer_status(&x.0) {
            (_, Some(e)) => Err(e),
            (code, None) => Ok(code),
        }
    })
}

/// Frees a transfer handle; an in-flight transfer finishes unobserved. NULL is ignored.
#[no_mangle]
pub extern "C" fn tnx_xfer_free(x: *mut tnx_xfer) {
    ffiguard::catch::<Nixl, _>("tnx_xfer_free", (), || {
        // SAFETY: NULL or from tnx_xfer_post, freed once (header contract).
        drop(unsafe { take(x) });
    });
}

/// Hands each queued notification to `sink` once. When the sink refuses one,
/// it and those after it stay queued for the next call.
#[no_mangle]
pub extern "C" fn tnx_get_notifs(e: *const tnx_engine, sink: notif_fn, ctx: *mut c_void) -> c_int {
    guard("tnx_get_notifs", || {
        let e = engine(e)?;
        let mut got = e.take_notifs().into_iter();
        while let Some((a, m)) = got.next() {
            if sink(ctx, a.as_ptr(), a.len(), m.as_ptr(), m.len()) != 0 {
                e.requeue_notifs(std::iter::once((a, m)).chain(got).collect());
                return Err(Error::SinkFailed);
            }
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
    guard("tnx_gen_notif", || {
        // SAFETY: a C string and len readable bytes (header contract).
        let (agent, msg) = unsafe { (cstr(agent, "agent name")?, slice(msg, len, "message")?) };
        engine(e)?.gen_notif(agent, msg)?;
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
        (c"pack_dram", c"0"),
    ];
    const _: () = assert!(OPTS.len() == crate::options::OPTIONS.len());
    ffiguard::catch::<Nixl, _>("tnx_option", 0, || {
        let Some((k, d)) = OPTS.get(i) else { return 0 };
        // SAFETY: key and default are NULL or writable (header contract).
        match unsafe { (out(key, "key"), out(default, "default")) } {
            (Ok(key), Ok(default)) => {
                *key = k.as_ptr();
                *default = d.as_ptr();
                1
            }
            _ => 0,
        }
    })
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
    ffiguard::catch::<Nixl, _>("nixl_plugin_init", std::ptr::null_mut(), || {
        // SAFETY: a plain C function without arguments; it catches its own exceptions.
        unsafe { tcpx_nixl_plugin_descriptor() }
    })
}

/// NIXL's plugin exit point; engines are freed by `destroy_engine`.
#[no_mangle]
pub extern "C" fn nixl_plugin_fini() {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message tnx_last_error() points to.
    fn last() -> String {
        assert_eq!(tnx_last_error(), ffiguard::last_error());
        ffiguard::last_error_message()
    }

    #[test]
    fn a_panic_inside_an_entry_is_err_unknown_and_names_it() {
        ffiguard::panic_in_next_guard();
        assert_eq!(tnx_check_xfer_mems(0, 0), status::ERR_UNKNOWN);
        assert!(last().contains("tnx_check_xfer_mems"), "{}", last());
        assert_eq!(tnx_check_xfer_mems(0, 0), status::SUCCESS);
        // Entries without a status give their neutral value.
        ffiguard::panic_in_next_guard();
        assert_eq!(tnx_supported_mems(std::ptr::null_mut(), 0), 0);
        assert!(last().contains("tnx_supported_mems"), "{}", last());
    }

    extern "C" fn refuse(_: *mut c_void, _: *const u8, _: usize, _: *const u8, _: usize) -> c_int {
        1
    }

    extern "C" fn keep(ctx: *mut c_void, _: *const u8, _: usize, m: *const u8, n: usize) -> c_int {
        // SAFETY: ctx is the Vec below; m holds n bytes for the call.
        unsafe { (*ctx.cast::<Vec<Vec<u8>>>()).push(std::slice::from_raw_parts(m, n).to_vec()) };
        0
    }

    #[test]
    fn a_sink_that_cannot_take_a_notification_fails_the_call_and_keeps_it() {
        let opts = || Options::parse([("nics", "127.0.0.1")]).unwrap();
        let (a, b) = (
            Engine::new("A", opts()).unwrap(),
            Engine::new("B", opts()).unwrap(),
        );
        a.load_conn_info("B", &b.conn_info()).unwrap();
        a.gen_notif("B", b"one").unwrap();
        a.gen_notif("B", b"two").unwrap();
        // Wait for both to arrive, then queue them again for the C API.
        let t0 = std::time::Instant::now();
        let mut arrived = Vec::new();
        while arrived.len() < 2 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "notifications did not arrive"
            );
            arrived.extend(b.take_notifs());
        }
        b.requeue_notifs(arrived);
        let b = tnx_engine(b);
        let ctx = std::ptr::null_mut();
        assert_eq!(tnx_get_notifs(&b, refuse, ctx), status::ERR_BACKEND);
        assert!(last().contains("out of memory"), "{}", last());
        let mut got: Vec<Vec<u8>> = Vec::new();
        let ctx = (&mut got as *mut Vec<Vec<u8>>).cast();
        assert_eq!(tnx_get_notifs(&b, keep, ctx), status::SUCCESS);
        assert_eq!(got, [b"one".to_vec(), b"two".to_vec()]);
    }
}
