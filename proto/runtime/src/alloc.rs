//! A global allocator that wipes memory when it is freed: defense in depth
//! behind the zeroizing types. A buffer some library filled with a secret and
//! dropped without wiping (a JSON parser's scratch string, an HTTP body, an
//! SDK's credential struct) is zeroed before the system allocator may hand it
//! out again or leave it readable in a freed heap block.
//!
//! A thin wrapper around [`std::alloc::System`]: `dealloc` wipes the block
//! with `explicit_bzero(3)` (which the compiler may not elide) and frees it;
//! `realloc` never lets the system allocator move a block it has not wiped:
//! it allocates the new block, copies, wipes and frees the old one. Both
//! binaries install it:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOCATOR: recvault_runtime::alloc::Zeroing = recvault_runtime::alloc::Zeroing;
//! ```
//!
//! [`set_wiping`] turns the wiping off and on at run time, only so that a
//! benchmark can measure its cost against a baseline in the same run.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};

static WIPING: AtomicBool = AtomicBool::new(true);

/// Turns wiping on freed memory on or off (benchmarks only; on by default).
pub fn set_wiping(on: bool) {
    WIPING.store(on, Ordering::Relaxed);
}

/// Whether freed memory is wiped now.
pub fn wiping() -> bool {
    WIPING.load(Ordering::Relaxed)
}

/// The allocator; see the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Zeroing;

/// Wipes `len` bytes at `ptr`.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes.
unsafe fn wipe(ptr: *mut u8, len: usize) {
    if len > 0 {
        // SAFETY: the caller guarantees `ptr..ptr+len` is writable.
        unsafe { libc::explicit_bzero(ptr.cast(), len) };
    }
}

// SAFETY: every method forwards to `System` with the layouts it was given
// (or, in `realloc`, with a layout of the same alignment and the new size),
// and wipes only memory the caller owns and is about to give back.
unsafe impl GlobalAlloc for Zeroing {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if wiping() {
            // SAFETY: the block is `layout.size()` bytes and still ours.
            unsafe { wipe(ptr, layout.size()) };
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !wiping() {
            // SAFETY: forwarded with the caller's guarantees.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the caller guarantees `new_size`, rounded up to the
        // alignment, does not overflow `isize`, so this layout is valid.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: `new_layout` has a non-zero size (the caller's guarantee).
        let new = unsafe { System.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are valid for the smaller of the two sizes
            // and do not overlap (the old one is still allocated); the old
            // block is then wiped and freed with its own layout.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                wipe(ptr, layout.size());
                System.dealloc(ptr, layout);
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_and_moved_blocks_are_wiped() {
        let a = Zeroing;
        let layout = Layout::from_size_align(64, 8).expect("layout");
        // SAFETY: plain allocator use with matching layouts; the bytes of a
        // freed block are only compared after realloc moved them, through
        // the new block.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            std::ptr::write_bytes(p, 0xAB, 64);
            let q = a.realloc(p, layout, 4096);
            assert!(!q.is_null());
            let moved = std::slice::from_raw_parts(q, 64);
            assert!(moved.iter().all(|&b| b == 0xAB), "contents kept");
            let big = Layout::from_size_align(4096, 8).expect("layout");
            let shrunk = a.realloc(q, big, 16);
            assert!(
                std::slice::from_raw_parts(shrunk, 16)
                    .iter()
                    .all(|&b| b == 0xAB)
            );
            a.dealloc(shrunk, Layout::from_size_align(16, 8).expect("layout"));
        }
        // Wiping itself: a block wiped before free reads back as zeros.
        let mut buf = vec![0x5Au8; 100];
        // SAFETY: `buf` is 100 writable bytes.
        unsafe { wipe(buf.as_mut_ptr(), buf.len()) };
        assert!(buf.iter().all(|&b| b == 0));
        set_wiping(false);
        assert!(!wiping());
        set_wiping(true);
        assert!(wiping());
    }
}
