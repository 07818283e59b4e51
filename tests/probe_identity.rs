//! The identity step against a real CredSSP/NTLM server: Debian's FreeRDP shadow server, each
//! instance under a computer name the test chooses. The probe reads that name from the NTLM
//! CHALLENGE, tells whether NLA is enforced, compares the certificate's name, and exits 1 with
//! `--expect-name` when the endpoint answers as another machine.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: failures should panic

mod common;

use std::process::Command;

use common::shadow::{self, Shadow};
use serde_json::{Value, json};

fn probe(target: &str, extra: &[&str]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_rdphealth"))
        .args(["probe", target, "--json", "--timeout", "5s"])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let json = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout:?}"));
    (out.status.code().unwrap(), json)
}

fn human(target: &str, extra: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rdphealth"))
        .args(["probe", target, "--timeout", "5s"])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
    )
}

fn kinds(json: &Value) -> Vec<String> {
    json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn nla_server_names_itself_and_requires_credssp() {
    if !shadow::ready_or_skip("nla_server_names_itself") {
        return;
    }
    let server = Shadow::start("web-01", &["/sec:nla"]);
    let (code, json) = probe(&server.target(), &[]);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["reachable"], true);
    assert_eq!(json["selectedProtocol"], "hybrid");
    assert_eq!(json["layers"]["nla"]["ok"], true, "{json}");
    let nla = &json["nla"];
    assert_eq!(nla["credssp"], "required", "{json}");
    assert!(nla["credsspVersion"].as_u64().unwrap() >= 2);
    let id = &nla["identity"];
    assert_eq!(id["computerName"], "WEB-01", "{json}");
    assert_eq!(id["dnsComputerName"], server.hostname);
    assert!(id["osVersion"].as_str().unwrap().split('.').count() == 3);
    assert!(id["serverTime"].as_str().unwrap().ends_with('Z'));
    // Same machine, same clock.
    assert!(
        id["clockSkewSeconds"].as_i64().unwrap().abs() <= 5,
        "{json}"
    );
    // The generated certificate is issued to the host name: no finding.
    assert_eq!(json["tls"]["certificate"]["names"], json!(["web-01"]));
    assert_eq!(kinds(&json), Vec::<String>::new());

    let (code, text) = human(&server.target(), &[]);
    assert_eq!(code, 0);
    assert!(text.contains("CredSSP required"), "{text}");
    assert!(text.contains("host  WEB-01 (dns web-01)"), "{text}");
    assert!(text.contains("skew"), "{text}");
}

#[test]
fn expect_name_mismatch_exits_1_naming_both_machines() {
    if !shadow::ready_or_skip("expect_name_mismatch") {
        return;
    }
    let server = Shadow::start("db-02", &["/sec:nla"]);
    let (code, json) = probe(&server.target(), &["--expect-name", "DB-02.corp.example"]);
    assert_eq!(code, 0, "{json}");
    let (code, json) = probe(&server.target(), &["--expect-name", "web-01"]);
    assert_eq!(code, 1, "{json}");
    assert_eq!(json["reachable"], false);
    assert_eq!(json["failure"]["reason"], "wrong_host");
    let detail = json["failure"]["detail"].as_str().unwrap();
    assert!(
        detail.contains("DB-02") && detail.contains("web-01"),
        "{detail}"
    );
    assert_eq!(json["layers"]["nla"]["ok"], false);
    let (code, text) = human(&server.target(), &["--expect-name", "web-01"]);
    assert_eq!(code, 1);
    assert!(text.contains("NOT reachable (wrong_host)"), "{text}");
}

#[test]
fn nla_that_is_optional_or_absent_is_a_finding() {
    if !shadow::ready_or_skip("nla_optional_or_absent") {
        return;
    }
    // NLA offered, TLS accepted too: an SSL-only client gets in without NLA.
    let optional = Shadow::start("app-03", &["+sec-nla", "+sec-tls"]);
    let (code, json) = probe(&optional.target(), &[]);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["nla"]["credssp"], "not_required", "{json}");
    assert_eq!(json["nla"]["identity"]["computerName"], "APP-03");
    assert_eq!(kinds(&json), ["nla_disabled"]);
    // TLS only: CredSSP is not offered at all; nothing more is sent after TLS.
    let tls_only = Shadow::start("app-04", &["/sec:tls"]);
    let (code, json) = probe(&tls_only.target(), &[]);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["selectedProtocol"], "ssl");
    assert_eq!(json["nla"]["credssp"], "not_offered");
    assert_eq!(json["nla"].get("identity"), None);
    assert_eq!(json["layers"].get("nla"), None);
    assert_eq!(kinds(&json), ["nla_disabled"]);
}

#[test]
fn a_certificate_issued_to_another_computer_is_a_finding() {
    if !shadow::ready_or_skip("certificate_of_another_computer") {
        return;
    }
    // The first server generates a certificate for web-01; a server renamed to web-09 keeps it
    // (as a cloned or renamed VM keeps its self-signed RDP certificate).
    let first = Shadow::start("web-01", &["/sec:nla"]);
    let home = first.home.clone();
    let port_taken = first.port;
    let renamed = Shadow::start_in("web-09", &["/sec:nla"], &home);
    assert_ne!(renamed.port, port_taken);
    let (code, json) = probe(&renamed.target(), &[]);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["tls"]["certificate"]["names"], json!(["web-01"]));
    assert_eq!(json["nla"]["identity"]["computerName"], "WEB-09");
    assert_eq!(
        json["findings"],
        json!([{"kind": "certificate_name_mismatch", "computerName": "WEB-09"}])
    );
    drop(renamed);
    drop(first);
}

#[test]
fn no_identity_skips_the_step() {
    if !shadow::ready_or_skip("no_identity") {
        return;
    }
    let server = Shadow::start("web-05", &["/sec:nla"]);
    let (code, json) = probe(&server.target(), &["--no-identity"]);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["selectedProtocol"], "hybrid");
    assert_eq!(json.get("nla"), None);
    assert_eq!(json["layers"].get("nla"), None);
}
