//! A control plane of its own for one test, with a view of what it holds that whole-loop tests
//! can assert on: the current objects (read from the server, as `kubectl get` shows them),
//! every change to RdpHealths, Events, Leases and Secrets in order (from watches opened before
//! the test acts), and every request (from the API server's audit log).
//!
//! Users' actions (create, patch, delete) go through `kubectl`, as a person's would.

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use futures::{StreamExt, TryStreamExt};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, ListParams, WatchEvent, WatchParams},
};
use serde_json::Value;
use tokio::{sync::watch, task::JoinHandle};

use super::k8s::ControlPlane;

/// (resource plural, namespace, name).
pub type Key = (String, String, String);

/// The resources the view follows: (plural, `kubectl get` name, API group/version).
const FOLLOWED: [(&str, &str, &str, &str); 5] = [
    (
        "rdphealths",
        "rdphealths.rdphealth.io",
        "rdphealth.io/v1alpha1",
        "RdpHealth",
    ),
    (
        "rdphealthfleets",
        "rdphealthfleets.rdphealth.io",
        "rdphealth.io/v1alpha1",
        "RdpHealthFleet",
    ),
    (
        "events",
        "events.events.k8s.io",
        "events.k8s.io/v1",
        "Event",
    ),
    (
        "leases",
        "leases.coordination.k8s.io",
        "coordination.k8s.io/v1",
        "Lease",
    ),
    ("secrets", "secrets", "v1", "Secret"),
];

/// One change, as a watch reported it.
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

/// A request the API server served (from its audit log).
#[derive(Debug, Clone)]
pub struct Seen {
    /// HTTP method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Query string.
    pub query: String,
    /// When the server received it (RFC 3339).
    pub at: String,
    /// The response code.
    pub code: u16,
}

/// What the server holds.
#[derive(Debug, Default)]
pub struct Inner {
    /// Current objects of the followed resources.
    pub objects: BTreeMap<Key, Value>,
    /// Every change so far, in order.
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

    /// An RdpHealth's status, once it has one.
    pub fn status(&self, namespace: &str, name: &str) -> Option<Value> {
        self.get("rdphealths", namespace, name)
            .map(|o| o["status"].clone())
            .filter(|s| !s.is_null())
    }
}

/// The condition of `type_` in a status.
pub fn condition(status: &Value, type_: &str) -> Option<Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

/// A real API server for one test.
pub struct RealApiServer {
    cp: ControlPlane,
    client: Client,
    log: Arc<Mutex<Vec<Change>>>,
    changed: watch::Sender<u64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for RealApiServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl RealApiServer {
    /// Starts a control plane with the CRD installed and the watches open.
    pub async fn start() -> Self {
        let cp = ControlPlane::start();
        for file in [rdphealth::api::CRD_FILE, rdphealth::api::FLEET_CRD_FILE] {
            let crd = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("crds")
                .join(file);
            cp.kubectl(&["apply", "--server-side", "-f", crd.to_str().unwrap()]);
        }
        cp.wait_established("rdphealths.rdphealth.io");
        cp.wait_established("rdphealthfleets.rdphealth.io");
        let client = cp.client().await;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (changed, _) = watch::channel(0);
        let mut tasks = Vec::new();
        for (plural, _, api_version, kind) in FOLLOWED {
            let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
            let resource = ApiResource {
                group: group.into(),
                version: version.into(),
                api_version: api_version.into(),
                kind: kind.into(),
                plural: plural.into(),
            };
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
            // The initial list makes sure the watch is open before the test acts.
            let list = api.list(&ListParams::default()).await.unwrap();
            let rv = list.metadata.resource_version.clone().unwrap_or_default();
            let mut known = BTreeMap::new();
            for object in list.items {
                known.insert(name_of(&object), object.metadata.resource_version.clone());
                record(&log, &changed, plural, "ADDED", &object);
            }
            tasks.push(tokio::spawn(follow(
                api,
                plural,
                rv,
                known,
                Arc::clone(&log),
                changed.clone(),
            )));
        }
        Self {
            cp,
            client,
            log,
            changed,
            tasks,
        }
    }

    /// A kube client with the admin identity.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The control plane.
    pub fn control_plane(&self) -> &ControlPlane {
        &self.cp
    }

    /// Reads the state: the objects as the server has them now, the changes and requests so far.
    pub fn read<T>(&self, f: impl FnOnce(&Inner) -> T) -> T {
        f(&self.snapshot())
    }

    fn snapshot(&self) -> Inner {
        let kinds: Vec<&str> = FOLLOWED.iter().map(|f| f.1).collect();
        let out = self
            .cp
            .kubectl(&["get", &kinds.join(","), "-A", "-o", "json"]);
        let listed: Value = serde_json::from_str(&out).unwrap();
        let mut objects = BTreeMap::new();
        for item in listed["items"].as_array().unwrap() {
            let plural = FOLLOWED
                .iter()
                .find(|f| item["apiVersion"] == f.2 && item["kind"] == f.3)
                .map(|f| f.0)
                .unwrap();
            let meta = &item["metadata"];
            let key = (
                plural.to_string(),
                meta["namespace"].as_str().unwrap_or_default().to_string(),
                meta["name"].as_str().unwrap().to_string(),
            );
            objects.insert(key, item.clone());
        }
        Inner {
            objects,
            log: self
                .log
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            requests: self.requests(),
        }
    }

    fn requests(&self) -> Vec<Seen> {
        let text = std::fs::read_to_string(self.cp.dir().join("audit.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|e| {
                let uri = e["requestURI"].as_str().unwrap_or_default();
                let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
                let method = match e["verb"].as_str().unwrap_or_default() {
                    "get" | "list" | "watch" => "GET",
                    "create" => "POST",
                    "update" => "PUT",
                    "patch" => "PATCH",
                    "delete" | "deletecollection" => "DELETE",
                    other => other,
                };
                Seen {
                    method: method.into(),
                    path: path.into(),
                    query: query.into(),
                    at: e["requestReceivedTimestamp"]
                        .as_str()
                        .unwrap_or_default()
                        .into(),
                    code: u16::try_from(e["responseStatus"]["code"].as_u64().unwrap_or(0))
                        .unwrap_or(0),
                }
            })
            .collect()
    }

    /// Waits until `f` returns `Some` for the state after one of the changes the watches
    /// report, checking each change in order (so the first state that satisfies `f` is the one
    /// found, however fast the changes come); panics after `limit`.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        limit: Duration,
        f: impl Fn(&Inner) -> Option<T>,
    ) -> T {
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        let mut state = Inner::default();
        loop {
            state.requests = self.requests();
            let pending: Vec<Change> = {
                let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
                log[state.log.len()..].to_vec()
            };
            if pending.is_empty()
                && let Some(found) = f(&state)
            {
                return found;
            }
            for change in pending {
                let key = (
                    change.resource.clone(),
                    change.namespace.clone(),
                    change.object["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                );
                if change.kind == "DELETED" {
                    state.objects.remove(&key);
                } else {
                    state.objects.insert(key, change.object.clone());
                }
                state.log.push(change);
                if let Some(found) = f(&state) {
                    return found;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {limit:?} waiting for {what}"
            );
            let _ = tokio::time::timeout(Duration::from_millis(250), changes.changed()).await;
        }
    }

    /// Creates a namespace.
    pub fn create_namespace(&self, name: &str) {
        self.cp.kubectl(&["create", "namespace", name]);
    }

    /// Creates an object as a user would (`kubectl create`).
    pub fn create(&self, resource: &str, namespace: &str, object: Value) -> Value {
        let out = self.kubectl_stdin(
            &["create", "-n", namespace, "-o", "json", "-f", "-"],
            &object,
        );
        let created: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            FOLLOWED
                .iter()
                .find(|f| created["kind"] == f.3)
                .map_or(resource, |f| f.0),
            resource
        );
        created
    }

    /// Merge-patches an object's main resource as a user would (`kubectl patch --type merge`).
    pub fn patch(&self, resource: &str, namespace: &str, name: &str, patch: Value) -> Value {
        let kind = FOLLOWED
            .iter()
            .find(|f| f.0 == resource)
            .map_or(resource, |f| f.1);
        let out = self.cp.kubectl(&[
            "patch",
            kind,
            name,
            "-n",
            namespace,
            "--type",
            "merge",
            "-p",
            &patch.to_string(),
            "-o",
            "json",
        ]);
        serde_json::from_str(&out).unwrap()
    }

    /// Merge-patches an object's status as anyone allowed to write the status subresource
    /// could (`kubectl patch --subresource status`).
    pub fn patch_status(&self, resource: &str, namespace: &str, name: &str, patch: Value) -> Value {
        let kind = FOLLOWED
            .iter()
            .find(|f| f.0 == resource)
            .map_or(resource, |f| f.1);
        let out = self.cp.kubectl(&[
            "patch",
            kind,
            name,
            "-n",
            namespace,
            "--subresource",
            "status",
            "--type",
            "merge",
            "-p",
            &patch.to_string(),
            "-o",
            "json",
        ]);
        serde_json::from_str(&out).unwrap()
    }

    /// Deletes an object as a user would (`kubectl delete`).
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) {
        let kind = FOLLOWED
            .iter()
            .find(|f| f.0 == resource)
            .map_or(resource, |f| f.1);
        self.cp
            .kubectl(&["delete", kind, name, "-n", namespace, "--wait=false"]);
    }

    fn kubectl_stdin(&self, args: &[&str], input: &Value) -> String {
        use std::io::Write as _;
        let mut child = Command::new(self.cp.tool("kubectl"))
            .env("KUBECONFIG", &self.cp.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

fn name_of(object: &DynamicObject) -> (String, String) {
    (
        object.metadata.namespace.clone().unwrap_or_default(),
        object.metadata.name.clone().unwrap_or_default(),
    )
}

fn record(
    log: &Mutex<Vec<Change>>,
    changed: &watch::Sender<u64>,
    plural: &str,
    kind: &'static str,
    object: &DynamicObject,
) {
    let change = Change {
        rv: object
            .metadata
            .resource_version
            .as_deref()
            .and_then(|rv| rv.parse().ok())
            .unwrap_or(0),
        resource: plural.into(),
        namespace: object.metadata.namespace.clone().unwrap_or_default(),
        kind,
        object: serde_json::to_value(object).unwrap(),
    };
    log.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(change);
    changed.send_modify(|n| *n += 1);
}

/// Records every change to one resource, from `rv` on, re-opening the watch when the server
/// ends it. When the server no longer has `rv` (410 Gone, e.g. after the CRD changed), it lists
/// again and records the differences to what it knew.
async fn follow(
    api: Api<DynamicObject>,
    plural: &'static str,
    mut rv: String,
    mut known: BTreeMap<(String, String), Option<String>>,
    log: Arc<Mutex<Vec<Change>>>,
    changed: watch::Sender<u64>,
) {
    loop {
        let params = WatchParams::default().timeout(290);
        let Ok(stream) = api.watch(&params, &rv).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut stream = stream.boxed();
        while let Ok(Some(event)) = stream.try_next().await {
            let (kind, object) = match event {
                WatchEvent::Added(o) => ("ADDED", o),
                WatchEvent::Modified(o) => ("MODIFIED", o),
                WatchEvent::Deleted(o) => ("DELETED", o),
                WatchEvent::Bookmark(b) => {
                    rv = b.metadata.resource_version;
                    continue;
                }
                WatchEvent::Error(e) if e.code == 410 => {
                    let Ok(list) = api.list(&ListParams::default()).await else {
                        break;
                    };
                    let mut now = BTreeMap::new();
                    for object in &list.items {
                        let name = name_of(object);
                        let version = object.metadata.resource_version.clone();
                        match known.get(&name) {
                            None => record(&log, &changed, plural, "ADDED", object),
                            Some(v) if *v != version => {
                                record(&log, &changed, plural, "MODIFIED", object);
                            }
                            Some(_) => {}
                        }
                        now.insert(name, version);
                    }
                    for (ns, name) in known.keys().filter(|k| !now.contains_key(*k)) {
                        let gone = DynamicObject {
                            types: None,
                            metadata: kube::api::ObjectMeta {
                                name: Some(name.clone()),
                                namespace: Some(ns.clone()),
                                ..Default::default()
                            },
                            data: serde_json::json!({}),
                        };
                        record(&log, &changed, plural, "DELETED", &gone);
                    }
                    known = now;
                    rv = list.metadata.resource_version.unwrap_or_default();
                    break;
                }
                WatchEvent::Error(e) => panic!("watch of {plural} failed: {e:?}"),
            };
            rv = object.metadata.resource_version.clone().unwrap_or_default();
            if kind == "DELETED" {
                known.remove(&name_of(&object));
            } else {
                known.insert(name_of(&object), object.metadata.resource_version.clone());
            }
            record(&log, &changed, plural, kind, &object);
        }
    }
}
