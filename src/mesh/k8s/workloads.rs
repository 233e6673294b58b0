//! Pod, WorkloadEntry, Service and ServiceEntry documents.
//! TODO(mesh helper): implement.
