//! TLS configurations per identity, cached so listeners and the connection pool do not rebuild
//! them per connection, and rebuilt when the certificate underneath was renewed. Owns no
//! certificates itself (`CertManager` does) and holds no connection state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::{ClientConfig, ServerConfig};

use super::{KeyExchange, TlsError, client_config_with, server_config_with};
use crate::identity::{CertManager, SpiffeId, WorkloadCertificate};

/// Past this many (source, expected) pairs the client cache starts over rather than grow.
const MAX_CLIENT_CONFIGS: usize = 4096;

/// rustls configurations for the node's identities, fresh with respect to their certificates.
#[derive(Debug)]
pub struct Credentials {
    certs: Arc<CertManager>,
    key_exchange: KeyExchange,
    servers: Mutex<HashMap<SpiffeId, Built<ServerConfig>>>,
    clients: Mutex<HashMap<ClientKey, Built<ClientConfig>>>,
}

/// A client configuration is specific to its source and the (sorted) identities it accepts.
type ClientKey = (SpiffeId, Vec<SpiffeId>);

/// A configuration and the certificate it was built from: stale once the manager holds another.
#[derive(Debug)]
struct Built<T> {
    cert: Arc<WorkloadCertificate>,
    config: Arc<T>,
}

impl Credentials {
    /// Configurations over `certs`' certificates.
    pub fn new(certs: Arc<CertManager>) -> Credentials {
        Credentials {
            certs,
            key_exchange: KeyExchange::default(),
            servers: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The same, offering and accepting `key_exchange`'s groups (`tls.keyExchange`).
    pub fn with_key_exchange(mut self, key_exchange: KeyExchange) -> Credentials {
        self.key_exchange = key_exchange;
        self
    }

    /// The certificate cache underneath.
    pub fn certs(&self) -> &Arc<CertManager> {
        &self.certs
    }

    /// The HBONE server configuration for `id` (inbound on 15008).
    pub async fn server_config(&self, id: &SpiffeId) -> Result<Arc<ServerConfig>, TlsError> {
        let cert = self.certs.fetch(id).await?;
        if let Some(built) = lock(&self.servers).get(id)
            && Arc::ptr_eq(&built.cert, &cert)
        {
            return Ok(built.config.clone());
        }
        let config = server_config_with(&cert, self.key_exchange)?;
        let built = Built {
            cert,
            config: config.clone(),
        };
        lock(&self.servers).insert(id.clone(), built);
        Ok(config)
    }

    /// The HBONE client configuration for a connection from `src` to a peer proving one of
    /// `expected` (order and duplicates do not matter).
    pub async fn client_config(
        &self,
        src: &SpiffeId,
        expected: &[SpiffeId],
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let cert = self.certs.fetch(src).await?;
        let mut expected = expected.to_vec();
        expected.sort();
        expected.dedup();
        let key = (src.clone(), expected);
        if let Some(built) = lock(&self.clients).get(&key)
            && Arc::ptr_eq(&built.cert, &cert)
        {
            return Ok(built.config.clone());
        }
        let config = client_config_with(&cert, &key.1, self.key_exchange)?;
        let built = Built {
            cert,
            config: config.clone(),
        };
        let mut clients = lock(&self.clients);
        if clients.len() >= MAX_CLIENT_CONFIGS {
            clients.clear();
        }
        clients.insert(key, built);
        Ok(config)
    }

    /// Drops `id`'s certificate and every configuration built from it.
    pub fn forget(&self, id: &SpiffeId) {
        lock(&self.servers).remove(id);
        lock(&self.clients).retain(|(src, _), _| src != id);
        self.certs.forget(id);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Only whole-entry inserts and removals happen under these locks: a poisoned map is intact.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
