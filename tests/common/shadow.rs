//! Starts Debian's FreeRDP shadow server (a real RDP server with CredSSP/NTLM) on a free
//! loopback port, under its own Xvfb display and in its own UTS namespace, so each instance
//! has the computer name the test gives it. Stopped by PID when dropped.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::{free_port, xrdp::listening};

const SHADOW: &str = "/usr/bin/freerdp-shadow-cli";
const XVFB: &str = "/usr/bin/Xvfb";

/// Whether the shadow-server tests must run (set by scripts/test.sh).
pub fn required() -> bool {
    std::env::var("RDPHEALTH_REQUIRE_FREERDP_SHADOW").is_ok_and(|v| v == "1")
}

/// Whether the shadow server can be started here.
pub fn available() -> Result<(), String> {
    for (bin, package) in [(SHADOW, "freerdp2-shadow-x11"), (XVFB, "xvfb")] {
        if !Path::new(bin).exists() {
            return Err(format!("{bin} is missing (apt-get install -y {package})"));
        }
    }
    let probe = Command::new("unshare")
        .args(["--uts", "true"])
        .status()
        .map_err(|e| format!("cannot run unshare: {e}"))?;
    if !probe.success() {
        return Err("unshare --uts failed: run as root".into());
    }
    Ok(())
}

/// `true` when the test should go on; panics when the server is required but unavailable.
pub fn ready_or_skip(test: &str) -> bool {
    match available() {
        Ok(()) => true,
        Err(why) if required() => panic!("{test}: the FreeRDP shadow server is required but {why}"),
        Err(why) => {
            eprintln!("{test}: not run: {why} (scripts/test.sh installs it and requires it)");
            false
        }
    }
}

/// A running shadow server and its X display.
pub struct Shadow {
    server: Child,
    xvfb: Child,
    pub port: u16,
    /// The computer name the server runs under.
    pub hostname: String,
    /// Its home: holds the server's generated certificate (`.config/freerdp/shadow`).
    pub home: PathBuf,
    owns_home: bool,
}

impl Shadow {
    /// Starts a server named `hostname` with `args` (e.g. `/sec:nla`), with a fresh home (so
    /// a fresh certificate issued to `hostname`).
    pub fn start(hostname: &str, args: &[&str]) -> Self {
        let home = std::env::temp_dir().join(format!(
            "rdphealth-shadow-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&home).unwrap();
        let mut shadow = Self::start_in(hostname, args, &home);
        shadow.owns_home = true;
        shadow
    }

    /// Starts a server named `hostname` whose home (and certificate) is `home`. A server that
    /// exits before listening (a port taken meanwhile by a parallel test) is started again.
    pub fn start_in(hostname: &str, args: &[&str], home: &Path) -> Self {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(hostname, args, home) {
                Ok(shadow) => return shadow,
                Err(why) => last = why,
            }
        }
        panic!("the shadow server did not start: {last}");
    }

    fn try_start(hostname: &str, args: &[&str], home: &Path) -> Result<Self, String> {
        let mut xvfb = Command::new(XVFB)
            .args([
                "-displayfd",
                "1",
                "-screen",
                "0",
                "800x600x24",
                "-nolisten",
                "tcp",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(xvfb.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let display = format!(":{}", line.trim());
        let port = free_port();
        let command = format!(
            "hostname {hostname} && exec {SHADOW} /port:{port} /bind-address:127.0.0.1 {}",
            args.join(" ")
        );
        let server = Command::new("unshare")
            .args(["--uts", "sh", "-c", &command])
            .env("DISPLAY", &display)
            .env("HOME", home)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(home.join("shadow.log")).unwrap())
            .spawn()
            .unwrap();
        let shadow = Self {
            server,
            xvfb,
            port,
            hostname: hostname.to_owned(),
            home: home.to_path_buf(),
            owns_home: false,
        };
        let mut shadow = shadow;
        let deadline = Instant::now() + Duration::from_secs(15);
        while !listening(port) {
            if let Ok(Some(status)) = shadow.server.try_wait() {
                let log = std::fs::read_to_string(home.join("shadow.log")).unwrap_or_default();
                return Err(format!("it exited with {status} before listening:\n{log}"));
            }
            if Instant::now() > deadline {
                return Err(format!("it did not listen on {port} within 15 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(shadow)
    }

    /// `127.0.0.1:PORT`.
    pub fn target(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Shadow {
    fn drop(&mut self) {
        for child in [&mut self.server, &mut self.xvfb] {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.owns_home {
            let _ = std::fs::remove_dir_all(&self.home);
        }
    }
}
