//! Storing a rung's intent, then making its Azure call.

use super::messages::{set, summarize};
use super::*;
use crate::guest::changes::Restart;

impl Remediator {
    pub(super) async fn act(
        &self,
        subject: &Subject<'_>,
        vm: &VmRef,
        step: Step,
        outcome: &mut Outcome,
        sink: &dyn StatusSink,
        now: Timestamp,
    ) -> Result<Continue, RemediateError> {
        // Asked now, not when the reconcile began: a reconcile can outlive a lease.
        let Some(term) = self.leadership.term() else {
            return Err(RemediateError::NotLeader);
        };
        // Reachable unless the thresholds said otherwise (as `decide` saw the incident): a
        // repair that restarts TermService then drops users' sessions.
        let vm_reachable = conditions::status_of(&outcome.status.conditions, types::REACHABLE)
            != Some(Status::False);
        let drops_sessions = vm_reachable && step.drops_sessions();
        let disruptive = step.is_disruptive(vm_reachable);
        if disruptive
            && !self
                .fleet
                .claim_everywhere(&vm.subscription, subject.group, subject.key)
                .await
        {
            return Ok(Continue::Until(
                now.checked_add(Duration::from_secs(30)).unwrap_or(now),
            ));
        }
        let status = &mut outcome.status;
        // Snapshot before change: the rung's call waits for a snapshot taken for it. A
        // password reset the operator refuses before any call changes nothing: no snapshot.
        let refused = step.rung == Rung::ResetPassword && self.password_refusal(subject).is_some();
        let snapshot_first = subject.spec.ladder.snapshots.enabled
            && crate::ladder::snapshot::needed(step.rung)
            && !refused;
        let snapshot = status
            .ladder
            .fresh_snapshot(step, now)
            .map(|r| r.id.clone())
            .filter(|_| snapshot_first);
        if disruptive && snapshot.is_none() {
            // Evidence before disruption: it is in status; say so in an Event too.
            outcome.events.push(Event {
                severity: Severity::Normal,
                reason: "EvidenceCaptured",
                note: status
                    .diagnosis
                    .as_ref()
                    .map_or_else(|| "no evidence could be read".into(), summarize),
            });
        }
        status.ladder.start(step, now);
        if let Some(current) = status.ladder.current.as_mut() {
            current.lease = Some(term.clone());
            current.drops_sessions = drops_sessions;
        }
        if snapshot_first && snapshot.is_none() {
            return self
                .take_snapshot(subject, vm, step, &term, outcome, sink, now)
                .await;
        }
        // The NIC's original address goes into the intent, before the PUT that moves it.
        if step.rung == Rung::ResetNic {
            match self.plan_nic_reset(vm).await {
                Ok(record) => {
                    if let Some(current) = status.ladder.current.as_mut() {
                        current.nic = Some(record);
                    }
                }
                Err(e) => return Ok(self.nic_unread(subject, vm, outcome, e, now)),
            }
        }
        // The approval is used by the call, not by the snapshot before it.
        if let Some((value, rung)) = &subject.approval
            && *rung == step.permission_rung(vm_reachable)
        {
            status.ladder.consumed_approval = Some(value.clone());
        }
        if let Some(id) = &snapshot {
            if let Some(current) = status.ladder.current.as_mut() {
                current.snapshot = Some(id.clone());
            }
            if let Some(record) = status.ladder.snapshots.last_mut() {
                record.used = true;
            }
        }
        set(
            status,
            types::REMEDIATING,
            Status::True,
            "RungStarted",
            format!("{step} started"),
            now,
        );
        self.store_intent(subject, vm, &term, status, sink).await?;
        outcome.events.push(Event {
            severity: Severity::Normal,
            reason: "RemediationStarted",
            note: match &snapshot {
                Some(id) => format!(
                    "{step} started (attempt {}) after OS-disk snapshot {id}",
                    status.ladder.attempts_of(step)
                ),
                None => format!(
                    "{step} started (attempt {})",
                    status.ladder.attempts_of(step)
                ),
            },
        });
        if let Some(r) = status.ladder.current.as_ref().and_then(|c| c.nic.as_ref()) {
            outcome.events.push(Event {
                severity: Severity::Normal,
                reason: "NicAddressRecorded",
                note: format!(
                    "{step}: the NIC's original address {} ({}) is recorded; it moves to {} and comes back once the reset is judged, if still free",
                    r.original_ip, r.original_allocation, r.new_ip
                ),
            });
        }
        let nic = status.ladder.current.as_ref().and_then(|c| c.nic.clone());
        match self.call(subject, vm, step, nic.as_ref(), now).await {
            Ok((op, note)) => {
                if let Some(note) = note {
                    outcome.events.push(Event {
                        severity: Severity::Warning,
                        reason: "NsgRuleWritten",
                        note,
                    });
                }
                let first = now.checked_add(self.first_poll).unwrap_or(now);
                status.ladder.running(
                    OperationRef {
                        async_operation_url: op.async_operation.clone(),
                        location_url: op.location.clone(),
                    },
                    first,
                );
                if op.completed {
                    if step.rung == Rung::ResetNic {
                        self.nic_reset_done(vm, &mut outcome.status, &mut outcome.events)
                            .await;
                    }
                    let status = &mut outcome.status;
                    if step.rung == Rung::ResetPassword {
                        self.password_outcome(subject, true, &mut outcome.events, now)
                            .await;
                    }
                    let until = now
                        .checked_add(subject.spec.ladder.settle_time)
                        .unwrap_or(now);
                    status.ladder.settle(now, until, None);
                    Ok(Continue::Until(until))
                } else {
                    Ok(Continue::Until(first))
                }
            }
            Err(CallError::Azure(e)) if refusal::not_now(&e) => Ok(self.deferred(
                subject,
                vm,
                &mut outcome.status,
                &mut outcome.events,
                (&e.to_string(), e.retry_after()),
                now,
            )),
            Err(CallError::Azure(e @ AzureError::OutcomeUnknown { .. })) => {
                // Azure may be carrying it out: never re-sent, the slot stays claimed, and
                // what Azure shows and the probe settle it.
                let until = now
                    .checked_add(subject.spec.ladder.settle_time)
                    .unwrap_or(now);
                let message = format!(
                    "{e}; Azure may be carrying it out, so it is not sent again and is judged by the VM's state and the probe"
                );
                outcome
                    .status
                    .ladder
                    .settle_unknown(now, until, message.clone());
                outcome.events.push(Event {
                    severity: Severity::Warning,
                    reason: "RemediationOutcomeUnknown",
                    note: format!("{step}: {message}; judged after {until}"),
                });
                Ok(Continue::Until(until))
            }
            Err(e) => Ok(self.failed(
                subject,
                vm,
                &mut outcome.status,
                &mut outcome.events,
                e.describe(),
                now,
            )),
        }
    }

    /// Persists the intent in `status`, then asks for leadership again: only when both hold
    /// may the Azure call (the rung's, or the snapshot before it) be made.
    pub(super) async fn store_intent(
        &self,
        subject: &Subject<'_>,
        vm: &VmRef,
        term: &LeaseTerm,
        status: &mut RdpHealthStatus,
        sink: &dyn StatusSink,
    ) -> Result<(), RemediateError> {
        if let Err(e) = sink.persist(status).await {
            // Nothing was called: forget the intent so the next reconcile decides again (on
            // fresh data, when the write lost a race with another one).
            status.ladder.current = None;
            self.fleet
                .release(&vm.subscription, subject.group, subject.key);
            return Err(RemediateError::Persist(e));
        }
        if self.leadership.term().as_ref() != Some(term) {
            // The lease was lost while the intent was written: the call is not made. The next
            // leader finds the intent and settles it as of unknown outcome, never re-sending.
            return Err(RemediateError::NotLeader);
        }
        Ok(())
    }

    pub(super) async fn call(
        &self,
        subject: &Subject<'_>,
        vm: &VmRef,
        step: Step,
        nic: Option<&crate::ladder::nic::NicReset>,
        now: Timestamp,
    ) -> Result<(Operation, Option<String>), CallError> {
        let plain =
            |r: Result<Operation, AzureError>| r.map(|op| (op, None)).map_err(CallError::Azure);
        match (step.rung, step.repair) {
            (Rung::ResetRdpConfig, _) => plain(self.azure.reset_rdp_config(vm).await),
            (Rung::RepairGuest, Some(repair)) => {
                let script = repair_script(repair, &self.plan_options(subject));
                plain(self.azure.run_command(vm, &script).await)
            }
            (Rung::ResetNic, _) => self.reset_nic(vm, nic).await.map(|op| (op, None)),
            (Rung::Restart, _) => plain(self.azure.restart(vm).await),
            (Rung::Redeploy, _) => plain(self.azure.redeploy(vm).await),
            (Rung::StartVm, _) => plain(self.azure.start(vm).await),
            (Rung::ResetPassword, _) => self.reset_password(subject, vm, now).await,
            (Rung::RepairNsg, _) => self.repair_nsg(subject, vm).await,
            (rung, None) => Err(CallError::Refused(format!(
                "{rung} needs a targeted repair and none was chosen"
            ))),
        }
    }

    /// What the spec lets a repair's plan include; the listener's port is the one the VM is
    /// probed on, as the VM sees it.
    pub(super) fn plan_options(&self, subject: &Subject<'_>) -> crate::guest::changes::Options {
        let policy = &subject.spec.ladder;
        crate::guest::changes::Options {
            insecure_listener: policy.allow_insecure_listener_settings,
            legacy_tls: policy.allow_legacy_tls,
            // Restoring the port is decided only when the listener's port is known.
            rdp_port: self
                .vantage(subject)
                .listener_port
                .unwrap_or(crate::probe::DEFAULT_RDP_PORT),
        }
    }

    pub(super) fn vantage(&self, subject: &Subject<'_>) -> Vantage {
        Vantage {
            source: self.probe_source,
            port: self.vm_rdp_port.unwrap_or(subject.spec.port),
            listener_port: crate::engine::gather::listener_port(self.vm_rdp_port, subject.spec),
        }
    }

    pub(super) fn secret_ref(subject: &Subject<'_>) -> Option<SecretRef> {
        let p = subject.spec.ladder.password_reset.as_ref()?;
        let namespace = subject.key.split_once('/').map_or("default", |(ns, _)| ns);
        Some(SecretRef {
            namespace: namespace.to_string(),
            name: p.secret_name.clone(),
        })
    }

    /// Why a password reset is refused before any call (nothing to snapshot for, nothing
    /// sent), if it is.
    fn password_refusal(&self, subject: &Subject<'_>) -> Option<&'static str> {
        if subject.spec.ladder.password_reset.is_none() {
            Some("ResetPassword needs remediation.passwordReset")
        } else if self.secrets.is_none() {
            Some(
                "this operator has no access to Secrets, so it cannot store a new password; nothing was sent to Azure",
            )
        } else {
            None
        }
    }

    /// Generates a password, stores it in the Secret as pending, then asks VMAccess to set
    /// it. Nothing is sent to Azure unless the Secret holds the password first.
    pub(super) async fn reset_password(
        &self,
        subject: &Subject<'_>,
        vm: &VmRef,
        now: Timestamp,
    ) -> Result<(Operation, Option<String>), CallError> {
        if let Some(why) = self.password_refusal(subject) {
            return Err(CallError::Refused(why.into()));
        }
        let (Some(spec), Some(at), Some(store)) = (
            subject.spec.ladder.password_reset.as_ref(),
            Self::secret_ref(subject),
            &self.secrets,
        ) else {
            return Err(CallError::Refused(
                "ResetPassword needs remediation.passwordReset".into(),
            ));
        };
        let password = generate_password().map_err(|e| {
            CallError::Refused(format!(
                "no random source for the password ({e}); nothing was sent to Azure"
            ))
        })?;
        store
            .stage(&at, &spec.username, &password, now)
            .await
            .map_err(|e| {
                CallError::Refused(format!(
                    "could not store the new password ({e}); nothing was sent to Azure"
                ))
            })?;
        match self
            .azure
            .reset_password(vm, &spec.username, &password)
            .await
        {
            Ok(op) => Ok((op, None)),
            Err(e @ AzureError::OutcomeUnknown { .. }) => {
                // The VM may have the new password: it stays in the Secret (pending, then
                // unconfirmed) until a later reset is confirmed.
                Err(CallError::Azure(e))
            }
            Err(e) => {
                // Azure refused outright: the pending password was never set.
                if let Err(d) = store.discard(&at).await {
                    tracing::warn!(secret = %at, error = %d, "could not drop the pending password");
                }
                Err(CallError::Azure(e))
            }
        }
    }

    /// Records the outcome of a password reset in its Secret (never the password itself in
    /// anything but the Secret).
    pub(super) async fn password_outcome(
        &self,
        subject: &Subject<'_>,
        applied: bool,
        events: &mut Vec<Event>,
        now: Timestamp,
    ) {
        let (Some(store), Some(at)) = (&self.secrets, Self::secret_ref(subject)) else {
            return;
        };
        let result = if applied {
            store.commit(&at, now).await
        } else {
            store.discard(&at).await
        };
        match result {
            Ok(()) if applied => events.push(Event {
                severity: Severity::Normal,
                reason: "PasswordStored",
                note: format!(
                    "the new password of the reset account is in Secret {} under key password",
                    at.name
                ),
            }),
            Ok(()) => {}
            Err(e) => events.push(Event {
                severity: Severity::Warning,
                reason: "PasswordStateNotRecorded",
                note: format!(
                    "could not record the reset's outcome in Secret {} ({e}); the password sent to Azure is under key pendingPassword",
                    at.name
                ),
            }),
        }
    }

    /// Adds an allow rule for the allowed prefixes to every NSG level that denies the
    /// prober, after re-reading the rules (see [`crate::ladder::nsg_repair`]).
    pub(super) async fn repair_nsg(
        &self,
        subject: &Subject<'_>,
        vm: &VmRef,
    ) -> Result<(Operation, Option<String>), CallError> {
        use crate::{evidence::nsg::NetworkContext, ladder::nsg_repair};
        let rules = self
            .azure
            .network_rules(vm)
            .await
            .map_err(CallError::Azure)?;
        let vantage = self.vantage(subject);
        let (flow, subnet, nic) = crate::engine::gather::probe_flow(&rules, vantage)
            .ok_or_else(|| CallError::Refused("the VM's NIC has no private address".into()))?;
        let private = flow.destination;
        let prefixes = &subject.spec.ladder.nsg_allowed_prefixes;
        let plan = nsg_repair::plan(
            &flow,
            subnet.as_ref(),
            nic.as_ref(),
            &NetworkContext::private_ranges(),
            prefixes,
            &vm.name,
        )
        .map_err(|e| CallError::Refused(format!("NSG not changed: {e}")))?;
        let mut last = None;
        let mut written = Vec::new();
        for rule in &plan {
            let op = self
                .azure
                .put_allow_rule(
                    vm,
                    &AllowRule {
                        nsg_id: rule.nsg.clone(),
                        name: rule.name.clone(),
                        priority: i32::try_from(rule.priority).unwrap_or(4096),
                        source_prefixes: prefixes.clone(),
                        destination_prefix: private.to_string(),
                        port: vantage.port,
                        description: nsg_repair::description(),
                    },
                )
                .await
                .map_err(CallError::Azure)?;
            written.push(format!(
                "{} at priority {} in NSG {} (outranks {})",
                rule.name, rule.priority, rule.nsg, rule.outranks
            ));
            last = Some(op);
        }
        let op = last.ok_or_else(|| CallError::Refused("no NSG rule to write".into()))?;
        Ok((
            op,
            Some(format!(
                "allowed RDP to {private}:{} from {} only: {}",
                vantage.port,
                prefixes.join(", "),
                written.join("; ")
            )),
        ))
    }
}

/// The script lines of a repair: the applier with the repair's declared changes (settings
/// that weaken security only as the spec allows).
pub fn repair_script(repair: GuestRepair, options: &crate::guest::changes::Options) -> Vec<String> {
    crate::guest::script::script(repair, options)
}

/// What the applier reported, for the rung.
pub(super) struct ScriptResult {
    /// The rung's message; `Err` when the rung failed.
    pub verdict: Result<String, String>,
    /// Whether the VM must restart for the changes to take effect.
    pub restart: Restart,
    /// Where the previous MachineKeys ACL was saved, if it was reset (also when a later
    /// change failed).
    pub acl_backup: Option<String>,
}

/// Parses the applier's standard output.
pub(super) fn script_result(stdout: &str) -> ScriptResult {
    let report = crate::guest::report::parse(stdout);
    let restart = match report.outcome {
        crate::guest::report::Outcome::Ok { restart } => restart,
        _ => Restart::None,
    };
    ScriptResult {
        verdict: report.verdict(),
        restart,
        acl_backup: report.acl_backup().map(str::to_owned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consent_adds_the_weakening_settings_only_with_consent() {
        use crate::guest::changes::Options;
        let safe = repair_script(GuestRepair::ListenerKeepAlive, &Options::SAFE).join("\n");
        assert!(!safe.contains("'SecurityLayer'"));
        let consent = Options {
            insecure_listener: true,
            ..Options::SAFE
        };
        let consented = repair_script(GuestRepair::ListenerKeepAlive, &consent).join("\n");
        assert!(consented.contains("Name = 'SecurityLayer'; Type = 'DWord'; Value = 0"));
    }
}
