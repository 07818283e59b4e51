//! Where to probe. `spec.endpoint.host` wins; without it the address comes from Azure
//! ([`AzureResolver`]), cached so that probing never costs ARM reads: a healthy VM's address is
//! looked up again every [`ResolverPolicy::healthy_ttl`], a failing VM's after
//! [`ResolverPolicy::failing_ttl`], and at once after a rung that may move it (NIC reset,
//! redeploy).
//!
//! With a host override the address is the spec's, but the computer the endpoint must answer
//! as still comes from Azure (`osProfile.computerName`, one VM read, cached like an address):
//! the identity step then knows whom it should reach. When that read fails the endpoint is
//! probed without an expected name.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

use super::spec::ValidSpec;
use crate::{
    api::{AddressType, EndpointSource, ResolvedEndpoint},
    azure::{Azure, AzureError, VmRef},
    probe::BoxFuture,
};

/// Why the endpoint could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// No host override and no way to ask Azure.
    #[error(
        "spec.endpoint.host is required: the operator runs without Azure credentials, so it cannot look up the VM's address (observe-only)"
    )]
    HostRequired,
    /// The VM has no address of the requested type.
    #[error("the VM's primary network interface has no {0} IP address")]
    NoAddress(&'static str),
    /// Azure could not be asked (throttled, not found, forbidden, network).
    #[error("failed to look up the VM's address in Azure: {message}")]
    Azure {
        /// The Azure error's PascalCase reason.
        reason: &'static str,
        /// What happened.
        message: String,
    },
}

impl ResolveError {
    /// PascalCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::HostRequired => crate::api::reasons::ENDPOINT_UNRESOLVED,
            Self::NoAddress(_) => "NoAddress",
            Self::Azure { .. } => "AzureLookupFailed",
        }
    }

    /// Whether only a change of the object can help (otherwise the lookup is retried).
    pub fn needs_object_change(&self) -> bool {
        matches!(self, Self::HostRequired)
    }
}

/// Finds the address to probe for a VM.
pub trait EndpointResolver: Send + Sync {
    /// Resolves the endpoint of `spec`'s VM.
    fn resolve<'a>(
        &'a self,
        spec: &'a ValidSpec,
    ) -> BoxFuture<'a, Result<ResolvedEndpoint, ResolveError>>;

    /// A probe of the resolved endpoint failed: the address may be stale.
    fn probe_failed(&self, _spec: &ValidSpec) {}

    /// A rung may have changed the VM's addresses: look them up again on the next probe.
    fn forget(&self, _spec: &ValidSpec) {}
}

/// Uses `spec.endpoint.host` and nothing else.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostOverride;

impl HostOverride {
    /// The endpoint named by the spec, if it names one.
    pub fn endpoint(spec: &ValidSpec) -> Result<ResolvedEndpoint, ResolveError> {
        match &spec.host {
            Some(host) => Ok(ResolvedEndpoint {
                host: host.clone(),
                port: spec.port,
                source: EndpointSource::Spec,
                computer_name: None,
            }),
            None => Err(ResolveError::HostRequired),
        }
    }
}

impl EndpointResolver for HostOverride {
    fn resolve<'a>(
        &'a self,
        spec: &'a ValidSpec,
    ) -> BoxFuture<'a, Result<ResolvedEndpoint, ResolveError>> {
        Box::pin(std::future::ready(Self::endpoint(spec)))
    }
}

/// How long looked-up addresses are reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolverPolicy {
    /// While probes succeed. A lookup costs two or three ARM reads (VM, NIC, public IP), so
    /// 12 hours keep a healthy VM at about 0.25 reads an hour.
    pub healthy_ttl: Duration,
    /// After a failed probe the address is looked up again once it is this old.
    pub failing_ttl: Duration,
    /// A failed lookup is not repeated for this long.
    pub error_ttl: Duration,
}

impl Default for ResolverPolicy {
    fn default() -> Self {
        Self {
            healthy_ttl: Duration::from_secs(12 * 3600),
            failing_ttl: Duration::from_secs(600),
            error_ttl: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    result: Result<ResolvedEndpoint, ResolveError>,
    at: Instant,
    ttl: Duration,
}

/// `spec.endpoint.host` when given, otherwise the VM's public or private IP from Azure
/// (`spec.endpoint.addressType`), cached per VM and address type.
pub struct AzureResolver {
    azure: Arc<dyn Azure>,
    policy: ResolverPolicy,
    cache: Mutex<HashMap<String, Entry>>,
}

impl std::fmt::Debug for AzureResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureResolver")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl AzureResolver {
    /// A resolver asking `azure`.
    pub fn new(azure: Arc<dyn Azure>, policy: ResolverPolicy) -> Self {
        Self {
            azure,
            policy,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn key(spec: &ValidSpec) -> String {
        format!(
            "{}/{}/{}/{:?}/{}",
            spec.vm.subscription,
            spec.vm.resource_group,
            spec.vm.name,
            spec.address_type,
            spec.host.as_deref().unwrap_or_default()
        )
        .to_ascii_lowercase()
    }

    fn cached(&self, key: &str) -> Option<Result<ResolvedEndpoint, ResolveError>> {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache
            .get(key)
            .filter(|e| e.at.elapsed() < e.ttl)
            .map(|e| e.result.clone())
    }

    fn remember(&self, key: String, result: &Result<ResolvedEndpoint, ResolveError>) {
        let ttl = if result.is_ok() {
            self.policy.healthy_ttl
        } else {
            self.policy.error_ttl
        };
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                key,
                Entry {
                    result: result.clone(),
                    at: Instant::now(),
                    ttl,
                },
            );
    }

    /// The VM's computer name for a host override (cached; `None` when Azure cannot say).
    async fn computer_name(&self, spec: &ValidSpec) -> Option<String> {
        let key = Self::key(spec);
        let result = match self.cached(&key) {
            Some(hit) => hit,
            None => {
                let result = self.lookup_name(spec).await;
                self.remember(key, &result);
                result
            }
        };
        result.ok().and_then(|e| e.computer_name)
    }

    async fn lookup_name(&self, spec: &ValidSpec) -> Result<ResolvedEndpoint, ResolveError> {
        let vm = VmRef::new(
            &spec.vm.subscription,
            &spec.vm.resource_group,
            &spec.vm.name,
        );
        let state = self.azure.vm_state(&vm).await.map_err(azure_error)?;
        let mut endpoint = HostOverride::endpoint(spec)?;
        endpoint.computer_name = state.computer_name;
        Ok(endpoint)
    }

    async fn lookup(&self, spec: &ValidSpec) -> Result<ResolvedEndpoint, ResolveError> {
        let vm = VmRef::new(
            &spec.vm.subscription,
            &spec.vm.resource_group,
            &spec.vm.name,
        );
        let endpoint = self.azure.endpoint(&vm).await.map_err(azure_error)?;
        let (address, kind) = match spec.address_type {
            AddressType::Public => (endpoint.public_ip, "public"),
            AddressType::Private => (endpoint.private_ip, "private"),
        };
        let host = address
            .filter(|a| !a.is_empty())
            .ok_or(ResolveError::NoAddress(kind))?;
        Ok(ResolvedEndpoint {
            host,
            port: spec.port,
            source: EndpointSource::Azure,
            computer_name: endpoint.computer_name,
        })
    }
}

fn azure_error(e: AzureError) -> ResolveError {
    ResolveError::Azure {
        reason: e.reason(),
        message: e.to_string(),
    }
}

impl EndpointResolver for AzureResolver {
    fn resolve<'a>(
        &'a self,
        spec: &'a ValidSpec,
    ) -> BoxFuture<'a, Result<ResolvedEndpoint, ResolveError>> {
        Box::pin(async move {
            if spec.host.is_some() {
                let mut endpoint = HostOverride::endpoint(spec)?;
                endpoint.computer_name = self.computer_name(spec).await;
                return Ok(endpoint);
            }
            let key = Self::key(spec);
            if let Some(hit) = self.cached(&key) {
                return hit;
            }
            let result = self.lookup(spec).await;
            self.remember(key, &result);
            result
        })
    }

    fn probe_failed(&self, spec: &ValidSpec) {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = cache.get_mut(&Self::key(spec)) {
            e.ttl = e.ttl.min(self.policy.failing_ttl);
        }
    }

    fn forget(&self, spec: &ValidSpec) {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&Self::key(spec));
    }
}
