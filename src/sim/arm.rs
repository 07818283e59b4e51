//! The ARM emulator: one fallback handler that routes ARM paths by hand (ARM paths are
//! case-insensitive and the SDK may send `//subscriptions/…`), plus the admin API.

use std::{collections::HashMap, net::Ipv4Addr, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use serde_json::{Value, json};

use super::{
    Shared,
    fault::Fault,
    world::{Extension, HttpFault, Op, OpStatus, Vm, World, fingerprint_u64},
};
use crate::azure::{limiter::OpClass, nsg::rule_path};

/// The emulator's routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/_sim/counters", get(counters))
        .route("/_sim/vms", get(list_vms))
        .route("/_sim/vms/{name}/fault", post(add_fault))
        .route("/_sim/vms/{name}/fault/{fault}", delete(clear_fault))
        .route("/_sim/http-faults", post(add_http_fault))
        .route("/_sim/token-requests", get(token_log))
        .fallback(arm)
        .with_state(shared)
}

// ---------- admin API ----------

async fn counters(State(s): State<Arc<Shared>>) -> Response {
    let w = s.lock();
    let total: u64 = w.counters.values().sum();
    json_response(
        StatusCode::OK,
        &json!({ "total": total, "counts": w.counters }),
    )
}

async fn list_vms(State(s): State<Arc<Shared>>) -> Response {
    json_response(StatusCode::OK, &json!(s.vm_summaries()))
}

#[derive(serde::Deserialize)]
struct FaultBody {
    fault: String,
}

async fn add_fault(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let Ok(b) = serde_json::from_slice::<FaultBody>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContent",
            "expected {\"fault\":\"<name>\"}",
        );
    };
    let Some(fault) = Fault::from_name(&b.fault) else {
        return error(
            StatusCode::BAD_REQUEST,
            "UnknownFault",
            &format!("unknown fault {:?}", b.fault),
        );
    };
    if s.inject(&name, fault).await {
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            &format!("no VM named {name}"),
        )
    }
}

async fn clear_fault(
    State(s): State<Arc<Shared>>,
    Path((name, fault)): Path<(String, String)>,
) -> Response {
    let Some(fault) = Fault::from_name(&fault) else {
        return error(
            StatusCode::BAD_REQUEST,
            "UnknownFault",
            &format!("unknown fault {fault:?}"),
        );
    };
    if s.clear(&name, fault).await {
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            &format!("no VM named {name}"),
        )
    }
}

async fn add_http_fault(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    match serde_json::from_slice::<HttpFault>(&body) {
        Ok(f) if (400..600).contains(&f.status) => {
            s.lock().http_faults.push(f);
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(_) => error(
            StatusCode::BAD_REQUEST,
            "InvalidStatus",
            "status must be 400–599",
        ),
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContent",
            &e.to_string(),
        ),
    }
}

async fn token_log(State(s): State<Arc<Shared>>) -> Response {
    json_response(StatusCode::OK, &json!(s.lock().tokens))
}

// ---------- helpers ----------

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut rsp = (status, body.to_string()).into_response();
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    rsp
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    json_response(
        status,
        &json!({ "error": { "code": code, "message": message } }),
    )
}

fn not_found(kind: &str, name: &str, rg: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "ResourceNotFound",
        &format!("The Resource '{kind}/{name}' under resource group '{rg}' was not found."),
    )
}

fn conflict(code: &str, message: &str) -> Response {
    error(StatusCode::CONFLICT, code, message)
}

fn set_header(rsp: &mut Response, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        rsp.headers_mut().insert(name, v);
    }
}

fn retry_headers(rsp: &mut Response, d: Duration) {
    set_header(
        rsp,
        "retry-after",
        &d.as_secs_f64().ceil().max(1.0).to_string(),
    );
    set_header(rsp, "retry-after-ms", &d.as_millis().max(1).to_string());
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A parsed ARM request target.
#[derive(Debug, Clone)]
enum Route {
    Vm {
        sub: String,
        rg: String,
        vm: String,
        rest: Vec<String>,
    },
    Network {
        sub: String,
        rg: String,
        kind: String,
        name: String,
        rest: Vec<String>,
    },
    Operation {
        sub: String,
        provider: String,
        id: String,
        monitor: bool,
    },
    Token,
    Blob {
        vm: String,
        file: String,
    },
}

impl Route {
    fn parse(path: &str) -> Option<Self> {
        let seg: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let low: Vec<String> = seg.iter().map(|s| s.to_ascii_lowercase()).collect();
        let l = |i: usize| low.get(i).map(String::as_str);
        if l(0) == Some("blobs") && seg.len() == 3 {
            return Some(Self::Blob {
                vm: seg[1].to_owned(),
                file: seg[2].to_owned(),
            });
        }
        if seg.len() == 4 && l(1) == Some("oauth2") && l(3) == Some("token") {
            return Some(Self::Token);
        }
        if l(0) != Some("subscriptions") || seg.len() < 4 {
            return None;
        }
        let sub = seg[1].to_owned();
        if l(2) == Some("providers") && seg.len() == 8 && l(4) == Some("locations") {
            let monitor = l(6) == Some("operationresults");
            return Some(Self::Operation {
                sub,
                provider: seg[3].to_owned(),
                id: seg[7].to_owned(),
                monitor,
            });
        }
        if l(2) != Some("resourcegroups") || l(4) != Some("providers") || seg.len() < 8 {
            return None;
        }
        let rg = seg[3].to_owned();
        let rest: Vec<String> = seg[8..].iter().map(|s| (*s).to_owned()).collect();
        match (l(5), l(6)) {
            (Some("microsoft.compute"), Some("virtualmachines")) => Some(Self::Vm {
                sub,
                rg,
                vm: seg[7].to_owned(),
                rest,
            }),
            (Some("microsoft.network"), Some(kind)) => Some(Self::Network {
                sub,
                rg,
                kind: kind.to_owned(),
                name: seg[7].to_owned(),
                rest,
            }),
            _ => None,
        }
    }

    /// The counter name, given the method.
    fn op_name(&self, method: &Method) -> String {
        let m = method.as_str();
        match self {
            Self::Vm { rest, .. } => {
                let r: Vec<String> = rest.iter().map(|s| s.to_ascii_lowercase()).collect();
                match (m, r.first().map(String::as_str), r.len()) {
                    ("GET", None, _) => "vm.get".into(),
                    ("GET", Some("instanceview"), 1) => "vm.instanceView".into(),
                    ("POST", Some(action), 1) => format!("vm.{action}"),
                    ("GET", Some("extensions"), 2) => "extension.get".into(),
                    ("PUT", Some("extensions"), 2) => "extension.put".into(),
                    ("GET", Some("providers"), _) => "health.get".into(),
                    _ => format!("vm.unknown.{m}"),
                }
            }
            Self::Network { kind, rest, .. } => {
                let short = match kind.as_str() {
                    "networkinterfaces" => "nic",
                    "networksecuritygroups" => "nsg",
                    "virtualnetworks" => "vnet",
                    "publicipaddresses" => "pip",
                    "networkwatchers" => "watcher",
                    other => other,
                };
                match rest.first().map(|s| s.to_ascii_lowercase()) {
                    None => format!("{short}.{}", m.to_ascii_lowercase()),
                    Some(sub) if sub == "subnets" => format!("subnet.{}", m.to_ascii_lowercase()),
                    Some(action) => format!("{short}.{action}"),
                }
            }
            Self::Operation { monitor: false, .. } => "operation.status".into(),
            Self::Operation { monitor: true, .. } => "operation.result".into(),
            Self::Token => "token".into(),
            Self::Blob { .. } => "blob.get".into(),
        }
    }

    fn subscription(&self) -> Option<&str> {
        match self {
            Self::Vm { sub, .. } | Self::Network { sub, .. } | Self::Operation { sub, .. } => {
                Some(sub)
            }
            _ => None,
        }
    }
}

// ---------- the ARM handler ----------

async fn arm(
    State(s): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(route) = Route::parse(uri.path()) else {
        s.lock().count("unknown");
        return error(
            StatusCode::NOT_FOUND,
            "NoRegisteredProviderFound",
            &format!("no route for {}", uri.path()),
        );
    };
    let op = route.op_name(&method);
    s.lock().count(&op);
    match &route {
        Route::Token => return token(&s, &body),
        Route::Blob { vm, file } => return blob(&s, vm, file, &query),
        _ => {}
    }
    if !authorized(&headers) {
        s.lock().count("unauthorized");
        return error(
            StatusCode::UNAUTHORIZED,
            "AuthenticationFailed",
            "Authentication failed. The 'Authorization' header is missing or not a bearer token.",
        );
    }
    if !query.contains_key("api-version") {
        return error(
            StatusCode::BAD_REQUEST,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        );
    }
    let sub = route.subscription().unwrap_or_default().to_owned();
    let class = OpClass::of_method(method.as_str());
    let remaining = {
        let mut w = s.lock();
        if !w.subs.contains_key(&sub.to_ascii_lowercase()) {
            return error(
                StatusCode::NOT_FOUND,
                "SubscriptionNotFound",
                &format!("The subscription '{sub}' could not be found."),
            );
        }
        match w.take_token(&sub, class) {
            Ok(r) => r,
            Err(wait) => {
                w.count("throttled");
                let kind = if class == OpClass::Read {
                    "read"
                } else {
                    "write"
                };
                let mut rsp = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "SubscriptionRequestsThrottled",
                    &format!(
                        "Number of '{kind}' requests for subscription '{sub}' exceeded. Please try again later."
                    ),
                );
                retry_headers(&mut rsp, wait);
                set_header(&mut rsp, "x-ms-ratelimit-remaining-subscription-reads", "0");
                return rsp;
            }
        }
    };
    if let Some(f) = s.lock().take_http_fault(&op) {
        let code = match f.status {
            429 => "TooManyRequests",
            500 => "InternalServerError",
            503 => "ServiceUnavailable",
            409 => "Conflict",
            _ => "InjectedFault",
        };
        let mut rsp = error(
            StatusCode::from_u16(f.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            "scripted failure",
        );
        if let Some(secs) = f.retry_after {
            set_header(&mut rsp, "retry-after", &secs.to_string());
        }
        set_header(
            &mut rsp,
            "x-ms-ratelimit-remaining-subscription-reads",
            &remaining.0.to_string(),
        );
        return rsp;
    }
    let query: HashMap<String, String> = query
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    let mut rsp = match route {
        Route::Vm { sub, rg, vm, rest } => {
            vm_route(&s, &method, &sub, &rg, &vm, &rest, &query, &body).await
        }
        Route::Network {
            sub,
            rg,
            kind,
            name,
            rest,
        } => network_route(&s, &method, &sub, &rg, &kind, &name, &rest, &query, &body),
        Route::Operation {
            sub,
            provider,
            id,
            monitor,
        } => operation(&s, &sub, &provider, &id, monitor),
        Route::Token | Route::Blob { .. } => {
            error(StatusCode::NOT_FOUND, "NotFound", "unreachable route")
        }
    };
    set_header(
        &mut rsp,
        "x-ms-ratelimit-remaining-subscription-reads",
        &remaining.0.to_string(),
    );
    set_header(
        &mut rsp,
        "x-ms-ratelimit-remaining-subscription-writes",
        &remaining.1.to_string(),
    );
    set_header(
        &mut rsp,
        "x-ms-request-id",
        &format!("{:016x}", fingerprint_u64(&now())),
    );
    rsp
}

fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| !t.trim().is_empty())
}

fn token(s: &Shared, body: &[u8]) -> Response {
    let form: HashMap<String, String> = serde_urlencoded::from_bytes(body).unwrap_or_default();
    let credential = form
        .get("client_assertion")
        .or_else(|| form.get("client_secret"));
    let (Some(credential), Some(_client)) = (credential, form.get("client_id")) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "invalid_request", "error_description": "client_id and a client assertion or secret are required"}),
        );
    };
    let mut w = s.lock();
    w.tokens.count += 1;
    let fp = format!("{:016x}", fingerprint_u64(credential));
    w.tokens.credential_fingerprints.push(fp);
    let lifetime = w.timing.token_lifetime.as_secs();
    let n = w.tokens.count;
    json_response(
        StatusCode::OK,
        &json!({"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": format!("sim-token-{n}")}),
    )
}

fn blob(s: &Shared, vm: &str, file: &str, query: &HashMap<String, String>) -> Response {
    let w = s.lock();
    let Some(v) = w.vms.get(&vm.to_ascii_lowercase()) else {
        return error(
            StatusCode::NOT_FOUND,
            "BlobNotFound",
            "The specified blob does not exist.",
        );
    };
    if query.get("sig") != Some(&v.blob_sig) {
        return error(
            StatusCode::FORBIDDEN,
            "AuthenticationFailed",
            "Signature did not match.",
        );
    }
    match file {
        "serial.log" => {
            let mut rsp = (StatusCode::OK, w.serial_log(v)).into_response();
            rsp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            rsp
        }
        "screenshot.bmp" => {
            (StatusCode::OK, b"BM\x1e\0\0\0\0\0\0\0\x1a\0\0\0".to_vec()).into_response()
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "BlobNotFound",
            "The specified blob does not exist.",
        ),
    }
}

// ---------- operations ----------

/// Starts an operation; returns its id and the AAO and Location URLs.
fn start_op(
    s: &Shared,
    w: &mut World,
    provider: &'static str,
    sub: &str,
    location: &str,
) -> (String, String, String) {
    let id = w.new_id();
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
    (
        id.clone(),
        format!("{base}/operations/{id}?api-version={ver}"),
        format!("{base}/operationResults/{id}?api-version={ver}"),
    )
}

fn accepted(
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

/// Finishes operation `id` after `after`, applying `effect` to the world first.
fn finish_later<F>(s: &Arc<Shared>, id: String, after: Duration, effect: F)
where
    F: FnOnce(&mut World) -> Result<Option<Value>, (String, String)> + Send + 'static,
{
    let s = s.clone();
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        let outcome = effect(&mut s.lock());
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

fn operation(s: &Shared, sub: &str, provider: &str, id: &str, monitor: bool) -> Response {
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
    let retry = w.timing.retry_after;
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
            OpStatus::Failed => {
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
        OpStatus::Failed => {
            let (code, message) = op.error.clone().unwrap_or_default();
            body["status"] = json!("Failed");
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

// ---------- compute ----------

#[allow(clippy::too_many_arguments)]
async fn vm_route(
    s: &Arc<Shared>,
    method: &Method,
    sub: &str,
    rg: &str,
    name: &str,
    rest: &[String],
    query: &HashMap<String, String>,
    body: &[u8],
) -> Response {
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
            Some("VM status blob is found but not yet populated."),
        )
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
            "vmAgentVersion": "2.7.41491.1102",
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
        "diagnosticsProfile": { "bootDiagnostics": { "enabled": vm.boot_diagnostics } }
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

fn health_json(vm: &Vm) -> Value {
    let (state, reason, category, summary) = if vm.faults.contains(&Fault::PlatformOutage) {
        (
            "Unavailable",
            "Unplanned",
            "Platform Initiated",
            "We're sorry, your virtual machine isn't available because of an Azure platform problem. We're working to resolve it.",
        )
    } else if !vm.running() {
        (
            "Unavailable",
            "UserInitiated",
            "User Initiated",
            "This virtual machine was stopped and deallocated by an authorized user or process.",
        )
    } else if vm.rebooting {
        (
            "Unavailable",
            "UserInitiated",
            "User Initiated",
            "This virtual machine is restarting as requested by an authorized user or process.",
        )
    } else if vm.faults.contains(&Fault::HostFailure) {
        (
            "Degraded",
            "Unplanned",
            "Platform Initiated",
            "We're sorry, your virtual machine is degraded because the host it runs on has a hardware problem. Redeploying moves it to a healthy host.",
        )
    } else {
        (
            "Available",
            "",
            "",
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
    if !reason.is_empty() {
        props["reasonType"] = json!(reason);
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
    let password_ok = p
        .pointer("/protectedSettings/Password")
        .and_then(Value::as_str)
        .is_some_and(|pw| !pw.is_empty());
    let mut w = s.lock();
    let timing = w.timing.clone();
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
    let (id, aao, _) = start_op(s, &mut w, "Microsoft.Compute", sub, &vm.location);
    drop(w);
    finish_later(s, id, timing.operation, move |w| {
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
    accepted(&aao, None, timing.retry_after, status, Some(body))
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
    let (id, aao, location, key, after, retry) = match started {
        Ok(v) => v,
        Err(rsp) => return rsp,
    };
    s.notify();
    s.settled().await;
    finish_power_action(s, id, key, after, action);
    accepted(&aao, Some(&location), retry, StatusCode::ACCEPTED, None)
}

type Started = (String, String, String, String, Duration, Duration);

#[allow(clippy::result_large_err)] // the error is the finished HTTP answer
fn begin_power_action(
    s: &Arc<Shared>,
    sub: &str,
    rg: &str,
    name: &str,
    action: Action,
) -> Result<Started, Response> {
    let mut w = s.lock();
    let timing = w.timing.clone();
    let Some(vm) = w.vm(sub, rg, name).cloned() else {
        return Err(not_found("Microsoft.Compute/virtualMachines", name, rg));
    };
    if vm.busy {
        return Err(conflict(
            "OperationNotAllowed",
            "Operation is not allowed since another operation is in progress on the VM. Retry after it completes.",
        ));
    }
    if matches!(action, Action::Restart) && !vm.running() {
        return Err(conflict(
            "OperationNotAllowed",
            "Cannot restart the VM because it is deallocated. Start the VM instead.",
        ));
    }
    let key = vm.name.to_ascii_lowercase();
    let after = match action {
        Action::Restart => timing.restart,
        Action::Redeploy => timing.redeploy,
        Action::Start => timing.operation,
    };
    if let Some(v) = w.vms.get_mut(&key) {
        v.busy = true;
        if !matches!(action, Action::Start) {
            v.rebooting = true;
            v.boot += 1;
        }
    }
    let (id, aao, location) = start_op(s, &mut w, "Microsoft.Compute", sub, &vm.location);
    Ok((id, aao, location, key, after, timing.retry_after))
}

fn finish_power_action(s: &Arc<Shared>, id: String, key: String, after: Duration, action: Action) {
    finish_later(s, id, after, move |w| {
        if matches!(action, Action::Redeploy) {
            w.renew_public_ip(&key);
        }
        let Some(v) = w.vms.get_mut(&key) else {
            return Err(("NotFound".into(), "VM vanished".into()));
        };
        v.busy = false;
        v.rebooting = false;
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
                v.boot += 1;
            }
            Action::Start => {
                v.faults.remove(&Fault::VmStopped);
            }
        }
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
    let timing = w.timing.clone();
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
    let (id, aao, location) = start_op(s, &mut w, "Microsoft.Compute", sub, &vm.location);
    drop(w);
    finish_later(s, id, timing.operation, move |w| {
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
        let stdout = super::guest::run_script(v, &command, &script);
        Ok(Some(json!({ "value": [
            { "code": "ComponentStatus/StdOut/succeeded", "level": "Info", "displayStatus": "Provisioning succeeded", "message": stdout },
            { "code": "ComponentStatus/StdErr/succeeded", "level": "Info", "displayStatus": "Provisioning succeeded", "message": "" }
        ]})))
    });
    accepted(
        &aao,
        Some(&location),
        timing.retry_after,
        StatusCode::ACCEPTED,
        None,
    )
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

// ---------- network ----------

#[allow(clippy::too_many_arguments)]
fn network_route(
    s: &Arc<Shared>,
    method: &Method,
    sub: &str,
    rg: &str,
    kind: &str,
    name: &str,
    rest: &[String],
    query: &HashMap<String, String>,
    body: &[u8],
) -> Response {
    let k = super::world::key(sub, rg, name);
    let r: Vec<String> = rest.iter().map(|x| x.to_ascii_lowercase()).collect();
    let r: Vec<&str> = r.iter().map(String::as_str).collect();
    match (method.as_str(), kind, r.as_slice()) {
        ("GET", "networkinterfaces", []) => {
            let w = s.lock();
            match w.nics.get(&k) {
                Some(nic) => json_response(StatusCode::OK, &nic_json(&w, nic)),
                None => not_found("Microsoft.Network/networkInterfaces", name, rg),
            }
        }
        ("PUT", "networkinterfaces", []) => put_nic(s, &k, name, rg, body),
        ("POST", "networkinterfaces", ["effectivenetworksecuritygroups"]) => {
            effective_rules(s, sub, &k, name, rg)
        }
        ("GET", "networksecuritygroups", []) => {
            let w = s.lock();
            match w.nsgs.get(&k) {
                Some(nsg) => json_response(StatusCode::OK, &nsg_json(nsg)),
                None => not_found("Microsoft.Network/networkSecurityGroups", name, rg),
            }
        }
        ("GET", "virtualnetworks", ["subnets", subnet]) => {
            let w = s.lock();
            match w.vnets.get(&k).and_then(|v| {
                v.subnets
                    .iter()
                    .find(|x| x.name.eq_ignore_ascii_case(subnet))
                    .map(|sn| (v, sn))
            }) {
                Some((v, sn)) => {
                    let mut props = json!({
                        "addressPrefix": format!("{}/{}", sn.prefix.0, sn.prefix.1),
                        "provisioningState": "Succeeded"
                    });
                    if let Some(nsg) = sn.nsg.as_ref().and_then(|n| w.nsgs.get(n)) {
                        props["networkSecurityGroup"] = json!({ "id": nsg.id() });
                    }
                    json_response(
                        StatusCode::OK,
                        &json!({
                            "id": format!("{}/subnets/{}", v.id(), sn.name),
                            "name": sn.name,
                            "type": "Microsoft.Network/virtualNetworks/subnets",
                            "properties": props
                        }),
                    )
                }
                None => not_found("Microsoft.Network/virtualNetworks/subnets", subnet, rg),
            }
        }
        ("GET", "virtualnetworks", ["checkipaddressavailability"]) => {
            let w = s.lock();
            if !w.vnets.contains_key(&k) {
                return not_found("Microsoft.Network/virtualNetworks", name, rg);
            }
            let Some(ip) = query
                .get("ipaddress")
                .and_then(|v| v.parse::<Ipv4Addr>().ok())
            else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "InvalidRequestFormat",
                    "ipAddress must be an IPv4 address",
                );
            };
            let Some(subnet) = w.subnet_of(&k, ip) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "PrivateIPAddressNotInSubnet",
                    "The address is in no subnet of the virtual network.",
                );
            };
            let available = w.address_free(&k, &subnet, ip);
            let others: Vec<String> = w
                .free_addresses(&k, &subnet, 5)
                .iter()
                .map(ToString::to_string)
                .collect();
            let body = if available {
                json!({ "available": true })
            } else {
                json!({ "available": false, "availableIPAddresses": others })
            };
            json_response(StatusCode::OK, &body)
        }
        ("GET", "publicipaddresses", []) => {
            let w = s.lock();
            match w.pips.get(&k) {
                Some(p) => json_response(
                    StatusCode::OK,
                    &json!({
                        "id": format!("/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Network/publicIPAddresses/{}", p.sub, p.rg, p.name),
                        "name": p.name,
                        "type": "Microsoft.Network/publicIPAddresses",
                        "location": p.location,
                        "sku": { "name": "Basic", "tier": "Regional" },
                        "properties": {
                            "ipAddress": p.address.to_string(),
                            "publicIPAllocationMethod": "Dynamic",
                            "publicIPAddressVersion": "IPv4",
                            "provisioningState": "Succeeded"
                        }
                    }),
                ),
                None => not_found("Microsoft.Network/publicIPAddresses", name, rg),
            }
        }
        ("POST", "networkwatchers", ["ipflowverify"]) => ip_flow_verify(s, sub, rg, name, body),
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "HttpMethodNotAllowed",
            "unsupported network operation",
        ),
    }
}

fn nic_json(w: &World, nic: &super::world::Nic) -> Value {
    let vnet_id = w.vnets.get(&nic.vnet).map(|v| v.id()).unwrap_or_default();
    let mut ip = json!({
        "privateIPAddress": nic.private_ip.to_string(),
        "privateIPAllocationMethod": if nic.static_ip { "Static" } else { "Dynamic" },
        "privateIPAddressVersion": "IPv4",
        "primary": true,
        "provisioningState": "Succeeded",
        "subnet": { "id": format!("{vnet_id}/subnets/{}", nic.subnet) }
    });
    if let Some(p) = nic.pip.as_ref().and_then(|k| w.pips.get(k)) {
        ip["publicIPAddress"] = json!({ "id": format!("/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Network/publicIPAddresses/{}", p.sub, p.rg, p.name) });
    }
    let vm_id = w
        .vms
        .get(&nic.vm.to_ascii_lowercase())
        .map(Vm::id)
        .unwrap_or_default();
    let mut props = json!({
        "provisioningState": if nic.busy { "Updating" } else { "Succeeded" },
        "macAddress": nic.mac,
        "primary": true,
        "virtualMachine": { "id": vm_id },
        "ipConfigurations": [{
            "id": format!("{}/ipConfigurations/ipconfig1", nic.id()),
            "name": "ipconfig1",
            "type": "Microsoft.Network/networkInterfaces/ipConfigurations",
            "properties": ip
        }]
    });
    if let Some(nsg) = nic.nsg.as_ref().and_then(|k| w.nsgs.get(k)) {
        props["networkSecurityGroup"] = json!({ "id": nsg.id() });
    }
    json!({
        "id": nic.id(),
        "name": nic.name,
        "type": "Microsoft.Network/networkInterfaces",
        "location": nic.location,
        "properties": props
    })
}

fn rule_json(nsg_id: &str, r: &crate::azure::model::SecurityRule, default: bool) -> Value {
    let collection = if default {
        "defaultSecurityRules"
    } else {
        "securityRules"
    };
    let protocol = match r.protocol {
        crate::azure::model::RuleProtocol::Any => "*",
        crate::azure::model::RuleProtocol::Tcp => "Tcp",
        crate::azure::model::RuleProtocol::Udp => "Udp",
        crate::azure::model::RuleProtocol::Other => "Icmp",
    };
    json!({
        "id": format!("{nsg_id}/{collection}/{}", r.name),
        "name": r.name,
        "type": format!("Microsoft.Network/networkSecurityGroups/{collection}"),
        "properties": {
            "provisioningState": "Succeeded",
            "protocol": protocol,
            "sourcePortRange": "*",
            "destinationPortRange": r.destination_ports.first().cloned().unwrap_or_else(|| "*".into()),
            "sourceAddressPrefix": r.source_prefixes.first().cloned().unwrap_or_else(|| "*".into()),
            "destinationAddressPrefix": r.destination_prefixes.first().cloned().unwrap_or_else(|| "*".into()),
            "sourcePortRanges": [],
            "destinationPortRanges": [],
            "sourceAddressPrefixes": [],
            "destinationAddressPrefixes": [],
            "access": if r.allow { "Allow" } else { "Deny" },
            "priority": r.priority,
            "direction": if r.inbound { "Inbound" } else { "Outbound" }
        }
    })
}

fn nsg_json(nsg: &super::world::Nsg) -> Value {
    let id = nsg.id();
    let custom: Vec<Value> = nsg.rules.iter().map(|r| rule_json(&id, r, false)).collect();
    let defaults: Vec<Value> = crate::azure::nsg::default_rules()
        .iter()
        .map(|r| rule_json(&id, r, true))
        .collect();
    json!({
        "id": id,
        "name": nsg.name,
        "type": "Microsoft.Network/networkSecurityGroups",
        "location": nsg.location,
        "properties": {
            "provisioningState": "Succeeded",
            "securityRules": custom,
            "defaultSecurityRules": defaults
        }
    })
}

fn put_nic(s: &Arc<Shared>, k: &str, name: &str, rg: &str, body: &[u8]) -> Response {
    let Ok(b) = serde_json::from_slice::<Value>(body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestFormat",
            "Cannot parse the request.",
        );
    };
    let mut w = s.lock();
    let timing = w.timing.clone();
    let Some(nic) = w.nics.get(k).cloned() else {
        return not_found("Microsoft.Network/networkInterfaces", name, rg);
    };
    if nic.busy {
        return conflict(
            "AnotherOperationInProgress",
            &format!(
                "Another operation on this or dependent resource is in progress. To retrieve status of the operation use uri: {}",
                nic.id()
            ),
        );
    }
    let configs = b
        .pointer("/properties/ipConfigurations")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let primary = configs
        .iter()
        .find(|c| {
            c.pointer("/properties/primary")
                .and_then(Value::as_bool)
                .unwrap_or(false)
        })
        .or_else(|| configs.first());
    let Some(cfg) = primary else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestFormat",
            "A network interface needs an IP configuration.",
        );
    };
    let new_ip = match cfg
        .pointer("/properties/privateIPAddress")
        .and_then(Value::as_str)
    {
        Some(t) => match t.parse::<Ipv4Addr>() {
            Ok(ip) => ip,
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "InvalidRequestFormat",
                    "privateIPAddress is not an IPv4 address.",
                );
            }
        },
        None => nic.private_ip,
    };
    let static_ip = cfg
        .pointer("/properties/privateIPAllocationMethod")
        .and_then(Value::as_str)
        .is_some_and(|m| m.eq_ignore_ascii_case("Static"));
    if new_ip != nic.private_ip {
        if w.subnet_of(&nic.vnet, new_ip)
            .is_none_or(|sn| !sn.eq_ignore_ascii_case(&nic.subnet))
        {
            return error(
                StatusCode::BAD_REQUEST,
                "PrivateIPAddressNotInSubnet",
                &format!(
                    "Private static IP address {new_ip} does not belong to the range of subnet prefix."
                ),
            );
        }
        if !w.address_free(&nic.vnet, &nic.subnet, new_ip) {
            return error(
                StatusCode::BAD_REQUEST,
                "PrivateIPAddressInUse",
                &format!(
                    "IP configuration is using the private IP address {new_ip} which is already allocated or reserved."
                ),
            );
        }
    }
    if let Some(n) = w.nics.get_mut(k) {
        n.busy = true;
    }
    let body = w.nics.get(k).map(|n| nic_json(&w, n)).unwrap_or_default();
    let (id, aao, _) = start_op(s, &mut w, "Microsoft.Network", &nic.sub, &nic.location);
    drop(w);
    let key = k.to_owned();
    let vm_key = nic.vm.to_ascii_lowercase();
    finish_later(s, id, timing.operation, move |w| {
        let changed = {
            let Some(n) = w.nics.get_mut(&key) else {
                return Err(("NotFound".into(), "NIC vanished".into()));
            };
            n.busy = false;
            let changed = n.private_ip != new_ip;
            n.private_ip = new_ip;
            n.static_ip = static_ip;
            if changed {
                n.mac = format!("{}-R", n.mac.trim_end_matches("-R"));
            }
            changed
        };
        // Changing the address re-initialises the NIC: the VM restarts with it.
        if changed && let Some(v) = w.vms.get_mut(&vm_key) {
            v.faults.remove(&Fault::NicBroken);
            v.faults.remove(&Fault::GuestHung);
            v.boot += 1;
        }
        Ok(None)
    });
    let mut rsp = json_response(StatusCode::OK, &body);
    set_header(&mut rsp, "azure-asyncoperation", &aao);
    retry_headers(&mut rsp, timing.retry_after);
    rsp
}

fn effective_rules(s: &Arc<Shared>, sub: &str, k: &str, name: &str, rg: &str) -> Response {
    let mut w = s.lock();
    let timing = w.timing.clone();
    let Some(nic) = w.nics.get(k).cloned() else {
        return not_found("Microsoft.Network/networkInterfaces", name, rg);
    };
    let running = w
        .vms
        .get(&nic.vm.to_ascii_lowercase())
        .is_some_and(|v| v.running());
    if !running {
        return conflict(
            "OperationNotAllowed",
            "Effective security rules need the network interface to be attached to a running virtual machine.",
        );
    }
    let (subnet_nsg, nic_nsg) = w.nsgs_of(&nic);
    let mut groups = Vec::new();
    let subnet_id = w
        .vnets
        .get(&nic.vnet)
        .map(|v| format!("{}/subnets/{}", v.id(), nic.subnet))
        .unwrap_or_default();
    for (nsg, assoc) in [
        (subnet_nsg, json!({ "subnet": { "id": subnet_id } })),
        (nic_nsg, json!({ "networkInterface": { "id": nic.id() } })),
    ] {
        let Some(nsg) = nsg else { continue };
        let all = nsg.all_rules();
        let rules: Vec<Value> = all
            .rules
            .iter()
            .map(|r| {
                let port = r.destination_ports.first().map(String::as_str).unwrap_or("*");
                let port = if port == "*" { "0-65535".to_owned() } else if port.contains('-') { port.to_owned() } else { format!("{port}-{port}") };
                json!({
                    "name": rule_path(r),
                    "protocol": match r.protocol { crate::azure::model::RuleProtocol::Tcp => "Tcp", crate::azure::model::RuleProtocol::Udp => "Udp", _ => "All" },
                    "sourcePortRange": "0-65535",
                    "destinationPortRange": port,
                    "sourceAddressPrefix": r.source_prefixes.first().cloned().unwrap_or_else(|| "*".into()),
                    "destinationAddressPrefix": r.destination_prefixes.first().cloned().unwrap_or_else(|| "*".into()),
                    "expandedSourceAddressPrefix": [],
                    "expandedDestinationAddressPrefix": [],
                    "access": if r.allow { "Allow" } else { "Deny" },
                    "priority": r.priority,
                    "direction": if r.inbound { "Inbound" } else { "Outbound" }
                })
            })
            .collect();
        groups.push(json!({
            "networkSecurityGroup": { "id": nsg.id() },
            "association": assoc,
            "effectiveSecurityRules": rules,
            "tagMap": "{}"
        }));
    }
    let result = json!({ "value": groups });
    let (id, aao, location) = start_op(s, &mut w, "Microsoft.Network", sub, &nic.location);
    drop(w);
    finish_later(s, id, timing.operation, move |_| Ok(Some(result)));
    accepted(
        &aao,
        Some(&location),
        timing.retry_after,
        StatusCode::ACCEPTED,
        None,
    )
}

fn ip_flow_verify(s: &Arc<Shared>, sub: &str, rg: &str, watcher: &str, body: &[u8]) -> Response {
    let mut w = s.lock();
    let timing = w.timing.clone();
    let region = watcher
        .strip_prefix("NetworkWatcher_")
        .map(str::to_ascii_lowercase);
    let known = rg.eq_ignore_ascii_case("NetworkWatcherRG")
        && region.as_ref().is_some_and(|r| {
            w.subs
                .get(&sub.to_ascii_lowercase())
                .is_some_and(|s| s.watchers.contains(r))
        });
    if !known {
        return not_found("Microsoft.Network/networkWatchers", watcher, rg);
    }
    let Ok(b) = serde_json::from_slice::<Value>(body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestFormat",
            "Cannot parse the request.",
        );
    };
    let field = |k: &str| b.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let target = field("targetResourceId");
    let vm_name = target.rsplit('/').next().unwrap_or("").to_ascii_lowercase();
    let (Ok(remote), Ok(port)) = (
        field("remoteIPAddress").parse::<Ipv4Addr>(),
        field("localPort").parse::<u16>(),
    ) else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestFormat",
            "remoteIPAddress and localPort are required.",
        );
    };
    let Some(vm) = w.vms.get(&vm_name).cloned() else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidTargetResource",
            "The target resource is not a known virtual machine.",
        );
    };
    if !vm.running() {
        return conflict(
            "OperationNotAllowed",
            "IP flow verify needs a running virtual machine.",
        );
    }
    let Some(nic) = w.nics.get(&vm.nic).cloned() else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidTargetResource",
            "The virtual machine has no network interface.",
        );
    };
    let verdict = w.flow_verdict(&nic, remote, port);
    let result = json!({
        "access": if verdict.allow { "Allow" } else { "Deny" },
        "ruleName": verdict.rule.map(|(r, _)| r).unwrap_or_default()
    });
    let (id, aao, location) = start_op(s, &mut w, "Microsoft.Network", sub, &vm.location);
    drop(w);
    finish_later(s, id, timing.operation, move |_| Ok(Some(result)));
    accepted(
        &aao,
        Some(&location),
        timing.retry_after,
        StatusCode::ACCEPTED,
        None,
    )
}
