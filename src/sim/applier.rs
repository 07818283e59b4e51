//! The operator's applier (`guest-scripts/apply-changes.ps1`) as a simulated guest runs it:
//! change by change against the VM's registry model, with the applier's semantics and output
//! contract, stopping at the first error.

use super::{fault::Fault, registry::Registry, world::Vm};
use crate::guest::changes::{Change, Plan, RegValue};

/// The applier, change by change, with its output contract; stops at the first error.
pub(super) fn apply(vm: &mut Vm, plan: &Plan) -> Vec<String> {
    let mut out = vec![format!(
        "RDPHEALTH begin repair={} changes={}",
        plan.repair,
        plan.changes.len()
    )];
    let mut certificate_removed = false;
    for (i, change) in plan.changes.iter().enumerate() {
        let n = i + 1;
        match apply_one(vm, n, change, &mut certificate_removed) {
            Ok(lines) => out.extend(lines),
            Err(detail) => {
                let target = match change {
                    Change::Set { key, name, .. } | Change::Remove { key, name } => {
                        format!("{key}\\{name}")
                    }
                    Change::RestartService { service } => service.clone(),
                    Change::ResetAcl { path, .. } => path.clone(),
                    Change::RemoveRdpCertificate { store, .. } => store.clone(),
                    Change::RemoveStaleCertificateBinding { key } => {
                        format!("{key}\\SSLCertificateSHA1Hash")
                    }
                    Change::FirewallRulePort { rule, .. } => rule.clone(),
                };
                out.push(format!(
                    "RDPHEALTH failed n={n} op={} target=\"{target}\" detail=\"{detail}\"",
                    change.op()
                ));
                out.push(format!(
                    "RDPHEALTH result status=failed change={n} restart=none"
                ));
                return out;
            }
        }
    }
    out.push(format!(
        "RDPHEALTH result status=ok changes={} restart={}",
        plan.changes.len(),
        plan.restart.as_str()
    ));
    out
}

fn shown(v: Option<&RegValue>) -> (u8, String) {
    v.map_or((0, String::new()), |v| (1, v.to_string()))
}

/// Creates each missing key of `path`, parent first (`New-Item` without `-Force`).
fn new_key_path(reg: &mut Registry, path: &str) -> Result<bool, String> {
    let mut created = false;
    let mut current = String::new();
    for part in path.split('\\') {
        if !current.is_empty() {
            current.push('\\');
        }
        current.push_str(part);
        if !reg.key_exists(&current) {
            reg.new_item(&current)?;
            created = true;
        }
    }
    Ok(created)
}

fn apply_one(
    vm: &mut Vm,
    n: usize,
    change: &Change,
    certificate_removed: &mut bool,
) -> Result<Vec<String>, String> {
    let reg = &mut vm.registry;
    Ok(match change {
        Change::Set { key, name, value } => {
            let created = new_key_path(reg, key)?;
            let (had, old) = shown(reg.get(key, name));
            reg.set(key, name, value.clone())?;
            let (_, new) = shown(reg.get(key, name));
            vec![format!(
                "RDPHEALTH change n={n} op=set key=\"{key}\" name={name} type={} had={had} old=\"{old}\" new=\"{new}\" created={}",
                value.kind(),
                u8::from(created)
            )]
        }
        Change::Remove { key, name } => {
            let (had, old) = shown(reg.get(key, name));
            if had == 1 {
                reg.remove(key, name)?;
            }
            vec![format!(
                "RDPHEALTH change n={n} op=remove key=\"{key}\" name={name} had={had} old=\"{old}\" new=\"\""
            )]
        }
        Change::RestartService { service } => {
            if reg.is_denied(&format!("service:{service}")) {
                return Err(format!(
                    "Service '{service}' cannot be started due to the following error: Cannot start service {service} on computer '.'."
                ));
            }
            if service.eq_ignore_ascii_case("TermService") {
                vm.faults.remove(&Fault::GuestHung);
            }
            if service.eq_ignore_ascii_case("SessionEnv") && *certificate_removed {
                vm.faults.remove(&Fault::CertificateExpired);
            }
            vec![format!(
                "RDPHEALTH change n={n} op=restart service={service} old=Running new=Running"
            )]
        }
        Change::ResetAcl { path, grants } => {
            if reg.is_denied(path) {
                return Err(format!(
                    "icacls.exe {path} /save C:\\Windows\\Temp\\rdphealth-acl-{}.txt /t /c exited with 5",
                    vm.boot
                ));
            }
            vec![format!(
                "RDPHEALTH change n={n} op=acl path=\"{path}\" backup=\"C:\\Windows\\Temp\\rdphealth-acl-{}.txt\" old=\"saved to backup\" new=\"{grants}\"",
                vm.boot
            )]
        }
        Change::RemoveStaleCertificateBinding { key } => remove_stale_binding(vm, n, key)?,
        Change::FirewallRulePort { rule, port } => {
            let old = reg
                .firewall_rdp_port()
                .map_or(String::new(), |p| p.to_string());
            if reg.is_denied(crate::sim::registry::FIREWALL_RULES) {
                return Err("Access is denied.".to_owned());
            }
            reg.set_firewall_rdp_port(*port)?;
            vec![format!(
                "RDPHEALTH change n={n} op=firewallport rule={rule} old=\"{old}\" new=\"{port}\""
            )]
        }
        Change::RemoveRdpCertificate { store, key } => {
            if reg.get(key, "SSLCertificateSHA1Hash").is_some() {
                return Ok(vec![format!(
                    "RDPHEALTH skipped n={n} op=removecert reason=\"SSLCertificateSHA1Hash binds a custom certificate\""
                )]);
            }
            if reg.is_denied(store) {
                return Err("Access is denied.".to_owned());
            }
            *certificate_removed = true;
            let not_after = if vm.faults.contains(&Fault::CertificateExpired) {
                "2025-06-01T00:00:00.0000000Z"
            } else {
                "2027-06-01T00:00:00.0000000Z"
            };
            vec![format!(
                "RDPHEALTH change n={n} op=removecert thumbprint=5E1F00000000000000000000000000000000CE27 notAfter={not_after}"
            )]
        }
    })
}

/// `RemoveStaleCertificateBinding`: deletes the binding only while its certificate is gone.
fn remove_stale_binding(vm: &mut Vm, n: usize, key: &str) -> Result<Vec<String>, String> {
    let Some(thumbprint) = vm.registry.certificate_binding() else {
        return Ok(vec![format!(
            "RDPHEALTH skipped n={n} op=unbindcert reason=\"no SSLCertificateSHA1Hash\""
        )]);
    };
    if vm.certificates.contains(&thumbprint) {
        return Ok(vec![format!(
            "RDPHEALTH skipped n={n} op=unbindcert reason=\"the bound certificate {thumbprint} is in the store\""
        )]);
    }
    vm.registry.remove(key, "SSLCertificateSHA1Hash")?;
    Ok(vec![format!(
        "RDPHEALTH change n={n} op=unbindcert key=\"{key}\" name=SSLCertificateSHA1Hash had=1 old=\"{thumbprint}\" new=\"\""
    )])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        guest::{
            changes::{self, Options, RDP_TCP, Restart, TERMINAL_SERVER},
            script,
        },
        ladder::GuestRepair,
        sim::guest::{boot, run_script},
    };

    /// One VM probed from inside its network (no NSG on the private path means allowed).
    fn world(faults: &str) -> crate::sim::world::World {
        let yaml = format!(
            "probeSource: 10.0.0.200\nsubscriptions: [{{id: s, resourceGroups: [{{name: rg, location: l, virtualNetworks: [{{name: v, addressPrefix: 10.0.0.0/16, subnets: [{{name: s, addressPrefix: 10.0.0.0/24}}]}}], vms: [{{name: vm, nic: {{subnet: v/s}}, faults: [{faults}]}}]}}]}}]"
        );
        crate::sim::world::World::new(&crate::sim::Scenario::from_yaml(&yaml).unwrap()).unwrap()
    }

    fn run(w: &mut crate::sim::world::World, script: &[String]) -> String {
        run_script(w.vms.get_mut("vm").unwrap(), "RunPowerShellScript", script)
    }

    /// Every (key, value name) → value of the keys a repair may touch.
    fn snapshot(reg: &Registry) -> std::collections::BTreeMap<(String, String), RegValue> {
        use crate::guest::changes::{TLS12_SERVER, TS_POLICY};
        let mut out = std::collections::BTreeMap::new();
        for key in [
            TERMINAL_SERVER,
            RDP_TCP,
            TS_POLICY,
            TLS12_SERVER,
            crate::sim::registry::FIREWALL_RULES,
        ] {
            for (name, value) in reg.values(key) {
                out.insert((key.to_ascii_lowercase(), name.to_ascii_lowercase()), value);
            }
        }
        out
    }

    const REPAIRS: [(GuestRepair, &str); 5] = [
        (GuestRepair::EnableTls12, "tls_disabled"),
        (GuestRepair::RenewRdpCertificate, "certificate_expired"),
        (GuestRepair::ListenerKeepAlive, "flapping"),
        (GuestRepair::RemoveStaleCertificateBinding, ""),
        (GuestRepair::RestoreRdpPort, ""),
    ];

    /// A thumbprint that is in no store.
    const GONE: [u8; 4] = [0x5E, 0x1F, 0xCE, 0x27];

    /// A VM with the problem `repair` fixes: its fault, or the registry state behind it.
    fn broken(repair: GuestRepair, fault: &str) -> crate::sim::world::World {
        let mut w = world(fault);
        let reg = &mut w.vms.get_mut("vm").unwrap().registry;
        match repair {
            GuestRepair::RemoveStaleCertificateBinding => reg
                .set(
                    RDP_TCP,
                    "SSLCertificateSHA1Hash",
                    RegValue::Binary(GONE.to_vec()),
                )
                .unwrap(),
            // Someone moved RDP to 3390, firewall rule included.
            GuestRepair::RestoreRdpPort => {
                reg.set(RDP_TCP, "PortNumber", RegValue::Dword(3390))
                    .unwrap();
                reg.set_firewall_rdp_port(3390).unwrap();
            }
            _ => {}
        }
        assert!(!healthy(&w), "{repair}: the VM is not broken");
        w
    }

    fn healthy(w: &crate::sim::world::World) -> bool {
        matches!(
            w.behaviour("vm"),
            crate::sim::fault::Behaviour::Healthy {
                expired_certificate: false
            }
        )
    }

    /// The (key, value name) a change writes or deletes, if it is one value.
    fn value_id(change: &Change) -> Option<(String, String)> {
        let (key, name) = match change {
            Change::Set { key, name, .. } | Change::Remove { key, name } => {
                (key.as_str(), name.as_str())
            }
            Change::RemoveStaleCertificateBinding { key } => {
                (key.as_str(), "SSLCertificateSHA1Hash")
            }
            Change::FirewallRulePort { rule, .. } => {
                (crate::sim::registry::FIREWALL_RULES, rule.as_str())
            }
            _ => return None,
        };
        Some((key.to_ascii_lowercase(), name.to_ascii_lowercase()))
    }

    #[test]
    fn each_repair_sets_the_guides_values_reports_old_to_new_and_keeps_the_rest() {
        use crate::guest::report::{self, Outcome};
        for (repair, fault) in REPAIRS {
            for c in [false, true] {
                let mut w = broken(repair, fault);
                let before = snapshot(&w.vms["vm"].registry);
                let plan = changes::plan(repair, &Options::consent(c));
                let out = run(&mut w, &script::script_for(&plan));
                let vm = w.vms.get_mut("vm").unwrap();
                boot(vm);
                let vm = &w.vms["vm"];
                let insecure = plan.changes.iter().any(|c| {
                    matches!(c, Change::Set { name, value: RegValue::Dword(0), .. } if name == "SecurityLayer")
                });
                if insecure {
                    // The consented insecure listener: reachable with standard RDP security
                    // only, which the probe reports as a security finding.
                    assert_eq!(
                        w.behaviour("vm"),
                        crate::sim::fault::Behaviour::LegacyRdpOnly,
                        "{repair}"
                    );
                    assert_eq!(
                        vm.faults.iter().copied().collect::<Vec<_>>(),
                        [crate::sim::Fault::LegacyRdpSecurity]
                    );
                } else {
                    assert!(healthy(&w), "{repair} did not fix the VM");
                    assert!(vm.faults.is_empty(), "{repair} left {:?}", vm.faults);
                }
                assert!(
                    vm.registry.listener(3389).is_ok(),
                    "{repair} broke the listener"
                );
                let after = snapshot(&vm.registry);
                let r = report::parse(&out);
                assert!(matches!(r.outcome, Outcome::Ok { .. }), "{repair}: {out}");
                assert!(!r.truncated);
                assert!(r.verdict().is_ok());
                let mut named = std::collections::BTreeSet::new();
                let mut reported = 0;
                for (i, change) in plan.changes.iter().enumerate() {
                    let Some(id) = value_id(change) else {
                        continue;
                    };
                    named.insert(id.clone());
                    let Change::Set { name, value, .. } = change else {
                        continue;
                    };
                    assert_eq!(after.get(&id), Some(value), "{repair}: {name}");
                    let line = &r.applied[i];
                    assert_eq!(line.n as usize, i + 1);
                    assert_eq!(
                        line.old,
                        before.get(&id).map(ToString::to_string),
                        "{name} old"
                    );
                    assert_eq!(line.new, value.to_string(), "{name} new");
                    reported += 1;
                }
                assert_eq!(
                    r.applied.len(),
                    plan.changes.len(),
                    "{repair}: one line per change ({reported} registry writes)"
                );
                for (id, value) in &before {
                    if !named.contains(id) {
                        assert_eq!(after.get(id), Some(value), "{repair} changed {id:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_old_new_item_force_pattern_breaks_the_listener_and_the_plan_does_not() {
        // What `Set-Dword` of the former keep-alive script did for every value:
        // `New-Item -Path $Path -Force` (on an existing key: delete it, create it empty), then
        // write the one value.
        let mut w = world("flapping");
        let plan = changes::plan(GuestRepair::ListenerKeepAlive, &Options::SAFE);
        {
            let reg = &mut w.vms.get_mut("vm").unwrap().registry;
            for change in &plan.changes {
                let Change::Set { key, name, value } = change else {
                    unreachable!("the keep-alive repair only writes values")
                };
                reg.new_item_force(key);
                reg.set(key, name, value.clone()).unwrap();
            }
            assert_eq!(
                reg.listener(3389),
                Err("RDP-Tcp fEnableWinStation is missing".to_owned())
            );
            assert_eq!(reg.dword(RDP_TCP, "PortNumber"), None);
        }
        assert_eq!(w.behaviour("vm"), crate::sim::fault::Behaviour::Refuse);

        let mut w = world("flapping");
        run(&mut w, &script::script_for(&plan));
        boot(w.vms.get_mut("vm").unwrap());
        assert!(matches!(
            w.behaviour("vm"),
            crate::sim::fault::Behaviour::Healthy { .. }
        ));
        let reg = &w.vms["vm"].registry;
        assert_eq!(reg.dword(RDP_TCP, "PortNumber"), Some(3389));
        assert_eq!(reg.dword(RDP_TCP, "fEnableWinStation"), Some(1));
    }

    #[test]
    fn a_failing_change_stops_the_applier_and_is_named() {
        use crate::guest::report;
        for (repair, fault) in REPAIRS {
            let plan = changes::plan(repair, &Options::SAFE);
            for (i, change) in plan.changes.iter().enumerate() {
                let mut w = broken(repair, fault);
                let before = snapshot(&w.vms["vm"].registry);
                w.vms
                    .get_mut("vm")
                    .unwrap()
                    .registry
                    .deny_writes(&denied(change));
                let out = run(&mut w, &script::script_for(&plan));
                let r = report::parse(&out);
                let err = r.verdict().unwrap_err();
                // The first change on the same denied target fails: that one is named.
                let first = plan
                    .changes
                    .iter()
                    .position(|c| denied(c) == denied(change))
                    .unwrap();
                assert!(
                    err.contains(&format!("change {} of {}", first + 1, plan.changes.len())),
                    "{repair} #{i}: {err}"
                );
                assert!(out.ends_with(&format!(
                    "RDPHEALTH result status=failed change={} restart=none",
                    first + 1
                )));
                assert_eq!(r.applied.len(), first, "nothing after the failure ran");
                // Values of later changes are as before.
                let after = snapshot(&w.vms["vm"].registry);
                for later in &plan.changes[first..] {
                    if let Change::Set { key, name, .. } = later {
                        let id = (key.to_ascii_lowercase(), name.to_ascii_lowercase());
                        assert_eq!(after.get(&id), before.get(&id), "{repair}: {name}");
                    }
                }
                if first == 0 {
                    boot(w.vms.get_mut("vm").unwrap());
                    assert!(!healthy(&w), "{repair}: nothing ran");
                }
            }
        }
    }

    /// The path whose ACL makes `change` fail.
    fn denied(change: &Change) -> String {
        match change {
            Change::Set { key, .. }
            | Change::Remove { key, .. }
            | Change::RemoveStaleCertificateBinding { key } => key.clone(),
            Change::RestartService { service } => format!("service:{service}"),
            Change::ResetAcl { path, .. } => path.clone(),
            Change::RemoveRdpCertificate { store, .. } => store.clone(),
            Change::FirewallRulePort { .. } => crate::sim::registry::FIREWALL_RULES.to_owned(),
        }
    }

    #[test]
    fn changes_that_need_a_restart_take_effect_at_the_next_boot() {
        let mut w = world("tls_disabled");
        let plan = changes::plan(GuestRepair::EnableTls12, &Options::SAFE);
        assert_eq!(plan.restart, Restart::Required);
        let out = run(&mut w, &script::script_for(&plan));
        assert!(out.ends_with("restart=required"), "{out}");
        let vm = w.vms.get_mut("vm").unwrap();
        assert!(
            vm.faults.contains(&Fault::TlsDisabled),
            "SCHANNEL reads it at boot"
        );
        assert!(vm.restart_pending);
        // The registry already holds the new values; another script does not undo them.
        let query: Vec<String> = crate::evidence::guest::QUERY_SCRIPT
            .lines()
            .map(str::to_string)
            .collect();
        run_script(vm, "RunPowerShellScript", &query);
        assert!(!vm.registry.tls12_disabled());
        boot(vm);
        assert!(!vm.faults.contains(&Fault::TlsDisabled));
        assert!(!vm.restart_pending);
        assert!(matches!(
            w.behaviour("vm"),
            crate::sim::fault::Behaviour::Healthy { .. }
        ));
    }
}
