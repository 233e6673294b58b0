//! The `ztund` command line: the daemon, the built-in CA, the demo and the policy checker.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    },
    /// Validate Istio YAML and print each workload's effective policy.
    Check {
        /// Mesh files (multi-document Kubernetes/Istio YAML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The Istio root namespace.
        #[arg(long, default_value = "istio-system")]
        root_namespace: String,
    },
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
        Command::Demo { hold } => {
            let _log = ztund::logging::init(format, "warn");
            report(ztund::demo::run(hold))
        }
        Command::Check {
            files,
            root_namespace,
        } => {
            let _log = ztund::logging::init(format, "warn");
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
