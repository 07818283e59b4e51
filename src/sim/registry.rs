//! A simulated guest's registry, with Windows semantics: keys and value names are
//! case-insensitive, values are typed, a key is created only under an existing parent, and
//! `New-Item -Force` on an existing key (the registry provider's `NewItem`) deletes the key
//! with all its values and subkeys and creates it empty. The RDP listener works only while
//! the values it needs are present and sane.

use std::collections::{BTreeMap, BTreeSet};

use crate::guest::changes::{
    RDP_FIREWALL_RULE, RDP_TCP, RegValue, TERMINAL_SERVER, TLS12_SERVER, TS_POLICY,
};

/// Where Windows keeps its firewall rules, one `REG_SZ` per rule (`…|LPort=3389|…`).
pub const FIREWALL_RULES: &str =
    r"HKLM:\SYSTEM\CurrentControlSet\Services\SharedAccess\Parameters\FirewallPolicy\FirewallRules";

/// The Remote Desktop TCP rule as a fresh Windows Server stores it.
const RDP_RULE: &str = r"v2.31|Action=Allow|Active=TRUE|Dir=In|Protocol=6|LPort=3389|App=%SystemRoot%\system32\svchost.exe|Svc=termservice|Name=@FirewallAPI.dll,-28775|Desc=@FirewallAPI.dll,-28756|EmbedCtxt=@FirewallAPI.dll,-28752|";

/// One key: its spelling and its values (lower-cased name → spelling, value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Key {
    values: BTreeMap<String, (String, RegValue)>,
}

/// A guest's registry (the keys the RDP guides touch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    /// Lower-cased full path → key.
    keys: BTreeMap<String, Key>,
    /// Paths whose ACL denies SYSTEM writes (lower-cased registry keys, but also folders and
    /// certificate stores): writing there fails as on Windows.
    denied: BTreeSet<String>,
}

fn norm(path: &str) -> String {
    path.trim_end_matches('\\').to_ascii_lowercase()
}

fn parent(path: &str) -> Option<&str> {
    path.trim_end_matches('\\')
        .rsplit_once('\\')
        .map(|(p, _)| p)
}

impl Registry {
    /// An empty registry holding only the `HKLM:` root.
    pub fn empty() -> Self {
        let mut keys = BTreeMap::new();
        keys.insert("hklm:".to_owned(), Key::default());
        Self {
            keys,
            denied: BTreeSet::new(),
        }
    }

    /// A freshly installed Windows Server: RDP enabled on `port`, the default listener.
    pub fn windows_default(port: u16) -> Self {
        let mut r = Self::empty();
        for key in [TERMINAL_SERVER, RDP_TCP, TLS12_SERVER, FIREWALL_RULES] {
            r.create_path(key);
        }
        let dword = RegValue::Dword;
        for (key, name, value) in [
            (TERMINAL_SERVER, "fDenyTSConnections", dword(0)),
            (RDP_TCP, "fEnableWinStation", dword(1)),
            (RDP_TCP, "PortNumber", dword(u32::from(port))),
            (RDP_TCP, "SecurityLayer", dword(2)),
            (RDP_TCP, "UserAuthentication", dword(1)),
            (RDP_TCP, "MinEncryptionLevel", dword(2)),
            (RDP_TCP, "MaxInstanceCount", dword(0xffff_ffff)),
            (RDP_TCP, "fInheritMaxIdleTime", dword(1)),
            (
                RDP_TCP,
                "LoadableProtocol_Object",
                RegValue::String("{5828227c-20cf-4408-b73f-73ab70b8849f}".into()),
            ),
            (TLS12_SERVER, "Enabled", dword(1)),
            (TLS12_SERVER, "DisabledByDefault", dword(0)),
            (
                FIREWALL_RULES,
                RDP_FIREWALL_RULE,
                RegValue::String(RDP_RULE.replace("LPort=3389", &format!("LPort={port}"))),
            ),
        ] {
            // The keys were just created and nothing is denied: the write cannot fail.
            let _ = r.set(key, name, value);
        }
        r
    }

    /// Whether `path` exists.
    pub fn key_exists(&self, path: &str) -> bool {
        self.keys.contains_key(&norm(path))
    }

    /// `New-Item -Path parent -Name leaf` (no `-Force`): fails when the key exists or its
    /// parent is missing.
    pub fn new_item(&mut self, path: &str) -> Result<(), String> {
        let key = norm(path);
        if self.keys.contains_key(&key) {
            return Err(format!("A key at this path already exists: {path}"));
        }
        let p = parent(&key).ok_or_else(|| format!("Cannot create the root: {path}"))?;
        if !self.keys.contains_key(p) {
            return Err(format!("Cannot find path '{p}' because it does not exist."));
        }
        if self.denied.contains(p) {
            return Err("Requested registry access is not allowed.".to_owned());
        }
        self.keys.insert(key, Key::default());
        Ok(())
    }

    /// `New-Item -Path path -Force`: an existing key is deleted with every value and subkey
    /// and created empty; missing parents are created.
    pub fn new_item_force(&mut self, path: &str) {
        let key = norm(path);
        let prefix = format!("{key}\\");
        self.keys
            .retain(|k, _| *k != key && !k.starts_with(prefix.as_str()));
        self.create_path(path);
    }

    /// Creates every missing key of `path`, parent first, as the applier does; returns whether
    /// any key was created.
    pub fn create_path(&mut self, path: &str) -> bool {
        let mut created = false;
        let mut current = String::new();
        for part in path.trim_end_matches('\\').split('\\') {
            if !current.is_empty() {
                current.push('\\');
            }
            current.push_str(part);
            if !self.key_exists(&current) {
                self.keys.insert(norm(&current), Key::default());
                created = true;
            }
        }
        created
    }

    /// Reads a value.
    pub fn get(&self, path: &str, name: &str) -> Option<&RegValue> {
        self.keys
            .get(&norm(path))?
            .values
            .get(&name.to_ascii_lowercase())
            .map(|(_, v)| v)
    }

    /// Reads a DWORD.
    pub fn dword(&self, path: &str, name: &str) -> Option<u32> {
        match self.get(path, name)? {
            RegValue::Dword(v) => Some(*v),
            RegValue::String(_) | RegValue::Binary(_) => None,
        }
    }

    /// `Set-ItemProperty -Type`: writes a value into an existing key (creating or replacing
    /// only that value).
    pub fn set(&mut self, path: &str, name: &str, value: RegValue) -> Result<(), String> {
        let key = norm(path);
        if self.denied.contains(&key) {
            return Err("Requested registry access is not allowed.".to_owned());
        }
        let k = self
            .keys
            .get_mut(&key)
            .ok_or_else(|| format!("Cannot find path '{path}' because it does not exist."))?;
        k.values
            .insert(name.to_ascii_lowercase(), (name.to_owned(), value));
        Ok(())
    }

    /// `Remove-ItemProperty`: deletes one value.
    pub fn remove(&mut self, path: &str, name: &str) -> Result<(), String> {
        let key = norm(path);
        if self.denied.contains(&key) {
            return Err("Requested registry access is not allowed.".to_owned());
        }
        if let Some(k) = self.keys.get_mut(&key) {
            k.values.remove(&name.to_ascii_lowercase());
        }
        Ok(())
    }

    /// Denies writes to `path` (its ACL grants SYSTEM read only).
    pub fn deny_writes(&mut self, path: &str) {
        self.denied.insert(norm(path));
    }

    /// Whether writes to `path` are denied.
    pub fn is_denied(&self, path: &str) -> bool {
        self.denied.contains(&norm(path))
    }

    /// The names and values in `path`, in name order.
    pub fn values(&self, path: &str) -> Vec<(String, RegValue)> {
        self.keys
            .get(&norm(path))
            .map(|k| k.values.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether TermService can open the RDP-Tcp listener on `port`: the key and its required
    /// values must be present and sane. `Err` names what is wrong.
    pub fn listener(&self, port: u16) -> Result<(), String> {
        if !self.key_exists(RDP_TCP) {
            return Err("the RDP-Tcp key is missing".to_owned());
        }
        let need = |name: &str, ok: &dyn Fn(u32) -> bool| match self.dword(RDP_TCP, name) {
            Some(v) if ok(v) => Ok(()),
            Some(v) => Err(format!("RDP-Tcp {name} is {v}")),
            None => Err(format!("RDP-Tcp {name} is missing")),
        };
        need("fEnableWinStation", &|v| v == 1)?;
        need("PortNumber", &|v| v == u32::from(port))?;
        need("SecurityLayer", &|v| v <= 2)?;
        need("MinEncryptionLevel", &|v| (1..=4).contains(&v))?;
        need("MaxInstanceCount", &|v| v > 0)?;
        if !matches!(
            self.get(RDP_TCP, "LoadableProtocol_Object"),
            Some(RegValue::String(_))
        ) {
            return Err("RDP-Tcp LoadableProtocol_Object is missing".to_owned());
        }
        Ok(())
    }

    /// The thumbprint `SSLCertificateSHA1Hash` binds the listener to, if any.
    pub fn certificate_binding(&self) -> Option<String> {
        match self.get(RDP_TCP, "SSLCertificateSHA1Hash")? {
            v @ RegValue::Binary(_) => Some(v.to_string()),
            _ => None,
        }
    }

    /// The local port of the Remote Desktop TCP firewall rule.
    pub fn firewall_rdp_port(&self) -> Option<u16> {
        let RegValue::String(rule) = self.get(FIREWALL_RULES, RDP_FIREWALL_RULE)? else {
            return None;
        };
        rule.split('|')
            .find_map(|f| f.strip_prefix("LPort="))?
            .parse()
            .ok()
    }

    /// `Set-NetFirewallRule -LocalPort`: rewrites the rule's local port.
    pub fn set_firewall_rdp_port(&mut self, port: u16) -> Result<(), String> {
        let RegValue::String(rule) = self
            .get(FIREWALL_RULES, RDP_FIREWALL_RULE)
            .cloned()
            .ok_or_else(|| format!("No MSFT_NetFirewallRule objects found with property 'Name' equal to '{RDP_FIREWALL_RULE}'."))?
        else {
            return Err("the firewall rule is not a string".to_owned());
        };
        let rule: Vec<String> = rule
            .split('|')
            .map(|f| {
                if f.starts_with("LPort=") {
                    format!("LPort={port}")
                } else {
                    f.to_owned()
                }
            })
            .collect();
        self.set(
            FIREWALL_RULES,
            RDP_FIREWALL_RULE,
            RegValue::String(rule.join("|")),
        )
    }

    /// `fDenyTSConnections` is 1.
    pub fn rdp_denied(&self) -> bool {
        self.dword(TERMINAL_SERVER, "fDenyTSConnections") == Some(1)
    }

    /// TLS 1.2 is disabled for the server (`Enabled`=0 or `DisabledByDefault`=1).
    pub fn tls12_disabled(&self) -> bool {
        self.dword(TLS12_SERVER, "Enabled") == Some(0)
            || self.dword(TLS12_SERVER, "DisabledByDefault") == Some(1)
    }

    /// The keep-alive settings that make the listener drop connections (`KeepAliveTimeout`=0).
    pub fn keepalive_broken(&self) -> bool {
        self.dword(RDP_TCP, "KeepAliveTimeout") == Some(0)
    }

    /// The listener allows standard RDP security only (`SecurityLayer`=0).
    pub fn legacy_rdp_security(&self) -> bool {
        self.dword(RDP_TCP, "SecurityLayer") == Some(0)
    }

    /// Makes the registry show (or stop showing) the registry-backed faults.
    pub fn show(&mut self, rdp_disabled: bool, tls_disabled: bool, flapping: bool, legacy: bool) {
        if legacy != self.legacy_rdp_security() {
            // Windows' default is 2 (TLS); 0 is standard RDP security only.
            self.force_dword(RDP_TCP, "SecurityLayer", Some(if legacy { 0 } else { 2 }));
        }
        if rdp_disabled != self.rdp_denied() {
            self.force_dword(
                TERMINAL_SERVER,
                "fDenyTSConnections",
                Some(u32::from(rdp_disabled)),
            );
        }
        if tls_disabled != self.tls12_disabled() {
            self.force_dword(TLS12_SERVER, "Enabled", Some(u32::from(!tls_disabled)));
            self.force_dword(
                TLS12_SERVER,
                "DisabledByDefault",
                Some(u32::from(tls_disabled)),
            );
        }
        if flapping != self.keepalive_broken() {
            self.force_dword(RDP_TCP, "KeepAliveTimeout", flapping.then_some(0));
            if flapping {
                self.force_dword(TS_POLICY, "KeepAliveEnable", None);
            }
        }
    }

    /// Writes (or deletes) a DWORD whatever the ACLs: the simulator's own hand.
    fn force_dword(&mut self, key: &str, name: &str, value: Option<u32>) {
        self.create_path(key);
        let Some(k) = self.keys.get_mut(&norm(key)) else {
            return;
        };
        let lower = name.to_ascii_lowercase();
        match value {
            Some(v) => {
                k.values
                    .insert(lower, (name.to_owned(), RegValue::Dword(v)));
            }
            None => {
                k.values.remove(&lower);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_case_insensitive_and_values_typed() {
        let mut r = Registry::windows_default(3389);
        assert!(r.key_exists(&RDP_TCP.to_uppercase()));
        assert_eq!(r.dword(RDP_TCP, "portnumber"), Some(3389));
        r.set(RDP_TCP, "PORTNUMBER", RegValue::String("3389".into()))
            .unwrap();
        assert_eq!(r.dword(RDP_TCP, "PortNumber"), None, "now a string");
        assert!(r.listener(3389).is_err(), "a string port is not sane");
    }

    #[test]
    fn new_item_needs_a_parent_and_never_replaces() {
        let mut r = Registry::windows_default(3389);
        assert!(r.new_item(&format!(r"{TS_POLICY}\Deeper")).is_err());
        assert!(r.new_item(RDP_TCP).is_err(), "an existing key is an error");
        assert!(r.listener(3389).is_ok());
        assert!(r.new_item(r"HKLM:\SOFTWARE").is_ok());
    }

    #[test]
    fn new_item_force_wipes_the_key_and_its_subkeys() {
        let mut r = Registry::windows_default(3389);
        r.create_path(&format!(r"{RDP_TCP}\Sub"));
        r.new_item_force(RDP_TCP);
        assert!(r.key_exists(RDP_TCP));
        assert!(r.values(RDP_TCP).is_empty());
        assert!(!r.key_exists(&format!(r"{RDP_TCP}\Sub")));
        assert_eq!(
            r.listener(3389),
            Err("RDP-Tcp fEnableWinStation is missing".to_owned())
        );
    }

    #[test]
    fn the_listener_needs_sane_values() {
        for (name, value) in [
            ("fEnableWinStation", 0),
            ("PortNumber", 3390),
            ("SecurityLayer", 7),
            ("MinEncryptionLevel", 0),
            ("MaxInstanceCount", 0),
        ] {
            let mut r = Registry::windows_default(3389);
            r.set(RDP_TCP, name, RegValue::Dword(value)).unwrap();
            assert!(r.listener(3389).is_err(), "{name}={value}");
        }
    }

    #[test]
    fn denied_keys_refuse_writes() {
        let mut r = Registry::windows_default(3389);
        r.deny_writes(RDP_TCP);
        assert!(
            r.set(RDP_TCP, "KeepAliveTimeout", RegValue::Dword(1))
                .is_err()
        );
        assert!(r.remove(RDP_TCP, "PortNumber").is_err());
        assert!(r.listener(3389).is_ok());
    }

    #[test]
    fn faults_show_in_the_registry_and_back() {
        let mut r = Registry::windows_default(3389);
        r.show(true, true, true, true);
        assert!(r.rdp_denied() && r.tls12_disabled() && r.keepalive_broken());
        assert!(r.legacy_rdp_security());
        r.show(false, false, false, false);
        assert!(!r.rdp_denied() && !r.tls12_disabled() && !r.keepalive_broken());
        assert!(!r.legacy_rdp_security());
        assert_eq!(r.dword(RDP_TCP, "SecurityLayer"), Some(2));
        assert!(r.listener(3389).is_ok());
    }
}
