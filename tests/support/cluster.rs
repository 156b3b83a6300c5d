//! A real Kubernetes control plane for the end-to-end tests: etcd 3.4, kube-apiserver and
//! kube-controller-manager v1.20.2 (built and cached by `scripts/kube-control-plane.sh`), one
//! per test binary on free loopback ports, stopped by PID when the binary exits.
//!
//! What it gives: RBAC (`--authorization-mode=RBAC`), token authentication (an `admin` in
//! `system:masters`; the operator ServiceAccount `backflow-system/backflow-operator` by a static
//! token; every other ServiceAccount by the token Secret the controller manager writes), the
//! garbage collector, namespace and Job controllers, and everything `config/default` renders
//! (CRDs, namespace, ServiceAccounts, RBAC, the Deployment and its Service) installed as a user
//! installs it.
//!
//! What it does not have: a kubelet and a scheduler, so no pod ever runs. Job-mode tests play
//! the kubelet themselves ([`ControlPlane::run_job_like_a_kubelet`]). Kubernetes 1.20 does not
//! know CEL (`x-kubernetes-validations`): those rules are checked by their own tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};

/// Where the repository is.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn script() -> PathBuf {
    repo().join("scripts/kube-control-plane.sh")
}

/// A free loopback port (bound then released; the control plane binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// One running control plane.
pub struct ControlPlane {
    /// Its files: kubeconfigs, logs, PIDs, PKI.
    pub dir: PathBuf,
    /// Directory of kube-apiserver, kube-controller-manager, kubectl and etcd.
    pub bin: PathBuf,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// etcd's client port.
    pub etcd_port: u16,
}

static PLANE: OnceLock<ControlPlane> = OnceLock::new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The control plane of this test binary, started (and the CRDs and RBAC installed) on first use.
pub fn control_plane() -> &'static ControlPlane {
    PLANE.get_or_init(ControlPlane::start)
}

fn run(command: &mut Command) -> String {
    let shown = format!("{command:?}");
    let out = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("failed to run {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl ControlPlane {
    fn start() -> ControlPlane {
        let bin = run(Command::new(script()).arg("bindir")).trim().to_owned();
        let dir = std::env::temp_dir().join(format!(
            "backflow-e2e-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("the control plane's directory");
        let (etcd_port, peer, api) = (free_port(), free_port(), free_port());
        let started = Instant::now();
        run(Command::new(script())
            .arg("start")
            .arg(&dir)
            .env("ETCD_PORT", etcd_port.to_string())
            .env("ETCD_PEER_PORT", peer.to_string())
            .env("APISERVER_PORT", api.to_string())
            .env("OWNER_PID", std::process::id().to_string()));
        let plane = ControlPlane {
            dir,
            bin: PathBuf::from(bin),
            url: format!("https://127.0.0.1:{api}"),
            etcd_port,
        };
        plane.install();
        eprintln!(
            "control plane up in {:.1}s at {} ({})",
            started.elapsed().as_secs_f64(),
            plane.url,
            plane.dir.display()
        );
        plane
    }

    /// Installs as a user does, everything `config/default` renders (`kubectl kustomize`):
    /// its CRDs with `kubectl create --validate=false` (1.20 refuses `x-kubernetes-validations`
    /// otherwise), waited on until Established; then the namespace, ServiceAccounts, RBAC,
    /// Deployment and Service with `kubectl apply`.
    fn install(&self) {
        // kubectl 1.20's kustomize is too old for config/; render with the machine's kubectl
        // (what `make test-chart` uses) and apply with 1.20's.
        let rendered = run(Command::new("kubectl")
            .arg("kustomize")
            .arg(repo().join("config/default")));
        std::fs::write(self.dir.join("config-default.yaml"), &rendered)
            .expect("write the rendered config/default");
        let (crds, rest): (Vec<serde_json::Value>, Vec<serde_json::Value>) = self
            .config_default()
            .into_iter()
            .partition(|o| o["kind"] == "CustomResourceDefinition");
        let list =
            |items| serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string();
        self.kubectl_stdin(&["create", "--validate=false", "-f", "-"], &list(crds));
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/reversesyncs.backflow.dev",
            "crd/destinations.backflow.dev",
        ]);
        self.kubectl_stdin(&["apply", "-f", "-"], &list(rest));
    }

    /// The objects `config/default` renders to (what this control plane installed at start).
    pub fn config_default(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.join("config-default.yaml"))
            .expect("the rendered config/default");
        serde_yaml_ng::Deserializer::from_str(&text)
            .map(|doc| <serde_json::Value as serde::Deserialize>::deserialize(doc).expect("a YAML object"))
            .collect()
    }

    /// The admin kubeconfig.
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// The kubeconfig of the operator ServiceAccount (`backflow-system/backflow-operator`).
    pub fn operator_kubeconfig(&self) -> PathBuf {
        self.dir.join("operator.kubeconfig")
    }

    /// kubectl v1.20 as admin; panics with its output when it fails.
    pub fn kubectl(&self, args: &[&str]) -> String {
        run(&mut self.kubectl_command(args))
    }

    /// kubectl as admin; the exit status and output, for commands expected to fail.
    pub fn kubectl_result(&self, args: &[&str]) -> (bool, String) {
        let out = self
            .kubectl_command(args)
            .stdin(Stdio::null())
            .output()
            .expect("kubectl runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// kubectl as admin with `input` on stdin.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> String {
        use std::io::Write;
        let mut child = self
            .kubectl_command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input.as_bytes())
            .expect("kubectl reads stdin");
        let out = child.wait_with_output().expect("kubectl finishes");
        assert!(
            out.status.success(),
            "kubectl {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn kubectl_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.bin.join("kubectl"));
        c.arg("--kubeconfig").arg(self.admin_kubeconfig()).args(args);
        c
    }

    /// An admin client.
    pub async fn admin(&self) -> Client {
        client_from(&self.admin_kubeconfig()).await
    }

    /// A fresh namespace named after `prefix`.
    pub fn namespace(&self, prefix: &str) -> String {
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id() % 100_000,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        self.kubectl(&["create", "namespace", &name]);
        name
    }

    /// Writes a kubeconfig for ServiceAccount `namespace/name` with the token the controller
    /// manager's token controller put in its Secret (waits for it).
    pub async fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> PathBuf {
        let client = self.admin().await;
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
        let secrets: Api<Secret> = Api::namespaced(client, namespace);
        let deadline = Instant::now() + Duration::from_secs(60);
        let token = loop {
            let secret_name = accounts
                .get_opt(name)
                .await
                .expect("read the ServiceAccount")
                .and_then(|sa| sa.secrets)
                .and_then(|s| s.into_iter().next())
                .and_then(|r| r.name);
            if let Some(secret_name) = secret_name
                && let Some(token) = secrets
                    .get_opt(&secret_name)
                    .await
                    .expect("read the token Secret")
                    .and_then(|s| s.data)
                    .and_then(|d| d.get("token").cloned())
            {
                break String::from_utf8(token.0).expect("a UTF-8 token");
            }
            assert!(
                Instant::now() < deadline,
                "no token Secret for ServiceAccount {namespace}/{name} after 60s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let admin = std::fs::read_to_string(self.admin_kubeconfig()).expect("admin kubeconfig");
        let path = self.dir.join(format!("sa-{namespace}-{name}.kubeconfig"));
        let start = admin.find("users:").expect("a users section");
        let config = format!(
            "{}users:\n- name: admin\n  user: {{token: {token}}}\n",
            &admin[..start]
        );
        std::fs::write(&path, config).expect("write the kubeconfig");
        path
    }

    /// Stops kube-apiserver (etcd and the controller manager keep running).
    pub fn stop_apiserver(&self) {
        run(Command::new(script()).arg("stop-apiserver").arg(&self.dir));
    }

    /// Starts kube-apiserver again on the same port and etcd; returns once it is ready.
    pub fn start_apiserver(&self) {
        run(Command::new(script()).arg("start-apiserver").arg(&self.dir));
    }

    /// Writes a few keys outside the API server's tree, then compacts etcd's history up to the
    /// current revision (through etcd's v3 JSON gateway), so every watch resuming from an
    /// older resourceVersion gets `410 Gone`.
    pub async fn bump_and_compact_etcd(&self) -> i64 {
        let base = format!("http://127.0.0.1:{}/v3", self.etcd_port);
        let http = reqwest::Client::new();
        for i in 0..5 {
            use base64::Engine as _;
            let b64 = |t: &str| base64::engine::general_purpose::STANDARD.encode(t);
            let put = http
                .post(format!("{base}/kv/put"))
                .json(&serde_json::json!({"key": b64(&format!("/backflow-e2e/bump-{i}")), "value": b64("x")}))
                .send()
                .await
                .expect("etcd answers");
            assert!(put.status().is_success(), "etcd put: {put:?}");
        }
        let range: serde_json::Value = http
            .post(format!("{base}/kv/range"))
            .json(&serde_json::json!({"key": "AA==", "limit": 1}))
            .send()
            .await
            .expect("etcd answers")
            .json()
            .await
            .expect("etcd's range JSON");
        let revision: i64 = range["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .expect("a revision");
        let compacted = http
            .post(format!("{base}/kv/compaction"))
            .json(&serde_json::json!({"revision": revision.to_string(), "physical": true}))
            .send()
            .await
            .expect("etcd answers");
        assert!(compacted.status().is_success(), "compaction: {compacted:?}");
        revision
    }

    /// Plays the kubelet for a Job's pod: runs its container's command, args and env (fieldRefs
    /// resolved) as a local process of the `backflow` binary, under the token of the pod's
    /// ServiceAccount. Returns whether it exited 0, and its output.
    pub async fn run_job_like_a_kubelet(&self, job: &k8s_openapi::api::batch::v1::Job) -> (bool, String) {
        let namespace = job.metadata.namespace.clone().expect("a namespaced Job");
        let pod = job
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.clone())
            .expect("a pod template");
        let account = pod
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let kubeconfig = self.service_account_kubeconfig(&namespace, &account).await;
        let [container] = pod.containers.as_slice() else {
            panic!("one container per run pod");
        };
        let pod_name = format!("{}-kubelet", job.metadata.name.clone().unwrap_or_default());
        let mut command = Command::new(env!("CARGO_BIN_EXE_backflow"));
        // The image's entrypoint is the binary; `command` would replace it.
        if let Some(cmd) = &container.command {
            command.args(cmd.iter().skip(1));
        }
        command.args(container.args.clone().unwrap_or_default());
        command
            .env_clear()
            .env("KUBECONFIG", &kubeconfig)
            .env("PATH", "/usr/bin:/bin");
        for var in container.env.clone().unwrap_or_default() {
            let value = match (var.value, var.value_from.and_then(|v| v.field_ref)) {
                (Some(v), _) => v,
                (None, Some(f)) if f.field_path == "metadata.name" => pod_name.clone(),
                (None, Some(f)) if f.field_path == "metadata.namespace" => namespace.clone(),
                (None, other) => panic!("the test kubelet cannot resolve env {} ({other:?})", var.name),
            };
            command.env(var.name, value);
        }
        let out = tokio::process::Command::from(command)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("the run pod's command starts");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

/// A client from a kubeconfig file.
pub async fn client_from(path: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).expect("a kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a client config");
    Client::try_from(config).expect("a client")
}

/// A `backflow` process run out of cluster, as a Deployment's pod would run it.
pub struct Process {
    child: Option<Child>,
    /// Its log file (stderr and stdout).
    pub log: PathBuf,
    /// Its `/metrics`, `/healthz`, `/readyz` address.
    pub listen: String,
}

impl Process {
    /// Starts `backflow operator ARGS` with `kubeconfig`, listening on a free port.
    pub fn operator(kubeconfig: &Path, identity: &str, args: &[&str]) -> Process {
        let listen = format!("127.0.0.1:{}", free_port());
        let all: Vec<String> = ["operator", "--listen", &listen]
            .iter()
            .chain(&["--job-image", "backflow:e2e", "--lease-duration-seconds", "6"])
            // PostgreSQL listens on loopback here; the operator's default also denies it.
            .chain(&["--egress-deny", "link-local"])
            .chain(args)
            .map(|a| (*a).to_owned())
            .collect();
        let env = [
            ("POD_NAME".to_owned(), identity.to_owned()),
            ("POD_NAMESPACE".to_owned(), "backflow-system".to_owned()),
            ("BACKFLOW_LOG".to_owned(), "warn,backflow=debug".to_owned()),
        ];
        Process::command(kubeconfig, identity, &all, &env, listen)
    }

    /// Starts `backflow ARGS` with exactly these arguments and environment, and `kubeconfig`
    /// (as a pod's container runs them); `listen` is the address its `--listen` gives.
    pub fn command(
        kubeconfig: &Path,
        identity: &str,
        args: &[String],
        env: &[(String, String)],
        listen: String,
    ) -> Process {
        let plane = control_plane();
        let log = plane.dir.join(format!("operator-{identity}.log"));
        let file = std::fs::File::create(&log).expect("the operator's log");
        let child = Command::new(env!("CARGO_BIN_EXE_backflow"))
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("the backflow binary starts");
        Process {
            child: Some(child),
            log,
            listen,
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path` on the operator's port: status code and body (0 when it does not answer).
    pub async fn get(&self, path: &str) -> (u16, String) {
        let url = format!("http://{}{path}", self.listen);
        match reqwest::get(&url).await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    }

    /// Waits until GET `path` answers `code`, or panics with the log.
    pub async fn wait_for(&self, path: &str, code: u16, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let (got, _) = self.get(path).await;
            if got == code {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{path} did not answer {code} within {within:?} (last {got}); log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or_default()
    }

    /// SIGKILL, as a node failure or OOM kill does.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for the exit, as a pod deletion does.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}
