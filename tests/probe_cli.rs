//! The real `rdphealth probe` binary against real peers: xrdp in its three security layers
//! (plus a TLS 1.0-only and a certificate-less variant), a closed port, a silent listener and
//! an HTTP server, in human and JSON form.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: failures should panic

mod common;

use std::{
    process::{Command, Output},
    time::{Duration, Instant},
};

use common::xrdp::{self, Xrdp};
use serde_json::Value;

fn rdphealth(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rdphealth"))
        .args(args)
        .output()
        .unwrap()
}

fn probe_json(target: &str) -> (i32, Value) {
    let out = rdphealth(&["probe", target, "--json", "--timeout", "2s"]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let json = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout:?}"));
    (out.status.code().unwrap(), json)
}

fn probe_human(target: &str) -> (i32, String) {
    let out = rdphealth(&["probe", target, "--timeout", "2s"]);
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
    )
}

#[test]
fn xrdp_negotiate_selects_ssl_with_tls13_and_its_certificate() {
    if !xrdp::ready_or_skip("xrdp_negotiate") {
        return;
    }
    let server = Xrdp::start("negotiate", &[]);
    let (code, json) = probe_json(&server.target());
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["reachable"], true);
    assert_eq!(json["failure"], Value::Null);
    assert_eq!(json["selectedProtocol"], "ssl");
    assert_eq!(json["tls"]["version"], "TLSv1.3");
    let cert = &json["tls"]["certificate"];
    assert!(cert["subject"].as_str().unwrap().starts_with("CN="));
    assert!(cert["notAfter"].as_str().unwrap().ends_with('Z'));
    assert_eq!(cert["expired"], false);
    assert!(cert["daysLeft"].as_i64().unwrap() > 0);
    for layer in ["tcp", "x224", "tls"] {
        assert_eq!(json["layers"][layer]["ok"], true, "{layer}");
        assert!(json["layers"][layer]["ms"].as_f64().unwrap() >= 0.0);
    }
    // xrdp has no CredSSP: the probe says so, as a finding, and sends nothing after TLS.
    assert_eq!(json["nla"]["credssp"], "not_offered", "{json}");
    assert_eq!(json["layers"].get("nla"), None);
    assert_eq!(
        json["findings"],
        serde_json::json!([{"kind": "nla_disabled"}])
    );

    let (code, human) = probe_human(&server.target());
    assert_eq!(code, 0);
    assert!(human.contains("selected ssl"), "{human}");
    assert!(
        human.contains("CredSSP not_offered (server selected ssl)"),
        "{human}"
    );
    assert!(human.contains("TLSv1.3"), "{human}");
    assert!(human.contains("result: reachable"), "{human}");
}

#[test]
fn xrdp_tls_layer_selects_ssl() {
    if !xrdp::ready_or_skip("xrdp_tls") {
        return;
    }
    let server = Xrdp::start("tls", &[]);
    let (code, json) = probe_json(&server.target());
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["selectedProtocol"], "ssl");
    assert_eq!(json["tls"]["version"], "TLSv1.3");
}

/// TCP connections in TIME_WAIT involving `port`: (the prober's side, whose remote port is
/// `port`; the server's side, whose local port is `port`).
fn time_wait(port: u16) -> (usize, usize) {
    let needle = format!(":{port:04X}");
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let mut ours = 0;
    let mut theirs = 0;
    for line in tcp.lines().skip(1) {
        let cols: Vec<_> = line.split_whitespace().collect();
        if cols.len() > 3 && cols[3] == "06" {
            ours += usize::from(cols[2].ends_with(&needle));
            theirs += usize::from(cols[1].ends_with(&needle));
        }
    }
    (ours, theirs)
}

#[test]
fn xrdp_closes_first_so_no_time_wait_is_left_on_the_prober() {
    if !xrdp::ready_or_skip("xrdp_time_wait") {
        return;
    }
    let server = Xrdp::start("tls", &[]);
    let out = rdphealth(&[
        "probe",
        &server.target(),
        "--json",
        "--count",
        "3",
        "--interval",
        "50ms",
        "--timeout",
        "5s",
    ]);
    assert!(out.status.success(), "{out:?}");
    let (ours, theirs) = time_wait(server.port);
    // close_notify first, then the server's FIN: the TIME_WAIT of each probe is the server's
    // (a reset, as when unread session tickets were dropped, would leave none at all).
    assert_eq!((ours, theirs), (0, 3), "TIME_WAIT (prober, server)");
}

#[test]
fn xrdp_rdp_layer_is_reachable_without_tls() {
    if !xrdp::ready_or_skip("xrdp_rdp") {
        return;
    }
    let server = Xrdp::start("rdp", &[]);
    let (code, json) = probe_json(&server.target());
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["selectedProtocol"], "rdp");
    assert_eq!(json["tls"], Value::Null);
    assert_eq!(
        json["findings"],
        serde_json::json!([{"kind": "no_tls"}, {"kind": "nla_disabled"}])
    );
    assert!(json["layers"].get("tls").is_none());

    let (_, human) = probe_human(&server.target());
    assert!(human.contains("finding: no_tls"), "{human}");
}

#[test]
fn xrdp_tls_only_1_0_fails_with_protocol_version_alert() {
    if !xrdp::ready_or_skip("xrdp_tls10") {
        return;
    }
    let server = Xrdp::start("tls", &[("ssl_protocols", "TLSv1")]);
    let (code, json) = probe_json(&server.target());
    assert_eq!(code, 1, "{json}");
    assert_eq!(json["reachable"], false);
    assert_eq!(json["failure"]["reason"], "tls_handshake_failed");
    assert!(
        json["failure"]["detail"]
            .as_str()
            .unwrap()
            .contains("protocol_version")
    );
    assert!(
        json["likelyCauses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c.as_str().unwrap().contains("SCHANNEL"))
    );
}

#[test]
fn xrdp_without_certificate_refuses_with_code_3() {
    if !xrdp::ready_or_skip("xrdp_nocert") {
        return;
    }
    let server = Xrdp::start(
        "tls",
        &[
            ("certificate", "/nonexistent/cert.pem"),
            ("key_file", "/nonexistent/key.pem"),
        ],
    );
    let (code, json) = probe_json(&server.target());
    assert_eq!(code, 1, "{json}");
    assert_eq!(json["failure"]["reason"], "negotiation_failure");
    assert_eq!(json["failure"]["code"], 3);
    let (_, human) = probe_human(&server.target());
    assert!(human.contains("SSL_CERT_NOT_ON_SERVER"), "{human}");
    assert!(human.contains("MachineKeys"), "{human}");
}

#[test]
fn closed_port_is_refused_quickly() {
    let target = format!("127.0.0.1:{}", common::free_port());
    let (code, json) = probe_json(&target);
    assert_eq!(code, 1);
    assert_eq!(json["failure"]["reason"], "tcp_refused");
    let (code, human) = probe_human(&target);
    assert_eq!(code, 1);
    assert!(human.contains("tcp_refused"), "{human}");
    assert!(human.contains("TermService"), "{human}");
}

#[test]
fn silent_listener_times_out_within_the_timeout() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap().to_string();
    // Accept and hold connections without answering, like a black-holing middlebox.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    let started = Instant::now();
    let out = rdphealth(&["probe", &target, "--json", "--timeout", "500ms"]);
    let elapsed = started.elapsed();
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json["failure"]["reason"], "x224_timeout");
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    let (_, human) = probe_human(&target);
    assert!(human.contains("x224_timeout"));
}

#[test]
fn http_server_is_not_rdp() {
    // A real HTTP server: Python's http.server, which answers the cookie line with a 400 page.
    let port = common::free_port();
    let mut server = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 is needed for the HTTP peer");
    let target = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&target).is_err() {
        assert!(Instant::now() < deadline, "http.server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, json) = probe_json(&target);
    let (_, human) = probe_human(&target);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(code, 1);
    assert_eq!(json["failure"]["reason"], "not_rdp", "{json}");
    assert!(
        json["failure"]["detail"]
            .as_str()
            .unwrap()
            .contains("not TPKT")
    );
    assert!(human.contains("not_rdp"), "{human}");
    assert!(
        human.contains("another application owns the port"),
        "{human}"
    );
}

#[test]
fn count_prints_a_per_layer_latency_summary() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut buf = [0u8; 64];
            let _ = std::io::Read::read(&mut stream, &mut buf);
            let _ = std::io::Write::write_all(
                &mut stream,
                &rdphealth::probe::codec::encode_negotiation_response(0, 0),
            );
        }
    });
    let out = rdphealth(&["probe", &target, "--count", "3", "--interval", "10ms"]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("3 probes, 3 reachable (100.0%)"),
        "{stdout}"
    );
    assert!(stdout.contains("p50 ms"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("tcp") && l.contains("3/3")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("x224") && l.contains("3/3")),
        "{stdout}"
    );

    let out = rdphealth(&[
        "probe",
        &target,
        "--count",
        "2",
        "--interval",
        "10ms",
        "--json",
    ]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "one JSON object per probe");
}

#[test]
fn usage_errors_exit_2_with_a_clear_message() {
    for (args, needle) in [
        (vec!["probe", "host:99999"], "out of range"),
        (vec!["probe", "bad host"], "not a valid host"),
        (vec!["probe", "h:0"], "out of range"),
        (
            vec!["probe", "127.0.0.1", "--timeout", "soon"],
            "invalid duration",
        ),
        (vec!["probe", "127.0.0.1", "--count", "0"], "0"),
        (vec!["probe"], "HOST[:PORT]"),
    ] {
        let out = rdphealth(&args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
