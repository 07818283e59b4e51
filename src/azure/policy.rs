//! Pipeline policies every ARM request goes through: bounded retries of idempotent reads,
//! the per-subscription limiter, a per-request timeout, and 429/503 surfaced as a typed error
//! carrying `Retry-After` and the ratelimit headers (the SDK's own retry is turned off).

use std::{sync::Arc, time::Duration};

use azure_core::{
    Context, Method, Policy, PolicyResult, Request, StatusCode,
    error::{Error, ErrorKind},
    headers::{HeaderName, Headers},
};

use super::{
    error::RateLimitRemaining,
    limiter::{Limiter, OpClass, subscription_of},
};

/// A throttled response, carried as the source of an `azure_core::Error`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("throttled with status {status}")]
pub struct Throttled {
    /// 429 or 503.
    pub status: u16,
    /// `Retry-After` (`retry-after-ms`, `x-ms-retry-after-ms` or `Retry-After`).
    pub retry_after: Option<Duration>,
    /// The remaining-budget headers.
    pub remaining: RateLimitRemaining,
}

/// Network's code for "another operation on this or a dependent resource is in progress"
/// (429; ARM request-limits doc): a lock to wait out, not throttling.
pub const ANOTHER_OPERATION: &str = "RetryableErrorDueToAnotherOperation";

/// Network's lock answer, carried as the source of an `azure_core::Error` with its wait.
#[derive(Debug, Clone, thiserror::Error)]
#[error("another operation is in progress: {message}")]
pub struct AnotherOperation {
    /// Azure's message.
    pub message: String,
    /// `Retry-After`.
    pub retry_after: Option<Duration>,
}

const REMAINING_READS: HeaderName =
    HeaderName::from_static("x-ms-ratelimit-remaining-subscription-reads");
const REMAINING_WRITES: HeaderName =
    HeaderName::from_static("x-ms-ratelimit-remaining-subscription-writes");
const REMAINING_RESOURCE: HeaderName = HeaderName::from_static("x-ms-ratelimit-remaining-resource");
const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
const X_MS_RETRY_AFTER_MS: HeaderName = HeaderName::from_static("x-ms-retry-after-ms");
const RETRY_AFTER: HeaderName = HeaderName::from_static("retry-after");

/// Reads the remaining-budget headers.
pub fn remaining_of(headers: &Headers) -> RateLimitRemaining {
    let num = |h: &HeaderName| {
        headers
            .get_optional_str(h)
            .and_then(|v| v.trim().parse().ok())
    };
    RateLimitRemaining {
        subscription_reads: num(&REMAINING_READS),
        subscription_writes: num(&REMAINING_WRITES),
        resource: headers
            .get_optional_str(&REMAINING_RESOURCE)
            .map(str::to_owned),
    }
}

/// Reads the server's retry delay: milliseconds headers first, then `Retry-After` seconds.
pub fn retry_after_of(headers: &Headers) -> Option<Duration> {
    for h in [&RETRY_AFTER_MS, &X_MS_RETRY_AFTER_MS] {
        if let Some(ms) = headers
            .get_optional_str(h)
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            return Some(Duration::from_millis(ms));
        }
    }
    headers
        .get_optional_str(&RETRY_AFTER)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Turns 429 and 503 into a `Throttled` error at once (no sleeping inside a reconcile).
#[derive(Debug, Default)]
pub struct ThrottleCapture;

#[async_trait::async_trait]
impl Policy for ThrottleCapture {
    async fn send(
        &self,
        ctx: &Context,
        req: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let rsp = next_policy(ctx, req, next).await?;
        let status = rsp.status();
        if matches!(u16::from(status), 429 | 503) {
            let (status, headers, body) = rsp.deconstruct();
            let body = body.collect().await.unwrap_or_default();
            let kind = ErrorKind::http_response_from_parts(status, &headers, &body);
            // Network's lock signal is a conflict, not throttling; let the status map it.
            if let ErrorKind::HttpResponse {
                error_code: Some(code),
                ..
            } = &kind
                && code == ANOTHER_OPERATION
            {
                let busy = AnotherOperation {
                    message: serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| {
                            v.pointer("/error/message")
                                .and_then(serde_json::Value::as_str)
                                .map(str::to_owned)
                        })
                        .unwrap_or_else(|| "another operation is in progress".to_owned()),
                    retry_after: retry_after_of(&headers),
                };
                return Err(Error::full(kind, busy, "another operation is in progress"));
            }
            let throttled = Throttled {
                status: u16::from(status),
                retry_after: retry_after_of(&headers),
                remaining: remaining_of(&headers),
            };
            return Err(Error::full(kind, throttled, "throttled"));
        }
        Ok(rsp)
    }
}

/// Retries idempotent reads (GET) on network errors and 500/502/504, a bounded number of
/// times with a short backoff. Writes are never re-sent: a POST that got a 500 may have
/// been carried out.
#[derive(Debug)]
pub struct ReadRetry {
    /// Extra attempts after the first.
    pub retries: u32,
    /// Delay before the first retry; doubled each time.
    pub backoff: Duration,
}

impl Default for ReadRetry {
    fn default() -> Self {
        Self {
            retries: 2,
            backoff: Duration::from_millis(200),
        }
    }
}

#[async_trait::async_trait]
impl Policy for ReadRetry {
    async fn send(
        &self,
        ctx: &Context,
        req: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let idempotent = *req.method() == Method::Get;
        let mut attempt = 0;
        let mut delay = self.backoff;
        loop {
            let result = next_policy(ctx, req, next).await;
            let retry = idempotent
                && attempt < self.retries
                && match &result {
                    Ok(rsp) => matches!(
                        rsp.status(),
                        StatusCode::InternalServerError
                            | StatusCode::BadGateway
                            | StatusCode::GatewayTimeout
                    ),
                    Err(e) => {
                        matches!(e.kind(), ErrorKind::Io) && e.downcast_ref::<Throttled>().is_none()
                    }
                };
            if !retry {
                return result;
            }
            attempt += 1;
            tracing::debug!(attempt, url = %req.url().path(), "retrying an idempotent read");
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
}

/// Takes a token from the subscription's bucket (and a write slot) before each attempt.
#[derive(Debug)]
pub struct LimitPolicy(pub Arc<Limiter>);

#[async_trait::async_trait]
impl Policy for LimitPolicy {
    async fn send(
        &self,
        ctx: &Context,
        req: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let class = OpClass::of_request(req.method().as_ref(), req.url().path());
        let sub = subscription_of(req.url().path()).unwrap_or("").to_owned();
        let _permit = self.0.acquire(&sub, class).await;
        next_policy(ctx, req, next).await
    }
}

/// Bounds each attempt; the transport has no timeout of its own.
#[derive(Debug)]
pub struct RequestTimeout(pub Duration);

#[async_trait::async_trait]
impl Policy for RequestTimeout {
    async fn send(
        &self,
        ctx: &Context,
        req: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        match tokio::time::timeout(self.0, next_policy(ctx, req, next)).await {
            Ok(result) => result,
            Err(_) => Err(Error::message(
                ErrorKind::Io,
                format!("request timed out after {:?}", self.0),
            )),
        }
    }
}

async fn next_policy(ctx: &Context, req: &mut Request, next: &[Arc<dyn Policy>]) -> PolicyResult {
    match next.split_first() {
        Some((first, rest)) => first.send(ctx, req, rest).await,
        None => Err(Error::message(ErrorKind::Other, "empty pipeline")),
    }
}

/// The per-retry policies, in order, for every client of one adapter.
pub fn policies(limiter: Arc<Limiter>, timeout: Duration) -> Vec<Arc<dyn Policy>> {
    vec![
        Arc::new(ReadRetry::default()),
        Arc::new(LimitPolicy(limiter)),
        Arc::new(RequestTimeout(timeout)),
        Arc::new(ThrottleCapture),
    ]
}
