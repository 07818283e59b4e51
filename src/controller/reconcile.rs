//! One object through the engine: schedule, probe, evaluate, remediate, write.

use super::*;
use super::{
    memory::{Remembered, continued, memory_id},
    status::{StatusWriter, publish, report_malformed},
    tenancy::Tenancy,
};

/// Reconciles one object: schedule → (resolve, probe) → evaluate → status, metrics, events.
/// The controller's runner (see [`super::runner`]) hands it the object as the cache holds it
/// when its turn comes.
pub async fn reconcile(
    guard: Arc<DeserializeGuard<RdpHealth>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer();
    let obj = match &guard.0 {
        Ok(obj) => obj,
        Err(invalid) => {
            Box::pin(report_malformed(&ctx, invalid)).await;
            return Err(Error::Malformed(Box::new(invalid.clone())));
        }
    };
    let key = key_of(&obj.metadata).ok_or(Error::MissingKey)?;
    let span = info_span!("reconcile", namespace = %key.namespace, name = %key.name, vm = %obj.spec.vm.resource_id);
    Box::pin(reconcile_object(obj, &key, &ctx).instrument(span)).await
}

/// How long ago the object's probe fell due (zero when it is not overdue, or not on a timer):
/// where it queues, so that of the objects waiting for reconcilers the one due first goes
/// first, and after a restart the objects probed longest ago go first.
pub(super) fn overdue(ctx: &Context, guard: &DeserializeGuard<RdpHealth>) -> Duration {
    let Ok(obj) = &guard.0 else {
        return Duration::ZERO;
    };
    let probed_at = memory_id(&obj.metadata)
        .and_then(|id| ctx.memory.get(&id))
        .and_then(|r| r.probed_at);
    engine::probe_due_at(obj, probed_at)
        .and_then(|due| Duration::try_from(Timestamp::now().duration_since(due)).ok())
        .unwrap_or(Duration::ZERO)
}

pub(super) async fn reconcile_object(
    stored: &RdpHealth,
    key: &ObjectKey,
    ctx: &Context,
) -> Result<Action, Error> {
    let now = Timestamp::now();
    // With shards, the Lease of this object's shard; without, this replica's leadership.
    let leadership = ctx
        .leadership
        .for_object(stored.metadata.uid.as_deref().unwrap_or(&key.name));
    let leader = leadership.is_leader();
    let id = memory_id(&stored.metadata).ok_or(Error::MissingKey)?;
    if ctx.leadership.shards().is_some() && !leader {
        return Ok(skip_unheld_shard(ctx, key, &id));
    }
    let remembered = ctx.memory.get(&id);
    let last_probed = remembered.as_ref().and_then(|r| r.probed_at);
    // From here on `obj` may carry a newer status than the API server has: see `continued`.
    let newer = continued(stored, remembered.as_deref());
    let obj = newer.as_deref().unwrap_or(stored);
    let acting = match ctx.tenancy_of(obj, key) {
        Tenancy::Act(None) => None,
        Tenancy::Act(Some(identity)) => match ctx.acting_as(&identity) {
            Ok(side) => Some(side),
            Err(why) => return refuse_by_policy(stored, obj, key, ctx, why, now, leader).await,
        },
        Tenancy::Refuse(why) => {
            return refuse_by_policy(stored, obj, key, ctx, why, now, leader).await;
        }
        Tenancy::Wait => {
            debug!("the namespace's labels are not known yet: waiting");
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
    };
    // The operator's own identity, or the one the tenancy policy names for the namespace.
    let (resolver, remediator) = match &acting {
        Some(side) => (&*side.resolver, side.remediator.as_ref()),
        None => (&*ctx.seams.resolver, ctx.remediator.as_ref()),
    };
    // Every intent write and Azure write asks the object's own shard (with shards).
    let scoped = remediator.map(|r| Remediator {
        leadership: Arc::new(leadership.clone()),
        ..r.clone()
    });
    let remediator = scoped.as_ref();
    let spec = ValidSpec::try_from(&obj.spec).ok().filter(|s| !s.suspend);
    let due = match (remediator, &spec, &obj.status) {
        (Some(_), Some(spec), Some(status)) if leader => engine::ladder_due(status, spec)
            .map(|t| Duration::try_from(t.duration_since(now)).unwrap_or(Duration::ZERO)),
        _ => None,
    };
    let (observation, next_probe) = match engine::schedule(obj, last_probed, now) {
        Schedule::Wait(left) => match due {
            Some(d) if d.is_zero() => (Observation::NotProbed, Some(left)),
            other => {
                let wait = other.map_or(left, |d| d.min(left));
                debug!(wait_ms = wait.as_millis() as u64, "no probe due");
                ctx.failures().remove(key);
                return Ok(Action::requeue(wait));
            }
        },
        Schedule::AwaitChange => match due {
            Some(d) if d.is_zero() => (Observation::NotProbed, None),
            Some(d) => return Ok(Action::requeue(d)),
            None => return Ok(Action::await_change()),
        },
        Schedule::Report => (Observation::NotProbed, None),
        Schedule::Probe(spec) => (
            ctx.observe(resolver, &spec, obj.status.as_ref(), now).await,
            None,
        ),
    };
    // A probe that failed on the prober's side says nothing about the VM: no rung on it.
    let blind =
        matches!(&observation, Observation::Probed { report, .. } if report.prober_failed());
    let probed = match &observation {
        Observation::Probed { report, .. } if !blind => {
            Some((report.reachable, report.failure.clone()))
        }
        _ => None,
    };
    let probed_at = if probed.is_some() {
        Some(now)
    } else {
        last_probed
    };
    // Without a probe in this reconcile, the ladder reasons from the last one.
    let failure = match &probed {
        Some((_, failure)) => failure.clone(),
        None => last_failure(obj.status.as_ref()),
    };
    let mut outcome = engine::evaluate(obj, observation, now);
    if let Some(left) = next_probe {
        // A look for the ladder only: the next probe stays where it was.
        outcome.next = Next::Requeue(left);
    }
    // Counted before the ladder reads the fleet view: the cache lags behind this status.
    ctx.count_in_fleet(leader, obj, &outcome.status);
    if !leader {
        // Only the Lease holder writes status and Events: a stale write from a standby
        // replica could erase the intent of a rung in flight. Standbys probe for their metrics.
        ctx.metrics.object_status(key, &outcome.status);
        ctx.memory
            .remember(id, Remembered::of(probed_at, &outcome.status));
        return Ok(action(outcome.next));
    }
    let probe_events = outcome.events.len();
    let writer = StatusWriter::new(&ctx.client, key, stored);
    let before = obj
        .status
        .as_ref()
        .map(|s| s.ladder.clone())
        .unwrap_or_default();
    let stage = match (remediator, &spec) {
        (Some(remediator), Some(spec)) if !blind => {
            let approval = approval(obj, &outcome.status);
            let group = crate::fleet::incident::claim_group(obj);
            let subject = Subject {
                key: &format!("{}/{}", key.namespace, key.name),
                seed: obj.metadata.uid.as_deref().unwrap_or(&key.name),
                spec,
                failure: failure.as_ref(),
                probed: probed.as_ref().map(|(ok, _)| *ok),
                leader,
                paused: annotation(obj, PAUSE_ANNOTATION) == Some("true"),
                approval,
                group: group.as_ref(),
            };
            let result = remediator
                .remediate(&subject, &mut outcome, &writer, now)
                .await;
            if address_may_have_changed(&before, &outcome.status.ladder) {
                resolver.forget(spec);
            }
            Some(result)
        }
        (None, Some(spec)) => {
            azure_missing(&mut outcome.status, spec, now);
            None
        }
        _ => None,
    };
    // Only news is written (and a heartbeat): a healthy, unchanged object costs no write and
    // so no watch event either. Compared with what the API server holds, not with `obj`.
    if ctx.leadership.shards().is_some() {
        outcome.status.observed_by.clone_from(&ctx.instance);
    }
    if writes::needs_write(stored.status.as_ref(), &outcome.status, ctx.heartbeat) {
        if !leadership.is_leader() {
            // The lease was lost during this reconcile: the next leader writes.
            ctx.memory.forget(&id);
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
        if let Err(e) = writer.write(&outcome.status).await {
            // Start again from the stored status: the retry probes and writes afresh.
            ctx.memory.forget(&id);
            return Err(e);
        }
    }
    // A rung the ladder started or ended counts at once, before its watch event comes back.
    ctx.count_in_fleet(leader, obj, &outcome.status);
    ctx.metrics.object_status(key, &outcome.status);
    ctx.metrics
        .count_remediations(&before, &outcome.status.ladder, now);
    publish(ctx, obj, &outcome.events, probe_events).await;
    ctx.memory
        .remember(id, Remembered::of(probed_at, &outcome.status));
    if let Some(Err(e)) = stage {
        return Err(Error::Remediate(e));
    }
    ctx.failures().remove(key);
    debug!(phase = ?outcome.status.phase, next = ?outcome.next, "reconciled");
    Ok(action(outcome.next))
}

/// How long an object of a shard this replica does not hold waits before it is looked at
/// again; a shard newly held reconciles all objects at once, so this is only a fallback.
const UNHELD_RECHECK: Duration = Duration::from_secs(60);

/// An object whose shard this replica does not hold: no probe, no status write, no call. What
/// this replica remembered of it, its per-object series and its claim here go: the shard's
/// holder acts for it now (a rung in flight still counts in the fleet view through its stored
/// status).
fn skip_unheld_shard(ctx: &Context, key: &ObjectKey, id: &str) -> Action {
    ctx.memory.forget(id);
    ctx.failures().remove(key);
    ctx.metrics.forget_object(key);
    if let Some(r) = &ctx.remediator {
        let claimant = format!("{}/{}", key.namespace, key.name);
        r.fleet.retain_claims(|k| k != claimant);
    }
    Action::requeue(UNHELD_RECHECK)
}

/// An object the tenancy policy refuses (a VM outside its namespace's scopes, a namespace
/// without a grant, an identity that cannot be used): `Valid=False`, no probe, no Azure call;
/// it waits for a change of the object or of its namespace's labels.
async fn refuse_by_policy(
    stored: &RdpHealth,
    obj: &RdpHealth,
    key: &ObjectKey,
    ctx: &Context,
    why: String,
    now: Timestamp,
    leader: bool,
) -> Result<Action, Error> {
    let outcome = engine::refuse(obj, why, now);
    if !leader {
        return Ok(Action::await_change());
    }
    if writes::needs_write(stored.status.as_ref(), &outcome.status, ctx.heartbeat) {
        StatusWriter::new(&ctx.client, key, stored)
            .write(&outcome.status)
            .await?;
    }
    ctx.metrics.object_status(key, &outcome.status);
    publish(ctx, obj, &outcome.events, outcome.events.len()).await;
    Ok(Action::await_change())
}

/// The failure of the last probe, as recorded in status.
pub(super) fn last_failure(status: Option<&RdpHealthStatus>) -> Option<Failure> {
    let last = status?.last_probe.as_ref()?;
    let name = last.failure_reason.as_deref()?;
    let reason = FailureReason::ALL
        .into_iter()
        .find(|r| r.as_str() == name)?;
    Some(Failure::new(
        reason,
        last.message.clone().unwrap_or_default(),
    ))
}

pub(super) fn action(next: Next) -> Action {
    match next {
        Next::Requeue(after) => Action::requeue(after),
        Next::AwaitChange => Action::await_change(),
    }
}

pub(super) fn annotation<'a>(obj: &'a RdpHealth, name: &str) -> Option<&'a str> {
    obj.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(name))
        .map(|v| v.trim())
}

/// The approval annotation, unless its value was used already: `<Rung>[/<token>]`.
pub(super) fn approval(obj: &RdpHealth, status: &RdpHealthStatus) -> Option<(String, Rung)> {
    let value = annotation(obj, APPROVE_ANNOTATION)?;
    if status.ladder.consumed_approval.as_deref() == Some(value) {
        return None;
    }
    let name = value.split('/').next().unwrap_or_default();
    let rung = Rung::ALL.into_iter().find(|r| r.as_str() == name)?;
    Some((value.to_string(), rung))
}

/// A NIC reset or redeploy finished (or was judged): the VM may have new addresses.
pub(super) fn address_may_have_changed(before: &LadderStatus, after: &LadderStatus) -> bool {
    let settling = |l: &LadderStatus| {
        l.current
            .as_ref()
            .filter(|c| c.step.rung.may_change_address() && c.phase == ExecutionPhase::Settling)
            .map(|c| c.started_at.clone())
    };
    let last_before = before.history.last().map(|r| r.finished_at.0);
    let finished = after
        .history
        .iter()
        .filter(|r| last_before.is_none_or(|t| r.finished_at.0 > t))
        .any(|r| r.step.rung.may_change_address());
    finished || (settling(after).is_some() && settling(after) != settling(before))
}

/// Objects that need Azure (no host override, or a remediation mode) say that it is missing.
pub(super) fn azure_missing(status: &mut RdpHealthStatus, spec: &ValidSpec, now: Timestamp) {
    let mode = spec.mode;
    if spec.host.is_some() && mode == RemediationMode::Observe {
        return;
    }
    conditions::merge(
        &mut status.conditions,
        Desired::new(
            types::REMEDIATING,
            Status::False,
            "AzureNotConfigured",
            "the operator runs without Azure credentials: it only probes; evidence and remediation are off",
        ),
        status.observed_generation,
        now,
    );
}

/// Decides how to retry after an error: permanent errors wait for a change; others back off
/// exponentially per object.
pub fn error_policy(
    guard: Arc<DeserializeGuard<RdpHealth>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics.reconcile_failed(error.reason());
    let meta = meta_of(&guard);
    let name = meta.name.as_deref().unwrap_or_default();
    let namespace = meta.namespace.as_deref().unwrap_or_default();
    if error.is_permanent() {
        warn!(%namespace, %name, reason = error.reason(), error = %error, "waiting for the object to change");
        return Action::await_change();
    }
    if let Some(after) = error.retry_after() {
        warn!(%namespace, %name, reason = error.reason(), error = %error, retry_ms = after.as_millis() as u64, "Azure asked to wait");
        return Action::requeue(after.max(Duration::from_secs(1)));
    }
    let attempt = key_of(meta).map_or(1, |key| ctx.failed_again(key));
    let delay = backoff_delay(attempt);
    warn!(%namespace, %name, reason = error.reason(), error = %error, attempt, retry_ms = delay.as_millis() as u64, "reconcile failed");
    Action::requeue(delay)
}
