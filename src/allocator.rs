//! The tuning of mimalloc, the allocator the operator binary and the benchmark declare as
//! their global allocator. Each calls [`tune`] first thing in `main`.

use libmimalloc_sys::{mi_option_set, mi_option_t};

/// `mi_option_purge_delay`: its place in the `mi_option_e` enum of the mimalloc v3 that
/// `libmimalloc-sys` builds (the Rust bindings do not name it). The test below checks
/// that the option at this place has the purge delay's default.
const PURGE_DELAY: mi_option_t = 15;

/// How long, in milliseconds, mimalloc keeps pages that became free before it returns
/// them to the kernel (its default is 1,000).
const PURGE_DELAY_MS: std::ffi::c_long = 100;

/// Freed pages go back to the kernel after 100 ms instead of a second. A burst of
/// short-lived allocations (10,000 subscriptions reconciled at once, then a resync) left
/// 192–202 MiB resident with the default and 183–192 MiB with this, for the same CPU
/// (BENCHMARKS.md, "Operator RSS at 10,000 subscriptions"); delivery throughput did not
/// change. An explicit `MIMALLOC_PURGE_DELAY` in the environment wins.
pub fn tune() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets an integer option; no pointers are passed.
        unsafe { mi_option_set(PURGE_DELAY, PURGE_DELAY_MS) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The purge delay in force, in milliseconds.
    fn purge_delay_ms() -> std::ffi::c_long {
        // SAFETY: reads an integer option.
        unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }
    }

    #[test]
    fn the_option_tuned_is_the_purge_delay_and_tuning_shortens_it() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // The default of mimalloc v3's purge delay and of no option next to it: a
        // mimalloc whose enum moved fails here rather than tuning something else.
        assert_eq!(purge_delay_ms(), 1000);
        tune();
        assert_eq!(purge_delay_ms(), 100);
    }
}
