//! Delta ADS client for Istio's workload API: one stream to the control plane, wildcard
//! subscriptions to `istio.workload.Address` and `istio.security.Authorization` (and ztund's own
//! DestinationRule type), ACK/NACK, removals, reconnect with backoff and
//! `initial_resource_versions`. Decoded resources feed `mesh` as one immutable snapshot; the
//! data path never waits on this module.
//!
//! Layers, each its own file:
//! - `client`: the stream protocol only; it hands raw resources to a [`ResourceSink`];
//! - `convert`: protobuf → mesh model, one error per bad resource (the NACK's text);
//! - `state`: the resources held, by type and name, and the snapshot built from them (merged
//!   with the mesh file when both are configured).

pub mod convert;
pub mod state;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prost_types::Any;

pub mod client;
pub mod metrics;

/// One resource as the control plane sent it.
#[derive(Debug, Clone)]
pub struct RawResource {
    pub name: String,
    pub version: String,
    pub resource: Option<Any>,
}

/// What the client does with the resources of one response.
pub trait ResourceSink: Send {
    /// Applies one response of `type_url`: `added` resources (new or changed) and `removed`
    /// names. Returns the names it rejected with their reasons; the rest must be applied (a
    /// NACK still applies the good part, as ztunnel does).
    fn apply(
        &mut self,
        type_url: &str,
        added: Vec<RawResource>,
        removed: Vec<String>,
    ) -> Vec<(String, String)>;

    /// Versions of the resources of `type_url` held now (sent as `initial_resource_versions`
    /// on a reconnect). Rejected resources are left out, so the server resends them.
    fn versions(&self, type_url: &str) -> HashMap<String, String>;
}

/// A sink shared with others (the daemon rebuilds snapshots from it too): locked per call.
impl<S: ResourceSink> ResourceSink for Arc<Mutex<S>> {
    fn apply(
        &mut self,
        type_url: &str,
        added: Vec<RawResource>,
        removed: Vec<String>,
    ) -> Vec<(String, String)> {
        let mut sink = self.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        sink.apply(type_url, added, removed)
    }

    fn versions(&self, type_url: &str) -> HashMap<String, String> {
        let sink = self.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        sink.versions(type_url)
    }
}
