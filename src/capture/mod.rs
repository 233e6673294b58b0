//! Pods' network namespaces: the ZDS socket from istio-cni, standalone pods from the mesh file,
//! the per-pod listeners and the nftables redirection. Knows nothing about policy.
//! TODO(capture helper): implement.
