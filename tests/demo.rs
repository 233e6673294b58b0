//! `ztund demo`, run as a user would: the table names the client's SPIFFE identity on an HBONE
//! row, shows the AuthorizationPolicy denying and STRICT refusing plaintext, every flow ends as
//! the policies say, a policy added while sleep → echo streams closes that connection and refuses
//! the next one, and nothing of the demo (namespaces, daemons, files) is left afterwards —
//! also after Ctrl-C. The same with `--capture-backend ebpf`, which also leaves no pod cgroups
//! and no bpffs mounted. Without root it refuses with a clear message and builds nothing.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The demo's namespace names are fixed, so demos of this file run one at a time.
static ONE_DEMO: Mutex<()> = Mutex::new(());

fn ztund() -> &'static str {
    env!("CARGO_BIN_EXE_ztund")
}

fn demo_namespaces() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("ztdemo"))
        .map(str::to_string)
        .collect()
}

fn demo_dirs() -> Vec<String> {
    std::fs::read_dir(std::env::temp_dir())
        .expect("temp dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("ztund-demo-"))
        .collect()
}

/// The demo's pod cgroups (`<cgroup2>/ztdemo/pod<uid>`, the eBPF backend's), and the parent
/// itself as `ztdemo`.
fn demo_cgroups() -> Vec<String> {
    let mount = ztund::capture::bpf::cgroup::mount().expect("a cgroup2 hierarchy");
    let parent = mount.join("ztdemo");
    if !parent.exists() {
        return Vec::new();
    }
    let mut found = vec!["ztdemo".to_string()];
    found.extend(
        std::fs::read_dir(&parent)
            .expect("reading the demo's cgroup")
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned()),
    );
    found
}

/// The mount points of the demo's bpffs (in its work directory).
fn demo_bpffs_mounts() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter(|l| l.contains(" - bpf ") && l.contains("/ztund-demo-"))
        .map(|l| l.split_whitespace().nth(4).unwrap_or("").to_string())
        .collect()
}

/// The table row whose first cell is `from_to`.
fn row<'a>(stdout: &'a str, from_to: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.trim_start_matches(['!', ' ']).starts_with(from_to))
        .unwrap_or_else(|| panic!("no row for {from_to}:\n{stdout}"))
}

fn assert_nothing_left(stdout: &str) {
    let leftovers = [
        ("namespaces", demo_namespaces()),
        ("directories", demo_dirs()),
        ("cgroups", demo_cgroups()),
        ("bpffs mounts", demo_bpffs_mounts()),
    ];
    for (what, left) in leftovers {
        assert!(
            left.is_empty(),
            "demo {what} left behind: {left:?}\n{stdout}"
        );
    }
}

/// Runs `ztund demo` with `args`; its stdout once it succeeded.
fn run_demo(args: &[&str]) -> String {
    let out = Command::new(ztund())
        .arg("demo")
        .args(args)
        .output()
        .expect("running ztund demo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ztund demo {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// The rows and the second act every IPv4 demo shows, whatever captures the pods.
fn assert_identities_and_policies(stdout: &str) {
    let hbone = row(stdout, "sleep → echo:8080");
    assert!(hbone.contains("HBONE node1→node2"), "{hbone}");
    assert!(
        hbone.contains("spiffe://cluster.local/ns/default/sa/sleep"),
        "the server must name the client's identity: {hbone}"
    );
    assert!(hbone.trim_end().ends_with("| ok"), "{hbone}");

    let via_service = row(stdout, "httpbin → echo VIP");
    assert!(
        via_service.contains("spiffe://cluster.local/ns/default/sa/httpbin"),
        "{via_service}"
    );
    assert!(via_service.trim_end().ends_with("| ok"), "{via_service}");

    let denied = row(stdout, "httpbin → db:5432");
    assert!(
        denied.contains("denied by AuthorizationPolicy default/db-deny-httpbin"),
        "{denied}"
    );
    assert!(
        denied.contains("spiffe://cluster.local/ns/default/sa/httpbin"),
        "{denied}"
    );

    let refused = row(stdout, "node1 (no mesh) → db:5432");
    assert!(refused.contains("plaintext"), "{refused}");
    assert!(
        // PeerAuthentication db-strict reaches the node as istiod sends STRICT: the static policy.
        refused.contains("refused: STRICT mTLS (istio-system/istio_converted_static_strict)"),
        "{refused}"
    );

    // The same outside client is let into a PERMISSIVE pod: STRICT above was the policy's doing.
    let permissive = row(stdout, "node1 (no mesh) → echo:8080");
    assert!(permissive.trim_end().ends_with("| ok"), "{permissive}");

    // The second act: the policy change reaches the running flow and the next connection.
    let act = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("policy "))
        .unwrap_or_else(|| panic!("no policy change line:\n{stdout}"));
    assert!(act.contains("sleep → echo closed by policy after"), "{act}");
    assert!(
        act.contains("a new connection: denied by AuthorizationPolicy default/echo-deny-sleep"),
        "{act}"
    );

    assert!(
        !stdout.lines().any(|l| l.starts_with('!')),
        "a flow ended unlike the policies say:\n{stdout}"
    );
    assert!(
        stdout.lines().count() <= 24,
        "the demo's output should read in about 20 lines:\n{stdout}"
    );
}

/// Runs the demo with `args` (one demo at a time) and checks what every run must show: the
/// identity and policy rows, under 30 s, nothing left behind. Returns its output.
fn run_checked_demo(args: &[&str]) -> String {
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let stdout = run_demo(args);
    assert_identities_and_policies(&stdout);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the demo took {:?}",
        started.elapsed()
    );
    assert_nothing_left(&stdout);
    stdout
}

#[test]
fn the_demo_shows_identities_and_policies_then_leaves_nothing() {
    let stdout = run_checked_demo(&[]);
    assert!(
        stdout.contains("capture backend: nftables"),
        "the default backend: {stdout}"
    );
}

/// `ztund demo --capture-backend ebpf`: the same rows with the pods captured by ztund's eBPF
/// programs. The demo installs no nftables rule then, so an HBONE row with the client's identity
/// is an outbound connection the pod's cgroup hooks captured (the pod's sandbox made its socket),
/// and a STRICT refusal of plaintext is sk_lookup's steering to ztund.
#[test]
fn the_demo_captures_with_ebpf_and_leaves_no_cgroups_or_bpffs() {
    let stdout = run_checked_demo(&["--capture-backend", "ebpf"]);
    assert!(
        stdout
            .lines()
            .next()
            .is_some_and(|l| l.contains("capture backend: eBPF")),
        "the demo must say it captures with eBPF:\n{stdout}"
    );
    assert!(
        stdout.contains("pod cgroups removed, bpffs unmounted"),
        "{stdout}"
    );
}

/// `ztund demo --ipv6`: the same mesh on the pods' IPv6 addresses and an IPv6 VIP, through the
/// control plane on node 1's IPv6 address, with the same identities and the same policy outcomes.
#[test]
fn the_demo_runs_on_ipv6_addresses() {
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(ztund())
        .args(["demo", "--ipv6"])
        .output()
        .expect("running ztund demo --ipv6");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ztund demo --ipv6 failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("sleep fd00:201:1::2"), "{stdout}");
    // The nodes and the control plane are on IPv6 too: the nodes fetched the mesh and their
    // certificates from https://[node1's v6 address]:15012.
    assert!(stdout.contains("node1 (fd00:200::1):"), "{stdout}");
    assert!(
        stdout.contains("controlplane on node1 at https://[fd00:200::1]:15012"),
        "{stdout}"
    );
    let hbone = row(&stdout, "sleep → echo:8080");
    assert!(hbone.contains("HBONE node1→node2"), "{hbone}");
    assert!(
        hbone.contains("spiffe://cluster.local/ns/default/sa/sleep"),
        "{hbone}"
    );
    let via_service = row(&stdout, "httpbin → echo VIP [fd00:96::10]:80");
    assert!(via_service.trim_end().ends_with("| ok"), "{via_service}");
    let denied = row(&stdout, "httpbin → db:5432");
    assert!(
        denied.contains("denied by AuthorizationPolicy default/db-deny-httpbin"),
        "{denied}"
    );
    let refused = row(&stdout, "node1 (no mesh) → db:5432");
    assert!(refused.contains("refused: STRICT mTLS"), "{refused}");
    assert!(
        !stdout.lines().any(|l| l.starts_with('!')),
        "a flow ended unlike the policies say:\n{stdout}"
    );
    assert_nothing_left(&stdout);
}

#[test]
fn ctrl_c_while_holding_tears_everything_down() {
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    hold_then_ctrl_c(&[], |seen| {
        assert_eq!(demo_cgroups(), Vec::<String>::new(), "{seen}");
    });
}

/// With eBPF the held demo has a cgroup per pod and its bpffs mounted; Ctrl-C removes them too.
#[test]
fn ctrl_c_while_holding_with_ebpf_removes_cgroups_and_bpffs() {
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    hold_then_ctrl_c(&["--capture-backend", "ebpf"], |seen| {
        // `ztdemo` and its four pods' cgroups.
        assert_eq!(demo_cgroups().len(), 5, "held cgroups:\n{seen}");
        assert_eq!(demo_bpffs_mounts().len(), 1, "held bpffs:\n{seen}");
    });
}

/// Runs `ztund demo --hold` with `args` until it holds, checks the held topology (`held` gets
/// the output so far), sends SIGINT and checks that nothing is left.
fn hold_then_ctrl_c(args: &[&str], held: impl FnOnce(&str)) {
    let mut demo = Command::new(ztund())
        .args(["demo", "--hold"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running ztund demo --hold");
    let mut stdout = BufReader::new(demo.stdout.take().expect("stdout"));
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let read = stdout.read_line(&mut line).expect("reading the demo");
        assert!(read > 0, "the demo ended before holding:\n{seen}");
        seen += &line;
        if line.starts_with("holding:") {
            break;
        }
    }
    assert_eq!(demo_namespaces().len(), 7, "held topology:\n{seen}");
    held(&seen);

    let pid = nix::unistd::Pid::from_raw(demo.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).expect("reading the demo");
    let status = demo.wait().expect("waiting for the demo");
    assert!(status.success(), "{status}:\n{seen}{rest}");
    assert!(rest.contains("torn down"), "{rest}");
    assert_nothing_left(&rest);
}

#[test]
fn without_root_the_demo_says_so_and_builds_nothing() {
    // The other tests' demos create `ztdemo` namespaces; compare before/after without them.
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    // A copy nobody can read the original's directory for is still runnable by `nobody`.
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = dir.path().join("ztund");
    std::fs::copy(ztund(), &copy).expect("copying ztund");
    let before = demo_namespaces();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&copy)
        .arg("demo")
        .output()
        .expect("running setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the demo ran without root: {stderr}");
    assert!(stderr.contains("ztund demo needs root"), "{stderr}");
    assert_eq!(demo_namespaces(), before);
}
