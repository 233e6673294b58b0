//! Hostile and mistaken YAML (HARDENING Y1–Y8): every case is refused with an error naming the
//! field, the cap or the conflict, and nothing of the file is applied. Each test names its row.

use std::time::{Duration, Instant};

use super::*;
use crate::mesh::k8s::security::policy_set;
use crate::mesh::snapshot_from_text;
use crate::policy::{Cidr, StringMatch};

/// The whole file, as the daemon reads it: workloads, services and policies.
fn load(text: &str) -> Result<crate::mesh::Snapshot, MeshError> {
    snapshot_from_text("mesh.yaml", text, &MeshSettings::default())
}

fn refused(text: &str) -> String {
    match load(text) {
        Ok(_) => panic!("expected a refusal for:\n{text}"),
        Err(e) => e.to_string(),
    }
}

fn assert_names(error: &str, parts: &[&str]) {
    for part in parts {
        assert!(error.contains(part), "{part:?} not in: {error}");
    }
}

const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\n\
spec: {nodeName: node-a, serviceAccountName: web}\n\
status: {podIP: 10.1.0.5, hostIP: 192.168.0.10}\n";

fn workload_entry(address: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n\
         metadata: {{name: vm, namespace: shop, annotations: {{ztund.io/node: vm-host}}}}\n\
         spec: {{address: \"{address}\", serviceAccount: vm}}\n"
    )
}

fn authorization(spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: p, namespace: shop}}\nspec:\n{spec}"
    )
}

// HARDENING Y1
#[test]
fn billion_laughs_is_refused_fast_by_the_alias_repetition_limit() {
    let mut text = String::from("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for (prev, name) in ["a", "b", "c", "d", "e", "f", "g", "h"]
        .iter()
        .zip(["b", "c", "d", "e", "f", "g", "h", "i"])
    {
        let refs = vec![format!("*{prev}"); 9].join(", ");
        text.push_str(&format!("{name}: &{name} [{refs}]\n"));
    }
    let started = Instant::now();
    let error = split_documents("mesh.yaml", &text).unwrap_err().to_string();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_names(&error, &["mesh.yaml", "repetition limit exceeded"]);
}

// HARDENING Y1
#[test]
fn deep_nesting_is_refused_by_the_recursion_limit() {
    let text = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let error = split_documents("mesh.yaml", &text).unwrap_err().to_string();
    assert_names(&error, &["mesh.yaml", "recursion limit exceeded"]);
}

// HARDENING Y1 (and the "mesh file has no size cap")
#[test]
fn text_over_the_size_cap_is_refused_before_parsing() {
    let mut text = String::from(POD);
    text.push_str(&"#".repeat(MAX_MESH_BYTES + 1 - text.len()));
    let started = Instant::now();
    let error = refused(&text);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_names(
        &error,
        &[
            "mesh.yaml",
            &format!("over the cap of {MAX_MESH_BYTES} bytes"),
            "MAX_MESH_BYTES",
        ],
    );
    text.truncate(MAX_MESH_BYTES);
    load(&text).expect("exactly the cap is read");
}

// HARDENING Y1
#[test]
fn more_documents_than_the_cap_are_refused() {
    let text = "---\n".repeat(MAX_MESH_DOCUMENTS + 1);
    let error = refused(&text);
    assert_names(
        &error,
        &["MAX_MESH_DOCUMENTS", &MAX_MESH_DOCUMENTS.to_string()],
    );
}

// HARDENING Y2
#[test]
fn values_of_the_wrong_type_are_typed_errors_naming_the_field() {
    let service = |port: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{ports: [{{port: {port}}}]}}\n"
        )
    };
    assert_names(
        &refused(&service("eighty")),
        &["`spec.ports[0].port`", "\"eighty\""],
    );
    assert_names(
        &refused(&service("80.5")),
        &["`spec.ports[0].port`", "80.5"],
    );
    let pa = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
              metadata: {name: pa, namespace: shop}\nspec: {mtls: {mode: 1}}\n";
    assert_names(&refused(pa), &["`spec.mtls.mode`", "must be a string"]);
}

// HARDENING Y3
#[test]
fn misspelt_fields_are_refused_naming_the_path() {
    let cases = [
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
             metadata: {name: pa, namespace: shop}\nspec: {mTLS: {mode: STRICT}}\n"
                .to_string(),
            "`spec.mTLS`: unknown field",
        ),
        (
            authorization("  action: DENNY\n"),
            "unknown action \"DENNY\"",
        ),
        (
            authorization("  rules: [{from: [{source: {principal: [a]}}]}]\n"),
            "`spec.rules[0].from[0].source.principal`: unknown field",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
             metadata: {name: dr, namespace: shop}\n\
             spec: {host: web, trafficPolicy: {tsl: {mode: DISABLE}}}\n"
                .to_string(),
            "`spec.trafficPolicy.tsl`: unknown field",
        ),
        (
            workload_entry("10.9.0.1").replace("serviceAccount", "serviceAcount"),
            "`spec.serviceAcount`: unknown field",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
             metadata: {name: se, namespace: shop}\n\
             spec: {hosts: [db.example.com], endpoint: [{address: 10.9.0.2}]}\n"
                .to_string(),
            "`spec.endpoint`: unknown field",
        ),
        (
            POD.replace("namespace: shop", "namespce: shop"),
            "`metadata.namespce`: unknown field",
        ),
        (
            authorization("  action: DENY\n").replace("namespace: shop", "namespce: shop"),
            "`metadata.namespce`: unknown field",
        ),
    ];
    for (text, expected) in cases {
        let error = refused(&text);
        assert_names(&error, &["mesh.yaml document 1", expected]);
    }
}

// HARDENING Y3: HTTP attributes are applied as ztunnel's control plane converts them, and said.
#[test]
fn http_attributes_are_applied_at_l4_and_reported_by_check() {
    let text = format!(
        "{POD}---\n{}---\n{}",
        authorization(
            "  action: ALLOW\n  rules: [{to: [{operation: {methods: [GET], ports: [\"80\"]}}]}]\n"
        ),
        authorization(
            "  action: DENY\n  rules: [{from: [{source: {namespaces: [evil]}}], when: [{key: \"request.headers[x]\", values: [a]}]}]\n"
        )
        .replace("name: p,", "name: q,"),
    );
    let snapshot = load(&text).expect("L7 attributes are not an error");
    let report = crate::check::report(&snapshot);
    assert_names(
        &report,
        &[
            "ALLOW shop/p [no rules: matches nothing]",
            "not enforced at L4: spec.rules[0]: spec.rules[0].to[0].operation.methods (ALLOW rule dropped: it allows nothing)",
            "DENY  shop/q",
            "not enforced at L4: spec.rules[0]: spec.rules[0].when[0] (request.headers[x]) (DENY rule enforced on its L4 part only: it denies more)",
        ],
    );
    let deny = snapshot
        .policies
        .authorizations()
        .find(|a| a.name == "q")
        .unwrap();
    assert_eq!(deny.rules.len(), 1, "the DENY rule keeps its L4 part");
    assert_eq!(
        deny.rules[0].clauses.len(),
        1,
        "the L7 condition is left out"
    );
}

// HARDENING Y4
#[test]
fn cidrs_are_checked_and_never_match_everything_by_accident() {
    for bad in [
        "10.0.0.0/33",
        "",
        "10.0.0.0/",
        "/8",
        "10.0.0.0/-1",
        "::ffff:1.2.3.4/129",
        " 10.0.0.0/8",
    ] {
        assert!(bad.parse::<Cidr>().is_err(), "{bad:?} accepted");
        let text = authorization(&format!(
            "  rules: [{{from: [{{source: {{ipBlocks: [\"{bad}\"]}}}}]}}]\n"
        ));
        assert_names(
            &refused(&text),
            &["`spec.rules[0].from[0].source.ipBlocks[0]`"],
        );
    }
    let host_bits: Cidr = "10.1.2.3/8".parse().unwrap();
    assert_eq!(host_bits.to_string(), "10.0.0.0/8");
    assert!(host_bits.contains("10.200.0.1".parse().unwrap()));
    let mapped: Cidr = "::ffff:1.2.3.4/120".parse().unwrap();
    assert_eq!(mapped.to_string(), "1.2.3.0/24");
    assert!(mapped.contains("1.2.3.200".parse().unwrap()));
    assert!(
        !mapped.contains("9.9.9.9".parse().unwrap()),
        "a mapped /120 is no /0"
    );
}

// HARDENING Y5
#[test]
fn ports_out_of_range_are_refused_not_wrapped() {
    for port in ["0", "-1", "65536", "1099511627776"] {
        let service = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{ports: [{{port: {port}}}]}}\n"
        );
        assert_names(&refused(&service), &["`spec.ports[0].port`", "1-65535"]);
        let policy = authorization(&format!(
            "  rules: [{{to: [{{operation: {{ports: [\"{port}\"]}}}}]}}]\n"
        ));
        assert_names(
            &refused(&policy),
            &["`spec.rules[0].to[0].operation.ports[0]`", "1-65535"],
        );
        let policy = authorization(&format!(
            "  rules: [{{to: [{{operation: {{ports: [{port}]}}}}]}}]\n"
        ));
        assert_names(
            &refused(&policy),
            &["`spec.rules[0].to[0].operation.ports[0]`"],
        );
    }
    let named = format!(
        "{POD}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
         spec: {{selector: {{}}, ports: [{{port: 80, targetPort: http}}]}}\n"
    );
    assert_names(
        &refused(&named),
        &["`spec.ports[0].targetPort`", "\"http\""],
    );
}

// HARDENING Y6
#[test]
fn duplicate_keys_and_duplicate_objects_are_refused() {
    let duplicate_key = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
                         spec: {ports: [{port: 80, port: 81}]}\n";
    assert_names(
        &refused(duplicate_key),
        &["duplicate entry with key \"port\""],
    );
    let service =
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {}\n";
    let twice = format!("{service}---\n{service}");
    assert_names(
        &refused(&twice),
        &[
            "document 2 (Service shop/web)",
            "already claimed by mesh.yaml document 1",
        ],
    );
    let policy = authorization("  action: DENY\n");
    let twice = format!("{policy}---\n{policy}");
    assert_names(
        &refused(&twice),
        &[
            "document 2 (AuthorizationPolicy shop/p)",
            "already claimed by mesh.yaml document 1",
        ],
    );
}

// HARDENING Y7
#[test]
fn lengths_and_counts_are_capped_and_principals_match_literally() {
    use crate::mesh::k8s::security::{MAX_LIST_ITEMS, MAX_STRING_BYTES};
    let long = "a".repeat(1024 * 1024);
    let text = authorization(&format!(
        "  rules: [{{from: [{{source: {{principals: [\"{long}\"]}}}}]}}]\n"
    ));
    assert_names(
        &refused(&text),
        &[
            "`spec.rules[0].from[0].source.principals[0]`",
            "MAX_STRING_BYTES",
            &MAX_STRING_BYTES.to_string(),
        ],
    );
    let rules = vec!["{to: [{operation: {ports: [\"80\"]}}]}"; MAX_LIST_ITEMS + 1].join(", ");
    let text = authorization(&format!("  rules: [{rules}]\n"));
    assert_names(&refused(&text), &["`spec.rules`", "MAX_LIST_ITEMS"]);
    let rules = vec!["{to: [{operation: {ports: [\"80\"]}}]}"; MAX_LIST_ITEMS].join(", ");
    policy_set(
        &split_documents(
            "mesh.yaml",
            &authorization(&format!("  rules: [{rules}]\n")),
        )
        .unwrap(),
        "istio-system",
    )
    .expect("exactly the cap is read");
    // No pattern language beyond Istio's leading or trailing `*`: a regex is a literal.
    let regex = StringMatch::from_pattern("cluster.local/ns/.*/sa/web");
    assert!(!regex.matches("cluster.local/ns/shop/sa/web"));
    assert!(regex.matches("cluster.local/ns/.*/sa/web"));
    let middle = StringMatch::from_pattern("cluster.local/*/sa/web");
    assert!(!middle.matches("cluster.local/ns/shop/sa/web"));
}

// HARDENING Y8
#[test]
fn addresses_that_are_not_one_workload_cannot_be_claimed() {
    for address in [
        "0.0.0.0",
        "::",
        "127.0.0.1",
        "::1",
        "::ffff:127.0.0.1",
        "224.0.0.1",
        "255.255.255.255",
    ] {
        let error = refused(&workload_entry(address));
        assert_names(&error, &["`spec.address`", "cannot be claimed"]);
    }
    let service_entry = |field: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: se, namespace: shop}}\n\
             spec: {{hosts: [db.example.com], {field}}}\n"
        )
    };
    assert_names(
        &refused(&service_entry("addresses: [0.0.0.0/0]")),
        &["`spec.addresses[0]`", "CIDR range"],
    );
    assert_names(
        &refused(&service_entry("addresses: [0.0.0.0]")),
        &["`spec.addresses[0]`", "cannot be claimed"],
    );
    assert_names(
        &refused(&service_entry("endpoints: [{address: 127.0.0.1}]")),
        &["`spec.endpoints[0].address`", "cannot be claimed"],
    );
    // The node's address (as a pod reports it), another pod's address.
    let node = format!("{POD}---\n{}", workload_entry("192.168.0.10"));
    assert_names(
        &refused(&node),
        &["`spec.address`", "a node's address", "status.hostIP"],
    );
    let other_pod = format!("{POD}---\n{}", workload_entry("10.1.0.5"));
    assert_names(
        &refused(&other_pod),
        &[
            "`spec.address`",
            "address 10.1.0.5",
            "already claimed by mesh.yaml document 1 (Pod shop/web)",
        ],
    );
    let endpoint = format!(
        "{POD}---\n{}",
        service_entry("endpoints: [{address: 10.1.0.5}]")
    );
    assert_names(
        &refused(&endpoint),
        &[
            "`spec.endpoints[0].address`",
            "workloadSelector",
            "(Pod shop/web)",
        ],
    );
    load(&format!("{POD}---\n{}", workload_entry("10.9.0.1")))
        .expect("an address of its own is fine");
}

// The daemon's config file: a misspelt key is refused by name, at any depth.
#[test]
fn unknown_config_keys_are_refused_by_name() {
    use crate::config::Config;
    for (text, key) in [
        ("node: n1\nnodee: n2\n", "nodee"),
        ("node: n1\nports: {hbon: 15008}\n", "hbon"),
        ("node: n1\nca: {mode: builtin, dir: /x, dri: /y}\n", "dri"),
    ] {
        let error = Config::parse(text, "ztund.yaml").unwrap_err().to_string();
        assert_names(
            &error,
            &["ztund.yaml", "unknown field", &format!("`{key}`")],
        );
    }
}

/// `::ffff:10.1.0.6` is 10.1.0.6 (a peer on a dual-stack socket shows that way): held as such,
/// so it names one address, not two, and cannot sneak past the address-conflict check.
#[test]
fn v4_mapped_addresses_are_held_as_ipv4() {
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\n\
spec: {nodeName: node-a}\n\
status: {podIP: \"::ffff:10.1.0.6\", podIPs: [{ip: 10.1.0.6}, {ip: \"fd00::6\"}]}\n";
    let snapshot = load(pod).unwrap();
    let ip = |text: &str| text.parse::<std::net::IpAddr>().unwrap();
    assert_eq!(
        snapshot.workloads()[0].addresses,
        vec![ip("10.1.0.6"), ip("fd00::6")]
    );
    let error = refused(&format!("{POD}---\n{}", workload_entry("::ffff:10.1.0.5")));
    assert_names(&error, &["10.1.0.5"]);
}
