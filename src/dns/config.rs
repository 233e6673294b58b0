//! The `dns:` section of the daemon config: whether the DNS proxy runs, where, which upstream
//! resolvers it forwards to, and its limits. Parsed and validated with the rest of the config
//! (`crate::config`); knows nothing about sockets.
#![deny(missing_docs)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, duration_text};

/// The DNS proxy's settings (README, "Configuration reference", `dns.*`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Run the DNS proxy (15053 in each captured pod, and on a VM host) and redirect the
    /// workloads' port 53 to it. `ZTUND_DNS_ENABLED` overrides it.
    pub enabled: bool,
    /// The proxy's port, on `127.0.0.1` (and `::1` where the namespace has IPv6); 15053.
    pub port: u16,
    /// Upstream resolvers (`IP` or `IP:port`; port 53 by default), tried in order. Empty: the
    /// `nameserver` lines of `resolvConf`. `ZTUND_DNS_UPSTREAMS` (comma-separated) overrides it.
    pub upstreams: Vec<String>,
    /// Where the upstreams are read from when `upstreams` is empty.
    pub resolv_conf: PathBuf,
    /// How long one upstream may take to answer a forwarded query before the next is tried.
    #[serde(with = "duration_text")]
    pub timeout: Duration,
    /// Forwarded queries in flight at once, over the whole node; past it a query is answered
    /// REFUSED at once, so a flood costs no memory.
    pub max_concurrent_forwards: u32,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            enabled: false,
            port: 15053,
            upstreams: Vec::new(),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            timeout: Duration::from_secs(5),
            max_concurrent_forwards: 1024,
        }
    }
}

/// More concurrent forwards than this is a typo: each holds a socket.
const MAX_CONCURRENT_FORWARDS: u32 = 65_536;

impl DnsConfig {
    /// The first invalid key with the reason, if any.
    pub fn invalid(&self) -> Option<(&'static str, String)> {
        let (least, most) = (Duration::from_millis(10), Duration::from_secs(60));
        if self.timeout < least || self.timeout > most {
            return Some((
                "dns.timeout",
                format!(
                    "{} is out of range: must be from 10ms to 60s",
                    duration_text::format(self.timeout)
                ),
            ));
        }
        if self.max_concurrent_forwards == 0
            || self.max_concurrent_forwards > MAX_CONCURRENT_FORWARDS
        {
            return Some((
                "dns.maxConcurrentForwards",
                format!(
                    "{} is out of range: must be from 1 to {MAX_CONCURRENT_FORWARDS}",
                    self.max_concurrent_forwards
                ),
            ));
        }
        if self.port == 0 {
            return Some(("dns.port", "must not be 0".into()));
        }
        for upstream in &self.upstreams {
            if parse_upstream(upstream).is_none() {
                return Some((
                    "dns.upstreams",
                    format!("{upstream:?} is not an IP address or IP:port"),
                ));
            }
        }
        None
    }

    /// Applies `ZTUND_DNS_ENABLED` and `ZTUND_DNS_UPSTREAMS`; the error names the variable.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(enabled) = env("ZTUND_DNS_ENABLED") {
            self.enabled = match enabled.trim() {
                "true" | "1" => true,
                "false" | "0" => false,
                other => {
                    return Err(ConfigError::Invalid {
                        path: "environment".into(),
                        field: "dns.enabled",
                        reason: format!("ZTUND_DNS_ENABLED={other:?} is not true or false"),
                    });
                }
            };
        }
        if let Some(upstreams) = env("ZTUND_DNS_UPSTREAMS") {
            self.upstreams = upstreams
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_string)
                .collect();
        }
        Ok(())
    }

    /// The upstream resolvers: `upstreams`, else `resolvConf`'s nameservers (an unreadable
    /// file gives none: every forwarded query then fails with SERVFAIL, counted).
    pub fn upstream_addrs(&self) -> Vec<SocketAddr> {
        if !self.upstreams.is_empty() {
            return self
                .upstreams
                .iter()
                .filter_map(|u| parse_upstream(u))
                .collect();
        }
        std::fs::read_to_string(&self.resolv_conf)
            .map(|text| nameservers(&text))
            .unwrap_or_default()
    }

    /// `resolvConf` relative to the config file's directory.
    pub(crate) fn resolve_relative_paths(&mut self, base: &Path) {
        if self.resolv_conf.is_relative() {
            self.resolv_conf = base.join(&self.resolv_conf);
        }
    }
}

/// `IP`, `IP:port` or `[IPv6]:port`.
fn parse_upstream(text: &str) -> Option<SocketAddr> {
    text.parse::<SocketAddr>().ok().or_else(|| {
        text.parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

/// The `nameserver` addresses of a resolv.conf, port 53, in order.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_come_from_resolv_conf_in_order() {
        let text = "search default.svc.cluster.local svc.cluster.local\n\
                    nameserver 10.96.0.10\n# nameserver 1.1.1.1\nnameserver fd00::a\noptions ndots:5\n";
        let found: Vec<String> = nameservers(text).iter().map(ToString::to_string).collect();
        assert_eq!(found, ["10.96.0.10:53", "[fd00::a]:53"]);
    }

    #[test]
    fn the_environment_turns_dns_on_and_names_the_upstreams() {
        let mut config = DnsConfig::default();
        let env = |key: &str| match key {
            "ZTUND_DNS_ENABLED" => Some("true".to_string()),
            "ZTUND_DNS_UPSTREAMS" => Some("10.0.0.1, 10.0.0.2:5353".to_string()),
            _ => None,
        };
        config.apply_env(env).unwrap();
        assert!(config.enabled);
        assert_eq!(config.upstreams, ["10.0.0.1", "10.0.0.2:5353"]);
        let bad = DnsConfig::default()
            .apply_env(|key| (key == "ZTUND_DNS_ENABLED").then(|| "yes".to_string()));
        let message = bad.unwrap_err().to_string();
        assert!(
            message.contains("dns.enabled") && message.contains("\"yes\""),
            "{message}"
        );
    }

    #[test]
    fn upstreams_take_a_port_or_default_to_53() {
        let config = DnsConfig {
            upstreams: vec!["10.0.0.1".into(), "10.0.0.2:5353".into(), "[::1]:53".into()],
            ..DnsConfig::default()
        };
        assert_eq!(config.invalid(), None);
        let found: Vec<String> = config
            .upstream_addrs()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(found, ["10.0.0.1:53", "10.0.0.2:5353", "[::1]:53"]);
        let bad = DnsConfig {
            upstreams: vec!["resolver.example".into()],
            ..DnsConfig::default()
        };
        assert_eq!(bad.invalid().map(|(field, _)| field), Some("dns.upstreams"));
    }
}
