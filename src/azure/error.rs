//! The bounded set of Azure failures the rest of the operator reasons about.

use std::time::Duration;

use azure_core::{StatusCode, error::ErrorKind};

use super::policy::Throttled;

/// The `x-ms-ratelimit-remaining-*` values of a response, when present.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimitRemaining {
    /// `x-ms-ratelimit-remaining-subscription-reads`.
    pub subscription_reads: Option<u32>,
    /// `x-ms-ratelimit-remaining-subscription-writes`.
    pub subscription_writes: Option<u32>,
    /// `x-ms-ratelimit-remaining-resource` (resource-provider policies, verbatim).
    pub resource: Option<String>,
}

/// Why an Azure call failed. Every variant maps to one stable reason (`reason()`).
#[derive(Debug, thiserror::Error)]
pub enum AzureError {
    /// ARM or a resource provider throttled the call (429) or is unavailable (503).
    #[error("failed to call Azure: throttled (status {status}), retry after {retry_after:?}")]
    Throttled {
        /// 429 or 503.
        status: u16,
        /// The server's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
        /// The remaining-budget headers of the throttled response.
        remaining: RateLimitRemaining,
    },
    /// The resource (or the operation being polled) does not exist.
    #[error("failed to find {what}: {message}")]
    NotFound {
        /// What was looked up.
        what: String,
        /// Azure's message.
        message: String,
    },
    /// The resource's state forbids the change, or another operation is in progress (409).
    #[error("failed to change {what}: conflict {code}: {message}")]
    Conflict {
        /// What was changed.
        what: String,
        /// Azure's error code (e.g. `OperationNotAllowed`).
        code: String,
        /// Azure's message.
        message: String,
    },
    /// The credential was missing, expired or rejected (401, or no token at all).
    #[error("failed to authenticate to Azure: {message}")]
    Unauthorized {
        /// Why.
        message: String,
    },
    /// The identity lacks a permission (403).
    #[error("failed to call Azure: forbidden: {message}")]
    Forbidden {
        /// Azure's message (names the missing action).
        message: String,
    },
    /// A network failure, a timeout or a server error worth retrying later.
    #[error("failed to call Azure: {message}")]
    Transient {
        /// What happened.
        message: String,
    },
    /// A URL that is not the configured ARM endpoint's origin was to receive the ARM token
    /// (an operation URL from status or a response header): nothing was sent to it.
    #[error("refused to send the ARM token to {origin}: it is not the configured ARM endpoint")]
    UntrustedUrl {
        /// The refused URL's origin (scheme, host and port; never its path or query).
        origin: String,
    },
    /// The request may have reached Azure but no answer came back: a timeout, a connection
    /// lost after sending, or a 5xx without an ARM error body. For a read, worth retrying;
    /// for a write, its outcome is unknown and it must never be re-sent blindly.
    #[error("failed to learn the outcome of an Azure call: {message}")]
    OutcomeUnknown {
        /// What happened.
        message: String,
    },
    /// A bad request, an unparsable answer, or a resource missing a field we need.
    #[error("failed to use an Azure answer: {message}")]
    Invalid {
        /// What was wrong.
        message: String,
    },
}

impl AzureError {
    /// The stable PascalCase reason (Event reason, metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Throttled { .. } => "Throttled",
            Self::NotFound { .. } => "NotFound",
            Self::Conflict { .. } => "Conflict",
            Self::Unauthorized { .. } => "Unauthorized",
            Self::Forbidden { .. } => "Forbidden",
            Self::Transient { .. } => "Transient",
            Self::Invalid { .. } => "Invalid",
            Self::UntrustedUrl { .. } => "UntrustedOperationUrl",
            Self::OutcomeUnknown { .. } => "OutcomeUnknown",
        }
    }

    /// How long to wait before trying again, when the server said so.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether trying again later may succeed without any change on our side.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Throttled { .. }
                | Self::Transient { .. }
                | Self::Conflict { .. }
                | Self::OutcomeUnknown { .. }
        )
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid {
            message: message.into(),
        }
    }

    pub(crate) fn transient(message: impl Into<String>) -> Self {
        Self::Transient {
            message: message.into(),
        }
    }

    /// Maps an error from the SDK pipeline; `what` names the resource for messages.
    pub fn from_sdk(err: &azure_core::Error, what: &str) -> Self {
        if let Some(t) = find_throttled(err) {
            return Self::Throttled {
                status: t.status,
                retry_after: t.retry_after,
                remaining: t.remaining.clone(),
            };
        }
        match err.kind() {
            // A server error without an ARM error body says nothing about what was done.
            ErrorKind::HttpResponse {
                status,
                error_code: None,
            } if u16::from(*status) >= 500 => Self::OutcomeUnknown {
                message: format!("{status} without an error body"),
            },
            ErrorKind::HttpResponse { status, error_code } => {
                let message = err
                    .as_http_error()
                    .and_then(|h| h.error_message().map(str::to_owned))
                    .unwrap_or_else(|| err.to_string());
                let code = error_code.clone().unwrap_or_else(|| status.to_string());
                from_status(*status, &code, message, what)
            }
            // A timeout or a connection lost while the request may already have been sent.
            ErrorKind::Io => Self::OutcomeUnknown {
                message: format!("network error or timeout: {err}"),
            },
            ErrorKind::Credential => Self::Unauthorized {
                message: err.to_string(),
            },
            ErrorKind::DataConversion => Self::invalid(format!("unparsable answer: {err}")),
            _ => Self::transient(err.to_string()),
        }
    }
}

/// Maps an HTTP status and ARM error code to a reason.
pub(crate) fn from_status(
    status: StatusCode,
    code: &str,
    message: String,
    what: &str,
) -> AzureError {
    match u16::from(status) {
        401 => AzureError::Unauthorized { message },
        403 => AzureError::Forbidden { message },
        404 => AzureError::NotFound {
            what: what.to_owned(),
            message,
        },
        409 => AzureError::Conflict {
            what: what.to_owned(),
            code: code.to_owned(),
            message,
        },
        // Network's "RetryableErrorDueToAnotherOperation" is a lock, not throttling.
        429 if code == "RetryableErrorDueToAnotherOperation" => AzureError::Conflict {
            what: what.to_owned(),
            code: code.to_owned(),
            message,
        },
        408 | 429 | 500..=599 => AzureError::transient(format!("{code}: {message}")),
        _ => AzureError::invalid(format!("{code}: {message}")),
    }
}

fn find_throttled(err: &azure_core::Error) -> Option<&Throttled> {
    if let Some(t) = err.downcast_ref::<Throttled>() {
        return Some(t);
    }
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        if let Some(t) = e.downcast_ref::<Throttled>() {
            return Some(t);
        }
        source = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_bounded_reasons() {
        let cases = [
            (401, "InvalidAuthenticationToken", "Unauthorized"),
            (403, "AuthorizationFailed", "Forbidden"),
            (404, "ResourceNotFound", "NotFound"),
            (409, "OperationNotAllowed", "Conflict"),
            (429, "RetryableErrorDueToAnotherOperation", "Conflict"),
            (500, "InternalServerError", "Transient"),
            (503, "ServiceUnavailable", "Transient"),
            (400, "InvalidParameter", "Invalid"),
        ];
        for (status, code, reason) in cases {
            let status = StatusCode::try_from(status).unwrap();
            let err = from_status(status, code, "m".into(), "vm");
            assert_eq!(err.reason(), reason, "{status} {code}");
            assert!(err.to_string().starts_with("failed to"), "{err}");
        }
    }
}
