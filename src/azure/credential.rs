//! Credentials: workload identity that re-reads its projected token on every exchange, a
//! client secret from the environment, the Azure CLI, and a static token for the simulator.

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use azure_core::{
    HttpClient, Url,
    auth::{AccessToken, Secret, TokenCredential},
    error::{Error, ErrorKind},
};
use time::OffsetDateTime;
use tokio::sync::Mutex;

use super::error::AzureError;

/// Bound on one token exchange (the identity flow sets no timeout of its own).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The scope of Azure Resource Manager, whatever endpoint the clients talk to.
pub const ARM_SCOPE: &str = "https://management.azure.com/.default";

/// A fixed bearer token (the simulator accepts any).
pub struct StaticToken(Secret);

impl StaticToken {
    /// Wraps `token`.
    pub fn new(token: impl Into<String>) -> Self {
        Self(Secret::new(token.into()))
    }
}

impl std::fmt::Debug for StaticToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StaticToken(<redacted>)")
    }
}

#[async_trait::async_trait]
impl TokenCredential for StaticToken {
    async fn get_token(&self, _scopes: &[&str]) -> azure_core::Result<AccessToken> {
        Ok(AccessToken::new(
            self.0.clone(),
            OffsetDateTime::now_utc() + Duration::from_secs(3600),
        ))
    }

    async fn clear_cache(&self) -> azure_core::Result<()> {
        Ok(())
    }
}

/// Workload identity (AKS): exchanges the projected service-account token for an AAD token.
/// Unlike the 0.21 SDK credential it reads the token file on every exchange, so a rotated
/// projected token is picked up; AAD tokens are cached per scope set and refreshed before
/// they expire, one exchange at a time.
pub struct WorkloadIdentity {
    http: Arc<dyn HttpClient>,
    authority: Url,
    tenant_id: String,
    client_id: String,
    token_file: PathBuf,
    refresh_margin: Duration,
    cache: Mutex<HashMap<String, AccessToken>>,
}

impl std::fmt::Debug for WorkloadIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadIdentity")
            .field("authority", &self.authority.as_str())
            .field("tenant_id", &self.tenant_id)
            .field("client_id", &self.client_id)
            .field("token_file", &self.token_file)
            .finish_non_exhaustive()
    }
}

impl WorkloadIdentity {
    /// A credential for `client_id` in `tenant_id`, exchanging at `authority`.
    pub fn new(
        http: Arc<dyn HttpClient>,
        authority: Url,
        tenant_id: impl Into<String>,
        client_id: impl Into<String>,
        token_file: impl Into<PathBuf>,
    ) -> Self {
        Self {
            http,
            authority,
            tenant_id: tenant_id.into(),
            client_id: client_id.into(),
            token_file: token_file.into(),
            refresh_margin: Duration::from_secs(300),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Refreshes a cached token when less than `margin` of its life is left.
    pub fn with_refresh_margin(mut self, margin: Duration) -> Self {
        self.refresh_margin = margin;
        self
    }

    /// From the variables the workload-identity webhook injects (`AZURE_CLIENT_ID`,
    /// `AZURE_TENANT_ID`, `AZURE_FEDERATED_TOKEN_FILE`, `AZURE_AUTHORITY_HOST`); `None`
    /// when they are not all set.
    pub fn from_env() -> Result<Option<Self>, AzureError> {
        let (Ok(client), Ok(tenant), Ok(file)) = (
            std::env::var("AZURE_CLIENT_ID"),
            std::env::var("AZURE_TENANT_ID"),
            std::env::var("AZURE_FEDERATED_TOKEN_FILE"),
        ) else {
            return Ok(None);
        };
        let host = std::env::var("AZURE_AUTHORITY_HOST")
            .unwrap_or_else(|_| "https://login.microsoftonline.com".to_owned());
        let authority = Url::parse(&host)
            .map_err(|e| AzureError::invalid(format!("AZURE_AUTHORITY_HOST {host:?}: {e}")))?;
        Ok(Some(Self::new(
            azure_core::new_http_client(),
            authority,
            tenant,
            client,
            file,
        )))
    }

    async fn exchange(&self, scopes: &[&str]) -> azure_core::Result<AccessToken> {
        let assertion = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|e| {
                Error::full(
                    ErrorKind::Credential,
                    e,
                    format!(
                        "failed to read the federated token file {}",
                        self.token_file.display()
                    ),
                )
            })?;
        let exchange = azure_identity::federated_credentials_flow::perform(
            self.http.clone(),
            &self.client_id,
            assertion.trim(),
            scopes,
            &self.tenant_id,
            &self.authority,
        );
        let rsp = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
            .await
            .map_err(|_| Error::message(ErrorKind::Io, "the token exchange timed out"))??;
        Ok(AccessToken::new(
            rsp.access_token().clone(),
            OffsetDateTime::now_utc() + Duration::from_secs(rsp.expires_in),
        ))
    }
}

#[async_trait::async_trait]
impl TokenCredential for WorkloadIdentity {
    async fn get_token(&self, scopes: &[&str]) -> azure_core::Result<AccessToken> {
        let key = scopes.join(" ");
        // Held across the exchange: concurrent callers wait for one refresh.
        let mut cache = self.cache.lock().await;
        if let Some(token) = cache.get(&key)
            && token.expires_on - self.refresh_margin > OffsetDateTime::now_utc()
        {
            return Ok(token.clone());
        }
        let token = self.exchange(scopes).await?;
        cache.insert(key, token.clone());
        Ok(token)
    }

    async fn clear_cache(&self) -> azure_core::Result<()> {
        self.cache.lock().await.clear();
        Ok(())
    }
}

/// Environment variable holding a fixed bearer token (for the simulator only).
pub const STATIC_TOKEN_ENV: &str = "RDPHEALTH_AZURE_STATIC_TOKEN";

/// Picks a credential from the environment, in order: a static token
/// (`RDPHEALTH_AZURE_STATIC_TOKEN`, meant for the simulator), workload identity, a client
/// secret (`AZURE_TENANT_ID`/`AZURE_CLIENT_ID`/`AZURE_CLIENT_SECRET`), then the Azure CLI.
pub fn from_environment() -> Result<Arc<dyn TokenCredential>, AzureError> {
    if let Ok(token) = std::env::var(STATIC_TOKEN_ENV)
        && !token.is_empty()
    {
        return Ok(Arc::new(StaticToken::new(token)));
    }
    if let Some(wi) = WorkloadIdentity::from_env()? {
        return Ok(Arc::new(wi));
    }
    if std::env::var_os("AZURE_CLIENT_SECRET").is_some() {
        let cred = azure_identity::ClientSecretCredential::create(
            azure_identity::TokenCredentialOptions::default(),
        )
        .map_err(|e| AzureError::Unauthorized {
            message: format!("failed to configure the client secret credential: {e}"),
        })?;
        return Ok(Arc::new(cred));
    }
    Ok(Arc::new(azure_identity::AzureCliCredential::new()))
}

/// The credential the environment configures, or `None` when it configures none: a static
/// token, workload identity, a client secret, or an `az` executable on `PATH` (Azure CLI).
/// Without one the operator runs observe-only.
pub fn configured() -> Result<Option<Arc<dyn TokenCredential>>, AzureError> {
    let explicit = std::env::var(STATIC_TOKEN_ENV).is_ok_and(|t| !t.is_empty())
        || std::env::var_os("AZURE_FEDERATED_TOKEN_FILE").is_some()
        || std::env::var_os("AZURE_CLIENT_SECRET").is_some();
    if explicit || azure_cli_on_path() {
        from_environment().map(Some)
    } else {
        Ok(None)
    }
}

fn azure_cli_on_path() -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .any(|dir| dir.join("az").is_file() || dir.join("az.cmd").is_file())
    })
}
