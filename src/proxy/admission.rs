//! Admission: what a connection may cost before it has proved anything. A TCP connection to
//! 15008 that never finishes its TLS handshake holds a descriptor, a task and a TLS state; 20 000
//! of them used to exhaust the open-files limit, so readiness stopped answering and good clients
//! failed. Here:
//!
//! - connections still in their handshake are capped in total and per source address; past a
//!   cap the *oldest* is shed (a flood's old sockets go, a good client's fresh one stays);
//! - a share of the descriptors is kept in reserve for admin/readiness and for the dials of
//!   connections already admitted: a connection accepted into that reserve is closed at once,
//!   and pending handshakes are shed to give descriptors back.
//!
//! The reserve test is exact and free: the kernel hands out the lowest free descriptor, so an
//! accepted socket numbered `n` means every descriptor below `n` is taken, and `RLIMIT_NOFILE`
//! bounds descriptor *numbers*.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

use super::refusals::{RefusalReason, Refusals};

/// Caps on connections that have not finished their handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Pending handshakes over every source.
    pub total: usize,
    /// Pending handshakes from one source address.
    pub per_source: usize,
}

impl HandshakeLimits {
    /// A quarter of the descriptors at most (at least 16, at most 4 096) for handshakes, and a
    /// quarter of that (8 to 256) for one source: a node restarting its pods dials a burst of
    /// pooled connections, far fewer than 256 at once.
    pub fn for_open_files(limit: u64) -> HandshakeLimits {
        let total = usize::try_from(limit / 4)
            .unwrap_or(usize::MAX)
            .clamp(16, 4096);
        HandshakeLimits {
            total,
            per_source: (total / 4).clamp(8, 256),
        }
    }
}

/// Descriptors kept free for admin/readiness and admitted connections' dials: an eighth of the
/// limit, 32 to 1 024.
pub fn fd_reserve(limit: u64) -> u64 {
    (limit / 8).clamp(32, 1024)
}

/// Why a pending handshake was cut short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// The total cap was reached and this was the oldest.
    Total,
    /// Its source's cap was reached and this was that source's oldest.
    PerSource,
    /// Descriptors ran into the reserve.
    Descriptors,
}

impl Shed {
    pub fn reason(self) -> RefusalReason {
        match self {
            Shed::Total => RefusalReason::HandshakesPending,
            Shed::PerSource => RefusalReason::HandshakesPendingFromSource,
            Shed::Descriptors => RefusalReason::FdReserve,
        }
    }
}

/// The daemon's admission state, shared by every listener and pod.
#[derive(Debug)]
pub struct Admission {
    open_files_limit: u64,
    reserve: u64,
    limits: HandshakeLimits,
    pending: Mutex<Pending>,
    /// Log lines and metrics of every refusal.
    pub refusals: Refusals,
}

#[derive(Debug, Default)]
struct Pending {
    next_id: u64,
    /// Oldest first; the sender tells the handshake it was shed.
    by_age: BTreeMap<u64, (IpAddr, oneshot::Sender<Shed>)>,
    by_source: HashMap<IpAddr, VecDeque<u64>>,
}

impl Pending {
    /// Removes `id`; its sender, if it was still pending.
    fn remove(&mut self, id: u64) -> Option<oneshot::Sender<Shed>> {
        let (source, shed) = self.by_age.remove(&id)?;
        if let Some(queue) = self.by_source.get_mut(&source) {
            queue.retain(|&other| other != id);
            if queue.is_empty() {
                self.by_source.remove(&source);
            }
        }
        Some(shed)
    }

    fn shed(&mut self, id: u64, why: Shed) {
        if let Some(shed) = self.remove(id) {
            // The handshake may be finishing right now; then there is nobody to tell.
            let _ = shed.send(why);
        }
    }
}

impl Admission {
    /// Admission for a process allowed `open_files_limit` descriptors.
    pub fn new(open_files_limit: u64, refusals: Refusals) -> Admission {
        Admission {
            open_files_limit,
            reserve: fd_reserve(open_files_limit),
            limits: HandshakeLimits::for_open_files(open_files_limit),
            pending: Mutex::default(),
            refusals,
        }
    }

    pub fn limits(&self) -> HandshakeLimits {
        self.limits
    }

    /// Whether a socket just accepted as descriptor `fd` lies in the reserve.
    pub fn in_reserve(&self, fd: RawFd) -> bool {
        u64::try_from(fd).unwrap_or(0) + self.reserve >= self.open_files_limit
    }

    /// Registers a connection starting its handshake from `source`; it stays pending until the
    /// ticket drops. May shed older pending handshakes to stay within the caps.
    pub fn admit_handshake(self: &Arc<Self>, source: IpAddr) -> HandshakeTicket {
        let (sender, shed) = oneshot::channel();
        let mut pending = self.lock();
        let id = pending.next_id;
        pending.next_id += 1;
        pending.by_age.insert(id, (source, sender));
        let queue = pending.by_source.entry(source).or_default();
        queue.push_back(id);
        let source_oldest = (queue.len() > self.limits.per_source)
            .then(|| queue.front().copied())
            .flatten();
        if let Some(oldest) = source_oldest {
            pending.shed(oldest, Shed::PerSource);
        }
        if pending.by_age.len() > self.limits.total
            && let Some(oldest) = pending.by_age.keys().next().copied()
        {
            pending.shed(oldest, Shed::Total);
        }
        HandshakeTicket {
            admission: self.clone(),
            id,
            shed,
        }
    }

    /// Sheds the oldest eighth (at least one) of the pending handshakes, to give descriptors
    /// back when they run short; returns how many.
    pub fn shed_for_descriptors(&self) -> usize {
        let mut pending = self.lock();
        let count = pending.by_age.len().div_ceil(8);
        let oldest: Vec<u64> = pending.by_age.keys().take(count).copied().collect();
        for id in &oldest {
            pending.shed(*id, Shed::Descriptors);
        }
        oldest.len()
    }

    /// Handshakes pending now.
    pub fn pending_handshakes(&self) -> usize {
        self.lock().by_age.len()
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection's place among the pending handshakes, given up when dropped.
#[derive(Debug)]
pub struct HandshakeTicket {
    admission: Arc<Admission>,
    id: u64,
    shed: oneshot::Receiver<Shed>,
}

impl HandshakeTicket {
    /// Resolves when the handshake has been shed (never, if it is not).
    pub async fn shed(&mut self) -> Shed {
        match (&mut self.shed).await {
            Ok(why) => why,
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for HandshakeTicket {
    fn drop(&mut self) {
        self.admission.lock().remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(limit: u64) -> Arc<Admission> {
        Arc::new(Admission::new(
            limit,
            Refusals::new(crate::admin::Metrics::new()),
        ))
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn was_shed(ticket: &mut HandshakeTicket) -> Option<Shed> {
        ticket.shed.try_recv().ok()
    }

    #[test]
    fn limits_follow_the_open_files_limit() {
        assert_eq!(
            HandshakeLimits::for_open_files(512),
            HandshakeLimits {
                total: 128,
                per_source: 32
            }
        );
        assert_eq!(
            HandshakeLimits::for_open_files(1 << 20),
            HandshakeLimits {
                total: 4096,
                per_source: 256
            }
        );
        assert_eq!(fd_reserve(512), 64);
        assert_eq!(fd_reserve(1 << 20), 1024);
        assert_eq!(fd_reserve(100), 32);
    }

    #[test]
    fn the_reserve_starts_a_reserve_below_the_limit() {
        let admission = admission(512);
        assert!(!admission.in_reserve(447));
        assert!(admission.in_reserve(448));
        assert!(admission.in_reserve(511));
    }

    #[test]
    fn one_source_past_its_cap_loses_its_oldest_and_no_one_elses() {
        let admission = admission(512); // 32 per source, 128 in total
        let mut other = admission.admit_handshake(ip("10.0.0.2"));
        let mut flood: Vec<_> = (0..33)
            .map(|_| admission.admit_handshake(ip("10.0.0.1")))
            .collect();
        assert_eq!(was_shed(&mut flood[0]), Some(Shed::PerSource));
        assert!(flood[1..].iter_mut().all(|t| was_shed(t).is_none()));
        assert_eq!(was_shed(&mut other), None);
        assert_eq!(admission.pending_handshakes(), 33);
    }

    #[test]
    fn past_the_total_cap_the_oldest_of_all_is_shed() {
        let admission = admission(512);
        let mut tickets: Vec<_> = (0..129u32)
            .map(|i| admission.admit_handshake(IpAddr::from((0x0a00_0000 + i).to_be_bytes())))
            .collect();
        assert_eq!(was_shed(&mut tickets[0]), Some(Shed::Total));
        assert!(tickets[1..].iter_mut().all(|t| was_shed(t).is_none()));
        assert_eq!(admission.pending_handshakes(), 128);
    }

    #[test]
    fn a_finished_handshake_leaves_and_descriptor_pressure_sheds_the_oldest_eighth() {
        let admission = admission(512);
        let mut tickets: Vec<_> = (0..16)
            .map(|_| admission.admit_handshake(ip("10.0.0.1")))
            .collect();
        drop(tickets.pop());
        assert_eq!(admission.pending_handshakes(), 15);
        assert_eq!(admission.shed_for_descriptors(), 2);
        assert_eq!(was_shed(&mut tickets[0]), Some(Shed::Descriptors));
        assert_eq!(was_shed(&mut tickets[1]), Some(Shed::Descriptors));
        assert_eq!(was_shed(&mut tickets[2]), None);
        drop(tickets);
        assert_eq!(admission.pending_handshakes(), 0);
        assert!(
            admission.lock().by_source.is_empty(),
            "no source left behind"
        );
    }
}
