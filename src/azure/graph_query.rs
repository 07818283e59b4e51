//! The Kusto (KQL) text of a fleet's Resource Graph query, built from a [`VmSelector`]. Pure.
//!
//! Selector values come from a Kubernetes object that any user of its namespace may write, so
//! every value reaches the query only as a single-quoted KQL string literal with `\` and `'`
//! escaped; a value holding a control character (or too long to be a plausible Azure name) is
//! refused, never passed on. The name glob becomes an RE2 regular expression in which every
//! literal character is escaped.
//!
//! Matching rules: resource groups and the OS type compare case-insensitively (`in~`, `=~`), as
//! Azure treats them; tag keys compare case-insensitively (Azure tag names are) and tag values
//! exactly (Azure keeps their case and so does a policy built on them); the name glob is
//! case-insensitive.
//!
//! One clause per line; the ARM emulator recognises exactly these shapes.

use super::{AzureError, AzureResult, graph::VmSelector};

/// Longest selector value accepted (Azure names are at most 90 characters, tag values 256).
pub const MAX_VALUE_LEN: usize = 512;

/// The query of `selector`: VMs, their power state, their primary NIC's primary private
/// address and its public address, ordered by id. Subscriptions go in the request body.
pub fn vm_query(selector: &VmSelector) -> AzureResult<String> {
    if selector.subscriptions.is_empty() {
        return Err(AzureError::invalid("the selector names no subscription"));
    }
    for s in &selector.subscriptions {
        check(s, "subscription")?;
    }
    let mut q = vec![
        "Resources".to_owned(),
        "| where type =~ 'microsoft.compute/virtualmachines'".to_owned(),
    ];
    if !selector.resource_groups.is_empty() {
        let groups = selector
            .resource_groups
            .iter()
            .map(|g| literal(g, "resource group"))
            .collect::<AzureResult<Vec<_>>>()?;
        q.push(format!("| where resourceGroup in~ ({})", groups.join(", ")));
    }
    if let Some(os) = &selector.os_type {
        q.push(format!(
            "| where properties.storageProfile.osDisk.osType =~ {}",
            literal(os, "OS type")?
        ));
    }
    if let Some(glob) = &selector.name_pattern {
        check(glob, "name pattern")?;
        q.push(format!(
            "| where name matches regex {}",
            quote(&glob_regex(glob))
        ));
    }
    for (i, (k, v)) in selector.tags.iter().enumerate() {
        // The position of the key among the VM's tag names, compared in lower case (`/` cannot
        // occur in an Azure tag name), then that tag's value, exactly. No `mv-expand`.
        check(k, "tag key")?;
        let (key, value) = (quote(&k.to_lowercase()), literal(v, "tag value")?);
        q.push(format!(
            "| extend tag{i}At = array_index_of(split(tolower(strcat_array(bag_keys(tags), '/')), '/'), {key})"
        ));
        q.push(format!(
            "| where tag{i}At >= 0 and tostring(tags[tostring(bag_keys(tags)[tag{i}At])]) == {value}"
        ));
    }
    q.extend(TAIL.iter().map(|l| (*l).to_owned()));
    Ok(q.join("\n"))
}

/// Power state, primary NIC (the one marked primary among the first eight — Azure's most NICs
/// per VM —, else the first), its primary IP configuration's addresses, the public address;
/// stable order for paging. Resource Graph allows two `mv-expand` per query: only the IP
/// configuration uses one.
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

/// Refuses a value that cannot be carried safely: empty, too long, or with a control character.
fn check(value: &str, what: &str) -> AzureResult<()> {
    if value.is_empty() {
        return Err(AzureError::invalid(format!(
            "the selector's {what} is empty"
        )));
    }
    if value.len() > MAX_VALUE_LEN {
        return Err(AzureError::invalid(format!(
            "the selector's {what} is longer than {MAX_VALUE_LEN} bytes"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(AzureError::invalid(format!(
            "the selector's {what} {:?} holds a control character",
            value.escape_default().to_string()
        )));
    }
    Ok(())
}

/// A checked value as a KQL string literal.
fn literal(value: &str, what: &str) -> AzureResult<String> {
    check(value, what)?;
    Ok(quote(value))
}

/// A single-quoted KQL string literal: `\` and `'` escaped (callers refuse control characters).
pub fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if matches!(c, '\\' | '\'') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// The RE2 expression of a glob (`*` any run, `?` one character), anchored and
/// case-insensitive; every other ASCII punctuation character is escaped.
pub fn glob_regex(glob: &str) -> String {
    let mut out = String::from("(?i)^");
    for c in glob.chars() {
        match c {
            '*' => out.push_str(".*"),
            '?' => out.push('.'),
            c if c.is_ascii_punctuation() => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out.push('$');
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn selector() -> VmSelector {
        VmSelector {
            subscriptions: vec!["00000000-0000-0000-0000-000000000001".into()],
            ..Default::default()
        }
    }

    fn lines(s: &VmSelector) -> Vec<String> {
        vm_query(s).unwrap().lines().map(str::to_owned).collect()
    }

    #[test]
    fn literals_escape_backslash_and_quote() {
        let cases = [
            ("rg", "'rg'"),
            ("it's", r"'it\'s'"),
            (r"a\b", r"'a\\b'"),
            (r"\'", r"'\\\''"),
            ("x | take 1", "'x | take 1'"),
            ("\"double\"", "'\"double\"'"),
            ("ünïcode", "'ünïcode'"),
        ];
        for (value, want) in cases {
            assert_eq!(quote(value), want, "{value}");
        }
    }

    #[test]
    fn globs_become_anchored_escaped_regexes() {
        let cases = [
            ("web-*", r"(?i)^web\-.*$"),
            ("vm?", "(?i)^vm.$"),
            ("a.b", r"(?i)^a\.b$"),
            ("(x)|[y]+{z}^$", r"(?i)^\(x\)\|\[y\]\+\{z\}\^\$$"),
            (r"back\slash", r"(?i)^back\\slash$"),
            ("*", "(?i)^.*$"),
        ];
        for (glob, want) in cases {
            assert_eq!(glob_regex(glob), want, "{glob}");
        }
        // In the query the regex is a KQL literal too: its backslashes are doubled.
        let s = VmSelector {
            name_pattern: Some("web-*".into()),
            ..selector()
        };
        assert!(lines(&s).contains(&r"| where name matches regex '(?i)^web\\-.*$'".to_owned()));
    }

    #[test]
    fn each_selector_field_adds_its_clause() {
        let base = lines(&selector());
        assert_eq!(base[0], "Resources");
        assert_eq!(
            base[1],
            "| where type =~ 'microsoft.compute/virtualmachines'"
        );
        assert_eq!(base.len(), 2 + TAIL.len());
        assert_eq!(base.last().unwrap(), "| order by id asc");

        let rg = VmSelector {
            resource_groups: vec!["rg-a".into(), "RG-B".into()],
            ..selector()
        };
        assert_eq!(lines(&rg)[2], "| where resourceGroup in~ ('rg-a', 'RG-B')");

        let os = VmSelector {
            os_type: Some("Windows".into()),
            ..selector()
        };
        assert_eq!(
            lines(&os)[2],
            "| where properties.storageProfile.osDisk.osType =~ 'Windows'"
        );

        let tags = VmSelector {
            tags: BTreeMap::from([("Env".into(), "Prod".into()), ("rdp".into(), "on".into())]),
            ..selector()
        };
        let l = lines(&tags);
        assert_eq!(l.len(), 2 + 4 + TAIL.len());
        assert_eq!(
            l[2],
            "| extend tag0At = array_index_of(split(tolower(strcat_array(bag_keys(tags), '/')), '/'), 'env')"
        );
        assert_eq!(
            l[3],
            "| where tag0At >= 0 and tostring(tags[tostring(bag_keys(tags)[tag0At])]) == 'Prod'"
        );
        assert!(l[5].ends_with("[tag1At])]) == 'on'"), "{}", l[5]);
    }

    #[test]
    fn injection_attempts_stay_inside_their_literal() {
        let attacks = [
            "x' or name != '",
            "x\\' | take 1 //",
            "') | union (Resources | take 1) | where ('",
            "\\",
            "'",
        ];
        for attack in attacks {
            let s = VmSelector {
                resource_groups: vec![attack.into()],
                os_type: Some(attack.into()),
                name_pattern: Some(attack.into()),
                tags: BTreeMap::from([(attack.into(), attack.into())]),
                ..selector()
            };
            let q = vm_query(&s).unwrap();
            // Outside literals, the text is exactly the fixed shape: strip every literal and
            // compare with the query of plain values.
            let plain = VmSelector {
                resource_groups: vec!["v".into()],
                os_type: Some("v".into()),
                name_pattern: Some("v".into()),
                tags: BTreeMap::from([("v".into(), "v".into())]),
                ..selector()
            };
            assert_eq!(
                strip_literals(&q),
                strip_literals(&vm_query(&plain).unwrap()),
                "{attack}"
            );
        }
    }

    /// The query with each single-quoted literal (honouring `\` escapes) replaced by `L`.
    fn strip_literals(q: &str) -> String {
        let mut out = String::new();
        let mut chars = q.chars();
        while let Some(c) = chars.next() {
            if c != '\'' {
                out.push(c);
                continue;
            }
            out.push('L');
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '\'' => break,
                    _ => {}
                }
            }
        }
        out
    }

    #[test]
    fn unrepresentable_values_are_refused() {
        let long = "x".repeat(MAX_VALUE_LEN + 1);
        let bad = ["", "a\nb", "a\rb", "tab\there", "nul\0", long.as_str()];
        for value in bad {
            let cases = [
                VmSelector {
                    resource_groups: vec![value.into()],
                    ..selector()
                },
                VmSelector {
                    os_type: Some(value.into()),
                    ..selector()
                },
                VmSelector {
                    name_pattern: Some(value.into()),
                    ..selector()
                },
                VmSelector {
                    tags: BTreeMap::from([("k".into(), value.into())]),
                    ..selector()
                },
                VmSelector {
                    tags: BTreeMap::from([(value.into(), "v".into())]),
                    ..selector()
                },
                VmSelector {
                    subscriptions: vec![value.into()],
                    ..selector()
                },
            ];
            for s in cases {
                let err = vm_query(&s).unwrap_err();
                assert_eq!(err.reason(), "Invalid", "{value:?}: {err}");
            }
        }
        let none = VmSelector::default();
        assert!(
            vm_query(&none)
                .unwrap_err()
                .to_string()
                .contains("no subscription")
        );
    }
}
