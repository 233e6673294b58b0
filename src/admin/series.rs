//! The per-connection side of the traffic metrics: one label set's counters ([`TrafficSeries`]),
//! the key a connection's labels were derived from ([`SeriesKey`]), and the cache that maps one
//! to the other so that a connection between a pair already seen neither builds nor hashes
//! labels. [`super::Metrics`] owns the cache and the families the counters come from.

use std::any::Any;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::labels::TrafficLabels;
use crate::identity::SpiffeId;

/// One label set's traffic counters. Each is taken from its family on first use, so the
/// exposition lists exactly the series that the label-by-label API would have created.
#[derive(Debug)]
pub struct TrafficSeries {
    pub(super) labels: TrafficLabels,
    pub(super) opened: OnceLock<Counter>,
    pub(super) closed: OnceLock<Counter>,
    pub(super) failed: OnceLock<Counter>,
    pub(super) received: OnceLock<Counter>,
    pub(super) sent: OnceLock<Counter>,
}

impl TrafficSeries {
    pub(super) fn new(labels: TrafficLabels) -> Self {
        TrafficSeries {
            labels,
            opened: OnceLock::new(),
            closed: OnceLock::new(),
            failed: OnceLock::new(),
            received: OnceLock::new(),
            sent: OnceLock::new(),
        }
    }

    pub fn labels(&self) -> &TrafficLabels {
        &self.labels
    }

    pub(super) fn counter<'a>(
        &self,
        slot: &'a OnceLock<Counter>,
        family: &Family<TrafficLabels, Counter>,
    ) -> &'a Counter {
        slot.get_or_init(|| family.get_or_create(&self.labels).clone())
    }
}

/// What a connection's labels were derived from: a derivation name, the shared objects it read
/// (compared by address, and kept alive by the key so an address cannot be reused while it is
/// cached) and the peer's identity. The caller promises that equal keys give equal labels,
/// which holds when the objects are immutable (snapshot entries).
#[derive(Clone)]
pub struct SeriesKey {
    derivation: &'static str,
    sources: [Option<Arc<dyn Any + Send + Sync>>; 3],
    peer: Option<SpiffeId>,
}

impl SeriesKey {
    pub fn new(
        derivation: &'static str,
        sources: [Option<Arc<dyn Any + Send + Sync>>; 3],
        peer: Option<SpiffeId>,
    ) -> Self {
        SeriesKey {
            derivation,
            sources,
            peer,
        }
    }

    fn addresses(&self) -> [*const (); 3] {
        self.sources.each_ref().map(|source| {
            source
                .as_ref()
                .map_or(std::ptr::null(), |s| Arc::as_ptr(s).cast::<()>())
        })
    }

    /// Whether anyone but the cache still holds the objects (a snapshot or a connection).
    fn in_use(&self) -> bool {
        self.sources
            .iter()
            .flatten()
            .all(|source| Arc::strong_count(source) > 1)
    }
}

impl PartialEq for SeriesKey {
    fn eq(&self, other: &Self) -> bool {
        self.derivation == other.derivation
            && self.addresses() == other.addresses()
            && self.peer == other.peer
    }
}

impl Eq for SeriesKey {}

impl Hash for SeriesKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.derivation.hash(state);
        self.addresses().hash(state);
        self.peer.hash(state);
    }
}

impl std::fmt::Debug for SeriesKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeriesKey")
            .field("derivation", &self.derivation)
            .field("sources", &self.addresses())
            .field("peer", &self.peer)
            .finish()
    }
}

/// Series by key. Entries whose objects left every snapshot are dropped when the cache has
/// doubled since the last sweep; past [`SeriesCache::MAX`] live entries it starts over.
#[derive(Debug, Default)]
pub(super) struct SeriesCache {
    pub(super) series: HashMap<SeriesKey, Arc<TrafficSeries>>,
    sweep_at: usize,
}

impl SeriesCache {
    pub(super) const FIRST_SWEEP: usize = 1024;
    const MAX: usize = 1 << 16;

    pub(super) fn insert(
        &mut self,
        key: SeriesKey,
        series: Arc<TrafficSeries>,
    ) -> Arc<TrafficSeries> {
        let series = self.series.entry(key).or_insert(series).clone();
        if self.series.len() >= self.sweep_at.max(Self::FIRST_SWEEP) {
            self.series.retain(|key, _| key.in_use());
            if self.series.len() >= Self::MAX {
                self.series.clear();
            }
            self.sweep_at = 2 * self.series.len();
        }
        series
    }
}
