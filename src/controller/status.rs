//! Writing what a reconcile decided: the status (server-side apply) and Events.

use super::*;

/// Writes one object's status with optimistic concurrency: every write names the
/// `resourceVersion` of the object the reconcile's decisions were taken on (then the one its
/// own last write produced), so a decision taken on a stale copy (an informer cache behind
/// the API server, another replica's write) fails with a conflict instead of overwriting a
/// newer status — above all a stored intent — and is taken again on fresh data.
///
/// A conflict caused by a change outside the status (a GitOps apply of the spec, an
/// annotation) is not a reason to lose the write: when the server's status is still exactly
/// the one the decision started from, the write is made again on the new version.
pub(super) struct StatusWriter<'a> {
    client: &'a Client,
    key: &'a ObjectKey,
    base: std::sync::Mutex<Base>,
}

/// What the next write is based on.
struct Base {
    resource_version: Option<String>,
    status: Option<RdpHealthStatus>,
}

impl<'a> StatusWriter<'a> {
    /// A writer for `stored`, the object as the API server (or its cache) gave it.
    pub(super) fn new(client: &'a Client, key: &'a ObjectKey, stored: &RdpHealth) -> Self {
        Self {
            client,
            key,
            base: std::sync::Mutex::new(Base {
                resource_version: stored.metadata.resource_version.clone(),
                status: stored.status.clone(),
            }),
        }
    }

    fn base(&self) -> std::sync::MutexGuard<'_, Base> {
        self.base.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes `status` unless the object's status changed since it was read.
    pub(super) async fn write(&self, status: &RdpHealthStatus) -> Result<(), Error> {
        let api: Api<RdpHealth> = Api::namespaced(self.client.clone(), &self.key.namespace);
        let rv = self.base().resource_version.clone();
        let written = match apply_status(&api, &self.key.name, status, rv.as_deref()).await {
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let fresh = api
                    .get_status(&self.key.name)
                    .await
                    .map_err(Error::PatchStatus)?;
                if fresh.status != self.base().status {
                    return Err(Error::PatchStatus(kube::Error::Api(e)));
                }
                let rv = fresh.metadata.resource_version;
                apply_status(&api, &self.key.name, status, rv.as_deref()).await
            }
            other => other,
        }
        .map_err(Error::PatchStatus)?;
        let mut base = self.base();
        base.resource_version = written.metadata.resource_version;
        base.status = Some(status.clone());
        Ok(())
    }
}

#[async_trait::async_trait]
impl StatusSink for StatusWriter<'_> {
    async fn persist(&self, status: &RdpHealthStatus) -> Result<(), String> {
        self.write(status).await.map_err(|e| match e {
            Error::PatchStatus(kube::Error::Api(a)) if a.code == 409 => format!(
                "the object changed since it was read (conflict): the decision is taken again on fresh data: {}",
                a.message
            ),
            Error::PatchStatus(source) => format!("failed to patch the status: {source}"),
            other => other.to_string(),
        })
    }
}

/// The whole status by server-side apply under [`FIELD_MANAGER`], guarded by
/// `resource_version` when given.
async fn apply_status(
    api: &Api<RdpHealth>,
    name: &str,
    status: &RdpHealthStatus,
    resource_version: Option<&str>,
) -> Result<RdpHealth, kube::Error> {
    let mut body = json!({
        "apiVersion": RdpHealth::api_version(&()),
        "kind": RdpHealth::kind(&()),
        "status": status,
    });
    if let Some(rv) = resource_version {
        body["metadata"] = json!({ "resourceVersion": rv });
    }
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
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
