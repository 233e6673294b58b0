//! Reading Kubernetes/Istio YAML into the mesh model.
//! TODO(mesh helper): implement.
