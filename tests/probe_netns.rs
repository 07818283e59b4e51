//! Firewall behaviour the loopback cannot show: a private network namespace whose iptables
//! DROP the RDP port (connect timeout) or REJECT it with ICMP host-unreachable. Nothing leaves
//! the namespace. Needs root, `ip` and `iptables`; scripts/test.sh installs them and sets
//! RDPHEALTH_REQUIRE_NETNS=1 so a missing tool fails instead of skipping.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: failures should panic

use std::process::Command;

use serde_json::Value;

struct Netns(String);

impl Netns {
    fn create() -> Option<Self> {
        let name = format!("rdphealth-test-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return None;
        }
        let ns = Netns(name);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        Some(ns)
    }

    fn exec(&self, args: &[&str]) -> std::process::Output {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success() || args[0].ends_with("rdphealth"),
            "{args:?}: {out:?}"
        );
        out
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn tools_available() -> bool {
    let have = |tool: &str| Command::new(tool).arg("--version").output().is_ok();
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n");
    root && have("ip") && have("iptables")
}

#[test]
fn dropped_syn_is_tcp_timeout_icmp_reject_is_tcp_unreachable_and_no_route_is_prober_error() {
    let required = std::env::var("RDPHEALTH_REQUIRE_NETNS").is_ok_and(|v| v == "1");
    let ns = if tools_available() {
        Netns::create()
    } else {
        None
    };
    let Some(ns) = ns else {
        assert!(
            !required,
            "network-namespace test required but root/ip/iptables are unavailable"
        );
        eprintln!("not run: needs root, ip and iptables (scripts/test.sh provides them)");
        return;
    };
    ns.exec(&[
        "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "3389", "-j", "DROP",
    ]);
    ns.exec(&[
        "iptables",
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        "3390",
        "-j",
        "REJECT",
        "--reject-with",
        "icmp-host-unreachable",
    ]);
    let bin = env!("CARGO_BIN_EXE_rdphealth");
    let probe_at = |target: &str| -> Value {
        let out = ns.exec(&[bin, "probe", target, "--json", "--timeout", "600ms"]);
        assert_eq!(out.status.code(), Some(1));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let probe = |port: &str| probe_at(&format!("127.0.0.1:{port}"));
    let dropped = probe("3389");
    assert_eq!(dropped["failure"]["reason"], "tcp_timeout", "{dropped}");
    assert!(dropped["layers"]["tcp"]["ms"].as_f64().unwrap() >= 500.0);
    let rejected = probe("3390");
    assert_eq!(
        rejected["failure"]["reason"], "tcp_unreachable",
        "{rejected}"
    );
    assert!(
        rejected["failure"]["detail"]
            .as_str()
            .unwrap()
            .contains("No route to host")
    );
    let refused = probe("3391");
    assert_eq!(refused["failure"]["reason"], "tcp_refused", "{refused}");
    // The namespace has only loopback: no route leaves the prober (ENETUNREACH, no packet
    // sent). That is the prober's blindness, not the VM's failure.
    let no_route = probe_at("192.0.2.10:3389");
    assert_eq!(no_route["failure"]["reason"], "prober_error", "{no_route}");
}
