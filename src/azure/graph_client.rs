//! Resource Graph through the ARM pipeline: the paged `resources` query of a fleet, its quota
//! headers, and the rows mapped to [`DiscoveredVm`]s. Also the one place a request with an
//! arbitrary method and body goes through the pipeline with the ARM token.
//!
//! By hand rather than with `azure_mgmt_resourcegraph`: its 0.21 release ships only preview API
//! versions (2020-04 to 2023-09-preview), not the GA 2022-10-01, and hides the quota headers.

use std::{collections::BTreeMap, collections::HashSet, net::IpAddr, time::Duration};

use azure_core::{
    Context, Method, Request, Url,
    headers::{self, HeaderName, Headers},
};
use serde_json::{Value, json};

use super::{
    ArmClient, AzureError, AzureResult, VmRef,
    arm_map::ResourceId,
    credential::ARM_SCOPE,
    error::{RateLimitRemaining, from_status},
    graph::{DiscoveredVm, Discovery, ResourceGraph, VmSelector},
    graph_query::vm_query,
};

/// The Resource Graph API version (GA).
pub const API_VERSION: &str = "2022-10-01";

/// The query endpoint's path (on the ARM endpoint).
pub const RESOURCES_PATH: &str = "/providers/Microsoft.ResourceGraph/resources";

const QUOTA_REMAINING: HeaderName = HeaderName::from_static("x-ms-user-quota-remaining");
const QUOTA_RESETS_AFTER: HeaderName = HeaderName::from_static("x-ms-user-quota-resets-after");

/// How a discovery pages and waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphOptions {
    /// Rows per page (`$top`, 1–1000).
    pub page_size: u32,
    /// Longest wait for the quota window to reset between pages; a longer reset fails the
    /// discovery with `Throttled` (retry after the reset) instead of holding it.
    pub max_quota_wait: Duration,
    /// Most pages one discovery may take (a server repeating `$skipToken` forever is cut off).
    pub max_pages: u32,
}

impl Default for GraphOptions {
    fn default() -> Self {
        Self {
            page_size: 1000,
            max_quota_wait: Duration::from_secs(60),
            max_pages: 1000,
        }
    }
}

impl ArmClient {
    /// Sends `method` to `url` through the pipeline (limiter, timeout, 429 capture), with the
    /// ARM token when `authorized` — refused, before any connection, unless `url` is on the
    /// configured ARM endpoint's origin. Returns status, headers and body.
    pub(super) async fn send(
        &self,
        method: Method,
        url: &str,
        authorized: bool,
        body: Option<Vec<u8>>,
    ) -> AzureResult<(u16, Headers, Vec<u8>)> {
        let url = Url::parse(url).map_err(|e| AzureError::invalid(format!("bad URL: {e}")))?;
        if authorized && url.origin() != self.arm_origin.origin() {
            // Operation URLs come from status and from response headers: whoever can write
            // either must not receive the token. Refused before any connection is made.
            return Err(AzureError::UntrustedUrl {
                origin: url.origin().ascii_serialization(),
            });
        }
        let mut req = Request::new(url, method);
        if authorized {
            let token = self.credential.get_token(&[ARM_SCOPE]).await.map_err(|e| {
                AzureError::Unauthorized {
                    message: format!("failed to get a token: {e}"),
                }
            })?;
            req.insert_header(
                headers::AUTHORIZATION,
                format!("Bearer {}", token.token.secret()),
            );
        }
        if let Some(body) = body {
            req.insert_header(headers::CONTENT_TYPE, "application/json");
            req.set_body(body);
        }
        let rsp = self
            .pipeline
            .send(&Context::new(), &mut req)
            .await
            .map_err(|e| AzureError::from_sdk(&e, "request"))?;
        let (status, headers, body) = rsp.deconstruct();
        let body = body
            .collect()
            .await
            .map_err(|e| AzureError::transient(format!("failed to read a response: {e}")))?;
        Ok((u16::from(status), headers, body.to_vec()))
    }

    /// Every VM `selector` matches, paged and paced as `options` says.
    pub async fn discover_with(
        &self,
        selector: &VmSelector,
        options: &GraphOptions,
    ) -> AzureResult<Discovery> {
        let query = vm_query(selector)?;
        let url = self
            .arm_origin
            .join(&format!("{RESOURCES_PATH}?api-version={API_VERSION}"))
            .map_err(|e| AzureError::invalid(format!("bad URL: {e}")))?;
        let mut found = Discovery::default();
        let mut skip_token: Option<String> = None;
        let mut seen_tokens = HashSet::new();
        loop {
            if found.requests >= options.max_pages {
                return Err(AzureError::invalid(format!(
                    "Resource Graph was still paging after {} pages",
                    options.max_pages
                )));
            }
            self.graph_quota.wait(options.max_quota_wait).await?;
            let body = request_body(selector, &query, options, skip_token.as_deref());
            let sent = self
                .send(Method::Post, url.as_str(), true, Some(body))
                .await;
            found.requests += 1;
            let (status, headers, body) = match sent {
                Ok(answer) => answer,
                Err(e) => {
                    if let AzureError::Throttled { retry_after, .. } = &e {
                        self.graph_quota.record(Some(0), *retry_after);
                    }
                    return Err(e);
                }
            };
            let (remaining, resets_after) = quota_of(&headers);
            self.graph_quota.record(remaining, resets_after);
            found.quota_remaining = remaining;
            found.quota_resets_after = resets_after;
            if !(200..300).contains(&status) {
                return Err(graph_error(status, &body));
            }
            let page = parse_page(&body, found.vms.len())?;
            found.vms.extend(page.vms);
            let Some(token) = page.skip_token else {
                break;
            };
            if !seen_tokens.insert(token.clone()) {
                return Err(AzureError::invalid(
                    "Resource Graph returned the same $skipToken twice",
                ));
            }
            skip_token = Some(token);
        }
        // The promise is "ordered by id, each VM once", even if membership moved between pages.
        found
            .vms
            .sort_by_cached_key(|v| v.vm.id().to_ascii_lowercase());
        found
            .vms
            .dedup_by(|a, b| a.vm.id().eq_ignore_ascii_case(&b.vm.id()));
        Ok(found)
    }
}

#[async_trait::async_trait]
impl ResourceGraph for ArmClient {
    async fn discover(&self, selector: &VmSelector) -> AzureResult<Discovery> {
        self.discover_with(selector, &GraphOptions::default()).await
    }
}

fn request_body(
    selector: &VmSelector,
    query: &str,
    options: &GraphOptions,
    skip_token: Option<&str>,
) -> Vec<u8> {
    let mut opts = json!({
        "$top": options.page_size.clamp(1, 1000),
        "resultFormat": "objectArray",
    });
    if let Some(t) = skip_token {
        opts["$skipToken"] = json!(t);
    }
    json!({
        "subscriptions": selector.subscriptions,
        "query": query,
        "options": opts,
    })
    .to_string()
    .into_bytes()
}

/// Resource Graph's per-user quota as the last answer reported it: when it was spent, the
/// next request (of this discovery or the next) waits for the window's reset, or fails with
/// `Throttled` when the reset is further away than the caller will wait — rather than
/// spending a request on a certain 429.
#[derive(Debug, Default)]
pub struct QuotaState(std::sync::Mutex<Option<tokio::time::Instant>>);

impl QuotaState {
    /// Notes an answer's quota: spent until `resets_after` (1 s when not said), or available.
    fn record(&self, remaining: Option<u32>, resets_after: Option<Duration>) {
        let spent_until = (remaining == Some(0))
            .then(|| tokio::time::Instant::now() + resets_after.unwrap_or(Duration::from_secs(1)));
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = spent_until;
    }

    /// Waits for a spent quota's reset when it is at most `cap` away.
    async fn wait(&self, cap: Duration) -> AzureResult<()> {
        let until = *self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(until) = until else {
            return Ok(());
        };
        let wait = until.saturating_duration_since(tokio::time::Instant::now());
        if wait.is_zero() {
            return Ok(());
        }
        if wait > cap {
            return Err(AzureError::Throttled {
                status: 429,
                retry_after: Some(wait),
                remaining: RateLimitRemaining::default(),
            });
        }
        tracing::debug!(?wait, "Resource Graph quota spent; waiting for its reset");
        tokio::time::sleep(wait).await;
        Ok(())
    }
}

/// `x-ms-user-quota-remaining` and `x-ms-user-quota-resets-after` (`hh:mm:ss`).
pub fn quota_of(headers: &Headers) -> (Option<u32>, Option<Duration>) {
    let remaining = headers
        .get_optional_str(&QUOTA_REMAINING)
        .and_then(|v| v.trim().parse().ok());
    let resets = headers
        .get_optional_str(&QUOTA_RESETS_AFTER)
        .and_then(parse_hms);
    (remaining, resets)
}

/// `hh:mm:ss` (hours may exceed 23; seconds may carry a fraction) as a duration.
pub fn parse_hms(text: &str) -> Option<Duration> {
    let mut parts = text.trim().split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let h: u64 = h.parse().ok()?;
    let m: u64 = m.parse().ok()?;
    let s: f64 = s.parse().ok()?;
    if m >= 60 || !(0.0..60.0).contains(&s) {
        return None;
    }
    Some(Duration::from_secs(h * 3600 + m * 60) + Duration::from_secs_f64(s))
}

/// A non-2xx answer (429 and 503 never get here: the pipeline makes them `Throttled`).
fn graph_error(status: u16, body: &[u8]) -> AzureError {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let code = v
        .pointer("/error/code")
        .and_then(Value::as_str)
        .unwrap_or("Unknown")
        .to_owned();
    let mut message = v
        .pointer("/error/message")
        .and_then(Value::as_str)
        .unwrap_or("no error body")
        .to_owned();
    if let Some(detail) = v.pointer("/error/details/0") {
        let s = |k: &str| detail.get(k).and_then(Value::as_str).unwrap_or("");
        message = format!("{message} ({}: {})", s("code"), s("message"));
    }
    let status = azure_core::StatusCode::try_from(status)
        .unwrap_or(azure_core::StatusCode::InternalServerError);
    from_status(status, &code, message, "Resource Graph query")
}

/// One page: its VMs and the token of the next.
#[derive(Debug)]
struct Page {
    vms: Vec<DiscoveredVm>,
    skip_token: Option<String>,
}

/// Parses a response; `first_row` numbers its rows in messages.
fn parse_page(body: &[u8], first_row: usize) -> AzureResult<Page> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| AzureError::invalid(format!("unparsable Resource Graph answer: {e}")))?;
    let rows = v
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| AzureError::invalid("Resource Graph answer without a data array"))?;
    let vms = rows
        .iter()
        .enumerate()
        .map(|(i, row)| parse_row(row, first_row + i))
        .collect::<AzureResult<Vec<_>>>()?;
    let skip_token = v
        .get("$skipToken")
        .or_else(|| v.get("skipToken"))
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    Ok(Page { vms, skip_token })
}

/// One row; only `id` and `name` are required. Subscription and resource group come from the
/// id, which keeps Azure's spelling (Resource Graph's `resourceGroup` column is lower case).
fn parse_row(row: &Value, index: usize) -> AzureResult<DiscoveredVm> {
    let text = |k: &str| {
        row.get(k)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
    };
    let missing = |k: &str| AzureError::invalid(format!("Resource Graph row {index} has no {k}"));
    let id = text("id").ok_or_else(|| missing("id"))?;
    let name = text("name").ok_or_else(|| missing("name"))?;
    let parsed = ResourceId::parse(id)
        .map_err(|e| AzureError::invalid(format!("Resource Graph row {index}: {e}")))?;
    let ip = |k: &str| {
        let value = text(k)?;
        match value.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                tracing::warn!(
                    row = index,
                    field = k,
                    value,
                    "ignoring an unparsable address"
                );
                None
            }
        }
    };
    let tags: BTreeMap<String, String> = row
        .get("tags")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                    (k.clone(), v)
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(DiscoveredVm {
        vm: VmRef::new(parsed.subscription(), parsed.resource_group(), name),
        location: text("location").unwrap_or_default().to_owned(),
        tags,
        power_state: text("powerState").map(str::to_owned),
        computer_name: text("computerName").map(str::to_owned),
        private_ip: ip("privateIp"),
        public_ip: ip("publicIp"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_reset_times_parse() {
        let cases = [
            ("00:00:05", Some(Duration::from_secs(5))),
            ("00:01:00", Some(Duration::from_secs(60))),
            ("01:02:03", Some(Duration::from_secs(3723))),
            ("00:00:00.5", Some(Duration::from_millis(500))),
            ("5", None),
            ("00:60:00", None),
            ("aa:00:00", None),
            ("00:00:00:00", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_hms(text), want, "{text}");
        }
    }

    #[test]
    fn rows_map_and_tolerate_missing_optional_fields() {
        let body = json!({
            "totalRecords": 2, "count": 2, "resultTruncated": "false",
            "$skipToken": "next",
            "data": [
                {
                    "id": "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1",
                    "name": "vm1", "resourceGroup": "rg", "subscriptionId": "s1",
                    "location": "westeurope", "tags": {"env": "prod", "n": 3},
                    "powerState": "PowerState/running", "computerName": "JUMP01",
                    "privateIp": "10.0.0.4", "publicIp": "198.51.100.2"
                },
                {
                    "id": "/subscriptions/s2/resourceGroups/rg2/providers/Microsoft.Compute/virtualMachines/vm2",
                    "name": "vm2", "tags": null, "powerState": "", "computerName": "",
                    "privateIp": "garbage"
                }
            ]
        });
        let page = parse_page(body.to_string().as_bytes(), 0).unwrap();
        assert_eq!(page.skip_token.as_deref(), Some("next"));
        let [a, b] = page.vms.as_slice() else {
            panic!("two rows expected")
        };
        assert_eq!(a.vm, VmRef::new("s1", "rg", "vm1"));
        assert_eq!(a.tags.get("env").map(String::as_str), Some("prod"));
        assert_eq!(a.tags.get("n").map(String::as_str), Some("3"));
        assert_eq!(a.power_state.as_deref(), Some("PowerState/running"));
        assert_eq!(a.private_ip, Some("10.0.0.4".parse().unwrap()));
        assert_eq!(a.public_ip, Some("198.51.100.2".parse().unwrap()));
        assert_eq!(b.vm, VmRef::new("s2", "rg2", "vm2"));
        assert_eq!(a.computer_name.as_deref(), Some("JUMP01"));
        assert!(b.tags.is_empty() && b.power_state.is_none() && b.computer_name.is_none());
        assert_eq!((b.private_ip, b.public_ip), (None, None));
    }

    #[test]
    fn a_row_without_id_or_name_is_an_error_naming_it() {
        let body = json!({ "data": [
            { "id": "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/a", "name": "a" },
            { "name": "b" }
        ]});
        let err = parse_page(body.to_string().as_bytes(), 1000).unwrap_err();
        assert!(err.to_string().contains("row 1001 has no id"), "{err}");
        let body = json!({ "data": [ { "id": "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/a" } ]});
        let err = parse_page(body.to_string().as_bytes(), 0).unwrap_err();
        assert!(err.to_string().contains("row 0 has no name"), "{err}");
        for garbage in [&b"not json"[..], b"{}", b"{\"data\": 3}"] {
            assert_eq!(parse_page(garbage, 0).unwrap_err().reason(), "Invalid");
        }
    }

    #[test]
    fn invalid_query_answers_carry_the_detail() {
        let body = json!({"error": {"code": "BadRequest", "message": "Please provide below info when asking for support",
            "details": [{"code": "InvalidQuery", "message": "Query is invalid."}]}});
        let err = graph_error(400, body.to_string().as_bytes());
        assert_eq!(err.reason(), "Invalid");
        assert!(err.to_string().contains("InvalidQuery"), "{err}");
        assert_eq!(graph_error(403, b"").reason(), "Forbidden");
    }
}
