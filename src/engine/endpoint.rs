//! Where to probe. Resolution from Azure plugs in behind [`EndpointResolver`]; until it is
//! configured, only `spec.endpoint.host` can name the endpoint.

use super::spec::ValidSpec;
use crate::{
    api::{EndpointSource, ResolvedEndpoint},
    probe::BoxFuture,
};

/// Why the endpoint could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// No host override and no way to ask Azure.
    #[error("endpoint host required until Azure resolution is configured")]
    HostRequired,
}

impl ResolveError {
    /// PascalCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::HostRequired => crate::api::reasons::ENDPOINT_UNRESOLVED,
        }
    }
}

/// Finds the address to probe for a VM.
pub trait EndpointResolver: Send + Sync {
    /// Resolves the endpoint of `spec`'s VM.
    fn resolve<'a>(
        &'a self,
        spec: &'a ValidSpec,
    ) -> BoxFuture<'a, Result<ResolvedEndpoint, ResolveError>>;
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
