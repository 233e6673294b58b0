//! Reading Kubernetes/Istio YAML into the mesh model, with errors that name the file, the
//! document and the field.
//! TODO(mesh helper): split multi-document files into `RawDocument`s; Pod, WorkloadEntry,
//! Service, ServiceEntry live in `workloads`; the security documents in `security`.

pub mod security;
pub mod workloads;
