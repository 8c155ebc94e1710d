//! Memory the process no longer needs, handed back to the kernel: what
//! loading a model freed (glibc keeps freed memory in its heap, resident,
//! unless asked), and the pages of data embedded in the binary once it has
//! been read. Linux with glibc only; elsewhere these do nothing.

/// Returns the heap memory freed so far to the kernel. Loading a model frees
/// more than it keeps (checkpoint tensors, batch-norm folding, packing).
pub fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: glibc's `malloc_trim` takes no pointers and may be called at any time from any
        // thread; it only releases memory that is already free.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Drops the resident pages of `data`, a static embedded in the binary (its
/// read-only, file-backed image), once it has been read. Its contents do not
/// change: a later read faults the pages in again from the binary.
pub fn release_embedded(data: &'static [u8]) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
            fn getpagesize() -> i32;
        }
        const MADV_DONTNEED: i32 = 4;
        // SAFETY: `getpagesize` has no preconditions.
        let page = unsafe { getpagesize() } as usize;
        let start = (data.as_ptr() as usize).div_ceil(page) * page;
        let end = (data.as_ptr() as usize + data.len()) / page * page;
        if end > start {
            // SAFETY: [start, end) lies inside `data`, whole pages of a static that is never
            // written: a read-only private file mapping, so dropping its pages loses nothing
            // (they are read again from the binary on the next access) and no reference into it
            // sees a change.
            unsafe {
                madvise(start as *mut std::ffi::c_void, end - start, MADV_DONTNEED);
            }
        }
    }
}
