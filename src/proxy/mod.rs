//! The listeners' logic: outbound, inbound (HBONE), inbound plaintext, SOCKS5, and the byte
//! copier. Knows nothing about how its sockets got into a network namespace.

pub mod copy;
