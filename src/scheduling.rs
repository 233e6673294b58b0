//! How the kernel schedules the data plane's threads against the node's other processes.
//!
//! In a request/response exchange every process in the chain (client, ztund, ztund, app)
//! blocks right after its write, yet under `SCHED_OTHER` the process its write wakes preempts
//! it first: a context-switch pair per hop that buys nothing. `SCHED_BATCH` threads never
//! preempt on wake-up. That is free while the node has idle CPUs (the woken thread lands on
//! one) and costly when it has none (it waits for the scheduler tick). `auto` watches the
//! node's idle CPU time and uses batch only while there is plenty (BENCHMARKS.md, change 12).

use std::io;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use tracing::{info, warn};

/// The `dataPlane.scheduling` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ThreadScheduling {
    /// The policy ztund was started with (normally `SCHED_OTHER`), never changed.
    #[default]
    Normal,
    /// `SCHED_BATCH` always: CPU per request −36% and added p99 −38% with CPUs to spare, but
    /// p99 3.6 ms → 71 ms when pods keep every CPU busy.
    Batch,
    /// `SCHED_BATCH` while at least half the node's CPU time is idle, `SCHED_OTHER` as soon as
    /// less than a quarter is. Close to `batch` on a calm node, like `normal` on a saturated
    /// one; a neighbour that turns the CPUs on and off every 2 s raised p99 2.6 → 4.5 ms.
    Auto,
}

/// A policy one thread runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Other,
    Batch,
}

impl Policy {
    fn raw(self) -> libc::c_int {
        match self {
            Policy::Other => libc::SCHED_OTHER,
            Policy::Batch => libc::SCHED_BATCH,
        }
    }
}

/// The calling thread's kernel id.
pub fn this_thread() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Puts thread `tid` (0: the calling thread) under `policy`.
pub fn set_policy(tid: libc::pid_t, policy: Policy) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the duration of the call.
    if unsafe { libc::sched_setscheduler(tid, policy.raw(), &param) } == -1 {
        let error = io::Error::last_os_error();
        return Err(io::Error::new(
            error.kind(),
            format!("scheduling data-plane thread {tid} as {policy:?}: {error}"),
        ));
    }
    Ok(())
}

/// The policy a shard thread starts with.
pub fn initial_policy(scheduling: ThreadScheduling) -> Option<Policy> {
    match scheduling {
        ThreadScheduling::Normal => None,
        ThreadScheduling::Batch => Some(Policy::Batch),
        // Safe first: batch only once the node has shown it has CPU to spare.
        ThreadScheduling::Auto => Some(Policy::Other),
    }
}

/// The node's CPU time so far (all CPUs, in clock ticks), from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    pub idle: u64,
    pub total: u64,
}

impl CpuTimes {
    pub fn read() -> io::Result<CpuTimes> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        CpuTimes::parse(&stat).ok_or_else(|| io::Error::other("/proc/stat has no `cpu` line"))
    }

    /// `cpu user nice system idle iowait irq softirq steal ...`: idle and iowait are idle time;
    /// everything else, steal included, is time a woken thread could not have had.
    pub fn parse(stat: &str) -> Option<CpuTimes> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let fields: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        if fields.len() < 5 {
            return None;
        }
        Some(CpuTimes {
            idle: fields[3] + fields[4],
            total: fields.iter().sum(),
        })
    }

    /// The idle share of the time between `earlier` and `self`; `None` if no tick passed.
    pub fn idle_share_since(&self, earlier: &CpuTimes) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        let idle = self.idle.checked_sub(earlier.idle)?;
        (total > 0).then(|| idle as f64 / total as f64)
    }
}

/// `auto`'s decision, one sample at a time: back to `SCHED_OTHER` on the first busy sample,
/// batch again only after [`AutoPolicy::CALM_SAMPLES`] calm ones in a row.
#[derive(Debug)]
pub struct AutoPolicy {
    current: Policy,
    calm: u32,
}

impl AutoPolicy {
    /// Below this idle share the node is busy: a woken batch thread would wait for a tick.
    pub const BUSY_BELOW: f64 = 0.25;
    /// At or above this idle share a sample is calm.
    pub const CALM_FROM: f64 = 0.5;
    pub const CALM_SAMPLES: u32 = 8;

    pub fn new() -> AutoPolicy {
        AutoPolicy {
            current: Policy::Other,
            calm: 0,
        }
    }

    /// The policy to switch to after a sample with `idle_share`, if it changes.
    pub fn next(&mut self, idle_share: f64) -> Option<Policy> {
        let calm = idle_share >= Self::CALM_FROM;
        self.calm = if calm { self.calm + 1 } else { 0 };
        let wanted = match self.current {
            Policy::Batch if idle_share < Self::BUSY_BELOW => Policy::Other,
            Policy::Other if self.calm >= Self::CALM_SAMPLES => Policy::Batch,
            unchanged => unchanged,
        };
        (wanted != self.current).then(|| {
            self.current = wanted;
            wanted
        })
    }
}

impl Default for AutoPolicy {
    fn default() -> Self {
        AutoPolicy::new()
    }
}

/// How often `auto` samples the node's CPU time: a node that turns busy is noticed within this.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// Runs `auto` for `threads` until `stop`'s sender is dropped: samples with `sample` every
/// `every` and moves every thread when the decision changes. A thread that cannot be moved is
/// logged and the rest still are; while samples fail, the policy stays as it is.
pub fn run_auto(
    threads: &[libc::pid_t],
    mut sample: impl FnMut() -> io::Result<CpuTimes>,
    every: Duration,
    stop: &Receiver<()>,
) {
    let mut decision = AutoPolicy::new();
    let mut last = sample().map_err(|e| unreadable(&e)).ok();
    loop {
        match stop.recv_timeout(every) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = match sample() {
            Ok(now) => now,
            Err(e) => {
                // Once per outage, not four times a second.
                if last.is_some() {
                    unreadable(&e);
                }
                last = None;
                continue;
            }
        };
        let share = last.and_then(|last| now.idle_share_since(&last));
        last = Some(now);
        let Some(policy) = share.and_then(|share| decision.next(share)) else {
            continue;
        };
        info!(?policy, idle = share, "data-plane scheduling");
        for &tid in threads {
            if let Err(e) = set_policy(tid, policy) {
                warn!(error = %e, "changing data-plane scheduling");
            }
        }
    }
}

fn unreadable(error: &io::Error) {
    warn!(%error, "reading the node's CPU time; data-plane scheduling unchanged");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_from_proc_stat() {
        let stat = "cpu  958073 0 216679 750036 3100 0 107099 316 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        let times = CpuTimes::parse(stat).unwrap();
        assert_eq!(times.idle, 750036 + 3100);
        assert_eq!(times.total, 958073 + 216679 + 750036 + 3100 + 107099 + 316);
        assert_eq!(CpuTimes::parse("intr 1 2 3\n"), None);
        assert_eq!(CpuTimes::parse("cpu 1 2 x 4 5\n"), None);
        let real = CpuTimes::read().unwrap();
        assert!(real.total >= real.idle && real.total > 0, "{real:?}");
    }

    #[test]
    fn idle_share_between_two_readings() {
        let a = CpuTimes {
            idle: 100,
            total: 400,
        };
        let b = CpuTimes {
            idle: 175,
            total: 500,
        };
        assert_eq!(b.idle_share_since(&a), Some(0.75));
        assert_eq!(a.idle_share_since(&a), None, "no tick passed");
        assert_eq!(a.idle_share_since(&b), None, "counters never go back");
    }

    #[test]
    fn auto_goes_batch_only_after_a_calm_stretch_and_back_at_the_first_busy_sample() {
        let mut auto = AutoPolicy::new();
        for _ in 1..AutoPolicy::CALM_SAMPLES {
            assert_eq!(auto.next(0.9), None);
        }
        // A middling sample is not calm: the stretch starts again.
        assert_eq!(auto.next(0.4), None);
        for _ in 1..AutoPolicy::CALM_SAMPLES {
            assert_eq!(auto.next(0.6), None);
        }
        assert_eq!(auto.next(0.6), Some(Policy::Batch));
        assert_eq!(auto.next(0.3), None, "between the thresholds: stays batch");
        assert_eq!(auto.next(0.1), Some(Policy::Other), "busy: back at once");
        assert_eq!(auto.next(0.9), None);
    }

    fn policy_of(tid: libc::pid_t) -> libc::c_int {
        // SAFETY: sched_getscheduler only reads a thread's policy.
        unsafe { libc::sched_getscheduler(tid) }
    }

    /// Real threads, fed made-up CPU times: calm moves them to batch, busy moves them back,
    /// and dropping the stop ends the controller.
    #[test]
    fn run_auto_moves_real_threads_with_the_samples() {
        let (tid_tx, tids) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = std::sync::Arc::new(std::sync::Mutex::new(released));
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let tid_tx = tid_tx.clone();
                let released = released.clone();
                std::thread::spawn(move || {
                    tid_tx.send(this_thread()).unwrap();
                    let _ = released.lock().unwrap().recv();
                })
            })
            .collect();
        let threads: Vec<libc::pid_t> = tids.iter().take(2).collect();

        // Calm for CALM_SAMPLES samples, then busy: each sample adds 100 ticks.
        let (seen_tx, seen) = std::sync::mpsc::channel();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let watched = threads.clone();
        let controller = std::thread::spawn(move || {
            let mut times = CpuTimes::default();
            let mut samples = 0;
            run_auto(
                &watched,
                || {
                    // The policy the previous sample led to.
                    seen_tx.send(policy_of(watched[0])).unwrap();
                    samples += 1;
                    let calm = samples <= AutoPolicy::CALM_SAMPLES + 1;
                    times.total += 100;
                    times.idle += if calm { 90 } else { 5 };
                    Ok(times)
                },
                Duration::from_millis(1),
                &stopped,
            );
        });
        let calm = AutoPolicy::CALM_SAMPLES as usize;
        let policies: Vec<_> = seen.iter().take(calm + 3).collect();
        assert!(policies[..=calm].iter().all(|&p| p == libc::SCHED_OTHER));
        assert_eq!(policies[calm + 1], libc::SCHED_BATCH, "{policies:?}");
        assert_eq!(policies[calm + 2], libc::SCHED_OTHER, "{policies:?}");
        assert_eq!(policy_of(threads[1]), libc::SCHED_OTHER);
        drop(stop);
        controller.join().unwrap();
        drop(release);
        for worker in workers {
            worker.join().unwrap();
        }
    }
}
