//! The `ztund` command line: the daemon, the built-in CA, the demo and the policy checker.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// ztund: a node-level zero-trust tunnel daemon (HBONE, SPIFFE, Istio policy).
#[derive(Debug, Parser)]
#[command(name = "ztund", version, about)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        /// The daemon config file (YAML).
        #[arg(
            long,
            short,
            env = "ZTUND_CONFIG",
            default_value = "/etc/ztund/config.yaml"
        )]
        config: PathBuf,
    },
    /// Run as Istio's ztunnel container (`proxy ztunnel`, the arguments its Helm chart gives):
    /// the config comes from ztunnel's environment and the chart's mounts, then a ztund config
    /// file (`ZTUND_CONFIG`, or /etc/ztund/config.yaml when present), then `ZTUND_*`.
    Proxy {
        #[command(subcommand)]
        kind: ProxyKind,
    },
    /// The built-in certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Build a two-node mesh from network namespaces on this machine, run the real daemons,
    /// send traffic between pods, print what happened, and tear it all down (needs root).
    Demo {
        /// Keep the topology up until Ctrl-C, to poke at it by hand.
        #[arg(long)]
        hold: bool,
        /// Run every pod, the Service VIP, the control plane and every flow on IPv6 addresses.
        #[arg(long)]
        ipv6: bool,
        /// How the daemons capture the pods' traffic (`captureBackend`); `ebpf` needs ztund
        /// built with clang.
        #[arg(long, value_enum, default_value_t = DemoBackend::Nftables)]
        capture_backend: DemoBackend,
    },
    /// The demo's pod sandbox (eBPF backend): started by `ztund demo` in a pod's netns and
    /// cgroup, makes that pod's sockets on request over the inherited unix socket `fd`.
    #[command(name = ztund::demo::POD_SANDBOX_SUBCOMMAND, hide = true)]
    DemoPodSandbox {
        #[arg(long)]
        fd: i32,
    },
    /// Serve Delta ADS and Istio's CA API over TLS from a directory of mesh YAML (for fleets
    /// without Istio); `controlplane token` makes a node's bearer token.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Controlplane {
        #[command(subcommand)]
        command: Option<ControlplaneCommand>,
        /// The directory of YAML served (`*.yaml`, `*.yml`; all documents read as one mesh).
        #[arg(long, required = true)]
        dir: Option<PathBuf>,
        /// The address to listen on (e.g. 0.0.0.0:15012).
        #[arg(long, required = true)]
        listen: Option<SocketAddr>,
        /// Where the CA, the node tokens and the serving certificate live.
        #[arg(long, default_value = DEFAULT_CP_STATE)]
        state_dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// The Istio root namespace.
        #[arg(long, default_value = "istio-system")]
        root_namespace: String,
        /// A DNS name or IP address clients dial (repeatable); the serving certificate carries
        /// it, plus the listen IP, localhost and 127.0.0.1.
        #[arg(long)]
        san: Vec<String>,
        /// The longest lifetime of a workload certificate.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        cert_ttl: Duration,
    },
    /// Validate Istio YAML and print each workload's effective policy.
    Check {
        /// Mesh files (multi-document Kubernetes/Istio YAML).
        #[arg(required_unless_present = "config")]
        files: Vec<PathBuf>,
        /// A node config to validate too (every key, with `ZTUND_*` overrides); its
        /// `meshFile` is checked when no files are named.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The Istio root namespace.
        #[arg(long, default_value = "istio-system")]
        root_namespace: String,
    },
}

/// `ztund demo --capture-backend`: the config's `captureBackend` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum DemoBackend {
    Nftables,
    Ebpf,
}

impl From<DemoBackend> for ztund::config::CaptureBackend {
    fn from(backend: DemoBackend) -> Self {
        match backend {
            DemoBackend::Nftables => ztund::config::CaptureBackend::Nftables,
            DemoBackend::Ebpf => ztund::config::CaptureBackend::Ebpf,
        }
    }
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a root CA in DIR (Istio's cacerts layout; the key is written with mode 0600).
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
}

#[derive(Debug, Subcommand)]
enum ProxyKind {
    /// The node proxy of Istio ambient.
    Ztunnel {
        /// Print the resulting config as YAML (with any warnings on stderr) and exit.
        #[arg(long)]
        print_config: bool,
    },
}

const DEFAULT_CP_STATE: &str = "/var/lib/ztund-controlplane";

#[derive(Debug, Subcommand)]
enum ControlplaneCommand {
    /// Print a node's bearer token, creating it if it has none.
    Token {
        #[arg(long, default_value = DEFAULT_CP_STATE)]
        state_dir: PathBuf,
        #[arg(long)]
        node: String,
        /// Replace the token: the old one stops working at once.
        #[arg(long)]
        rotate: bool,
    },
}

fn parse_duration(text: &str) -> Result<Duration, ztund::config::duration_text::DurationError> {
    ztund::config::duration_text::parse(text)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = if cli.log_json {
        ztund::config::LogFormat::Json
    } else {
        ztund::config::LogFormat::Text
    };
    match cli.command {
        Command::Run { config } => {
            let config = match ztund::config::Config::load(&config)
                .and_then(|mut c| c.apply_env(|k| std::env::var(k).ok()).map(|_| c))
            {
                Ok(config) => config,
                Err(e) => return fail(&e),
            };
            let format = if cli.log_json {
                format
            } else {
                config.log_format
            };
            let log = ztund::logging::init(format, "info");
            report(ztund::daemon::run(config, log))
        }
        Command::Proxy {
            kind: ProxyKind::Ztunnel { print_config },
        } => run_as_ztunnel(cli.log_json, print_config),
        Command::Ca {
            command: CaCommand::Init { dir, trust_domain },
        } => match ztund::identity::ca::CertificateAuthority::init(&dir, &trust_domain) {
            Ok(_) => {
                println!(
                    "created a CA for trust domain {trust_domain} in {}",
                    dir.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Demo {
            hold,
            ipv6,
            capture_backend,
        } => {
            let _log = ztund::logging::init(format, "warn");
            report(ztund::demo::run(ztund::demo::Options {
                hold,
                ipv6,
                backend: capture_backend.into(),
            }))
        }
        Command::DemoPodSandbox { fd } => report(ztund::demo::serve_pod_sandbox(fd)),
        Command::Controlplane {
            command:
                Some(ControlplaneCommand::Token {
                    state_dir,
                    node,
                    rotate,
                }),
            ..
        } => match ztund::controlplane::tokens::node_token(&state_dir, &node, rotate) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Controlplane {
            command: None,
            dir,
            listen,
            state_dir,
            trust_domain,
            root_namespace,
            san,
            cert_ttl,
        } => {
            let (Some(dir), Some(listen)) = (dir, listen) else {
                return fail(&"controlplane needs --dir and --listen");
            };
            let _log = ztund::logging::init(format, "info");
            report(ztund::controlplane::run_blocking(
                ztund::controlplane::Settings {
                    dir,
                    listen,
                    state_dir,
                    trust_domain,
                    root_namespace,
                    sans: san,
                    cert_ttl,
                },
            ))
        }
        Command::Check {
            mut files,
            config,
            root_namespace,
        } => {
            let _log = ztund::logging::init(format, "warn");
            if let Some(path) = config {
                let loaded = ztund::config::Config::load(&path)
                    .and_then(|mut c| c.apply_env(|k| std::env::var(k).ok()).map(|_| c));
                match loaded {
                    Ok(config) if files.is_empty() => files.extend(config.mesh_file),
                    Ok(_) => {}
                    Err(e) => return fail(&e),
                }
            }
            let settings = ztund::mesh::MeshSettings {
                root_namespace,
                ..Default::default()
            };
            match ztund::mesh::snapshot_from_files(&files, &settings) {
                Ok(snapshot) => {
                    print!("{}", ztund::check::report(&snapshot));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
    }
}

fn run_as_ztunnel(log_json: bool, print_config: bool) -> ExitCode {
    use ztund::ztunnel_env::{ChartEnv, load};
    let loaded = match load(&ChartEnv::from_process()) {
        Ok(loaded) => loaded,
        Err(e) => return fail(&e),
    };
    if print_config {
        for warning in &loaded.warnings {
            eprintln!("ztund: warning: {warning}");
        }
        return match serde_norway::to_string(&loaded.config) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        };
    }
    let format = if log_json {
        ztund::config::LogFormat::Json
    } else {
        loaded.config.log_format
    };
    let log = ztund::logging::init(format, "info");
    if let Some(file) = &loaded.file {
        tracing::info!(file = %file.display(), "ztund config file layered on ztunnel's environment");
    }
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    report(ztund::daemon::run(loaded.config, log))
}

fn report<E: std::fmt::Display>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("ztund: error: {error}");
    ExitCode::FAILURE
}
