//! From in-guest evidence (the query's output lines) and the probe's failure to the ladder's
//! decision: one table row per check of the RDP guides.

use k8s_openapi::jiff::Timestamp;
use rstest::rstest;

use super::*;
use crate::{
    evidence::{Evidence, PowerState, guest},
    probe::{Failure, FailureReason},
};

fn t0() -> Timestamp {
    "2026-11-21T10:00:00Z".parse().unwrap()
}

/// A clean guest: every check of the query passes.
const CLEAN: &str = "\
RDPHEALTH service name=TermService status=Running
RDPHEALTH registry name=fDenyTSConnections value=0
RDPHEALTH registry name=fEnableWinStation value=1
RDPHEALTH registry name=PortNumber value=3389
RDPHEALTH tls name=\"TLS 1.2\" enabled=1 disabledByDefault=0
RDPHEALTH port port=3389 owner=TermService
RDPHEALTH firewall rule=RemoteDesktop-UserMode-In-TCP enabled=True
";

/// Auto, no disruptive rung allowed unless `allowed` says so.
fn policy(allowed: &[Rung]) -> LadderPolicy {
    LadderPolicy {
        mode: Mode::Auto,
        allowed_disruptive: allowed.to_vec(),
        ..LadderPolicy::default()
    }
}

struct Input<'a> {
    /// Query lines after [`CLEAN`] (later lines of a kind win); `None`: no in-guest evidence.
    guest: Option<&'a str>,
    failure: Failure,
    incident: Incident,
    allowed: &'a [Rung],
    gates: Gates,
}

fn decide_on(input: Input<'_>) -> Decision {
    decide_with(input, |_| {})
}

/// [`decide_on`] with the policy edited; the VM is probed on port 3389.
fn decide_with(input: Input<'_>, edit: fn(&mut LadderPolicy)) -> Decision {
    let mut ladder = LadderStatus::default();
    ladder.open_incident(t0());
    let evidence = Evidence {
        power_state: Some(PowerState::Running),
        agent_ready: Some(true),
        guest: input
            .guest
            .map(|lines| guest::parse(&format!("{CLEAN}{lines}\nRDPHEALTH done\n"))),
        rdp_port: Some(3389),
        ..Evidence::empty(t0())
    };
    let mut policy = policy(input.allowed);
    edit(&mut policy);
    decide(&Situation {
        policy: &policy,
        ladder: &ladder,
        reachability: Reachability::Unreachable,
        failure: Some(&input.failure),
        incident: input.incident,
        evidence: Some(&evidence),
        gates: input.gates,
        approval: None,
        seed: "uid",
        now: t0(),
    })
}

fn failure(reason: FailureReason) -> Failure {
    Failure::new(reason, "test")
}

fn outage(guest: Option<&str>, reason: FailureReason) -> Decision {
    decide_on(Input {
        guest,
        failure: failure(reason),
        incident: Incident::Outage,
        allowed: &[],
        gates: Gates::OPEN,
    })
}

fn act(repair: GuestRepair) -> Decision {
    Decision::Act(Step::repair(repair))
}

use FailureReason::{TlsHandshakeFailed as Handshake, TlsTimeout as Timeout};
use GuestRepair::{EnableTls12 as Tls12, RenewRdpCertificate as Renew};

// The certificate / MachineKeys repair runs only on evidence against the certificate.
#[rstest]
#[case::handshake_alone(None, Handshake, act(Tls12))]
#[case::timeout_alone(None, Timeout, act(Tls12))]
#[case::handshake_clean_guest(Some(""), Handshake, act(Tls12))]
#[case::event_1057(
    Some(
        "RDPHEALTH event provider=Microsoft-Windows-TerminalServices-RemoteConnectionManager id=1057 count=1"
    ),
    Handshake,
    act(Renew)
)]
#[case::event_1058(
    Some(
        "RDPHEALTH event provider=Microsoft-Windows-TerminalServices-RemoteConnectionManager id=1058 count=2"
    ),
    Timeout,
    act(Renew)
)]
#[case::event_36870(
    Some("RDPHEALTH event provider=Schannel id=36870 count=4"),
    Handshake,
    act(Renew)
)]
#[case::event_36872(
    Some("RDPHEALTH event provider=Schannel id=36872 count=1"),
    Handshake,
    act(Renew)
)]
#[case::self_signed_certificate_without_private_key(
    Some("RDPHEALTH rdpcert thumbprint=AB12 privateKey=0 expired=0"),
    Handshake,
    act(Renew)
)]
#[case::self_signed_certificate_expired(
    Some("RDPHEALTH rdpcert thumbprint=AB12 privateKey=1 expired=1"),
    Timeout,
    act(Renew)
)]
#[case::self_signed_certificate_usable(
    Some("RDPHEALTH rdpcert thumbprint=AB12 privateKey=1 expired=0"),
    Handshake,
    act(Tls12)
)]
#[case::event_36871_is_tls_not_the_certificate(
    Some("RDPHEALTH event provider=Schannel id=36871 count=3"),
    Handshake,
    act(Tls12)
)]
#[case::tls12_disabled(
    Some("RDPHEALTH tls name=\"TLS 1.2\" enabled=0 disabledByDefault=0"),
    Timeout,
    act(Tls12)
)]
#[case::tls12_disabled_by_default(
    Some("RDPHEALTH tls name=\"TLS 1.2\" enabled=1 disabledByDefault=1"),
    Timeout,
    act(Tls12)
)]
fn certificate_repair_only_on_evidence(
    #[case] guest: Option<&str>,
    #[case] reason: FailureReason,
    #[case] expected: Decision,
) {
    assert_eq!(outage(guest, reason), expected);
}

#[test]
fn a_tls_failure_alone_never_plans_the_certificate_repair() {
    for reason in [Handshake, Timeout] {
        for guest in [None, Some("")] {
            let evidence = Evidence {
                guest: guest.map(guest::parse),
                ..Evidence::empty(t0())
            };
            let steps = plan(
                &policy(&[]),
                Some(&failure(reason)),
                Incident::Outage,
                Some(&evidence),
            );
            assert!(
                !steps.contains(&Step::repair(Renew)),
                "{reason:?} {guest:?}: {steps:?}"
            );
        }
    }
    // The server itself says it has no usable certificate (SSL_CERT_NOT_ON_SERVER).
    let no_cert = Failure {
        code: Some(3),
        ..failure(FailureReason::NegotiationFailure)
    };
    assert_eq!(
        plan(&policy(&[]), Some(&no_cert), Incident::Outage, None)[0],
        Step::repair(Renew)
    );
}

/// An expired certificate on a VM that still answers: the renewal restarts TermService, so it
/// is disruptive and needs `Restart`'s permission and the disruptive gates; on an unreachable
/// VM it is not.
#[rstest]
#[case::not_allowed(&[], Gates::OPEN, Decision::GiveUp(GiveUp::Exhausted { need_permission: vec![Rung::Restart], need_agent: vec![] }))]
#[case::other_rung_allowed(&[Rung::Redeploy], Gates::OPEN, Decision::GiveUp(GiveUp::Exhausted { need_permission: vec![Rung::Restart], need_agent: vec![] }))]
#[case::allowed(&[Rung::Restart], Gates::OPEN, act(Renew))]
#[case::storm(&[Rung::Restart], Gates { storm: true, ..Gates::OPEN }, Decision::Suspended(Suspension::Storm))]
#[case::fleet_slot(&[Rung::Restart], Gates { disruptive_slot_free: false, ..Gates::OPEN }, Decision::Wait { until: t0().checked_add(std::time::Duration::from_secs(30)).unwrap(), reason: WaitReason::FleetSlot })]
fn renewing_on_a_reachable_vm_is_disruptive(
    #[case] allowed: &[Rung],
    #[case] gates: Gates,
    #[case] expected: Decision,
) {
    let decision = decide_on(Input {
        guest: None,
        failure: failure(FailureReason::TcpTimeout),
        incident: Incident::CertificateExpired,
        allowed,
        gates,
    });
    assert_eq!(decision, expected);
    // The same evidence on an unreachable VM: no session to drop, no permission needed.
    let unreachable = decide_on(Input {
        guest: Some("RDPHEALTH event provider=Schannel id=36870 count=1"),
        failure: failure(Handshake),
        incident: Incident::Outage,
        allowed: &[],
        gates,
    });
    assert_eq!(unreachable, act(Renew));
}

#[test]
fn only_the_repairs_that_restart_term_service_drop_sessions() {
    assert!(Step::repair(Renew).drops_sessions());
    assert!(Step::repair(Renew).is_disruptive(true));
    assert!(!Step::repair(Renew).is_disruptive(false));
    assert_eq!(Step::repair(Renew).permission_rung(true), Rung::Restart);
    assert_eq!(
        Step::repair(Renew).permission_rung(false),
        Rung::RepairGuest
    );
    for repair in [Tls12, GuestRepair::ListenerKeepAlive] {
        assert!(!Step::repair(repair).is_disruptive(true), "{repair}");
    }
}

#[test]
fn an_approval_of_restart_unlocks_the_renewal_on_a_reachable_vm() {
    let mut ladder = LadderStatus::default();
    ladder.open_incident(t0());
    ladder.exhausted = true;
    let evidence = Evidence {
        power_state: Some(PowerState::Running),
        agent_ready: Some(true),
        ..Evidence::empty(t0())
    };
    let policy = policy(&[]);
    let failure = failure(FailureReason::TcpTimeout);
    let situation = |approval| Situation {
        policy: &policy,
        ladder: &ladder,
        reachability: Reachability::Unreachable,
        failure: Some(&failure),
        incident: Incident::CertificateExpired,
        evidence: Some(&evidence),
        gates: Gates::OPEN,
        approval,
        seed: "uid",
        now: t0(),
    };
    assert_eq!(decide(&situation(Some(Rung::Restart))), act(Renew));
    assert!(matches!(
        decide(&situation(Some(Rung::RepairGuest))),
        Decision::GiveUp(_)
    ));
}

fn unreachable_with(guest: &str, edit: fn(&mut LadderPolicy)) -> Decision {
    decide_with(
        Input {
            guest: Some(guest),
            failure: failure(FailureReason::TcpRefused),
            incident: Incident::Outage,
            allowed: &[],
            gates: Gates::OPEN,
        },
        edit,
    )
}

fn nothing(_: &mut LadderPolicy) {}

const MOVED: &str = "RDPHEALTH registry name=PortNumber value=3390";
const BROKER: &str =
    "RDPHEALTH event provider=Microsoft-Windows-TerminalServices-SessionBroker id=2056 count=1";
const BROKER_CLIENT: &str = "RDPHEALTH event provider=Microsoft-Windows-TerminalServices-SessionBroker-Client id=1296 count=3";
const STALE: &str = "RDPHEALTH certificate binding=5E1FCE27 present=0";

// The guides' remaining checks, from the query's lines to the decision.
#[rstest]
#[case::clean(CLEAN, nothing, Decision::Act(Step::rung(Rung::ResetRdpConfig)))]
#[case::broker_2056(BROKER, nothing, Decision::Blocked(Blocker::ConnectionBroker))]
#[case::broker_client_1296(BROKER_CLIENT, nothing, Decision::Blocked(Blocker::ConnectionBroker))]
#[case::port_changed_is_reported_with_both_ports(MOVED, nothing, Decision::Blocked(Blocker::PortChanged { configured: 3390, probed: 3389 }))]
#[case::port_restored_with_consent(MOVED, |p: &mut LadderPolicy| p.restore_rdp_port = true, act(GuestRepair::RestoreRdpPort))]
#[case::port_consent_but_observe(MOVED, |p: &mut LadderPolicy| { p.restore_rdp_port = true; p.mode = Mode::Observe; }, Decision::Blocked(Blocker::PortChanged { configured: 3390, probed: 3389 }))]
#[case::port_consent_dry_run(MOVED, |p: &mut LadderPolicy| { p.restore_rdp_port = true; p.mode = Mode::DryRun; }, Decision::Plan(Step::repair(GuestRepair::RestoreRdpPort)))]
#[case::port_consent_without_repair_guest(MOVED, |p: &mut LadderPolicy| { p.restore_rdp_port = true; p.ladder.retain(|r| *r != Rung::RepairGuest); }, Decision::Blocked(Blocker::PortChanged { configured: 3390, probed: 3389 }))]
#[case::same_port(CLEAN, |p: &mut LadderPolicy| p.restore_rdp_port = true, Decision::Act(Step::rung(Rung::ResetRdpConfig)))]
#[case::stale_binding(STALE, nothing, act(GuestRepair::RemoveStaleCertificateBinding))]
#[case::binding_in_store(
    STALE_PRESENT,
    nothing,
    Decision::Act(Step::rung(Rung::ResetRdpConfig))
)]
#[case::tls12_off_by_default(TLS_OFF_BY_DEFAULT, nothing, act(Tls12))]
fn the_guides_checks(
    #[case] guest: &str,
    #[case] edit: fn(&mut LadderPolicy),
    #[case] expected: Decision,
) {
    assert_eq!(unreachable_with(guest, edit), expected);
}

const STALE_PRESENT: &str = "RDPHEALTH certificate binding=5E1FCE27 present=1";
const TLS_OFF_BY_DEFAULT: &str = "RDPHEALTH tls name=\"TLS 1.2\" enabled=1 disabledByDefault=1";

#[test]
fn a_changed_port_is_not_judged_without_the_probed_port() {
    let evidence = Evidence {
        guest: Some(guest::parse(&format!("{CLEAN}{MOVED}\n"))),
        ..Evidence::empty(t0())
    };
    assert!(evidence.guest_scenarios().is_empty());
    let evidence = Evidence {
        rdp_port: Some(3389),
        ..evidence
    };
    assert_eq!(
        evidence.guest_scenarios(),
        vec![guest::GuestScenario::PortChanged]
    );
    let message = Blocker::PortChanged {
        configured: 3390,
        probed: 3389,
    }
    .message();
    assert!(
        message.contains("3390") && message.contains("3389"),
        "{message}"
    );
}

#[test]
fn a_stale_binding_is_removed_before_the_certificate_is_renewed() {
    let decision = unreachable_with(
        &format!("{STALE}\nRDPHEALTH event provider=Schannel id=36870 count=2"),
        nothing,
    );
    assert_eq!(decision, act(GuestRepair::RemoveStaleCertificateBinding));
}
