//! Resource Graph in the emulator: `POST /providers/Microsoft.ResourceGraph/resources`,
//! answered from the simulated world, with real paging (`$top` up to 1000, an opaque
//! `$skipToken`, `totalRecords`, `count`, `resultTruncated`) and ARG's per-caller quota
//! (`x-ms-user-quota-remaining`, `x-ms-user-quota-resets-after`, 429 once spent).
//!
//! Only the operator's query is understood, by its exact clause shapes, one per line:
//! `Resources`; `| where type =~ 'microsoft.compute/virtualmachines'`; then any of
//! `| where resourceGroup in~ ('a', 'b')`,
//! `| where properties.storageProfile.osDisk.osType =~ 'x'`,
//! `| where name matches regex '(?i)^…$'` (literal characters, `\`-escaped punctuation, `.`
//! and `.*` only) and per tag the two lines
//! `| extend tagNAt = array_index_of(split(tolower(strcat_array(bag_keys(tags), '/')), '/'), 'k')`
//! and `| where tagNAt >= 0 and tostring(tags[tostring(bag_keys(tags)[tagNAt])]) == 'v'`
//! (the key lower-cased, the value exact); then the fixed tail (power state, primary NIC, NIC
//! and public IP joins, projection, `order by id asc`) verbatim. String literals are
//! single-quoted with
//! `\\`, `\'` and `\"` escapes. Anything else is ARG's 400 `BadRequest` / `InvalidQuery`.
//! The emulator parses the text itself (it shares nothing with the query builder), so a
//! builder that emits something else fails its tests.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{error, json_response, retry_headers, set_header};
use crate::sim::{
    Shared,
    membership::{QuotaLeft, hms},
    resources::Vm,
    scenario::VmSpec,
    world::{World, fingerprint_u64},
};

/// The lines every query ends with, verbatim.
const TAIL: [&str; 8] = [
    "| extend powerState = tostring(properties.extended.instanceView.powerState.code)",
    "| extend computerName = tostring(properties.osProfile.computerName)",
    "| extend nics = properties.networkProfile.networkInterfaces",
    "| extend nicId = tolower(tostring(case(tobool(nics[0].properties.primary), nics[0].id, tobool(nics[1].properties.primary), nics[1].id, tobool(nics[2].properties.primary), nics[2].id, tobool(nics[3].properties.primary), nics[3].id, tobool(nics[4].properties.primary), nics[4].id, tobool(nics[5].properties.primary), nics[5].id, tobool(nics[6].properties.primary), nics[6].id, tobool(nics[7].properties.primary), nics[7].id, nics[0].id)))",
    "| join kind=leftouter (Resources | where type =~ 'microsoft.network/networkinterfaces' | mv-expand ipconfig = properties.ipConfigurations | where tobool(ipconfig.properties.primary) | project nicId = tolower(id), privateIp = tostring(ipconfig.properties.privateIPAddress), publicIpId = tolower(tostring(ipconfig.properties.publicIPAddress.id))) on nicId",
    "| join kind=leftouter (Resources | where type =~ 'microsoft.network/publicipaddresses' | project publicIpId = tolower(id), publicIp = tostring(properties.ipAddress)) on publicIpId",
    "| project id, name, resourceGroup, subscriptionId, location, tags, powerState, computerName, privateIp, publicIp",
    "| order by id asc",
];

/// One element of a name pattern.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Lit(char),
    Any,
    Run,
}

/// The filters a query carries.
#[derive(Debug, Default)]
struct Filter {
    groups: Option<Vec<String>>,
    os_type: Option<String>,
    name: Option<Vec<Tok>>,
    tags: Vec<(String, String)>,
}

impl Filter {
    fn matches(&self, vm: &Vm) -> bool {
        let ci = |a: &str, b: &str| a.to_lowercase() == b.to_lowercase();
        self.groups
            .as_ref()
            .is_none_or(|g| g.iter().any(|g| ci(g, &vm.rg)))
            && self.os_type.as_ref().is_none_or(|o| ci(o, &vm.os_type))
            && self.name.as_ref().is_none_or(|p| {
                let name: Vec<char> = vm.name.to_lowercase().chars().collect();
                glob(p, &name)
            })
            // Each tag name in lower case is compared with the key exactly as sent: the query
            // must carry it lower-cased.
            && self.tags.iter().all(|(k, v)| {
                vm.tags
                    .iter()
                    .any(|(tk, tv)| tk.to_lowercase() == *k && tv == v)
            })
    }
}

/// Whether `s` matches `p` (linear in pattern × name, however many runs).
fn glob(p: &[Tok], s: &[char]) -> bool {
    let same = |a: char, b: char| a.to_lowercase().eq(b.to_lowercase());
    let mut reach = vec![false; s.len() + 1];
    reach[0] = true;
    for tok in p {
        let mut next = vec![false; s.len() + 1];
        match tok {
            Tok::Run => {
                let mut any = false;
                for (i, r) in reach.iter().enumerate() {
                    any |= *r;
                    next[i] = any;
                }
            }
            Tok::Any => (0..s.len()).for_each(|i| next[i + 1] = reach[i]),
            Tok::Lit(c) => (0..s.len()).for_each(|i| next[i + 1] = reach[i] && same(s[i], *c)),
        }
        reach = next;
    }
    reach[s.len()]
}

/// A single-quoted literal at the start of `s`, and what follows it.
fn literal(s: &str) -> Option<(String, &str)> {
    let mut chars = s.strip_prefix('\'')?.char_indices();
    let body = &s[1..];
    let mut out = String::new();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => match chars.next()?.1 {
                e @ ('\\' | '\'' | '"') => out.push(e),
                _ => return None,
            },
            '\'' => return Some((out, &body[i + 1..])),
            c if c.is_control() => return None,
            c => out.push(c),
        }
    }
    None
}

/// A line that is `prefix`, one literal, then `suffix`.
fn one_literal(line: &str, prefix: &str, suffix: &str) -> Option<String> {
    let (value, rest) = literal(line.strip_prefix(prefix)?)?;
    (rest == suffix).then_some(value)
}

fn name_pattern(regex: &str) -> Option<Vec<Tok>> {
    let body = regex.strip_prefix("(?i)^")?.strip_suffix('$')?;
    let mut out = Vec::new();
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let e = chars.next()?;
                if !e.is_ascii_punctuation() {
                    return None;
                }
                out.push(Tok::Lit(e));
            }
            '.' if chars.peek() == Some(&'*') => {
                chars.next();
                out.push(Tok::Run);
            }
            '.' => out.push(Tok::Any),
            c if c.is_ascii_punctuation() && c != '-' && c != '_' => return None,
            c => out.push(Tok::Lit(c)),
        }
    }
    Some(out)
}

fn parse_query(q: &str) -> Result<Filter, String> {
    let lines: Vec<&str> = q.lines().collect();
    let bad = |i: usize| format!("unsupported clause at line {}: {:?}", i + 1, lines[i]);
    if lines.first() != Some(&"Resources")
        || lines.get(1) != Some(&"| where type =~ 'microsoft.compute/virtualmachines'")
    {
        return Err("the query must start with the VM table filter".to_owned());
    }
    let mut f = Filter::default();
    let mut i = 2;
    while i < lines.len() && lines[i] != TAIL[0] {
        let line = lines[i];
        if let Some(list) = line
            .strip_prefix("| where resourceGroup in~ (")
            .and_then(|l| l.strip_suffix(')'))
        {
            let mut groups = Vec::new();
            let mut rest = list;
            loop {
                let (g, after) = literal(rest).ok_or_else(|| bad(i))?;
                groups.push(g);
                match after.strip_prefix(", ") {
                    Some(next) => rest = next,
                    None if after.is_empty() => break,
                    None => return Err(bad(i)),
                }
            }
            f.groups = Some(groups);
        } else if let Some(os) = one_literal(
            line,
            "| where properties.storageProfile.osDisk.osType =~ ",
            "",
        ) {
            f.os_type = Some(os);
        } else if let Some(re) = one_literal(line, "| where name matches regex ", "") {
            f.name = Some(name_pattern(&re).ok_or_else(|| bad(i))?);
        } else if let Some(key) = one_literal(
            line,
            &format!(
                "| extend tag{}At = array_index_of(split(tolower(strcat_array(bag_keys(tags), '/')), '/'), ",
                f.tags.len()
            ),
            ")",
        ) {
            let n = f.tags.len();
            let cond = lines.get(i + 1).ok_or_else(|| bad(i))?;
            let prefix = format!(
                "| where tag{n}At >= 0 and tostring(tags[tostring(bag_keys(tags)[tag{n}At])]) == "
            );
            let value = one_literal(cond, &prefix, "").ok_or_else(|| bad(i + 1))?;
            f.tags.push((key, value));
            i += 1;
        } else {
            return Err(bad(i));
        }
        i += 1;
    }
    if lines[i.min(lines.len())..] != TAIL {
        return Err("the query does not end with the supported projection".to_owned());
    }
    Ok(f)
}

/// ARG's error envelope: an outer `BadRequest` with the specific code in `details`.
fn bad_request(code: &str, message: &str) -> Response {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({ "error": {
            "code": "BadRequest",
            "message": "Please provide below info when asking for support: timestamp and correlation id.",
            "details": [{ "code": code, "message": message }],
        }}),
    )
}

fn row(w: &World, vm: &Vm) -> Value {
    let nic = w.nics.get(&vm.nic);
    let public = nic
        .and_then(|n| n.pip.as_ref())
        .and_then(|k| w.pips.get(k))
        .map(|p| p.address.to_string());
    let power = if vm.running() {
        "PowerState/running"
    } else {
        "PowerState/deallocated"
    };
    json!({
        "id": vm.id(),
        "name": vm.name,
        // Resource Graph reports the group's name in lower case.
        "resourceGroup": vm.rg.to_ascii_lowercase(),
        "subscriptionId": vm.sub,
        "location": vm.location.to_ascii_lowercase(),
        "tags": vm.tags,
        "powerState": power,
        // As the compute API's `osProfile.computerName`.
        "computerName": vm.name,
        "privateIp": nic.map(|n| n.private_ip.to_string()),
        "publicIp": public,
    })
}

fn quota_headers(rsp: &mut Response, q: QuotaLeft) {
    set_header(rsp, "x-ms-user-quota-remaining", &q.remaining.to_string());
    set_header(rsp, "x-ms-user-quota-resets-after", &hms(q.resets_after));
}

/// `POST /providers/Microsoft.ResourceGraph/resources`.
pub(super) fn resources(s: &Arc<Shared>, bearer: &str, body: &[u8]) -> Response {
    let quota = s.lock().take_graph_quota(fingerprint_u64(bearer));
    let left = match quota {
        Ok(left) => left,
        Err(spent) => {
            s.lock().count("throttled");
            let mut rsp = json_response(
                StatusCode::TOO_MANY_REQUESTS,
                &json!({ "error": {
                    "code": "RateLimiting",
                    "message": "Please provide below info when asking for support: timestamp and correlation id.",
                    "details": [{ "code": "RateLimiting", "message": "Client application has been throttled and should not attempt to repeat the request until an amount of time has elapsed." }],
                }}),
            );
            retry_headers(&mut rsp, spent.resets_after);
            quota_headers(&mut rsp, spent);
            return rsp;
        }
    };
    if let Some(f) = s.lock().take_http_fault("graph.resources") {
        let mut rsp = super::scripted(&f);
        quota_headers(&mut rsp, left);
        return rsp;
    }
    let mut rsp = answer(s, body);
    quota_headers(&mut rsp, left);
    rsp
}

fn answer(s: &Arc<Shared>, body: &[u8]) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return bad_request("InvalidRequestContent", "The request body is not JSON.");
    };
    let Some(query) = req.get("query").and_then(Value::as_str) else {
        return bad_request("InvalidRequestContent", "The request has no query.");
    };
    let subs: Vec<String> = req
        .get("subscriptions")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_ascii_lowercase)
                .collect()
        })
        .unwrap_or_default();
    let opts = req.get("options").cloned().unwrap_or(Value::Null);
    let top = match opts.get("$top") {
        None => 1000,
        Some(t) => match t.as_u64() {
            Some(n @ 1..=1000) => n as usize,
            _ => return bad_request("InvalidParameter", "$top must be between 1 and 1000."),
        },
    };
    let filter = match parse_query(query) {
        Ok(f) => f,
        Err(message) => return bad_request("InvalidQuery", &message),
    };
    let stamp = fingerprint_u64(&format!("{subs:?}\n{query}"));
    let offset = match opts.get("$skipToken").and_then(Value::as_str) {
        None => 0,
        Some(t) => match t
            .split_once('.')
            .filter(|(_, f)| *f == format!("{stamp:016x}"))
            .and_then(|(o, _)| usize::from_str_radix(o, 16).ok())
        {
            Some(o) => o,
            None => {
                return bad_request(
                    "InvalidSkipToken",
                    "The $skipToken is not valid for this query.",
                );
            }
        },
    };
    let mut rows: Vec<(String, Value)> = {
        let w = s.lock();
        w.vms
            .values()
            .filter(|vm| subs.contains(&vm.sub.to_ascii_lowercase()) && filter.matches(vm))
            .map(|vm| (vm.id(), row(&w, vm)))
            .collect()
    };
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let total = rows.len();
    let page: Vec<Value> = rows
        .into_iter()
        .skip(offset)
        .take(top)
        .map(|r| r.1)
        .collect();
    let mut out = json!({
        "totalRecords": total,
        "count": page.len(),
        "data": page,
        "facets": [],
        "resultTruncated": "false",
    });
    if offset + top < total {
        out["$skipToken"] = json!(format!("{:x}.{stamp:016x}", offset + top));
    }
    json_response(StatusCode::OK, &out)
}

// ---------- membership control (`/_sim/vms`) ----------

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct NewVm {
    subscription: String,
    resource_group: String,
    vm: VmSpec,
}

/// `POST /_sim/vms`: `{"subscription","resourceGroup","vm":{…a scenario VM…}}`.
pub(super) async fn add_vm(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let new: NewVm = match serde_json::from_slice(&body) {
        Ok(n) => n,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "InvalidRequestContent",
                &e.to_string(),
            );
        }
    };
    match s
        .create_vm(&new.subscription, &new.resource_group, &new.vm)
        .await
    {
        Ok(()) => StatusCode::CREATED.into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e.reason(), &e.to_string()),
    }
}

/// `DELETE /_sim/vms/{name}`.
pub(super) async fn delete_vm(State(s): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    if s.delete_vm(&name).await {
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            &format!("no VM named {name}"),
        )
    }
}

/// `PUT /_sim/vms/{name}/tags`: `{"tags":{…}}` replaces the VM's tags.
pub(super) async fn set_tags(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    #[derive(serde::Deserialize)]
    struct Tags {
        tags: BTreeMap<String, String>,
    }
    let Ok(t) = serde_json::from_slice::<Tags>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContent",
            "expected {\"tags\":{\"key\":\"value\"}}",
        );
    };
    if s.lock().set_tags(&name, t.tags) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            &format!("no VM named {name}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(filters: &[&str]) -> String {
        let mut l = vec![
            "Resources",
            "| where type =~ 'microsoft.compute/virtualmachines'",
        ];
        l.extend_from_slice(filters);
        l.extend_from_slice(&TAIL);
        l.join("\n")
    }

    #[test]
    fn the_supported_shapes_parse() {
        let f = parse_query(&query(&[
            r"| where resourceGroup in~ ('rg-a', 'it\'s')",
            "| where properties.storageProfile.osDisk.osType =~ 'Windows'",
            r"| where name matches regex '(?i)^web\\-.*$'",
            "| extend tag0At = array_index_of(split(tolower(strcat_array(bag_keys(tags), '/')), '/'), 'env')",
            r"| where tag0At >= 0 and tostring(tags[tostring(bag_keys(tags)[tag0At])]) == 'a\\b'",
        ]))
        .unwrap();
        assert_eq!(f.groups, Some(vec!["rg-a".to_owned(), "it's".to_owned()]));
        assert_eq!(f.os_type.as_deref(), Some("Windows"));
        assert_eq!(
            f.name,
            Some(vec![
                Tok::Lit('w'),
                Tok::Lit('e'),
                Tok::Lit('b'),
                Tok::Lit('-'),
                Tok::Run
            ])
        );
        assert_eq!(f.tags, vec![("env".to_owned(), r"a\b".to_owned())]);
    }

    #[test]
    fn anything_else_is_an_invalid_query() {
        let bad = [
            query(&["| take 1"]),
            query(&["| where resourceGroup in~ ('a') or true"]),
            query(&["| where resourceGroup in~ ('a)"]),
            query(&[r"| where name matches regex '(?i)^a|b$'"]),
            query(&[r"| where name matches regex '^a$'"]),
            query(&["| where properties.storageProfile.osDisk.osType =~ 'W' | take 1"]),
            query(&[
                "| extend tag0At = array_index_of(split(tolower(strcat_array(bag_keys(tags), '/')), '/'), 'env')",
            ]),
            query(&[
                "| extend tag1At = array_index_of(split(tolower(strcat_array(bag_keys(tags), '/')), '/'), 'env')",
                "| where tag1At >= 0 and tostring(tags[tostring(bag_keys(tags)[tag1At])]) == 'x'",
            ]),
            "Resources | take 1".to_owned(),
            query(&[]).replace("| order by id asc", "| order by name asc"),
            format!("{}\n| take 1", query(&[])),
        ];
        for q in bad {
            assert!(parse_query(&q).is_err(), "{q}");
        }
    }

    #[test]
    fn globs_match_case_insensitively() {
        let p = name_pattern(r"(?i)^web\-.1.*$").unwrap();
        let m = |s: &str| glob(&p, &s.chars().collect::<Vec<_>>());
        assert!(m("WEB-a1") && m("web-x1yz") && m("web-11"));
        assert!(!m("web-1") && !m("web-ab1") && !m("webx1") && !m("app-1"));
        // Runs do not blow up on hostile patterns.
        let many = name_pattern(&format!("(?i)^{}b$", ".*a".repeat(40))).unwrap();
        assert!(!glob(&many, &['a'; 90]));
    }
}
