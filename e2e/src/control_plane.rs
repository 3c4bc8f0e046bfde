//! A real Kubernetes control plane for one test: etcd and kube-apiserver on
//! loopback ports chosen at run time, certificates and service-account keys
//! generated for it, an admin kubeconfig, and — when the test asks —
//! kube-controller-manager and kube-scheduler.
//!
//! [`ControlPlane::start`] returns only once the API server answers `/readyz`
//! and `/livez` (and the optional components hold their leader leases), each
//! wait bounded by a deadline. Everything lives in one temp dir; `Drop` kills
//! every component's process group and removes the dir (unless
//! `TWINVOL_E2E_KEEP=1`), and when the test is panicking it first prints the
//! tail of every component's log.

use std::{
    future::Future,
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api, Client,
    config::{KubeConfigOptions, Kubeconfig},
};
use tempfile::TempDir;

use crate::{
    HarnessError, UpstreamBinaries, pki::Pki, ports::free_port, process::ManagedProcess, wait,
};

/// What to start.
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// Where the upstream binaries are.
    pub upstream: UpstreamBinaries,
    /// Also run kube-controller-manager (namespaces, service accounts,
    /// StatefulSets, garbage collection...).
    pub controller_manager: bool,
    /// Also run kube-scheduler.
    pub scheduler: bool,
    /// Deadline for each component to become ready.
    pub start_timeout: Duration,
    /// The address kube-apiserver binds and advertises (the endpoint of the
    /// `kubernetes` Service). Loopback unless nodes must reach it.
    pub bind_address: Ipv4Addr,
    /// The Service ClusterIP range; its first address is the `kubernetes`
    /// Service and is in the serving certificate.
    pub service_cidr: String,
    /// Further names and addresses for the API server's serving certificate.
    pub extra_sans: Vec<String>,
    /// Further kube-apiserver flags (`--flag=value`).
    pub extra_apiserver_args: Vec<String>,
    /// Further kube-controller-manager flags (`--flag=value`).
    pub extra_controller_manager_args: Vec<String>,
    /// The directory to make the control plane's temp dir in (default: the
    /// system temp dir).
    pub parent_dir: Option<PathBuf>,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        Self {
            upstream: UpstreamBinaries::from_env(),
            controller_manager: false,
            scheduler: false,
            start_timeout: Duration::from_secs(120),
            bind_address: Ipv4Addr::LOCALHOST,
            service_cidr: DEFAULT_SERVICE_CIDR.to_owned(),
            extra_sans: Vec::new(),
            extra_apiserver_args: Vec::new(),
            extra_controller_manager_args: Vec::new(),
            parent_dir: None,
        }
    }
}

/// The Service range of a control plane that does not choose its own.
pub const DEFAULT_SERVICE_CIDR: &str = "10.0.0.0/24";

impl ControlPlaneOptions {
    /// etcd and kube-apiserver only.
    pub fn api_server_only() -> Self {
        Self::default()
    }

    /// Adds kube-controller-manager and kube-scheduler.
    pub fn with_controllers(mut self) -> Self {
        self.controller_manager = true;
        self.scheduler = true;
        self
    }
}

/// The binaries one start needs, all checked before anything runs.
struct Binaries {
    etcd: PathBuf,
    apiserver: PathBuf,
    kubectl: PathBuf,
    controller_manager: Option<PathBuf>,
    scheduler: Option<PathBuf>,
}

impl Binaries {
    fn resolve(opts: &ControlPlaneOptions) -> Result<Self, HarnessError> {
        let up = &opts.upstream;
        Ok(Self {
            etcd: up.get("etcd")?,
            apiserver: up.get("kube-apiserver")?,
            kubectl: up.get("kubectl")?,
            controller_manager: opts
                .controller_manager
                .then(|| up.get("kube-controller-manager"))
                .transpose()?,
            scheduler: opts
                .scheduler
                .then(|| up.get("kube-scheduler"))
                .transpose()?,
        })
    }
}

/// A running control plane. Dropping it stops everything and removes its files.
pub struct ControlPlane {
    // Drop order: `Drop::drop` kills the processes first; `dir` is removed
    // when the fields drop afterwards.
    processes: Vec<ManagedProcess>,
    pki: Pki,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    apiserver_url: String,
    client: Client,
    dir: TempDir,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver (and the components `opts` asks for)
    /// and waits until they are ready.
    pub async fn start(opts: ControlPlaneOptions) -> Result<Self, HarnessError> {
        let bins = Binaries::resolve(&opts)?;
        let parent = opts.parent_dir.clone().unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix("twinvol-e2e-")
            .tempdir_in(&parent)
            .map_err(|source| HarnessError::Io {
                action: "creating a temp dir in",
                path: parent.clone(),
                source,
            })?;
        let root = dir.path().to_owned();
        let logs = root.join("logs");
        std::fs::create_dir_all(&logs).map_err(|source| HarnessError::Io {
            action: "creating",
            path: logs.clone(),
            source,
        })?;
        let kubernetes_service = first_service_ip(&opts.service_cidr)?;
        let mut sans = vec![kubernetes_service, opts.bind_address.to_string()];
        sans.extend(opts.extra_sans.iter().cloned());
        let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
        let pki = Pki::generate_with_names(&root.join("pki"), &sans)?;

        // Until `Self` exists, this guard owns the processes, so an early
        // return kills them.
        let mut processes = Vec::new();
        let etcd_client = free_port()?;
        let etcd_peer = free_port()?;
        processes.push(ManagedProcess::spawn(
            "etcd",
            &bins.etcd,
            &etcd_args(&root.join("etcd"), etcd_client, etcd_peer),
            &logs.join("etcd.log"),
        )?);

        let apiserver_port = free_port()?;
        let apiserver_url = format!("https://{}:{apiserver_port}", opts.bind_address);
        let mut args = apiserver_args(&pki, &root, etcd_client, apiserver_port, &opts);
        args.extend(opts.extra_apiserver_args.iter().cloned());
        processes.push(ManagedProcess::spawn(
            "kube-apiserver",
            &bins.apiserver,
            &args,
            &logs.join("kube-apiserver.log"),
        )?);

        let kubeconfig = root.join("admin.kubeconfig");
        write_kubeconfig(&kubeconfig, &apiserver_url, &pki.ca_files.cert, &pki.admin)?;
        let client = client_from(&kubeconfig).await?;

        let mut plane = Self {
            processes,
            pki,
            kubeconfig,
            kubectl: bins.kubectl,
            apiserver_url,
            client,
            dir,
        };
        plane.wait_api_ready(opts.start_timeout).await?;

        if let Some(path) = &bins.controller_manager {
            let port = free_port()?;
            let mut args = controller_manager_args(
                &plane.pki,
                &plane.kubeconfig,
                &root,
                port,
                &opts.service_cidr,
            );
            args.extend(opts.extra_controller_manager_args.iter().cloned());
            plane.processes.push(ManagedProcess::spawn(
                "kube-controller-manager",
                path,
                &args,
                &logs.join("kube-controller-manager.log"),
            )?);
        }
        if let Some(path) = &bins.scheduler {
            let port = free_port()?;
            let args = scheduler_args(&plane.kubeconfig, port);
            plane.processes.push(ManagedProcess::spawn(
                "kube-scheduler",
                path,
                &args,
                &logs.join("kube-scheduler.log"),
            )?);
        }
        if bins.controller_manager.is_some() {
            plane
                .wait_leader("kube-controller-manager", opts.start_timeout)
                .await?;
        }
        if bins.scheduler.is_some() {
            plane
                .wait_leader("kube-scheduler", opts.start_timeout)
                .await?;
        }
        Ok(plane)
    }

    /// A client authenticated as the cluster admin.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The admin kubeconfig file.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn apiserver_url(&self) -> &str {
        &self.apiserver_url
    }

    /// The control plane's temp dir (logs, PKI, etcd data).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// Process ids of the running components, by name.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.processes
            .iter()
            .map(|p| (p.name().to_owned(), p.pid()))
            .collect()
    }

    /// Runs the pinned kubectl against this cluster as the admin.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output, HarnessError> {
        self.kubectl_command(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| self.kubectl_error(args, source))
    }

    /// Runs kubectl and returns its stdout, or an error carrying its stderr
    /// when it exits non-zero.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String, HarnessError> {
        let output = self.kubectl(args)?;
        checked(args, output)
    }

    /// Like [`Self::kubectl_ok`], with `input` on kubectl's stdin.
    pub fn kubectl_ok_with_stdin(
        &self,
        args: &[&str],
        input: &str,
    ) -> Result<String, HarnessError> {
        let output = self.kubectl_with_stdin(args, input)?;
        checked(args, output)
    }

    /// Runs kubectl with `input` on its stdin (for `apply -f -`).
    pub fn kubectl_with_stdin(&self, args: &[&str], input: &str) -> Result<Output, HarnessError> {
        let mut child = self
            .kubectl_command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| self.kubectl_error(args, source))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .map_err(|source| self.kubectl_error(args, source))?;
        }
        child
            .wait_with_output()
            .map_err(|source| self.kubectl_error(args, source))
    }

    fn kubectl_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.kubectl);
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .env_remove("KUBECONFIG")
            // kubectl's discovery cache goes to $HOME/.kube: keep it in the
            // temp dir, away from the user's and from other tests'.
            .env("HOME", self.dir.path());
        command
    }

    fn kubectl_error(&self, args: &[&str], source: std::io::Error) -> HarnessError {
        HarnessError::Kubectl {
            args: args.join(" "),
            source,
        }
    }

    /// The last lines of every component's log.
    pub fn log_tails(&self, lines: usize) -> String {
        self.processes
            .iter()
            .map(|p| {
                format!(
                    "----- last {lines} lines of {} ({}) -----\n{}\n",
                    p.name(),
                    p.log_path().display(),
                    p.log_tail(lines)
                )
            })
            .collect()
    }

    /// Fails with the log tail of a component that died.
    fn check_alive(&mut self) -> Result<(), HarnessError> {
        for process in &mut self.processes {
            if let Some(status) = process.exited() {
                return Err(process.exited_early(status));
            }
        }
        Ok(())
    }

    /// Polls `probe` until it reports ready, failing early with the log of
    /// any component that died, and on timeout with what was last seen and
    /// the tail of every log.
    async fn wait_for<F, Fut>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut probe: F,
    ) -> Result<(), HarnessError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let last = match probe(self.client.clone()).await {
                Ok(()) => return Ok(()),
                Err(last) => last,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(HarnessError::NotReady {
                    what: what.to_owned(),
                    waited: timeout,
                    last,
                    log_tail: self.log_tails(30),
                });
            }
            tokio::time::sleep(wait::POLL).await;
        }
    }

    async fn wait_api_ready(&mut self, timeout: Duration) -> Result<(), HarnessError> {
        for endpoint in ["/readyz", "/livez"] {
            let what = format!("kube-apiserver {endpoint}");
            self.wait_for(&what, timeout, |client| async move {
                let request = http::Request::get(endpoint)
                    .body(Vec::new())
                    .map_err(|e| e.to_string())?;
                match client.request_text(request).await {
                    Ok(body) if body.trim() == "ok" => Ok(()),
                    Ok(body) => Err(body),
                    Err(e) => Err(e.to_string()),
                }
            })
            .await?;
        }
        Ok(())
    }

    /// Waits until `component` holds its leader-election Lease: the sign
    /// that it is connected and running its loops.
    async fn wait_leader(
        &mut self,
        component: &str,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        let what = format!("{component} leader lease");
        self.wait_for(&what, timeout, |client| async move {
            let leases: Api<Lease> = Api::namespaced(client, "kube-system");
            match leases.get_opt(component).await {
                Ok(Some(lease)) => match lease.spec.and_then(|s| s.holder_identity) {
                    Some(holder) if !holder.is_empty() => Ok(()),
                    _ => Err(format!("lease {component} has no holder")),
                },
                Ok(None) => Err(format!("no lease kube-system/{component} yet")),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
    }
}

/// Set to `1` to keep a control plane's temp dir (logs, PKI, etcd data) after
/// the test, for debugging; the processes are stopped all the same.
pub const KEEP_ENV: &str = "TWINVOL_E2E_KEEP";

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "control plane in {} at {}:\n{}",
                self.dir.path().display(),
                self.apiserver_url,
                self.log_tails(40)
            );
        }
        if std::env::var_os(KEEP_ENV).is_some_and(|v| v == "1") {
            eprintln!("{KEEP_ENV}=1: keeping {}", self.dir.path().display());
            self.dir.disable_cleanup(true);
        }
        // Dependents first: the API server before its etcd.
        for process in self.processes.iter_mut().rev() {
            process.kill();
        }
    }
}

fn checked(args: &[&str], output: Output) -> Result<String, HarnessError> {
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(HarnessError::KubectlFailed {
            args: args.join(" "),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

fn path_arg(flag: &str, path: &Path) -> String {
    format!("--{flag}={}", path.display())
}

fn etcd_args(data_dir: &Path, client_port: u16, peer_port: u16) -> Vec<String> {
    let client = format!("http://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    vec![
        "--name=twinvol-e2e".into(),
        path_arg("data-dir", data_dir),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=twinvol-e2e={peer}"),
        // A throwaway cluster: durability of etcd's own writes buys nothing
        // and costs seconds on a shared disk.
        "--unsafe-no-fsync".into(),
        "--log-level=warn".into(),
    ]
}

fn apiserver_args(
    pki: &Pki,
    root: &Path,
    etcd_port: u16,
    port: u16,
    opts: &ControlPlaneOptions,
) -> Vec<String> {
    vec![
        format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
        format!("--bind-address={}", opts.bind_address),
        format!("--advertise-address={}", opts.bind_address),
        format!("--secure-port={port}"),
        path_arg("cert-dir", &root.join("apiserver-certs")),
        path_arg("tls-cert-file", &pki.apiserver.cert),
        path_arg("tls-private-key-file", &pki.apiserver.key),
        path_arg("client-ca-file", &pki.ca_files.cert),
        path_arg("service-account-key-file", &pki.service_account_pub),
        path_arg("service-account-signing-key-file", &pki.service_account_key),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!("--service-cluster-ip-range={}", opts.service_cidr),
        "--authorization-mode=Node,RBAC".into(),
        "--allow-privileged=true".into(),
        // Node names are not in any DNS: without this the API server asks
        // the machine's resolver for them (for logs and exec), which is
        // traffic to an address that is not ours.
        "--kubelet-preferred-address-types=InternalIP".into(),
        "--profiling=false".into(),
        "--v=1".into(),
    ]
}

fn controller_manager_args(
    pki: &Pki,
    kubeconfig: &Path,
    root: &Path,
    port: u16,
    service_cidr: &str,
) -> Vec<String> {
    vec![
        path_arg("kubeconfig", kubeconfig),
        path_arg("authentication-kubeconfig", kubeconfig),
        path_arg("authorization-kubeconfig", kubeconfig),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={port}"),
        path_arg("cert-dir", &root.join("controller-manager-certs")),
        "--leader-elect=true".into(),
        path_arg("service-account-private-key-file", &pki.service_account_key),
        path_arg("root-ca-file", &pki.ca_files.cert),
        path_arg("cluster-signing-cert-file", &pki.ca_files.cert),
        path_arg("cluster-signing-key-file", &pki.ca_files.key),
        format!("--service-cluster-ip-range={service_cidr}"),
        "--use-service-account-credentials=false".into(),
        "--profiling=false".into(),
        "--v=1".into(),
    ]
}

fn scheduler_args(kubeconfig: &Path, port: u16) -> Vec<String> {
    vec![
        path_arg("kubeconfig", kubeconfig),
        path_arg("authentication-kubeconfig", kubeconfig),
        path_arg("authorization-kubeconfig", kubeconfig),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={port}"),
        "--leader-elect=true".into(),
        "--profiling=false".into(),
        "--v=1".into(),
    ]
}

/// JSON-quotes a path; a JSON string is also a YAML scalar.
fn quoted(path: &Path) -> String {
    serde_json::Value::String(path.display().to_string()).to_string()
}

/// The first host address of an IPv4 CIDR (`10.0.0.0/24` → `10.0.0.1`):
/// the ClusterIP the API server gives the `kubernetes` Service.
fn first_service_ip(cidr: &str) -> Result<String, HarnessError> {
    let invalid = || HarnessError::InvalidOption {
        option: "service_cidr",
        value: cidr.to_owned(),
    };
    let (net, _) = cidr.split_once('/').ok_or_else(invalid)?;
    let net: Ipv4Addr = net.parse().map_err(|_| invalid())?;
    Ok(Ipv4Addr::from(u32::from(net) + 1).to_string())
}

/// Writes a kubeconfig for `server` that trusts `ca` and authenticates with
/// the client certificate `client` (an admin's, a kubelet's, kube-proxy's).
pub fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca: &Path,
    client: &crate::pki::CertFiles,
) -> Result<(), HarnessError> {
    let text = format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: twinvol-e2e\n  \
           cluster:\n    \
             server: {server}\n    \
             certificate-authority: {ca}\n\
         users:\n\
         - name: admin\n  \
           user:\n    \
             client-certificate: {cert}\n    \
             client-key: {key}\n\
         contexts:\n\
         - name: twinvol-e2e\n  \
           context:\n    \
             cluster: twinvol-e2e\n    \
             user: admin\n\
         current-context: twinvol-e2e\n",
        ca = quoted(ca),
        cert = quoted(&client.cert),
        key = quoted(&client.key),
    );
    std::fs::write(path, text).map_err(|source| HarnessError::Io {
        action: "writing",
        path: path.to_owned(),
        source,
    })
}

/// A kube client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> Result<Client, HarnessError> {
    let error = |source: Box<dyn std::error::Error + Send + Sync>| HarnessError::Kubeconfig {
        path: kubeconfig.to_owned(),
        source,
    };
    let parsed = Kubeconfig::read_from(kubeconfig).map_err(|e| error(Box::new(e)))?;
    let config = kube::Config::from_custom_kubeconfig(parsed, &KubeConfigOptions::default())
        .await
        .map_err(|e| error(Box::new(e)))?;
    Client::try_from(config).map_err(|e| error(Box::new(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_binaries_fail_before_anything_starts() {
        let empty = tempfile::tempdir().expect("temp dir");
        let opts = ControlPlaneOptions {
            upstream: UpstreamBinaries::in_dir(empty.path()),
            ..ControlPlaneOptions::default()
        };
        let err = match ControlPlane::start(opts).await {
            Ok(_) => panic!("started without binaries"),
            Err(err) => err,
        };
        assert!(
            matches!(err, HarnessError::MissingUpstream { name: "etcd", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("build-upstream.sh"));
    }

    fn script(dir: &Path, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("writes");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    #[tokio::test]
    async fn a_component_that_dies_fails_the_start_with_its_log() {
        let bin = tempfile::tempdir().expect("temp dir");
        script(bin.path(), "etcd", "exec sleep 120");
        script(
            bin.path(),
            "kube-apiserver",
            "echo 'Error: unknown flag: --bogus' >&2; exit 1",
        );
        script(bin.path(), "kubectl", "exit 0");
        let opts = ControlPlaneOptions {
            upstream: UpstreamBinaries::in_dir(bin.path()),
            start_timeout: Duration::from_secs(30),
            ..ControlPlaneOptions::default()
        };
        let err = match ControlPlane::start(opts).await {
            Ok(_) => panic!("started with a failing kube-apiserver"),
            Err(err) => err,
        };
        match &err {
            HarnessError::ExitedEarly {
                component,
                log_tail,
                ..
            } => {
                assert_eq!(component, "kube-apiserver");
                assert!(log_tail.contains("unknown flag: --bogus"), "{log_tail}");
            }
            other => panic!("expected ExitedEarly, got {other}"),
        }
    }

    #[test]
    fn the_kubernetes_service_is_the_first_address_of_the_range() {
        assert_eq!(first_service_ip("10.0.0.0/24").expect("valid"), "10.0.0.1");
        assert_eq!(
            first_service_ip("10.252.3.0/24").expect("valid"),
            "10.252.3.1"
        );
        assert!(first_service_ip("10.0.0.0").is_err());
    }

    #[tokio::test]
    async fn kubeconfig_is_readable_by_kube() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = Pki::generate(&dir.path().join("pki")).expect("pki");
        let path = dir.path().join("kubeconfig");
        write_kubeconfig(
            &path,
            "https://127.0.0.1:6443",
            &pki.ca_files.cert,
            &pki.admin,
        )
        .expect("writes");
        let client = client_from(&path)
            .await
            .expect("a client from the kubeconfig");
        assert_eq!(client.default_namespace(), "default");
        let parsed = Kubeconfig::read_from(&path).expect("parses");
        assert_eq!(parsed.current_context.as_deref(), Some("twinvol-e2e"));
    }
}
