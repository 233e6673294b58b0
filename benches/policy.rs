//! `authorize` against 10 000 policies spread over 1 000 namespaces: the decision must cost what
//! a namespace's handful of policies costs, not what the mesh's 10 000 do.
//!
//! Per namespace: 3 namespace-wide policies (a DENY by namespace, two ALLOWs by principal and
//! port), 6 selector policies for different apps, and one PeerAuthentication (STRICT in every
//! other namespace). The root namespace adds 10 more selector policies and a global DENY.
//!
//! Measured (2 shared cores, `CARGO_PROFILE_DEV_OPT_LEVEL=3 cargo bench --profile dev --bench
//! policy`): allowed mTLS ≈ 0.6 µs, denied for want of an ALLOW ≈ 0.7 µs, plaintext denied by
//! STRICT ≈ 0.76 µs per decision: the ~20 candidate policies of one namespace, not 10 000.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use ztund::identity::SpiffeId;
use ztund::mesh::{HealthStatus, Labels, TunnelProtocol, Workload};
use ztund::policy::{
    Action, Authorization, Clause, ConnectionFacts, Decision, Match, MtlsMode, PeerAuthentication,
    PolicySet, PolicySetBuilder, Rule, Scope, StringMatch, authorize,
};

const NAMESPACES: usize = 1_000;
const ROOT: &str = "istio-system";

fn labels(app: &str) -> Labels {
    [("app".to_string(), app.to_string())].into()
}

fn rule(m: Match) -> Rule {
    Rule {
        clauses: vec![Clause { matches: vec![m] }],
    }
}

fn policy(ns: &str, name: &str, scope: Scope, action: Action, m: Match) -> Authorization {
    Authorization {
        name: name.to_string(),
        namespace: ns.to_string(),
        scope,
        action,
        rules: vec![rule(m)],
        dry_run: false,
        not_enforced: Vec::new(),
    }
}

fn mesh() -> PolicySet {
    let mut builder = PolicySetBuilder::new(ROOT);
    let mut count = 0;
    for n in 0..NAMESPACES {
        let ns = format!("ns-{n}");
        let deny = Match {
            namespaces: vec![StringMatch::Exact(format!("blocked-{n}"))],
            ..Match::default()
        };
        let from_client = Match {
            principals: vec![StringMatch::Exact(format!(
                "cluster.local/ns/{ns}/sa/client"
            ))],
            ..Match::default()
        };
        let port = Match {
            destination_ports: vec![9000 + (n % 100) as u16],
            ..Match::default()
        };
        builder.add_authorization(
            policy(&ns, "deny", Scope::Namespace, Action::Deny, deny),
            None,
        );
        builder.add_authorization(
            policy(&ns, "client", Scope::Namespace, Action::Allow, from_client),
            None,
        );
        builder.add_authorization(
            policy(&ns, "port", Scope::Namespace, Action::Allow, port),
            None,
        );
        count += 3;
        for app in 0..6 {
            let m = Match {
                namespaces: vec![StringMatch::Prefix(format!("team-{app}"))],
                ..Match::default()
            };
            let p = policy(
                &ns,
                &format!("app-{app}"),
                Scope::WorkloadSelector,
                Action::Allow,
                m,
            );
            builder.add_authorization(p, Some(labels(&format!("app-{app}"))));
            count += 1;
        }
        builder.add_peer_authentication(PeerAuthentication {
            name: "default".into(),
            namespace: ns.clone(),
            selector: None,
            mode: if n % 2 == 0 {
                MtlsMode::Strict
            } else {
                MtlsMode::Permissive
            },
            port_level: Default::default(),
            created: None,
        });
        count += 1;
    }
    for app in 0..10 {
        let m = Match {
            not_source_ips: vec!["10.0.0.0/8".parse().expect("cidr")],
            ..Match::default()
        };
        let p = policy(
            ROOT,
            &format!("root-app-{app}"),
            Scope::WorkloadSelector,
            Action::Deny,
            m,
        );
        builder.add_authorization(p, Some(labels(&format!("app-{app}"))));
    }
    let global = Match {
        namespaces: vec![StringMatch::Exact("quarantine".into())],
        ..Match::default()
    };
    builder.add_authorization(
        policy(ROOT, "global", Scope::Global, Action::Deny, global),
        None,
    );
    assert!(count >= 10_000);
    builder.build()
}

fn workload(ns: &str) -> Workload {
    Workload {
        uid: format!("Kubernetes//Pod/{ns}/server"),
        name: "server".into(),
        namespace: ns.into(),
        service_account: "server".into(),
        trust_domain: "cluster.local".into(),
        labels: labels("app-3"),
        addresses: vec!["10.1.2.3".parse().expect("ip")],
        node: "node-1".into(),
        tunnel: TunnelProtocol::Hbone,
        status: HealthStatus::Healthy,
        netns: None,
        creation_timestamp: None,
        authorization_policies: Vec::new(),
        service_ports: Default::default(),
        identity_cache: Default::default(),
    }
}

fn bench(c: &mut Criterion) {
    let policies = mesh();
    let server = workload("ns-500");
    let client = ConnectionFacts {
        source_ip: "10.1.9.9".parse().expect("ip"),
        source_identity: Some(SpiffeId::new("cluster.local", "ns-500", "client").expect("id")),
        destination_ip: "10.1.2.3".parse().expect("ip"),
        destination_port: 8080,
    };
    let stranger = ConnectionFacts {
        source_identity: Some(SpiffeId::new("cluster.local", "elsewhere", "x").expect("id")),
        ..client.clone()
    };
    let plaintext = ConnectionFacts {
        source_identity: None,
        ..client.clone()
    };
    assert_eq!(authorize(&policies, &server, &client), Decision::Allow);
    assert!(matches!(
        authorize(&policies, &server, &stranger),
        Decision::Deny(_)
    ));
    assert!(matches!(
        authorize(&policies, &server, &plaintext),
        Decision::Deny(_)
    ));

    let mut group = c.benchmark_group("authorize, 10k policies in 1k namespaces");
    group.bench_function("allowed mTLS", |b| {
        b.iter(|| authorize(black_box(&policies), black_box(&server), black_box(&client)))
    });
    group.bench_function("denied: no ALLOW matches", |b| {
        b.iter(|| {
            authorize(
                black_box(&policies),
                black_box(&server),
                black_box(&stranger),
            )
        })
    });
    group.bench_function("denied plaintext (STRICT)", |b| {
        b.iter(|| {
            authorize(
                black_box(&policies),
                black_box(&server),
                black_box(&plaintext),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
