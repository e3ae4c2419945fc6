//! The exported `ncclNetPlugin_vN` tables and their C entry points. Each
//! entry runs inside `guard` (errors and panics become `ncclResult_t`),
//! converts its version's arguments and calls `plugin`.
#![allow(non_upper_case_globals)]

use std::ffi::{c_int, c_void};

use tcpx::Error;

use crate::abi::*;
use crate::plugin::{self, guard, put_obj, Listen, Recv, Send};
use crate::{log, ntrace};

type P = *mut c_void;
type PP = *mut *mut c_void;

/// Every version's init: the logger first, so that the plugin's own
/// failures reach NCCL's log.
fn start(version: &'static str, logger: ncclDebugLogger_t) -> Result<(), Error> {
    log::set_logger(logger);
    plugin::init(version)
}

// ------------------------------------------------ entries shared by versions

extern "C" fn devices(ndev: *mut c_int) -> ncclResult_t {
    guard("devices", || plugin::devices(ndev))
}

extern "C" fn listen(dev: c_int, handle: P, l: PP) -> ncclResult_t {
    guard("listen", || plugin::listen(dev, handle, l))
}

extern "C" fn connect(dev: c_int, handle: P, send: PP, _dc: PP) -> ncclResult_t {
    guard("connect", || plugin::connect(dev, handle, send))
}

extern "C" fn accept(l: P, recv: PP, _dc: PP) -> ncclResult_t {
    guard("accept", || plugin::accept(l, recv))
}

extern "C" fn reg_mr(comm: P, data: P, size: usize, ty: c_int, mh: PP) -> ncclResult_t {
    guard("regMr", || {
        plugin::reg_mr("regMr", comm, data, size, ty, mh)
    })
}

/// The bounce path reads and writes device memory by address, so the
/// DMA-BUF fd is not needed (NCCL closes it after the call): the buffer is
/// registered as by regMr. We do not advertise NCCL_PTR_DMABUF, so NCCL
/// only calls this when another plugin's habits lead it to.
extern "C" fn reg_mr_dmabuf(
    comm: P,
    data: P,
    size: usize,
    ty: c_int,
    offset: u64,
    fd: c_int,
    mh: PP,
) -> ncclResult_t {
    guard("regMrDmaBuf", || {
        ntrace!("regMrDmaBuf fd {fd} offset {offset} (registered by address)");
        plugin::reg_mr("regMrDmaBuf", comm, data, size, ty, mh)
    })
}

extern "C" fn dereg_mr(_comm: P, mh: P) -> ncclResult_t {
    guard("deregMr", || plugin::dereg_mr(mh))
}

extern "C" fn iflush(
    recv: P,
    n: c_int,
    _data: PP,
    _sizes: *mut c_int,
    _mhs: PP,
    req: PP,
) -> ncclResult_t {
    guard("iflush", || plugin::iflush(recv, n, req))
}

extern "C" fn test(req: P, done: *mut c_int, sizes: *mut c_int) -> ncclResult_t {
    guard("test", || plugin::test(req, done, sizes))
}

extern "C" fn close_send(c: P) -> ncclResult_t {
    guard("closeSend", || {
        ntrace!("closeSend comm {c:p}");
        // SAFETY: NULL or our Send, not used after closeSend (net_vN.h).
        unsafe { plugin::free::<Send>(c) };
        Ok(())
    })
}

extern "C" fn close_recv(c: P) -> ncclResult_t {
    guard("closeRecv", || {
        ntrace!("closeRecv comm {c:p}");
        // SAFETY: NULL or our Recv, not used after closeRecv (net_vN.h).
        unsafe { plugin::free::<Recv>(c) };
        Ok(())
    })
}

extern "C" fn close_listen(c: P) -> ncclResult_t {
    guard("closeListen", || {
        ntrace!("closeListen comm {c:p}");
        // SAFETY: NULL or our Listen, not used after closeListen (net_vN.h).
        unsafe { plugin::free::<Listen>(c) };
        Ok(())
    })
}

/// size_t sizes (v9+).
extern "C" fn isend_v9(send: P, data: P, size: usize, tag: c_int, mh: P, req: PP) -> ncclResult_t {
    guard("isend", || plugin::isend(send, data, size, tag, mh, req))
}

extern "C" fn irecv_v9(
    recv: P,
    n: c_int,
    data: PP,
    sizes: *mut usize,
    tags: *mut c_int,
    mhs: PP,
    req: PP,
) -> ncclResult_t {
    guard("irecv", || {
        let size = |i: usize| {
            // SAFETY: NCCL's sizes array holds n elements and plugin::irecv asks only i < n.
            Ok(unsafe { ffiguard::slice(sizes, i + 1, "sizes") }?[i])
        };
        plugin::irecv(recv, n, data, size, tags, mhs, req)
    })
}

// ------------------------------------------------------------------ v8

extern "C" fn init_v8(logger: ncclDebugLogger_t) -> ncclResult_t {
    guard("init", || start("ncclNet v8", logger))
}

extern "C" fn get_properties_v8(dev: c_int, p: *mut ncclNetProperties_v8_t) -> ncclResult_t {
    guard("getProperties", || {
        let props = plugin::props(dev)?.v8();
        // SAFETY: NCCL passes NULL or a writable properties struct (net_vN.h).
        *unsafe { ffiguard::out(p, "props") }? = props;
        Ok(())
    })
}

/// v8 passes `int` sizes.
extern "C" fn isend_v8(send: P, data: P, size: c_int, tag: c_int, mh: P, req: PP) -> ncclResult_t {
    guard("isend", || {
        let size = usize::try_from(size)
            .map_err(|_| Error::InvalidArgument(format!("negative size {size}")))?;
        plugin::isend(send, data, size, tag, mh, req)
    })
}

extern "C" fn irecv_v8(
    recv: P,
    n: c_int,
    data: PP,
    sizes: *mut c_int,
    tags: *mut c_int,
    mhs: PP,
    req: PP,
) -> ncclResult_t {
    guard("irecv", || {
        let size = |i: usize| {
            // SAFETY: NCCL's sizes array holds n elements and plugin::irecv asks only i < n.
            let s = unsafe { ffiguard::slice(sizes, i + 1, "sizes") }?[i];
            usize::try_from(s).map_err(|_| Error::InvalidArgument(format!("negative size {s}")))
        };
        plugin::irecv(recv, n, data, size, tags, mhs, req)
    })
}

/// The newest table NCCL 2.20 .. 2.23 know; later ones fall back to it.
#[no_mangle]
pub static ncclNetPlugin_v8: ncclNet_v8_t = ncclNet_v8_t {
    name: plugin::NAME.as_ptr(),
    init: Some(init_v8),
    devices: Some(devices),
    getProperties: Some(get_properties_v8),
    listen: Some(listen),
    connect: Some(connect),
    accept: Some(accept),
    regMr: Some(reg_mr),
    regMrDmaBuf: Some(reg_mr_dmabuf),
    deregMr: Some(dereg_mr),
    isend: Some(isend_v8),
    irecv: Some(irecv_v8),
    iflush: Some(iflush),
    test: Some(test),
    closeSend: Some(close_send),
    closeRecv: Some(close_recv),
    closeListen: Some(close_listen),
    getDeviceMr: None,
    irecvConsumed: None,
};

// ------------------------------------------------------------------ v9

extern "C" fn init_v9(logger: ncclDebugLogger_t) -> ncclResult_t {
    guard("init", || start("ncclNet v9", logger))
}

extern "C" fn get_properties_v9(dev: c_int, p: *mut ncclNetProperties_v9_t) -> ncclResult_t {
    guard("getProperties", || {
        let props = plugin::props(dev)?.v9();
        // SAFETY: NCCL passes NULL or a writable properties struct (net_vN.h).
        *unsafe { ffiguard::out(p, "props") }? = props;
        Ok(())
    })
}

/// The newest table NCCL 2.24 and 2.25 know.
#[no_mangle]
pub static ncclNetPlugin_v9: ncclNet_v9_t = ncclNet_v9_t {
    name: plugin::NAME.as_ptr(),
    init: Some(init_v9),
    devices: Some(devices),
    getProperties: Some(get_properties_v9),
    listen: Some(listen),
    connect: Some(connect),
    accept: Some(accept),
    regMr: Some(reg_mr),
    regMrDmaBuf: Some(reg_mr_dmabuf),
    deregMr: Some(dereg_mr),
    isend: Some(isend_v9),
    irecv: Some(irecv_v9),
    iflush: Some(iflush),
    test: Some(test),
    closeSend: Some(close_send),
    closeRecv: Some(close_recv),
    closeListen: Some(close_listen),
    getDeviceMr: None,
    irecvConsumed: None,
    // NULL: NCCL then uses the physical devices (no NIC fusion).
    makeVDevice: None,
};

// ------------------------------------------------------------------ v10

extern "C" fn init_v10(logger: ncclDebugLogger_t, _prof: ncclProfilerCallback_t) -> ncclResult_t {
    guard("init", || start("ncclNet v10", logger))
}

extern "C" fn connect_v10(
    dev: c_int,
    _cfg: *mut ncclNetCommConfig,
    handle: P,
    send: PP,
    _dc: PP,
) -> ncclResult_t {
    guard("connect", || plugin::connect(dev, handle, send))
}

/// Profiler handles (`phandle`) are accepted and ignored.
extern "C" fn isend_v10(
    send: P,
    data: P,
    size: usize,
    tag: c_int,
    mh: P,
    _ph: P,
    req: PP,
) -> ncclResult_t {
    isend_v9(send, data, size, tag, mh, req)
}

extern "C" fn irecv_v10(
    recv: P,
    n: c_int,
    data: PP,
    sizes: *mut usize,
    tags: *mut c_int,
    mhs: PP,
    _phs: PP,
    req: PP,
) -> ncclResult_t {
    irecv_v9(recv, n, data, sizes, tags, mhs, req)
}

/// The newest table NCCL 2.26 and 2.27 know.
#[no_mangle]
pub static ncclNetPlugin_v10: ncclNet_v10_t = ncclNet_v10_t {
    name: plugin::NAME.as_ptr(),
    init: Some(init_v10),
    devices: Some(devices),
    getProperties: Some(get_properties_v9),
    listen: Some(listen),
    connect: Some(connect_v10),
    accept: Some(accept),
    regMr: Some(reg_mr),
    regMrDmaBuf: Some(reg_mr_dmabuf),
    deregMr: Some(dereg_mr),
    isend: Some(isend_v10),
    irecv: Some(irecv_v10),
    iflush: Some(iflush),
    test: Some(test),
    closeSend: Some(close_send),
    closeRecv: Some(close_recv),
    closeListen: Some(close_listen),
    getDeviceMr: None,
    irecvConsumed: None,
    makeVDevice: None,
};

// ------------------------------------------------------------------ v11

/// Per-communicator context (v11 inits once per communicator).
struct Ctx {
    _comm_id: u64,
    _traffic_class: c_int,
}

extern "C" fn init_v11(
    ctx: PP,
    comm_id: u64,
    cfg: *mut ncclNetCommConfig,
    logger: ncclDebugLogger_t,
    _prof: ncclProfilerCallback_t,
) -> ncclResult_t {
    init_ctx("ncclNet v11", ctx, comm_id, cfg, logger)
}

/// v11+ init: starts the plugin and makes the per-communicator context.
fn init_ctx(
    table: &'static str,
    ctx: PP,
    comm_id: u64,
    cfg: *mut ncclNetCommConfig,
    logger: ncclDebugLogger_t,
) -> ncclResult_t {
    guard("init", || {
        start(table, logger)?;
        // SAFETY: NCCL passes NULL or a config valid for this call.
        let tc = unsafe { cfg.as_ref() }.map_or(-1, |c| c.trafficClass);
        let ctx_obj = Ctx {
            _comm_id: comm_id,
            _traffic_class: tc,
        };
        // SAFETY: NCCL passes NULL or a writable out pointer (net_v11.h, net_v12.h).
        unsafe { put_obj(ctx, Some(ctx_obj)) }
    })
}

extern "C" fn finalize_v11(ctx: P) -> ncclResult_t {
    guard("finalize", || {
        // SAFETY: NULL or the Ctx of init_v11, not used after finalize (net_v11.h).
        unsafe { plugin::free::<Ctx>(ctx) };
        Ok(())
    })
}

extern "C" fn get_properties_v11(dev: c_int, p: *mut ncclNetProperties_v11_t) -> ncclResult_t {
    guard("getProperties", || {
        let props = plugin::props(dev)?.v11();
        // SAFETY: NCCL passes NULL or a writable properties struct (net_vN.h).
        *unsafe { ffiguard::out(p, "props") }? = props;
        Ok(())
    })
}

extern "C" fn listen_v11(_ctx: P, dev: c_int, handle: P, l: PP) -> ncclResult_t {
    listen(dev, handle, l)
}

extern "C" fn connect_v11(_ctx: P, dev: c_int, handle: P, send: PP, dc: PP) -> ncclResult_t {
    connect(dev, handle, send, dc)
}

/// The newest table NCCL 2.28 and 2.29 know (2.30 and later try `_v12` first).
#[no_mangle]
pub static ncclNetPlugin_v11: ncclNet_v11_t = ncclNet_v11_t {
    name: plugin::NAME.as_ptr(),
    init: Some(init_v11),
    devices: Some(devices),
    getProperties: Some(get_properties_v11),
    listen: Some(listen_v11),
    connect: Some(connect_v11),
    accept: Some(accept),
    regMr: Some(reg_mr),
    regMrDmaBuf: Some(reg_mr_dmabuf),
    deregMr: Some(dereg_mr),
    isend: Some(isend_v10),
    irecv: Some(irecv_v10),
    iflush: Some(iflush),
    test: Some(test),
    closeSend: Some(close_send),
    closeRecv: Some(close_recv),
    closeListen: Some(close_listen),
    getDeviceMr: None,
    irecvConsumed: None,
    makeVDevice: None,
    // NCCL calls finalize unconditionally (src/plugin/net.cc), so it is set.
    finalize: Some(finalize_v11),
    // NULL: NCCL checks before calling (src/transport/net.cc setNetAttrs).
    setNetAttr: None,
};

// ------------------------------------------------------------------ v12

extern "C" fn init_v12(
    ctx: PP,
    comm_id: u64,
    cfg: *mut ncclNetCommConfig,
    logger: ncclDebugLogger_t,
    _prof: ncclProfilerCallback_t,
) -> ncclResult_t {
    init_ctx("ncclNet v12", ctx, comm_id, cfg, logger)
}

extern "C" fn get_properties_v12(dev: c_int, p: *mut ncclNetProperties_v12_t) -> ncclResult_t {
    guard("getProperties", || {
        let props = plugin::props(dev)?.v12();
        // SAFETY: NCCL passes NULL or a writable properties struct (net_vN.h).
        *unsafe { ffiguard::out(p, "props") }? = props;
        Ok(())
    })
}

/// The newest table (NCCL 2.30 and later; still the newest in 2.32).
#[no_mangle]
pub static ncclNetPlugin_v12: ncclNet_v12_t = ncclNet_v12_t {
    name: plugin::NAME.as_ptr(),
    init: Some(init_v12),
    devices: Some(devices),
    getProperties: Some(get_properties_v12),
    listen: Some(listen_v11),
    connect: Some(connect_v11),
    accept: Some(accept),
    regMr: Some(reg_mr),
    regMrDmaBuf: Some(reg_mr_dmabuf),
    deregMr: Some(dereg_mr),
    isend: Some(isend_v10),
    irecv: Some(irecv_v10),
    iflush: Some(iflush),
    test: Some(test),
    closeSend: Some(close_send),
    closeRecv: Some(close_recv),
    closeListen: Some(close_listen),
    getDeviceMr: None,
    irecvConsumed: None,
    makeVDevice: None,
    finalize: Some(finalize_v11),
    setNetAttr: None,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_an_entry_is_an_internal_error() {
        let mut n = 0;
        ffiguard::panic_in_next_guard();
        assert_eq!(devices(&mut n), NCCL_INTERNAL_ERROR);
        // The next call is an ordinary one (the plugin is not initialized here).
        assert_eq!(devices(&mut n), NCCL_INVALID_USAGE);
    }

    #[test]
    fn a_panic_during_init_is_an_internal_error() {
        // The logger is set inside the guard too: a panic there is caught.
        ffiguard::panic_in_next_guard();
        assert_eq!(init_v8(None), NCCL_INTERNAL_ERROR);
        ffiguard::panic_in_next_guard();
        let mut ctx = std::ptr::null_mut();
        let rc = init_v11(
            &mut ctx,
            1,
            std::ptr::null_mut(),
            None,
            std::ptr::null_mut(),
        );
        assert_eq!(rc, NCCL_INTERNAL_ERROR);
        assert!(ctx.is_null());
    }
}
