//! `ztund proxy ztunnel`: the daemon configured the way Istio's ztunnel Helm chart configures
//! ztunnel (its environment variables and mounts), so that chart runs ztund with nothing but the
//! image changed. README "Istio's ztunnel Helm chart" lists the facts this follows.
//!
//! Three layers, each over the one before: the chart's environment, then a ztund config file if
//! one is given (`ZTUND_CONFIG`) or present (`/etc/ztund/config.yaml`), then `ZTUND_*`
//! ([`Config::apply_env`]). The result is checked once, by [`Config::parse`], like any config.
//!
//! ztunnel reads more variables than ztund can honour. Those that would change what ztunnel does
//! are reported as warnings (once, at start); the rest are ignored. A malformed value is an error
//! naming its variable: guessing would run a node proxy configured other than its operator wrote.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::config::{Config, ConfigError, duration_text};

/// Where the chart mounts the `istio-ca-root-cert` ConfigMap's `root-cert.pem` (relative to
/// [`CHART_ROOT_ENV`]).
pub const ROOT_CERT: &str = "var/run/secrets/istio/root-cert.pem";
/// Where the chart mounts the projected service-account token.
pub const TOKEN: &str = "var/run/secrets/tokens/istio-token";
/// The audience the chart asks for that token; istiod's CA and xDS accept only this one.
pub const TOKEN_AUDIENCE: &str = "istio-ca";
/// The service account the chart runs ztunnel as; istiod trusts it to ask for other workloads'
/// certificates (`CA_TRUSTED_NODE_ACCOUNTS`).
pub const SERVICE_ACCOUNT: &str = "ztunnel";
/// The ZDS socket istio-cni serves, in the host directory the chart mounts.
pub const ZDS_SOCKET: &str = "var/run/ztunnel/ztunnel.sock";
/// The chart's root filesystem is read-only; `/tmp` is its one writable emptyDir.
pub const STATE_DIR: &str = "tmp/ztund";
/// A ztund config file read when present and `ZTUND_CONFIG` is unset.
pub const DEFAULT_FILE: &str = "etc/ztund/config.yaml";
/// istiod in a cluster (ztunnel's default when `KUBERNETES_SERVICE_HOST` is set).
pub const ISTIOD_IN_CLUSTER: &str = "https://istiod.istio-system.svc:15012";
/// ztunnel's default outside a cluster.
pub const ISTIOD_LOCAL: &str = "https://localhost:15012";
/// The directory the chart's paths above are taken relative to: `/` unless set. Tests and
/// out-of-container runs set it to lay the mounts out elsewhere.
pub const CHART_ROOT_ENV: &str = "ZTUND_CHART_ROOT";

/// What went wrong building the config from ztunnel's environment.
#[derive(Debug, thiserror::Error)]
pub enum ZtunnelEnvError {
    #[error("environment variable {var}={value:?}: {reason}")]
    Malformed {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("environment variable {var} is not set ({why})")]
    Missing {
        var: &'static str,
        why: &'static str,
    },
    #[error("reading {path}: {reason}")]
    File { path: String, reason: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The process environment, captured once (ISTIO_META_* is read by prefix).
#[derive(Debug, Clone, Default)]
pub struct ChartEnv(BTreeMap<String, String>);

impl ChartEnv {
    pub fn from_process() -> ChartEnv {
        ChartEnv(std::env::vars().collect())
    }

    pub fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for ChartEnv {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> ChartEnv {
        ChartEnv(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

/// The config and what the operator should hear about it.
#[derive(Debug)]
pub struct ChartConfig {
    pub config: Config,
    /// The ztund config file layered on the environment, if any.
    pub file: Option<PathBuf>,
    /// ztunnel settings in the environment that ztund does not honour, one line each.
    pub warnings: Vec<String>,
}

/// Builds the daemon config from the chart's environment and mounts, a ztund file and
/// `ZTUND_*`.
pub fn load(env: &ChartEnv) -> Result<ChartConfig, ZtunnelEnvError> {
    let root = PathBuf::from(env.get(CHART_ROOT_ENV).unwrap_or_else(|| "/".into()));
    let mut layer = chart_layer(env, &root)?;
    let file = match env.get("ZTUND_CONFIG") {
        Some(path) => Some(PathBuf::from(path)),
        None => Some(root.join(DEFAULT_FILE)).filter(|p| p.exists()),
    };
    let mut origin = "the ztunnel chart's environment".to_string();
    if let Some(path) = &file {
        let text = std::fs::read_to_string(path).map_err(|e| ZtunnelEnvError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let overlay: Value = serde_norway::from_str(&text).map_err(|e| ZtunnelEnvError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        // A file of comments only is an empty layer, not a config of `null`.
        if !overlay.is_null() {
            merge(&mut layer.config, overlay);
        }
        origin = format!("{origin} with {}", path.display());
    }
    let mut config = Config::parse(&layer.config.to_string(), &origin)?;
    if let Some(base) = file.as_deref().and_then(Path::parent) {
        config.resolve_relative_paths(base);
    }
    config.apply_env(|name| env.get(name))?;
    Ok(ChartConfig {
        config,
        file,
        warnings: layer.warnings,
    })
}

/// ztunnel's drain rule (PROTOCOL.md 7.3): `CONNECTION_TERMINATION_DEADLINE` if set, else the
/// grace period less 5 s (less 1 s when it is 10 s or less), at least 1 s; else 5 s.
pub fn drain_deadline(env: &ChartEnv) -> Result<Duration, ZtunnelEnvError> {
    if let Some(text) = env.get("CONNECTION_TERMINATION_DEADLINE") {
        return duration_text::parse(&text).map_err(|reason| ZtunnelEnvError::Malformed {
            var: "CONNECTION_TERMINATION_DEADLINE",
            value: text,
            reason: reason.to_string(),
        });
    }
    let Some(text) = env.get("TERMINATION_GRACE_PERIOD_SECONDS") else {
        return Ok(Duration::from_secs(5));
    };
    let grace: u64 = text
        .trim()
        .parse()
        .map_err(|_| ZtunnelEnvError::Malformed {
            var: "TERMINATION_GRACE_PERIOD_SECONDS",
            value: text.clone(),
            reason: "not a whole number of seconds".into(),
        })?;
    let margin = if grace > 10 { 5 } else { 1 };
    Ok(Duration::from_secs(grace.saturating_sub(margin).max(1)))
}

/// The config keys the chart's environment gives, as JSON (the file layer merges into it).
struct Layer {
    config: Value,
    warnings: Vec<String>,
}

fn chart_layer(env: &ChartEnv, root: &Path) -> Result<Layer, ZtunnelEnvError> {
    let node = env.get("NODE_NAME").ok_or(ZtunnelEnvError::Missing {
        var: "NODE_NAME",
        why: "the chart sets it from spec.nodeName; ztund serves that node's pods",
    })?;
    let default_istiod = if env.get("KUBERNETES_SERVICE_HOST").is_some() {
        ISTIOD_IN_CLUSTER
    } else {
        ISTIOD_LOCAL
    };
    let xds = address(env, "XDS_ADDRESS", default_istiod)?;
    let ca = address(env, "CA_ADDRESS", default_istiod)?;
    let token = token_file(env, root)?;
    let cluster_id = env
        .get("ISTIO_META_CLUSTER_ID")
        .or_else(|| env.get("CLUSTER_ID"))
        .unwrap_or_else(|| "Kubernetes".into());
    let metadata: Map<String, Value> = env
        .0
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("ISTIO_META_")?.to_string(), json!(v))))
        .collect();
    let mut control_plane = json!({
        "address": xds,
        "rootCert": root_cert(env, "XDS_ROOT_CA", root)?,
        "tokenFile": token,
        "clusterId": cluster_id,
        "serverName": env.get("ALT_XDS_HOSTNAME"),
        "podName": env.get("POD_NAME"),
        "podNamespace": env.get("POD_NAMESPACE").unwrap_or_else(|| "istio-system".into()),
        "metadata": metadata,
    });
    if let Some(ip) = env.get("INSTANCE_IP") {
        let parsed: std::net::IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| malformed("INSTANCE_IP", &ip, "not an IP address"))?;
        control_plane["instanceIp"] = json!(parsed.to_string());
    }
    let mut config = json!({
        "node": node,
        "trustDomain": env.get("TRUST_DOMAIN").unwrap_or_else(|| "cluster.local".into()),
        "controlPlane": control_plane,
        "ca": {
            "mode": "istio",
            "address": ca,
            "rootCert": root_cert(env, "CA_ROOT_CA", root)?,
            "tokenFile": token,
            "serverName": env.get("ALT_CA_HOSTNAME"),
        },
        "capture": "istio-cni",
        "zdsSocket": env.get("INPOD_UDS").map(PathBuf::from).unwrap_or_else(|| root.join(ZDS_SOCKET)),
        "stateDir": root.join(STATE_DIR),
        "drainDeadline": duration_text::format(drain_deadline(env)?),
    });
    match env.get("LOG_FORMAT").as_deref() {
        None | Some("") => {}
        Some(format @ ("json" | "text")) => config["logFormat"] = json!(format),
        Some(other) => return Err(malformed("LOG_FORMAT", other, "use json or text")),
    }
    if let Some(level) = env.get("RUST_LOG") {
        crate::logging::check_spec(&level).map_err(|e| malformed("RUST_LOG", &level, e))?;
    }
    if let Some(ttl) = env.get("SECRET_TTL") {
        let ttl = duration_text::parse(&ttl).map_err(|e| malformed("SECRET_TTL", &ttl, &e))?;
        config["certTtl"] = json!(duration_text::format(ttl));
    }
    if let Some(threads) = worker_threads(env)? {
        config["dataPlane"] = json!({"threads": threads});
    }
    let mut pool = Map::new();
    if let Some(text) = env.get("POOL_MAX_STREAMS_PER_CONNECTION") {
        let n: u32 = text
            .trim()
            .parse()
            .map_err(|_| malformed("POOL_MAX_STREAMS_PER_CONNECTION", &text, "not a count"))?;
        pool.insert("maxStreamsPerConnection".into(), json!(n));
    }
    if let Some(text) = env.get("POOL_UNUSED_RELEASE_TIMEOUT") {
        let d = duration_text::parse(&text)
            .map_err(|e| malformed("POOL_UNUSED_RELEASE_TIMEOUT", &text, &e))?;
        pool.insert("idleTimeout".into(), json!(duration_text::format(d)));
    }
    if !pool.is_empty() {
        config["pool"] = Value::Object(pool);
    }
    let mut warnings = unhonoured(env);
    if token.is_none() {
        warnings.push(format!(
            "no token at {} and AUTH_TOKEN unset: istiod refuses unauthenticated nodes",
            root.join(TOKEN).display()
        ));
    }
    Ok(Layer { config, warnings })
}

fn malformed(var: &'static str, value: &str, reason: impl std::fmt::Display) -> ZtunnelEnvError {
    ZtunnelEnvError::Malformed {
        var,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// ztunnel takes `host:port` and adds `https://`; an empty value would mean "no control plane",
/// which ztund cannot run without.
fn address(env: &ChartEnv, var: &'static str, default: &str) -> Result<String, ZtunnelEnvError> {
    let Some(value) = env.get(var) else {
        return Ok(default.to_string());
    };
    let value = value.trim();
    if value.is_empty() {
        return Err(malformed(var, value, "ztund needs a control plane address"));
    }
    let full = if value.contains("://") {
        value.to_string()
    } else {
        format!("https://{value}")
    };
    match full.parse::<http::Uri>() {
        Ok(uri) if uri.scheme_str() == Some("https") && uri.host().is_some() => Ok(full),
        _ => Err(malformed(
            var,
            value,
            "expected host:port or https://host:port",
        )),
    }
}

/// ztunnel also accepts `SYSTEM` (the OS roots) or inline PEM here; ztund reads a file, and
/// refuses the others rather than trust something the operator did not mean.
fn root_cert(env: &ChartEnv, var: &'static str, root: &Path) -> Result<PathBuf, ZtunnelEnvError> {
    match env.get(var) {
        None => Ok(root.join(ROOT_CERT)),
        Some(v) if v == "SYSTEM" || v.contains("-----BEGIN") => Err(malformed(
            var,
            v.lines().next().unwrap_or_default(),
            "ztund reads the roots from a file: give its path",
        )),
        Some(v) => Ok(PathBuf::from(v)),
    }
}

/// `AUTH_TOKEN` names a token file (ztunnel also takes the token itself, which ztund refuses: a
/// secret in the environment); unset, the chart's projected token is used when it exists.
fn token_file(env: &ChartEnv, root: &Path) -> Result<Option<PathBuf>, ZtunnelEnvError> {
    match env.get("AUTH_TOKEN") {
        Some(path) if Path::new(&path).is_file() => Ok(Some(path.into())),
        Some(_) => Err(ZtunnelEnvError::Malformed {
            var: "AUTH_TOKEN",
            value: "(hidden)".into(),
            reason: "not a file; ztund reads the token from a file".into(),
        }),
        None => Ok(Some(root.join(TOKEN)).filter(|p| p.exists())),
    }
}

/// `ZTUNNEL_WORKER_THREADS`: a count, or a percentage of `ZTUNNEL_CPU_LIMIT` (the chart sets it
/// from the container's CPU limit) or of the cores, rounded up.
fn worker_threads(env: &ChartEnv) -> Result<Option<usize>, ZtunnelEnvError> {
    const VAR: &str = "ZTUNNEL_WORKER_THREADS";
    let Some(text) = env.get(VAR) else {
        return Ok(None);
    };
    let Some(percent) = text.trim().strip_suffix('%') else {
        return match text.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(malformed(VAR, &text, "not a thread count or a percentage")),
        };
    };
    let percent: f64 = match percent.parse() {
        Ok(p) if p > 0.0 && p <= 100.0 => p,
        _ => return Err(malformed(VAR, &text, "a percentage must be in (0, 100]")),
    };
    let cpus = match env.get("ZTUNNEL_CPU_LIMIT") {
        Some(limit) => limit
            .trim()
            .parse::<usize>()
            .map_err(|_| malformed("ZTUNNEL_CPU_LIMIT", &limit, "not a whole CPU count"))?,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    Ok(Some(
        ((cpus as f64 * percent / 100.0).ceil() as usize).max(1),
    ))
}

/// ztunnel settings that change behaviour and that ztund does not have, as set in `env`.
fn unhonoured(env: &ChartEnv) -> Vec<String> {
    let is = |var: &str, value: &str| env.get(var).is_some_and(|v| v.eq_ignore_ascii_case(value));
    let set = |var: &str| env.get(var).is_some_and(|v| !v.is_empty());
    let mut found = Vec::new();
    let mut warn = |var: &str, what: &str| found.push(format!("{var} is set but ztund {what}"));
    for (var, value, what) in [
        ("PROXY_MODE", "dedicated", "runs in shared (node) mode only"),
        (
            "INPOD_ENABLED",
            "false",
            "always serves pods in their own network namespace",
        ),
        (
            "FAKE_CA",
            "true",
            "has no fake CA; it asks the CA at CA_ADDRESS",
        ),
        ("ENABLE_PROXY", "false", "always runs its proxy"),
        (
            "XDS_ON_DEMAND",
            "true",
            "subscribes to every workload (no on-demand xDS)",
        ),
        ("IPV6_ENABLED", "false", "binds where its config says"),
        (
            "INPOD_PORT_REUSE",
            "false",
            "sets SO_REUSEPORT on every listener",
        ),
        (
            "TRANSPARENT_NETWORK_POLICIES",
            "true",
            "does not support it",
        ),
        (
            "LOCALHOST_APP_TUNNEL",
            "false",
            "does not support turning it off",
        ),
        (
            "UNSTABLE_ENABLE_SOCKS5",
            "true",
            "serves SOCKS5 only in capture mode none",
        ),
    ] {
        if is(var, value) {
            warn(var, what);
        }
    }
    for (var, what) in [
        ("NETWORK", "has no multi-network support"),
        (
            "LOCAL_XDS_PATH",
            "reads local state from meshFile (ztund YAML), not ztunnel's format",
        ),
        (
            "LOCAL_XDS",
            "reads local state from meshFile (ztund YAML), not ztunnel's format",
        ),
        (
            "PROXY_CONFIG",
            "does not read ProxyConfig; use its config file",
        ),
        (
            "ENABLE_ORIG_SRC",
            "does not spoof the source address on the node",
        ),
        ("PACKET_MARK", "uses its own fixed marks"),
        ("PREFERED_SERVICE_NAMESPACE", "does not support it"),
        ("PROXY_WORKLOAD_INFO", "runs in shared (node) mode only"),
        ("KEEPALIVE_TIME", "uses its own TCP keepalive settings"),
        ("KEEPALIVE_INTERVAL", "uses its own TCP keepalive settings"),
        ("KEEPALIVE_RETRIES", "uses its own TCP keepalive settings"),
        ("KEEPALIVE_ENABLED", "uses its own TCP keepalive settings"),
        ("USER_TIMEOUT_ENABLED", "does not set TCP_USER_TIMEOUT"),
        ("HTTP2_STREAM_WINDOW_SIZE", "uses its own HTTP/2 windows"),
        (
            "HTTP2_CONNECTION_WINDOW_SIZE",
            "uses its own HTTP/2 windows",
        ),
        ("HTTP2_FRAME_SIZE", "uses its own HTTP/2 frame size"),
    ] {
        if set(var) {
            warn(var, what);
        }
    }
    if env
        .get("CLUSTER_DOMAIN")
        .is_some_and(|d| d != "cluster.local")
    {
        warn(
            "CLUSTER_DOMAIN",
            "resolves service names in cluster.local only",
        );
    }
    for prefix in ["XDS_HEADER_", "CA_HEADER_"] {
        if env.0.keys().any(|k| k.starts_with(prefix)) {
            warn(&format!("{prefix}*"), "sends no extra headers");
        }
    }
    // ztunnel's DNS proxy is on unless this says false; ztund has none, so pods whose DNS
    // istio-cni redirects (its ambient.dnsCapture) would get no answers.
    if !is("ISTIO_META_DNS_CAPTURE", "false") {
        found.push(
            "ztund has no DNS proxy (ztunnel's listens on 15053): turn istio-cni's DNS capture \
             off (values.cni.ambient.dnsCapture=false) and set ISTIO_META_DNS_CAPTURE=false"
                .into(),
        );
    }
    found
}

/// Overlays `top` on `base`: maps merge key by key, anything else replaces. A map that names
/// another `mode` (`ca: {mode: spiffe}`) replaces the whole map: the chart's keys belong to its
/// mode.
fn merge(base: &mut Value, top: Value) {
    match (base, top) {
        (Value::Object(base), Value::Object(top))
            if top
                .get("mode")
                .is_none_or(|mode| base.get("mode") == Some(mode)) =>
        {
            for (key, value) in top {
                match base.get_mut(&key) {
                    Some(slot) => merge(slot, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, top) => *base = top,
    }
}

#[cfg(test)]
#[path = "ztunnel_env_tests.rs"]
mod tests;
