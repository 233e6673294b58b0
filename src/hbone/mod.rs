//! HBONE: HTTP/2 CONNECT over mutual TLS. The server side (port 15008) and the pooled,
//! multiplexed client side. Knows nothing about policy: the caller decides.
//! TODO(hbone helper): implement.
