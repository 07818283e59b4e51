//! Microsoft.Compute: virtual machines, their instance view, VMAccess, Run Command,
//! restart/redeploy/start, boot diagnostics, and Resource Health of a VM.

use std::{sync::Arc, time::Duration};

use axum::{http::StatusCode, response::Response};
use serde_json::{Value, json};

use super::{
    Call, accepted, accepted_action, boot_guest, conflict, error, finish_later, json_response,
    not_found, now, start_op,
};
use crate::sim::{
    Shared,
    fault::Fault,
    scenario::OpKind,
    world::{Extension, OpStatus, Vm, World},
};

pub(super) async fn vm_route(call: Call<'_>, name: &str, rest: &[String]) -> Response {
    let Call {
        s,
        method,
        sub,
        rg,
        query,
        body,
    } = call;
    let exists = s.lock().vm(sub, rg, name).is_some();
    if !exists {
        return not_found("Microsoft.Compute/virtualMachines", name, rg);
    }
    let r: Vec<String> = rest.iter().map(|x| x.to_ascii_lowercase()).collect();
    let r: Vec<&str> = r.iter().map(String::as_str).collect();
    match (method.as_str(), r.as_slice()) {
        ("GET", []) => {
            let w = s.lock();
            let expand = query
                .get("$expand")
                .is_some_and(|v| v.eq_ignore_ascii_case("instanceView"));
            match w.vm(sub, rg, name) {
                Some(vm) => json_response(StatusCode::OK, &vm_json(&w, vm, expand)),
                None => not_found("Microsoft.Compute/virtualMachines", name, rg),
            }
        }
        ("GET", ["instanceview"]) => {
            let w = s.lock();
            match w.vm(sub, rg, name) {
                Some(vm) => json_response(StatusCode::OK, &instance_view(vm)),
                None => not_found("Microsoft.Compute/virtualMachines", name, rg),
            }
        }
        ("GET", ["extensions", ext]) => {
            let w = s.lock();
            match w.vm(sub, rg, name).and_then(|vm| {
                vm.extension
                    .as_ref()
                    .filter(|e| e.name.eq_ignore_ascii_case(ext))
                    .map(|e| extension_json(vm, e))
            }) {
                Some(j) => json_response(StatusCode::OK, &j),
                None => not_found("Microsoft.Compute/virtualMachines/extensions", ext, rg),
            }
        }
        ("PUT", ["extensions", _]) => put_extension(s, sub, rg, name, &rest[1], body),
        ("POST", ["restart"]) => power_action(s, sub, rg, name, Action::Restart).await,
        ("POST", ["redeploy"]) => power_action(s, sub, rg, name, Action::Redeploy).await,
        ("POST", ["start"]) => power_action(s, sub, rg, name, Action::Start).await,
        ("POST", ["runcommand"]) => run_command(s, sub, rg, name, body),
        ("POST", ["retrievebootdiagnosticsdata"]) => boot_diagnostics(s, sub, rg, name),
        (
            "GET",
            [
                "providers",
                "microsoft.resourcehealth",
                "availabilitystatuses",
                "current",
            ],
        ) => {
            let w = s.lock();
            match w.vm(sub, rg, name) {
                Some(vm) => json_response(StatusCode::OK, &health_json(vm)),
                None => not_found("Microsoft.Compute/virtualMachines", name, rg),
            }
        }
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "HttpMethodNotAllowed",
            "unsupported operation on a virtual machine",
        ),
    }
}

fn status(code: &str, display: &str, level: &str, message: Option<&str>) -> Value {
    let mut v = json!({ "code": code, "level": level, "displayStatus": display, "time": now() });
    if let Some(m) = message {
        v["message"] = json!(m);
    }
    v
}

fn instance_view(vm: &Vm) -> Value {
    let power = if !vm.running() {
        status("PowerState/deallocated", "VM deallocated", "Info", None)
    } else {
        status("PowerState/running", "VM running", "Info", None)
    };
    let provisioning = if vm.busy {
        status("ProvisioningState/updating", "Updating", "Info", None)
    } else {
        status(
            "ProvisioningState/succeeded",
            "Provisioning succeeded",
            "Info",
            None,
        )
    };
    let agent = if vm.agent_ready() {
        status(
            "ProvisioningState/succeeded",
            "Ready",
            "Info",
            Some("GuestAgent is running and processing the extensions."),
        )
    } else {
        status(
            "ProvisioningState/Unavailable",
            "Not Ready",
            "Warning",
            Some("VM Agent is unresponsive."),
        )
    };
    // Azure reports the version the agent last sent; with the agent not Ready it says
    // `Unknown` (compute 2024-07-01 `VirtualMachine_Get_InstanceViewAutoPlacedOnDedicatedHostGroup.json`
    // and the VM agent troubleshooting guide).
    let agent_version = if vm.agent_ready() {
        "2.7.41491.1102"
    } else {
        "Unknown"
    };
    let extensions: Vec<Value> = vm
        .extension
        .iter()
        .map(|e| {
            let level = if e.provisioning_state == "Failed" {
                "Error"
            } else {
                "Info"
            };
            json!({
                "name": e.name,
                "type": "Microsoft.Compute.VMAccessAgent",
                "typeHandlerVersion": "2.4.8",
                "statuses": [status(
                    &format!("ProvisioningState/{}", e.provisioning_state.to_ascii_lowercase()),
                    &format!("Provisioning {}", e.provisioning_state.to_ascii_lowercase()),
                    level,
                    Some(&e.message),
                )]
            })
        })
        .collect();
    json!({
        "computerName": vm.name,
        "osName": "Windows Server 2022 Datacenter",
        "osVersion": "10.0.20348",
        "vmAgent": {
            "vmAgentVersion": agent_version,
            "statuses": [agent],
            "extensionHandlers": []
        },
        "extensions": extensions,
        "statuses": [provisioning, power]
    })
}

fn vm_json(w: &World, vm: &Vm, expand: bool) -> Value {
    let nic_id = w.nics.get(&vm.nic).map(|n| n.id()).unwrap_or_default();
    let mut props = json!({
        "vmId": vm.vm_id,
        "provisioningState": if vm.busy { "Updating" } else { "Succeeded" },
        "hardwareProfile": { "vmSize": "Standard_B2s" },
        "osProfile": { "computerName": vm.name, "adminUsername": vm.admin_user },
        "networkProfile": { "networkInterfaces": [ { "id": nic_id, "properties": { "primary": true } } ] },
        "diagnosticsProfile": { "bootDiagnostics": { "enabled": vm.boot_diagnostics } },
        "storageProfile": crate::sim::disk::storage_profile(vm)
    });
    if expand {
        props["instanceView"] = instance_view(vm);
    }
    let resources: Vec<Value> = vm.extension.iter().map(|e| extension_json(vm, e)).collect();
    json!({
        "id": vm.id(),
        "name": vm.name,
        "type": "Microsoft.Compute/virtualMachines",
        "location": vm.location,
        "properties": props,
        "resources": resources
    })
}

fn extension_json(vm: &Vm, e: &Extension) -> Value {
    json!({
        "id": format!("{}/extensions/{}", vm.id(), e.name),
        "name": e.name,
        "type": "Microsoft.Compute/virtualMachines/extensions",
        "location": vm.location,
        "properties": {
            "publisher": "Microsoft.Compute",
            "type": "VMAccessAgent",
            "typeHandlerVersion": "2.0",
            "autoUpgradeMinorVersion": true,
            "forceUpdateTag": e.force_update_tag,
            "provisioningState": e.provisioning_state,
            "settings": e.settings
        }
    })
}

/// Resource Health's availability status. The fields follow Azure's documentation and its own
/// examples: `context` says who started the event (`Platform Initiated`, `Customer Initiated`),
/// `category` is `Planned`/`Unplanned` for platform events and `Not Applicable` otherwise
/// (resourcehealth 2024-02-01 `AvailabilityStatuses_ListByResourceGroup.json`; the Event Grid
/// HealthResources schema). `reasonType`'s spellings are not documented: the docs word it
/// "user initiated", so a user's action is sent as `User Initiated`. `Unknown` is what Azure
/// shows when it has had no signal from the VM for a while.
fn health_json(vm: &Vm) -> Value {
    const CUSTOMER: (&str, &str, &str) = ("User Initiated", "Customer Initiated", "Not Applicable");
    const PLATFORM: (&str, &str, &str) = ("Unplanned", "Platform Initiated", "Unplanned");
    let (state, why, summary) = if vm.faults.contains(&Fault::PlatformOutage) {
        (
            "Unavailable",
            Some(PLATFORM),
            "We're sorry, your virtual machine isn't available because of an Azure platform problem. We're working to resolve it.",
        )
    } else if !vm.running() {
        (
            "Unavailable",
            Some(CUSTOMER),
            "This virtual machine was stopped and deallocated by an authorized user or process.",
        )
    } else if vm.rebooting {
        (
            "Unavailable",
            Some(CUSTOMER),
            "This virtual machine is restarting as requested by an authorized user or process.",
        )
    } else if vm.faults.contains(&Fault::HostFailure) {
        (
            "Degraded",
            Some(PLATFORM),
            "We're sorry, your virtual machine is degraded because the host it runs on has a hardware problem. Redeploying moves it to a healthy host.",
        )
    } else if vm.faults.contains(&Fault::HealthUnknown) {
        (
            "Unknown",
            None,
            "We are currently unable to determine the health of this virtual machine.",
        )
    } else {
        (
            "Available",
            None,
            "There aren't any known Azure platform problems affecting this virtual machine.",
        )
    };
    let mut props = json!({
        "availabilityState": state,
        "title": state,
        "summary": summary,
        "reasonChronicity": "Persistent",
        "detailedStatus": "",
        "reportedTime": now()
    });
    if let Some((reason, context, category)) = why {
        props["reasonType"] = json!(reason);
        props["context"] = json!(context);
        props["category"] = json!(category);
    }
    json!({
        "id": format!("{}/providers/Microsoft.ResourceHealth/availabilityStatuses/current", vm.id()),
        "name": "current",
        "type": "Microsoft.ResourceHealth/AvailabilityStatuses",
        "location": vm.location,
        "properties": props
    })
}

fn put_extension(
    s: &Arc<Shared>,
    sub: &str,
    rg: &str,
    name: &str,
    ext_name: &str,
    body: &[u8],
) -> Response {
    let Ok(b) = serde_json::from_slice::<Value>(body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContent",
            "The request content was invalid and could not be deserialized.",
        );
    };
    if b.get("location")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return error(
            StatusCode::BAD_REQUEST,
            "LocationRequired",
            "The location property is required for this definition.",
        );
    }
    let p = &b["properties"];
    let publisher = p.get("publisher").and_then(Value::as_str).unwrap_or("");
    let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
    if publisher != "Microsoft.Compute" || kind != "VMAccessAgent" {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidParameter",
            "Only the Microsoft.Compute VMAccessAgent extension is simulated.",
        );
    }
    let settings = p.get("settings").cloned().unwrap_or_else(|| json!({}));
    let tag = p
        .get("forceUpdateTag")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let user = settings
        .get("UserName")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let password = p
        .pointer("/protectedSettings/Password")
        .and_then(Value::as_str)
        .filter(|pw| !pw.is_empty());
    let password_ok = password.is_some();
    // Only a fingerprint is kept, so tests can match it with what the operator stored.
    let password_sha256 = password.map(|pw| {
        use sha2::Digest;
        sha2::Sha256::digest(pw.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    });
    let mut w = s.lock();
    let Some(vm) = w.vm(sub, rg, name).cloned() else {
        return not_found("Microsoft.Compute/virtualMachines", name, rg);
    };
    if let Some(e) = &vm.extension
        && !e.name.eq_ignore_ascii_case(ext_name)
    {
        return error(
            StatusCode::BAD_REQUEST,
            "MultipleExtensionsPerHandlerNotAllowed",
            &format!(
                "Multiple VMExtensions per handler not supported for OS type 'Windows'. VMExtension '{}' with handler 'Microsoft.Compute.VMAccessAgent' already added or specified in input.",
                e.name
            ),
        );
    }
    if !vm.running() {
        return json_response(
            StatusCode::CONFLICT,
            &json!({"error": {"code": "OperationNotAllowed", "message": "Cannot modify extensions in the VM when the VM is not running.", "innererror": {"internalErrorCode": "CannotModifyExtensionsWhenVMNotRunning"}}}),
        );
    }
    if vm.busy {
        return conflict(
            "OperationNotAllowed",
            "Operation 'PUT extension' is not allowed since another operation is in progress on the VM.",
        );
    }
    if let Some(e) = &vm.extension
        && e.force_update_tag == tag
        && e.settings == settings
        && e.provisioning_state == "Succeeded"
    {
        // Same settings and tag: Azure treats the PUT as a no-op.
        return json_response(StatusCode::OK, &extension_json(&vm, e));
    }
    let created = vm.extension.is_none();
    let ext = Extension {
        name: vm
            .extension
            .as_ref()
            .map_or_else(|| ext_name.to_owned(), |e| e.name.clone()),
        force_update_tag: tag,
        provisioning_state: if created { "Creating" } else { "Updating" }.to_owned(),
        settings,
        message: String::new(),
        busy: true,
    };
    let body = extension_json(&vm, &ext);
    let key = vm.name.to_ascii_lowercase();
    if let Some(v) = w.vms.get_mut(&key) {
        v.extension = Some(ext);
        v.busy = true;
    }
    let op = start_op(
        s,
        &mut w,
        "Microsoft.Compute",
        (sub, &vm.location),
        (OpKind::Extension, &key),
    );
    drop(w);
    finish_later(s, op.id.clone(), op.after, move |w| {
        let Some(v) = w.vms.get_mut(&key) else {
            return Err(("NotFound".into(), "VM vanished".into()));
        };
        v.busy = false;
        let outcome = if !v.agent_ready() {
            Err((
                "VMAgentStatusCommunicationError".to_owned(),
                format!(
                    "VM '{}' has not reported status for VM agent or extensions. Verify that the OS is up and healthy, the VM has a running VM agent, and that it can establish outbound connections to Azure storage.",
                    v.name
                ),
            ))
        } else if user.is_some() && !password_ok {
            Err(("VMExtensionProvisioningError".to_owned(), "VM has reported a failure when processing extension 'VMAccessAgent'. Error message: 'password cannot be null or empty if provided the username'.".to_owned()))
        } else if user.is_some() {
            v.password_resets += 1;
            v.password_sha256 = password_sha256;
            Ok("Enable succeeded: the local administrator password was reset".to_owned())
        } else {
            v.faults.remove(&Fault::RdpDisabled);
            Ok("Enable succeeded: RDP configuration and firewall rule were reset".to_owned())
        };
        if let Some(e) = v.extension.as_mut() {
            e.busy = false;
            match &outcome {
                Ok(m) => {
                    e.provisioning_state = "Succeeded".to_owned();
                    e.message = m.clone();
                }
                Err((_, m)) => {
                    e.provisioning_state = "Failed".to_owned();
                    e.message = m.clone();
                }
            }
        }
        outcome.map(|_| None)
    });
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    accepted(&op.aao, None, op.retry, status, Some(body))
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Restart,
    Redeploy,
    Start,
}

async fn power_action(
    s: &Arc<Shared>,
    sub: &str,
    rg: &str,
    name: &str,
    action: Action,
) -> Response {
    let started = begin_power_action(s, sub, rg, name, action);
    let (op, key) = match started {
        Ok(v) => v,
        Err(rsp) => return rsp,
    };
    s.notify();
    s.settled().await;
    finish_power_action(s, op.id.clone(), key, op.after, action);
    accepted_action(&op)
}

#[allow(clippy::result_large_err)] // the error is the finished HTTP answer
fn begin_power_action(
    s: &Arc<Shared>,
    sub: &str,
    rg: &str,
    name: &str,
    action: Action,
) -> Result<(super::NewOp, String), Response> {
    let mut w = s.lock();
    let Some(vm) = w.vm(sub, rg, name).cloned() else {
        return Err(not_found("Microsoft.Compute/virtualMachines", name, rg));
    };
    // Compute preempts an older restart/redeploy/start with a newer one: the older operation
    // ends `Canceled` with `OperationPreempted` (Azure/azure-sdk-for-java#1783,
    // osbuild/osbuild-composer#1447). An extension update still blocks with 409.
    if vm.busy && vm.power_op.is_none() {
        return Err(conflict(
            "OperationNotAllowed",
            "Operation is not allowed since another operation is in progress on the VM. Retry after it completes.",
        ));
    }
    if let Some(old) = vm.power_op.as_ref().and_then(|id| w.ops.get_mut(id))
        && old.status == OpStatus::InProgress
    {
        old.status = OpStatus::Canceled;
        old.error = Some((
            "OperationPreempted".to_owned(),
            "Operation execution has been preempted by a more recent operation.".to_owned(),
        ));
    }
    if matches!(action, Action::Restart) && !vm.running() {
        return Err(conflict(
            "OperationNotAllowed",
            "Cannot restart the VM because it is deallocated. Start the VM instead.",
        ));
    }
    let key = vm.name.to_ascii_lowercase();
    let kind = match action {
        Action::Restart => OpKind::Restart,
        Action::Redeploy => OpKind::Redeploy,
        Action::Start => OpKind::Start,
    };
    if let Some(v) = w.vms.get_mut(&key) {
        v.busy = true;
        if !matches!(action, Action::Start) {
            v.rebooting = true;
            v.boot += 1;
        }
    }
    let op = start_op(
        s,
        &mut w,
        "Microsoft.Compute",
        (sub, &vm.location),
        (kind, &key),
    );
    if let Some(v) = w.vms.get_mut(&key) {
        v.power_op = Some(op.id.clone());
    }
    Ok((op, key))
}

fn finish_power_action(s: &Arc<Shared>, id: String, key: String, after: Duration, action: Action) {
    let shared = s.clone();
    finish_later(s, id, after, move |w| {
        // A redeploy keeps a Standard (static) public IP; the dynamic private address may
        // change, which the emulator does not model ("public-ip-addresses" doc).
        let Some(v) = w.vms.get_mut(&key) else {
            return Err(("NotFound".into(), "VM vanished".into()));
        };
        v.busy = false;
        v.rebooting = false;
        v.power_op = None;
        match action {
            Action::Restart => {
                v.faults.remove(&Fault::GuestHung);
            }
            Action::Redeploy => {
                for f in [
                    Fault::HostFailure,
                    Fault::GuestHung,
                    Fault::NicBroken,
                    Fault::VmStopped,
                ] {
                    v.faults.remove(&f);
                }
            }
            Action::Start => {
                v.faults.remove(&Fault::VmStopped);
            }
        }
        // Azure reports the operation done once the VM runs; Windows may still be booting.
        boot_guest(&shared, w, &key);
        Ok(None)
    });
}

const RUN_COMMAND_IDS: [&str; 7] = [
    "RunPowerShellScript",
    "RDPSettings",
    "ResetRDPCert",
    "SetRDPPort",
    "EnableRemotePS",
    "EnableAdminAccount",
    "IPConfig",
];

fn run_command(s: &Arc<Shared>, sub: &str, rg: &str, name: &str, body: &[u8]) -> Response {
    let Ok(b) = serde_json::from_slice::<Value>(body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContent",
            "The request content was invalid and could not be deserialized.",
        );
    };
    let command = b
        .get("commandId")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if !RUN_COMMAND_IDS
        .iter()
        .any(|c| c.eq_ignore_ascii_case(&command))
    {
        return error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "The entity was not found in this Azure location.",
        );
    }
    let script: Vec<String> = b
        .get("script")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let mut w = s.lock();
    let Some(vm) = w.vm(sub, rg, name).cloned() else {
        return not_found("Microsoft.Compute/virtualMachines", name, rg);
    };
    if !vm.running() {
        return conflict(
            "OperationNotAllowed",
            "Cannot run a command on the VM because it is not running.",
        );
    }
    if vm.run_command_busy {
        return conflict(
            "Conflict",
            "Run command extension execution is in progress. Please wait for completion before invoking a run command.",
        );
    }
    let key = vm.name.to_ascii_lowercase();
    if let Some(v) = w.vms.get_mut(&key) {
        v.run_command_busy = true;
    }
    if crate::sim::guest::is_evidence_query(&script) {
        w.guest_queries += 1;
    }
    let op = start_op(
        s,
        &mut w,
        "Microsoft.Compute",
        (sub, &vm.location),
        (OpKind::RunCommand, &key),
    );
    drop(w);
    finish_later(s, op.id.clone(), op.after, move |w| {
        let Some(v) = w.vms.get_mut(&key) else {
            return Err(("NotFound".into(), "VM vanished".into()));
        };
        v.run_command_busy = false;
        if !v.agent_ready() {
            return Err((
                "VMAgentStatusCommunicationError".to_owned(),
                "The VM agent is not ready; the run command could not be delivered.".to_owned(),
            ));
        }
        let stdout = crate::sim::guest::run_script(v, &command, &script);
        Ok(Some(json!({ "value": [
            { "code": "ComponentStatus/StdOut/succeeded", "level": "Info", "displayStatus": "Provisioning succeeded", "message": stdout },
            { "code": "ComponentStatus/StdErr/succeeded", "level": "Info", "displayStatus": "Provisioning succeeded", "message": "" }
        ]})))
    });
    accepted_action(&op)
}

fn boot_diagnostics(s: &Shared, sub: &str, rg: &str, name: &str) -> Response {
    let w = s.lock();
    let Some(vm) = w.vm(sub, rg, name) else {
        return not_found("Microsoft.Compute/virtualMachines", name, rg);
    };
    if !vm.boot_diagnostics {
        return conflict(
            "OperationNotAllowed",
            "Boot diagnostics is not enabled for this virtual machine.",
        );
    }
    let blob = |file: &str| {
        format!(
            "{}/blobs/{}/{file}?sv=2022-11-02&se=2099-01-01T00%3A00%3A00Z&sr=b&sp=r&sig={}",
            s.base_url, vm.name, vm.blob_sig
        )
    };
    json_response(
        StatusCode::OK,
        &json!({ "consoleScreenshotBlobUri": blob("screenshot.bmp"), "serialConsoleLogBlobUri": blob("serial.log") }),
    )
}
