//! The ARM emulator: one fallback handler that routes ARM paths by hand (ARM paths are
//! case-insensitive and the SDK may send `//subscriptions/…`), plus the admin API.

mod compute;
mod graph;
mod network;
mod operations;
mod snapshot;
mod token;

use self::operations::{
    NewOp, accepted, accepted_action, boot_guest, finish_later, operation, start_op,
};

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::{delete, get, post, put},
};
use serde_json::{Value, json};

use super::{
    Shared,
    fault::Fault,
    world::{HttpFault, Issued, fingerprint_u64},
};
use crate::azure::limiter::OpClass;

/// The emulator's routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/_sim/counters", get(counters))
        .route("/_sim/vms", get(list_vms).post(graph::add_vm))
        .route("/_sim/vms/{name}", delete(graph::delete_vm))
        .route("/_sim/vms/{name}/tags", put(graph::set_tags))
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
    /// `Microsoft.Compute/snapshots[/{name}]` of a resource group.
    Snapshot {
        sub: String,
        rg: String,
        name: Option<String>,
    },
    Token {
        tenant: String,
    },
    Blob {
        vm: String,
        file: String,
    },
    /// Resource Graph's query endpoint.
    Graph,
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
            return Some(Self::Token {
                tenant: seg[0].to_owned(),
            });
        }
        if seg.len() == 3
            && l(0) == Some("providers")
            && l(1) == Some("microsoft.resourcegraph")
            && l(2) == Some("resources")
        {
            return Some(Self::Graph);
        }
        if l(0) != Some("subscriptions") || seg.len() < 4 {
            return None;
        }
        let sub = seg[1].to_owned();
        if l(2) == Some("providers") && seg.len() == 8 && l(4) == Some("locations") {
            let monitor = match l(6) {
                Some("operations") => false,
                Some("operationresults") => true,
                _ => return None,
            };
            return Some(Self::Operation {
                sub,
                provider: seg[3].to_owned(),
                id: seg[7].to_owned(),
                monitor,
            });
        }
        if l(2) == Some("resourcegroups")
            && l(4) == Some("providers")
            && l(5) == Some("microsoft.compute")
            && l(6) == Some("snapshots")
            && (7..=8).contains(&seg.len())
        {
            return Some(Self::Snapshot {
                sub,
                rg: seg[3].to_owned(),
                name: seg.get(7).map(|s| (*s).to_owned()),
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
                    Some(sub) if sub == "securityrules" => {
                        format!("nsgrule.{}", m.to_ascii_lowercase())
                    }
                    Some(action) => format!("{short}.{action}"),
                }
            }
            Self::Snapshot { name: None, .. } => "snapshot.list".into(),
            Self::Snapshot { .. } => format!("snapshot.{}", m.to_ascii_lowercase()),
            Self::Operation { monitor: false, .. } => "operation.status".into(),
            Self::Operation { monitor: true, .. } => "operation.result".into(),
            Self::Token { .. } => "token".into(),
            Self::Blob { .. } => "blob.get".into(),
            Self::Graph => "graph.resources".into(),
        }
    }

    fn subscription(&self) -> Option<&str> {
        match self {
            Self::Vm { sub, .. }
            | Self::Network { sub, .. }
            | Self::Operation { sub, .. }
            | Self::Snapshot { sub, .. } => Some(sub),
            _ => None,
        }
    }
}

// ---------- the ARM handler ----------

/// The parts of an ARM request every resource handler needs.
#[derive(Clone, Copy)]
struct Call<'a> {
    s: &'a Arc<Shared>,
    method: &'a Method,
    sub: &'a str,
    rg: &'a str,
    query: &'a HashMap<String, String>,
    body: &'a [u8],
}

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
    {
        let mut w = s.lock();
        w.count(&op);
        if method != Method::GET {
            w.log_write(&op);
        }
    }
    match &route {
        Route::Token { tenant } => return token::token(&s, tenant, &body),
        Route::Blob { vm, file } => return blob(&s, vm, file, &query),
        _ => {}
    }
    let Some(bearer) = token::bearer(&headers) else {
        s.lock().count("unauthorized");
        return error(
            StatusCode::UNAUTHORIZED,
            "AuthenticationFailed",
            "Authentication failed. The 'Authorization' header is missing or not a bearer token.",
        );
    };
    if let Some(expired) = token::expired(&s, &bearer) {
        return expired;
    }
    s.lock()
        .tokens
        .count_request(&bearer, route.subscription().unwrap_or_default());
    if !query.contains_key("api-version") {
        return error(
            StatusCode::BAD_REQUEST,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        );
    }
    if matches!(route, Route::Graph) {
        return graph::resources(&s, &bearer, &body);
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
                set_header(&mut rsp, remaining_header(class), "0");
                return rsp;
            }
        }
    };
    let used = if class == OpClass::Read {
        remaining.0
    } else {
        remaining.1
    };
    if let Some(f) = s.lock().take_http_fault(&op) {
        let mut rsp = scripted(&f);
        set_header(&mut rsp, remaining_header(class), &used.to_string());
        return rsp;
    }
    let query: HashMap<String, String> = query
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    let mut rsp = match route {
        Route::Vm { sub, rg, vm, rest } => {
            let call = Call {
                s: &s,
                method: &method,
                sub: &sub,
                rg: &rg,
                query: &query,
                body: &body,
            };
            compute::vm_route(call, &vm, &rest).await
        }
        Route::Network {
            sub,
            rg,
            kind,
            name,
            rest,
        } => {
            let call = Call {
                s: &s,
                method: &method,
                sub: &sub,
                rg: &rg,
                query: &query,
                body: &body,
            };
            network::network_route(call, &kind, &name, &rest)
        }
        Route::Operation {
            sub,
            provider,
            id,
            monitor,
        } => operation(&s, &sub, &provider, &id, monitor),
        Route::Snapshot { sub, rg, name } => {
            let call = Call {
                s: &s,
                method: &method,
                sub: &sub,
                rg: &rg,
                query: &query,
                body: &body,
            };
            snapshot::snapshot_route(call, name.as_deref())
        }
        Route::Token { .. } | Route::Blob { .. } | Route::Graph => {
            error(StatusCode::NOT_FOUND, "NotFound", "unreachable route")
        }
    };
    // ARM counts reads on GETs and writes on PUT/POST/DELETE, and says so in the header of
    // that kind only (ARM request-limits and throttling doc).
    set_header(&mut rsp, remaining_header(class), &used.to_string());
    set_header(
        &mut rsp,
        "x-ms-request-id",
        &format!("{:016x}", fingerprint_u64(&now())),
    );
    let held = s.lock().take_dropped_response(&op);
    if let Some(hold) = held {
        s.lock().count("dropped_response");
        tokio::time::sleep(hold).await;
    }
    rsp
}

fn remaining_header(class: OpClass) -> &'static str {
    match class {
        OpClass::Read => "x-ms-ratelimit-remaining-subscription-reads",
        OpClass::Write => "x-ms-ratelimit-remaining-subscription-writes",
    }
}

/// The answer of a scripted HTTP failure, in the shape the real service sends for its code:
/// Compute throttles with 429 `OperationNotAllowed` and a `TooManyRequests` detail naming the
/// policy (compute-throttling-limits doc); Network answers a concurrent change with 429
/// `RetryableErrorDueToAnotherOperation` (ARM request-limits doc).
fn scripted(f: &HttpFault) -> Response {
    let status = StatusCode::from_u16(f.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let code = f.code.clone().unwrap_or_else(|| {
        match f.status {
            429 => "TooManyRequests",
            500 => "InternalServerError",
            503 => "ServiceUnavailable",
            409 => "Conflict",
            _ => "InjectedFault",
        }
        .to_owned()
    });
    let mut body = json!({ "error": { "code": code, "message": "scripted failure" } });
    if f.status == 429 && code == "OperationNotAllowed" {
        body["error"]["message"] = json!(
            "The server rejected the request because too many requests have been received for this subscription."
        );
        body["error"]["details"] = json!([{
            "code": "TooManyRequests",
            "target": "PutVMSubscriptionMaximum",
            "message": "{\"operationGroup\":\"PutVMSubscriptionMaximum\",\"startTime\":\"2024-01-01T00:00:00+00:00\",\"endTime\":\"2024-01-01T00:20:00+00:00\",\"allowedRequestCount\":1500,\"measuredRequestCount\":1507}"
        }]);
    }
    let mut rsp = json_response(status, &body);
    if let Some(secs) = f.retry_after {
        set_header(&mut rsp, "retry-after", &secs.to_string());
    }
    rsp
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
