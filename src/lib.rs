//! ztund: a node-level zero-trust tunnel daemon. See ARCHITECTURE.md for the path of one
//! connection through these modules.

pub mod admin;
pub mod capture;
pub mod check;
pub mod config;
pub mod controlplane;
pub mod daemon;
pub mod demo;
pub mod dns;
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
pub mod hbone;
pub mod identity;
pub mod logging;
pub mod mesh;
pub mod net;
pub mod policy;
pub mod proto;
pub mod proxy;
pub mod scheduling;
pub mod shard;
pub mod tls;
pub mod topology;
pub mod xds;
pub mod ztunnel_env;
