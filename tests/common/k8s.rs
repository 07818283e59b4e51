//! A local Kubernetes control plane for the integration tests: etcd and kube-apiserver, built
//! from the Go modules pinned in `tools/k8s` by `scripts/k8s-tools.sh`, on free loopback ports
//! in a directory of their own under the target directory.
//!
//! The API server serves with a certificate signed by a CA made here, authorizes with RBAC,
//! signs ServiceAccount tokens with a key made here (so `TokenRequest` works) and knows one
//! admin identity (a static token in `system:masters`); it writes an audit log of every
//! request (who, what, response code). Everything started is stopped by PID:
//! by `Drop` (also when a test panics) and, for the control plane shared by a whole test
//! binary, by a watchdog that kills what is listed in `pids` once the test process is gone.
//!
//! The binaries come from `RDPHEALTH_K8S_BIN` (set by `scripts/test.sh`) or, when unset, from
//! `scripts/k8s-tools.sh`, which reuses its cache or builds them. A control plane that cannot
//! start fails the test; nothing here skips.

use std::{
    fmt::Write as _,
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// How long the API server may take to become ready.
const READY_WITHIN: Duration = Duration::from_secs(90);
/// How long a stopped process may take to exit after SIGTERM before it is killed.
const STOP_WITHIN: Duration = Duration::from_secs(10);

/// The directory holding `etcd`, `kube-apiserver`, `kubectl` and `helm`.
pub fn tools() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = match std::env::var_os("RDPHEALTH_K8S_BIN") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/k8s-tools.sh");
                let out = Command::new("bash")
                    .arg(&script)
                    .stderr(Stdio::inherit())
                    .output()
                    .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
                assert!(
                    out.status.success(),
                    "scripts/k8s-tools.sh failed ({}): the local control plane cannot start",
                    out.status
                );
                let stdout = String::from_utf8_lossy(&out.stdout);
                PathBuf::from(stdout.lines().last().unwrap_or_default().trim())
            }
        };
        for tool in ["etcd", "kube-apiserver", "kubectl", "helm"] {
            assert!(
                bin.join(tool).is_file(),
                "{} is missing: run scripts/k8s-tools.sh (RDPHEALTH_K8S_BIN={})",
                bin.join(tool).display(),
                bin.display()
            );
        }
        bin
    })
    .clone()
}

/// A free loopback port (bound, then released for the process that will use it).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A process started by a test, stopped by PID when dropped.
pub struct Process {
    name: String,
    child: Child,
    pids: Option<PathBuf>,
}

impl Process {
    /// Starts `cmd`; its PID is listed in `pids` (if given) for the watchdog.
    pub fn spawn(name: &str, mut cmd: Command, pids: Option<&Path>) -> Self {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        if let Some(pids) = pids {
            let mut list = fs::read_to_string(pids).unwrap_or_default();
            let _ = writeln!(list, "{}", child.id());
            fs::write(pids, list).unwrap();
        }
        Self {
            name: name.into(),
            child,
            pids: pids.map(Path::to_path_buf),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited (and how).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Sends `signal` (e.g. "KILL", "TERM") to the process.
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status();
    }

    /// SIGKILL, then reaps it.
    pub fn kill(mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }

    fn stop(&mut self) {
        if self.exited().is_none() {
            self.signal("TERM");
            let deadline = Instant::now() + STOP_WITHIN;
            while self.exited().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            if self.exited().is_none() {
                eprintln!("{} did not stop on SIGTERM: killing it", self.name);
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if let Some(pids) = &self.pids {
            let me = self.pid().to_string();
            if let Ok(list) = fs::read_to_string(pids) {
                let kept: String = list
                    .lines()
                    .filter(|l| *l != me)
                    .map(|l| format!("{l}\n"))
                    .collect();
                let _ = fs::write(pids, kept);
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// etcd plus kube-apiserver on loopback, with an admin kubeconfig.
pub struct ControlPlane {
    dir: PathBuf,
    bin: PathBuf,
    etcd_url: String,
    port: u16,
    apiserver: Mutex<Option<Process>>,
    etcd: Option<Process>,
    watchdog: Option<Child>,
    /// `https://127.0.0.1:PORT`.
    pub server: String,
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// How long etcd and the API server took until `/readyz` answered `ok`.
    pub started_in: Duration,
}

/// The admin's bearer token (accepted only by this test control plane).
const ADMIN_TOKEN: &str = "rdphealth-test-admin";

impl ControlPlane {
    /// The control plane shared by every test of this test binary, started on first use and
    /// stopped by its watchdog when the test binary exits.
    pub fn shared() -> &'static ControlPlane {
        static SHARED: OnceLock<ControlPlane> = OnceLock::new();
        SHARED.get_or_init(Self::start)
    }

    /// Starts a control plane of its own (stopped when dropped).
    pub fn start() -> ControlPlane {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let bin = tools();
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        sweep_stale(&root);
        let dir = root.join(format!(
            "k8s-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let began = Instant::now();
        write_pki(&dir);
        fs::write(
            dir.join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,admin,\"system:masters\"\n"),
        )
        .unwrap();
        fs::write(dir.join("pids"), "").unwrap();
        fs::write(
            dir.join("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n",
        )
        .unwrap();
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(
                "while kill -0 \"$0\" 2>/dev/null; do sleep 1; done; \
                 for p in $(cat \"$1/pids\"); do kill -9 \"$p\" 2>/dev/null; done; rm -rf \"$1\"",
            )
            .arg(std::process::id().to_string())
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();

        let client_port = free_port();
        let peer_port = free_port();
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = Command::new(bin.join("etcd"));
        etcd.args(["--name", "default", "--data-dir"])
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &etcd_url])
            .args(["--advertise-client-urls", &etcd_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .args(["--unsafe-no-fsync", "--log-level", "warn"])
            .stdout(log(&dir, "etcd.log"))
            .stderr(log(&dir, "etcd.log"));
        let etcd = Process::spawn("etcd", etcd, Some(&dir.join("pids")));

        let port = free_port();
        let server = format!("https://127.0.0.1:{port}");
        let kubeconfig = dir.join("kubeconfig");
        fs::write(
            &kubeconfig,
            kubeconfig_yaml(&server, &dir, "admin", ADMIN_TOKEN),
        )
        .unwrap();
        let mut cp = ControlPlane {
            dir,
            bin,
            etcd_url,
            port,
            apiserver: Mutex::new(None),
            etcd: Some(etcd),
            watchdog: Some(watchdog),
            server,
            kubeconfig,
            started_in: Duration::ZERO,
        };
        cp.start_apiserver();
        cp.started_in = began.elapsed();
        eprintln!(
            "local control plane at {} ready in {:.1} s (kubeconfig {})",
            cp.server,
            cp.started_in.as_secs_f64(),
            cp.kubeconfig.display()
        );
        cp
    }

    fn start_apiserver(&self) {
        let d = &self.dir;
        let path = |f: &str| d.join(f).display().to_string();
        let mut cmd = Command::new(self.bin.join("kube-apiserver"));
        cmd.args(["--etcd-servers", &self.etcd_url])
            .args([
                "--bind-address",
                "127.0.0.1",
                "--advertise-address",
                "127.0.0.1",
            ])
            .args(["--secure-port", &self.port.to_string()])
            .args(["--cert-dir", &path("apiserver-certs")])
            .args(["--tls-cert-file", &path("serving.crt")])
            .args(["--tls-private-key-file", &path("serving.key")])
            .args(["--client-ca-file", &path("ca.crt")])
            .args(["--token-auth-file", &path("tokens.csv")])
            .args(["--authorization-mode", "RBAC"])
            .args(["--service-account-issuer", "https://kubernetes.default.svc"])
            .args(["--service-account-key-file", &path("sa.pub")])
            .args(["--service-account-signing-key-file", &path("sa.key")])
            .args(["--service-cluster-ip-range", "10.96.0.0/24"])
            // Loopback cannot be published as the `kubernetes` Service's endpoint.
            .args(["--endpoint-reconciler-type", "none"])
            .args(["--audit-policy-file", &path("audit-policy.yaml")])
            .args(["--audit-log-path", &path("audit.log")])
            .args(["--profiling=false", "--v=1"])
            .stdout(log(d, "apiserver.log"))
            .stderr(log(d, "apiserver.log"));
        let process = Process::spawn("kube-apiserver", cmd, Some(&d.join("pids")));
        *self.apiserver() = Some(process);
        self.wait_ready();
    }

    fn apiserver(&self) -> std::sync::MutexGuard<'_, Option<Process>> {
        self.apiserver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let exited = self.apiserver().as_mut().and_then(Process::exited);
            if let Some(status) = exited {
                panic!(
                    "kube-apiserver exited ({status}) before it was ready:\n{}",
                    self.log_tail("apiserver.log")
                );
            }
            let out = self.kubectl_raw(&["get", "--raw", "/readyz"]);
            if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready within {READY_WITHIN:?}:\n{}\netcd:\n{}",
                self.log_tail("apiserver.log"),
                self.log_tail("etcd.log")
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the API server (SIGTERM, by PID) and starts it again on the same port and
    /// storage; returns once it is ready.
    pub fn restart_apiserver(&self) {
        let old = self.apiserver().take();
        drop(old);
        self.start_apiserver();
    }

    /// Stops the API server without starting it again (until `start_apiserver_again`).
    pub fn stop_apiserver(&self) {
        let old = self.apiserver().take();
        drop(old);
    }

    /// Starts a stopped API server again.
    pub fn start_apiserver_again(&self) {
        self.start_apiserver();
    }

    /// The last lines of one of the control plane's logs.
    pub fn log_tail(&self, file: &str) -> String {
        let text = fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The API server's audit events (one per request, metadata level) for `user`.
    pub fn audit(&self, user: &str) -> Vec<serde_json::Value> {
        let text = fs::read_to_string(self.dir.join("audit.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["user"]["username"] == user)
            .collect()
    }

    /// The file listing the PIDs the watchdog stops when the test process is gone.
    pub fn pids_file(&self) -> PathBuf {
        self.dir.join("pids")
    }

    /// The directory of this control plane (certificates, logs, kubeconfigs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// One of the built tools (`kubectl`, `helm`, ...).
    pub fn tool(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// A kube client with the admin identity.
    pub async fn client(&self) -> Client {
        client_from(&self.kubeconfig).await
    }

    /// Writes a kubeconfig that authenticates with `token` and returns its path.
    pub fn kubeconfig_for(&self, name: &str, token: &str) -> PathBuf {
        let path = self.dir.join(format!("kubeconfig-{name}"));
        fs::write(&path, kubeconfig_yaml(&self.server, &self.dir, name, token)).unwrap();
        path
    }

    /// A token for ServiceAccount `ns/sa` from the TokenRequest API.
    pub fn service_account_token(&self, ns: &str, sa: &str) -> String {
        self.kubectl(&["create", "token", sa, "-n", ns, "--duration", "2h"])
            .trim()
            .to_string()
    }

    /// Runs kubectl as the admin and returns its output, whatever the exit code.
    pub fn kubectl_raw(&self, args: &[&str]) -> Output {
        Command::new(self.bin.join("kubectl"))
            .env("KUBECONFIG", &self.kubeconfig)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs kubectl as the admin; panics with its stderr when it fails.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_raw(args);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs helm as the admin; panics with its stderr when it fails.
    pub fn helm(&self, args: &[&str]) -> String {
        let out = Command::new(self.bin.join("helm"))
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "helm {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        drop(self.apiserver().take());
        drop(self.etcd.take());
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A kube client from a kubeconfig file.
pub async fn client_from(path: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

fn log(dir: &Path, name: &str) -> Stdio {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .unwrap()
        .into()
}

fn kubeconfig_yaml(server: &str, dir: &Path, user: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: local\n  context:\n    cluster: local\n    user: {user}\n    namespace: default\ncurrent-context: local\n",
        ca = dir.join("ca.crt").display()
    )
}

/// A CA, a serving certificate for 127.0.0.1 and localhost signed by it, and the
/// ServiceAccount signing key.
fn write_pki(dir: &Path) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "rdphealth-test-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let mut serving =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_key = KeyPair::generate().unwrap();
    let serving_cert = serving.signed_by(&serving_key, &issuer).unwrap();

    fs::write(dir.join("ca.crt"), ca_cert.pem()).unwrap();
    fs::write(dir.join("serving.crt"), serving_cert.pem()).unwrap();
    fs::write(dir.join("serving.key"), serving_key.serialize_pem()).unwrap();
    let sa = KeyPair::generate().unwrap();
    fs::write(dir.join("sa.key"), sa.serialize_pem()).unwrap();
    fs::write(dir.join("sa.pub"), sa.public_key_pem()).unwrap();
}

/// Removes the directories of control planes whose test process is gone.
fn sweep_stale(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("k8s-")
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
