//! Effective inbound mTLS mode: STRICT/PERMISSIVE/DISABLE/UNSET at mesh, namespace and workload
//! level, oldest-wins within a level, and portLevelMtls in both directions.

use super::{policies, workload};
use crate::policy::{InboundMode, inbound_mtls_mode, workload_mtls_mode};

use InboundMode::{Disable, Permissive, Strict};

/// A PeerAuthentication; `selector` may be empty, `extra` holds more spec lines.
fn pa(ns: &str, name: &str, created: &str, mode: &str, selector: &str, extra: &str) -> String {
    let created = if created.is_empty() {
        String::new()
    } else {
        format!(", creationTimestamp: '{created}'")
    };
    let mtls = if mode.is_empty() {
        String::new()
    } else {
        format!("  mtls: {{mode: {mode}}}\n")
    };
    let selector = if selector.is_empty() {
        String::new()
    } else {
        format!("  selector: {{matchLabels: {{{selector}}}}}\n")
    };
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}{created}}}\nspec:\n{mtls}{selector}{extra}\n---\n"
    )
}

fn mesh(mode: &str) -> String {
    pa("istio-system", "mesh", "", mode, "", "")
}
fn ns(mode: &str) -> String {
    pa("default", "ns", "", mode, "", "")
}
fn wl(mode: &str) -> String {
    pa("default", "wl", "", mode, "app: web", "")
}

const T1: &str = "2024-01-01T00:00:00Z";
const T2: &str = "2024-06-01T00:00:00Z";

#[test]
fn precedence_table() {
    // (name, yaml, port, expected mode, decided by)
    let cases: Vec<(&str, String, u16, InboundMode, Option<&str>)> = vec![
        (
            "nothing: PERMISSIVE by default",
            String::new(),
            80,
            Permissive,
            None,
        ),
        (
            "mesh STRICT",
            mesh("STRICT"),
            80,
            Strict,
            Some("istio-system/mesh"),
        ),
        (
            "mesh PERMISSIVE",
            mesh("PERMISSIVE"),
            80,
            Permissive,
            Some("istio-system/mesh"),
        ),
        (
            "mesh DISABLE",
            mesh("DISABLE"),
            80,
            Disable,
            Some("istio-system/mesh"),
        ),
        ("mesh UNSET", mesh("UNSET"), 80, Permissive, None),
        ("mesh without mtls", mesh(""), 80, Permissive, None),
        (
            "namespace STRICT",
            ns("STRICT"),
            80,
            Strict,
            Some("default/ns"),
        ),
        (
            "namespace DISABLE over mesh STRICT",
            mesh("STRICT") + &ns("DISABLE"),
            80,
            Disable,
            Some("default/ns"),
        ),
        (
            "namespace UNSET inherits mesh STRICT",
            mesh("STRICT") + &ns("UNSET"),
            80,
            Strict,
            Some("istio-system/mesh"),
        ),
        (
            "namespace PERMISSIVE over mesh STRICT",
            mesh("STRICT") + &ns("PERMISSIVE"),
            80,
            Permissive,
            Some("default/ns"),
        ),
        (
            "workload STRICT over namespace PERMISSIVE",
            ns("PERMISSIVE") + &wl("STRICT"),
            80,
            Strict,
            Some("default/wl"),
        ),
        (
            "workload PERMISSIVE over namespace STRICT",
            ns("STRICT") + &wl("PERMISSIVE"),
            80,
            Permissive,
            Some("default/wl"),
        ),
        (
            "workload DISABLE over mesh STRICT",
            mesh("STRICT") + &wl("DISABLE"),
            80,
            Disable,
            Some("default/wl"),
        ),
        (
            "workload UNSET inherits namespace",
            mesh("PERMISSIVE") + &ns("STRICT") + &wl("UNSET"),
            80,
            Strict,
            Some("default/ns"),
        ),
        (
            "workload UNSET, namespace UNSET, mesh STRICT",
            mesh("STRICT") + &ns("UNSET") + &wl(""),
            80,
            Strict,
            Some("istio-system/mesh"),
        ),
        (
            "other namespaces' policies do not apply",
            pa("prod", "ns", "", "STRICT", "", "")
                + &pa("prod", "wl", "", "STRICT", "app: web", ""),
            80,
            Permissive,
            None,
        ),
        (
            "oldest namespace policy wins",
            pa("default", "b-new", T2, "PERMISSIVE", "", "")
                + &pa("default", "a-old", T1, "STRICT", "", ""),
            80,
            Strict,
            Some("default/a-old"),
        ),
        (
            "oldest wins regardless of name",
            pa("default", "a-new", T2, "STRICT", "", "")
                + &pa("default", "z-old", T1, "PERMISSIVE", "", ""),
            80,
            Permissive,
            Some("default/z-old"),
        ),
        (
            "same age: the first name wins",
            pa("default", "beta", T1, "STRICT", "", "")
                + &pa("default", "alpha", T1, "DISABLE", "", ""),
            80,
            Disable,
            Some("default/alpha"),
        ),
        (
            "oldest workload policy wins among those that select",
            pa("default", "young", T2, "STRICT", "app: web", "")
                + &pa("default", "old", T1, "PERMISSIVE", "version: v1", ""),
            80,
            Permissive,
            Some("default/old"),
        ),
        (
            "oldest mesh policy wins, timezone offsets honoured",
            pa(
                "istio-system",
                "a",
                "2024-01-01T03:00:00+05:00",
                "STRICT",
                "",
                "",
            ) + &pa(
                "istio-system",
                "b",
                "2024-01-01T00:00:00Z",
                "PERMISSIVE",
                "",
                "",
            ),
            80,
            Strict,
            Some("istio-system/a"),
        ),
        (
            "portLevelMtls PERMISSIVE under workload STRICT",
            pa(
                "default",
                "wl",
                "",
                "STRICT",
                "app: web",
                "  portLevelMtls: {8080: {mode: PERMISSIVE}}",
            ),
            8080,
            Permissive,
            Some("default/wl"),
        ),
        (
            "other ports keep the workload mode",
            pa(
                "default",
                "wl",
                "",
                "STRICT",
                "app: web",
                "  portLevelMtls: {8080: {mode: PERMISSIVE}}",
            ),
            9090,
            Strict,
            Some("default/wl"),
        ),
        (
            "portLevelMtls STRICT under namespace PERMISSIVE",
            ns("PERMISSIVE")
                + &pa(
                    "default",
                    "wl",
                    "",
                    "",
                    "app: web",
                    "  portLevelMtls: {9090: {mode: STRICT}}",
                ),
            9090,
            Strict,
            Some("default/wl"),
        ),
        (
            "UNSET port inherits the workload's inherited mode",
            ns("STRICT")
                + &pa(
                    "default",
                    "wl",
                    "",
                    "",
                    "app: web",
                    "  portLevelMtls: {9090: {mode: UNSET}}",
                ),
            9090,
            Strict,
            Some("default/ns"),
        ),
    ];
    let web = workload("default", "web", "web", "10.0.0.2", "app=web,version=v1");
    for (name, yaml, port, mode, by) in cases {
        let set = policies(&yaml);
        let effective = inbound_mtls_mode(&set, &web, port);
        assert_eq!(effective.mode, mode, "{name}");
        assert_eq!(effective.decided_by.as_deref(), by, "{name}");
    }
}

#[test]
fn workload_mode_ignores_port_settings() {
    let set = policies(&pa(
        "default",
        "wl",
        "",
        "PERMISSIVE",
        "app: web",
        "  portLevelMtls: {80: {mode: STRICT}}",
    ));
    let web = workload("default", "web", "web", "10.0.0.2", "app=web");
    assert_eq!(workload_mtls_mode(&set, &web).mode, Permissive);
    assert_eq!(inbound_mtls_mode(&set, &web, 80).mode, Strict);
}

#[test]
fn creation_times_parse_and_order() {
    use crate::policy::parse_creation_time as t;
    let a = t("2024-01-01T00:00:00Z").unwrap();
    let b = t("2024-01-01T00:00:00.5Z").unwrap();
    let c = t("2023-12-31T23:00:00-02:00").unwrap();
    assert!(a < b && a < c);
    assert_eq!(t("1970-01-01T00:00:00Z").unwrap().seconds, 0);
    assert_eq!(t("2000-03-01T00:00:00Z").unwrap().seconds, 951_868_800);
    for bad in [
        "",
        "2024-01-01",
        "2024-13-01T00:00:00Z",
        "2024-01-01T00:00:00",
        "yesterday",
        "2024-01-01T00:00:00+5",
    ] {
        assert!(t(bad).is_none(), "{bad:?} should not parse");
    }
}
