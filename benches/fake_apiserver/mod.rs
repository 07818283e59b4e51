//! An in-process stand-in for the Kubernetes API server, enough for the operator's whole loop:
//! list, watch, get, create, patch (merge, strategic as merge, server-side apply), the status
//! subresource, delete — for any namespaced resource (RdpHealths, Events, Leases).
//!
//! Simplifications, on purpose: strategic merge is treated as a JSON merge patch; a
//! server-side apply to `/status` replaces the whole status (the operator is its only
//! manager); an apply to a Lease conflicts when another holder is recorded.

// Not every test binary uses every helper.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, State},
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use futures::stream;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

/// (resource plural, namespace, name).
pub type Key = (String, String, String);

/// One change, as a watch reports it.
#[derive(Debug, Clone)]
pub struct Change {
    /// The resourceVersion it produced.
    pub rv: u64,
    /// Resource plural.
    pub resource: String,
    /// Namespace.
    pub namespace: String,
    /// ADDED, MODIFIED or DELETED.
    pub kind: &'static str,
    /// The object after the change (before, for DELETED).
    pub object: Value,
}

/// A request the server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    /// HTTP method.
    pub method: Method,
    /// Path.
    pub path: String,
    /// Query string.
    pub query: String,
    /// When it arrived.
    pub at: tokio::time::Instant,
}

/// Everything the server holds.
#[derive(Debug, Default)]
pub struct Inner {
    rv: u64,
    uid: u64,
    /// Current objects.
    pub objects: BTreeMap<Key, Value>,
    /// Every change so far (watches replay from here).
    pub log: Vec<Change>,
    /// Every request so far.
    pub requests: Vec<Seen>,
}

impl Inner {
    /// Objects of `resource` in `namespace`.
    pub fn list(&self, resource: &str, namespace: &str) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|((r, ns, _), _)| r == resource && ns == namespace)
            .map(|(_, v)| v)
            .collect()
    }

    /// One object.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(resource.into(), namespace.into(), name.into()))
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, resource: &str, namespace: &str, kind: &'static str, object: Value) {
        let rv = self.rv;
        self.log.push(Change {
            rv,
            resource: resource.into(),
            namespace: namespace.into(),
            kind,
            object,
        });
    }
}

struct Shared {
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn notify(&self) {
        let rv = self.lock().rv;
        self.changed.send_replace(rv);
    }
}

/// The running server.
pub struct FakeApiServer {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApiServer {
    /// Starts a server on 127.0.0.1 (random port).
    pub async fn start() -> Self {
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            changed,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, shared, task }
    }

    /// A kube client talking to this server (default namespace `default`).
    pub fn client(&self) -> kube::Client {
        let url = format!("http://{}", self.addr).parse().unwrap();
        let config = kube::Config::new(url);
        kube::Client::try_from(config).unwrap()
    }

    /// Reads the state.
    pub fn read<T>(&self, f: impl FnOnce(&Inner) -> T) -> T {
        f(&self.shared.lock())
    }

    /// Waits until `f` returns `Some`, re-checking after every change; panics after `limit`.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        limit: Duration,
        f: impl Fn(&Inner) -> Option<T>,
    ) -> T {
        let mut changes = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(found) = f(&self.shared.lock()) {
                return found;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => panic!("timed out after {limit:?} waiting for {what}"),
            }
        }
    }

    /// Creates an object as a user would.
    pub fn create(&self, resource: &str, namespace: &str, object: Value) -> Value {
        let created = create(&mut self.shared.lock(), resource, namespace, object)
            .unwrap_or_else(|(code, msg)| panic!("create failed: {code} {msg}"));
        self.shared.notify();
        created
    }

    /// Merge-patches an object's main resource as a user would.
    pub fn patch(&self, resource: &str, namespace: &str, name: &str, patch: Value) -> Value {
        let patched = patch_object(
            &mut self.shared.lock(),
            (resource, namespace, name),
            &patch,
            PatchKind::Merge,
            false,
        )
        .unwrap_or_else(|(code, msg)| panic!("patch failed: {code} {msg}"));
        self.shared.notify();
        patched
    }

    /// Deletes an object as a user would.
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) {
        delete(&mut self.shared.lock(), resource, namespace, name)
            .unwrap_or_else(|(code, msg)| panic!("delete failed: {code} {msg}"));
        self.shared.notify();
    }
}

type Failure = (StatusCode, String);

fn status_error(code: StatusCode, reason: &str, message: &str) -> Response {
    (
        code,
        [("content-type", "application/json")],
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16(),
        })
        .to_string(),
    )
        .into_response()
}

fn reason_of(code: StatusCode) -> &'static str {
    match code {
        StatusCode::NOT_FOUND => "NotFound",
        StatusCode::CONFLICT => "Conflict",
        StatusCode::BAD_REQUEST => "BadRequest",
        _ => "InternalError",
    }
}

fn failure(f: Failure) -> Response {
    let reason = if f.0 == StatusCode::CONFLICT && f.1.contains("already exists") {
        "AlreadyExists"
    } else {
        reason_of(f.0)
    };
    status_error(f.0, reason, &f.1)
}

fn ok(object: Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        object.to_string(),
    )
        .into_response()
}

/// The parts of a request path.
struct Target {
    api_version: String,
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        ["api", version, rest @ ..] => ((*version).to_string(), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_string()), rest),
        _ => (None, rest),
    };
    let (resource, name, status) = match rest {
        [resource] => (*resource, None, false),
        [resource, name] => (*resource, Some((*name).to_string()), false),
        [resource, name, "status"] => (*resource, Some((*name).to_string()), true),
        _ => return None,
    };
    Some(Target {
        api_version,
        resource: resource.to_string(),
        namespace,
        name,
        status,
    })
}

fn kind_of(resource: &str) -> &'static str {
    match resource {
        "rdphealths" => "RdpHealth",
        "leases" => "Lease",
        "events" => "Event",
        "secrets" => "Secret",
        _ => "Object",
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<BTreeMap<String, String>>,
    body: Bytes,
) -> Response {
    shared.lock().requests.push(Seen {
        method: method.clone(),
        path: uri.path().to_string(),
        query: uri.query().unwrap_or_default().to_string(),
        at: tokio::time::Instant::now(),
    });
    let Some(target) = parse_path(uri.path()) else {
        return status_error(StatusCode::NOT_FOUND, "NotFound", "unknown path");
    };
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return status_error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
        }
    };
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let result = match (&method, &target.name) {
        (&Method::GET, None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            let since = query
                .get("resourceVersion")
                .and_then(|rv| rv.parse().ok())
                .unwrap_or(0);
            return watch_response(shared, target, since);
        }
        (&Method::GET, None) => Ok(list(&shared.lock(), &target)),
        (&Method::GET, Some(name)) => {
            let ns = target.namespace.clone().unwrap_or_default();
            shared
                .lock()
                .get(&target.resource, &ns, name)
                .cloned()
                .ok_or((StatusCode::NOT_FOUND, format!("{name} not found")))
        }
        (&Method::POST, None) => {
            let ns = target.namespace.clone().unwrap_or_default();
            create(&mut shared.lock(), &target.resource, &ns, body)
        }
        (&Method::PATCH, Some(name)) => {
            let ns = target.namespace.clone().unwrap_or_default();
            let kind = if content_type.starts_with("application/apply-patch") {
                PatchKind::Apply
            } else {
                PatchKind::Merge
            };
            patch_object(
                &mut shared.lock(),
                (&target.resource, &ns, name),
                &body,
                kind,
                target.status,
            )
        }
        (&Method::PUT, Some(name)) => {
            let ns = target.namespace.clone().unwrap_or_default();
            replace(
                &mut shared.lock(),
                (&target.resource, &ns, name),
                body,
                target.status,
            )
        }
        (&Method::DELETE, Some(name)) => {
            let ns = target.namespace.clone().unwrap_or_default();
            delete(&mut shared.lock(), &target.resource, &ns, name)
        }
        _ => Err((StatusCode::METHOD_NOT_ALLOWED, "unsupported".into())),
    };
    shared.notify();
    match result {
        Ok(object) if method == Method::POST => {
            let mut r = ok(object);
            *r.status_mut() = StatusCode::CREATED;
            r
        }
        Ok(object) => ok(object),
        Err(f) => failure(f),
    }
}

fn list(inner: &Inner, target: &Target) -> Value {
    let items: Vec<Value> = inner
        .objects
        .iter()
        .filter(|((r, ns, _), _)| {
            *r == target.resource && target.namespace.as_ref().is_none_or(|t| t == ns)
        })
        .map(|(_, v)| v.clone())
        .collect();
    json!({
        "apiVersion": target.api_version,
        "kind": format!("{}List", kind_of(&target.resource)),
        "metadata": {"resourceVersion": inner.rv.to_string()},
        "items": items,
    })
}

fn watch_response(shared: Arc<Shared>, target: Target, since: u64) -> Response {
    let changes = shared.changed.subscribe();
    let state = (shared, target, since, changes);
    // `since` is the last resourceVersion scanned (of any resource), so changes to other
    // resources never make the stream spin.
    let events = stream::unfold(
        state,
        |(shared, target, mut since, mut changes)| async move {
            loop {
                // Mark the current value seen before reading the log, so no change is missed.
                changes.borrow_and_update();
                let batch: Vec<Change> = {
                    let inner = shared.lock();
                    // The log is in resourceVersion order: start after `since`, not at the
                    // beginning (a scan of the whole log per change is quadratic in a first
                    // pass that writes every object).
                    let start = inner.log.partition_point(|c| c.rv <= since);
                    let batch = inner.log[start..]
                        .iter()
                        .filter(|c| {
                            c.resource == target.resource
                                && target
                                    .namespace
                                    .as_ref()
                                    .is_none_or(|ns| *ns == c.namespace)
                        })
                        .cloned()
                        .collect();
                    since = since.max(inner.log.last().map_or(0, |c| c.rv));
                    batch
                };
                if !batch.is_empty() {
                    let mut text = String::new();
                    for c in batch {
                        text.push_str(&json!({"type": c.kind, "object": c.object}).to_string());
                        text.push('\n');
                    }
                    return Some((
                        Ok::<_, Infallible>(Bytes::from(text)),
                        (shared, target, since, changes),
                    ));
                }
                if changes.changed().await.is_err() {
                    return None;
                }
            }
        },
    );
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(events))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn create(
    inner: &mut Inner,
    resource: &str,
    namespace: &str,
    mut object: Value,
) -> Result<Value, Failure> {
    let name = match object["metadata"]["name"].as_str() {
        Some(name) => name.to_string(),
        None => match object["metadata"]["generateName"].as_str() {
            Some(prefix) => format!("{prefix}{}", inner.uid + 1),
            None => return Err((StatusCode::BAD_REQUEST, "name is required".into())),
        },
    };
    let key = (resource.to_string(), namespace.to_string(), name.clone());
    if inner.objects.contains_key(&key) {
        return Err((StatusCode::CONFLICT, format!("{name} already exists")));
    }
    if resource == "secrets" {
        fold_string_data(&mut object);
    }
    inner.uid += 1;
    let rv = inner.next_rv();
    let meta = &mut object["metadata"];
    meta["name"] = json!(name);
    meta["namespace"] = json!(namespace);
    meta["uid"] = json!(format!("uid-{}", inner.uid));
    meta["resourceVersion"] = json!(rv.to_string());
    meta["generation"] = json!(1);
    meta["creationTimestamp"] = json!(now());
    inner.objects.insert(key, object.clone());
    inner.record(resource, namespace, "ADDED", object.clone());
    Ok(object)
}

/// How a PATCH body is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PatchKind {
    /// JSON merge patch (also used for strategic merge).
    Merge,
    /// Server-side apply.
    Apply,
}

fn patch_object(
    inner: &mut Inner,
    (resource, namespace, name): (&str, &str, &str),
    patch: &Value,
    kind: PatchKind,
    status: bool,
) -> Result<Value, Failure> {
    let key = (
        resource.to_string(),
        namespace.to_string(),
        name.to_string(),
    );
    let Some(current) = inner.objects.get(&key).cloned() else {
        if kind == PatchKind::Apply && !status {
            return create(inner, resource, namespace, patch.clone());
        }
        return Err((StatusCode::NOT_FOUND, format!("{name} not found")));
    };
    if let Some(expected) = patch["metadata"]["resourceVersion"].as_str()
        && current["metadata"]["resourceVersion"].as_str() != Some(expected)
    {
        return Err((StatusCode::CONFLICT, "the object has been modified".into()));
    }
    if kind == PatchKind::Apply && resource == "leases" {
        let holder = current["spec"]["holderIdentity"].as_str();
        let wanted = patch["spec"]["holderIdentity"].as_str();
        if holder.is_some() && wanted.is_some() && holder != wanted {
            return Err((
                StatusCode::CONFLICT,
                "holderIdentity is owned by another manager".into(),
            ));
        }
    }
    let mut next = current.clone();
    if status {
        match kind {
            PatchKind::Apply => next["status"] = patch["status"].clone(),
            PatchKind::Merge => merge(&mut next["status"], &patch["status"]),
        }
    } else {
        let mut body = patch.clone();
        if resource == "rdphealths" {
            // The status subresource is the only way to change status.
            if let Some(obj) = body.as_object_mut() {
                obj.remove("status");
            }
        }
        if let Some(meta) = body.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
        }
        merge(&mut next, &body);
        if resource == "secrets" {
            fold_string_data(&mut next);
        }
    }
    commit(inner, key, current, next)
}

fn replace(
    inner: &mut Inner,
    (resource, namespace, name): (&str, &str, &str),
    mut object: Value,
    status: bool,
) -> Result<Value, Failure> {
    let key = (
        resource.to_string(),
        namespace.to_string(),
        name.to_string(),
    );
    let current = inner
        .objects
        .get(&key)
        .cloned()
        .ok_or((StatusCode::NOT_FOUND, format!("{name} not found")))?;
    if let Some(expected) = object["metadata"]["resourceVersion"].as_str()
        && current["metadata"]["resourceVersion"].as_str() != Some(expected)
    {
        return Err((StatusCode::CONFLICT, "the object has been modified".into()));
    }
    let next = if status {
        let mut next = current.clone();
        next["status"] = object["status"].take();
        next
    } else {
        object["metadata"] = current["metadata"].clone();
        object["status"] = current["status"].clone();
        object
    };
    commit(inner, key, current, next)
}

/// Stores `next` when it differs: bumps resourceVersion (and generation on a spec change)
/// and logs the change. A no-op write changes nothing, as on a real API server.
fn commit(inner: &mut Inner, key: Key, current: Value, mut next: Value) -> Result<Value, Failure> {
    if next == current {
        return Ok(current);
    }
    let rv = inner.next_rv();
    next["metadata"]["resourceVersion"] = json!(rv.to_string());
    if next["spec"] != current["spec"] {
        let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
        next["metadata"]["generation"] = json!(generation + 1);
    }
    inner.objects.insert(key.clone(), next.clone());
    inner.record(&key.0, &key.1, "MODIFIED", next.clone());
    Ok(next)
}

fn delete(
    inner: &mut Inner,
    resource: &str,
    namespace: &str,
    name: &str,
) -> Result<Value, Failure> {
    let key = (
        resource.to_string(),
        namespace.to_string(),
        name.to_string(),
    );
    let mut object = inner
        .objects
        .remove(&key)
        .ok_or((StatusCode::NOT_FOUND, format!("{name} not found")))?;
    let rv = inner.next_rv();
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    inner.record(resource, namespace, "DELETED", object.clone());
    Ok(object)
}

/// A Secret's `stringData` is write-only: the API server moves it into `data`, base64-encoded.
fn fold_string_data(secret: &mut Value) {
    let Some(Value::Object(plain)) = secret.as_object_mut().and_then(|o| o.remove("stringData"))
    else {
        return;
    };
    for (k, v) in plain {
        let bytes = v.as_str().unwrap_or_default().as_bytes().to_vec();
        secret["data"][k] =
            serde_json::to_value(k8s_openapi::ByteString(bytes)).unwrap_or_default();
    }
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Some(fields) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Some(obj) = target.as_object_mut() {
        for (k, v) in fields {
            if v.is_null() {
                obj.remove(k);
            } else {
                merge(obj.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}
