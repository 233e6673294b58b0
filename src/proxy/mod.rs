//! The listeners' logic: outbound (transparent and SOCKS5), inbound (HBONE), inbound plaintext,
//! TLS origination, the registry of open inbound connections, and the byte copier.
//! Knows nothing about how its sockets got into a network namespace.

pub mod accept;
pub mod context;
pub mod copy;
pub mod inbound;
pub mod inbound_plaintext;
pub mod labels;
pub mod originate;
pub mod outbound;
pub mod route;
pub mod socks5;
pub mod tracker;
