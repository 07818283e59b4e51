//! Acting as another workload identity: the per-namespace Azure identities of the tenancy
//! policy. Workload identity federation lets one projected service-account token
//! (`AZURE_FEDERATED_TOKEN_FILE`) be exchanged for tokens of any Entra ID application or
//! managed identity that trusts the operator's service account; only the client ID (and
//! perhaps the tenant) differs.

use std::{path::PathBuf, sync::Arc};

use azure_core::{HttpClient, Url};

use super::{ArmClient, ArmConfig, AzureError, WorkloadIdentity};

/// A workload identity the operator may act as.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AzureIdentity {
    /// The application's (or user-assigned managed identity's) client ID, lower case.
    pub client_id: String,
    /// Its tenant, when it differs from the operator's (`AZURE_TENANT_ID`).
    pub tenant_id: Option<String>,
}

/// Builds ARM clients that act as a given identity by exchanging the operator's federated
/// token for it.
pub struct Federation {
    http: Arc<dyn HttpClient>,
    authority: Url,
    tenant_id: Option<String>,
    token_file: Option<PathBuf>,
    arm: ArmConfig,
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("authority", &self.authority.as_str())
            .field("tenant_id", &self.tenant_id)
            .field("token_file", &self.token_file)
            .finish_non_exhaustive()
    }
}

impl Federation {
    /// Exchanges `token_file` (the projected service-account token) at `authority`, in
    /// `tenant_id` unless an identity names its own; the clients talk to `arm`.
    pub fn new(
        arm: ArmConfig,
        authority: Url,
        tenant_id: Option<String>,
        token_file: Option<PathBuf>,
    ) -> Self {
        Self {
            http: azure_core::new_http_client(),
            authority,
            tenant_id,
            token_file,
            arm,
        }
    }

    /// From the variables the workload-identity webhook injects (`AZURE_FEDERATED_TOKEN_FILE`,
    /// `AZURE_TENANT_ID`, `AZURE_AUTHORITY_HOST`); without a token file every identity is
    /// refused.
    pub fn from_env(arm: ArmConfig) -> Result<Self, AzureError> {
        let host = std::env::var("AZURE_AUTHORITY_HOST")
            .unwrap_or_else(|_| "https://login.microsoftonline.com".to_owned());
        let authority = Url::parse(&host)
            .map_err(|e| AzureError::invalid(format!("AZURE_AUTHORITY_HOST {host:?}: {e}")))?;
        let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        Ok(Self::new(
            arm,
            authority,
            var("AZURE_TENANT_ID"),
            var("AZURE_FEDERATED_TOKEN_FILE").map(PathBuf::from),
        ))
    }

    /// An ARM client whose every request carries a token of `identity` (and never the
    /// operator's own). Its own limiter: ARM throttles per principal and subscription.
    pub fn client(&self, identity: &AzureIdentity) -> Result<ArmClient, AzureError> {
        let client = &identity.client_id;
        let Some(token_file) = &self.token_file else {
            return Err(AzureError::Unauthorized {
                message: format!(
                    "the tenancy policy names Azure identity {client} for this namespace, but the operator has no federated token (AZURE_FEDERATED_TOKEN_FILE, workload identity) to act as it"
                ),
            });
        };
        let Some(tenant) = identity.tenant_id.as_ref().or(self.tenant_id.as_ref()) else {
            return Err(AzureError::Unauthorized {
                message: format!(
                    "the tenancy policy names Azure identity {client} for this namespace without azureTenantId, and the operator has no AZURE_TENANT_ID"
                ),
            });
        };
        let credential = WorkloadIdentity::new(
            self.http.clone(),
            self.authority.clone(),
            tenant.clone(),
            client.clone(),
            token_file.clone(),
        );
        Ok(ArmClient::new(self.arm.clone(), Arc::new(credential)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(tenant: Option<&str>) -> AzureIdentity {
        AzureIdentity {
            client_id: "11111111-1111-1111-1111-111111111111".into(),
            tenant_id: tenant.map(str::to_string),
        }
    }

    fn federation(tenant: Option<&str>, file: Option<&str>) -> Federation {
        let url = Url::parse("http://127.0.0.1:9").unwrap();
        Federation::new(
            ArmConfig::new(url.clone()),
            url,
            tenant.map(str::to_string),
            file.map(PathBuf::from),
        )
    }

    #[test]
    fn without_a_federated_token_no_identity_is_usable() {
        let Err(e) = federation(Some("t"), None).client(&identity(None)) else {
            panic!("a client without a token file");
        };
        assert!(e.to_string().contains("AZURE_FEDERATED_TOKEN_FILE"), "{e}");
    }

    #[test]
    fn a_tenant_is_needed_from_the_entry_or_the_environment() {
        assert!(
            federation(None, Some("/t"))
                .client(&identity(None))
                .is_err()
        );
        assert!(
            federation(None, Some("/t"))
                .client(&identity(Some("22222222-2222-2222-2222-222222222222")))
                .is_ok()
        );
        assert!(
            federation(Some("t"), Some("/t"))
                .client(&identity(None))
                .is_ok()
        );
    }
}
