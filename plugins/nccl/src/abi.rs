//! Our `#[repr(C)]` declarations of NCCL's net plugin ABI.
//!
//! Facts from NVIDIA/nccl at tag v2.28.7-1 (re-checked against v2.30.7-1,
//! whose v8..v11 structs are unchanged; v12 from its `net_v12.h`):
//! - `src/include/plugin/net/net_v{8,9,10,11,12}.h`: the tables and properties;
//! - `src/include/plugin/nccl_net.h`: `NCCL_PTR_*`, `NCCL_NET_HANDLE_MAXSIZE`,
//!   `MAX_NET_SIZE`, `MAX_COLLNET_SIZE`, `NCCL_NET_MAX_DEVS_PER_NIC`;
//! - `src/include/nccl_common.h`: `ncclDebugLogger_t`, log levels, subsystems,
//!   `ncclProfilerCallback_t`;
//! - `src/nccl.h.in`: `ncclResult_t` values;
//! - `src/include/nccl_device/net_device.h`: `ncclNetDeviceType`.
//!
//! Layout on LP64 (x86-64, aarch64): pointers and `size_t` 8 bytes, `int`,
//! `float` and C enums 4 bytes, structs aligned to their widest member. The
//! numbers are pinned by the tests at the bottom, and the C test's header
//! (tests/nccl_net_decls.h) asserts the same numbers independently.
#![allow(non_camel_case_types, non_snake_case)]

use std::ffi::{c_char, c_float, c_int, c_ulong, c_void};

/// `ncclResult_t` (`src/nccl.h.in`).
pub type ncclResult_t = c_int;
pub const NCCL_SUCCESS: ncclResult_t = 0;
pub const NCCL_SYSTEM_ERROR: ncclResult_t = 2;
pub const NCCL_INTERNAL_ERROR: ncclResult_t = 3;
pub const NCCL_INVALID_ARGUMENT: ncclResult_t = 4;
pub const NCCL_INVALID_USAGE: ncclResult_t = 5;
pub const NCCL_REMOTE_ERROR: ncclResult_t = 6;

/// `ncclDebugLogLevel` values.
pub const NCCL_LOG_WARN: c_int = 2;
pub const NCCL_LOG_INFO: c_int = 3;
pub const NCCL_LOG_TRACE: c_int = 5;
/// `ncclDebugLogSubSys` bits.
pub const NCCL_INIT: c_ulong = 0x1;
pub const NCCL_NET: c_ulong = 0x10;

pub const NCCL_PTR_HOST: c_int = 0x1;
pub const NCCL_PTR_CUDA: c_int = 0x2;
pub const NCCL_NET_HANDLE_MAXSIZE: usize = 128;
/// `NCCL_NET_DEVICE_HOST` and `NCCL_NET_DEVICE_INVALID_VERSION`.
pub const NCCL_NET_DEVICE_HOST: c_int = 0;
pub const NCCL_NET_DEVICE_INVALID_VERSION: c_int = 0;
/// `MAX_NET_SIZE` (1 GiB) and `MAX_COLLNET_SIZE` (512 MiB).
pub const MAX_NET_SIZE: usize = 1 << 30;
pub const MAX_COLLNET_SIZE: usize = 512 << 20;
pub const NCCL_NET_MAX_DEVS_PER_NIC: usize = 4;
/// `NCCL_NET_MAX_DEVS_PER_NIC_V12`: v12 virtual NICs fuse up to 8 devices.
pub const NCCL_NET_MAX_DEVS_PER_NIC_V12: usize = 8;
/// `NCCL_NET_ID_UNDEF`: a rail or plane id the plugin does not know.
pub const NCCL_NET_ID_UNDEF: i16 = -1;

/// `void (*)(ncclDebugLogLevel level, unsigned long flags, const char* file,
/// int line, const char* fmt, ...)`.
pub type ncclDebugLogger_t = Option<
    unsafe extern "C" fn(
        level: c_int,
        flags: c_ulong,
        file: *const c_char,
        line: c_int,
        fmt: *const c_char,
        ...
    ),
>;
/// `ncclProfilerCallback_t`; we never call it, so it stays opaque.
pub type ncclProfilerCallback_t = *mut c_void;

/// `ncclNetVDeviceProps_v{9,10,11}_t`: 4 + 4*4 = 20 bytes, align 4.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ncclNetVDeviceProps {
    pub ndevs: c_int,
    pub devs: [c_int; NCCL_NET_MAX_DEVS_PER_NIC],
}

/// `ncclNetVDeviceProps_v12_t`: 4 + 8*4 = 36 bytes, align 4.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ncclNetVDeviceProps_v12 {
    pub ndevs: c_int,
    pub devs: [c_int; NCCL_NET_MAX_DEVS_PER_NIC_V12],
}

/// `ncclNetCommConfig_v10_t` / `_v11_t` / `_v12_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ncclNetCommConfig {
    pub trafficClass: c_int,
}

/// `ncclNetProperties_v8_t`: two pointers (0, 8), guid (16), then ten
/// 4-byte fields from 24 to 60; padded to 8 → 64 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ncclNetProperties_v8_t {
    pub name: *mut c_char,
    pub pciPath: *mut c_char,
    pub guid: u64,
    pub ptrSupport: c_int,
    pub regIsGlobal: c_int,
    pub speed: c_int,
    pub port: c_int,
    pub latency: c_float,
    pub maxComms: c_int,
    pub maxRecvs: c_int,
    pub netDeviceType: c_int,
    pub netDeviceVersion: c_int,
}

/// `ncclNetProperties_v9_t` (identical to `_v10_t`): v8 plus `forceFlush`
/// after `regIsGlobal`; eleven 4-byte fields 24..64, vProps 64..84, then
/// maxP2pBytes at 88 (8-aligned) and maxCollBytes at 96 → 104 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ncclNetProperties_v9_t {
    pub name: *mut c_char,
    pub pciPath: *mut c_char,
    pub guid: u64,
    pub ptrSupport: c_int,
    pub regIsGlobal: c_int,
    pub forceFlush: c_int,
    pub speed: c_int,
    pub port: c_int,
    pub latency: c_float,
    pub maxComms: c_int,
    pub maxRecvs: c_int,
    pub netDeviceType: c_int,
    pub netDeviceVersion: c_int,
    pub vProps: ncclNetVDeviceProps,
    pub maxP2pBytes: usize,
    pub maxCollBytes: usize,
}
pub type ncclNetProperties_v10_t = ncclNetProperties_v9_t;

/// `ncclNetProperties_v11_t`: v10 plus `maxMultiRequestSize` at 104 → 112 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ncclNetProperties_v11_t {
    pub name: *mut c_char,
    pub pciPath: *mut c_char,
    pub guid: u64,
    pub ptrSupport: c_int,
    pub regIsGlobal: c_int,
    pub forceFlush: c_int,
    pub speed: c_int,
    pub port: c_int,
    pub latency: c_float,
    pub maxComms: c_int,
    pub maxRecvs: c_int,
    pub netDeviceType: c_int,
    pub netDeviceVersion: c_int,
    pub vProps: ncclNetVDeviceProps,
    pub maxP2pBytes: usize,
    pub maxCollBytes: usize,
    pub maxMultiRequestSize: c_int,
}

/// `ncclNetProperties_v12_t`: v11 with 8-device vProps (64..100), so
/// maxP2pBytes at 104, maxCollBytes 112, maxMultiRequestSize 120, then
/// `int16_t railId` at 124 and `planeId` at 126 → 128 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ncclNetProperties_v12_t {
    pub name: *mut c_char,
    pub pciPath: *mut c_char,
    pub guid: u64,
    pub ptrSupport: c_int,
    pub regIsGlobal: c_int,
    pub forceFlush: c_int,
    pub speed: c_int,
    pub port: c_int,
    pub latency: c_float,
    pub maxComms: c_int,
    pub maxRecvs: c_int,
    pub netDeviceType: c_int,
    pub netDeviceVersion: c_int,
    pub vProps: ncclNetVDeviceProps_v12,
    pub maxP2pBytes: usize,
    pub maxCollBytes: usize,
    pub maxMultiRequestSize: c_int,
    pub railId: i16,
    pub planeId: i16,
}

type P = *mut c_void;
type PP = *mut *mut c_void;
/// `ncclNetDeviceHandle_vN_t**`: we never offload, so the handle is opaque.
type DevH = *mut *mut c_void;
type R = ncclResult_t;

// Entries shared by every version (same C signature in v8..v11).
pub type DevicesFn = unsafe extern "C" fn(ndev: *mut c_int) -> R;
pub type AcceptFn = unsafe extern "C" fn(listen: P, recv: PP, dev_comm: DevH) -> R;
pub type RegMrFn = unsafe extern "C" fn(comm: P, data: P, size: usize, ty: c_int, mh: PP) -> R;
pub type RegMrDmaBufFn = unsafe extern "C" fn(
    comm: P,
    data: P,
    size: usize,
    ty: c_int,
    offset: u64,
    fd: c_int,
    mh: PP,
) -> R;
pub type DeregMrFn = unsafe extern "C" fn(comm: P, mh: P) -> R;
pub type IflushFn =
    unsafe extern "C" fn(recv: P, n: c_int, data: PP, sizes: *mut c_int, mhs: PP, req: PP) -> R;
pub type TestFn = unsafe extern "C" fn(req: P, done: *mut c_int, sizes: *mut c_int) -> R;
pub type CloseFn = unsafe extern "C" fn(comm: P) -> R;
pub type GetDeviceMrFn = unsafe extern "C" fn(comm: P, mh: P, dptr: PP) -> R;
pub type IrecvConsumedFn = unsafe extern "C" fn(recv: P, n: c_int, req: P) -> R;
pub type MakeVDeviceFn = unsafe extern "C" fn(d: *mut c_int, props: *mut ncclNetVDeviceProps) -> R;
pub type MakeVDeviceV12Fn =
    unsafe extern "C" fn(d: *mut c_int, props: *mut ncclNetVDeviceProps_v12) -> R;
/// v9+ `listen(int dev, void* handle, void** listenComm)` (also v8).
pub type ListenFn = unsafe extern "C" fn(dev: c_int, handle: P, listen: PP) -> R;

/// `ncclNet_v8_t`: name + 18 entries = 19 pointers = 152 bytes.
#[repr(C)]
pub struct ncclNet_v8_t {
    pub name: *const c_char,
    pub init: Option<unsafe extern "C" fn(log: ncclDebugLogger_t) -> R>,
    pub devices: Option<DevicesFn>,
    pub getProperties:
        Option<unsafe extern "C" fn(dev: c_int, p: *mut ncclNetProperties_v8_t) -> R>,
    pub listen: Option<ListenFn>,
    pub connect: Option<unsafe extern "C" fn(dev: c_int, handle: P, send: PP, dc: DevH) -> R>,
    pub accept: Option<AcceptFn>,
    pub regMr: Option<RegMrFn>,
    pub regMrDmaBuf: Option<RegMrDmaBufFn>,
    pub deregMr: Option<DeregMrFn>,
    /// `int size` in v8.
    pub isend: Option<
        unsafe extern "C" fn(send: P, data: P, size: c_int, tag: c_int, mh: P, req: PP) -> R,
    >,
    /// `int* sizes` in v8.
    pub irecv: Option<
        unsafe extern "C" fn(
            recv: P,
            n: c_int,
            data: PP,
            sizes: *mut c_int,
            tags: *mut c_int,
            mhs: PP,
            req: PP,
        ) -> R,
    >,
    pub iflush: Option<IflushFn>,
    pub test: Option<TestFn>,
    pub closeSend: Option<CloseFn>,
    pub closeRecv: Option<CloseFn>,
    pub closeListen: Option<CloseFn>,
    pub getDeviceMr: Option<GetDeviceMrFn>,
    pub irecvConsumed: Option<IrecvConsumedFn>,
}

/// v9 isend/irecv: `size_t` sizes, no phandles.
pub type IsendV9Fn =
    unsafe extern "C" fn(send: P, data: P, size: usize, tag: c_int, mh: P, req: PP) -> R;
pub type IrecvV9Fn = unsafe extern "C" fn(
    recv: P,
    n: c_int,
    data: PP,
    sizes: *mut usize,
    tags: *mut c_int,
    mhs: PP,
    req: PP,
) -> R;
/// v10+ isend/irecv: v9 plus profiler handles before `request`.
pub type IsendV10Fn =
    unsafe extern "C" fn(send: P, data: P, size: usize, tag: c_int, mh: P, ph: P, req: PP) -> R;
pub type IrecvV10Fn = unsafe extern "C" fn(
    recv: P,
    n: c_int,
    data: PP,
    sizes: *mut usize,
    tags: *mut c_int,
    mhs: PP,
    phs: PP,
    req: PP,
) -> R;

/// `ncclNet_v9_t`: v8's entries plus makeVDevice = 20 pointers = 160 bytes.
#[repr(C)]
pub struct ncclNet_v9_t {
    pub name: *const c_char,
    pub init: Option<unsafe extern "C" fn(log: ncclDebugLogger_t) -> R>,
    pub devices: Option<DevicesFn>,
    pub getProperties:
        Option<unsafe extern "C" fn(dev: c_int, p: *mut ncclNetProperties_v9_t) -> R>,
    pub listen: Option<ListenFn>,
    pub connect: Option<unsafe extern "C" fn(dev: c_int, handle: P, send: PP, dc: DevH) -> R>,
    pub accept: Option<AcceptFn>,
    pub regMr: Option<RegMrFn>,
    pub regMrDmaBuf: Option<RegMrDmaBufFn>,
    pub deregMr: Option<DeregMrFn>,
    pub isend: Option<IsendV9Fn>,
    pub irecv: Option<IrecvV9Fn>,
    pub iflush: Option<IflushFn>,
    pub test: Option<TestFn>,
    pub closeSend: Option<CloseFn>,
    pub closeRecv: Option<CloseFn>,
    pub closeListen: Option<CloseFn>,
    pub getDeviceMr: Option<GetDeviceMrFn>,
    pub irecvConsumed: Option<IrecvConsumedFn>,
    pub makeVDevice: Option<MakeVDeviceFn>,
}

/// `ncclNet_v10_t`: same 20 slots as v9 (160 bytes); init takes the
/// profiler callback, connect the comm config, isend/irecv the phandles.
#[repr(C)]
pub struct ncclNet_v10_t {
    pub name: *const c_char,
    pub init:
        Option<unsafe extern "C" fn(log: ncclDebugLogger_t, prof: ncclProfilerCallback_t) -> R>,
    pub devices: Option<DevicesFn>,
    pub getProperties:
        Option<unsafe extern "C" fn(dev: c_int, p: *mut ncclNetProperties_v10_t) -> R>,
    pub listen: Option<ListenFn>,
    pub connect: Option<
        unsafe extern "C" fn(
            dev: c_int,
            cfg: *mut ncclNetCommConfig,
            handle: P,
            send: PP,
            dc: DevH,
        ) -> R,
    >,
    pub accept: Option<AcceptFn>,
    pub regMr: Option<RegMrFn>,
    pub regMrDmaBuf: Option<RegMrDmaBufFn>,
    pub deregMr: Option<DeregMrFn>,
    pub isend: Option<IsendV10Fn>,
    pub irecv: Option<IrecvV10Fn>,
    pub iflush: Option<IflushFn>,
    pub test: Option<TestFn>,
    pub closeSend: Option<CloseFn>,
    pub closeRecv: Option<CloseFn>,
    pub closeListen: Option<CloseFn>,
    pub getDeviceMr: Option<GetDeviceMrFn>,
    pub irecvConsumed: Option<IrecvConsumedFn>,
    pub makeVDevice: Option<MakeVDeviceFn>,
}

/// `ncclNet_v11_t`: a per-communicator context (`init` makes it; listen and
/// connect take it; `finalize` frees it) and `setNetAttr`: 22 pointers = 176 bytes.
#[repr(C)]
pub struct ncclNet_v11_t {
    pub name: *const c_char,
    pub init: Option<
        unsafe extern "C" fn(
            ctx: PP,
            comm_id: u64,
            cfg: *mut ncclNetCommConfig,
            log: ncclDebugLogger_t,
            prof: ncclProfilerCallback_t,
        ) -> R,
    >,
    pub devices: Option<DevicesFn>,
    pub getProperties:
        Option<unsafe extern "C" fn(dev: c_int, p: *mut ncclNetProperties_v11_t) -> R>,
    pub listen: Option<unsafe extern "C" fn(ctx: P, dev: c_int, handle: P, listen: PP) -> R>,
    pub connect:
        Option<unsafe extern "C" fn(ctx: P, dev: c_int, handle: P, send: PP, dc: DevH) -> R>,
    pub accept: Option<AcceptFn>,
    pub regMr: Option<RegMrFn>,
    pub regMrDmaBuf: Option<RegMrDmaBufFn>,
    pub deregMr: Option<DeregMrFn>,
    pub isend: Option<IsendV10Fn>,
    pub irecv: Option<IrecvV10Fn>,
    pub iflush: Option<IflushFn>,
    pub test: Option<TestFn>,
    pub closeSend: Option<CloseFn>,
    pub closeRecv: Option<CloseFn>,
    pub closeListen: Option<CloseFn>,
    pub getDeviceMr: Option<GetDeviceMrFn>,
    pub irecvConsumed: Option<IrecvConsumedFn>,
    pub makeVDevice: Option<MakeVDeviceFn>,
    pub finalize: Option<unsafe extern "C" fn(ctx: P) -> R>,
    /// `ncclResult_t (*)(void* ctx, ncclNetAttr_v11_t*)`; we leave it NULL.
    pub setNetAttr: Option<unsafe extern "C" fn(ctx: P, attr: P) -> R>,
}

/// `ncclNet_v12_t`: v11's 22 slots (176 bytes) with v12 properties and
/// v12 virtual-NIC props.
#[repr(C)]
pub struct ncclNet_v12_t {
    pub name: *const c_char,
    pub init: Option<
        unsafe extern "C" fn(
            ctx: PP,
            comm_id: u64,
            cfg: *mut ncclNetCommConfig,
            log: ncclDebugLogger_t,
            prof: ncclProfilerCallback_t,
        ) -> R,
    >,
    pub devices: Option<DevicesFn>,
    pub getProperties:
        Option<unsafe extern "C" fn(dev: c_int, p: *mut ncclNetProperties_v12_t) -> R>,
    pub listen: Option<unsafe extern "C" fn(ctx: P, dev: c_int, handle: P, listen: PP) -> R>,
    pub connect:
        Option<unsafe extern "C" fn(ctx: P, dev: c_int, handle: P, send: PP, dc: DevH) -> R>,
    pub accept: Option<AcceptFn>,
    pub regMr: Option<RegMrFn>,
    pub regMrDmaBuf: Option<RegMrDmaBufFn>,
    pub deregMr: Option<DeregMrFn>,
    pub isend: Option<IsendV10Fn>,
    pub irecv: Option<IrecvV10Fn>,
    pub iflush: Option<IflushFn>,
    pub test: Option<TestFn>,
    pub closeSend: Option<CloseFn>,
    pub closeRecv: Option<CloseFn>,
    pub closeListen: Option<CloseFn>,
    pub getDeviceMr: Option<GetDeviceMrFn>,
    pub irecvConsumed: Option<IrecvConsumedFn>,
    pub makeVDevice: Option<MakeVDeviceV12Fn>,
    pub finalize: Option<unsafe extern "C" fn(ctx: P) -> R>,
    /// `ncclResult_t (*)(void* ctx, ncclNetAttr_v12_t*)`; we leave it NULL.
    pub setNetAttr: Option<unsafe extern "C" fn(ctx: P, attr: P) -> R>,
}

// SAFETY: the tables are immutable statics; `name` points at a 'static C
// string literal and the rest are function pointers, all safe to share.
unsafe impl Sync for ncclNet_v8_t {}
// SAFETY: as for ncclNet_v8_t.
unsafe impl Sync for ncclNet_v9_t {}
// SAFETY: as for ncclNet_v8_t.
unsafe impl Sync for ncclNet_v10_t {}
// SAFETY: as for ncclNet_v8_t.
unsafe impl Sync for ncclNet_v11_t {}
// SAFETY: as for ncclNet_v8_t.
unsafe impl Sync for ncclNet_v12_t {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn properties_layouts_match_nccls_headers() {
        assert_eq!(size_of::<ncclNetVDeviceProps>(), 20);
        assert_eq!(size_of::<ncclNetCommConfig>(), 4);

        type P8 = ncclNetProperties_v8_t;
        assert_eq!(size_of::<P8>(), 64);
        assert_eq!(offset_of!(P8, guid), 16);
        assert_eq!(offset_of!(P8, ptrSupport), 24);
        assert_eq!(offset_of!(P8, speed), 32);
        assert_eq!(offset_of!(P8, latency), 40);
        assert_eq!(offset_of!(P8, maxRecvs), 48);
        assert_eq!(offset_of!(P8, netDeviceVersion), 56);

        type P9 = ncclNetProperties_v9_t;
        assert_eq!(size_of::<P9>(), 104);
        assert_eq!(offset_of!(P9, forceFlush), 32);
        assert_eq!(offset_of!(P9, speed), 36);
        assert_eq!(offset_of!(P9, latency), 44);
        assert_eq!(offset_of!(P9, maxRecvs), 52);
        assert_eq!(offset_of!(P9, netDeviceVersion), 60);
        assert_eq!(offset_of!(P9, vProps), 64);
        assert_eq!(offset_of!(P9, maxP2pBytes), 88);
        assert_eq!(offset_of!(P9, maxCollBytes), 96);

        type P11 = ncclNetProperties_v11_t;
        assert_eq!(size_of::<P11>(), 112);
        assert_eq!(offset_of!(P11, vProps), 64);
        assert_eq!(offset_of!(P11, maxP2pBytes), 88);
        assert_eq!(offset_of!(P11, maxMultiRequestSize), 104);

        assert_eq!(size_of::<ncclNetVDeviceProps_v12>(), 36);
        type P12 = ncclNetProperties_v12_t;
        assert_eq!(size_of::<P12>(), 128);
        assert_eq!(offset_of!(P12, vProps), 64);
        assert_eq!(offset_of!(P12, maxP2pBytes), 104);
        assert_eq!(offset_of!(P12, maxCollBytes), 112);
        assert_eq!(offset_of!(P12, maxMultiRequestSize), 120);
        assert_eq!(offset_of!(P12, railId), 124);
        assert_eq!(offset_of!(P12, planeId), 126);
    }

    #[test]
    fn table_layouts_match_nccls_headers() {
        // Slot k (0 = name) sits at 8*k.
        assert_eq!(size_of::<ncclNet_v8_t>(), 19 * 8);
        assert_eq!(offset_of!(ncclNet_v8_t, isend), 10 * 8);
        assert_eq!(offset_of!(ncclNet_v8_t, test), 13 * 8);
        assert_eq!(offset_of!(ncclNet_v8_t, irecvConsumed), 18 * 8);

        assert_eq!(size_of::<ncclNet_v9_t>(), 20 * 8);
        assert_eq!(offset_of!(ncclNet_v9_t, makeVDevice), 19 * 8);

        assert_eq!(size_of::<ncclNet_v10_t>(), 20 * 8);
        assert_eq!(offset_of!(ncclNet_v10_t, connect), 5 * 8);
        assert_eq!(offset_of!(ncclNet_v10_t, irecv), 11 * 8);

        assert_eq!(size_of::<ncclNet_v11_t>(), 22 * 8);
        assert_eq!(offset_of!(ncclNet_v11_t, closeListen), 16 * 8);
        assert_eq!(offset_of!(ncclNet_v11_t, finalize), 20 * 8);
        assert_eq!(offset_of!(ncclNet_v11_t, setNetAttr), 21 * 8);

        assert_eq!(size_of::<ncclNet_v12_t>(), 22 * 8);
        assert_eq!(offset_of!(ncclNet_v12_t, getProperties), 3 * 8);
        assert_eq!(offset_of!(ncclNet_v12_t, makeVDevice), 19 * 8);
        assert_eq!(offset_of!(ncclNet_v12_t, finalize), 20 * 8);
    }
}
