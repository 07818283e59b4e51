//! Long-running operations: starting one (its duration and `Retry-After` drawn from the
//! timing profile), finishing it later, the guest's boot after one that restarted the VM, and
//! the status and result URLs the client polls.

use std::{sync::Arc, time::Duration};

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{conflict, error, json_response, now, retry_headers, set_header};
use crate::sim::{
    Shared,
    scenario::OpKind,
    world::{Op, OpStatus, World},
};

/// A started operation: its id, URLs, how long it runs and the `Retry-After` it suggests.
pub(super) struct NewOp {
    pub(super) id: String,
    pub(super) aao: String,
    pub(super) location: String,
    pub(super) after: Duration,
    pub(super) retry: Duration,
}

/// Starts an operation of `kind` on `resource` (its durations drawn from the timing profile).
pub(super) fn start_op(
    s: &Shared,
    w: &mut World,
    provider: &'static str,
    (sub, location): (&str, &str),
    (kind, resource): (OpKind, &str),
) -> NewOp {
    let id = w.new_id();
    let after = w.next_duration(kind, resource);
    let retry = w.next_retry_after(resource);
    w.ops.insert(
        id.clone(),
        Op {
            id: id.clone(),
            provider,
            sub: sub.to_owned(),
            location: location.to_owned(),
            status: OpStatus::InProgress,
            error: None,
            result: None,
            started: now(),
            retry_after: retry,
        },
    );
    let ver = if provider == "Microsoft.Compute" {
        "2024-07-01"
    } else {
        "2024-03-01"
    };
    let base = format!(
        "{}/subscriptions/{sub}/providers/{provider}/locations/{location}",
        s.base_url
    );
    NewOp {
        aao: format!("{base}/operations/{id}?api-version={ver}"),
        location: format!("{base}/operationResults/{id}?api-version={ver}"),
        id,
        after,
        retry,
    }
}

/// The guest of VM `key` boots after an operation that restarted it and that Azure reports
/// done: the VM agent is Not Ready and RDP refuses until the boot (drawn from the timing
/// profile; none in the fast profile by default) is over. A newer reboot takes over.
pub(super) fn boot_guest(s: &Arc<Shared>, w: &mut World, key: &str) {
    let boot = w.next_duration(OpKind::GuestBoot, key);
    let Some(v) = w.vms.get_mut(key) else {
        return;
    };
    v.boot += 1;
    crate::sim::guest::boot(v);
    v.rebooting = !boot.is_zero();
    if boot.is_zero() {
        return;
    }
    let generation = v.boot;
    let s = s.clone();
    let key = key.to_owned();
    tokio::spawn(async move {
        tokio::time::sleep(boot).await;
        {
            let mut w = s.lock();
            match w.vms.get_mut(&key) {
                Some(v) if v.boot == generation => v.rebooting = false,
                _ => return,
            }
        }
        s.notify();
    });
}

pub(super) fn accepted(
    aao: &str,
    location: Option<&str>,
    retry: Duration,
    status: StatusCode,
    body: Option<Value>,
) -> Response {
    let mut rsp = match body {
        Some(b) => json_response(status, &b),
        None => status.into_response(),
    };
    set_header(&mut rsp, "azure-asyncoperation", aao);
    if let Some(l) = location {
        set_header(&mut rsp, "location", l);
    }
    retry_headers(&mut rsp, retry);
    rsp
}

/// The 202 of an action (Compute POSTs, IP flow verify): both URLs and the operation's
/// `Retry-After`, no body.
pub(super) fn accepted_action(op: &NewOp) -> Response {
    accepted(
        &op.aao,
        Some(&op.location),
        op.retry,
        StatusCode::ACCEPTED,
        None,
    )
}

/// Finishes operation `id` after `after`, applying `effect` to the world first.
pub(super) fn finish_later<F>(s: &Arc<Shared>, id: String, after: Duration, effect: F)
where
    F: FnOnce(&mut World) -> Result<Option<Value>, (String, String)> + Send + 'static,
{
    let s = s.clone();
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        let outcome = {
            let mut w = s.lock();
            // A preempted operation never takes effect: the newer one owns the resource.
            if w.ops
                .get(&id)
                .is_some_and(|o| o.status == OpStatus::Canceled)
            {
                return;
            }
            effect(&mut w)
        };
        // The responders reach their new state before anyone can see the operation end.
        s.notify();
        s.settled().await;
        let mut w = s.lock();
        if let Some(op) = w.ops.get_mut(&id) {
            match outcome {
                Ok(result) => {
                    op.status = OpStatus::Succeeded;
                    op.result = result;
                }
                Err(e) => {
                    op.status = OpStatus::Failed;
                    op.error = Some(e);
                }
            }
        }
    });
}

pub(super) fn operation(
    s: &Shared,
    sub: &str,
    provider: &str,
    id: &str,
    monitor: bool,
) -> Response {
    let w = s.lock();
    let Some(op) = w
        .ops
        .get(id)
        .filter(|o| o.sub.eq_ignore_ascii_case(sub) && o.provider.eq_ignore_ascii_case(provider))
    else {
        return error(
            StatusCode::NOT_FOUND,
            "OperationNotFound",
            &format!("operation {id} not found"),
        );
    };
    let retry = op.retry_after;
    if monitor {
        return match op.status {
            OpStatus::InProgress => {
                let mut rsp = StatusCode::ACCEPTED.into_response();
                retry_headers(&mut rsp, retry);
                rsp
            }
            OpStatus::Succeeded => match &op.result {
                Some(r) => json_response(StatusCode::OK, r),
                None => StatusCode::NO_CONTENT.into_response(),
            },
            OpStatus::Failed | OpStatus::Canceled => {
                let (code, message) = op.error.clone().unwrap_or_default();
                conflict(&code, &message)
            }
        };
    }
    let mut body = json!({ "name": op.id, "startTime": op.started });
    match op.status {
        OpStatus::InProgress => body["status"] = json!("InProgress"),
        OpStatus::Succeeded => {
            body["status"] = json!("Succeeded");
            body["endTime"] = json!(now());
            if let Some(r) = &op.result {
                body["properties"] = json!({ "output": r });
            }
        }
        OpStatus::Failed | OpStatus::Canceled => {
            let (code, message) = op.error.clone().unwrap_or_default();
            body["status"] = json!(if op.status == OpStatus::Failed {
                "Failed"
            } else {
                "Canceled"
            });
            body["endTime"] = json!(now());
            body["error"] = json!({ "code": code, "message": message });
        }
    }
    let mut rsp = json_response(StatusCode::OK, &body);
    if op.status == OpStatus::InProgress {
        retry_headers(&mut rsp, retry);
    }
    rsp
}
