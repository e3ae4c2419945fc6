//! The C boundary of tcpx-rs's three front ends (the C ABI in `tcpx::ffi`,
//! the NIXL plugin's `tnx_*` API, the NCCL net plugin): one way to run an
//! entry point, to say why it failed, and to read what the caller passed.
//!
//! - [`guard`] runs an entry that returns a status code: an error becomes the
//!   front end's code (its [`Boundary::code`] table) and a report, a panic
//!   becomes [`Boundary::PANIC`]. Nothing unwinds into C.
//! - [`catch`] does the same for entries that return no status.
//! - The pointer helpers ([`out`], [`obj`], [`put`], [`take`], [`cstr`],
//!   [`slice`], [`slice_mut`]) turn a NULL into an [`ArgError`]; each one's
//!   `# Safety` is what the entry's C contract has to promise.
//! - The calling thread's last failure ([`last_error`], [`last_error_cause`])
//!   is kept here, for the front ends that report through it.

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt::Display;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// One front end: its error type, its code table, where failures go.
pub trait Boundary {
    /// What the front end's entries fail with.
    type Error: Display;
    /// The code of a caught panic.
    const PANIC: c_int;
    /// The code of an error: the front end's one table.
    fn code(e: &Self::Error) -> c_int;
    /// A finer cause, kept beside the last error (0: none).
    fn cause(e: &Self::Error) -> c_int {
        let _ = e;
        0
    }
    /// Records the failure of `entry`. By default it becomes the calling
    /// thread's last error.
    fn report(entry: &str, msg: &str, cause: c_int) {
        let _ = entry;
        set_last_error(msg, cause);
    }
}

/// Why an argument from C is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ArgError {
    #[error("{0} is NULL")]
    Null(&'static str),
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("{what} is {value}, not in {min}..={max}")]
    OutOfRange {
        what: &'static str,
        value: i64,
        min: usize,
        max: usize,
    },
    #[error("buffer {addr:#x}+{len} lies outside its registered region {base:#x}+{region}; pass the memory handle of the region that holds it")]
    OutsideRegion {
        addr: usize,
        len: usize,
        base: usize,
        region: usize,
    },
}

/// Runs the entry `entry` of front end `B`: `Ok(code)` is returned as is,
/// an error is reported and becomes `B::code`, a panic becomes `B::PANIC`.
pub fn guard<B: Boundary>(entry: &str, f: impl FnOnce() -> Result<c_int, B::Error>) -> c_int {
    catch::<B, _>(entry, B::PANIC, || match f() {
        Ok(code) => code,
        Err(e) => {
            B::report(entry, &e.to_string(), B::cause(&e));
            B::code(&e)
        }
    })
}

/// Runs an entry that returns no status; a panic is reported and gives `on_panic`.
pub fn catch<B: Boundary, T>(entry: &str, on_panic: T, f: impl FnOnce() -> T) -> T {
    let r = catch_unwind(AssertUnwindSafe(|| {
        hook::fire();
        f()
    }));
    match r {
        Ok(v) => v,
        Err(payload) => {
            let msg = panic_message(entry, &*payload);
            // Dropping a payload runs foreign code that may panic again; a leaked box is cheaper.
            std::mem::forget(payload);
            let _ = catch_unwind(AssertUnwindSafe(|| B::report(entry, &msg, 0)));
            on_panic
        }
    }
}

fn panic_message(entry: &str, payload: &(dyn Any + Send)) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message");
    format!("internal error in {entry}: a panic ({what}) was caught at the C boundary; please report it")
}

struct Last {
    msg: CString,
    cause: c_int,
}

thread_local! {
    static LAST: RefCell<Last> = RefCell::new(Last { msg: CString::default(), cause: 0 });
}

fn set_last_error(msg: &str, cause: c_int) {
    let msg = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    // A thread being torn down has no last error to keep.
    let _ = LAST.try_with(|l| {
        if let Ok(mut l) = l.try_borrow_mut() {
            *l = Last { msg, cause };
        }
    });
}

/// The message of the calling thread's last failure ("" if none); valid
/// until the next failure on this thread.
pub fn last_error() -> *const c_char {
    LAST.try_with(|l| l.try_borrow().map(|l| l.msg.as_ptr()).ok())
        .ok()
        .flatten()
        .unwrap_or(c"".as_ptr())
}

/// The calling thread's last failure message, owned (for tests).
#[cfg(any(test, feature = "test-hooks"))]
pub fn last_error_message() -> String {
    // SAFETY: last_error returns a NUL-terminated string valid until the next failure here.
    unsafe { CStr::from_ptr(last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// The [`Boundary::cause`] of the calling thread's last failure (0 if none).
pub fn last_error_cause() -> c_int {
    LAST.try_with(|l| l.try_borrow().map(|l| l.cause).unwrap_or(0))
        .unwrap_or(0)
}

/// `*p`, writable.
///
/// # Safety
/// `p` is NULL or valid for reads and writes of a `T`, and nothing else
/// accesses that `T` during `'a`.
pub unsafe fn out<'a, T>(p: *mut T, what: &'static str) -> Result<&'a mut T, ArgError> {
    // SAFETY: NULL or valid and unaliased (the caller's contract).
    unsafe { p.as_mut() }.ok_or(ArgError::Null(what))
}

/// `*p`, shared.
///
/// # Safety
/// `p` is NULL or valid for reads of a `T` that nothing mutates during `'a`.
pub unsafe fn obj<'a, T>(p: *const T, what: &'static str) -> Result<&'a T, ArgError> {
    // SAFETY: NULL or valid and not mutated (the caller's contract).
    unsafe { p.as_ref() }.ok_or(ArgError::Null(what))
}

/// Writes `v`, boxed, to `*slot` (NULL for `None`); the C caller owns the
/// box until it hands it back to [`take`].
///
/// # Safety
/// As [`out`] for `slot`.
pub unsafe fn put<T>(slot: *mut *mut T, v: Option<T>) -> Result<(), ArgError> {
    // SAFETY: the caller's contract, as for out.
    let slot = unsafe { out(slot, "output pointer") }?;
    *slot = v.map_or(std::ptr::null_mut(), |v| Box::into_raw(Box::new(v)));
    Ok(())
}

/// Takes back a box [`put`] handed out; `None` for NULL.
///
/// # Safety
/// `p` is NULL or came from [`put`] with this `T`, and is not used again.
pub unsafe fn take<T>(p: *mut T) -> Option<Box<T>> {
    // SAFETY: from Box::into_raw in put, taken back once (the caller's contract).
    (!p.is_null()).then(|| unsafe { Box::from_raw(p) })
}

/// A NUL-terminated UTF-8 string.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that lives and stays
/// unchanged during `'a`.
pub unsafe fn cstr<'a>(p: *const c_char, what: &'static str) -> Result<&'a str, ArgError> {
    if p.is_null() {
        return Err(ArgError::Null(what));
    }
    // SAFETY: non-null and NUL-terminated (the caller's contract).
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| ArgError::NotUtf8(what))
}

/// The `n` elements at `p` (none when `n` is 0, whatever `p`).
///
/// # Safety
/// When `n` > 0, `p` is NULL or valid for reads of `n` `T`s that nothing
/// mutates during `'a`.
pub unsafe fn slice<'a, T>(p: *const T, n: usize, what: &'static str) -> Result<&'a [T], ArgError> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(ArgError::Null(what));
    }
    // SAFETY: non-null and valid for n elements (the caller's contract).
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// The `n` elements at `p`, writable.
///
/// # Safety
/// When `n` > 0, `p` is NULL or valid for reads and writes of `n` `T`s that
/// nothing else accesses during `'a`.
pub unsafe fn slice_mut<'a, T>(
    p: *mut T,
    n: usize,
    what: &'static str,
) -> Result<&'a mut [T], ArgError> {
    if n == 0 {
        return Ok(&mut []);
    }
    if p.is_null() {
        return Err(ArgError::Null(what));
    }
    // SAFETY: non-null, valid and unaliased for n elements (the caller's contract).
    Ok(unsafe { std::slice::from_raw_parts_mut(p, n) })
}

/// A C `int` index (a device number): any value but a negative one.
pub fn index(v: c_int, what: &'static str) -> Result<usize, ArgError> {
    count(v, 0..=c_int::MAX as usize, what)
}

/// A C `int` count that must lie in `range`.
pub fn count(
    n: c_int,
    range: std::ops::RangeInclusive<usize>,
    what: &'static str,
) -> Result<usize, ArgError> {
    usize::try_from(n)
        .ok()
        .filter(|n| range.contains(n))
        .ok_or(ArgError::OutOfRange {
            what,
            value: i64::from(n),
            min: *range.start(),
            max: *range.end(),
        })
}

/// The offset of `data..data+len` in the region `base..base+region`.
pub fn offset_in(
    base: usize,
    region: usize,
    data: *const c_void,
    len: usize,
) -> Result<usize, ArgError> {
    let addr = data as usize;
    match addr.checked_sub(base) {
        Some(o) if o.checked_add(len).is_some_and(|e| e <= region) => Ok(o),
        _ => Err(ArgError::OutsideRegion {
            addr,
            len,
            base,
            region,
        }),
    }
}

/// Makes the next [`guard`] or [`catch`] on this thread panic inside the
/// entry, as a bug would: for tests proving a front end turns it into a code.
#[cfg(feature = "test-hooks")]
pub fn panic_in_next_guard() {
    hook::ARMED.set(true);
}

#[cfg(feature = "test-hooks")]
mod hook {
    use std::cell::Cell;

    thread_local! {
        pub static ARMED: Cell<bool> = const { Cell::new(false) };
    }

    pub fn fire() {
        if ARMED.replace(false) {
            panic!("injected by ffiguard::panic_in_next_guard");
        }
    }
}

#[cfg(not(feature = "test-hooks"))]
mod hook {
    #[inline(always)]
    pub fn fire() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    struct T;
    impl Boundary for T {
        type Error = String;
        const PANIC: c_int = -99;
        fn code(e: &String) -> c_int {
            e.len() as c_int
        }
        fn cause(_: &String) -> c_int {
            7
        }
    }

    use last_error_message as last;

    #[test]
    fn errors_become_their_code_and_the_last_error() {
        assert_eq!(guard::<T>("e", || Ok(3)), 3);
        assert_eq!(guard::<T>("e", || Err("four".into())), 4);
        assert_eq!(last(), "four");
        assert_eq!(last_error_cause(), 7);
    }

    #[test]
    fn a_panic_becomes_the_panic_code_and_names_the_entry() {
        assert_eq!(guard::<T>("tcpx_x", || panic!("boom")), -99);
        assert!(
            last().contains("tcpx_x") && last().contains("boom"),
            "{}",
            last()
        );
        assert_eq!(last_error_cause(), 0);
        assert_eq!(catch::<T, _>("y", 5usize, || panic!("again")), 5);
        assert!(last().contains("again"));
    }

    #[test]
    fn nul_in_a_message_does_not_lose_it() {
        guard::<T>("e", || Err("a\0b".into()));
        assert_eq!(last(), "a b");
    }

    #[test]
    fn null_pointers_are_argument_errors() {
        // SAFETY: NULL is within every helper's contract.
        unsafe {
            assert_eq!(
                out::<u8>(std::ptr::null_mut(), "x"),
                Err(ArgError::Null("x"))
            );
            assert_eq!(
                obj::<u8>(std::ptr::null(), "y").err(),
                Some(ArgError::Null("y"))
            );
            assert_eq!(
                put::<u8>(std::ptr::null_mut(), None),
                Err(ArgError::Null("output pointer"))
            );
            assert!(take::<u8>(std::ptr::null_mut()).is_none());
            assert_eq!(cstr(std::ptr::null(), "s"), Err(ArgError::Null("s")));
            assert_eq!(slice::<u8>(std::ptr::null(), 0, "a"), Ok(&[][..]));
            assert_eq!(
                slice::<u8>(std::ptr::null(), 1, "a"),
                Err(ArgError::Null("a"))
            );
            assert_eq!(
                slice_mut::<u8>(std::ptr::null_mut(), 2, "b"),
                Err(ArgError::Null("b"))
            );
        }
    }

    #[test]
    fn put_and_take_hand_a_box_over_and_back() {
        let mut slot: *mut u32 = std::ptr::null_mut();
        // SAFETY: slot is a valid out pointer; take gets put's box once.
        unsafe {
            put(&mut slot, Some(41)).unwrap();
            assert_eq!(take(slot).map(|b| *b), Some(41));
            put::<u32>(&mut slot, None).unwrap();
        }
        assert!(slot.is_null());
    }

    #[test]
    fn strings_must_be_utf8() {
        // SAFETY: NUL-terminated literals.
        unsafe {
            assert_eq!(cstr(c"ok".as_ptr(), "s"), Ok("ok"));
            assert_eq!(cstr(c"\xff".as_ptr(), "s"), Err(ArgError::NotUtf8("s")));
        }
    }

    #[test]
    fn counts_and_indexes_are_checked() {
        assert_eq!(index(3, "dev"), Ok(3));
        assert!(index(-1, "dev")
            .unwrap_err()
            .to_string()
            .contains("dev is -1"));
        assert_eq!(count(8, 1..=8, "n"), Ok(8));
        assert!(count(0, 1..=8, "n").is_err());
        assert!(count(9, 1..=8, "n").is_err());
    }

    #[test]
    fn offsets_inside_the_region_only() {
        let p = |a: usize| a as *const c_void;
        assert_eq!(offset_in(100, 50, p(100), 50), Ok(0));
        assert_eq!(offset_in(100, 50, p(120), 30), Ok(20));
        assert!(offset_in(100, 50, p(120), 31).is_err());
        assert!(offset_in(100, 50, p(99), 1).is_err());
        assert!(offset_in(100, 50, p(usize::MAX), 2).is_err());
    }

    #[cfg(feature = "test-hooks")]
    #[test]
    fn the_hook_panics_in_the_next_guard_only() {
        panic_in_next_guard();
        assert_eq!(guard::<T>("hooked", || Ok(0)), -99);
        assert!(last().contains("hooked"));
        assert_eq!(guard::<T>("hooked", || Ok(0)), 0);
    }
}
