//! Microsoft.Network: NICs (and their reset), NSGs, subnets, public IPs, address
//! availability and IP flow verify. (Effective security rules are not emulated: the operator
//! evaluates the NSGs itself and cross-checks with IP flow verify.)

use std::{net::Ipv4Addr, sync::Arc};

use axum::{http::StatusCode, response::Response};
use serde_json::{Value, json};

use super::{
    Call, accepted, accepted_action, boot_guest, conflict, error, finish_later, json_response,
    not_found, retry_headers, set_header, start_op,
};
use crate::sim::{
    Shared,
    fault::Fault,
    scenario::OpKind,
    world::{Vm, World},
};

pub(super) fn network_route(call: Call<'_>, kind: &str, name: &str, rest: &[String]) -> Response {
    let Call {
        s,
        method,
        sub,
        rg,
        query,
        body,
    } = call;
    let k = crate::sim::world::key(sub, rg, name);
    let r: Vec<String> = rest.iter().map(|x| x.to_ascii_lowercase()).collect();
    let r: Vec<&str> = r.iter().map(String::as_str).collect();
    match (method.as_str(), kind, r.as_slice()) {
        ("GET", "networkinterfaces", []) => {
            let w = s.lock();
            match w.nics.get(&k) {
                Some(nic) => json_response(StatusCode::OK, &nic_json(&w, nic)),
                None => not_found("Microsoft.Network/networkInterfaces", name, rg),
            }
        }
        ("PUT", "networkinterfaces", []) => put_nic(s, &k, name, rg, body),
        ("GET", "networksecuritygroups", []) => {
            let w = s.lock();
            match w.nsgs.get(&k) {
                Some(nsg) => json_response(StatusCode::OK, &nsg_json(nsg)),
                None => not_found("Microsoft.Network/networkSecurityGroups", name, rg),
            }
        }
        ("PUT", "networksecuritygroups", ["securityrules", rule]) => put_rule(
            s,
            &k,
            name,
            rg,
            rest.get(1).map_or(*rule, String::as_str),
            body,
        ),
        ("GET", "virtualnetworks", ["subnets", subnet]) => {
            let w = s.lock();
            match w.vnets.get(&k).and_then(|v| {
                v.subnets
                    .iter()
                    .find(|x| x.name.eq_ignore_ascii_case(subnet))
                    .map(|sn| (v, sn))
            }) {
                Some((v, sn)) => {
                    let mut props = json!({
                        "addressPrefix": format!("{}/{}", sn.prefix.0, sn.prefix.1),
                        "provisioningState": "Succeeded"
                    });
                    if let Some(nsg) = sn.nsg.as_ref().and_then(|n| w.nsgs.get(n)) {
                        props["networkSecurityGroup"] = json!({ "id": nsg.id() });
                    }
                    json_response(
                        StatusCode::OK,
                        &json!({
                            "id": format!("{}/subnets/{}", v.id(), sn.name),
                            "name": sn.name,
                            "type": "Microsoft.Network/virtualNetworks/subnets",
                            "properties": props
                        }),
                    )
                }
                None => not_found("Microsoft.Network/virtualNetworks/subnets", subnet, rg),
            }
        }
        ("GET", "virtualnetworks", ["checkipaddressavailability"]) => {
            let w = s.lock();
            if !w.vnets.contains_key(&k) {
                return not_found("Microsoft.Network/virtualNetworks", name, rg);
            }
            let Some(ip) = query
                .get("ipaddress")
                .and_then(|v| v.parse::<Ipv4Addr>().ok())
            else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "InvalidRequestFormat",
                    "ipAddress must be an IPv4 address",
                );
            };
            let Some(subnet) = w.subnet_of(&k, ip) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "PrivateIPAddressNotInSubnet",
                    "The address is in no subnet of the virtual network.",
                );
            };
            let available = w.address_free(&k, &subnet, ip);
            let others: Vec<String> = w
                .free_addresses(&k, &subnet, 5)
                .iter()
                .map(ToString::to_string)
                .collect();
            let body = if available {
                json!({ "available": true })
            } else {
                json!({ "available": false, "availableIPAddresses": others })
            };
            json_response(StatusCode::OK, &body)
        }
        ("GET", "publicipaddresses", []) => {
            let w = s.lock();
            match w.pips.get(&k) {
                Some(p) => json_response(
                    StatusCode::OK,
                    &json!({
                        "id": format!("/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Network/publicIPAddresses/{}", p.sub, p.rg, p.name),
                        "name": p.name,
                        "type": "Microsoft.Network/publicIPAddresses",
                        "location": p.location,
                        // Basic public IPs were retired on 2025-09-30; Standard ones are static
                        // ("public-ip-basic-upgrade-guidance", "public-ip-addresses" docs).
                        "sku": { "name": "Standard", "tier": "Regional" },
                        "properties": {
                            "ipAddress": p.address.to_string(),
                            "publicIPAllocationMethod": "Static",
                            "publicIPAddressVersion": "IPv4",
                            "provisioningState": "Succeeded"
                        }
                    }),
                ),
                None => not_found("Microsoft.Network/publicIPAddresses", name, rg),
            }
        }
        ("POST", "networkwatchers", ["ipflowverify"]) => ip_flow_verify(s, sub, rg, name, body),
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "HttpMethodNotAllowed",
            "unsupported network operation",
        ),
    }
}

fn nic_json(w: &World, nic: &crate::sim::world::Nic) -> Value {
    let vnet_id = w.vnets.get(&nic.vnet).map(|v| v.id()).unwrap_or_default();
    let mut ip = json!({
        "privateIPAddress": nic.private_ip.to_string(),
        "privateIPAllocationMethod": if nic.static_ip { "Static" } else { "Dynamic" },
        "privateIPAddressVersion": "IPv4",
        "primary": true,
        "provisioningState": "Succeeded",
        "subnet": { "id": format!("{vnet_id}/subnets/{}", nic.subnet) }
    });
    if let Some(p) = nic.pip.as_ref().and_then(|k| w.pips.get(k)) {
        ip["publicIPAddress"] = json!({ "id": format!("/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Network/publicIPAddresses/{}", p.sub, p.rg, p.name) });
    }
    let vm_id = w
        .vms
        .get(&nic.vm.to_ascii_lowercase())
        .map(Vm::id)
        .unwrap_or_default();
    let mut props = json!({
        "provisioningState": if nic.busy { "Updating" } else { "Succeeded" },
        "macAddress": nic.mac,
        "primary": true,
        "virtualMachine": { "id": vm_id },
        "ipConfigurations": [{
            "id": format!("{}/ipConfigurations/ipconfig1", nic.id()),
            "name": "ipconfig1",
            "type": "Microsoft.Network/networkInterfaces/ipConfigurations",
            "properties": ip
        }]
    });
    if let Some(nsg) = nic.nsg.as_ref().and_then(|k| w.nsgs.get(k)) {
        props["networkSecurityGroup"] = json!({ "id": nsg.id() });
    }
    json!({
        "id": nic.id(),
        "name": nic.name,
        "type": "Microsoft.Network/networkInterfaces",
        "location": nic.location,
        "properties": props
    })
}

fn rule_json(nsg_id: &str, r: &crate::azure::model::SecurityRule, default: bool) -> Value {
    let collection = if default {
        "defaultSecurityRules"
    } else {
        "securityRules"
    };
    let protocol = match r.protocol {
        crate::azure::model::RuleProtocol::Any => "*",
        crate::azure::model::RuleProtocol::Tcp => "Tcp",
        crate::azure::model::RuleProtocol::Udp => "Udp",
        crate::azure::model::RuleProtocol::Other => "Icmp",
    };
    json!({
        "id": format!("{nsg_id}/{collection}/{}", r.name),
        "name": r.name,
        "type": format!("Microsoft.Network/networkSecurityGroups/{collection}"),
        "properties": {
            "provisioningState": "Succeeded",
            "protocol": protocol,
            "sourcePortRange": "*",
            "destinationPortRange": r.destination_ports.first().cloned().unwrap_or_else(|| "*".into()),
            "sourceAddressPrefix": if r.source_prefixes.len() == 1 { json!(r.source_prefixes[0]) } else if r.source_prefixes.is_empty() { json!("*") } else { Value::Null },
            "destinationAddressPrefix": r.destination_prefixes.first().cloned().unwrap_or_else(|| "*".into()),
            "sourcePortRanges": [],
            "destinationPortRanges": [],
            "sourceAddressPrefixes": if r.source_prefixes.len() > 1 { r.source_prefixes.clone() } else { Vec::new() },
            "destinationAddressPrefixes": [],
            "access": if r.allow { "Allow" } else { "Deny" },
            "priority": r.priority,
            "direction": if r.inbound { "Inbound" } else { "Outbound" }
        }
    })
}

fn nsg_json(nsg: &crate::sim::world::Nsg) -> Value {
    let id = nsg.id();
    let custom: Vec<Value> = nsg.rules.iter().map(|r| rule_json(&id, r, false)).collect();
    let defaults: Vec<Value> = crate::azure::nsg::default_rules()
        .iter()
        .map(|r| rule_json(&id, r, true))
        .collect();
    json!({
        "id": id,
        "name": nsg.name,
        "type": "Microsoft.Network/networkSecurityGroups",
        "location": nsg.location,
        "properties": {
            "provisioningState": "Succeeded",
            "securityRules": custom,
            "defaultSecurityRules": defaults
        }
    })
}

/// `PUT …/networkSecurityGroups/{nsg}/securityRules/{rule}`: validated like ARM, applied
/// when the operation ends (Azure programs the rule asynchronously).
fn put_rule(s: &Arc<Shared>, k: &str, nsg: &str, rg: &str, name: &str, body: &[u8]) -> Response {
    let bad = |message: &str| error(StatusCode::BAD_REQUEST, "InvalidRequestFormat", message);
    let Ok(b) = serde_json::from_slice::<Value>(body) else {
        return bad("Cannot parse the request.");
    };
    if name.is_empty() || name.len() > 80 {
        return bad("A security rule name must have 1-80 characters.");
    }
    let Some(p) = b.get("properties") else {
        return bad("A security rule needs properties.");
    };
    let text = |f: &str| p.get(f).and_then(Value::as_str).map(str::to_owned);
    let list = |single: &str, plural: &str| -> Vec<String> {
        match (text(single), p.get(plural).and_then(Value::as_array)) {
            (Some(one), _) => vec![one],
            (None, Some(many)) => many
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            (None, None) => Vec::new(),
        }
    };
    let protocol = match text("protocol").map(|t| t.to_ascii_lowercase()).as_deref() {
        Some("tcp") => crate::azure::model::RuleProtocol::Tcp,
        Some("udp") => crate::azure::model::RuleProtocol::Udp,
        Some("*") => crate::azure::model::RuleProtocol::Any,
        Some(_) => crate::azure::model::RuleProtocol::Other,
        None => return bad("protocol is required."),
    };
    let (Some(access), Some(direction), Some(priority)) = (
        text("access"),
        text("direction"),
        p.get("priority").and_then(Value::as_i64),
    ) else {
        return bad("access, direction and priority are required.");
    };
    if !(100..=4096).contains(&priority) {
        return error(
            StatusCode::BAD_REQUEST,
            "SecurityRuleInvalidPriority",
            &format!(
                "Security rule has invalid Priority. Value provided: {priority}. Allowed range 100-4096."
            ),
        );
    }
    let source_prefixes = list("sourceAddressPrefix", "sourceAddressPrefixes");
    let destination_ports = list("destinationPortRange", "destinationPortRanges");
    if source_prefixes.is_empty() || destination_ports.is_empty() {
        return bad("source address prefixes and destination port ranges are required.");
    }
    let rule = crate::azure::model::SecurityRule {
        name: name.to_owned(),
        priority: i32::try_from(priority).unwrap_or(i32::MAX),
        inbound: direction.eq_ignore_ascii_case("Inbound"),
        allow: access.eq_ignore_ascii_case("Allow"),
        protocol,
        source_prefixes,
        destination_prefixes: {
            let d = list("destinationAddressPrefix", "destinationAddressPrefixes");
            if d.is_empty() {
                vec!["*".to_owned()]
            } else {
                d
            }
        },
        destination_ports,
        default_rule: false,
    };
    let mut w = s.lock();
    let Some(group) = w.nsgs.get(k) else {
        return not_found("Microsoft.Network/networkSecurityGroups", nsg, rg);
    };
    if let Some(other) = group.rules.iter().find(|r| {
        !r.name.eq_ignore_ascii_case(name)
            && r.priority == rule.priority
            && r.inbound == rule.inbound
    }) {
        return error(
            StatusCode::BAD_REQUEST,
            "SecurityRuleConflict",
            &format!(
                "Security rule {} conflicts with rule {}. Rules cannot have the same Priority and Direction.",
                name, other.name
            ),
        );
    }
    let existed = group
        .rules
        .iter()
        .any(|r| r.name.eq_ignore_ascii_case(name));
    // Network may accept a change while another one runs on the same NSG and fail it later
    // with `AnotherOperationInProgress` (Azure/bicep#5132, microsoft/AzureTRE#2222).
    let collides = group.busy;
    let (sub, location, nsg_id) = (group.sub.clone(), group.location.clone(), group.id());
    let mut body = rule_json(&nsg_id, &rule, false);
    body["properties"]["provisioningState"] = json!("Updating");
    let op = start_op(
        s,
        &mut w,
        "Microsoft.Network",
        (&sub, &location),
        (OpKind::NetworkUpdate, k),
    );
    if let Some(g) = w.nsgs.get_mut(k) {
        g.busy = true;
    }
    drop(w);
    let key = k.to_owned();
    finish_later(s, op.id.clone(), op.after, move |w| {
        let Some(group) = w.nsgs.get_mut(&key) else {
            return Err(("NotFound".into(), "NSG vanished".into()));
        };
        if collides {
            return Err((
                "AnotherOperationInProgress".into(),
                format!(
                    "Another operation on this or dependent resource is in progress. To retrieve status of the operation use uri: {}",
                    group.id()
                ),
            ));
        }
        group.busy = false;
        group
            .rules
            .retain(|r| !r.name.eq_ignore_ascii_case(&rule.name));
        group.rules.push(rule);
        Ok(None)
    });
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    accepted(&op.aao, None, op.retry, status, Some(body))
}

fn put_nic(s: &Arc<Shared>, k: &str, name: &str, rg: &str, body: &[u8]) -> Response {
    let Ok(b) = serde_json::from_slice::<Value>(body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestFormat",
            "Cannot parse the request.",
        );
    };
    let mut w = s.lock();
    let Some(nic) = w.nics.get(k).cloned() else {
        return not_found("Microsoft.Network/networkInterfaces", name, rg);
    };
    if nic.busy {
        // Network answers a concurrent change with 429 and a Retry-After (ARM request-limits
        // doc: "RetryableErrorDueToAnotherOperation").
        let mut rsp = error(
            StatusCode::TOO_MANY_REQUESTS,
            "RetryableErrorDueToAnotherOperation",
            &format!(
                "Operation on {} is not allowed because another operation on this or a dependent resource is in progress. Retry after some time.",
                nic.id()
            ),
        );
        let retry = w.next_retry_after(k);
        retry_headers(&mut rsp, retry);
        return rsp;
    }
    let configs = b
        .pointer("/properties/ipConfigurations")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let primary = configs
        .iter()
        .find(|c| {
            c.pointer("/properties/primary")
                .and_then(Value::as_bool)
                .unwrap_or(false)
        })
        .or_else(|| configs.first());
    let Some(cfg) = primary else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestFormat",
            "A network interface needs an IP configuration.",
        );
    };
    let new_ip = match cfg
        .pointer("/properties/privateIPAddress")
        .and_then(Value::as_str)
    {
        Some(t) => match t.parse::<Ipv4Addr>() {
            Ok(ip) => ip,
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "InvalidRequestFormat",
                    "privateIPAddress is not an IPv4 address.",
                );
            }
        },
        None => nic.private_ip,
    };
    let static_ip = cfg
        .pointer("/properties/privateIPAllocationMethod")
        .and_then(Value::as_str)
        .is_some_and(|m| m.eq_ignore_ascii_case("Static"));
    if new_ip != nic.private_ip {
        if w.subnet_of(&nic.vnet, new_ip)
            .is_none_or(|sn| !sn.eq_ignore_ascii_case(&nic.subnet))
        {
            return error(
                StatusCode::BAD_REQUEST,
                "PrivateIPAddressNotInSubnet",
                &format!(
                    "Private static IP address {new_ip} does not belong to the range of subnet prefix."
                ),
            );
        }
        if !w.address_free(&nic.vnet, &nic.subnet, new_ip) {
            return error(
                StatusCode::BAD_REQUEST,
                "PrivateIPAddressInUse",
                &format!(
                    "IP configuration is using the private IP address {new_ip} which is already allocated or reserved."
                ),
            );
        }
    }
    if let Some(n) = w.nics.get_mut(k) {
        n.busy = true;
    }
    let body = w.nics.get(k).map(|n| nic_json(&w, n)).unwrap_or_default();
    let vm_key = nic.vm.to_ascii_lowercase();
    let op = start_op(
        s,
        &mut w,
        "Microsoft.Network",
        (&nic.sub, &nic.location),
        (OpKind::NetworkUpdate, &vm_key),
    );
    drop(w);
    let key = k.to_owned();
    let shared = s.clone();
    finish_later(s, op.id.clone(), op.after, move |w| {
        let changed = {
            let Some(n) = w.nics.get_mut(&key) else {
                return Err(("NotFound".into(), "NIC vanished".into()));
            };
            n.busy = false;
            let changed = n.private_ip != new_ip;
            n.private_ip = new_ip;
            n.static_ip = static_ip;
            if changed {
                n.mac = format!("{}-R", n.mac.trim_end_matches("-R"));
            }
            changed
        };
        // Changing the address re-initialises the NIC: the VM restarts with it.
        if changed && let Some(v) = w.vms.get_mut(&vm_key) {
            v.faults.remove(&Fault::NicBroken);
            v.faults.remove(&Fault::GuestHung);
            boot_guest(&shared, w, &vm_key);
        }
        Ok(None)
    });
    let mut rsp = json_response(StatusCode::OK, &body);
    set_header(&mut rsp, "azure-asyncoperation", &op.aao);
    retry_headers(&mut rsp, op.retry);
    rsp
}

fn ip_flow_verify(s: &Arc<Shared>, sub: &str, rg: &str, watcher: &str, body: &[u8]) -> Response {
    let mut w = s.lock();
    let region = watcher
        .strip_prefix("NetworkWatcher_")
        .map(str::to_ascii_lowercase);
    let known = rg.eq_ignore_ascii_case("NetworkWatcherRG")
        && region.as_ref().is_some_and(|r| {
            w.subs
                .get(&sub.to_ascii_lowercase())
                .is_some_and(|s| s.watchers.contains(r))
        });
    if !known {
        return not_found("Microsoft.Network/networkWatchers", watcher, rg);
    }
    let Ok(b) = serde_json::from_slice::<Value>(body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestFormat",
            "Cannot parse the request.",
        );
    };
    let field = |k: &str| b.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let target = field("targetResourceId");
    let vm_name = target.rsplit('/').next().unwrap_or("").to_ascii_lowercase();
    let (Ok(remote), Ok(port)) = (
        field("remoteIPAddress").parse::<Ipv4Addr>(),
        field("localPort").parse::<u16>(),
    ) else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestFormat",
            "remoteIPAddress and localPort are required.",
        );
    };
    let Some(vm) = w.vms.get(&vm_name).cloned() else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidTargetResource",
            "The target resource is not a known virtual machine.",
        );
    };
    if !vm.running() {
        return conflict(
            "OperationNotAllowed",
            "IP flow verify needs a running virtual machine.",
        );
    }
    let Some(nic) = w.nics.get(&vm.nic).cloned() else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidTargetResource",
            "The virtual machine has no network interface.",
        );
    };
    let verdict = w.flow_verdict(&nic, remote, port);
    // Azure names the deciding rule (`securityRules/X`, `defaultSecurityRules/X`) and omits
    // `ruleName` when no rule decided (no NSG on either level): Network Watcher's IP flow
    // verify overview and `NetworkWatcherIpFlowVerify.json` (network 2024-03-01).
    let mut result = json!({ "access": if verdict.allow { "Allow" } else { "Deny" } });
    if let Some((rule, _)) = verdict.rule {
        result["ruleName"] = json!(rule);
    }
    let op = start_op(
        s,
        &mut w,
        "Microsoft.Network",
        (sub, &vm.location),
        (OpKind::FlowVerify, &vm_name),
    );
    drop(w);
    finish_later(s, op.id.clone(), op.after, move |_| Ok(Some(result)));
    accepted_action(&op)
}
