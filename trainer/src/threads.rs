//! The threads one training runs on when its device is the CPU.
//!
//! Our kernels and Candle's split every operation across rayon's threads. Called from a
//! thread outside the pool, each operation is handed to the pool and the caller sleeps until
//! it is done: a cross-thread hand-off and wake-up per operation, about a hundred per
//! training step. Run on one of the pool's own threads, the caller does its share of each
//! operation instead (figures: docs/PERFORMANCE.md, Thread pools).
//!
//! Each training gets a pool of its own rather than a turn in rayon's global pool: a thread
//! of a shared pool that waits for help inside one training takes any queued work, another
//! worker loop's whole training included, and finishes that before it returns to its own.

use candle_core::Device;

/// Threads per training on the CPU when `concurrent` trainings share the machine: the
/// threads rayon's global pool has (all cores, or `RAYON_NUM_THREADS`), shared out, at
/// least one each.
pub fn cpu_share(concurrent: usize) -> usize {
    (rayon::current_num_threads() / concurrent.max(1)).max(1)
}

/// Runs `work` (a training, an evaluation) on a pool of `threads` threads of its own when
/// `device` is the CPU; on this thread otherwise, where the work is launching kernels and
/// a CUDA context is bound to the thread.
pub fn run_on_cpu_pool<R: Send>(
    device: &Device,
    threads: usize,
    work: impl FnOnce() -> R + Send,
) -> Result<R, rayon::ThreadPoolBuildError> {
    if !device.is_cpu() {
        return Ok(work());
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(|i| format!("train-{i}"))
        .build()?;
    Ok(pool.install(work))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_runs_on_a_pool_of_the_given_size() {
        let (inside, threads) = run_on_cpu_pool(&Device::Cpu, 3, || {
            (rayon::current_thread_index(), rayon::current_num_threads())
        })
        .unwrap();
        assert!(inside.is_some(), "not on a pool thread");
        assert_eq!(threads, 3);
    }

    #[test]
    fn shares_are_at_least_one_thread() {
        assert_eq!(cpu_share(usize::MAX), 1);
        assert_eq!(cpu_share(0), cpu_share(1));
        assert!(cpu_share(1) >= cpu_share(2));
    }
}
