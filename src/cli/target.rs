//! Which cluster and namespace a command talks to: the kubeconfig's current context (or
//! `--context`) and its namespace (or `-n`), as kubectl chooses them.

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use super::CliError;
use crate::api::ReverseSync;

/// The context and namespace flags every cluster command takes.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Target {
    /// Namespace (default: the namespace of the kubeconfig context, else `default`).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Kubeconfig context (default: the current context).
    #[arg(long)]
    pub context: Option<String>,
}

/// A client and the namespace to work in.
pub struct Connected {
    /// The API client.
    pub client: Client,
    /// `-n`, else the context's namespace, else `default`.
    pub namespace: String,
}

impl Connected {
    /// The ReverseSyncs of the namespace.
    pub fn syncs(&self) -> Api<ReverseSync> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Reads ReverseSync `name`, or says it does not exist.
    pub async fn sync(&self, name: &str) -> Result<ReverseSync, CliError> {
        self.syncs()
            .get_opt(name)
            .await
            .map_err(CliError::api(format!(
                "read ReverseSync {}/{name}",
                self.namespace
            )))?
            .ok_or_else(|| CliError::NotFound {
                kind: "ReverseSync",
                namespace: self.namespace.clone(),
                name: name.to_owned(),
            })
    }
}

impl Target {
    /// Connects as kubectl would: KUBECONFIG or ~/.kube/config, else in-cluster.
    pub async fn connect(&self) -> Result<Connected, CliError> {
        let config = match &self.context {
            Some(context) => {
                let options = KubeConfigOptions {
                    context: Some(context.clone()),
                    ..KubeConfigOptions::default()
                };
                let kubeconfig = Kubeconfig::read().map_err(|e| CliError::Config { source: Box::new(e) })?;
                Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .map_err(|e| CliError::Config { source: Box::new(e) })?
            }
            None => Config::infer()
                .await
                .map_err(|e| CliError::Config { source: Box::new(e) })?,
        };
        let namespace = self
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config).map_err(|e| CliError::Config { source: Box::new(e) })?;
        Ok(Connected { client, namespace })
    }
}
