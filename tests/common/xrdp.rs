//! Starts Debian's xrdp on a free loopback port, in the foreground, and stops it by PID.

use super::free_port;
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A running xrdp instance; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Xrdp {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

const XRDP: &str = "/usr/sbin/xrdp";
const XRDP_INI: &str = "/etc/xrdp/xrdp.ini";

/// Whether xrdp tests must run (set by scripts/test.sh): then a missing xrdp fails the test.
pub fn required() -> bool {
    std::env::var("RDPHEALTH_REQUIRE_XRDP").is_ok_and(|v| v == "1")
}

/// Whether xrdp can be started here (installed, and the key readable).
pub fn available() -> Result<(), String> {
    if !Path::new(XRDP).exists() || !Path::new(XRDP_INI).exists() {
        return Err("xrdp is not installed (apt-get install -y xrdp)".into());
    }
    std::fs::read("/etc/xrdp/key.pem")
        .map(|_| ())
        .map_err(|e| format!("cannot read /etc/xrdp/key.pem ({e}): run as root"))
}

/// Returns `true` when the test should go on; prints why and returns `false` when xrdp is
/// unavailable and not required; panics when it is required but unavailable.
pub fn ready_or_skip(test: &str) -> bool {
    match available() {
        Ok(()) => true,
        Err(why) if required() => panic!("{test}: xrdp is required but {why}"),
        Err(why) => {
            eprintln!("{test}: not run: {why} (scripts/test.sh installs xrdp and requires it)");
            false
        }
    }
}

impl Xrdp {
    /// Starts xrdp with `security_layer` and extra `(key, value)` overrides of [Globals].
    pub fn start(security_layer: &str, overrides: &[(&str, &str)]) -> Self {
        // What the packaged service runs before start: creates /run/xrdp and its sockdir.
        let _ = Command::new("sh").arg("/usr/share/xrdp/socksetup").status();
        let dir = tempdir();
        let port = free_port();
        let template = std::fs::read_to_string(XRDP_INI).unwrap();
        let mut ini = String::new();
        for line in template.lines() {
            let key = line.split('=').next().unwrap_or_default();
            let line = match key {
                "port" if line == "port=3389" => format!("port=tcp://127.0.0.1:{port}"),
                "security_layer" => format!("security_layer={security_layer}"),
                "LogFile" if line == "LogFile=xrdp.log" => {
                    format!("LogFile={}", dir.join("xrdp.log").display())
                }
                "EnableSyslog" => "EnableSyslog=false".to_string(),
                _ => match overrides
                    .iter()
                    .find(|(k, _)| *k == key || format!("#{k}") == key)
                {
                    Some((k, v)) => format!("{k}={v}"),
                    None => line.to_string(),
                },
            };
            ini.push_str(&line);
            ini.push('\n');
        }
        let config = dir.join("xrdp.ini");
        std::fs::write(&config, ini).unwrap();
        let child = Command::new(XRDP)
            .arg("--nodaemon")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let xrdp = Xrdp { child, port, dir };
        xrdp.wait_listening();
        xrdp
    }

    /// `127.0.0.1:PORT`.
    pub fn target(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Waits until the kernel shows the port in LISTEN state (no probing connection made).
    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if listening(self.port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = std::fs::read_to_string(self.dir.join("xrdp.log")).unwrap_or_default();
        panic!(
            "xrdp did not listen on {} within 10 s; log:\n{log}",
            self.port
        );
    }
}

impl Drop for Xrdp {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_dir_all(&self.dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether the kernel shows a socket in LISTEN state on `port` (no connection made).
pub fn listening(port: u16) -> bool {
    let needle = format!(":{port:04X} ");
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    tcp.lines().any(|l| {
        let cols: Vec<_> = l.split_whitespace().collect();
        cols.len() > 3 && format!("{} ", cols[1]).ends_with(&needle) && cols[3] == "0A"
    })
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "rdphealth-xrdp-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
