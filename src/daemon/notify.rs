//! systemd's service notification protocol (sd_notify(3)): newline-separated `KEY=VALUE`
//! assignments in one datagram to the unix socket named by `$NOTIFY_SOCKET` (a path, or an
//! abstract name written with a leading `@`). Thirty lines of our own beat a crate. Without
//! `$NOTIFY_SOCKET` (not started by systemd, or not `Type=notify`) every call is a no-op.
//!
//! The daemon says `READY=1` once readiness would first answer 200, `STATUS=` lines for
//! `systemctl status`, `STOPPING=1` when the drain starts, and `WATCHDOG=1` while its runtimes
//! answer (see [`watchdog`]).

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, warn};

use crate::admin::Readiness;
use crate::shard::Spawner;

/// Why `$NOTIFY_SOCKET` or `$WATCHDOG_USEC` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET {0:?}: not an absolute path or an @abstract name")]
    Address(String),
    #[error("NOTIFY_SOCKET {address:?}: {source}")]
    Socket {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("WATCHDOG_USEC {0:?}: not a positive number of microseconds")]
    WatchdogUsec(String),
}

/// Where notifications go; `None` inside when systemd did not ask for them.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    target: Option<std::sync::Arc<(UnixDatagram, SocketAddr, String)>>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; a no-op notifier when it is unset or empty.
    pub fn from_env() -> Result<Notifier, NotifyError> {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(address) if !address.is_empty() => Notifier::to(&address),
            _ => Ok(Notifier::default()),
        }
    }

    /// Notifications to `address` (a path or `@name`).
    pub fn to(address: &str) -> Result<Notifier, NotifyError> {
        let socket_error = |source| NotifyError::Socket {
            address: address.to_string(),
            source,
        };
        let target = if let Some(name) = address.strip_prefix('@') {
            SocketAddr::from_abstract_name(name.as_bytes()).map_err(socket_error)?
        } else if address.starts_with('/') {
            SocketAddr::from_pathname(address).map_err(socket_error)?
        } else {
            return Err(NotifyError::Address(address.to_string()));
        };
        let socket = UnixDatagram::unbound().map_err(socket_error)?;
        Ok(Notifier {
            target: Some(std::sync::Arc::new((socket, target, address.to_string()))),
        })
    }

    /// Whether anything is listening for notifications.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `state` (one or more `KEY=VALUE` lines). A failure is logged, never fatal: the
    /// daemon serves traffic whether or not systemd hears about it.
    pub fn send(&self, state: &str) {
        let Some(target) = &self.target else {
            return;
        };
        let (socket, address, name) = &**target;
        match socket.send_to_addr(state.as_bytes(), address) {
            Ok(_) => debug!(state, "notified systemd"),
            Err(e) => warn!(socket = %name, error = %e, state, "cannot notify systemd"),
        }
    }

    /// `STATUS=` for `systemctl status`; newlines would start a new assignment, so they go.
    pub fn status(&self, text: &str) {
        self.send(&format!("STATUS={}", text.replace('\n', " ")));
    }
}

/// Half of `$WATCHDOG_USEC`, the interval systemd recommends, when the watchdog is on for this
/// process (`$WATCHDOG_PID` unset or ours).
pub fn watchdog_interval() -> Result<Option<Duration>, NotifyError> {
    let Ok(usec) = std::env::var("WATCHDOG_USEC") else {
        return Ok(None);
    };
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.trim() != std::process::id().to_string()
    {
        return Ok(None);
    }
    match usec.trim().parse::<u64>() {
        Ok(usec) if usec > 0 => Ok(Some(Duration::from_micros(usec) / 2)),
        _ => Err(NotifyError::WatchdogUsec(usec)),
    }
}

/// Says `READY=1` the first time no readiness task is pending (the moment `/healthz/ready`
/// would first answer 200; the caller starts this once that listener is bound), with `STATUS=`
/// naming what start-up still waits for until then.
pub async fn announce_ready(notifier: Notifier, readiness: Readiness, ready_status: String) {
    let mut changes = readiness.subscribe();
    loop {
        let pending = readiness.pending();
        if pending.is_empty() {
            notifier.send(&format!("READY=1\nSTATUS={ready_status}"));
            return;
        }
        notifier.status(&format!("starting: waiting for {}", pending.join(", ")));
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Says `WATCHDOG=1` every `interval` while the main runtime (this task runs there) and every
/// data-plane shard run a trivial task within `interval`: a daemon with a stuck thread stops
/// petting, and systemd restarts it. Ends when the drain starts.
pub async fn watchdog(
    notifier: Notifier,
    interval: Duration,
    shards: Spawner,
    mut drain: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = drain.wait_for(|d| *d) => return,
        }
        let probes = shards.spawn_each(|_| async {});
        let answered = tokio::time::timeout(interval, futures::future::join_all(probes)).await;
        match answered {
            Ok(results) if results.iter().all(Result::is_ok) => notifier.send("WATCHDOG=1"),
            _ => warn!("a data-plane thread did not answer; not petting the systemd watchdog"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::to(path.to_str().unwrap()).unwrap();
        notifier.status("a\nb");
        assert_eq!(receive(&socket), "STATUS=a b");
    }

    #[test]
    fn sends_to_an_abstract_name() {
        let name = format!("ztund-notify-test-{}", std::process::id());
        let address = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&address).unwrap();
        Notifier::to(&format!("@{name}")).unwrap().send("READY=1");
        assert_eq!(receive(&socket), "READY=1");
    }

    #[test]
    fn a_relative_address_is_refused_by_name() {
        let err = Notifier::to("run/notify").unwrap_err();
        assert!(err.to_string().contains("NOTIFY_SOCKET"), "{err}");
    }

    #[test]
    fn without_a_socket_nothing_happens() {
        let notifier = Notifier::default();
        assert!(!notifier.is_enabled());
        notifier.send("READY=1");
    }

    #[tokio::test]
    async fn ready_waits_for_every_pending_task() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::to(path.to_str().unwrap()).unwrap();
        let readiness = Readiness::new();
        let task = readiness.register("certificates");
        let announcing = tokio::spawn(announce_ready(notifier, readiness, "ready".into()));
        let first = tokio::task::spawn_blocking({
            let socket = socket.try_clone().unwrap();
            move || receive(&socket)
        })
        .await
        .unwrap();
        assert_eq!(first, "STATUS=starting: waiting for certificates");
        task.ready();
        announcing.await.unwrap();
        assert_eq!(receive(&socket), "READY=1\nSTATUS=ready");
    }
}
