//! When the operator's process hands freed memory back to the kernel. mimalloc, the
//! global allocator of the operator binary and the benchmark, keeps pages that became free
//! and purges them later, in one sweep of everything free at that moment (mimalloc v3
//! keeps one deadline per arena, not one per page).
//!
//! Two workloads want different things from that sweep:
//!
//! - **Steady work** (the data plane under load) frees and allocates the same amount again
//!   within milliseconds: request buffers, events, delivery bodies. A sweep returns memory
//!   it is about to reuse, and every page of it faults back in. With sweeps every 100 ms
//!   the data plane returned about 35 MiB a second and took about 1,800 page faults a
//!   second at 15,000 events/s (BENCHMARKS.md, "The allocator's sweeps"). So the process
//!   keeps mimalloc's own purge delay, 1,000 ms.
//! - **A burst** (10,000 subscriptions listed, reconciled or resynced at once) frees while
//!   it grows, and pages kept for a second would raise the peak RSS with it. So a thread
//!   (started by [`set_up`]) reads the resident size every [`CHECK_EVERY`] and sweeps at once
//!   when it has passed its highest level so far by [`GROWTH`]: freed pages add to the
//!   peak little more than that (and what 100 ms of growth brings), and steady work, which
//!   stays under its peak, is never swept early.
//!
//! An explicit `MIMALLOC_PURGE_DELAY` in the environment sets the delay, as mimalloc
//! documents.
//!
//! The process also refuses transparent huge pages (by [`set_up`]). mimalloc asks
//! the kernel for them on its arenas (`MADV_HUGEPAGE`), so the first touch of each 2 MiB
//! of a growing heap makes the kernel zero all 2 MiB at once, in the thread that touched
//! it. On the development VM, whose host takes freed memory back, that took 5.4 ms a time
//! (4 KiB pages: 3 µs), and a burst of requests that grew both the ingress and the queue's
//! writer stalled them together for 100-600 ms (BENCHMARKS.md, "Huge pages"). With 4 KiB
//! pages a growing heap costs a few microseconds per page, spread over the requests that
//! need them. `MIMALLOC_ALLOW_THP` in the environment decides instead, as mimalloc
//! documents.

use std::time::Duration;

/// How often the purger reads the resident size.
pub const CHECK_EVERY: Duration = Duration::from_millis(100);

/// How far the resident size may pass its highest level so far before the purger sweeps.
pub const GROWTH: u64 = 1 << 20;

/// The purger's highest resident level: what a reading is compared with.
#[derive(Debug)]
struct HighWater(u64);

impl HighWater {
    /// Whether `resident` bytes have passed the highest level by more than [`GROWTH`]; a
    /// lower reading changes nothing.
    fn passed(&self, resident: u64) -> bool {
        resident > self.0.saturating_add(GROWTH)
    }

    /// Takes `resident` (a reading after a sweep, or the first one) as the level to pass,
    /// if it is higher.
    fn raise(&mut self, resident: u64) {
        self.0 = self.0.max(resident);
    }
}

/// Resident memory of this process in bytes, from `/proc/self/statm`; `None` where there
/// is no such file.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: `sysconf` reads a constant of the system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// Returns every free page of every arena to the kernel now, whatever the purge delay.
fn sweep() {
    // SAFETY: takes and returns nothing; mimalloc serialises purges across threads.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// One check of the purger: sweeps if `high` was passed, and returns whether it swept.
fn check(high: &mut HighWater) -> bool {
    let Some(resident) = resident_bytes() else {
        return false;
    };
    if !high.passed(resident) {
        return false;
    }
    sweep();
    high.raise(resident_bytes().unwrap_or(resident));
    true
}

/// How a long-running process uses memory (the operator's `run`, every benchmark process),
/// called as it starts: no transparent huge pages, and the purger started.
pub fn set_up() {
    refuse_huge_pages();
    start_purger();
}

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`, which the
/// kernel checks at each page fault, so it holds for the arenas mimalloc already asked
/// huge pages for), unless `MIMALLOC_ALLOW_THP` is set. Children inherit it.
fn refuse_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    // SAFETY: `prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)` sets a flag of the process and reads
    // no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "transparent huge pages stay on: a growing heap may stall on zeroing 2 MiB pages"
        );
    }
}

/// Starts the thread that sweeps when the resident size passes its peak (once per
/// process; later calls do nothing). It lives as long as the process.
fn start_purger() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let Some(first) = resident_bytes() else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("allocator-purge".into())
            .spawn(move || {
                let mut high = HighWater(first);
                loop {
                    std::thread::sleep(CHECK_EVERY);
                    check(&mut high);
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
    fn the_process_refuses_transparent_huge_pages() {
        let enabled = || {
            std::fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("THP_enabled:").map(|v| v.trim().to_owned()))
                .expect("the kernel reports THP_enabled")
        };
        refuse_huge_pages();
        assert_eq!(enabled(), "0", "huge pages are off for the process");
    }

    #[test]
    fn only_a_reading_past_the_highest_level_by_the_growth_is_due_a_sweep() {
        let mut high = HighWater(100 << 20);
        assert!(!high.passed(100 << 20));
        assert!(!high.passed((100 << 20) + GROWTH));
        assert!(high.passed((100 << 20) + GROWTH + 1));
        assert!(!high.passed(50 << 20), "a lower reading");
        high.raise(50 << 20);
        assert_eq!(
            high.0,
            100 << 20,
            "a lower reading does not lower the level"
        );
        high.raise(120 << 20);
        assert!(!high.passed((120 << 20) + GROWTH));
        assert!(high.passed((120 << 20) + GROWTH + 1));
    }

    /// Allocates `blocks` MiB with mimalloc's own `mi_malloc` (this test binary's global
    /// allocator is the system's), writes them and frees them: freed pages mimalloc holds.
    fn touch_and_free_mib(blocks: usize) {
        const BLOCK: usize = 1 << 20;
        let taken: Vec<*mut u8> = (0..blocks)
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
        for p in taken {
            // SAFETY: each pointer came from `mi_malloc` above and is freed once.
            unsafe { libmimalloc_sys::mi_free(p.cast()) }
        }
    }

    /// Freed pages stay resident until a sweep, and a check past the high-water level
    /// returns them at once and takes the lower level. (With purging off,
    /// `MIMALLOC_PURGE_DELAY=-1`, the sweep returns nothing and this fails.)
    #[test]
    fn a_check_past_the_high_water_level_returns_freed_pages_to_the_kernel() {
        const MIB: usize = 128;
        let before = resident_bytes().unwrap();
        let mut high = HighWater(before);
        touch_and_free_mib(MIB);
        let held = resident_bytes().unwrap();
        assert!(
            check(&mut high),
            "{} MiB held past {} MiB",
            held >> 20,
            before >> 20
        );
        let after = resident_bytes().unwrap();
        assert!(
            held.saturating_sub(after) >= (MIB << 19) as u64,
            "a sweep returned {} of {MIB} MiB freed",
            held.saturating_sub(after) >> 20,
        );
        assert!(high.0 < held, "the level is the reading after the sweep");
    }
}
