//! The `backflow` binary: parse the command line, set up logs, call the library.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use backflow::controller::resolve::SecretAccess;
use backflow::local::{LocalRunConfig, output, run_local};

/// Planning allocates a few small values per row; mimalloc halves what glibc's malloc cost in
/// `make bench`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Backflow: reverse ETL as a Kubernetes operator.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "BACKFLOW_LOG_FORMAT")]
    log_format: LogFormat,
    /// Address ranges no connection of a sync may reach, checked after DNS resolution:
    /// CIDRs, addresses, `link-local` and `loopback`, comma-separated (an empty value denies
    /// nothing). Default: `link-local` for `run`, `link-local,loopback` for `operator`.
    #[arg(
        long,
        global = true,
        env = "BACKFLOW_EGRESS_DENY",
        value_delimiter = ',',
        num_args = 0..
    )]
    egress_deny: Option<Vec<String>>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run syncs once: from manifests without a cluster (`-f`), or one sync of a cluster
    /// (`--namespace NS --sync NAME`, what Job-mode pods run).
    Run {
        /// Manifest files or directories (multi-document YAML).
        #[arg(
            short = 'f',
            long = "file",
            required_unless_present = "namespace",
            conflicts_with = "namespace"
        )]
        files: Vec<PathBuf>,
        /// Run the sync `--sync` of this namespace from the cluster: objects are read from the
        /// API server, status, state and Events are written there.
        #[arg(long, requires = "sync")]
        namespace: Option<String>,
        /// What started this run (set by the operator on Job-mode runs).
        #[arg(long, default_value = "SpecChanged", requires = "namespace")]
        trigger: String,
        /// Which Secrets the sync may use in the cluster: `granted` (those whose
        /// `backflow.dev/allowed-references` annotation names the object) or `namespace` (any
        /// of its namespace). Local runs (`-f`) do not check grants.
        #[arg(long, value_enum, default_value_t = SecretAccess::Granted, env = "BACKFLOW_SECRET_ACCESS")]
        secret_access: SecretAccess,
        /// Allow `sqlite://` sources and destinations in a cluster run (development only).
        #[arg(long, requires = "namespace")]
        allow_sqlite: bool,
        /// The cluster's name in warehouse state (set by the operator on Job-mode runs).
        #[arg(long, requires = "namespace", env = "BACKFLOW_CLUSTER_NAME")]
        cluster_name: Option<String>,
        /// Seconds between writes of the run's progress to the sync's status (set by the
        /// operator on Job-mode runs).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..), requires = "namespace")]
        progress_interval_seconds: u64,
        /// Plan and print what would be sent; send nothing and keep state as it is.
        #[arg(long)]
        dry_run: bool,
        /// Directory of the local state store.
        #[arg(long, default_value = ".backflow/state", env = "BACKFLOW_STATE_DIR")]
        state_dir: PathBuf,
        /// Ignore stored fingerprints for this run and send every row.
        #[arg(long)]
        full_resync: bool,
        /// Syncs with a cursor: read the whole model and diff it (deletes too) instead of
        /// reading only the rows past the high-water mark.
        #[arg(long)]
        full_diff: bool,
        /// Run only this sync (repeatable); all syncs when absent.
        #[arg(long = "sync")]
        sync: Vec<String>,
        /// Commit a checkpoint of accepted records after this many (a crash resends at most
        /// one checkpoint).
        #[arg(long, default_value_t = 10_000)]
        checkpoint_records: usize,
        /// Summary format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        output: OutputFormat,
        /// Let through, once, deletes past a sync's delete limit: the plan id the refused run
        /// printed (`COUNT-HASH`). A different plan is still held back.
        #[arg(long, value_name = "PLAN_ID")]
        approve_deletes: Option<String>,
    },
    /// Run the operator: reconcile ReverseSyncs and Destinations in the cluster.
    Operator(Box<OperatorArgs>),
    /// Print the CustomResourceDefinitions generated from the API types.
    Crds,
    #[command(flatten)]
    Cluster(backflow::cli::ClusterCommand),
    /// Print a shell completion script: `source <(backflow completion bash)`; see docs/cli.md
    /// for zsh and fish.
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: backflow::cli::completion::Shell,
    },
    /// Check manifests offline (no cluster, database or network), for a pull request.
    ///
    /// Checks what the API server and the operator would: the CRD schemas and their CEL rules,
    /// the field checks of `run`, and references between the objects given (a sync's
    /// Destination, the Secrets named and their grants). Exits 1 when any error is found;
    /// warnings alone exit 0.
    Validate {
        /// Manifest files or directories (searched for .yaml and .yml files); `-` reads
        /// standard input, like the output of `kustomize build`.
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        /// A Secret named but absent from the files is an error (by default a warning, since
        /// Secrets usually come from a secrets manager).
        #[arg(long)]
        require_secrets: bool,
        /// How the target cluster's operator checks Secret grants: `granted` (a Secret that does
        /// not name its user in `backflow.dev/allowed-references` is an error) or `namespace`
        /// (grants not checked).
        #[arg(long, value_enum, default_value_t = SecretAccess::Granted)]
        secret_access: SecretAccess,
        /// Report format: `text` (one `file:line:column:` line per finding) or `json`.
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        output: OutputFormat,
    },
}

#[derive(clap::Args)]
struct OperatorArgs {
    /// Address serving /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080", env = "BACKFLOW_LISTEN")]
    listen: std::net::SocketAddr,
    /// Namespace to watch (repeatable); all namespaces when absent.
    #[arg(
        long = "watch-namespace",
        env = "BACKFLOW_WATCH_NAMESPACES",
        value_delimiter = ','
    )]
    watch_namespace: Vec<String>,
    /// Take the leader Lease before reconciling (for more than one replica).
    #[arg(long, env = "BACKFLOW_LEADER_ELECTION")]
    leader_election: bool,
    /// Name of the leader Lease.
    #[arg(long, default_value = "backflow-operator")]
    lease_name: String,
    /// Seconds the leader Lease lasts without renewal.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Namespace of the leader Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Runs in flight at once across all syncs (InProcess mode).
    #[arg(long, default_value_t = 4)]
    max_concurrent_runs: usize,
    /// Image of Job-mode run pods (normally the operator's own image).
    #[arg(
        long,
        env = "BACKFLOW_JOB_IMAGE",
        default_value = "ghcr.io/backflow-dev/backflow:latest"
    )]
    job_image: String,
    /// Service account of Job-mode run pods.
    #[arg(long)]
    job_service_account: Option<String>,
    /// Images a sync's jobTemplate.image may name besides --job-image (repeatable or
    /// comma-separated); none by default.
    #[arg(long, value_delimiter = ',')]
    job_allowed_images: Vec<String>,
    /// ServiceAccounts a sync's jobTemplate.serviceAccountName may name besides
    /// --job-service-account (repeatable or comma-separated); none by default.
    #[arg(long, value_delimiter = ',')]
    job_allowed_service_accounts: Vec<String>,
    /// Honour a sync's jobTemplate.nodeSelector and tolerations (off: a sync that sets them
    /// is Stalled, and run pods are placed by --job-node-selector and --job-tolerations).
    #[arg(long)]
    job_allow_placement: bool,
    /// Size limit of a run pod's /tmp, where it spills planned rows.
    #[arg(long, default_value = "4Gi")]
    job_tmp_size_limit: String,
    /// Watch Secrets (needs list and watch on Secrets) so a changed Secret wakes the syncs
    /// using it at once; without it, only the Secrets specs name are read, by name.
    #[arg(long, env = "BACKFLOW_WATCH_SECRETS")]
    watch_secrets: bool,
    /// Seconds a finished run Job is kept.
    #[arg(long, default_value_t = 3600)]
    job_ttl_seconds: i32,
    /// Pod retries of a run Job before it fails.
    #[arg(long, default_value_t = 0)]
    job_backoff_limit: i32,
    /// Resources of run containers, as JSON (a ResourceRequirements object).
    #[arg(long)]
    job_resources: Option<String>,
    /// Node selector of run pods, as a JSON object.
    #[arg(long)]
    job_node_selector: Option<String>,
    /// Tolerations of run pods, as a JSON array.
    #[arg(long)]
    job_tolerations: Option<String>,
    /// Seconds to wait on SIGTERM for runs in flight to reach a checkpoint.
    #[arg(long, default_value_t = 25)]
    shutdown_grace_seconds: u64,
    /// Which Secrets Destinations and ReverseSyncs may use: `granted` (only Secrets whose
    /// `backflow.dev/allowed-references` annotation names the object) or `namespace` (any
    /// Secret of their namespace: whoever edits Backflow objects there reads its Secrets).
    #[arg(long, value_enum, default_value_t = SecretAccess::Granted, env = "BACKFLOW_SECRET_ACCESS")]
    secret_access: SecretAccess,
    /// Allow `sqlite://` sources and destinations: files inside the operator's pod, lost on
    /// restart and shared by every tenant. For development clusters only; refused otherwise.
    #[arg(long)]
    allow_sqlite: bool,
    /// This cluster's name in warehouse state, so that clusters sharing a warehouse keep their
    /// syncs apart (default: the uid of namespace kube-system, when readable).
    #[arg(long, env = "BACKFLOW_CLUSTER_NAME")]
    cluster_name: Option<String>,
    /// Seconds between writes of a run's progress to its sync's status (`status.progress`)
    /// while the run goes on; live metrics move every second regardless.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..), env = "BACKFLOW_PROGRESS_INTERVAL_SECONDS")]
    progress_interval_seconds: u64,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BACKFLOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,backflow=info"));
    // Colour only for a person at a terminal: piped logs (kubectl logs, CI) stay plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Runs the command; an error is printed as its one-line message and causes, never with the
/// backtrace `anyhow` would add under `RUST_BACKTRACE=1` (a manifest error is for the user,
/// not a bug report).
fn main() -> std::process::ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn run() -> anyhow::Result<std::process::ExitCode> {
    let cli = parse();
    init_tracing(cli.log_format);
    let egress = match (&cli.egress_deny, &cli.command) {
        (Some(rules), _) => backflow::egress::Policy::parse(rules).context("failed to read --egress-deny")?,
        (None, Command::Operator(_)) => backflow::egress::Policy::cluster(),
        (None, _) => backflow::egress::Policy::local(),
    };
    let egress_rules: Vec<String> = egress.rules().iter().map(ToString::to_string).collect();
    tracing::debug!(deny = %egress_rules.join(","), "egress policy");
    backflow::egress::install(egress);
    match cli.command {
        Command::Cluster(command) => Ok(exit_code(backflow::cli::run(command).await?)),
        Command::Completion { shell } => {
            let mut command = Cli::command();
            let name = command.get_bin_name().unwrap_or("backflow").to_owned();
            match backflow::cli::completion::write(shell, &mut command, &name, &mut std::io::stdout()) {
                // `backflow completion bash | head`: the reader has what it wanted.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                other => other.context("failed to write the completion script")?,
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Crds => {
            print!(
                "{}",
                backflow::api::crds::render().context("failed to render CRDs")?
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Validate {
            files,
            require_secrets,
            secret_access,
            output,
        } => {
            let options = backflow::validate::Options {
                require_secrets,
                secret_access,
            };
            let report = backflow::validate::validate(&files, &options);
            match output {
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&backflow::validate::output::json(&report))?
                ),
                OutputFormat::Text => print!("{}", backflow::validate::output::text(&report)),
            }
            Ok(if report.is_valid() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            })
        }
        Command::Operator(args) => {
            let shutdown = shutdown_token();
            let mut config = operator_config(*args, cli.log_format, egress_rules)?;
            let client = kube::Client::try_default()
                .await
                .context("failed to configure the Kubernetes client (in-cluster or KUBECONFIG)")?;
            if config.policy.cluster_name.is_none() {
                config.policy.cluster_name = backflow::controller::default_cluster_name(&client).await;
            }
            backflow::controller::run_operator(client, config, shutdown).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Run {
            namespace: Some(namespace),
            sync,
            trigger,
            secret_access,
            allow_sqlite,
            cluster_name,
            progress_interval_seconds,
            ..
        } => {
            let [name] = sync.as_slice() else {
                anyhow::bail!("--namespace runs exactly one sync: give one --sync NAME");
            };
            let client = kube::Client::try_default()
                .await
                .context("failed to configure the Kubernetes client (in-cluster or KUBECONFIG)")?;
            let identity = std::env::var("POD_NAME").unwrap_or_else(|_| "backflow-run".to_owned());
            let outcome = backflow::controller::cluster_run::run_in_cluster(
                client,
                &namespace,
                name,
                backflow::controller::cluster_run::parse_trigger(&trigger),
                &identity,
                backflow::controller::runner::RunPolicy {
                    secret_access,
                    allow_sqlite,
                    cluster_name: cluster_name.filter(|c| !c.is_empty()),
                    progress_interval: std::time::Duration::from_secs(progress_interval_seconds),
                },
                shutdown_token(),
            )
            .await?;
            println!("{}: {}", outcome.reason, outcome.message);
            Ok(if outcome.failed {
                std::process::ExitCode::FAILURE
            } else {
                std::process::ExitCode::SUCCESS
            })
        }
        Command::Run {
            files,
            dry_run,
            state_dir,
            full_resync,
            full_diff,
            sync,
            checkpoint_records,
            output,
            approve_deletes,
            ..
        } => {
            let cancel = shutdown_token();
            let config = LocalRunConfig {
                paths: files,
                state_dir,
                dry_run,
                full_resync,
                full_diff,
                only: sync,
                checkpoint_records,
                approve_deletes,
            };
            let outcomes = run_local(&config, cancel, output::ProgressView::for_sync).await?;
            let failed = outcomes.iter().any(|o| o.failed());
            match output {
                OutputFormat::Json => {
                    let all: Vec<_> = outcomes.iter().map(output::summary_json).collect();
                    println!("{}", serde_json::to_string_pretty(&all)?);
                }
                OutputFormat::Text => {
                    for o in &outcomes {
                        print!("{}", output::summary_text(o, dry_run));
                    }
                }
            }
            Ok(if failed {
                std::process::ExitCode::FAILURE
            } else {
                std::process::ExitCode::SUCCESS
            })
        }
    }
}

/// Parses the command line; started as `kubectl-backflow` (a kubectl plugin), usage and help
/// say `kubectl backflow`.
fn parse() -> Cli {
    let plugin = std::env::args_os()
        .next()
        .is_some_and(|argv0| backflow::cli::completion::invoked_as_kubectl_plugin(&argv0));
    let mut command = Cli::command();
    if plugin {
        command = command.bin_name("kubectl backflow");
    }
    let matches = command.get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn exit_code(succeeded: bool) -> std::process::ExitCode {
    if succeeded {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// A token cancelled on SIGTERM or Ctrl-C.
fn shutdown_token() -> CancellationToken {
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::warn!("stopping: in-flight batches finish and are committed");
        on_signal.cancel();
    });
    cancel
}

/// The operator's settings from its flags.
fn operator_config(
    args: OperatorArgs,
    log_format: LogFormat,
    egress_deny: Vec<String>,
) -> anyhow::Result<backflow::controller::OperatorConfig> {
    fn json<T: serde::de::DeserializeOwned>(flag: &str, text: Option<String>) -> anyhow::Result<Option<T>> {
        text.map(|t| {
            serde_json::from_str(&t).with_context(|| format!("--{flag} is not valid JSON for its type"))
        })
        .transpose()
    }
    let identity = std::env::var("POD_NAME")
        .unwrap_or_else(|_| format!("backflow-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    Ok(backflow::controller::OperatorConfig {
        listen: args.listen,
        namespaces: args
            .watch_namespace
            .into_iter()
            .filter(|n| !n.is_empty())
            .collect(),
        leader_election: args.leader_election,
        lease_name: args.lease_name,
        lease_namespace: args.lease_namespace,
        lease_duration: std::time::Duration::from_secs(args.lease_duration_seconds),
        identity,
        max_concurrent_runs: args.max_concurrent_runs,
        job: backflow::controller::job::JobDefaults {
            image: args.job_image,
            service_account: args.job_service_account,
            ttl_seconds_after_finished: args.job_ttl_seconds,
            backoff_limit: args.job_backoff_limit,
            resources: json("job-resources", args.job_resources)?,
            node_selector: json("job-node-selector", args.job_node_selector)?,
            tolerations: json("job-tolerations", args.job_tolerations)?,
            log_format: Some(match log_format {
                LogFormat::Json => "json".to_owned(),
                LogFormat::Text => "text".to_owned(),
            }),
            allowed_images: args.job_allowed_images,
            allowed_service_accounts: args.job_allowed_service_accounts,
            allow_placement: args.job_allow_placement,
            tmp_size_limit: Some(args.job_tmp_size_limit),
            // Run pods apply the operator's own rules.
            egress_deny: Some(egress_deny),
        },
        shutdown_grace: std::time::Duration::from_secs(args.shutdown_grace_seconds),
        policy: backflow::controller::runner::RunPolicy {
            secret_access: args.secret_access,
            allow_sqlite: args.allow_sqlite,
            cluster_name: args.cluster_name.filter(|c| !c.is_empty()),
            progress_interval: std::time::Duration::from_secs(args.progress_interval_seconds),
        },
        custom_connectors: backflow::engine::setup::CustomConnectors::default(),
        watch_secrets: args.watch_secrets,
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
