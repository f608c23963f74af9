//! A global allocator that counts live heap bytes, for bytes-per-block figures. The fleet bench
//! and bench/dynamo-compare both include this file (`#[path]`), so both sides of the
//! comparison count the same way.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

/// Counts live heap bytes (requested sizes) on top of `System`.
pub struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

#[global_allocator]
static ALLOC: Counting = Counting;

// SAFETY: every method delegates to `System` with the caller's own arguments, so it upholds
// exactly `System`'s contract; the counter is a side effect that touches no memory it hands
// out. `check` verifies the counting at start-up.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Relaxed);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Relaxed);
        System.realloc(p, l, new)
    }
}

/// Live heap bytes now.
pub fn live() -> isize {
    LIVE.load(Relaxed)
}

/// Panics unless an allocation and its free are counted.
pub fn check() {
    let before = live();
    let v: Vec<u64> = Vec::with_capacity(1000);
    assert_eq!(live() - before, 8000, "allocation counted");
    drop(v);
    assert_eq!(live(), before, "free counted");
}
