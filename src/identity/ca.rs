//! The built-in CA (`rcgen`) and an organisation's Istio-style `cacerts` directory.
//! TODO(identity helper): implement.
