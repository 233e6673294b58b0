//! Making sockets where they belong: in a pod's network namespace (entered on the calling thread
//! with `setns` and left straight after), carrying ztund's mark so the redirection rules let them
//! pass. Everything in `proxy` creates its sockets through a [`SocketFactory`].
//! TODO(capture helper): implement netns entry.

/// ztund's socket mark: the redirection rules let packets with it through (PROTOCOL.md §5.5).
pub const ZTUND_MARK: u32 = 0x539;
/// Connection mark for replies that must come back to ztund's transparent sockets.
pub const TPROXY_CONNMARK: u32 = 0x111;
