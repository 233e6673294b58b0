//! The field names of each part of a document that ztund holds to a schema: Istio's, and
//! Kubernetes' object envelope. A key outside these lists is an error naming it (HARDENING Y3),
//! so a misspelt field can never be read as absent. Kubernetes' own Pod and Service specs are not
//! listed: the API server validates them and they grow with every release.

/// Every kind's top level.
pub(crate) const ENVELOPE: &[&str] = &["apiVersion", "kind", "metadata", "spec", "status"];

/// Kubernetes' ObjectMeta: what `metadata` may hold in any kind.
pub(crate) const OBJECT_META: &[&str] = &[
    "name",
    "namespace",
    "labels",
    "annotations",
    "uid",
    "creationTimestamp",
    "resourceVersion",
    "generation",
    "generateName",
    "managedFields",
    "ownerReferences",
    "finalizers",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
];

/// Istio's WorkloadEntry spec, also the shape of a ServiceEntry endpoint.
pub(crate) const WORKLOAD_ENTRY_SPEC: &[&str] = &[
    "address",
    "ports",
    "labels",
    "network",
    "locality",
    "weight",
    "serviceAccount",
];

/// Istio's ServiceEntry spec.
pub(crate) const SERVICE_ENTRY_SPEC: &[&str] = &[
    "hosts",
    "addresses",
    "ports",
    "location",
    "resolution",
    "endpoints",
    "workloadSelector",
    "exportTo",
    "subjectAltNames",
];

/// One of a ServiceEntry's `ports`.
pub(crate) const SERVICE_ENTRY_PORT: &[&str] = &["number", "protocol", "name", "targetPort"];
