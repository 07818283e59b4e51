//! What a Run Command does inside a simulated guest. The operator's applier
//! (`guest-scripts/apply-changes.ps1`) is executed by [`super::applier`] against the VM's
//! registry model; changes a plan declares `restart: required` for take effect at the next
//! boot. The read-only evidence query is answered from the registry and the faults. Other
//! scripts are recognised by the registry and service fixes of Microsoft's RDP guides.

use super::{fault::Fault, world::Vm};
use crate::guest::{
    changes::{RDP_TCP, Restart, TERMINAL_SERVER},
    script,
};

/// Largest output Azure returns (the tail is kept).
const MAX_OUTPUT: usize = 4096;

/// The marker line of the operator's read-only evidence query.
const QUERY_MARKER: &str = "rdphealth-script: query-rdp-evidence";
/// The thumbprint the query reports for the guest's self-signed RDP certificate.
const SELF_SIGNED_THUMBPRINT: &str = "5E1F5161AEDC0000000000000000000000000001";

/// Whether `script` is the operator's read-only evidence query.
pub fn is_evidence_query(script: &[String]) -> bool {
    script
        .iter()
        .any(|l| l.to_ascii_lowercase().contains(QUERY_MARKER))
}

/// Makes the VM's registry show its registry-backed faults (faults may be set at run time).
pub fn show_faults(vm: &mut Vm) {
    let has = |f| vm.faults.contains(&f);
    let (rdp, tls, flapping, legacy) = (
        has(Fault::RdpDisabled),
        has(Fault::TlsDisabled),
        has(Fault::Flapping),
        has(Fault::LegacyRdpSecurity),
    );
    vm.registry.show(rdp, tls, flapping, legacy);
}

/// Derives the registry-backed faults from the registry after a script changed it.
fn read_faults(vm: &mut Vm) {
    for (fault, on) in [
        (Fault::RdpDisabled, vm.registry.rdp_denied()),
        (Fault::TlsDisabled, vm.registry.tls12_disabled()),
        (Fault::Flapping, vm.registry.keepalive_broken()),
        (Fault::LegacyRdpSecurity, vm.registry.legacy_rdp_security()),
    ] {
        if on {
            vm.faults.insert(fault);
        } else {
            vm.faults.remove(&fault);
        }
    }
}

/// The guest (re)booted: registry changes that waited for a restart take effect now.
pub fn boot(vm: &mut Vm) {
    if vm.restart_pending {
        vm.restart_pending = false;
        read_faults(vm);
    }
}

/// Runs `script` (or the built-in `command`) on `vm`; returns standard output.
pub fn run_script(vm: &mut Vm, command: &str, script: &[String]) -> String {
    if !vm.restart_pending {
        show_faults(vm);
    }
    if is_evidence_query(script) {
        // The operator's read-only evidence query: answer in its line format, change nothing.
        return tail(evidence_query(vm).join("\n"));
    }
    if let Some(plan) = script::parse_script(script) {
        let out = super::applier::apply(vm, &plan);
        // Changes read at boot wait for the restart the plan declares; others act at once.
        match plan.restart {
            Restart::Required => vm.restart_pending = true,
            Restart::None => read_faults(vm),
        }
        return tail(out.join("\r\n"));
    }
    let out = keyword_script(vm, command, script);
    if !vm.restart_pending {
        show_faults(vm);
    }
    tail(out.join("\n"))
}

/// Scripts other than the operator's: recognised by the guides' fixes they contain.
fn keyword_script(vm: &mut Vm, command: &str, script: &[String]) -> Vec<String> {
    let text = script.join("\n").to_ascii_lowercase();
    let writes = text.contains("set-itemproperty")
        || text.contains("new-itemproperty")
        || text.contains("reg add");
    let mut out = Vec::new();
    if command.eq_ignore_ascii_case("ResetRDPCert")
        || (text.contains("remote desktop")
            && text.contains("remove-item")
            && text.contains("sessionenv"))
    {
        vm.faults.remove(&Fault::CertificateExpired);
        out.push(
            "Removed the Remote Desktop certificate; SessionEnv created a new self-signed one."
                .to_owned(),
        );
    }
    if command.eq_ignore_ascii_case("RDPSettings")
        || (writes && text.contains("fdenytsconnections"))
    {
        vm.faults.remove(&Fault::RdpDisabled);
        out.push("fDenyTSConnections set to 0; RDP listener enabled.".to_owned());
    }
    if writes && text.contains("schannel") && text.contains("tls 1.2") && text.contains("enabled") {
        vm.faults.remove(&Fault::TlsDisabled);
        out.push("TLS 1.0, 1.1 and 1.2 server protocols enabled.".to_owned());
    }
    if writes && text.contains("keepalivetimeout") {
        vm.faults.remove(&Fault::Flapping);
        out.push("RDP-Tcp keep-alive and reconnect settings applied.".to_owned());
    }
    if text.contains("restart-service") && text.contains("termservice") {
        vm.faults.remove(&Fault::GuestHung);
        out.push("TermService restarted.".to_owned());
    }
    if text.contains("wevtutil") || text.contains("get-winevent") {
        out.extend(event_log(vm));
    }
    if text.contains("get-itemproperty") && text.contains("rdp-tcp") {
        out.extend(rdp_tcp_settings(vm));
    }
    out
}

/// Keeps the last `MAX_OUTPUT` bytes, as Run Command does.
fn tail(mut stdout: String) -> String {
    if stdout.len() > MAX_OUTPUT {
        let mut cut = stdout.len() - MAX_OUTPUT;
        while !stdout.is_char_boundary(cut) {
            cut += 1;
        }
        stdout = stdout.split_off(cut);
    }
    stdout
}

/// System-log events the faults would leave, as `wevtutil qe … /f:text` summarises them.
fn event_log(vm: &Vm) -> Vec<String> {
    let mut events = Vec::new();
    if vm.faults.contains(&Fault::TlsDisabled) {
        events.push("Source: Schannel Event ID: 36871 A fatal error occurred while creating a TLS server credential. The internal error state is 10013.".to_owned());
    }
    if vm.faults.contains(&Fault::CertificateExpired) {
        events.push("Source: Microsoft-Windows-TerminalServices-RemoteConnectionManager Event ID: 1058 The RD Session Host Server has failed to replace the expired self signed certificate used for RD Session Host Server authentication on TLS connection.".to_owned());
        events.push("Source: Schannel Event ID: 36870 A fatal error occurred when attempting to access the TLS server credential private key. The error code returned from the cryptographic module is 0x8009030D. The internal error state is 10001.".to_owned());
    }
    if events.is_empty() {
        events.push(
            "INFO: No events were found that match the specified selection criteria.".to_owned(),
        );
    }
    events
}

/// What `guest-scripts/query-rdp-evidence.ps1` prints on this guest.
fn evidence_query(vm: &Vm) -> Vec<String> {
    let has = |f: Fault| vm.faults.contains(&f);
    let reg = &vm.registry;
    let mut out = Vec::new();
    if has(Fault::CertificateExpired) {
        out.push("RDPHEALTH event provider=Microsoft-Windows-TerminalServices-RemoteConnectionManager id=1058 count=2".to_owned());
        out.push("RDPHEALTH event provider=Schannel id=36870 count=4".to_owned());
    }
    if has(Fault::TlsDisabled) {
        out.push("RDPHEALTH event provider=Schannel id=36871 count=3".to_owned());
    }
    for svc in ["TermService", "SessionEnv", "UmRdpService"] {
        out.push(format!("RDPHEALTH service name={svc} status=Running"));
    }
    let value = |key: &str, name: &str| {
        reg.get(key, name)
            .map(|v| v.to_string())
            .unwrap_or_default()
    };
    out.push(format!(
        "RDPHEALTH registry name=fDenyTSConnections value={}",
        value(TERMINAL_SERVER, "fDenyTSConnections")
    ));
    for name in [
        "fEnableWinStation",
        "PortNumber",
        "SecurityLayer",
        "UserAuthentication",
        "MinEncryptionLevel",
    ] {
        out.push(format!(
            "RDPHEALTH registry name={name} value={}",
            value(RDP_TCP, name)
        ));
    }
    for version in ["TLS 1.0", "TLS 1.1", "TLS 1.2"] {
        let key = format!(
            r"HKLM:\SYSTEM\CurrentControlSet\Control\SecurityProviders\SCHANNEL\Protocols\{version}\Server"
        );
        // A missing value means the operating system default: enabled, not off by default.
        let enabled = reg.dword(&key, "Enabled").is_none_or(|v| v != 0);
        let by_default = reg.dword(&key, "DisabledByDefault").is_some_and(|v| v != 0);
        out.push(format!(
            "RDPHEALTH tls name=\"{version}\" enabled={} disabledByDefault={}",
            u8::from(enabled),
            u8::from(by_default)
        ));
    }
    let port = reg
        .dword(RDP_TCP, "PortNumber")
        .filter(|p| *p != 0)
        .unwrap_or(3389);
    let listening =
        !has(Fault::RdpDisabled) && u16::try_from(port).is_ok_and(|p| reg.listener(p).is_ok());
    let owner = if listening { "TermService" } else { "" };
    out.push(format!("RDPHEALTH port port={port} owner={owner}"));
    if let Some(thumbprint) = reg.certificate_binding() {
        out.push(format!(
            "RDPHEALTH certificate binding={thumbprint} present={}",
            u8::from(vm.certificates.contains(&thumbprint))
        ));
    } else {
        // The self-signed certificate RDP uses, as the responder serves it.
        out.push(format!(
            "RDPHEALTH rdpcert thumbprint={} privateKey=1 expired={}",
            SELF_SIGNED_THUMBPRINT,
            u8::from(has(Fault::CertificateExpired))
        ));
    }
    out.push(format!(
        "RDPHEALTH firewall rule=RemoteDesktop-UserMode-In-TCP enabled=True port={}",
        reg.firewall_rdp_port()
            .map_or(String::new(), |p| p.to_string())
    ));
    out.push("RDPHEALTH done".to_owned());
    out
}

/// `Get-ItemProperty …\WinStations\RDP-Tcp` and the Terminal Server key, as PowerShell prints them.
fn rdp_tcp_settings(vm: &Vm) -> Vec<String> {
    let mut values = vm.registry.values(TERMINAL_SERVER);
    values.extend(vm.registry.values(RDP_TCP));
    values
        .into_iter()
        .map(|(name, value)| format!("{name:<18} : {value}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_query_reports_faults_in_the_operators_format() {
        use crate::evidence::guest::{self, GuestScenario, QUERY_SCRIPT};
        let mut w = crate::sim::world::World::new(
            &crate::sim::Scenario::from_yaml(
                "subscriptions: [{id: s, resourceGroups: [{name: rg, location: l, virtualNetworks: [{name: v, addressPrefix: 10.0.0.0/16, subnets: [{name: s, addressPrefix: 10.0.0.0/24}]}], vms: [{name: vm, nic: {subnet: v/s}, faults: [tls_disabled, rdp_disabled]}]}]}]",
            )
            .unwrap(),
        )
        .unwrap();
        let vm = w.vms.get_mut("vm").unwrap();
        let script: Vec<String> = QUERY_SCRIPT.lines().map(str::to_string).collect();
        let out = run_script(vm, "RunPowerShellScript", &script);
        let evidence = guest::parse(&out);
        assert!(evidence.complete);
        assert_eq!(
            evidence.scenarios(3389),
            vec![GuestScenario::ListenerDisabled, GuestScenario::TlsDisabled]
        );
        assert!(
            vm.faults.contains(&Fault::TlsDisabled),
            "a query changes nothing"
        );
    }

    #[test]
    fn reading_settings_does_not_fix_and_writing_does() {
        let mut w = crate::sim::world::World::new(
            &crate::sim::Scenario::from_yaml(
                "subscriptions: [{id: s, resourceGroups: [{name: rg, location: l, virtualNetworks: [{name: v, addressPrefix: 10.0.0.0/16, subnets: [{name: s, addressPrefix: 10.0.0.0/24}]}], vms: [{name: vm, nic: {subnet: v/s}, faults: [flapping]}]}]}]",
            )
            .unwrap(),
        )
        .unwrap();
        let vm = w.vms.get_mut("vm").unwrap();
        let read = run_script(vm, "RunPowerShellScript", &[r"Get-ItemProperty 'HKLM:\SYSTEM\CurrentControlSet\Control\Terminal Server\WinStations\RDP-Tcp'".into()]);
        assert!(read.contains("KeepAliveTimeout   : 0"));
        assert!(vm.faults.contains(&Fault::Flapping));
        run_script(
            vm,
            "RunPowerShellScript",
            &[
                r"Set-ItemProperty -Path 'HKLM:\...\RDP-Tcp' -Name KeepAliveTimeout -Value 1"
                    .into(),
            ],
        );
        assert!(!vm.faults.contains(&Fault::Flapping));
    }
}
