//! `Microsoft.Compute/snapshots` (api-version 2024-03-02, the "Snapshots - Create Or Update"
//! REST reference and its examples): PUT (a long-running operation
//! with `Azure-AsyncOperation` and `Location`, like the VM actions), GET, DELETE and the list
//! of a resource group. Only `createOption: Copy` of a simulated VM's OS disk is accepted;
//! a VM with the `snapshot_fails` fault makes the operation end `Failed`.

use std::{collections::BTreeMap, sync::Arc};

use axum::{http::StatusCode, response::Response};
use serde_json::{Value, json};

use super::{Call, accepted, error, finish_later, json_response, not_found, now, start_op};
use crate::sim::timing::OpKind;
use crate::sim::{
    Shared,
    disk::{Snapshot, os_disk_id},
    fault::Fault,
    world::key,
};

/// Azure refuses these in tag names ("Use tags to organize your Azure resources" doc).
const TAG_NAME_FORBIDDEN: [char; 7] = ['<', '>', '%', '&', '\\', '?', '/'];

pub(super) fn snapshot_route(call: Call<'_>, name: Option<&str>) -> Response {
    let Call {
        s,
        method,
        sub,
        rg,
        body,
        ..
    } = call;
    match (method.as_str(), name) {
        ("GET", None) => {
            let w = s.lock();
            let value: Vec<Value> = w
                .snapshots
                .values()
                .filter(|x| x.sub.eq_ignore_ascii_case(sub) && x.rg.eq_ignore_ascii_case(rg))
                .map(Snapshot::json)
                .collect();
            json_response(StatusCode::OK, &json!({ "value": value }))
        }
        ("GET", Some(n)) => match s.lock().snapshots.get(&key(sub, rg, n)) {
            Some(x) => json_response(StatusCode::OK, &x.json()),
            None => not_found("Microsoft.Compute/snapshots", n, rg),
        },
        ("PUT", Some(n)) => put(s, sub, rg, n, body),
        ("DELETE", Some(n)) => delete(s, sub, rg, n),
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "HttpMethodNotAllowed",
            "unsupported operation on snapshots",
        ),
    }
}

fn valid_name(n: &str) -> bool {
    (1..=80).contains(&n.len())
        && n.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

fn put(s: &Arc<Shared>, sub: &str, rg: &str, name: &str, body: &[u8]) -> Response {
    if !valid_name(name) {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidResourceName",
            &format!(
                "The resource name '{name}' is invalid. Supported characters are a-z, A-Z, 0-9, _ and -; at most 80 characters."
            ),
        );
    }
    let Ok(b) = serde_json::from_slice::<Value>(body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContent",
            "The request content was invalid and could not be deserialized.",
        );
    };
    let Some(location) = b
        .get("location")
        .and_then(Value::as_str)
        .filter(|l| !l.is_empty())
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "LocationRequired",
            "The location property is required for this definition.",
        );
    };
    let tags: BTreeMap<String, String> = b
        .get("tags")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    if let Some(bad) = tags.keys().find(|k| k.contains(TAG_NAME_FORBIDDEN)) {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidTagNameCharacters",
            &format!(
                "The tag names '{bad}' have reserved characters '<,>,%,&,\\,?,/' or control characters."
            ),
        );
    }
    let creation = &b["properties"]["creationData"];
    if creation.get("createOption").and_then(Value::as_str) != Some("Copy") {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidParameter",
            "Only snapshots with createOption Copy of a managed disk are simulated.",
        );
    }
    let source = creation
        .get("sourceResourceId")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let mut w = s.lock();
    let Some(vm) = w
        .vms
        .values()
        .find(|v| os_disk_id(v).eq_ignore_ascii_case(&source))
        .cloned()
    else {
        let disk = source.rsplit('/').next().unwrap_or_default();
        return not_found("Microsoft.Compute/disks", disk, rg);
    };
    let snap = Snapshot {
        sub: sub.to_owned(),
        rg: rg.to_owned(),
        name: name.to_owned(),
        location: location.to_owned(),
        tags,
        source,
        time_created: now(),
        provisioning_state: "Updating".to_owned(),
        incremental: b["properties"]["incremental"].as_bool().unwrap_or(false),
    };
    let rsp_body = snap.json();
    let k = key(sub, rg, name);
    let created = !w.snapshots.contains_key(&k);
    w.snapshots.insert(k.clone(), snap);
    let op = start_op(
        s,
        &mut w,
        "Microsoft.Compute",
        (sub, location),
        (OpKind::Snapshot, &k),
    );
    let vm_key = vm.name.to_ascii_lowercase();
    drop(w);
    finish_later(s, op.id.clone(), op.after, move |w| {
        let fails = w
            .vms
            .get(&vm_key)
            .is_some_and(|v| v.faults.contains(&Fault::SnapshotFails));
        if fails {
            w.snapshots.remove(&k);
            return Err((
                "InternalDiskManagementError".to_owned(),
                "An internal disk management error occurred while creating the snapshot."
                    .to_owned(),
            ));
        }
        match w.snapshots.get_mut(&k) {
            Some(x) => {
                x.provisioning_state = "Succeeded".to_owned();
                Ok(Some(x.json()))
            }
            None => Err(("NotFound".into(), "the snapshot was deleted".into())),
        }
    });
    let status = if created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    accepted(
        &op.aao,
        Some(&op.location),
        op.retry,
        status,
        Some(rsp_body),
    )
}

fn delete(s: &Arc<Shared>, sub: &str, rg: &str, name: &str) -> Response {
    let mut w = s.lock();
    let Some(snap) = w.snapshots.remove(&key(sub, rg, name)) else {
        // Deleting what is not there succeeds with nothing to do.
        return StatusCode::NO_CONTENT.into_response();
    };
    let op = start_op(
        s,
        &mut w,
        "Microsoft.Compute",
        (sub, &snap.location),
        (OpKind::Snapshot, &key(sub, rg, name)),
    );
    drop(w);
    finish_later(s, op.id.clone(), op.after, |_| Ok(None));
    accepted(
        &op.aao,
        Some(&op.location),
        op.retry,
        StatusCode::ACCEPTED,
        None,
    )
}

use axum::response::IntoResponse;
