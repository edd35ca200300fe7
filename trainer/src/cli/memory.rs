//! How the process's allocator keeps memory between training steps.
//!
//! Every step allocates the same large buffers (activations, column matrices, gradients:
//! megabytes each) and frees them. glibc's malloc serves blocks above its mmap threshold with
//! fresh mappings and returns freed memory at the top of a heap to the kernel beyond its trim
//! threshold, so every step faulted its buffers in again and the kernel zeroed them. With the
//! settings below only the first steps do (figures: docs/PERFORMANCE.md, allocator settings).
//! Retaining the step's peak is what a worker wants; its next step needs the same again.

/// Buffers up to this size come from the heap, not their own mapping: glibc's largest
/// accepted value (half its 64 MiB heap on 64-bit hosts).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Free memory at the top of a heap is kept up to this much.
///
/// Both apply to the main arena only as far as page faults go: the arenas glibc gives other
/// threads are 64 MiB heaps that are unmapped as they empty, and a training runs on a
/// thread of its own pool ([`trainer::threads`]). So every thread allocates from the main
/// arena (`M_ARENA_MAX` 1): with their own arenas, steps would fault their memory in again.
/// Our threads allocate a few large buffers per operation, so sharing the arena's lock costs
/// nothing measurable.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 1 << 30;

/// Applies the settings above; call before the first thread starts. Elsewhere than glibc it
/// does nothing, and it leaves alone any setting the user made with `MALLOC_*` variables.
pub fn keep_step_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_set = |name: &str| std::env::var_os(name).is_some();
        // SAFETY: mallopt only changes the allocator's parameters; it is called here before
        // any other thread exists.
        unsafe {
            if !user_set("MALLOC_MMAP_THRESHOLD_")
                && libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 0
            {
                tracing::warn!("malloc refused the mmap threshold; steps will fault memory in");
            }
            if !user_set("MALLOC_TRIM_THRESHOLD_")
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 0
            {
                tracing::warn!("malloc refused the trim threshold; steps will fault memory in");
            }
            if !user_set("MALLOC_ARENA_MAX") && libc::mallopt(libc::M_ARENA_MAX, 1) == 0 {
                tracing::warn!("malloc refused one arena; steps will fault memory in");
            }
        }
    }
}
