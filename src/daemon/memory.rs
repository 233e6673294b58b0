//! Memory that comes back after a burst (issue 16, item 5).
//!
//! Under load glibc keeps freed heap (`keep_freed_heap`): handing it back and faulting it in
//! again cost ~4.5% of the daemons' CPU on bulk traffic. The price was RSS: a node that served
//! 5 000 connections stayed at 2–5× its idle RSS for good. So the freed heap is kept while the
//! daemon works and handed back once it has gone quiet: every `TICK` the daemon reads its own
//! CPU time, and a quiet tick after real work since the last trim trims every arena. Steady
//! load never has a quiet tick, so it never pays for a trim or the page faults after one.
//!
//! `malloc_trim` alone is not enough: it gives back free chunks inside every arena and the top
//! of the main arena, but the top of a thread's own arena (where a shard's connections live)
//! shrinks only when a large free in that arena finds it above the trim threshold. So the trim
//! lowers the threshold for a moment and frees one large block on each shard's thread.

use std::time::Duration;

use tracing::debug;

use crate::shard::Spawner;

/// How often the daemon looks at its CPU time.
const TICK: Duration = Duration::from_secs(5);
/// A tick in which the daemon used less CPU than this (2% of one core) is quiet.
const QUIET: Duration = Duration::from_millis(100);
/// CPU spent since the last trim that makes another worth it: an idle daemon's timers alone
/// take minutes to reach it, so a quiet node trims rarely and a node after a burst at once.
const WORK: Duration = Duration::from_millis(50);
/// Freed heap grown by this much since the last trim also makes a quiet tick trim, however
/// little CPU freeing it took: closing a burst's spare HBONE connections costs a few ms of CPU
/// and frees megabytes (measured in host mode: without this, no trim came after them).
const FREED_WORTH_TRIMMING: usize = 4 << 20;
/// Freed heap an arena keeps on top while the daemon works.
const KEEP_WHILE_BUSY: i32 = 32 << 20;
/// ... and while it trims: glibc's own default.
const KEEP_WHILE_TRIMMING: i32 = 128 << 10;
/// Above glibc's consolidation threshold (64 KiB), so freeing it trims its arena's top, and
/// below the mmap threshold (1 MiB), so it comes from the arena at all.
const RELEASING_BLOCK: usize = 256 << 10;

/// glibc hands a freed heap top back to the kernel once it passes its trim threshold (128 KiB,
/// adjusted at run time), and bulk traffic frees and allocates frame-sized buffers all the time:
/// `perf` showed ~4.5% of the daemons' CPU in page faults re-touching the same memory. Keeping
/// up to 32 MiB of freed heap per arena while busy costs RSS only until the next quiet tick
/// ([`return_freed_heap`]). Call before any other thread exists.
pub fn keep_freed_heap() {
    set_trim_threshold(KEEP_WHILE_BUSY);
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tunables; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Decides, tick by tick, when the freed heap goes back.
#[derive(Debug, Default)]
pub struct TrimSchedule {
    work_since_trim: Duration,
    /// The lowest free heap seen since the last trim: what a trim could not give back, or what
    /// was reused since.
    free_floor: usize,
}

impl TrimSchedule {
    /// `spent`: the CPU the daemon used during the tick that just ended; `free_heap`: the bytes
    /// free in the allocator now (asked only on a quiet tick). True: trim now.
    pub fn after_tick(&mut self, spent: Duration, free_heap: impl FnOnce() -> usize) -> bool {
        self.work_since_trim += spent;
        if spent >= QUIET {
            return false;
        }
        let free = free_heap();
        self.free_floor = self.free_floor.min(free);
        let freed = free - self.free_floor;
        if self.work_since_trim >= WORK || freed >= FREED_WORTH_TRIMMING {
            self.work_since_trim = Duration::ZERO;
            return true;
        }
        false
    }

    /// After a trim: `free_heap` is what it left (the floor for the next growth).
    pub fn trimmed(&mut self, free_heap: usize) {
        self.free_floor = free_heap;
    }
}

/// Runs for the daemon's life on the main runtime: trims after the load is gone.
pub async fn return_freed_heap(shards: Spawner) {
    let mut schedule = TrimSchedule::default();
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    let mut last = process_cpu();
    loop {
        ticks.tick().await;
        let now = process_cpu();
        if schedule.after_tick(now.saturating_sub(last), free_heap) {
            let before = rss_kib();
            trim(&shards).await;
            schedule.trimmed(free_heap());
            debug!(
                rss_before_kib = before,
                rss_after_kib = rss_kib(),
                "returned freed heap"
            );
        }
        // The trim's own CPU is not work that calls for another trim.
        last = process_cpu();
    }
}

async fn trim(shards: &Spawner) {
    set_trim_threshold(KEEP_WHILE_TRIMMING);
    for release in shards.spawn_each(|_| async { release_arena_top() }) {
        let _ = release.await;
    }
    release_arena_top();
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists, under its locks.
    unsafe {
        libc::malloc_trim(0);
    }
    set_trim_threshold(KEEP_WHILE_BUSY);
}

/// Frees a large block in the calling thread's arena, which trims that arena's top.
fn release_arena_top() {
    // black_box: the allocation must really happen, not be optimised away with its free.
    drop(std::hint::black_box(Vec::<u8>::with_capacity(
        RELEASING_BLOCK,
    )));
}

fn set_trim_threshold(bytes: i32) {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes an allocator tunable (under the main arena's lock).
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, bytes);
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = bytes;
}

/// Bytes free inside the allocator's arenas (`mallinfo2`'s `fordblks`: free chunks and arena
/// tops), which a trim may give back. It walks the free lists under each arena's lock, so it is
/// asked only on quiet ticks.
#[cfg(target_env = "gnu")]
fn free_heap() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's own statistics, under its locks.
    unsafe { libc::mallinfo2() }.fordblks
}

#[cfg(not(target_env = "gnu"))]
fn free_heap() -> usize {
    0
}

/// CPU time (user + system) of the whole process so far.
fn process_cpu() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// Resident memory in KiB, for the log line.
fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
    pages * page / 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    const MIB: usize = 1 << 20;

    /// A free heap that never changes.
    fn steady() -> usize {
        MIB
    }

    #[test]
    fn steady_load_never_trims() {
        let mut schedule = TrimSchedule::default();
        assert!((0..1_000).all(|_| !schedule.after_tick(QUIET * 3, || 100 * MIB)));
    }

    #[test]
    fn the_first_quiet_tick_after_a_burst_trims_once() {
        let mut schedule = TrimSchedule::default();
        assert!(
            !schedule.after_tick(900 * MS, steady),
            "busy: keep the heap"
        );
        assert!(
            schedule.after_tick(10 * MS, steady),
            "quiet after work: trim"
        );
        assert!(
            !schedule.after_tick(10 * MS, steady),
            "nothing new to give back"
        );
    }

    #[test]
    fn an_idle_daemon_trims_only_after_its_small_work_adds_up() {
        let mut schedule = TrimSchedule::default();
        let trims = (0..100).filter(|_| schedule.after_tick(MS, steady)).count();
        assert_eq!(trims, 2, "1 ms per tick reaches 50 ms twice in 100 ticks");
    }

    #[test]
    fn a_burst_that_ends_mid_tick_trims_on_the_next_quiet_one() {
        let mut schedule = TrimSchedule::default();
        assert!(
            !schedule.after_tick(QUIET + MS, steady),
            "the tick holding the burst is busy"
        );
        assert!(schedule.after_tick(MS, steady));
    }

    /// Closing a burst's spare connections takes little CPU but frees megabytes: that alone
    /// trims, once; heap a trim could not give back does not trim again and again.
    #[test]
    fn much_freed_heap_trims_a_quiet_tick_without_work_and_only_once() {
        let mut schedule = TrimSchedule::default();
        schedule.trimmed(2 * MIB);
        assert!(
            !schedule.after_tick(Duration::ZERO, || 3 * MIB),
            "1 MiB freed"
        );
        assert!(
            schedule.after_tick(Duration::ZERO, || 9 * MIB),
            "7 MiB freed"
        );
        schedule.trimmed(6 * MIB);
        assert!(
            (0..100).all(|_| !schedule.after_tick(Duration::ZERO, || 6 * MIB)),
            "what the trim left is no reason to trim again"
        );
        // Reused, then freed again: measured from the low point.
        assert!(!schedule.after_tick(Duration::ZERO, || MIB));
        assert!(schedule.after_tick(Duration::ZERO, || 6 * MIB));
        assert!(
            !schedule.after_tick(QUIET, || 100 * MIB),
            "never while busy"
        );
    }
}
