//! PeerAuthentication, AuthorizationPolicy and DestinationRule documents.
//! TODO(policy helper): implement.
