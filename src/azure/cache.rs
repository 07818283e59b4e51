//! A short-lived cache for reads many VMs share (an NSG, a subnet).

use std::{collections::HashMap, sync::Mutex, time::Duration};

use tokio::time::Instant;

/// Entries expire `ttl` after they were stored.
#[derive(Debug)]
pub struct TtlCache<V> {
    ttl: Duration,
    entries: Mutex<HashMap<String, (Instant, V)>>,
}

impl<V: Clone> TtlCache<V> {
    /// An empty cache.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The fresh value for `key`, if any.
    pub fn get(&self, key: &str) -> Option<V> {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|_, (at, _)| now.saturating_duration_since(*at) < self.ttl);
        entries
            .get(&key.to_ascii_lowercase())
            .map(|(_, v)| v.clone())
    }

    /// Stores `value` under `key` (case-insensitive, like ARM ids).
    pub fn put(&self, key: &str, value: V) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.insert(key.to_ascii_lowercase(), (Instant::now(), value));
    }

    /// Drops every entry (after a change that may have altered them).
    pub fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}
