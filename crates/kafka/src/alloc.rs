//! A global allocator for processes that decode untrusted Kafka requests.
//!
//! The Kafka message codec reserves a vector for an array before it decodes the elements, sized by
//! the element count read off the wire. A request of a few bytes can declare two billion elements;
//! an allocation larger than the machine's memory then aborts the process before the decoder finds
//! that the bytes are missing. This allocator serves large allocations with anonymous mappings that
//! reserve address space without committing memory (`MAP_NORESERVE`): pages are backed only when
//! written, so a reservation the decoder never fills costs nothing and is unmapped when the decode
//! fails. Smaller allocations go to mimalloc, which holds up better than glibc's allocator under
//! the server's many short-lived buffers and threads.
//!
//! Binaries that serve the Kafka protocol install it with
//! `#[global_allocator] static ALLOC: spate_kafka::alloc::ReservingAlloc = spate_kafka::alloc::ReservingAlloc;`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ptr::null_mut;

/// The allocator of everything not mapped directly.
use mimalloc::MiMalloc as Small;

/// Allocations at least this large are mapped directly.
const LARGE_BYTES: usize = 64 << 20;
/// Mappings are page-aligned; larger alignments go to `Small`.
const PAGE_BYTES: usize = 4096;

pub struct ReservingAlloc;

fn mapped(layout: &Layout) -> bool {
    layout.size() >= LARGE_BYTES && layout.align() <= PAGE_BYTES
}

// SAFETY: every pointer handed out is either from `Small` (mimalloc, and returned to it) or from an
// anonymous private mapping of exactly `layout.size()` bytes (and unmapped with that size); the
// choice depends only on the layout, which callers pass back unchanged. Mappings are page-aligned,
// which satisfies every alignment routed to them.
unsafe impl GlobalAlloc for ReservingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !mapped(&layout) {
            // SAFETY: forwarded with the caller's guarantees.
            return unsafe { Small.alloc(layout) };
        }
        // SAFETY: an anonymous mapping with no address hint has no preconditions.
        let p = unsafe {
            libc::mmap(
                null_mut(),
                layout.size(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            null_mut()
        } else {
            p.cast()
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !mapped(&layout) {
            // SAFETY: forwarded with the caller's guarantees.
            return unsafe { Small.alloc_zeroed(layout) };
        }
        // Anonymous mappings are zero-filled.
        // SAFETY: same layout contract as `alloc`.
        unsafe { self.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if mapped(&layout) {
            // SAFETY: `ptr` came from `alloc` with this size, so it is a mapping of this length.
            unsafe { libc::munmap(ptr.cast(), layout.size()) };
        } else {
            // SAFETY: `ptr` came from `Small` with this layout.
            unsafe { Small.dealloc(ptr, layout) };
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size`, rounded up to `align`, does not overflow.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (mapped(&layout), mapped(&new_layout)) {
            // SAFETY: forwarded with the caller's guarantees.
            (false, false) => unsafe { Small.realloc(ptr, layout, new_size) },
            (true, true) => {
                // SAFETY: `ptr` is a mapping of `layout.size()` bytes; MREMAP_MAYMOVE keeps content.
                let p = unsafe {
                    libc::mremap(ptr.cast(), layout.size(), new_size, libc::MREMAP_MAYMOVE)
                };
                if p == libc::MAP_FAILED {
                    null_mut()
                } else {
                    p.cast()
                }
            }
            _ => {
                // SAFETY: a fresh allocation with a valid layout.
                let new = unsafe { self.alloc(new_layout) };
                if !new.is_null() {
                    // SAFETY: both blocks are valid for the smaller size and do not overlap.
                    unsafe {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                }
                new
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_reservation_that_is_never_filled_costs_nothing() {
        let a = ReservingAlloc;
        // Far more than the machine's memory: refused by a heap allocator, reserved here.
        let layout = Layout::from_size_align(1 << 40, 8).unwrap();
        // SAFETY: valid layout; the block is released below with the same layout.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            p.write(7);
            assert_eq!(p.read(), 7);
            a.dealloc(p, layout);
        }
    }

    #[test]
    fn reallocation_across_the_threshold_keeps_content() {
        let a = ReservingAlloc;
        let small = Layout::from_size_align(1024, 8).unwrap();
        // SAFETY: valid layouts; each block is used within its size and released once.
        unsafe {
            let p = a.alloc(small);
            p.write_bytes(5, 1024);
            let q = a.realloc(p, small, LARGE_BYTES * 2);
            assert_eq!(*q.add(1023), 5);
            let big = Layout::from_size_align(LARGE_BYTES * 2, 8).unwrap();
            let r = a.realloc(q, big, LARGE_BYTES * 3);
            assert_eq!(*r.add(1023), 5);
            let bigger = Layout::from_size_align(LARGE_BYTES * 3, 8).unwrap();
            let s = a.realloc(r, bigger, 512);
            assert_eq!(*s.add(511), 5);
            a.dealloc(s, Layout::from_size_align(512, 8).unwrap());
        }
    }
}
