//! When the operator's process hands freed memory back to the kernel. mimalloc, the
//! global allocator of the operator binary and the benchmark, keeps pages that became free
//! and purges them later, in one sweep of everything free at that moment (mimalloc v3
//! keeps one deadline per arena, not one per page).
//!
//! The two halves of the process want different things from that sweep:
//!
//! - **The data plane** frees and allocates the same amount again within milliseconds
//!   (request buffers, events, delivery bodies). A sweep returns memory it is about to
//!   reuse, and every page of it faults back in: with sweeps every 100 ms it returned
//!   about 35 MiB a second and took about 1,800 page faults a second at 15,000 events/s,
//!   and its half-load latency tail was longer (BENCHMARKS.md, "Issue 17 (delivery side)").
//!   So the process keeps mimalloc's own purge delay, 1,000 ms.
//! - **The controller** frees in bursts (10,000 subscriptions listed, reconciled or
//!   resynced at once), and pages kept for a second then raise the peak RSS with the
//!   burst. So while it works, and for [`QUIET`] after, [`start_purger`]'s thread forces
//!   a sweep every [`SWEEP_EVERY`]; the reconcilers and the watches call
//!   [`note_controller_work`].
//!
//! An explicit `MIMALLOC_PURGE_DELAY` in the environment sets the delay, as mimalloc
//! documents.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often the purger sweeps while the controller works.
pub const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// How long after the controller's last piece of work the purger keeps sweeping: long
/// enough for the memory of a burst's last passes to be freed and returned.
pub const QUIET: Duration = Duration::from_secs(1);

/// The process's clock for [`LAST_WORK_MS`]: its first reading.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since [`epoch`], plus one so that 0 means "never".
fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// When the controller last worked, in [`now_ms`]; 0 for never.
static LAST_WORK_MS: AtomicU64 = AtomicU64::new(0);

/// The controller is working (a watch event, a reconcile pass): the purger sweeps for the
/// next [`QUIET`]. One relaxed store; cheap enough for every event.
pub fn note_controller_work() {
    LAST_WORK_MS.store(now_ms(), Ordering::Relaxed);
}

/// Whether a sweep is due at `now` when the controller last worked at `last_work` (both
/// in [`now_ms`], 0 for never).
fn controller_recently_worked(last_work: u64, now: u64) -> bool {
    last_work != 0 && now.saturating_sub(last_work) <= QUIET.as_millis() as u64
}

/// Returns every free page of every arena to the kernel now, whatever the purge delay.
fn sweep() {
    // SAFETY: takes and returns nothing; mimalloc serialises purges across threads.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Starts the thread that sweeps while the controller works (once per process; later
/// calls do nothing). It lives as long as the process and does nothing while the
/// controller is quiet.
pub fn start_purger() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        epoch();
        let spawned = std::thread::Builder::new()
            .name("allocator-purge".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(SWEEP_EVERY);
                    if controller_recently_worked(LAST_WORK_MS.load(Ordering::Relaxed), now_ms())
                    {
                        sweep();
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no allocator purger thread: freed memory returns after mimalloc's own delay");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_only_within_the_quiet_window_after_work() {
        let quiet = QUIET.as_millis() as u64;
        assert!(!controller_recently_worked(0, 5), "never worked");
        assert!(controller_recently_worked(100, 100));
        assert!(controller_recently_worked(100, 100 + quiet));
        assert!(!controller_recently_worked(100, 101 + quiet));
        // A reading from before the last work (two threads' clocks) still sweeps.
        assert!(controller_recently_worked(100, 50));
    }

    #[test]
    fn noting_work_makes_a_sweep_due() {
        note_controller_work();
        assert!(controller_recently_worked(
            LAST_WORK_MS.load(Ordering::Relaxed),
            now_ms()
        ));
    }

    /// Resident memory of this process, in bytes.
    fn resident_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    /// Memory mimalloc holds as freed pages stays resident until a sweep, which returns
    /// it at once. (This test binary's global allocator is the system's; the blocks are
    /// mimalloc's own.)
    #[test]
    fn a_sweep_returns_freed_pages_to_the_kernel() {
        const BLOCK: usize = 1 << 20;
        const BLOCKS: usize = 128;
        let blocks: Vec<*mut u8> = (0..BLOCKS)
            .map(|_| {
                // SAFETY: a fresh block of BLOCK bytes, written in full, freed below.
                unsafe {
                    let p = libmimalloc_sys::mi_malloc(BLOCK).cast::<u8>();
                    assert!(!p.is_null());
                    std::ptr::write_bytes(p, 1, BLOCK);
                    p
                }
            })
            .collect();
        let touched = resident_bytes();
        for p in blocks {
            // SAFETY: each pointer came from `mi_malloc` above and is freed once.
            unsafe { libmimalloc_sys::mi_free(p.cast()) }
        }
        sweep();
        let after = resident_bytes();
        assert!(
            touched.saturating_sub(after) >= (BLOCK * BLOCKS / 2) as u64,
            "a sweep returned {} of {} MiB freed",
            touched.saturating_sub(after) >> 20,
            (BLOCK * BLOCKS) >> 20
        );
    }
}
