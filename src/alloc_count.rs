//! A counting global allocator, per thread and for the whole process, so
//! benchmarks and tests can show how many allocations one frame costs
//! (inference runs on the CPU pool's threads, so the process count is the one
//! that sees it). Installed by the binary and by the allocation test;
//! counting is two thread-local adds and two relaxed atomic adds per allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

static ALL_COUNT: AtomicU64 = AtomicU64::new(0);
static ALL_BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNT: Cell<u64> = const { Cell::new(0) };
    static BYTES: Cell<u64> = const { Cell::new(0) };
}

/// Wraps the system allocator and counts this thread's allocations.
pub struct CountingAlloc;

// SAFETY: defers every operation to `System`; only adds thread-local counts,
// which use const-initialised `Cell`s that never allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn note(bytes: usize) {
    let _ = COUNT.try_with(|c| c.set(c.get() + 1));
    let _ = BYTES.try_with(|c| c.set(c.get() + bytes as u64));
    ALL_COUNT.fetch_add(1, Ordering::Relaxed);
    ALL_BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
}

/// (allocations, bytes) made by every thread of the process so far.
pub fn snapshot_all() -> (u64, u64) {
    (ALL_COUNT.load(Ordering::Relaxed), ALL_BYTES.load(Ordering::Relaxed))
}

/// (allocations, bytes) made by this thread so far.
pub fn snapshot() -> (u64, u64) {
    (
        COUNT.try_with(Cell::get).unwrap_or(0),
        BYTES.try_with(Cell::get).unwrap_or(0),
    )
}
