//! The generated protobuf messages and gRPC stubs, one module per protobuf package (the nesting
//! lets generated code refer across packages). Written by `build.rs` from `proto/`; the field
//! numbers are Istio's and Envoy's (PROTOCOL.md §2–5), so the bytes on the wire are theirs.

#![allow(clippy::all, missing_docs)]

pub mod istio {
    pub mod workload {
        include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));
        /// ZDS, istio-cni ↔ node proxy (PROTOCOL.md §5).
        pub mod zds {
            include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));
        }
    }
    pub mod security {
        include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
    }
    pub mod v1 {
        pub mod auth {
            include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
        }
    }
}

pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.config.core.v3.rs"));
            }
        }
    }
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
            }
        }
    }
}

pub mod google {
    pub mod rpc {
        include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
    }
}

pub mod ztund {
    pub mod config {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/ztund.config.v1.rs"));
        }
    }
}

/// Type URLs of the xDS resources ztund exchanges.
pub mod type_url {
    /// Workloads and services (`istio.workload.Address`).
    pub const ADDRESS: &str = "type.googleapis.com/istio.workload.Address";
    /// L4 authorization policies (`istio.security.Authorization`).
    pub const AUTHORIZATION: &str = "type.googleapis.com/istio.security.Authorization";
    /// ztund's own: DestinationRules (`ztund.config.v1.DestinationRule`); istiod never sends it.
    pub const DESTINATION_RULE: &str = "type.googleapis.com/ztund.config.v1.DestinationRule";
}
