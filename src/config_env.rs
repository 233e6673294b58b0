//! `ZTUND_*` environment overrides of the daemon config: the settings operators change per
//! node without editing the file (README "Configuration reference" lists each).

use serde::de::IntoDeserializer;

use super::*;

impl Config {
    /// Applies `ZTUND_<FIELD>` overrides for the settings operators change per node.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(node) = env("ZTUND_NODE") {
            self.node = node;
        }
        if let Some(td) = env("ZTUND_TRUST_DOMAIN") {
            self.trust_domain = td;
        }
        if let Some(mesh) = env("ZTUND_MESH_FILE") {
            self.mesh_file = Some(mesh.into());
        }
        let invalid = |field, reason| ConfigError::invalid("environment", field, reason);
        if let Some(deadline) = env("ZTUND_DRAIN_DEADLINE") {
            self.drain_deadline = duration_text::parse(&deadline)
                .map_err(|e| invalid("drainDeadline", format!("ZTUND_DRAIN_DEADLINE: {e}")))?;
        }
        self.apply_control_plane_env(&env)?;
        if let Some(threads) = env("ZTUND_WORKER_THREADS") {
            let count = threads.parse().map_err(|_| {
                invalid(
                    "dataPlane.threads",
                    format!("ZTUND_WORKER_THREADS={threads:?} is not a thread count"),
                )
            })?;
            self.data_plane.threads = Some(count);
        }
        if let Some(policy) = env("ZTUND_DATA_PLANE_SCHEDULING") {
            // The same names as in the file: serde's, from the one enum.
            let text: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
                policy.as_str().into_deserializer();
            self.data_plane.scheduling = ThreadScheduling::deserialize(text).map_err(|e| {
                invalid(
                    "dataPlane.scheduling",
                    format!("ZTUND_DATA_PLANE_SCHEDULING={policy:?}: {e}"),
                )
            })?;
        }
        if let Some(backend) = env("ZTUND_CAPTURE_BACKEND") {
            let text: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
                backend.as_str().into_deserializer();
            self.capture_backend = CaptureBackend::deserialize(text).map_err(|e| {
                invalid(
                    "captureBackend",
                    format!("ZTUND_CAPTURE_BACKEND={backend:?}: {e}"),
                )
            })?;
        }
        self.dns.apply_env(&env)?;
        self.validate("environment")
    }

    /// `ZTUND_CONTROL_PLANE_ADDRESS` (with `_ROOT_CERT`, `_TOKEN_FILE`, `_SERVER_NAME`),
    /// `ZTUND_CLUSTER_ID`, `ZTUND_POD_NAME`, `ZTUND_POD_NAMESPACE`, `ZTUND_INSTANCE_IP`; an
    /// address alone turns the control plane on (its root certificate is then required).
    fn apply_control_plane_env(
        &mut self,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let invalid = |field, reason| ConfigError::invalid("environment", field, reason);
        if let Some(address) = env("ZTUND_CONTROL_PLANE_ADDRESS") {
            match &mut self.control_plane {
                Some(cp) => cp.address = address,
                None => {
                    let root_cert = env("ZTUND_CONTROL_PLANE_ROOT_CERT").ok_or_else(|| {
                        invalid(
                            "controlPlane.rootCert",
                            "ZTUND_CONTROL_PLANE_ADDRESS needs ZTUND_CONTROL_PLANE_ROOT_CERT when the file sets no controlPlane".into(),
                        )
                    })?;
                    self.control_plane = Some(ControlPlaneConfig {
                        address,
                        root_cert: root_cert.into(),
                        token_file: None,
                        cluster_id: default_cluster_id(),
                        server_name: None,
                        pod_name: None,
                        pod_namespace: default_root_namespace(),
                        instance_ip: None,
                        metadata: Default::default(),
                    });
                }
            }
        }
        let Some(cp) = &mut self.control_plane else {
            return Ok(());
        };
        if let Some(root) = env("ZTUND_CONTROL_PLANE_ROOT_CERT") {
            cp.root_cert = root.into();
        }
        if let Some(token) = env("ZTUND_CONTROL_PLANE_TOKEN_FILE") {
            cp.token_file = Some(token.into());
        }
        if let Some(name) = env("ZTUND_CONTROL_PLANE_SERVER_NAME") {
            cp.server_name = Some(name);
        }
        if let Some(cluster) = env("ZTUND_CLUSTER_ID") {
            cp.cluster_id = cluster;
        }
        if let Some(pod) = env("ZTUND_POD_NAME") {
            cp.pod_name = Some(pod);
        }
        if let Some(namespace) = env("ZTUND_POD_NAMESPACE") {
            cp.pod_namespace = namespace;
        }
        if let Some(ip) = env("ZTUND_INSTANCE_IP") {
            cp.instance_ip = Some(ip.parse().map_err(|_| {
                invalid(
                    "controlPlane.instanceIp",
                    format!("ZTUND_INSTANCE_IP={ip:?} is not an IP address"),
                )
            })?);
        }
        Ok(())
    }
}
