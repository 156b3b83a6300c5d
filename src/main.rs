//! The `backflow` binary: parse the command line, set up logs, call the library.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

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
    /// Run syncs once from manifests (Secrets, Destinations, ReverseSyncs), without a cluster.
    Run {
        /// Manifest files or directories (multi-document YAML).
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        /// Plan and print what would be sent; send nothing and keep state as it is.
        #[arg(long)]
        dry_run: bool,
        /// Directory of the local state store.
        #[arg(long, default_value = ".backflow/state", env = "BACKFLOW_STATE_DIR")]
        state_dir: PathBuf,
        /// Ignore stored fingerprints for this run and send every row.
        #[arg(long)]
        full_resync: bool,
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
    },
    /// Print the CustomResourceDefinitions generated from the API types.
    Crds,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BACKFLOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,backflow=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
        LogFormat::Text => builder.init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Crds => {
            print!(
                "{}",
                backflow::api::crds::render().context("failed to render CRDs")?
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Run {
            files,
            dry_run,
            state_dir,
            full_resync,
            sync,
            checkpoint_records,
            output,
        } => {
            let cancel = CancellationToken::new();
            let on_signal = cancel.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                tracing::warn!("stopping: in-flight batches finish and are committed");
                on_signal.cancel();
            });
            let config = LocalRunConfig {
                paths: files,
                state_dir,
                dry_run,
                full_resync,
                only: sync,
                checkpoint_records,
            };
            let outcomes = run_local(&config, cancel, output::TerminalProgress::for_sync).await?;
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
