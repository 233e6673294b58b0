//! Authorization verdicts for connections to `default/web` (labels app=web, version=v1).

use super::{conn, policies, workload};
use crate::policy::{Decision, authorize};

/// (source IP, identity `ns/sa` or plaintext, target port)
type Client = (&'static str, Option<&'static str>, u16);

const SLEEP: Client = ("10.0.0.1", Some("default/sleep"), 8080);
const SLEEP_9090: Client = ("10.0.0.1", Some("default/sleep"), 9090);
const OTHER: Client = ("10.0.1.5", Some("other/client"), 8080);
const PLAIN: Client = ("10.0.1.9", None, 8080);
const PLAIN_9090: Client = ("10.0.1.9", None, 9090);

enum Expect {
    Allow,
    /// Denied, the reason containing this text.
    Deny(&'static str),
}
use Expect::{Allow, Deny};

const NONE_ALLOWED: &str = "allow policies exist, but none allowed";

const FOUR_DOCUMENTS: &str = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec: {mtls: {mode: STRICT}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: example-destination, namespace: default}
spec:
  host: example-service.default.svc.cluster.local
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: global-mtls, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
";

fn ap(name_ns: &str, spec: &str) -> String {
    let (ns, name) = name_ns.split_once('/').expect("ns/name");
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n---\n"
    )
}

fn pa(name_ns: &str, spec: &str) -> String {
    let (ns, name) = name_ns.split_once('/').expect("ns/name");
    format!(
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n---\n"
    )
}

/// (what, documents, connections and their expected verdicts)
type Case = (&'static str, String, Vec<(Client, Expect)>);

fn cases() -> Vec<Case> {
    vec![
        ("no policies allow everything", String::new(), vec![(PLAIN, Allow), (SLEEP, Allow)]),
        (
            "the four documents of Istio's guide: plaintext denied, naming the PeerAuthentication",
            FOUR_DOCUMENTS.to_string(),
            vec![
                (PLAIN, Deny("istio-system/istio_converted_static_strict (PeerAuthentication default/default")),
                (SLEEP, Allow),
            ],
        ),
        (
            "the default PeerAuthentication as PERMISSIVE lets plaintext in",
            pa("default/default", "  mtls: {mode: PERMISSIVE}"),
            vec![(PLAIN, Allow), (SLEEP, Allow)],
        ),
        (
            "mesh STRICT alone",
            pa("istio-system/global-mtls", "  mtls: {mode: STRICT}"),
            vec![(PLAIN, Deny("PeerAuthentication istio-system/global-mtls")), (OTHER, Allow)],
        ),
        (
            "namespace PERMISSIVE overrides mesh STRICT",
            pa("istio-system/mesh", "  mtls: {mode: STRICT}") + &pa("default/ns", "  mtls: {mode: PERMISSIVE}"),
            vec![(PLAIN, Allow)],
        ),
        (
            "workload STRICT overrides namespace PERMISSIVE",
            pa("default/ns", "  mtls: {mode: PERMISSIVE}")
                + &pa("default/web", "  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}"),
            vec![(PLAIN, Deny("PeerAuthentication default/web")), (SLEEP, Allow)],
        ),
        (
            "workload UNSET inherits namespace STRICT",
            pa("default/ns", "  mtls: {mode: STRICT}") + &pa("default/web", "  selector: {matchLabels: {app: web}}"),
            vec![(PLAIN, Deny("PeerAuthentication default/ns"))],
        ),
        (
            "a workload PeerAuthentication that selects other pods changes nothing",
            pa("default/ns", "  mtls: {mode: STRICT}")
                + &pa("default/db", "  selector: {matchLabels: {app: db}}\n  mtls: {mode: PERMISSIVE}"),
            vec![(PLAIN, Deny("default/ns"))],
        ),
        (
            "a selector PeerAuthentication in the root namespace is ignored",
            pa("istio-system/web", "  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}"),
            vec![(PLAIN, Allow)],
        ),
        (
            "STRICT with port 8080 PERMISSIVE: plaintext only to 8080",
            pa("default/web", "  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n  portLevelMtls: {8080: {mode: PERMISSIVE}}"),
            vec![
                (PLAIN, Allow),
                (PLAIN_9090, Deny("default/converted_peer_authentication_web (PeerAuthentication default/web")),
                (SLEEP_9090, Allow),
            ],
        ),
        (
            "PERMISSIVE with port 9090 STRICT: plaintext refused only on 9090",
            pa("default/web", "  selector: {matchLabels: {app: web}}\n  mtls: {mode: PERMISSIVE}\n  portLevelMtls: {9090: {mode: STRICT}}"),
            vec![(PLAIN, Allow), (PLAIN_9090, Deny("converted_peer_authentication_web")), (SLEEP_9090, Allow)],
        ),
        (
            "UNSET under namespace STRICT with port 8080 DISABLE",
            pa("default/ns", "  mtls: {mode: STRICT}")
                + &pa("default/web", "  selector: {matchLabels: {app: web}}\n  portLevelMtls: {'8080': {mode: DISABLE}}"),
            vec![(PLAIN, Allow), (PLAIN_9090, Deny("converted_peer_authentication_web"))],
        ),
        (
            "DENY by principal",
            ap("default/deny-sleep", "  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]"),
            vec![(SLEEP, Deny("explicitly denied by: default/deny-sleep")), (OTHER, Allow), (PLAIN, Allow)],
        ),
        (
            "ALLOW by namespace",
            ap("default/from-default", "  rules: [{from: [{source: {namespaces: [default]}}]}]"),
            vec![(SLEEP, Allow), (OTHER, Deny(NONE_ALLOWED)), (PLAIN, Deny(NONE_ALLOWED))],
        ),
        (
            "ALLOW by port",
            ap("default/web-port", "  rules: [{to: [{operation: {ports: ['8080']}}]}]"),
            vec![(SLEEP, Allow), (SLEEP_9090, Deny(NONE_ALLOWED))],
        ),
        (
            "DENY notPorts",
            ap("default/only-8080", "  action: DENY\n  rules: [{to: [{operation: {notPorts: ['8080']}}]}]"),
            vec![(SLEEP, Allow), (SLEEP_9090, Deny("default/only-8080"))],
        ),
        (
            "ALLOW ipBlocks (a CIDR and a single address)",
            ap("default/lan", "  rules: [{from: [{source: {ipBlocks: [10.0.0.0/24, 10.0.1.9]}}]}]"),
            vec![(SLEEP, Allow), (PLAIN, Allow), (OTHER, Deny(NONE_ALLOWED))],
        ),
        (
            "ipBlocks match IPv4-mapped IPv6 sources",
            ap("default/lan", "  rules: [{from: [{source: {ipBlocks: [10.0.0.0/24]}}]}]"),
            vec![(("::ffff:10.0.0.7", None, 8080), Allow), (("fd00::1", None, 8080), Deny(NONE_ALLOWED))],
        ),
        (
            "ipBlocks with an IPv6 CIDR (dual-stack pods)",
            ap("default/lan6", "  rules: [{from: [{source: {ipBlocks: ['fd00:201:1::/64', 'fd00:201:2::9']}}]}]"),
            vec![
                (("fd00:201:1::2", None, 8080), Allow),
                (("fd00:201:2::9", None, 8080), Allow),
                (("fd00:201:2::2", None, 8080), Deny(NONE_ALLOWED)),
                (("10.0.0.7", None, 8080), Deny(NONE_ALLOWED)),
            ],
        ),
        (
            // Found with the rbac_diff fuzz target: the mask of such a block overflowed, so a
            // release build allowed every IPv4 source (and a debug build panicked).
            "ipBlocks written as IPv4-mapped IPv6 are the IPv4 blocks they spell",
            ap("default/lan", "  rules: [{from: [{source: {ipBlocks: ['::ffff:10.0.0.0/120', '::ffff:10.0.1.9/128']}}]}]"),
            vec![(SLEEP, Allow), (PLAIN, Allow), (OTHER, Deny(NONE_ALLOWED))],
        ),
        (
            "DENY notIpBlocks",
            ap("default/outsiders", "  action: DENY\n  rules: [{from: [{source: {notIpBlocks: [10.0.0.0/24]}}]}]"),
            vec![(SLEEP, Allow), (OTHER, Deny("default/outsiders"))],
        ),
        (
            "when source.namespace",
            ap("default/w", "  rules: [{when: [{key: source.namespace, values: [other]}]}]"),
            vec![(OTHER, Allow), (SLEEP, Deny(NONE_ALLOWED))],
        ),
        (
            "when destination.port notValues",
            ap("default/w", "  action: DENY\n  rules: [{when: [{key: destination.port, notValues: ['8080']}]}]"),
            vec![(SLEEP, Allow), (SLEEP_9090, Deny("default/w"))],
        ),
        (
            "when source.ip and destination.ip",
            ap("default/w", "  rules: [{when: [{key: source.ip, values: [10.0.1.0/24]}, {key: destination.ip, values: [10.0.0.2]}]}]"),
            vec![(OTHER, Allow), (SLEEP, Deny(NONE_ALLOWED))],
        ),
        (
            "when destination.ip that is not this workload",
            ap("default/w", "  rules: [{when: [{key: destination.ip, values: [10.9.9.9]}]}]"),
            vec![(SLEEP, Deny(NONE_ALLOWED))],
        ),
        (
            "when source.principal with a suffix match",
            ap("default/w", "  rules: [{when: [{key: source.principal, values: ['*/sa/sleep']}]}]"),
            vec![(SLEEP, Allow), (OTHER, Deny(NONE_ALLOWED))],
        ),
        (
            "principals prefix match",
            ap("default/p", "  rules: [{from: [{source: {principals: ['cluster.local/ns/other/*']}}]}]"),
            vec![(OTHER, Allow), (SLEEP, Deny(NONE_ALLOWED))],
        ),
        (
            "principals presence admits any mTLS peer, never plaintext",
            ap("default/p", "  rules: [{from: [{source: {principals: ['*']}}]}]"),
            vec![(OTHER, Allow), (SLEEP, Allow), (PLAIN, Deny(NONE_ALLOWED))],
        ),
        (
            "namespaces suffix match",
            ap("default/n", "  rules: [{from: [{source: {namespaces: ['*ther']}}]}]"),
            vec![(OTHER, Allow), (SLEEP, Deny(NONE_ALLOWED))],
        ),
        (
            "serviceAccounts: a bare name is in the policy's namespace",
            ap("default/sa", "  rules: [{from: [{source: {serviceAccounts: [sleep, other/nobody]}}]}]"),
            vec![(SLEEP, Allow), (OTHER, Deny(NONE_ALLOWED)), (PLAIN, Deny(NONE_ALLOWED))],
        ),
        (
            "notServiceAccounts in a DENY",
            ap("default/sa", "  action: DENY\n  rules: [{from: [{source: {notServiceAccounts: [other/client]}}]}]"),
            vec![(OTHER, Allow), (SLEEP, Deny("default/sa")), (PLAIN, Deny("default/sa"))],
        ),
        (
            "from entries are ORed, from and to are ANDed",
            ap("default/or", "  rules: [{from: [{source: {namespaces: [other]}}, {source: {principals: [cluster.local/ns/default/sa/sleep]}}], to: [{operation: {ports: ['9090']}}]}]"),
            vec![(SLEEP_9090, Allow), (SLEEP, Deny(NONE_ALLOWED)), (("10.0.1.5", Some("other/client"), 9090), Allow)],
        ),
        (
            "an ALLOW rule with HTTP attributes is dropped; the L4 rule still allows",
            ap("default/l7", "  rules:\n  - to: [{operation: {methods: [GET]}}]\n  - from: [{source: {namespaces: [other]}}]"),
            vec![(OTHER, Allow), (SLEEP, Deny(NONE_ALLOWED))],
        ),
        (
            "an ALLOW policy whose only rule is HTTP allows nothing",
            ap("default/l7", "  rules: [{from: [{source: {namespaces: [default]}}], to: [{operation: {paths: [/admin]}}]}]"),
            vec![(SLEEP, Deny(NONE_ALLOWED))],
        ),
        (
            "a DENY rule with HTTP attributes keeps its L4 part",
            ap("default/l7", "  action: DENY\n  rules: [{to: [{operation: {ports: ['8080'], methods: [POST]}}]}]"),
            vec![(SLEEP, Deny("default/l7")), (SLEEP_9090, Allow)],
        ),
        (
            "a DENY rule whose condition is only HTTP denies on the rest",
            ap("default/l7", "  action: DENY\n  rules: [{from: [{source: {namespaces: [other]}}], when: [{key: 'request.headers[x-user]', values: [bob]}]}]"),
            vec![(OTHER, Deny("default/l7")), (SLEEP, Allow)],
        ),
        (
            "an ALLOW policy without rules denies everything",
            ap("default/deny-all", "  {}"),
            vec![(SLEEP, Deny(NONE_ALLOWED)), (PLAIN, Deny(NONE_ALLOWED))],
        ),
        (
            "a DENY policy without rules has no effect",
            ap("default/nothing", "  action: DENY"),
            vec![(SLEEP, Allow), (PLAIN, Allow)],
        ),
        (
            "an ALLOW rule without conditions allows everything",
            ap("default/allow-all", "  rules: [{}]"),
            vec![(SLEEP, Allow), (PLAIN, Allow)],
        ),
        (
            "DENY wins over ALLOW",
            ap("default/allow-all", "  rules: [{}]") + &ap("default/deny-other", "  action: DENY\n  rules: [{from: [{source: {namespaces: [other]}}]}]"),
            vec![(OTHER, Deny("default/deny-other")), (SLEEP, Allow)],
        ),
        (
            "a dry-run DENY is not enforced",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: dry, namespace: default, annotations: {istio.io/dry-run: 'true'}}\nspec: {action: DENY, rules: [{}]}\n".to_string(),
            vec![(SLEEP, Allow)],
        ),
        (
            "a selector policy applies only to the pods it selects",
            ap("default/db-only", "  selector: {matchLabels: {app: db}}\n  action: DENY\n  rules: [{}]")
                + &ap("default/web-only", "  selector: {matchLabels: {app: web, version: v1}}\n  action: DENY\n  rules: [{from: [{source: {namespaces: [other]}}]}]"),
            vec![(SLEEP, Allow), (OTHER, Deny("default/web-only"))],
        ),
        (
            "a selector policy in the root namespace reaches every namespace",
            ap("istio-system/web-everywhere", "  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules: [{from: [{source: {namespaces: [other]}}]}]"),
            vec![(OTHER, Deny("istio-system/web-everywhere")), (SLEEP, Allow)],
        ),
        (
            "policies of other namespaces do not apply",
            ap("prod/deny-all", "  action: DENY\n  rules: [{}]")
                + &ap("prod/web", "  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules: [{}]"),
            vec![(SLEEP, Allow)],
        ),
        (
            "a root-namespace policy without selector is global",
            ap("istio-system/global-deny", "  action: DENY\n  rules: [{from: [{source: {notNamespaces: [default]}}]}]"),
            vec![(SLEEP, Allow), (OTHER, Deny("istio-system/global-deny"))],
        ),
        (
            "a policy with targetRefs is for a waypoint and skipped",
            ap("default/waypoint", "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  action: DENY\n  rules: [{}]"),
            vec![(SLEEP, Allow)],
        ),
        (
            "STRICT plus an ALLOW: both apply",
            FOUR_DOCUMENTS.to_string() + "---\n" + &ap("default/from-other", "  rules: [{from: [{source: {namespaces: [other]}}]}]"),
            vec![(OTHER, Allow), (SLEEP, Deny(NONE_ALLOWED)), (PLAIN, Deny("istio_converted_static_strict"))],
        ),
    ]
}

#[test]
fn authorization_table() {
    let web = workload("default", "web", "web", "10.0.0.2", "app=web,version=v1");
    let mut checked = 0;
    for (name, yaml, checks) in cases() {
        let set = policies(&yaml);
        for ((src, id, port), expect) in checks {
            let verdict = authorize(&set, &web, &conn(src, id, "10.0.0.2", port));
            let who = format!("{name}: {src} {id:?} -> :{port}");
            match (expect, &verdict) {
                (Allow, Decision::Allow) => {}
                (Deny(text), Decision::Deny(reason)) => {
                    assert!(
                        reason.contains(text),
                        "{who}: reason {reason:?} lacks {text:?}"
                    )
                }
                (Allow, _) => panic!("{who}: expected Allow, got {verdict:?}"),
                (Deny(text), _) => panic!("{who}: expected Deny({text:?}), got {verdict:?}"),
            }
            checked += 1;
        }
    }
    assert!(checked >= 80, "the table shrank: {checked} checks");
}

#[test]
fn authorization_in_root_namespace_workload_uses_only_mesh_level() {
    let set = policies(&(pa("istio-system/mesh", "  mtls: {mode: STRICT}")));
    let gateway = workload("istio-system", "gw", "gw", "10.0.5.1", "app=gw");
    let verdict = authorize(&set, &gateway, &conn("10.0.0.1", None, "10.0.5.1", 80));
    assert!(matches!(verdict, Decision::Deny(r) if r.contains("istio-system/mesh")));
}

#[test]
fn a_denial_for_want_of_an_allow_names_the_allow_policies() {
    let yaml = ap(
        "default/from-default",
        "  rules: [{from: [{source: {namespaces: [default]}}]}]",
    ) + &ap(
        "default/web-port",
        "  rules: [{to: [{operation: {ports: ['8080']}}]}]",
    );
    let set = policies(&yaml);
    let echo = workload("default", "echo", "echo", "10.0.0.2", "app=echo");
    let verdict = authorize(
        &set,
        &echo,
        &conn("10.0.1.9", Some("other/x"), "10.0.0.2", 9090),
    );
    let Decision::Deny(reason) = verdict else {
        panic!("expected a denial");
    };
    assert!(
        reason.contains(NONE_ALLOWED) && reason.contains("default/from-default, default/web-port"),
        "{reason}"
    );
}
