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

/// Pages currently locked on behalf of live secret buffers, with how many
/// buffers use each. Page locks do not nest in the kernel: one `munlock` undoes
/// every `mlock` of that page. Two small secrets often share a page, so a page
/// is unlocked only when the last buffer on it is dropped.
fn locked_pages() -> &'static std::sync::Mutex<std::collections::HashMap<usize, usize>> {
    static PAGES: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<usize, usize>>> =
        std::sync::OnceLock::new();
    PAGES.get_or_init(Default::default)
}

fn page_size() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: sysconf takes no pointers.
    *SIZE.get_or_init(|| {
        usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .unwrap_or(4096)
            .max(1)
    })
}

/// The page-aligned addresses `buf` touches.
fn pages_of(buf: &[u8]) -> impl Iterator<Item = usize> {
    let size = page_size();
    let start = buf.as_ptr() as usize / size * size;
    let end = buf.as_ptr() as usize + buf.len();
    (start..end).step_by(size)
}

/// Locks the pages holding `buf` into RAM. Returns false when the kernel
/// refuses (RLIMIT_MEMLOCK too low, no CAP_IPC_LOCK): the caller keeps going,
/// since refusing to serve would be worse.
pub(crate) fn lock(buf: &[u8]) -> bool {
    if buf.is_empty() {
        return true;
    }
    let mut pages = locked_pages().lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: the pointer and length describe one live allocation.
    if unsafe { libc::mlock(buf.as_ptr().cast(), buf.len()) } != 0 {
        return false;
    }
    for page in pages_of(buf) {
        *pages.entry(page).or_insert(0) += 1;
    }
    true
}

/// Undoes [`lock`] for `buf`, unlocking only pages no other locked buffer uses.
/// Must be called before the buffer is freed.
pub(crate) fn unlock(buf: &[u8]) {
    if buf.is_empty() {
        return;
    }
    let size = page_size();
    let mut pages = locked_pages().lock().unwrap_or_else(|p| p.into_inner());
    for page in pages_of(buf) {
        let last = match pages.get_mut(&page) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => true,
        };
        if last {
            pages.remove(&page);
            // SAFETY: munlock on a page-aligned range takes no ownership; the
            // page belongs to this process (it held part of `buf`).
            unsafe {
                libc::munlock(page as *const libc::c_void, size);
            }
        }
    }
}

/// How many buffers lock `addr`'s page (for tests).
#[cfg(test)]
fn lock_count(addr: *const u8) -> usize {
    let size = page_size();
    let page = addr as usize / size * size;
    locked_pages()
        .lock()
        .map(|p| p.get(&page).copied().unwrap_or(0))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_stays_locked_while_any_buffer_on_it_lives() {
        // Two small buffers on one page that this allocation covers entirely,
        // so no other test's buffer can share it.
        let size = page_size();
        let block = vec![0u8; 3 * size];
        let offset = (size - block.as_ptr() as usize % size) % size;
        let page = &block[offset..offset + size];
        let (a, b) = (&page[..32], &page[64..96]);
        if !lock(a) {
            return; // RLIMIT_MEMLOCK refused; nothing to check here.
        }
        assert!(lock(b));
        assert_eq!(lock_count(a.as_ptr()), 2);
        unlock(a);
        assert_eq!(lock_count(b.as_ptr()), 1, "b's page must stay locked");
        unlock(b);
        assert_eq!(lock_count(b.as_ptr()), 0);
    }

    #[test]
    fn core_dumps_can_be_disabled() {
        disable_core_dumps().expect("setrlimit/prctl");
        assert!(core_dumps_disabled());
    }
}
