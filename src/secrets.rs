//! Where the `ResetPassword` rung keeps the passwords it generates: a Kubernetes Secret named
//! by the spec, never status, Events or logs.
//!
//! The password is written to the Secret *before* it is sent to Azure, so it cannot be lost:
//!
//! | key / annotation | meaning |
//! |---|---|
//! | `username` | the account the rung resets |
//! | `password` | the password the VM is known to have (after a reset that succeeded) |
//! | `pendingPassword` | a password sent to Azure whose outcome is not known yet |
//! | `unconfirmedPassword` | an earlier pending password whose outcome was never learned (the operator stopped mid-call), kept when a newer reset starts until one is confirmed |
//! | `rdphealth.io/password-state` | `pending` (sent, outcome unknown: one of the two works), `applied`, `failed` (`password` is unchanged) |
//! | `rdphealth.io/password-changed-at` | when `password` last changed |
//!
//! The operator writes only into Secrets it created: they carry the label
//! `app.kubernetes.io/managed-by: rdphealth-operator`. A Secret of that name that exists
//! without the label belongs to someone else and is left untouched (the rung is refused with
//! that reason before anything is sent to Azure).
//!
//! When Azure reports success the pending password replaces `password`; when it reports a
//! failure the pending password is dropped. If the operator stops in between, the Secret stays
//! `pending` with both values.

use std::{collections::BTreeMap, sync::Mutex};

use k8s_openapi::{api::core::v1::Secret, jiff::Timestamp};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::json;

use crate::{api::FIELD_MANAGER, azure::Password};

/// Key of the account name.
pub const USERNAME_KEY: &str = "username";
/// Key of the password the VM has.
pub const PASSWORD_KEY: &str = "password";
/// Key of a password whose reset has not been confirmed.
pub const PENDING_KEY: &str = "pendingPassword";
/// Key of an earlier pending password whose reset's outcome was never learned.
pub const UNCONFIRMED_KEY: &str = "unconfirmedPassword";
/// Annotation with the state of the last reset.
pub const STATE_ANNOTATION: &str = "rdphealth.io/password-state";
/// Annotation with the time `password` last changed.
pub const CHANGED_ANNOTATION: &str = "rdphealth.io/password-changed-at";

/// Length of generated passwords (Azure accepts 12–123 characters for Windows).
pub const PASSWORD_LENGTH: usize = 24;

/// The Secret a password goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    /// Namespace (the `RdpHealth`'s own).
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why the Secret could not be written; never carries the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// The Secret exists with a type other than `Opaque`.
    #[error("Secret {0} has type {1}; the password is only written to an Opaque Secret")]
    WrongType(String, String),
    /// The Secret exists but the operator did not create it.
    #[error(
        "Secret {0} was not created by rdphealth-operator (it lacks the label {MANAGED_BY_LABEL}={FIELD_MANAGER}); the operator never writes into a Secret it did not create: name a Secret that does not exist yet"
    )]
    NotManaged(String),
    /// The API server refused or failed.
    #[error("Secret {0}: {1}")]
    Api(String, String),
}

/// Stores generated passwords.
#[async_trait::async_trait]
pub trait SecretStore: Send + Sync {
    /// Writes `password` as `pendingPassword` (creating the Secret if needed).
    async fn stage(
        &self,
        at: &SecretRef,
        username: &str,
        password: &Password,
        now: Timestamp,
    ) -> Result<(), SecretError>;

    /// Azure confirmed the reset: the pending password becomes `password`. Idempotent.
    async fn commit(&self, at: &SecretRef, now: Timestamp) -> Result<(), SecretError>;

    /// Azure refused the reset: the pending password is dropped. Idempotent.
    async fn discard(&self, at: &SecretRef) -> Result<(), SecretError>;
}

const LOWER: &[u8] = b"abcdefghijkmnopqrstuvwxyz";
const UPPER: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ";
const DIGITS: &[u8] = b"23456789";
const SYMBOLS: &[u8] = b"!#%+-=?@^_~";

/// A random password that meets Azure's Windows complexity rules: [`PASSWORD_LENGTH`]
/// characters with lower case, upper case, digits and symbols, from the OS's random source.
pub fn generate_password() -> Result<Password, getrandom::Error> {
    let classes = [LOWER, UPPER, DIGITS, SYMBOLS];
    let all: Vec<u8> = classes.concat();
    loop {
        let mut out = Vec::with_capacity(PASSWORD_LENGTH);
        while out.len() < PASSWORD_LENGTH {
            let mut buf = [0u8; 64];
            getrandom::fill(&mut buf)?;
            // Rejection sampling keeps every character equally likely.
            let limit = 256 - 256 % all.len();
            out.extend(
                buf.iter()
                    .filter(|b| usize::from(**b) < limit)
                    .map(|b| all[usize::from(*b) % all.len()])
                    .take(PASSWORD_LENGTH - out.len()),
            );
        }
        if classes.iter().all(|c| out.iter().any(|b| c.contains(b))) {
            return Ok(Password::new(String::from_utf8_lossy(&out).into_owned()));
        }
    }
}

/// Secrets through the Kubernetes API.
pub struct KubeSecrets {
    client: Client,
}

impl KubeSecrets {
    /// Uses `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    fn api(&self, at: &SecretRef) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &at.namespace)
    }
}

fn api_error(at: &SecretRef, e: &kube::Error) -> SecretError {
    let message = match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.reason),
        other => other.to_string(),
    };
    SecretError::Api(at.to_string(), message)
}

/// The label that marks Secrets the operator created.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

fn managed_labels() -> BTreeMap<String, String> {
    BTreeMap::from([(MANAGED_BY_LABEL.to_string(), FIELD_MANAGER.to_string())])
}

/// Refuses a Secret the operator did not create (no managed-by label with its name).
fn ensure_managed(at: &SecretRef, secret: &Secret) -> Result<(), SecretError> {
    let ours = secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == FIELD_MANAGER);
    if ours {
        Ok(())
    } else {
        Err(SecretError::NotManaged(at.to_string()))
    }
}

#[async_trait::async_trait]
impl SecretStore for KubeSecrets {
    async fn stage(
        &self,
        at: &SecretRef,
        username: &str,
        password: &Password,
        _now: Timestamp,
    ) -> Result<(), SecretError> {
        let api = self.api(at);
        let existing = api.get_opt(&at.name).await.map_err(|e| api_error(at, &e))?;
        match existing {
            None => {
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(at.name.clone()),
                        namespace: Some(at.namespace.clone()),
                        labels: Some(managed_labels()),
                        annotations: Some(BTreeMap::from([(
                            STATE_ANNOTATION.to_string(),
                            "pending".to_string(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    type_: Some("Opaque".into()),
                    string_data: Some(BTreeMap::from([
                        (USERNAME_KEY.to_string(), username.to_string()),
                        (PENDING_KEY.to_string(), password.expose().to_string()),
                    ])),
                    ..Secret::default()
                };
                api.create(&PostParams::default(), &secret)
                    .await
                    .map(|_| ())
                    .map_err(|e| api_error(at, &e))
            }
            Some(s) => {
                let type_ = s.type_.clone().unwrap_or_else(|| "Opaque".into());
                if type_ != "Opaque" {
                    return Err(SecretError::WrongType(at.to_string(), type_));
                }
                ensure_managed(at, &s)?;
                let mut patch = json!({
                    "metadata": { "annotations": { STATE_ANNOTATION: "pending" } },
                    "stringData": {
                        USERNAME_KEY: username,
                        PENDING_KEY: password.expose(),
                    }
                });
                // A pending password still here was never confirmed nor refused: the VM may
                // have it. Keep it until a newer reset is confirmed.
                if let Some(earlier) = s.data.as_ref().and_then(|d| d.get(PENDING_KEY)) {
                    patch["data"] = json!({ UNCONFIRMED_KEY: earlier });
                }
                api.patch(&at.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ())
                    .map_err(|e| api_error(at, &e))
            }
        }
    }

    async fn commit(&self, at: &SecretRef, now: Timestamp) -> Result<(), SecretError> {
        let api = self.api(at);
        let secret = api.get(&at.name).await.map_err(|e| api_error(at, &e))?;
        ensure_managed(at, &secret)?;
        let Some(pending) = secret.data.as_ref().and_then(|d| d.get(PENDING_KEY)) else {
            return Ok(());
        };
        let patch = json!({
            "metadata": { "annotations": {
                STATE_ANNOTATION: "applied",
                CHANGED_ANNOTATION: now.to_string(),
            } },
            "data": { PASSWORD_KEY: pending, PENDING_KEY: null, UNCONFIRMED_KEY: null }
        });
        api.patch(&at.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(|e| api_error(at, &e))
    }

    async fn discard(&self, at: &SecretRef) -> Result<(), SecretError> {
        let secret = self
            .api(at)
            .get(&at.name)
            .await
            .map_err(|e| api_error(at, &e))?;
        ensure_managed(at, &secret)?;
        let patch = json!({
            "metadata": { "annotations": { STATE_ANNOTATION: "failed" } },
            "data": { PENDING_KEY: null }
        });
        self.api(at)
            .patch(&at.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(|e| api_error(at, &e))
    }
}

/// One Secret held in memory (the demo and tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredSecret {
    /// Data keys and values.
    pub data: BTreeMap<String, String>,
    /// The state annotation.
    pub state: String,
}

/// Secrets in memory, for the demo and tests.
#[derive(Debug, Default)]
pub struct MemorySecrets {
    secrets: Mutex<BTreeMap<String, StoredSecret>>,
    /// Fail every write with this message (tests of the refusal path).
    pub fail_with: Mutex<Option<String>>,
}

impl MemorySecrets {
    /// A copy of the Secret `namespace/name`.
    pub fn get(&self, at: &SecretRef) -> Option<StoredSecret> {
        self.secrets.lock().ok()?.get(&at.to_string()).cloned()
    }

    fn write(
        &self,
        at: &SecretRef,
        f: impl FnOnce(&mut BTreeMap<String, StoredSecret>),
    ) -> Result<(), SecretError> {
        if let Some(message) = self.fail_with.lock().ok().and_then(|m| m.clone()) {
            return Err(SecretError::Api(at.to_string(), message));
        }
        let mut secrets = self
            .secrets
            .lock()
            .map_err(|_| SecretError::Api(at.to_string(), "store poisoned".into()))?;
        f(&mut secrets);
        Ok(())
    }
}

#[async_trait::async_trait]
impl SecretStore for MemorySecrets {
    async fn stage(
        &self,
        at: &SecretRef,
        username: &str,
        password: &Password,
        _now: Timestamp,
    ) -> Result<(), SecretError> {
        self.write(at, |m| {
            let s = m.entry(at.to_string()).or_default();
            if let Some(earlier) = s.data.remove(PENDING_KEY) {
                s.data.insert(UNCONFIRMED_KEY.into(), earlier);
            }
            s.data.insert(USERNAME_KEY.into(), username.into());
            s.data
                .insert(PENDING_KEY.into(), password.expose().to_string());
            s.state = "pending".into();
        })
    }

    async fn commit(&self, at: &SecretRef, _now: Timestamp) -> Result<(), SecretError> {
        self.write(at, |m| {
            if let Some(s) = m.get_mut(&at.to_string())
                && let Some(p) = s.data.remove(PENDING_KEY)
            {
                s.data.remove(UNCONFIRMED_KEY);
                s.data.insert(PASSWORD_KEY.into(), p);
                s.state = "applied".into();
            }
        })
    }

    async fn discard(&self, at: &SecretRef) -> Result<(), SecretError> {
        self.write(at, |m| {
            if let Some(s) = m.get_mut(&at.to_string()) {
                s.data.remove(PENDING_KEY);
                s.state = "failed".into();
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_passwords_meet_azure_complexity_and_differ() {
        let a = generate_password().unwrap();
        let b = generate_password().unwrap();
        for p in [&a, &b] {
            let p = p.expose();
            assert_eq!(p.len(), PASSWORD_LENGTH);
            assert!(p.bytes().any(|c| c.is_ascii_lowercase()));
            assert!(p.bytes().any(|c| c.is_ascii_uppercase()));
            assert!(p.bytes().any(|c| c.is_ascii_digit()));
            assert!(p.bytes().any(|c| SYMBOLS.contains(&c)));
        }
        assert_ne!(a.expose(), b.expose());
    }

    #[tokio::test]
    async fn pending_then_applied_or_failed() {
        let store = MemorySecrets::default();
        let at = SecretRef {
            namespace: "ns".into(),
            name: "vm-admin".into(),
        };
        let now = Timestamp::UNIX_EPOCH;
        store
            .stage(&at, "rdpadmin", &Password::new("first"), now)
            .await
            .unwrap();
        store.commit(&at, now).await.unwrap();
        store
            .stage(&at, "rdpadmin", &Password::new("second"), now)
            .await
            .unwrap();
        let s = store.get(&at).unwrap();
        assert_eq!(s.state, "pending");
        assert_eq!(s.data[PASSWORD_KEY], "first");
        assert_eq!(s.data[PENDING_KEY], "second");
        store.discard(&at).await.unwrap();
        let s = store.get(&at).unwrap();
        assert_eq!(s.state, "failed");
        assert_eq!(
            s.data[PASSWORD_KEY], "first",
            "a failed reset keeps the old one"
        );
        assert!(!s.data.contains_key(PENDING_KEY));
        // Committing twice (a repeated poll) changes nothing.
        store.commit(&at, now).await.unwrap();
        assert_eq!(store.get(&at).unwrap().data[PASSWORD_KEY], "first");
        // A reset whose outcome was never learned, then a new one: both stay until one is
        // confirmed, so whichever the VM has is in the Secret.
        for p in ["third", "fourth"] {
            store
                .stage(&at, "rdpadmin", &Password::new(p), now)
                .await
                .unwrap();
        }
        let s = store.get(&at).unwrap();
        assert_eq!(s.data[UNCONFIRMED_KEY], "third");
        assert_eq!(s.data[PENDING_KEY], "fourth");
        store.discard(&at).await.unwrap();
        assert_eq!(store.get(&at).unwrap().data[UNCONFIRMED_KEY], "third");
        store
            .stage(&at, "rdpadmin", &Password::new("fifth"), now)
            .await
            .unwrap();
        store.commit(&at, now).await.unwrap();
        let s = store.get(&at).unwrap();
        assert_eq!(s.data[PASSWORD_KEY], "fifth");
        assert!(!s.data.contains_key(UNCONFIRMED_KEY));
    }
}
