//! The listeners' logic: outbound (transparent and SOCKS5), inbound (HBONE), inbound plaintext,
//! and the byte copier. Knows nothing about how its sockets got into a network namespace.

pub mod context;
pub mod copy;
pub mod inbound;
pub mod inbound_plaintext;
pub mod labels;
pub mod outbound;
pub mod route;
pub mod socks5;
