//! The Secret store against a real API server: what lands in the Secret at each step
//! of a password reset, and what is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::real_api::RealApiServer;
use k8s_openapi::{ByteString, jiff::Timestamp};
use rdphealth::{
    azure::Password,
    secrets::{KubeSecrets, SecretError, SecretRef, SecretStore},
};
use serde_json::{Value, json};

fn at(name: &str) -> SecretRef {
    SecretRef {
        namespace: "ns".into(),
        name: name.into(),
    }
}

fn data(api: &RealApiServer, name: &str) -> (Value, Vec<(String, String)>) {
    let secret = api.read(|inner| inner.get("secrets", "ns", name).cloned().unwrap());
    let mut keys: Vec<(String, String)> = secret["data"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| {
                    let b: ByteString = serde_json::from_value(v.clone()).unwrap();
                    (k.clone(), String::from_utf8(b.0).unwrap())
                })
                .collect()
        })
        .unwrap_or_default();
    keys.sort();
    (
        secret["metadata"]["annotations"]["rdphealth.io/password-state"].clone(),
        keys,
    )
}

fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

#[tokio::test]
async fn a_reset_goes_pending_then_applied_and_never_loses_a_password() {
    let api = RealApiServer::start().await;
    api.create_namespace("ns");
    let store = KubeSecrets::new(api.client());
    let now = Timestamp::UNIX_EPOCH;
    let s = at("vm-admin");

    store
        .stage(&s, "rdpadmin", &Password::new("p1"), now)
        .await
        .unwrap();
    let (state, keys) = data(&api, "vm-admin");
    assert_eq!(state, "pending");
    assert_eq!(
        keys,
        kv(&[("pendingPassword", "p1"), ("username", "rdpadmin")])
    );
    let secret = api.read(|inner| inner.get("secrets", "ns", "vm-admin").cloned().unwrap());
    assert_eq!(secret["type"], "Opaque");
    assert_eq!(
        secret["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "rdphealth-operator"
    );
    assert!(secret["metadata"]["ownerReferences"].is_null());

    store.commit(&s, now).await.unwrap();
    let (state, keys) = data(&api, "vm-admin");
    assert_eq!(state, "applied");
    assert_eq!(keys, kv(&[("password", "p1"), ("username", "rdpadmin")]));

    // Refused by Azure: the known password stays.
    store
        .stage(&s, "rdpadmin", &Password::new("p2"), now)
        .await
        .unwrap();
    store.discard(&s).await.unwrap();
    let (state, keys) = data(&api, "vm-admin");
    assert_eq!(state, "failed");
    assert_eq!(keys, kv(&[("password", "p1"), ("username", "rdpadmin")]));

    // Outcome never learned, then a new reset: both candidates stay until one is confirmed.
    store
        .stage(&s, "rdpadmin", &Password::new("p3"), now)
        .await
        .unwrap();
    store
        .stage(&s, "rdpadmin", &Password::new("p4"), now)
        .await
        .unwrap();
    let (_, keys) = data(&api, "vm-admin");
    assert_eq!(
        keys,
        kv(&[
            ("password", "p1"),
            ("pendingPassword", "p4"),
            ("unconfirmedPassword", "p3"),
            ("username", "rdpadmin"),
        ])
    );
    store.commit(&s, now).await.unwrap();
    let (_, keys) = data(&api, "vm-admin");
    assert_eq!(keys, kv(&[("password", "p4"), ("username", "rdpadmin")]));
}

#[tokio::test]
async fn a_secret_of_another_type_is_not_touched() {
    let api = RealApiServer::start().await;
    api.create_namespace("ns");
    api.create(
        "secrets",
        "ns",
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "tls", "namespace": "ns"},
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": "Y3J0", "tls.key": "a2V5"},
        }),
    );
    let store = KubeSecrets::new(api.client());
    let err = store
        .stage(
            &at("tls"),
            "rdpadmin",
            &Password::new("p1"),
            Timestamp::UNIX_EPOCH,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, SecretError::WrongType(_, ref t) if t == "kubernetes.io/tls"));
    assert!(!err.to_string().contains("p1"));
    let (_, keys) = data(&api, "tls");
    assert_eq!(keys, kv(&[("tls.crt", "crt"), ("tls.key", "key")]));
}
