//! Process hardening and page locking: the one module with `unsafe` code.
//!
//! Core dumps would copy every secret in memory to disk, so both services turn
//! them off before they touch a key; secret buffers are `mlock`ed so they are
//! never swapped out. Each unsafe call is a plain libc call with no pointer
//! arithmetic beyond the buffer it is handed.
#![allow(unsafe_code)]

use std::io;

/// Sets `RLIMIT_CORE` to 0 and, on Linux, `PR_SET_DUMPABLE` to 0 (which also
/// stops other processes of the same user from ptrace-attaching or reading
/// `/proc/<pid>/mem`). Call first thing in `main`.
pub fn disable_core_dumps() -> io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads one fully initialised struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl(PR_SET_DUMPABLE, 0) takes no pointers.
        if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// True when the process may not dump core (used by tests and start-up checks).
pub fn core_dumps_disabled() -> bool {
    let mut limit = libc::rlimit {
        rlim_cur: 1,
        rlim_max: 1,
    };
    // SAFETY: getrlimit writes into one struct we own.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut limit) } == 0;
    ok && limit.rlim_cur == 0
}

/// Locks the pages holding `buf` into RAM. Returns false when the kernel
/// refuses (RLIMIT_MEMLOCK too low, no CAP_IPC_LOCK): the caller keeps going,
/// since refusing to serve would be worse, and `mlock_available` reports it.
pub(crate) fn lock(buf: &[u8]) -> bool {
    if buf.is_empty() {
        return true;
    }
    // SAFETY: the pointer and length describe one live allocation.
    unsafe { libc::mlock(buf.as_ptr().cast(), buf.len()) == 0 }
}

/// Undoes [`lock`]. Must be called before the buffer is freed.
pub(crate) fn unlock(buf: &[u8]) {
    if buf.is_empty() {
        return;
    }
    // SAFETY: the pointer and length describe one live allocation.
    unsafe {
        libc::munlock(buf.as_ptr().cast(), buf.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_dumps_can_be_disabled() {
        disable_core_dumps().expect("setrlimit/prctl");
        assert!(core_dumps_disabled());
    }
}
