//! Writing what a reconcile decided: the status (server-side apply) and Events.

use super::*;

/// Writes the intent of a rung before its Azure call.
pub(super) struct ApplyStatus<'a> {
    pub(super) client: &'a Client,
    pub(super) key: &'a ObjectKey,
}

#[async_trait::async_trait]
impl StatusSink for ApplyStatus<'_> {
    async fn persist(&self, status: &RdpHealthStatus) -> Result<(), String> {
        patch_status(self.client, self.key, status)
            .await
            .map_err(|e| match e {
                Error::PatchStatus(source) => format!("failed to patch the status: {source}"),
                other => other.to_string(),
            })
    }
}

/// Writes the whole status by server-side apply under [`FIELD_MANAGER`].
pub(super) async fn patch_status(
    client: &Client,
    key: &ObjectKey,
    status: &RdpHealthStatus,
) -> Result<(), Error> {
    let api: Api<RdpHealth> = Api::namespaced(client.clone(), &key.namespace);
    let body = json!({
        "apiVersion": RdpHealth::api_version(&()),
        "kind": RdpHealth::kind(&()),
        "status": status,
    });
    api.patch_status(
        &key.name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(Error::PatchStatus)?;
    Ok(())
}

/// Publishes the engine's events. A lost Event must not undo a status that was written, so
/// failures are logged and counted rather than failing the reconcile.
pub(super) async fn publish(
    ctx: &Context,
    obj: &RdpHealth,
    events: &[engine::Event],
    probe_events: usize,
) {
    let reference = obj.object_ref(&());
    for (i, event) in events.iter().enumerate() {
        let ev = KubeEvent {
            type_: match event.severity {
                Severity::Normal => EventType::Normal,
                Severity::Warning => EventType::Warning,
            },
            reason: event.reason.to_string(),
            note: Some(event.note.clone()),
            action: if i < probe_events {
                "Probe"
            } else {
                "Remediate"
            }
            .into(),
            secondary: None,
        };
        info!(reason = event.reason, note = %event.note, "event");
        if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
            warn!(error = %e, reason = event.reason, "failed to publish event");
            ctx.metrics.reconcile_failed("PublishEventFailed");
        }
    }
}

/// Tells the object's owner, through a Warning Event, why the operator cannot read it. (Its
/// status is left alone: without a readable status, no write could keep transition times.)
pub(super) async fn report_malformed(ctx: &Context, invalid: &InvalidObject) {
    let meta = &invalid.metadata;
    let reference = ObjectReference {
        api_version: Some(RdpHealth::api_version(&()).into_owned()),
        kind: Some(RdpHealth::kind(&()).into_owned()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        ..Default::default()
    };
    let note: String = format!("failed to decode the object: {}", invalid.error)
        .chars()
        .take(1000)
        .collect();
    let event = KubeEvent {
        type_: EventType::Warning,
        reason: "MalformedObject".into(),
        note: Some(note),
        action: "Decode".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &reference).await {
        warn!(error = %e, "failed to publish event");
        ctx.metrics.reconcile_failed("PublishEventFailed");
    }
}
