//! Client-side token buckets shaped like ARM's per-subscription limits, so the operator stays
//! under them however many objects reconcile at once.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

/// Size and refill rate of one bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketShape {
    /// Tokens available at once.
    pub burst: f64,
    /// Tokens added per second.
    pub per_second: f64,
}

/// The limits applied to each subscription.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimiterConfig {
    /// Reads (GET, HEAD): ARM's 250 burst, 25 per second.
    pub reads: BucketShape,
    /// Writes (PUT, POST, PATCH, DELETE): ARM's 200 burst, 10 per second.
    pub writes: BucketShape,
    /// Writes in flight at once per subscription.
    pub max_concurrent_writes: usize,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        Self {
            reads: BucketShape {
                burst: 250.0,
                per_second: 25.0,
            },
            writes: BucketShape {
                burst: 200.0,
                per_second: 10.0,
            },
            max_concurrent_writes: 8,
        }
    }
}

/// A token bucket on tokio's clock (so paused-time tests see it exactly).
#[derive(Debug)]
pub struct TokenBucket {
    shape: BucketShape,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(shape: BucketShape) -> Self {
        Self {
            shape,
            tokens: shape.burst,
            updated: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.shape.per_second).min(self.shape.burst);
        self.updated = now;
    }

    /// Takes a token now, or says how long until one is available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if self.shape.per_second <= 0.0 {
            Err(Duration::from_secs(3600))
        } else {
            let missing = 1.0 - self.tokens;
            Err(Duration::from_secs_f64(missing / self.shape.per_second)
                .max(Duration::from_millis(1)))
        }
    }

    /// Tokens left (rounded down), for ratelimit headers.
    pub fn remaining(&mut self, now: Instant) -> u32 {
        self.refill(now);
        self.tokens.max(0.0).floor() as u32
    }
}

/// Whether a request reads or writes (ARM counts them in separate buckets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpClass {
    /// GET and HEAD.
    Read,
    /// Everything else.
    Write,
}

impl OpClass {
    /// The class of an HTTP method.
    pub fn of_method(method: &str) -> Self {
        if method.eq_ignore_ascii_case("GET") || method.eq_ignore_ascii_case("HEAD") {
            Self::Read
        } else {
            Self::Write
        }
    }

    /// The class of a request: a Resource Graph query is a read although sent with POST.
    pub fn of_request(method: &str, path: &str) -> Self {
        let graph = path
            .to_ascii_lowercase()
            .ends_with("/providers/microsoft.resourcegraph/resources");
        if graph && method.eq_ignore_ascii_case("POST") {
            Self::Read
        } else {
            Self::of_method(method)
        }
    }
}

#[derive(Debug)]
struct Subscription {
    reads: TokenBucket,
    writes: TokenBucket,
    write_slots: Arc<Semaphore>,
}

/// Per-subscription buckets shared by every caller of one adapter.
#[derive(Debug, Default)]
pub struct Limiter {
    config: LimiterConfig,
    subs: Mutex<HashMap<String, Subscription>>,
}

/// Held while a write is in flight; dropping it frees the slot.
#[derive(Debug)]
pub struct Permit {
    _write: Option<OwnedSemaphorePermit>,
}

impl Limiter {
    /// A limiter with these limits.
    pub fn new(config: LimiterConfig) -> Self {
        Self {
            config,
            subs: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for a token of `class` in `subscription` (and a write slot for writes).
    pub async fn acquire(&self, subscription: &str, class: OpClass) -> Permit {
        loop {
            match self.try_take(subscription, class) {
                Ok(slots) => {
                    let write = match slots {
                        Some(s) => s.acquire_owned().await.ok(),
                        None => None,
                    };
                    return Permit { _write: write };
                }
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    fn try_take(
        &self,
        subscription: &str,
        class: OpClass,
    ) -> Result<Option<Arc<Semaphore>>, Duration> {
        let now = Instant::now();
        let mut subs = match self.subs.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let sub = subs
            .entry(subscription.to_owned())
            .or_insert_with(|| Subscription {
                reads: TokenBucket::new(self.config.reads),
                writes: TokenBucket::new(self.config.writes),
                write_slots: Arc::new(Semaphore::new(self.config.max_concurrent_writes.max(1))),
            });
        match class {
            OpClass::Read => sub.reads.try_take(now).map(|()| None),
            OpClass::Write => sub
                .writes
                .try_take(now)
                .map(|()| Some(sub.write_slots.clone())),
        }
    }
}

/// The subscription id in an ARM URL path (`/subscriptions/{id}/…`), if any.
pub fn subscription_of(path: &str) -> Option<&str> {
    let mut parts = path.split('/').filter(|s| !s.is_empty());
    while let Some(p) = parts.next() {
        if p.eq_ignore_ascii_case("subscriptions") {
            return parts.next();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_graph_queries_are_reads() {
        let path = "/providers/Microsoft.ResourceGraph/resources";
        assert_eq!(OpClass::of_request("POST", path), OpClass::Read);
        assert_eq!(OpClass::of_request("PUT", path), OpClass::Write);
        let action = "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/v/restart";
        assert_eq!(OpClass::of_request("POST", action), OpClass::Write);
        assert_eq!(OpClass::of_request("GET", action), OpClass::Read);
    }

    #[test]
    fn subscription_is_found_in_paths() {
        assert_eq!(
            subscription_of("/subscriptions/abc/resourceGroups/x"),
            Some("abc")
        );
        assert_eq!(subscription_of("//subscriptions/abc"), Some("abc"));
        assert_eq!(subscription_of("/tenant/oauth2"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_refills_at_its_rate() {
        let mut b = TokenBucket::new(BucketShape {
            burst: 2.0,
            per_second: 1.0,
        });
        let now = Instant::now();
        assert!(b.try_take(now).is_ok());
        assert!(b.try_take(now).is_ok());
        let wait = b.try_take(now).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        assert!(b.try_take(now + Duration::from_secs(1)).is_ok());
    }
}
