//! A PKCS#11 module shaped like a network HSM, for tests and benchmarks: it
//! loads SoftHSM2 and forwards every call to it after a fixed delay, so the
//! daemon meets a token whose every call is a round trip (0.2–2 ms on a
//! network HSM) while the calls of different sessions still run in
//! parallel. The delay is a sleep taken before the call and outside any
//! lock, so SoftHSM2's own lock (held only for the few microseconds of the
//! real work) is not what limits a run of many sessions.
//!
//! Configured from the environment of the process that loads it (read once,
//! at the first call):
//!
//! - `KEYHAVEN_SLOW_TOKEN_DELAY`: the delay per call, e.g. `1ms`, `250us`,
//!   `0` (default `1ms`);
//! - `KEYHAVEN_SLOW_TOKEN_PER`: `call` (default: every call waits) or
//!   `operation` (one wait per token operation: `C_*Init` calls and output
//!   length queries, an output pointer of NULL, are not charged, as a
//!   network HSM's client library that sends the init along with the data
//!   call and knows the output lengths would do);
//! - `KEYHAVEN_SLOW_TOKEN_MAX_SESSIONS`: a session limit like a real HSM's:
//!   reported as `ulMaxSessionCount` and `ulMaxRwSessionCount` by
//!   `C_GetTokenInfo`, and `C_OpenSession` past it is `CKR_SESSION_COUNT`
//!   (default: SoftHSM2's own, no limit);
//! - `KEYHAVEN_SLOW_TOKEN_MAX_OBJECTS`: room for objects like a real HSM's:
//!   once this many objects made through this module (`C_UnwrapKey`,
//!   `C_GenerateKey`, `C_CreateObject`) are alive, another is
//!   `CKR_DEVICE_MEMORY`; a destroyed object and a closed session's objects
//!   give their room back (default: no limit);
//! - `KEYHAVEN_SLOW_TOKEN_MODULE`: the module to forward to (default:
//!   SoftHSM2 where Debian and other distributions put it).
//!
//! A bad setting makes `C_Initialize` fail with `CKR_GENERAL_ERROR` and one
//! line on standard error naming it.

#![allow(non_snake_case)]

use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use cryptoki_sys::*;

/// Where SoftHSM2's module is on common distributions.
const SOFTHSM_MODULES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

/// What the environment asked for.
struct Settings {
    delay: Duration,
    per_operation: bool,
    max_sessions: Option<CK_ULONG>,
    max_objects: Option<usize>,
}

/// The module calls are forwarded to, loaded once and never unloaded.
struct Real {
    list: &'static CK_FUNCTION_LIST,
    settings: Settings,
}

// SAFETY: `list` points to the forwarded module's function table, which
// PKCS#11 modules keep as static, read-only data for as long as they are
// loaded (here: for the life of the process, see `load`); function
// pointers and plain settings are safe to share between threads.
unsafe impl Sync for Real {}
// SAFETY: as for `Sync`: nothing in `Real` is tied to a thread.
unsafe impl Send for Real {}

static REAL: OnceLock<Result<Real, String>> = OnceLock::new();

/// Sessions open through this module (for `KEYHAVEN_SLOW_TOKEN_MAX_SESSIONS`).
static OPEN_SESSIONS: AtomicUsize = AtomicUsize::new(0);

/// The live objects made through this module, by the session that made
/// them (for `KEYHAVEN_SLOW_TOKEN_MAX_OBJECTS`).
static OBJECTS: Mutex<Option<HashMap<CK_SESSION_HANDLE, HashSet<CK_OBJECT_HANDLE>>>> = Mutex::new(None);

/// Runs `make` (a call that makes one object into `*handle`) unless the
/// object limit is reached (`CKR_DEVICE_MEMORY`), and counts what it made.
fn making(
    real: &Real,
    session: CK_SESSION_HANDLE,
    handle: *mut CK_OBJECT_HANDLE,
    make: impl FnOnce() -> CK_RV,
) -> CK_RV {
    let Some(max) = real.settings.max_objects else { return make() };
    // Held across the call, so that two sessions cannot both take the last room.
    let mut objects = OBJECTS.lock().unwrap_or_else(|e| e.into_inner());
    let table = objects.get_or_insert_with(HashMap::new);
    if table.values().map(HashSet::len).sum::<usize>() >= max {
        return CKR_DEVICE_MEMORY;
    }
    let rv = make();
    if rv == CKR_OK && !handle.is_null() {
        // SAFETY: `handle` is the caller's output pointer, non-null, which
        // the real module has just filled in with the new object's handle.
        let made = unsafe { *handle };
        table.entry(session).or_default().insert(made);
    }
    rv
}

/// Gives back the room of `object` (destroyed), or of every object of
/// `session` (closed), or of all (`None`, `None`: every session closed).
fn unmade(session: Option<CK_SESSION_HANDLE>, object: Option<CK_OBJECT_HANDLE>) {
    let mut objects = OBJECTS.lock().unwrap_or_else(|e| e.into_inner());
    let Some(table) = objects.as_mut() else { return };
    match (session, object) {
        (_, Some(o)) => table.values_mut().for_each(|set| {
            set.remove(&o);
        }),
        (Some(s), None) => {
            table.remove(&s);
        }
        (None, None) => table.clear(),
    }
}

/// Parses `1ms`, `250us`, `1.5ms`, `2s`, `500ns`, `0`.
fn parse_delay(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale = match unit.trim() {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        _ => return Err(format!("{text:?} is not a delay: write it as e.g. 1ms, 250us or 0")),
    };
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a delay: the number is missing"))?;
    let secs = value * scale;
    if !(0.0..=60.0).contains(&secs) {
        return Err(format!("{text:?} is out of range (0 to 60 s)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn settings() -> Result<Settings, String> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let delay = match var("KEYHAVEN_SLOW_TOKEN_DELAY") {
        Some(v) => parse_delay(&v).map_err(|e| format!("KEYHAVEN_SLOW_TOKEN_DELAY: {e}"))?,
        None => Duration::from_millis(1),
    };
    let per_operation = match var("KEYHAVEN_SLOW_TOKEN_PER").as_deref().map(str::trim) {
        None | Some("call") => false,
        Some("operation") => true,
        Some(other) => {
            return Err(format!("KEYHAVEN_SLOW_TOKEN_PER: {other:?} is neither `call` nor `operation`"))
        }
    };
    let max_sessions = match var("KEYHAVEN_SLOW_TOKEN_MAX_SESSIONS") {
        Some(v) => match v.trim().parse::<CK_ULONG>() {
            Ok(n) if n > 0 => Some(n),
            _ => return Err(format!("KEYHAVEN_SLOW_TOKEN_MAX_SESSIONS: {v:?} is not a number above 0")),
        },
        None => None,
    };
    let max_objects = match var("KEYHAVEN_SLOW_TOKEN_MAX_OBJECTS") {
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Some(n),
            _ => return Err(format!("KEYHAVEN_SLOW_TOKEN_MAX_OBJECTS: {v:?} is not a number above 0")),
        },
        None => None,
    };
    Ok(Settings { delay, per_operation, max_sessions, max_objects })
}

fn load() -> Result<Real, String> {
    let settings = settings()?;
    let path = match std::env::var("KEYHAVEN_SLOW_TOKEN_MODULE") {
        Ok(p) if !p.trim().is_empty() => p,
        _ => {
            SOFTHSM_MODULES.iter().find(|p| std::path::Path::new(p).exists()).map(|p| (*p).to_owned()).ok_or(
                "SoftHSM2 is not installed; set KEYHAVEN_SLOW_TOKEN_MODULE to the module to forward to",
            )?
        }
    };
    // SAFETY: loading a PKCS#11 module runs its initialisers; the module is
    // the one the operator named (or SoftHSM2), which is what this test
    // token exists to run.
    let library =
        unsafe { libloading::Library::new(&path) }.map_err(|e| format!("cannot load {path}: {e}"))?;
    // SAFETY: `C_GetFunctionList` has this signature in every PKCS#11 module.
    let get: libloading::Symbol<unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV> =
        unsafe { library.get(b"C_GetFunctionList\0") }
            .map_err(|e| format!("{path} has no C_GetFunctionList: {e}"))?;
    let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
    // SAFETY: `list` is a valid place for the module to write its table's address.
    let rv = unsafe { get(&mut list) };
    if rv != CKR_OK || list.is_null() {
        return Err(format!("C_GetFunctionList of {path} failed ({rv:#x})"));
    }
    // The library stays loaded for the life of the process, so the table
    // stays valid: PKCS#11 gives no way to say when the last caller is done.
    std::mem::forget(library);
    // SAFETY: non-null, and valid for as long as the module is loaded
    // (forever, just above); PKCS#11 callers never write to it.
    let list: &'static CK_FUNCTION_LIST = unsafe { &*list };
    Ok(Real { list, settings })
}

fn real() -> Result<&'static Real, CK_RV> {
    match REAL.get_or_init(load) {
        Ok(r) => Ok(r),
        Err(_) => Err(CKR_GENERAL_ERROR),
    }
}

/// The round trip: sleeps for the delay (on the calling thread, holding no
/// lock) unless the call is free in `operation` mode.
fn round_trip(real: &Real, free: bool) {
    if real.settings.delay.is_zero() || (real.settings.per_operation && free) {
        return;
    }
    exact_sleeps();
    std::thread::sleep(real.settings.delay);
}

thread_local! {
    static EXACT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Sets the calling thread's timer slack to 1 ns, once: Linux lets a
/// sleep of a normal thread end up to 50 µs late by default, which would
/// make a 1 ms token a 1.05 ms one.
fn exact_sleeps() {
    if EXACT.with(|done| done.replace(true)) {
        return;
    }
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and changes only
    // the calling thread's timer slack; no memory is passed.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
}

/// Defines one forwarding function per entry: the round trip, then the
/// same call on the real module. `free` marks calls not charged in
/// `operation` mode (an init, or an output length query).
macro_rules! forward {
    ($($name:ident ( $($arg:ident : $ty:ty),* ) $(free $free:expr)? ;)*) => {
        $(
            unsafe extern "C" fn $name($($arg: $ty),*) -> CK_RV {
                let real = match real() {
                    Ok(r) => r,
                    Err(rv) => return rv,
                };
                let Some(f) = real.list.$name else { return CKR_FUNCTION_NOT_SUPPORTED };
                #[allow(unused_mut, unused_assignments)]
                let mut free = false;
                $( free = $free; )?
                round_trip(real, free);
                // SAFETY: the caller's arguments are passed on unchanged to
                // the same function of the real module, which has the same
                // contract (PKCS#11): whatever the caller promised us, the
                // real module is promised.
                unsafe { f($($arg),*) }
            }
        )*
    };
}

forward! {
    C_Finalize(a1: *mut c_void);
    C_GetSlotList(a1: CK_BBOOL, a2: *mut CK_SLOT_ID, a3: *mut CK_ULONG);
    C_GetSlotInfo(a1: CK_SLOT_ID, a2: *mut CK_SLOT_INFO);
    C_GetMechanismList(a1: CK_SLOT_ID, a2: *mut CK_MECHANISM_TYPE, a3: *mut CK_ULONG);
    C_GetMechanismInfo(a1: CK_SLOT_ID, a2: CK_MECHANISM_TYPE, a3: *mut CK_MECHANISM_INFO);
    C_InitToken(a1: CK_SLOT_ID, a2: *mut CK_UTF8CHAR, a3: CK_ULONG, a4: *mut CK_UTF8CHAR);
    C_InitPIN(a1: CK_SESSION_HANDLE, a2: *mut CK_UTF8CHAR, a3: CK_ULONG);
    C_SetPIN(a1: CK_SESSION_HANDLE, a2: *mut CK_UTF8CHAR, a3: CK_ULONG, a4: *mut CK_UTF8CHAR, a5: CK_ULONG);
    C_GetSessionInfo(a1: CK_SESSION_HANDLE, a2: *mut CK_SESSION_INFO);
    C_GetOperationState(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: *mut CK_ULONG) free a2.is_null();
    C_SetOperationState(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: CK_OBJECT_HANDLE, a5: CK_OBJECT_HANDLE);
    C_Login(a1: CK_SESSION_HANDLE, a2: CK_USER_TYPE, a3: *mut CK_UTF8CHAR, a4: CK_ULONG);
    C_Logout(a1: CK_SESSION_HANDLE);
    C_CopyObject(a1: CK_SESSION_HANDLE, a2: CK_OBJECT_HANDLE, a3: *mut CK_ATTRIBUTE, a4: CK_ULONG, a5: *mut CK_OBJECT_HANDLE);
    C_GetObjectSize(a1: CK_SESSION_HANDLE, a2: CK_OBJECT_HANDLE, a3: *mut CK_ULONG);
    C_GetAttributeValue(a1: CK_SESSION_HANDLE, a2: CK_OBJECT_HANDLE, a3: *mut CK_ATTRIBUTE, a4: CK_ULONG);
    C_SetAttributeValue(a1: CK_SESSION_HANDLE, a2: CK_OBJECT_HANDLE, a3: *mut CK_ATTRIBUTE, a4: CK_ULONG);
    C_FindObjectsInit(a1: CK_SESSION_HANDLE, a2: *mut CK_ATTRIBUTE, a3: CK_ULONG) free true;
    C_FindObjects(a1: CK_SESSION_HANDLE, a2: *mut CK_OBJECT_HANDLE, a3: CK_ULONG, a4: *mut CK_ULONG);
    C_FindObjectsFinal(a1: CK_SESSION_HANDLE) free true;
    C_EncryptInit(a1: CK_SESSION_HANDLE, a2: *mut CK_MECHANISM, a3: CK_OBJECT_HANDLE) free true;
    C_Encrypt(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG) free a4.is_null();
    C_EncryptUpdate(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG) free a4.is_null();
    C_EncryptFinal(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: *mut CK_ULONG) free a2.is_null();
    C_DecryptInit(a1: CK_SESSION_HANDLE, a2: *mut CK_MECHANISM, a3: CK_OBJECT_HANDLE) free true;
    C_Decrypt(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG) free a4.is_null();
    C_DecryptUpdate(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG) free a4.is_null();
    C_DecryptFinal(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: *mut CK_ULONG) free a2.is_null();
    C_DigestInit(a1: CK_SESSION_HANDLE, a2: *mut CK_MECHANISM) free true;
    C_Digest(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG) free a4.is_null();
    C_DigestUpdate(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG);
    C_DigestKey(a1: CK_SESSION_HANDLE, a2: CK_OBJECT_HANDLE);
    C_DigestFinal(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: *mut CK_ULONG) free a2.is_null();
    C_SignInit(a1: CK_SESSION_HANDLE, a2: *mut CK_MECHANISM, a3: CK_OBJECT_HANDLE) free true;
    C_Sign(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG) free a4.is_null();
    C_SignUpdate(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG);
    C_SignFinal(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: *mut CK_ULONG) free a2.is_null();
    C_SignRecoverInit(a1: CK_SESSION_HANDLE, a2: *mut CK_MECHANISM, a3: CK_OBJECT_HANDLE) free true;
    C_SignRecover(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG) free a4.is_null();
    C_VerifyInit(a1: CK_SESSION_HANDLE, a2: *mut CK_MECHANISM, a3: CK_OBJECT_HANDLE) free true;
    C_Verify(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: CK_ULONG);
    C_VerifyUpdate(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG);
    C_VerifyFinal(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG);
    C_VerifyRecoverInit(a1: CK_SESSION_HANDLE, a2: *mut CK_MECHANISM, a3: CK_OBJECT_HANDLE) free true;
    C_VerifyRecover(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG) free a4.is_null();
    C_DigestEncryptUpdate(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG) free a4.is_null();
    C_DecryptDigestUpdate(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG) free a4.is_null();
    C_SignEncryptUpdate(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG) free a4.is_null();
    C_DecryptVerifyUpdate(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG, a4: *mut CK_BYTE, a5: *mut CK_ULONG) free a4.is_null();
    C_GenerateKeyPair(a1: CK_SESSION_HANDLE, a2: *mut CK_MECHANISM, a3: *mut CK_ATTRIBUTE, a4: CK_ULONG, a5: *mut CK_ATTRIBUTE, a6: CK_ULONG, a7: *mut CK_OBJECT_HANDLE, a8: *mut CK_OBJECT_HANDLE);
    C_WrapKey(a1: CK_SESSION_HANDLE, a2: *mut CK_MECHANISM, a3: CK_OBJECT_HANDLE, a4: CK_OBJECT_HANDLE, a5: *mut CK_BYTE, a6: *mut CK_ULONG) free a5.is_null();
    C_DeriveKey(a1: CK_SESSION_HANDLE, a2: *mut CK_MECHANISM, a3: CK_OBJECT_HANDLE, a4: *mut CK_ATTRIBUTE, a5: CK_ULONG, a6: *mut CK_OBJECT_HANDLE);
    C_SeedRandom(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG);
    C_GenerateRandom(a1: CK_SESSION_HANDLE, a2: *mut CK_BYTE, a3: CK_ULONG);
    C_GetFunctionStatus(a1: CK_SESSION_HANDLE);
    C_CancelFunction(a1: CK_SESSION_HANDLE);
    C_WaitForSlotEvent(a1: CK_FLAGS, a2: *mut CK_SLOT_ID, a3: *mut c_void) free true;
}

/// Makes an object on the real module, within `KEYHAVEN_SLOW_TOKEN_MAX_OBJECTS`.
unsafe extern "C" fn C_CreateObject(
    session: CK_SESSION_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    object: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    let real = match real() {
        Ok(r) => r,
        Err(rv) => return rv,
    };
    let Some(f) = real.list.C_CreateObject else { return CKR_FUNCTION_NOT_SUPPORTED };
    round_trip(real, false);
    // SAFETY: the caller's arguments, passed on unchanged (PKCS#11 contract).
    making(real, session, object, || unsafe { f(session, template, count, object) })
}

/// Generates a key on the real module, within `KEYHAVEN_SLOW_TOKEN_MAX_OBJECTS`.
unsafe extern "C" fn C_GenerateKey(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    let real = match real() {
        Ok(r) => r,
        Err(rv) => return rv,
    };
    let Some(f) = real.list.C_GenerateKey else { return CKR_FUNCTION_NOT_SUPPORTED };
    round_trip(real, false);
    // SAFETY: the caller's arguments, passed on unchanged (PKCS#11 contract).
    making(real, session, key, || unsafe { f(session, mechanism, template, count, key) })
}

/// Unwraps a key on the real module, within `KEYHAVEN_SLOW_TOKEN_MAX_OBJECTS`.
unsafe extern "C" fn C_UnwrapKey(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    unwrapping_key: CK_OBJECT_HANDLE,
    wrapped: *mut CK_BYTE,
    wrapped_len: CK_ULONG,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    let real = match real() {
        Ok(r) => r,
        Err(rv) => return rv,
    };
    let Some(f) = real.list.C_UnwrapKey else { return CKR_FUNCTION_NOT_SUPPORTED };
    round_trip(real, false);
    making(real, session, key, || {
        // SAFETY: the caller's arguments, passed on unchanged (PKCS#11 contract).
        unsafe { f(session, mechanism, unwrapping_key, wrapped, wrapped_len, template, count, key) }
    })
}

/// Destroys an object on the real module and gives its room back.
unsafe extern "C" fn C_DestroyObject(session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> CK_RV {
    let real = match real() {
        Ok(r) => r,
        Err(rv) => return rv,
    };
    let Some(f) = real.list.C_DestroyObject else { return CKR_FUNCTION_NOT_SUPPORTED };
    round_trip(real, false);
    // SAFETY: the caller's arguments, passed on unchanged (PKCS#11 contract).
    let rv = unsafe { f(session, object) };
    if rv == CKR_OK {
        unmade(None, Some(object));
    }
    rv
}

/// Loads the real module (reporting a bad setting once, on standard
/// error), then initialises it with the caller's arguments.
unsafe extern "C" fn C_Initialize(args: *mut c_void) -> CK_RV {
    if let Err(e) = REAL.get_or_init(load) {
        eprintln!("keyhaven-slow-token: {e}");
        return CKR_GENERAL_ERROR;
    }
    let real = match real() {
        Ok(r) => r,
        Err(rv) => return rv,
    };
    let Some(f) = real.list.C_Initialize else { return CKR_FUNCTION_NOT_SUPPORTED };
    round_trip(real, false);
    // SAFETY: the caller's arguments, passed on unchanged (PKCS#11 contract).
    unsafe { f(args) }
}

/// Says which module this is: the library description is the slow token's.
unsafe extern "C" fn C_GetInfo(info: *mut CK_INFO) -> CK_RV {
    let real = match real() {
        Ok(r) => r,
        Err(rv) => return rv,
    };
    let Some(f) = real.list.C_GetInfo else { return CKR_FUNCTION_NOT_SUPPORTED };
    round_trip(real, false);
    // SAFETY: the caller's argument, passed on unchanged (PKCS#11 contract).
    let rv = unsafe { f(info) };
    if rv == CKR_OK && !info.is_null() {
        let mut description = [b' '; 32];
        let text = b"Keyhaven slow token (SoftHSM2)";
        description[..text.len()].copy_from_slice(text);
        // SAFETY: `info` is the caller's CK_INFO, non-null and just filled in
        // by the real module.
        unsafe { (*info).libraryDescription = description };
    }
    rv
}

/// The real token's information, with the session limit in force here.
unsafe extern "C" fn C_GetTokenInfo(slot: CK_SLOT_ID, info: *mut CK_TOKEN_INFO) -> CK_RV {
    let real = match real() {
        Ok(r) => r,
        Err(rv) => return rv,
    };
    let Some(f) = real.list.C_GetTokenInfo else { return CKR_FUNCTION_NOT_SUPPORTED };
    round_trip(real, false);
    // SAFETY: the caller's arguments, passed on unchanged (PKCS#11 contract).
    let rv = unsafe { f(slot, info) };
    if let (CKR_OK, Some(max), false) = (rv, real.settings.max_sessions, info.is_null()) {
        // SAFETY: `info` is the caller's CK_TOKEN_INFO, non-null and just
        // filled in by the real module.
        unsafe {
            (*info).ulMaxSessionCount = max;
            (*info).ulMaxRwSessionCount = max;
        }
    }
    rv
}

/// Opens a session on the real module, unless the session limit is reached.
unsafe extern "C" fn C_OpenSession(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    application: *mut c_void,
    notify: CK_NOTIFY,
    session: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    let real = match real() {
        Ok(r) => r,
        Err(rv) => return rv,
    };
    let Some(f) = real.list.C_OpenSession else { return CKR_FUNCTION_NOT_SUPPORTED };
    round_trip(real, false);
    if let Some(max) = real.settings.max_sessions {
        let taken = OPEN_SESSIONS
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| ((n as CK_ULONG) < max).then_some(n + 1));
        if taken.is_err() {
            return CKR_SESSION_COUNT;
        }
    } else {
        OPEN_SESSIONS.fetch_add(1, Ordering::SeqCst);
    }
    // SAFETY: the caller's arguments, passed on unchanged (PKCS#11 contract).
    let rv = unsafe { f(slot, flags, application, notify, session) };
    if rv != CKR_OK {
        OPEN_SESSIONS.fetch_sub(1, Ordering::SeqCst);
    }
    rv
}

/// Closes a session on the real module.
unsafe extern "C" fn C_CloseSession(session: CK_SESSION_HANDLE) -> CK_RV {
    let real = match real() {
        Ok(r) => r,
        Err(rv) => return rv,
    };
    let Some(f) = real.list.C_CloseSession else { return CKR_FUNCTION_NOT_SUPPORTED };
    round_trip(real, false);
    // SAFETY: the caller's argument, passed on unchanged (PKCS#11 contract).
    let rv = unsafe { f(session) };
    if rv == CKR_OK {
        unmade(Some(session), None);
        let _ = OPEN_SESSIONS.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }
    rv
}

/// Closes every session of a slot on the real module.
unsafe extern "C" fn C_CloseAllSessions(slot: CK_SLOT_ID) -> CK_RV {
    let real = match real() {
        Ok(r) => r,
        Err(rv) => return rv,
    };
    let Some(f) = real.list.C_CloseAllSessions else { return CKR_FUNCTION_NOT_SUPPORTED };
    round_trip(real, false);
    // SAFETY: the caller's argument, passed on unchanged (PKCS#11 contract).
    let rv = unsafe { f(slot) };
    if rv == CKR_OK {
        unmade(None, None);
        OPEN_SESSIONS.store(0, Ordering::SeqCst);
    }
    rv
}

/// This module's function table: every entry is a forwarding function above.
static FUNCTIONS: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
    version: CK_VERSION { major: 2, minor: 40 },
    C_Initialize: Some(C_Initialize),
    C_Finalize: Some(C_Finalize),
    C_GetInfo: Some(C_GetInfo),
    C_GetFunctionList: Some(C_GetFunctionList),
    C_GetSlotList: Some(C_GetSlotList),
    C_GetSlotInfo: Some(C_GetSlotInfo),
    C_GetTokenInfo: Some(C_GetTokenInfo),
    C_GetMechanismList: Some(C_GetMechanismList),
    C_GetMechanismInfo: Some(C_GetMechanismInfo),
    C_InitToken: Some(C_InitToken),
    C_InitPIN: Some(C_InitPIN),
    C_SetPIN: Some(C_SetPIN),
    C_OpenSession: Some(C_OpenSession),
    C_CloseSession: Some(C_CloseSession),
    C_CloseAllSessions: Some(C_CloseAllSessions),
    C_GetSessionInfo: Some(C_GetSessionInfo),
    C_GetOperationState: Some(C_GetOperationState),
    C_SetOperationState: Some(C_SetOperationState),
    C_Login: Some(C_Login),
    C_Logout: Some(C_Logout),
    C_CreateObject: Some(C_CreateObject),
    C_CopyObject: Some(C_CopyObject),
    C_DestroyObject: Some(C_DestroyObject),
    C_GetObjectSize: Some(C_GetObjectSize),
    C_GetAttributeValue: Some(C_GetAttributeValue),
    C_SetAttributeValue: Some(C_SetAttributeValue),
    C_FindObjectsInit: Some(C_FindObjectsInit),
    C_FindObjects: Some(C_FindObjects),
    C_FindObjectsFinal: Some(C_FindObjectsFinal),
    C_EncryptInit: Some(C_EncryptInit),
    C_Encrypt: Some(C_Encrypt),
    C_EncryptUpdate: Some(C_EncryptUpdate),
    C_EncryptFinal: Some(C_EncryptFinal),
    C_DecryptInit: Some(C_DecryptInit),
    C_Decrypt: Some(C_Decrypt),
    C_DecryptUpdate: Some(C_DecryptUpdate),
    C_DecryptFinal: Some(C_DecryptFinal),
    C_DigestInit: Some(C_DigestInit),
    C_Digest: Some(C_Digest),
    C_DigestUpdate: Some(C_DigestUpdate),
    C_DigestKey: Some(C_DigestKey),
    C_DigestFinal: Some(C_DigestFinal),
    C_SignInit: Some(C_SignInit),
    C_Sign: Some(C_Sign),
    C_SignUpdate: Some(C_SignUpdate),
    C_SignFinal: Some(C_SignFinal),
    C_SignRecoverInit: Some(C_SignRecoverInit),
    C_SignRecover: Some(C_SignRecover),
    C_VerifyInit: Some(C_VerifyInit),
    C_Verify: Some(C_Verify),
    C_VerifyUpdate: Some(C_VerifyUpdate),
    C_VerifyFinal: Some(C_VerifyFinal),
    C_VerifyRecoverInit: Some(C_VerifyRecoverInit),
    C_VerifyRecover: Some(C_VerifyRecover),
    C_DigestEncryptUpdate: Some(C_DigestEncryptUpdate),
    C_DecryptDigestUpdate: Some(C_DecryptDigestUpdate),
    C_SignEncryptUpdate: Some(C_SignEncryptUpdate),
    C_DecryptVerifyUpdate: Some(C_DecryptVerifyUpdate),
    C_GenerateKey: Some(C_GenerateKey),
    C_GenerateKeyPair: Some(C_GenerateKeyPair),
    C_WrapKey: Some(C_WrapKey),
    C_UnwrapKey: Some(C_UnwrapKey),
    C_DeriveKey: Some(C_DeriveKey),
    C_SeedRandom: Some(C_SeedRandom),
    C_GenerateRandom: Some(C_GenerateRandom),
    C_GetFunctionStatus: Some(C_GetFunctionStatus),
    C_CancelFunction: Some(C_CancelFunction),
    C_WaitForSlotEvent: Some(C_WaitForSlotEvent),
};

/// The module's one exported symbol: hands out [`FUNCTIONS`].
///
/// # Safety
///
/// `list` must be null or point to a writable `CK_FUNCTION_LIST_PTR`, as
/// PKCS#11 requires of every caller.
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    if list.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    // SAFETY: `list` is non-null and writable (the caller's contract). The
    // table is never written through the pointer (PKCS#11 callers only read
    // it), so handing out a `*mut` to a static is sound.
    unsafe { *list = std::ptr::addr_of!(FUNCTIONS).cast_mut() };
    CKR_OK
}

#[cfg(test)]
mod tests {
    use super::parse_delay;
    use std::time::Duration;

    #[test]
    fn delays_parse_with_their_unit() {
        assert_eq!(parse_delay("1ms"), Ok(Duration::from_millis(1)));
        assert_eq!(parse_delay("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_delay("1.5ms"), Ok(Duration::from_micros(1500)));
        assert_eq!(parse_delay("0"), Ok(Duration::ZERO));
        assert_eq!(parse_delay(" 2s "), Ok(Duration::from_secs(2)));
        assert!(parse_delay("1").is_err());
        assert!(parse_delay("ms").is_err());
        assert!(parse_delay("1 fortnight").is_err());
        assert!(parse_delay("120s").is_err());
    }
}
